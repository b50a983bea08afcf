"""Reading weights and their config files from disk, with one-line errors that name the file.

Every place the pipeline reads trained weights (resume, ``--init``, ``wm eval --policy``, ``wm worldmodel
eval``, labellers, the VAE / text-encoder folders a world-model config points at) goes through this
module, so that a truncated, empty, missing or garbled file is reported as one line naming it, exit
code 2 (``UnreadableFile``, a ``UsageError``), instead of a traceback from safetensors, json, diffusers
or transformers whose message often does not say which file it was::

    wm eval: error: runs/dec/final/model.safetensors is unreadable: truncated or corrupt safetensors file
    (incomplete metadata, file not fully covered)

- ``check_safetensors(path)`` / ``check_json(path)``: parse the file (safetensors: the header and every
  tensor), raise ``UnreadableFile`` when that fails;
- ``load_safetensors(path)``: the tensors of a file (the shared loader);
- ``read_json(path)``: a parsed JSON file;
- ``loading(model_folders(folder), ...)``: a context manager around a library call that loads a folder
  (e.g. ``Cls.from_pretrained(folder)``, whose model may load the folders its config points at, such
  as a VAE or a text encoder): when the call fails, the folders are checked file by file and the
  first unreadable file is reported; a load error that no file explains (e.g. weights that do not fit
  the config) becomes one line naming the folder; anything else (a bug) propagates with its traceback.

A file whose contents parse but do not fit the model (shapes, names) is not "unreadable": the callers
report that separately.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from wm_pipeline.exit_codes import UsageError

# what a failed read of a model folder raises from safetensors, json, the hub mixin, diffusers, transformers
LOAD_ERRORS = (SafetensorError, OSError, json.JSONDecodeError, UnicodeDecodeError)


class UnreadableFile(UsageError):
    """A weights or config file cannot be read (missing, empty, truncated, corrupt): one line naming it, exit 2."""

    def __init__(self, path: str | Path, reason: str, context: str = ""):
        self.path, self.reason = Path(path), reason
        super().__init__(
            f"{context}{path} is {reason}"
            if reason.startswith(("missing", "empty"))
            else f"{context}{path} is unreadable: {reason}"
        )


def _one_line(text: object, limit: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= limit else s[: limit - 3] + "..."


def _safetensors_reason(e: Exception) -> str:
    msg = str(e)
    for prefix in ("Error while deserializing header: ", "Error while deserializing: "):
        if msg.startswith(prefix):
            msg = msg[len(prefix) :]
    return f"truncated or corrupt safetensors file ({_one_line(msg)})"


def _exists(path: Path, context: str) -> None:
    if not path.is_file():
        raise UnreadableFile(path, "missing", context)
    if path.stat().st_size == 0:
        raise UnreadableFile(path, "empty (0 bytes)", context)


def _read_failed(path: Path, e: Exception, context: str) -> UnreadableFile:
    if isinstance(e, OSError):
        return UnreadableFile(path, f"unreadable from disk ({_one_line(e.strerror or e)})", context)
    return UnreadableFile(path, _safetensors_reason(e), context)


def load_safetensors(
    path: str | Path, *, context: str = "", device: str = "cpu", keep: bool = True
) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file (every one is read; ``keep=False`` drops them as it goes and
    returns an empty dict); ``UnreadableFile`` naming the file when it cannot be read."""
    path = Path(path)
    _exists(path, context)
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            for key in f.keys():
                tensor = f.get_tensor(key)
                if keep:
                    out[key] = tensor
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise _read_failed(path, e, context) from None
    return out


def check_safetensors(path: str | Path, *, context: str = "") -> None:
    """Raise ``UnreadableFile`` unless ``path`` is a complete safetensors file whose header parses and
    whose tensors all read."""
    load_safetensors(path, context=context, keep=False)


def read_json(path: str | Path, *, context: str = "") -> Any:
    """A parsed JSON file; ``UnreadableFile`` naming it when it is missing, empty or not valid JSON."""
    path = Path(path)
    _exists(path, context)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UnreadableFile(path, f"not valid JSON, truncated or corrupt ({_one_line(e)})", context) from None
    except OSError as e:
        raise UnreadableFile(path, f"unreadable from disk ({_one_line(e.strerror or e)})", context) from None


def check_json(path: str | Path, *, context: str = "") -> None:
    read_json(path, context=context)


def check_folder(folder: str | Path, required: Iterable[str] = (), *, context: str = "") -> None:
    """Raise ``UnreadableFile`` for the first of ``required`` that is missing, or the first ``*.json`` /
    ``*.safetensors`` file directly in ``folder`` that does not parse."""
    folder = Path(folder)
    for name in required:
        _exists(folder / name, context)
    files = sorted(p for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    for p in files:  # configs first: they are small, and a bad one explains everything after it
        if p.suffix == ".json":
            check_json(p, context=context)
    for p in files:
        if p.suffix == ".safetensors":
            check_safetensors(p, context=context)


def config_folders(config: Any) -> list[Path]:
    """Folders a model config points at (e.g. ``vae_path``, ``text_encoder_path``): its string fields
    that name an existing directory. ``config`` is a dataclass, a dict, or a config.json path."""
    if isinstance(config, (str, Path)):
        try:
            config = json.loads(Path(config).read_text())
        except (OSError, ValueError):
            return []
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        config = dataclasses.asdict(config)
    if not isinstance(config, dict):
        return []
    out = []
    for value in config.values():
        if isinstance(value, str) and value and len(value) < 4096:
            with contextlib.suppress(OSError):
                if Path(value).is_dir():
                    out.append(Path(value))
    return out


def model_folders(folder: str | Path) -> list[Path]:
    """``folder`` (a save_pretrained folder) and the folders its config.json points at."""
    return [Path(folder), *config_folders(Path(folder) / "config.json")]


@contextlib.contextmanager
def loading(
    folders: Iterable[str | Path], *, required: Iterable[str] = (), what: str = "", context: str = ""
) -> Iterator[None]:
    """Run a call that loads the first of ``folders`` (and, through the model it builds, the others:
    see ``model_folders``) and turn a read failure into one line naming the file.

    On an error, ``required`` (names in the first folder) and every JSON / safetensors file of every
    folder are checked and the first bad one is raised as ``UnreadableFile``; when all of them read,
    a load error (OSError, safetensors, JSON, state-dict mismatch) becomes a ``UsageError`` naming the
    first folder (``what``: what it is, for the message), and anything else propagates."""
    folders = [Path(f) for f in folders]
    try:
        yield
    except UsageError:
        raise
    except Exception as e:
        if not folders:
            raise
        for i, f in enumerate(folders):
            check_folder(f, required if i == 0 else (), context=context)  # raises UnreadableFile
        if isinstance(e, LOAD_ERRORS) or _is_state_dict_mismatch(e):
            kind = f"{what} " if what else ""
            raise UsageError(f"{context}cannot load {kind}{folders[0]}: {_one_line(e, 300)}") from None
        raise


def _is_state_dict_mismatch(e: Exception) -> bool:
    return isinstance(e, RuntimeError) and "Error(s) in loading state_dict" in str(e)


def from_pretrained(cls: Any, folder: str | Path, *, what: str = "", context: str = "", **kwargs: Any) -> Any:
    """``cls.from_pretrained(folder, **kwargs)`` (a ``PyTorchModelHubMixin`` folder: config.json +
    model.safetensors) with read errors of the folder, or of a folder its config points at, as one
    line naming the file (see ``loading``)."""
    with loading(model_folders(folder), required=("config.json", "model.safetensors"), what=what, context=context):
        return cls.from_pretrained(str(folder), **kwargs)
