"""Which reader reads a log, and the import from a source to a written dataset."""

from __future__ import annotations

import os
from pathlib import Path

from contract.errors import DMMError
from dmm_train.importing.core import ImportResult, ReadLog, finish_episodes, sha256_sources, write_import
from dmm_train.importing.mapping import SPARSE_SUCCESS, ImportMapping
from dmm_train.minari_reader import load_dataset


def read_log(source: Path, mapping: ImportMapping, *, rewards_from_log: bool) -> ReadLog:
    if mapping.format in ("npz", "hdf5", "robomimic"):
        from dmm_train.importing.arrays import read_arrays

        return read_arrays(source, mapping, rewards_from_log=rewards_from_log)
    if mapping.format in ("rosbag2", "mcap"):
        from dmm_train.importing.rosbag import read_bag

        return read_bag(source, mapping, rewards_from_log=rewards_from_log)
    from dmm_train.importing.lerobot import read_lerobot

    return read_lerobot(source, mapping, rewards_from_log=rewards_from_log)


def run_import(source: str | os.PathLike, mapping: ImportMapping, *, reward_fn: str | None = None,
               out: str | os.PathLike | None = None, overwrite: bool = False) -> ImportResult:
    """Read ``source`` per ``mapping``, write the Minari dataset, and summarise it in one line."""
    mapping = mapping.validate()
    source = Path(source)
    if not source.exists():
        raise DMMError(f"import source {str(source)!r}: no such file or directory",
                       f"a {mapping.format} file or directory", "pass the path of an existing log")
    if reward_fn and mapping.reward not in (None, SPARSE_SUCCESS) and mapping.origin.get("reward") == "option":
        raise DMMError(f"--reward {mapping.reward!r} with --reward-fn {reward_fn!r}", "one source of rewards",
                       "leave out --reward or --reward-fn")
    read = read_log(source, mapping, rewards_from_log=not reward_fn)
    rollouts, dropped, reward_note = finish_episodes(read.episodes, read.mapping, reward_fn)
    provenance = {
        "format": mapping.format,
        "source": source.name,
        "sources_sha256": sha256_sources(read.files, source),
        "mapping": read.mapping.to_record(),
        "reward_fn": reward_fn,
        "final_observation": read.final_note if not dropped else
        f"not in the log: last transition dropped in {dropped} of {len(rollouts)} episodes",
    }
    path = write_import(rollouts, read.mapping, provenance, out=out, overwrite=overwrite)
    dataset = load_dataset(path)  # read back through the project's reader: what training will see
    final = (f"final observation {read.final_note}" if not dropped else
             f"dropped the last transition of {dropped} of {len(rollouts)} episodes (no observation after it)")
    notes = "; ".join([final, reward_note, *read.notes])
    summary = (f"imported {dataset.dataset_id}: {len(dataset.episodes)} episodes, {dataset.total_steps} steps, "
               f"obs dim {dataset.state_dim}, action dim {dataset.act_dim} ({notes}), content hash "
               f"{dataset.content_hash[:16]} -> {path}")
    return ImportResult(path=path, episodes=len(dataset.episodes), steps=dataset.total_steps,
                        state_dim=dataset.state_dim, act_dim=dataset.act_dim, content_hash=dataset.content_hash,
                        summary=summary)
