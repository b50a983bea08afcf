"""Read the samples of one shard tar so that one damaged spot costs only the members it touches.

A tar is a chain of 512-byte headers, each followed by its member's data. Python's ``tarfile`` and
WebDataset stop at the first header that fails its checksum, silently dropping every later sample
of the shard. ``read_tar_samples`` instead *resyncs*: it scans forward, block by block, to the next
block that is a valid ustar header (magic ``ustar`` and a correct checksum) and goes on from there,
so a flipped byte in one header loses that one member (and so its sample), nothing after it.

Everything that is not a plain, safely named member is reported as a ``TarIssue`` naming the shard,
the byte offset and the member (when its name is known) and is never returned as sample data:

- a damaged header (bad checksum, unparsable fields) or a stray zero block: skipped up to the next
  valid header (or the rest of the file when there is none);
- a member whose data run past the end of the file (a truncated shard);
- an unsafe name: absolute, with a ``..`` component or any ``/`` (shard members are flat
  ``<key>.<field>`` names), or not of the form ``<key>.<field>``;
- a symlink, hard link, directory, device or other non-regular member;
- a sample whose members are not together, or a member that repeats within a sample.

Nothing is ever extracted to disk, so an unsafe name cannot write anywhere; it is only named.
"""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .format import FormatError
from .location import LocationError, locate, open_read

BLOCK = 512
_SCAN_BLOCKS = 256  # blocks read at a time while scanning for the next header
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE)
_KINDS = {
    tarfile.SYMTYPE: "a symlink",
    tarfile.LNKTYPE: "a hard link",
    tarfile.DIRTYPE: "a directory",
    tarfile.CHRTYPE: "a character device",
    tarfile.BLKTYPE: "a block device",
    tarfile.FIFOTYPE: "a FIFO",
}


@dataclasses.dataclass
class TarIssue:
    """One problem found while reading a shard: where (byte offset, member name when known) and what."""

    shard: Path
    offset: int
    member: str | None
    reason: str

    @property
    def key(self) -> str | None:
        """The sample key of the member's name, when it has one."""
        return self.member.partition(".")[0] if self.member else None

    def __str__(self) -> str:
        if self.member is None:
            return f"{self.shard}: unreadable shard data at byte {self.offset} ({self.reason})"
        return f"{self.shard}: member {self.member!r} at byte {self.offset}: {self.reason}"


