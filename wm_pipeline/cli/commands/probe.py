"""`wm probe --labeller RUN --data DIR [--out DIR]`: score a labeller's labels against held-out ground truth.
`wm probe --encoder RUN --data DIR [--targets hand=0:3,object=4:7]`: what a decoder policy's image
encoder sees (wm_pipeline/jobs/encoder_probe.py).

LAM: linear-probe R² from latents to true actions (beside random-latent and untrained-LAM
controls), VQ code usage, next-frame error against copying frame t. IDM: R² and MSE per action
dim. Prints a table, writes probe.json and probe.png (default folder: RUN/probe/<data folder name>/).
See wm_pipeline/jobs/probe.py.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "probe",
        help="score a LAM / IDM labeller against held-out ground-truth actions, or what a decoder's image encoder sees",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Label held-out episodes with actions in memory and score the labels.",
    )
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--labeller", metavar="RUN", help="run folder of a lam or idm labeller")
    who.add_argument(
        "--encoder",
        metavar="RUN",
        help="decoder run: linear probe from its image encoder's features to the recorded state (within task)",
    )
    p.add_argument(
        "--data",
        required=True,
        metavar="DIR|URL",
        help="dataset with true actions, not trained on (a folder or an s3:// gs:// http(s):// pipe: location)",
    )
    p.add_argument("--out", default=None, metavar="DIR", help="where probe.json / probe.png go")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="windows per forward pass")
    p.add_argument("--max-episodes", type=int, default=None, metavar="N", help="probe the first N episodes only")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the linear probe (by episode)")
    p.add_argument(
        "--targets",
        default=None,
        metavar="NAME=A:B,...",
        help="--encoder: state slices to probe (default: Meta-World's hand=0:3,object=4:7)",
    )
    p.add_argument(
        "--fit",
        default=None,
        metavar="DIR",
        help="--encoder: fit the probe on these episodes (e.g. the policy's demos) and score it on --data",
    )
    p.add_argument("--every", type=int, default=2, metavar="N", help="--encoder: probe every N-th frame")
    p.add_argument("--backend", default="auto", help="video decoder: auto | torchcodec | decord | pyav")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if args.encoder:
        from wm_pipeline.jobs.encoder_probe import encoder_probe, format_table as encoder_table, parse_targets

        result = encoder_probe(
            args.encoder,
            args.data,
            args.out,
            parse_targets(args.targets),
            args.every,
            args.max_episodes,
            args.folds,
            fit_dir=args.fit,
            backend=args.backend,
        )
        print(encoder_table(result))
        print(f"wrote {result['json']}")
        return 0
    from wm_pipeline.jobs.probe import format_table, probe

    result = probe(args.labeller, args.data, args.out, args.batch_size, args.max_episodes, args.folds, args.backend)
    print(format_table(result))
    print(f"wrote {result['json']} and {result['png']}")
    return 0
