"""Where a dataset lives: a local folder, an fsspec URL (``s3://``, ``gs://``, ``http(s)://``, ...) or a
``pipe:`` command, and the few operations the readers and sidecar writers need on its files.

``locate(where)`` returns a ``pathlib.Path`` for a local folder (``file://`` URLs included), so local
datasets keep using the file system directly, and a ``Location`` for anything else. ``Location`` has
the small part of the ``Path`` interface the shard code uses (``/``, ``name``, ``stem``, ``parent``,
``with_name``, ``exists``, ``is_dir``, ``open("rb")``, ``read_bytes``, ``read_text``, ``stat().st_size``,
``write_bytes``, ``unlink``), so the same code reads ``manifest.json``, ``shard-NNNNNN.tar`` and
``labels/NAME/...`` from either. It deliberately has no ``__fspath__``: handing one to ``open()`` fails
loudly instead of reading a local file of that name.

- **fsspec URLs** are opened with ``fsspec`` (``s3fs`` for ``s3://``, ``gcsfs`` for ``gs://``, ``aiohttp``
  for ``http(s)://``: the ``remote`` extra). Credentials and endpoints come from the backend's usual
  environment variables and config files (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
  ``AWS_ENDPOINT_URL``, ``GOOGLE_APPLICATION_CREDENTIALS``, fsspec's ``FSSPEC_<PROTOCOL>_<KEY>``
  variables and ``~/.config/fsspec/``); nothing is passed on the command line. Reads are sequential
  streams (``block_size=0`` for HTTP, so servers without range requests work too).
- **pipe:** follows WebDataset's convention (``pipe:CMD``: run ``CMD`` in a shell, read its standard
  output, a non-zero exit status is an error), with one addition a dataset needs: ``{}`` in the
  command stands for the file's path inside the dataset, e.g.
  ``pipe:curl -sf https://host/ds/{}`` or ``pipe:aws s3 cp s3://bucket/ds/{} -``; ``manifest.json``,
  ``shard-000000.tar`` and ``labels/lam/shard-000000.tar`` are each read by running the command with
  that path. A ``pipe:`` location is read-only.

Writes (sidecars) go to a local folder (tmp + fsync + rename, as before) or an fsspec URL (one
``put`` of the whole file: an object appears whole or not at all on S3 and GCS). Every failure to
read, check or write raises ``LocationError``, one line naming the URL and the problem.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
import types
from pathlib import Path

from .format import FormatError

_URL_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_PART_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")  # names inside a dataset (shards, labels, manifest)
PIPE = "pipe:"


class LocationError(FormatError):
    """A dataset location cannot be read or written; the one-line message names the URL."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return f"{type(e).__name__}: {text[:300]}"


