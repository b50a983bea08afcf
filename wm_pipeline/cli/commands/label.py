"""`wm label --labeller RUN --data DIR|URL [--labels-out DIR|URL] [--name NAME] [--shards i/N] [--batch-size B]`

Labels a video corpus with a trained labeller (a `wm train lam` / `wm train idm` run, or any kind
registered with ``wm_pipeline.jobs.labelling.register_labeller``) into ``DIR/labels/NAME/`` sidecar shards
and ``labeller.json``. ``--data`` may be a URL (``s3://``, ``gs://``, ``http(s)://``, ``pipe:CMD {}``;
docs/STREAMING.md "Locations"); ``--labels-out OUT`` writes the sidecars to ``OUT/labels/NAME/``
instead (a local folder or an ``s3://`` / ``gs://`` URL; required for http(s):// and pipe: data). Rerunning finishes only the missing shards. ``--shards i/N`` takes the i-th
of N contiguous shard ranges (Slurm arrays: ``--shards $SLURM_ARRAY_TASK_ID/$SLURM_ARRAY_TASK_COUNT``);
under ``torchrun --nproc_per_node R -m wm_pipeline label ...`` each rank takes its own part of that range.

Each sidecar shard is written under its own lock (``labels/NAME/.shard-NNNNNN.lock``): ranges run
side by side, and a job that reaches a shard another live job is writing stops with a one-line error
naming it (pid, host).

One bad sample costs one sample: a malformed, undecodable or missing (damaged tar) sample becomes a
failure row naming shard, key and member, and the rest of its shard is labelled. A rerun retries every
shard whose sidecar lists failures.

Exit codes: 0 done, 2 bad arguments or a labeller that does not fit the data (before any work), or a
sidecar shard in use by another job, 3 done but some samples could not be labelled (listed in the
sidecars' stats.json failures; 3 again on every rerun while any remain).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from wm_pipeline import exit_codes

log = logging.getLogger(__name__)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "label",
        help="label a video corpus with a LAM / IDM run (sidecar shards)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Write DIR/labels/NAME/ sidecar shards with a trained labeller; idempotent per shard, resumable.",
    )
    p.add_argument("--labeller", required=True, metavar="RUN", help="run folder of a labeller (lam, idm, ...)")
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR|URL",
        help="dataset to label: a folder, or an s3:// gs:// http(s):// or pipe: location",
    )
    p.add_argument(
        "--labels-out",
        default=None,
        metavar="DIR|URL",
        help="write the sidecars to DIR|URL/labels/NAME/ (a folder, s3:// or gs://) instead of beside "
        "the data; needed for http(s):// and pipe: data",
    )
    p.add_argument("--name", default=None, help="sidecar name (labels/NAME); default: the labeller kind")
    p.add_argument("--shards", default="0/1", metavar="i/N", help="label the i-th of N disjoint shard ranges")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="windows per forward pass")
    p.add_argument("--backend", default="auto", help="video decoder: auto | torchcodec | decord | pyav")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from shards.folder_lock import FolderBusy
    from wm_pipeline.jobs.labelling import label_dataset, parse_part
    from wm_pipeline.training import distributed

    world = distributed.launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        # no model is shared between ranks: the group only lets rank 0 report every rank's outcome
        import torch.distributed as dist

        dist.init_process_group("gloo")
        if rank > 0:
            logging.getLogger().setLevel(logging.WARNING)
    code, summary = exit_codes.OK, None
    try:
        summary = label_dataset(
            args.labeller,
            args.data,
            args.name,
            parse_part(args.shards),
            args.batch_size,
            args.backend,
            rank=rank,
            world=world,
            progress=not args.no_progress and rank == 0,
            labels_out=args.labels_out,
        )
        code = exit_codes.DATA_FAILURES if summary["failures"] else exit_codes.OK
    except (exit_codes.UsageError, FolderBusy) as e:  # FolderBusy: another job writes one of our sidecar shards
        if world == 1:
            raise  # wm_pipeline.cli.main prints one line, exit 2
        print(f"wm label: error: {e}", file=sys.stderr)
        code = exit_codes.USAGE
    if world > 1:
        import torch
        import torch.distributed as dist

        codes = torch.tensor([code, (summary or {}).get("clips", 0), (summary or {}).get("failures", 0)])
        gathered = [torch.zeros_like(codes) for _ in range(world)]
        dist.all_gather(gathered, codes)
        code = max(int(g[0]) for g in gathered)
        if summary is not None:
            summary = {
                **summary,
                "clips": sum(int(g[1]) for g in gathered),
                "failures": sum(int(g[2]) for g in gathered),
            }
    if summary is not None and rank == 0:
        log.info(
            "labelled %d clips into %s/labels/%s (%d failures)",
            summary["clips"],
            summary["out"],
            summary["name"],
            summary["failures"],
        )
    if world > 1:
        distributed.shutdown()
        distributed.finish_process(code)
    return code
