"""Few-shot selection (``--episodes-per-task K``, ``data.episodes_per_task``) and the task subset
(``data.tasks``: e.g. one policy per task): which samples a training run may read.

The first K successful episodes with actions of each task, in (data dir, shard, key) order, so the
subset is deterministic and K = 5 is a prefix of K = 10; episodes whose ``success`` is unknown (None)
count as demos, failed ones do not. Action-free samples are not demos and pass through unfiltered
by K; ``tasks`` keeps only the samples of those tasks, with or without actions.
``wm_pipeline.training.registry.default_stream`` and the decoder's stream apply it, so every model that trains on
demos (decoders, the fine-tuned world model of the uwm policy) sees the same subset.
"""

from __future__ import annotations

import functools

from wm_pipeline.exit_codes import UsageError


@functools.lru_cache(maxsize=8)
def episode_index(data_dir: str) -> tuple[tuple[str, str, bool, bool | None], ...]:
    """``(key, task, has_action, success)`` of every sample of a dataset, in shard / key order."""
    from shards.format import META, SampleMeta, read_manifest
    from shards.location import locate
    from shards.stream import read_tar_samples

    root = locate(data_dir)  # a folder or a URL (shards.location)
    rows = []
    for shard in read_manifest(root)["shards"]:
        path = root / shard["name"]
        for raw in read_tar_samples(path):
            meta = SampleMeta.from_json(raw[META], where=f"{path}:{raw['__key__']}.{META}")
            rows.append((meta.key, meta.task, meta.has_action, meta.success))
    return tuple(rows)


def few_shot_keys(paths: list[str], k: int, tasks=()) -> tuple[list[set[str]], dict[str, int]]:
    """The first ``k`` successful episodes with actions of each task over ``paths`` (in order; ``k = 0``:
    all of them), of the ``tasks`` only when some are given.

    Returns (keys to use per data dir: the chosen demos plus every action-free sample of those tasks,
    count of chosen demos per task). A task with fewer than ``k`` usable demos, or a task of ``tasks``
    with none, is a UsageError naming it.
    """
    from shards.location import identity

    wanted = set(tasks)
    chosen: dict[str, list[tuple[int, str]]] = {}
    available: dict[str, int] = {}
    action_free: list[set[str]] = [set() for _ in paths]
    present: set[str] = set()  # tasks with any sample
    for i, path in enumerate(paths):
        for key, task, has_action, success in episode_index(identity(path)):
            if wanted and task not in wanted:
                continue
            present.add(task)
            if not has_action:
                action_free[i].add(key)
                continue
            if success is False:
                continue
            available[task] = available.get(task, 0) + 1
            if not k or len(chosen.setdefault(task, [])) < k:
                chosen.setdefault(task, []).append((i, key))
    if wanted - present:
        raise UsageError(f"data.tasks: no samples of {sorted(wanted - present)} in {paths}")
    if k and not chosen:
        raise UsageError(f"--episodes-per-task {k}: no successful episodes with actions in {paths}")
    short = {t: n for t, n in available.items() if n < k}
    if short:
        listed = ", ".join(f"'{t}' has {n}" for t, n in sorted(short.items()))
        raise UsageError(
            f"--episodes-per-task {k}: not enough successful demos with actions in {paths}: "
            f"{listed} (need {k} per task)"
        )
    keys = [set(free) for free in action_free]
    for picks in chosen.values():
        for i, key in picks:
            keys[i].add(key)
    return keys, {t: len(p) for t, p in chosen.items()}