class Location:
    """A file or folder of a remote dataset: a root (fsspec URL or ``pipe:`` template) plus a relative path."""

    __slots__ = ("root", "rel")

    def __init__(self, root: str, rel: tuple[str, ...] = ()):
        self.root, self.rel = root, tuple(rel)

    # -- naming

    @property
    def is_pipe(self) -> bool:
        return self.root.startswith(PIPE)

    @property
    def protocol(self) -> str:
        return "pipe" if self.is_pipe else _URL_RE.match(self.root).group(1).lower()

    @property
    def member(self) -> str:
        """The path inside the dataset, ``/``-separated (empty for the root)."""
        return "/".join(self.rel)

    @property
    def url(self) -> str:
        if self.is_pipe:
            return self.root.replace("{}", self.member) if self.rel else self.root
        return self.root.rstrip("/") + ("/" + self.member if self.rel else "")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, Location) and (self.root, self.rel) == (other.root, other.rel)

    def __hash__(self) -> int:
        return hash((self.root, self.rel))

    def __truediv__(self, name: str | Path) -> Location:
        parts = [p for p in str(name).split("/") if p not in ("", ".")]
        for p in parts:
            if p == ".." or not _PART_RE.match(p):
                raise LocationError(f"{self.url}: {str(name)!r} is not a name inside a dataset")
        return Location(self.root, self.rel + tuple(parts))

    joinpath = __truediv__

    @property
    def name(self) -> str:
        if self.rel:
            return self.rel[-1]
        return "" if self.is_pipe else self.root.rstrip("/").rsplit("/", 1)[-1]

    @property
    def stem(self) -> str:
        name = self.name
        return name.rsplit(".", 1)[0] if "." in name[1:] else name

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def parent(self) -> Location:
        if not self.rel:
            raise LocationError(f"{self.url}: the dataset's root has no parent here")
        return Location(self.root, self.rel[:-1])

    def with_name(self, name: str) -> Location:
        return self.parent / name

    def resolve(self) -> Location:
        return self

    # -- reading

    def _fs(self):
        try:
            import fsspec

            fs, path = fsspec.core.url_to_fs(self.url)
        except (ImportError, ValueError) as e:  # ValueError: an unknown protocol
            raise LocationError(
                f"{self.url}: cannot open {self.protocol}:// locations ({_one_line(e)}); "
                f"pip install 'wm-pipeline[remote]' (s3fs, gcsfs, aiohttp)"
            ) from None
        return fs, path

    def open(self, mode: str = "rb"):
        """A sequential binary stream of the file (a context manager); ``LocationError`` when unreadable."""
        if mode != "rb":
            raise ValueError(f"{self.url}: only mode 'rb' is supported, got {mode!r}")
        if self.is_pipe:
            return _PipeReader(self.url[len(PIPE) :], self.url)
        fs, path = self._fs()
        try:
            kw = {"block_size": 0} if self.protocol in ("http", "https") else {}
            return _Guarded(fs.open(path, "rb", **kw), self.url)
        except Exception as e:  # backends raise OSError, botocore, aiohttp, ... errors
            raise LocationError(f"{self.url}: cannot read ({_one_line(e)})") from None

    def read_bytes(self) -> bytes:
        with self.open("rb") as f:
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def exists(self) -> bool:
        if self.is_pipe:
            return _pipe_has_output(self.url[len(PIPE) :])
        fs, path = self._fs()
        try:
            return bool(fs.exists(path))
        except Exception as e:
            raise LocationError(f"{self.url}: cannot check whether it exists ({_one_line(e)})") from None

    def is_dir(self) -> bool:
        """A folder (a prefix with objects below it on object stores); always False for ``pipe:``."""
        if self.is_pipe:
            return False
        fs, path = self._fs()
        try:
            return bool(fs.isdir(path))
        except FileNotFoundError:
            return False
        except Exception as e:
            raise LocationError(f"{self.url}: cannot list ({_one_line(e)})") from None

    def is_file(self) -> bool:
        return self.exists() and not self.is_dir()

    def stat(self):
        if self.is_pipe:
            return types.SimpleNamespace(st_size=len(self.read_bytes()))
        fs, path = self._fs()
        try:
            return types.SimpleNamespace(st_size=int(fs.size(path)))
        except Exception as e:
            raise LocationError(f"{self.url}: cannot read its size ({_one_line(e)})") from None

    # -- writing

    def _writable(self):
        if self.is_pipe:
            raise LocationError(
                f"{self.url}: a pipe: location is read-only; write sidecars to a folder or "
                f"an s3:// / gs:// URL (wm label --labels-out)"
            )
        if self.protocol in ("http", "https"):
            raise LocationError(
                f"{self.url}: cannot write to an {self.protocol}:// location; write sidecars to "
                f"a folder or an s3:// / gs:// URL (wm label --labels-out)"
            )
        return self._fs()

    def write_bytes(self, data: bytes) -> int:
        """Store the whole file in one put: on object stores it appears whole or not at all."""
        fs, path = self._writable()
        try:
            fs.pipe_file(path, bytes(data))
        except Exception as e:
            raise LocationError(f"{self.url}: cannot write ({_one_line(e)})") from None
        return len(data)

    def unlink(self, missing_ok: bool = False) -> None:
        fs, path = self._writable()
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            if not missing_ok:
                raise LocationError(f"{self.url}: cannot remove: it does not exist") from None
        except Exception as e:
            raise LocationError(f"{self.url}: cannot remove ({_one_line(e)})") from None

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: a prefix exists once an object is written below it."""
        self._writable()


DataPath = Path | Location


def locate(where: str | os.PathLike | Location) -> DataPath:
    """A local folder as a ``Path`` (``file://`` URLs too), anything else as a ``Location``."""
    if isinstance(where, (Location, Path)):
        return where
    text = os.fspath(where)
    if text.startswith(PIPE):
        if "{}" not in text:
            raise LocationError(
                f"{text}: a pipe: dataset needs '{{}}' in its command where the file's path "
                f"inside the dataset goes, e.g. pipe:curl -sf https://host/ds/{{}}"
            )
        return Location(text)
    m = _URL_RE.match(text)
    if not m:
        return Path(text)
    if m.group(1).lower() == "file":
        return Path(text[len(m.group(0)) :] or "/")
    return Location(text.rstrip("/") if len(text) > len(m.group(0)) else text)


def is_remote(where) -> bool:
    return isinstance(locate(where), Location)


def identity(where) -> str:
    """A string naming the same dataset however it was written: a resolved local path, or the URL."""
    loc = locate(where)
    return loc.url if isinstance(loc, Location) else str(loc.resolve())


def missing_folder(where) -> bool:
    """True for a local folder that does not exist (a URL is checked by reading its manifest)."""
    loc = locate(where)
    return not isinstance(loc, Location) and not loc.is_dir()


def open_read(path: DataPath):
    """A binary stream of a local file or a remote one; ``LocationError`` naming it when unreadable."""
    if isinstance(path, Location):
        return path.open("rb")
    try:
        return open(path, "rb")
    except OSError as e:
        raise LocationError(f"{path}: cannot read ({_one_line(e)})") from None


def write_atomic(path: DataPath, data: bytes) -> None:
    """Write a whole file atomically: local ``<name>.tmp`` + fsync + rename; remote one put."""
    if isinstance(path, Location):
        path.write_bytes(data)
        return
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- stream wrappers


class _Guarded:
    """A backend's file object whose read errors become one-line ``LocationError``s naming the URL."""

    def __init__(self, f, url: str):
        self.f, self.url = f, url

    def read(self, n: int = -1) -> bytes:
        try:
            return self.f.read(n)
        except Exception as e:
            raise LocationError(f"{self.url}: read failed ({_one_line(e)})") from None

    def close(self) -> None:
        try:
            self.f.close()
        except Exception:
            pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _PipeReader:
    """Standard output of ``sh -c CMD``. Closing after a complete read checks the exit status (the
    command's last stderr line in the error); closing early, or on an error, kills the command."""

    def __init__(self, cmd: str, url: str):
        self.url, self.err = url, tempfile.TemporaryFile()
        try:
            self.proc = subprocess.Popen(
                cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self.err
            )
        except OSError as e:
            raise LocationError(f"{url}: cannot run the command ({_one_line(e)})") from None
        self.eof = False

    def read(self, n: int = -1) -> bytes:
        data = self.proc.stdout.read() if n is None or n < 0 else self.proc.stdout.read(n)
        if (n is None or n < 0 or (n > 0 and not data)) and not self.eof:
            self.eof = True
            self._check(self.proc.wait())  # at the end of the output: a failed command is the cause
        return data

    def _check(self, rc: int) -> None:
        if rc != 0:
            self.err.seek(0)
            lines = self.err.read().decode("utf-8", "replace").strip().splitlines()
            why = f": {' '.join(lines[-1].split())[:300]}" if lines else ""
            raise LocationError(f"{self.url}: the command exited with status {rc}{why}")

    def close(self, check: bool = True) -> None:
        if self.proc.poll() is None and not check:
            self.proc.kill()
        elif check and not self.eof:
            while self.proc.stdout.read(1 << 16):  # the tar's trailing padding, usually
                pass
        self.proc.stdout.close()
        rc = self.proc.wait()
        try:
            if check and not self.eof:
                self._check(rc)
        finally:
            self.err.close()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(check=exc_type is None)


def _pipe_has_output(cmd: str) -> bool:
    """Whether ``cmd`` names an existing file: it prints a byte, or prints nothing and exits 0."""
    proc = subprocess.Popen(
        cmd, shell=True, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    got = b""
    try:
        got = proc.stdout.read(1)
    finally:
        if got:
            proc.kill()
        proc.stdout.close()
        rc = proc.wait()
    return bool(got) or rc == 0
