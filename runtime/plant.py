"""The simulated plant: a gymnasium env, created with one clear error, and checked against an engine.

Only this module imports gymnasium (lazily), so a robot that drives a `Policy` from its
own loop never needs it. Data collection, evaluation and the control loop all create
their envs here.
"""

from __future__ import annotations

import numpy as np

from contract.errors import DMMError, describe_error

INSTALL_HINT = "pip install 'gymnasium[mujoco]'"


def make_plant(env_id: str, **kwargs):
    """``gymnasium.make(env_id, **kwargs)`` with every failure turned into one DMMError."""
    try:
        import gymnasium as gym
    except ImportError:
        raise DMMError(f"the simulated plant {env_id!r} needs gymnasium; {INSTALL_HINT} (not needed when "
                       "you drive a Policy from your own loop)") from None
    try:
        return gym.make(env_id, **kwargs)
    except gym.error.DependencyNotInstalled as error:
        raise DMMError(f"environment {env_id!r} needs a missing package ({describe_error(error)}); "
                       f"{INSTALL_HINT}") from None
    except Exception as error:  # gymnasium raises several types for unknown or broken envs
        raise DMMError(f"cannot create environment {env_id!r} ({describe_error(error)}); expected a "
                       f"registered gymnasium id such as Hopper-v5, Walker2d-v5 or HalfCheetah-v5; "
                       f"{INSTALL_HINT}") from None


def check_plant(plant, manifest, env_id: str) -> None:
    """The plant's observation/action sizes must be the engine's."""
    state_dim = int(np.prod(plant.observation_space.shape))
    act_dim = int(np.prod(plant.action_space.shape))
    if (state_dim, act_dim) != (manifest.state_dim, manifest.act_dim):
        raise DMMError(f"plant {env_id} obs/act dims | received {state_dim}/{act_dim} | expected "
                       f"{manifest.state_dim}/{manifest.act_dim} (the engine's manifest); run the engine "
                       "on the env it was trained for")
