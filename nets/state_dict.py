"""Renaming state-dict keys on load, so checkpoints saved under an older module layout keep loading.

``rename_on_load(module, rules)`` registers a ``load_state_dict`` pre-hook on ``module``: every key
under the module's prefix is rewritten by the first rule ``(pattern, replacement)`` (``re.fullmatch``
on the key relative to the module) that matches it. Keys of the current layout match no rule and pass
unchanged. The hook runs inside ``load_state_dict``, so every loader that goes through it
(``from_pretrained``, ``safetensors.torch.load_model``, a plain ``load_state_dict``) sees new names.
``rename_keys(state_dict, rules, prefix)`` is the same rewrite on a plain dict, and
``current_names(model, state_dict)`` applies every rule registered anywhere in ``model`` (for code that
matches checkpoint names before loading them, e.g. a warm start that copies what fits).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from torch import nn

Rules = Iterable[tuple[str, str]]


def rename_keys(state_dict: dict, rules: Rules, prefix: str = "") -> dict:
    """A copy of ``state_dict`` with the keys under ``prefix`` renamed by ``rules`` (first match wins)."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out = {}
    for key, value in state_dict.items():
        if key.startswith(prefix):
            rest = key[len(prefix) :]
            for pattern, replacement in compiled:
                if pattern.fullmatch(rest):
                    key = prefix + pattern.sub(replacement, rest)
                    break
        out[key] = value
    return out


def sequential_renames(container: str, old: str, names: dict[int, str]) -> list[tuple[str, str]]:
    """Rules for a block that was an ``nn.Sequential`` called ``old`` inside the numbered ``container``
    (``container.N.old.I.*``) and now names its layers: ``names = {I: "conv1", ...}``."""
    return [(rf"{container}\.(\d+)\.{old}\.{i}\.(.*)", rf"{container}.\1.{name}.\2") for i, name in names.items()]


def rename_on_load(module: nn.Module, rules: Rules) -> None:
    """Make ``module.load_state_dict`` (and any parent's) accept keys of an older layout, per ``rules``."""
    rules = list(rules)

    def hook(state_dict, prefix, *args):
        renamed = rename_keys({k: state_dict[k] for k in list(state_dict) if k.startswith(prefix)}, rules, prefix)
        for key in [k for k in state_dict if k.startswith(prefix)]:
            del state_dict[key]
        state_dict.update(renamed)

    module._register_load_state_dict_pre_hook(hook)
    module._old_key_rules = rules


def current_names(model: nn.Module, state_dict: dict) -> dict:
    """``state_dict`` with every key of an older layout renamed as ``model.load_state_dict`` would."""
    for name, module in model.named_modules():
        rules = getattr(module, "_old_key_rules", None)
        if rules:
            state_dict = rename_keys(state_dict, rules, f"{name}." if name else "")
    return state_dict
