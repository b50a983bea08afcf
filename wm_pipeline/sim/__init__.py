"""Simulator adapters for closed-loop evaluation and demo collection (Meta-World is built in).

See docs/SIMULATION.md for the observation/action conventions, the seed scheme and render speed.
"""

from wm_pipeline.sim.metaworld_env import (
    EMBODIMENT,
    MetaWorldEnv,
    check_task,
    expert_policy,
    instruction,
    list_tasks,
    parse_tasks,
)

__all__ = ["EMBODIMENT", "MetaWorldEnv", "check_task", "expert_policy", "instruction", "list_tasks", "parse_tasks"]
