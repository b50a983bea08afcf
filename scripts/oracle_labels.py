"""The ceiling of ``idm-bc``: a perfect labeller. The true actions of a dataset collected with actions are
written as the IDM sidecar of its action-free twin (the same episodes collected with ``--drop-actions``),
so a decoder can train on action-free video labelled without error.

    wm collect metaworld ... --seed 20000 --action-noise 0.1 --drop-actions --out video
    wm collect metaworld ... --seed 20000 --action-noise 0.1 --out video-actions   # the same episodes
    python scripts/oracle_labels.py --actions video-actions --video video --name oracle
    wm train decoder --data demos --data video --labels oracle policy=idm-bc ...

Same fields as ``wm label`` with an IDM (``pseudo_action`` [n, A] in raw action units, ``valid`` [n];
the last frame has no next frame to read an action from, so it is invalid, as an IDM leaves it). The
twin must hold the same keys with the same frame counts in the same shards; anything else is refused
with the key and the mismatch, because labels of other episodes would be wrong labels, not oracle ones.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.batch_keys import PSEUDO_ACTION  # noqa: E402
from shards.format import read_manifest  # noqa: E402
from shards.samples import parse_sample  # noqa: E402
from shards.sidecar import (  # noqa: E402
    labeller_info_lock,
    sidecar_shard_lock,
    write_labeller_info,
    write_sidecar_shard,
)
from shards.tar_reader import read_tar_samples  # noqa: E402


def _episodes(root: Path, shard: dict) -> dict[str, tuple[int, np.ndarray | None, str]]:
    """key -> (n_frames, action or None, task) of every sample of one shard (the video is not decoded)."""
    out = {}
    for raw in read_tar_samples(root / shard["name"]):
        s = parse_sample(raw, root / shard["name"], None)
        out[s.key] = (s.meta.n_frames, s.action, s.meta.task)
    return out


def oracle_rows(actions_dir: Path, video_dir: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """shard name -> {key: {"pseudo_action", "valid"}} for every sample of ``video_dir``, from
    ``actions_dir``'s true actions; SystemExit naming the key when the two datasets differ."""
    have, want = read_manifest(actions_dir)["shards"], read_manifest(video_dir)["shards"]
    if [s["name"] for s in have] != [s["name"] for s in want]:
        raise SystemExit(
            f"{actions_dir}: its shards are not {video_dir}'s (collect both with the same command and seed)"
        )
    out = {}
    for a, v in zip(have, want):
        truth, video = _episodes(actions_dir, a), _episodes(video_dir, v)
        rows = {}
        for key, (n, _, task) in video.items():
            if key not in truth:
                raise SystemExit(f"{actions_dir}/{a['name']}: no sample {key!r} (it is in {video_dir})")
            m, action, task_a = truth[key]
            if action is None:
                raise SystemExit(f"{actions_dir}/{a['name']}:{key}: has no actions")
            if (m, task_a) != (n, task):
                raise SystemExit(
                    f"{actions_dir}/{a['name']}:{key}: {m} frames of {task_a}, but {video_dir} has {n} of {task}"
                )
            valid = np.ones(n, bool)
            valid[-1] = False
            rows[key] = {PSEUDO_ACTION: np.asarray(action, np.float32)[:n], "valid": valid}
        out[v["name"]] = rows
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--actions", required=True, type=Path, help="the dataset with actions")
    p.add_argument("--video", required=True, type=Path, help="its action-free twin (the sidecar goes here)")
    p.add_argument("--name", default="oracle", help="sidecar name (labels/<name>/)")
    args = p.parse_args(argv)
    shards = oracle_rows(args.actions, args.video)
    digest = hashlib.sha256(json.dumps(read_manifest(args.actions)["shards"], sort_keys=True).encode()).hexdigest()
    # the locks `wm label` takes: labeller.json waits for another writer; a shard another job holds is
    # refused (FolderBusy, naming the holder)
    with labeller_info_lock(args.video, args.name):
        write_labeller_info(
            args.video,
            args.name,
            {"kind": "oracle", "source": str(args.actions.resolve()), "manifest_sha256": digest},
        )
    n = 0
    for shard, rows in shards.items():
        with sidecar_shard_lock(args.video, args.name, shard):
            write_sidecar_shard(args.video, args.name, shard, rows)
        n += len(rows)
    print(f"oracle_labels: {n} episodes of {args.video} labelled with {args.actions}'s actions as labels/{args.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
