"""The dataset card (``README.md``) written beside every shard dataset.

Its YAML front matter names the shard tars as the data files of the ``default`` config, so that
Hugging Face ``datasets.load_dataset(folder)`` (and the Hub's viewer) read the folder with the
WebDataset builder; without it the folder's ``manifest.json`` and ``*.stats.json`` files make the
JSON builder win, which fails on them. The body says what the folder holds and how to read it.

A ``README.md`` that lacks ``CARD_MARK`` was written by someone else and is never replaced; ours is
rewritten at every finalize (the counts change when a job adds shards).
"""

from __future__ import annotations

from typing import Any

CARD = "README.md"
CARD_MARK = "<!-- dataset card written by wm-pipeline (shards.dataset_card); remove this line to keep your edits -->"
DATA_FILES = "shard-*.tar"  # the root's shard tars only: label sidecars live under labels/


def is_ours(text: str) -> bool:
    """True when ``text`` (an existing README.md) is a card this module wrote."""
    return CARD_MARK in text


def dataset_card(manifest: dict[str, Any]) -> str:
    """The card of the dataset described by ``manifest`` (docs/FORMAT.md): front matter + summary."""
    totals = manifest.get("totals", {})
    embodiments = manifest.get("embodiments", {})
    resolution = manifest.get("resolution")
    robotics = any(e.get("action_dim") for e in embodiments.values())
    front = [
        "---",
        "configs:",
        "- config_name: default",
        "  data_files:",
        "  - split: train",
        f'    path: "{DATA_FILES}"',
        "tags:",
        "- webdataset",
        "- wm-shards",
    ]
    if robotics:
        front += ["task_categories:", "- robotics"]
    front.append("---")
    lines = [*front, CARD_MARK, "", "# Shard dataset (wm-shards)", ""]
    size = f"{resolution[0]}x{resolution[1]}" if resolution else "-"
    lines += [
        f"{totals.get('samples', 0)} samples, {totals.get('frames', 0)} frames in "
        f"{totals.get('shards', 0)} WebDataset shard(s), {size} pixels, cameras "
        f"{', '.join(manifest.get('cameras') or []) or '-'}. Made by `{manifest.get('created_by') or '-'}`.",
        "",
    ]
    if embodiments:
        lines += ["| embodiment | samples | frames | fps | action dim | state dim |", "|---|---|---|---|---|---|"]
        lines += [
            f"| {name} | {e.get('samples', 0)} | {e.get('frames', 0)} | {e.get('fps', 0):g} | "
            f"{e.get('action_dim', 0)} | {e.get('state_dim', 0)} |"
            for name, e in sorted(embodiments.items())
        ]
        lines.append("")
    tasks = manifest.get("tasks") or {}
    if tasks:
        shown = sorted(tasks.items())[:20]
        more = f" and {len(tasks) - len(shown)} more" if len(tasks) > len(shown) else ""
        lines += ["Tasks (samples): " + ", ".join(f"`{t}` ({n})" for t, n in shown) + more + ".", ""]
    lines += [
        "One sample is one episode or clip: `<key>.meta.json` (fps, task, instruction, embodiment, ...),",
        "`<key>.action.npy` float32 `[T, A]` (row t: the action after frame t), `<key>.state.npy` float32",
        "`[T, S]`, and one H.264 `<key>.<camera>.mp4` per camera. `manifest.json` lists the shards and holds",
        "the normalisation stats per embodiment. Format: wm-pipeline's docs/FORMAT.md (schema "
        f"{manifest.get('schema', 1)}).",
        "",
        "Reading it:",
        "",
        "```python",
        "from datasets import load_dataset",
        'ds = load_dataset("path/to/this/folder", split="train")     # the WebDataset builder',
        "import webdataset as wds",
        f'ds = wds.WebDataset("path/to/this/folder/shard-{{000000..{max(totals.get("shards", 1) - 1, 0):06d}}}.tar")',
        "```",
        "",
        "or `wm inspect`, `wm train ... --data FOLDER`, `wm export lerobot FOLDER --out DIR`.",
        "",
    ]
    return "\n".join(lines)
