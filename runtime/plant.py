"""The simulated plant: a gymnasium env, created with one clear error, and checked against an engine.

Only this module imports gymnasium (lazily), so a robot that drives a `Policy` from its
own loop never needs it. An env id read from a file is never of gymnasium's ``module:Env``
form, which imports the module: only the user, on the command line, names one. Data
collection, evaluation and the control loop all create their envs here.
"""

from __future__ import annotations

import numpy as np

from contract.errors import DMMError, check_dims, describe_error

INSTALL_HINT = "pip install 'gymnasium[mujoco]'"


def make_plant(env_id: str | None, *, trusted: bool = False, **kwargs):
    """``gymnasium.make(env_id, **kwargs)`` with every failure turned into one DMMError.

    trusted: the user named ``env_id`` on the command line. An id from a file (a manifest or a
    checkpoint: the default) must be a registered id: ``module:Env`` would make gymnasium import
    ``module``, and a file never decides what is imported. None (or ""): the policy was trained
    from logs that name no simulator; only a simulation needs one.
    """
    if not env_id:
        raise DMMError("simulated plant: a policy with no simulator (its training data names no env)",
                       "an env to simulate",
                       "drive runtime.Policy from your robot's own loop, or name a simulator yourself: "
                       "'cli.py run --env ID'")
    if not trusted and ":" in str(env_id):
        raise DMMError(f"environment {env_id!r} from the engine's manifest or checkpoint: names a module for "
                       "gymnasium to import",
                       "a registered gymnasium id such as Hopper-v5 (a file never decides what is imported)",
                       "if you trust that module, name the env yourself: 'cli.py run --env ID'")
    try:
        import gymnasium as gym
    except ImportError:
        raise DMMError(f"simulated plant {env_id!r}: gymnasium is not installed",
                       "gymnasium installed",
                       f"{INSTALL_HINT}, or drive the Policy from your own loop (no gymnasium needed)") from None
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as error:
        raise DMMError(f"environment {env_id!r}: a missing package ({describe_error(error)})",
                       "gymnasium with its mujoco extra installed", INSTALL_HINT) from None
    except Exception as error:  # gymnasium raises several types for unknown or broken envs
        raise DMMError(f"cannot create environment {env_id!r} ({describe_error(error)})",
                       "a registered gymnasium id such as Hopper-v5, Walker2d-v5 or HalfCheetah-v5",
                       f"name a registered id, or {INSTALL_HINT}") from None


def check_plant(plant, manifest, env_id: str) -> None:
    """The plant's observation/action sizes must be the engine's."""
    state_dim = int(np.prod(plant.observation_space.shape))
    act_dim = int(np.prod(plant.action_space.shape))
    check_dims(f"plant {env_id}", (state_dim, act_dim), (manifest.state_dim, manifest.act_dim),
               "the engine's manifest", "run the engine on the env it was trained for")
