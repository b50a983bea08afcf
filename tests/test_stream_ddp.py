"""WindowStream across 2 real torchrun processes (gloo) x 2 DataLoader workers each."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from shards.stream import label_starts
from test_stream import LENGTHS, make_dataset

pytestmark = pytest.mark.distributed

SCRIPT = textwrap.dedent("""
    import gc, itertools, json, os, sys
    import torch.distributed as dist
    from shards.stream import WindowStream, make_loader

    label_dir, train_dir, out_dir = sys.argv[1:4]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # label mode: 3 shards for 2 ranks x 2 workers, so one worker gets nothing and must just stop
    seen = []
    for batch in make_loader(WindowStream(label_dir, window=8, mode="label"), batch_size=3, num_workers=2):
        seen += [[k, s] for k, s in zip(batch["key"], batch["start"].tolist())]

    # train mode: a single shard for 4 (rank, worker) slots: everybody resamples it, nobody runs dry
    loader = make_loader(WindowStream(train_dir, window=4, windows_per_episode=2, shuffle_buffer=4, seed=7),
                         batch_size=4, num_workers=2)
    it = iter(loader)
    train = []
    for batch in itertools.islice(it, 6):
        train += [[k, s] for k, s in zip(batch["key"], batch["start"].tolist())]
    del it, loader
    gc.collect()
    dist.barrier()  # both ranks got here: neither hung
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rank": rank, "world": world, "label": seen, "train": train}, f)
    dist.destroy_process_group()
    os._exit(0)  # see FACTS.md: avoids the gloo abort at interpreter exit
""")


def test_label_pass_is_disjoint_and_complete_and_train_never_runs_dry(tmp_path):
    label_dir = make_dataset(tmp_path / "label")  # 5 episodes in 3 shards
    train_dir = make_dataset(tmp_path / "train", per_shard=5)  # the same 5 episodes in 1 shard
    script = tmp_path / "ddp_stream.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(script),
            str(label_dir),
            str(train_dir),
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2) if (out / f"rank{r}.json").exists()]
    assert len(results) == 2, f"a rank wrote no output (rc {proc.returncode}):\n{proc.stderr[-3000:]}"
    assert [r["world"] for r in results] == [2, 2]

    per_rank = [{tuple(x) for x in r["label"]} for r in results]
    assert all(len(s) == len(r["label"]) for s, r in zip(per_rank, results))  # no repeats within a rank
    assert not per_rank[0] & per_rank[1]  # disjoint across ranks
    expected = {(f"ep{i}", s) for i, n in enumerate(LENGTHS) for s in label_starts(n, 8, 1)}
    assert per_rank[0] | per_rank[1] == expected  # complete
    assert per_rank[0] and per_rank[1]

    for r in results:
        assert len(r["train"]) == 6 * 4
        assert {k for k, _ in r["train"]} <= {f"ep{i}" for i in range(len(LENGTHS))}
    assert results[0]["train"] != results[1]["train"]  # ranks draw with their own seeds
