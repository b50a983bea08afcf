"""The on-disk format of a model folder: ``config.json`` + ``model.safetensors`` (docs/FORMAT.md).

Written by every model's ``save_pretrained`` (``huggingface_hub.PyTorchModelHubMixin``) and read
back by its ``from_pretrained`` and by the runtime's loaders (wm_pipeline.run_folder). Besides the
model's own config fields, ``config.json`` names what wrote it::

    "_class": "decoders.decoder.ActionDecoder",   # module.qualname of the model class
    "_format_version": 1                          # that class's layout version (FORMAT_VERSION)

so that a loader knows the model kind without guessing it from the field set, and a class can
convert folders of an older layout by version. Folders saved before these keys existed have
neither: ``saved_class`` is None and ``saved_version`` 0. ``model.safetensors`` carries the
metadata ``{"format": "pt"}`` (what ``transformers`` and the Hub expect of PyTorch weights).

Model classes mix in ``ModelFolderMixin`` (its ``_save_pretrained`` calls ``save_model_folder`` with the
class's ``FORMAT_VERSION``) and strip the keys before building their config dataclass from a dict
(``config_fields``). Only the standard library,
safetensors and torch: shards may not import the model packages or the runtime.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
CLASS_KEY = "_class"
VERSION_KEY = "_format_version"
HEADER_KEYS = (CLASS_KEY, VERSION_KEY)
WEIGHTS_METADATA = {"format": "pt"}


def class_name(cls: type) -> str:
    """``module.qualname`` of a model class, as ``config.json`` records it."""
    return f"{cls.__module__}.{cls.__qualname__}"


def config_fields(config: dict[str, Any]) -> dict[str, Any]:
    """A loaded ``config.json`` without the keys this module adds: what the config dataclass takes."""
    return {k: v for k, v in config.items() if k not in HEADER_KEYS}


def stamped(config: Any, cls: type, version: int) -> dict[str, Any]:
    """``config`` (a dataclass or a dict) as the dict written to ``config.json``, naming ``cls`` and ``version``."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    return {**config_fields(dict(config)), CLASS_KEY: class_name(cls), VERSION_KEY: int(version)}


def save_weights(module: Any, path: str | Path) -> None:
    """``module``'s state dict to a safetensors file with ``{"format": "pt"}`` metadata (tensors shared by
    several names stored once, as ``safetensors.torch.save_model`` does)."""
    from safetensors.torch import save_model

    save_model(module, str(path), metadata=dict(WEIGHTS_METADATA))


def save_model_folder(module: Any, folder: str | Path, config: Any, version: int) -> None:
    """A model's ``_save_pretrained``: the weights and ``config.json`` (sorted, indented as the hub mixin
    writes it) naming ``type(module)`` and ``version``."""
    folder = Path(folder)
    save_weights(module, folder / WEIGHTS)
    (folder / CONFIG).write_text(json.dumps(stamped(config, type(module), version), sort_keys=True, indent=2))


class ModelFolderMixin:
    """The ``_save_pretrained`` of every built-in model: ``save_model_folder(self, folder, config,
    FORMAT_VERSION)``, config being what ``huggingface_hub.PyTorchModelHubMixin`` recorded from the
    constructor. List it before the hub mixin (``class M(nn.Module, ModelFolderMixin, PyTorchModelHubMixin)``)
    and set ``FORMAT_VERSION`` on the class (raise it, and convert older folders, when the layout changes)."""

    FORMAT_VERSION: int

    def _save_pretrained(self, save_directory: str | Path) -> None:
        save_model_folder(self, save_directory, self._hub_mixin_config, self.FORMAT_VERSION)


def _read(folder: str | Path) -> dict[str, Any]:
    try:
        config = json.loads((Path(folder) / CONFIG).read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def saved_class(folder: str | Path) -> str | None:
    """The class ``folder/config.json`` names; None for a folder saved before it was recorded, or an
    unreadable config (the loader that reads it reports that)."""
    named = _read(folder).get(CLASS_KEY)
    return named if isinstance(named, str) else None


def saved_version(folder_or_config: str | Path | dict[str, Any]) -> int:
    """The layout version of a model folder (or of its loaded config.json); 0 for one saved before versions."""
    config = folder_or_config if isinstance(folder_or_config, dict) else _read(folder_or_config)
    version = config.get(VERSION_KEY, 0)
    return int(version) if isinstance(version, int) else 0
