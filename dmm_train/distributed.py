"""Training on several processes (torchrun): the process group, each rank's random streams, and the
collectives the trainer needs around DistributedDataParallel.

``torchrun`` sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous) in every worker's
environment; `start` turns them into a process group (gloo on the CPU, NCCL on CUDA, chosen
from the training device) with a timeout, so that a rank waiting on a peer that stopped gives
up instead of hanging. Without them it returns the one-process context and creates no group:
the trainer then runs exactly as it always did.

Random streams: rank 0 draws exactly the one-process streams of the run's seed; rank r > 0
draws from `rank_seed(seed, r)`, a seed spawned from (seed, r) by numpy's SeedSequence, so a
run is reproducible for a given world size and the ranks' windows are independent.

Errors: the helpers `on_main` and `on_every_rank` run a setup step and make the ranks agree on
its outcome, so that a rank failing during setup (a dataset missing on one node, say) stops
every rank with the same one-line DMMError naming it, not a hang; such an error is marked
``quiet`` on the ranks other than 0, so the CLI prints it once. With one process they are
plain calls: the error is the step's own. A rank that stops later (killed, say) leaves the
others waiting in a collective at most the group's timeout; torchrun stops them sooner.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from contract.errors import DMMError, error_parts

LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class RankContext:
    """Where this process stands in the job; the defaults are the one-process run (no group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: no process group
    owns_group: bool = False  # True when `start` created the group (and `stop` destroys it)

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """The device this rank trains on: ``cuda`` becomes the rank's own ``cuda:LOCAL_RANK``."""
        if self.distributed and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in LAUNCHER_ENV)


def backend_for(device: str) -> str:
    """NCCL for CUDA training, gloo for the CPU."""
    return "nccl" if device.startswith("cuda") else "gloo"


def start(device: str, timeout_s: float) -> RankContext:
    """Join the job's process group (created here under torchrun, reused if the caller made one)."""
    if dist.is_available() and dist.is_initialized():
        return RankContext(rank=dist.get_rank(), world_size=dist.get_world_size(),
                           local_rank=int(os.environ.get("LOCAL_RANK", 0)), backend=dist.get_backend())
    if not launched_by_torchrun():
        return RankContext()
    rank, world_size, local_rank = (int(os.environ[name]) for name in LAUNCHER_ENV)
    backend = backend_for(device)
    if backend == "nccl":
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            raise DMMError(f"rank {rank}: --device {device} with local rank {local_rank}, but this node has "
                           f"{torch.cuda.device_count()} CUDA device(s)", "one GPU per local rank",
                           fix="pass --nproc_per_node at most the GPU count (or --device cpu)")
        torch.cuda.set_device(local_rank)
    _import_group_defaults_before_the_group()
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return RankContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend, owns_group=True)


def _import_group_defaults_before_the_group() -> None:
    """Import torch.distributed.nn.functional while no process group exists.

    Its functions take ``group=group.WORLD`` as a default argument, evaluated once, at import.
    DistributedDataParallel imports it; imported after the group is made, those defaults keep
    the group alive for the life of the process, past `stop`, and with it gloo's worker threads.
    Such a thread can then free a tensor while the interpreter shuts down, which aborts the
    process ("terminate called without an active exception", SIGABRT) after a run that
    succeeded. Imported first, the defaults are None and `stop` really ends the group.
    """
    import torch.distributed.nn.functional  # noqa: F401  (imported for the side effect above)


def stop(context: RankContext) -> None:
    """Destroy the group `start` created, and with it the backend's threads.

    The collection first frees a DistributedDataParallel wrapper that sits in a reference
    cycle: it holds the group, which would then outlive `destroy_process_group`.
    """
    if context.owns_group and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank ``rank``'s streams: ``seed`` itself for rank 0, a spawned 32-bit seed otherwise
    (32 bits: numpy's legacy global generator takes no more)."""
    if rank == 0:
        return seed
    return int(np.random.SeedSequence(seed, spawn_key=(rank,)).generate_state(1, dtype=np.uint32)[0])


def split_batch(global_batch: int, ranks: int) -> int:
    """Windows per rank of a global batch; refuses a batch the ranks cannot share evenly."""
    if global_batch % ranks:
        lower, upper = global_batch // ranks * ranks, (global_batch // ranks + 1) * ranks
        raise DMMError(f"--batch-size {global_batch} over {ranks} ranks",
                       "a global batch divisible by the number of ranks (each rank takes batch / ranks windows)",
                       fix=f"pass e.g. --batch-size {lower or upper} or {upper}")
    return global_batch // ranks


def quiet_off_main(context: RankContext, error: DMMError) -> DMMError:
    """Mark an error that every rank raises alike, so that only rank 0 prints it (``error.quiet``)."""
    error.quiet = not context.is_main
    return error


Failure = tuple[str, str, str]  # a failed rank's (received, expected, fix), sent to the other ranks


def _agree(context: RankContext, failure: Failure | None) -> None:
    """Raise the same DMMError on every rank if any rank reports a failure (lowest rank first)."""
    failures: list[Failure | None] = [None] * context.world_size
    dist.all_gather_object(failures, failure)
    failed = [(rank, parts) for rank, parts in enumerate(failures) if parts is not None]
    if failed:
        rank, (received, expected, fix) = failed[0]
        others = f" (and {len(failed) - 1} other rank(s) failed)" if len(failed) > 1 else ""
        raise quiet_off_main(context, DMMError(f"rank {rank} of {context.world_size}: {received}{others}",
                                               expected, fix=fix))


def _failure_parts(error: BaseException) -> Failure:
    """The three parts of ``error`` (a library's error becomes the received part of one)."""
    return error_parts(error, "the step to succeed on every rank",
                       "rerun it in one process (without torchrun) to see its full traceback")


def on_every_rank(context: RankContext, step: Callable[[], Any]) -> Any:
    """Run ``step`` on every rank; if it fails on any, every rank raises one DMMError naming that rank."""
    if not context.distributed:
        return step()
    result, failure = None, None
    try:
        result = step()
    except Exception as error:  # any failure must reach the other ranks, or they would wait on this one
        failure = _failure_parts(error)
    _agree(context, failure)
    return result


def on_main(context: RankContext, step: Callable[[], Any]) -> Any:
    """Run ``step`` on rank 0 alone and hand its result to every rank (errors as in `on_every_rank`)."""
    if not context.distributed:
        return step()
    result, failure = None, None
    if context.is_main:
        try:
            result = step()
        except Exception as error:  # see on_every_rank
            failure = _failure_parts(error)
    _agree(context, failure)
    holder = [result]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def gather(context: RankContext, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    if not context.distributed:
        return [value]
    values: list[Any] = [None] * context.world_size
    dist.all_gather_object(values, value)
    return values


def all_reduce_sum(context: RankContext, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` summed over the ranks, in place (a no-op for one process)."""
    if context.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier(context: RankContext) -> None:
    if context.distributed:
        dist.barrier()


def process_group_error_types() -> tuple[type[BaseException], ...]:
    """The exceptions a collective raises when a peer is gone or the group timed out."""
    return tuple(getattr(dist, name) for name in ("DistError",) if hasattr(dist, name))