def _header(buf: bytes) -> tarfile.TarInfo | None:
    """The header in ``buf`` when it is a valid ustar header, else None."""
    if len(buf) < BLOCK or buf[257:262] != b"ustar":
        return None
    try:
        return tarfile.TarInfo.frombuf(buf, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return None


def _next_header(r: _Blocks, start: int) -> int | None:
    """Offset of the first valid header at or after block offset ``start``, or None."""
    pos = start
    while True:
        chunk = r.read_at(pos, BLOCK * _SCAN_BLOCKS)
        for i in range(0, len(chunk) - BLOCK + 1, BLOCK):
            # cheap test first: the magic sits at byte 257 of every ustar header
            if chunk[i + 257 : i + 262] == b"ustar" and _header(chunk[i : i + BLOCK]) is not None:
                return pos + i
        if len(chunk) < BLOCK * _SCAN_BLOCKS:
            return None
        pos += len(chunk)


class _Blocks:
    """``read_at(pos, n)`` over a shard: a local file seeks; a remote stream (``shards.location``) is
    read forward once, keeping only the bytes from the last read's start on (the reader never goes
    back further), so resyncing works on a stream that cannot seek. Short reads mean the end."""

    def __init__(self, f):
        self.f = f
        self.seekable = hasattr(f, "fileno") and hasattr(f, "seek")
        self.base, self.buf, self.eof = 0, bytearray(), False

    def read_at(self, pos: int, n: int) -> bytes:
        if self.seekable:
            self.f.seek(pos)
            return self.f.read(n)
        if pos < self.base:
            raise AssertionError(f"tar reader went back from byte {self.base} to {pos} on a stream")
        skip = pos - self.base
        if skip >= len(self.buf):
            skip -= len(self.buf)
            self.buf.clear()
            while skip and not self.eof:  # data nobody needs (a skipped member)
                got = self.f.read(min(skip, 1 << 20))
                self.eof, skip = not got, skip - len(got)
        else:
            del self.buf[:skip]
        self.base = pos
        while len(self.buf) < n and not self.eof:
            got = self.f.read(max(n - len(self.buf), 1 << 16))
            self.eof = not got
            self.buf += got
        return bytes(self.buf[:n])


def _pax(data: bytes) -> dict[str, str]:
    """Records ``"<len> <key>=<value>\\n"`` of a pax extended header."""
    out, i = {}, 0
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        if length <= 0:
            raise ValueError(f"bad record length {length}")
        record = data[space + 1 : i + length]
        if not record.endswith(b"\n"):
            raise ValueError("record does not end in a newline")
        k, _, v = record[:-1].partition(b"=")
        out[k.decode("utf-8", "surrogateescape")] = v.decode("utf-8", "surrogateescape")
        i += length
    return out


def unsafe_name(name: str) -> str | None:
    """Why ``name`` is not a safe shard member name (``<key>.<field>``, flat), or None when it is."""
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return "an absolute path"
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        return "a path leading out of the shard's folder ('..')"
    if len(parts) > 1:
        return "a path with folders (shard members are flat <key>.<field> names)"
    key, dot, field = name.partition(".")
    if not key or not dot or not field:
        return "not a <key>.<field> name"
    return None


def iter_members(path, report) -> Iterator[tuple[str, int, bytes]]:
    """``(name, header offset, data)`` of every safe regular member; ``report(TarIssue)`` for the rest.

    ``path``: a local file or a ``shards.location.Location``, read as one forward stream."""
    with open_read(path) as f:
        r = _Blocks(f)
        pos, pax, longname = 0, {}, None
        while True:
            buf = r.read_at(pos, BLOCK)
            if len(buf) < BLOCK:
                break
            info = _header(buf)
            if info is None:
                nxt = _next_header(r, pos + BLOCK)
                if buf.count(0) == BLOCK and nxt is None:
                    return  # the end-of-archive zero blocks
                what = "zero block inside the archive" if buf.count(0) == BLOCK else "damaged tar header"
                report(
                    TarIssue(
                        path,
                        pos,
                        None,
                        f"{what}; "
                        + (
                            f"skipped {nxt - pos} bytes to the next valid header at byte {nxt}"
                            if nxt is not None
                            else "no valid header after it: the rest of the shard is lost"
                        ),
                    )
                )
                if nxt is None:
                    return
                pos, pax, longname = nxt, {}, None
                continue
            name = longname or pax.get("path") or info.name
            n = int(pax["size"]) if "size" in pax and pax["size"].isdigit() else info.size
            start = pos + BLOCK
            keep = info.type in _REGULAR or info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME)
            # the data of members we do not use is still read (a stream cannot skip without reading),
            # but only kept for the length check
            data = r.read_at(start, n)
            if len(data) < n:
                report(
                    TarIssue(
                        path,
                        pos,
                        name,
                        f"truncated: {n} bytes of data, the file ends {len(data)} bytes after the header",
                    )
                )
                return
            if not keep:
                data = b""
            nxt = start + -(-n // BLOCK) * BLOCK
            if info.type == tarfile.XHDTYPE:  # pax header: applies to the next member
                try:
                    pax = _pax(data)
                except ValueError as e:
                    report(TarIssue(path, pos, None, f"damaged pax header ({e}); the next member keeps its own name"))
                    pax = {}
                pos = nxt
                continue
            if info.type == tarfile.GNUTYPE_LONGNAME:
                longname, pos = data.rstrip(b"\0").decode("utf-8", "surrogateescape"), nxt
                continue
            pos, pax, longname = nxt, {}, None
            if info.type == tarfile.XGLTYPE:  # global pax header: nothing we use
                continue
            if info.type not in _REGULAR:
                kind = _KINDS.get(info.type, f"of tar type {info.type!r}")
                link = f" to {info.linkname!r}" if info.issym() or info.islnk() else ""
                report(TarIssue(path, start - BLOCK, name, f"{kind}{link}, not a regular file; ignored"))
                continue
            why = unsafe_name(name)
            if why:
                report(TarIssue(path, start - BLOCK, name, f"unsafe member name: {why}; ignored"))
                continue
            yield name, start - BLOCK, data
        # a complete tar ends in zero blocks (returned above); here the file stopped short of them
        size = pos + len(buf)
        report(
            TarIssue(
                path, min(pos, size), None, f"truncated: the file ends at byte {size}, before the end-of-archive blocks"
            )
        )


def read_tar_samples(path: str | Path, issues: list[TarIssue] | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard as ``{"__key__": key, "__url__": path, "meta.json": bytes, "<cam>.mp4": bytes, ...}``.

    ``issues=None``: strict; the first problem raises ``FormatError`` naming the shard, offset and
    member. Otherwise each problem is appended to ``issues`` (as it is met, so a caller can look at
    the list between samples) and reading goes on with the next valid member.
    """
    path = locate(path)

    def report(issue: TarIssue) -> None:
        if issues is None:
            raise FormatError(str(issue))
        issues.append(issue)

    try:
        current: dict[str, Any] | None = None
        seen: set[str] = set()
        for name, offset, data in iter_members(path, report):
            key, _, field = name.partition(".")
            if current is not None and key != current["__key__"]:
                yield current
                current = None
            if current is None:
                if key in seen:
                    report(
                        TarIssue(
                            path,
                            offset,
                            name,
                            f"sample {key!r} appears a second time in the shard "
                            f"(its members are not together); ignored",
                        )
                    )
                    continue
                seen.add(key)
                current = {"__key__": key, "__url__": str(path)}
            if field in current:
                report(TarIssue(path, offset, name, "a second member of that name in the sample; ignored"))
                continue
            current[field] = data
        if current is not None:
            yield current
    except LocationError:
        raise
    except OSError as e:
        raise FormatError(f"{path}: unreadable shard ({type(e).__name__}: {e})") from None
