"""One sidecar from several labellers of the same corpus: the mean of their pseudo-actions per row, valid
where every member is valid, and the members' spread (their disagreement) beside it.

    python scripts/ensemble_labels.py --data video --labels grid-idm-k1-s0,grid-idm-k1-s1,grid-idm-k1-s2 \\
        --name idm-ens3
    wm train decoder --data demos --data video --labels idm-ens3 policy=idm-bc ...

Independent IDMs (other training seeds) make partly independent errors: their mean is a lower-variance
label than any one of them. The members must have labelled the same samples with the same number of
frames; a sample one member could not label is left out (its ``labeller.json`` names the members).
Fields, as ``wm label`` writes them for an IDM: ``pseudo_action`` [n, A] (raw units) and ``valid`` [n];
plus ``spread`` [n]: the members' standard deviation per row, averaged over the action dims (raw units).

``--keep Q`` keeps only the rows the members agree on most: a row whose spread is above the Q-quantile of
all valid rows' spreads is marked not valid (a training window with such a row is then not used as an
action sample). The threshold comes from the members alone, never from true actions.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shards.batch_keys import PSEUDO_ACTION, VALID  # noqa: E402
from shards.format import read_manifest  # noqa: E402
from shards.sidecar import (  # noqa: E402
    labeller_info_lock,
    read_sidecar,
    sidecar_shard_lock,
    write_labeller_info,
    write_sidecar_shard,
)

FIELD = PSEUDO_ACTION


def ensemble_rows(members: list[dict[str, dict[str, np.ndarray]]], where: str) -> dict[str, dict[str, np.ndarray]]:
    """{key: {"pseudo_action", "valid", "spread"}} over the keys every member labelled; SystemExit naming
    the key when the members disagree on its length or action size."""
    keys = sorted(set.intersection(*(set(m) for m in members)))
    out = {}
    for key in keys:
        actions = [np.asarray(m[key][FIELD], np.float32) for m in members]
        if len({a.shape for a in actions}) != 1:
            shapes = [list(a.shape) for a in actions]
            raise SystemExit(f"{where}:{key}: the members' {FIELD} shapes differ ({shapes}): not one corpus")
        stack = np.stack(actions)  # [M, n, A]
        valid = np.logical_and.reduce([np.asarray(m[key][VALID], bool) for m in members])
        out[key] = {
            FIELD: stack.mean(0),
            VALID: valid,
            "spread": stack.std(0).mean(-1).astype(np.float32),
        }
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="the labelled dataset (its labels/ folder)")
    p.add_argument("--labels", required=True, help="comma-separated sidecar names, >= 2")
    p.add_argument("--name", required=True, help="the ensemble's sidecar name (labels/<name>/)")
    p.add_argument(
        "--keep", type=float, default=1.0, help="fraction of valid rows kept, those of least spread (default: all)"
    )
    args = p.parse_args(argv)
    if not 0.0 < args.keep <= 1.0:
        raise SystemExit(f"--keep {args.keep}: a fraction in (0, 1]")
    names = [n for n in args.labels.split(",") if n]
    if len(names) < 2:
        raise SystemExit(f"--labels {args.labels!r}: an ensemble needs >= 2 sidecars")
    if args.name in names:
        raise SystemExit(f"--name {args.name!r} is one of the members: write the ensemble under a new name")
    shards, where = read_manifest(args.data)["shards"], f"{args.data} (labels {args.labels})"
    per_shard = [
        ensemble_rows([read_sidecar(args.data, name, sh["name"]) for name in names], f"{where} shard {sh['name']}")
        for sh in shards
    ]
    info = {"kind": "ensemble", "members": names, "reduce": "mean"}
    if args.keep < 1.0:
        spreads = [r["spread"][r[VALID]] for rows in per_shard for r in rows.values()]
        threshold = float(np.quantile(np.concatenate(spreads), args.keep))
        for rows in per_shard:
            for r in rows.values():
                r[VALID] = r[VALID] & (r["spread"] <= threshold)
        info.update(keep=args.keep, max_spread=threshold)
    with labeller_info_lock(args.data, args.name):
        write_labeller_info(args.data, args.name, info)
    n = dropped = 0
    for shard, rows in zip(shards, per_shard):
        failures = [
            {"key": k, "reason": "not labelled by every member"} for k in sorted(set(shard["keys"]) - set(rows))
        ]
        with sidecar_shard_lock(args.data, args.name, shard["name"]):
            write_sidecar_shard(args.data, args.name, shard["name"], rows, failures)
        n, dropped = n + len(rows), dropped + len(failures)
    print(
        f"ensemble_labels: {n} samples of {args.data} as labels/{args.name} (mean of {', '.join(names)})"
        + (
            f"; rows of spread > {info['max_spread']:.4g} marked not valid (--keep {args.keep})"
            if args.keep < 1
            else ""
        )
        + (f"; {dropped} not labelled by every member left out" if dropped else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
