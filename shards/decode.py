"""Decode MP4 bytes to RGB frames through one interface over three backends.

``decode_video(data, indices, backend)`` returns uint8 ``[N, H, W, 3]`` whatever the backend:

- ``"torchcodec"`` (0.13, CPU): the fastest measured here (docs/STREAMING.md, benchmarks/decode.py);
- ``"decord"``: asked for by the design card; unmaintained since 2021, so never the first choice;
- ``"pyav"``: bundles its own FFmpeg, always installs, decodes sequentially;
- ``"auto"``: the first of the above, in that order, that imports on this machine.

All three return bit-identical frames for our H.264 ``yuv420p`` files (tests/test_decode.py).

Every decoder object is created inside the call, in the process that uses it: nothing holding
FFmpeg or decord state exists before a DataLoader forks its workers (decord is known to hang when
its state crosses a fork). Each backend decodes on one thread: parallelism comes from DataLoader
workers, and extra FFmpeg threads per worker only oversubscribe the cores.

Any failure to decode raises ``DecodeError`` naming the source (shard and key, or file) and the
backend's own reason; decord's ``DECORDError`` is not a ``RuntimeError``, so each backend lists
the exception types it can raise on bad bytes.
"""

from __future__ import annotations

import functools
import importlib
import io
import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger(__name__)

BACKENDS = ("torchcodec", "decord", "pyav")  # fastest first: "auto" takes the first that imports


class DecodeError(Exception):
    """A video could not be decoded. ``source`` names the file or ``shard:key``; ``backend`` the decoder."""

    def __init__(self, source: str, backend: str, reason: str):
        super().__init__(f"{source}: cannot decode video with {backend}: {reason}")
        self.source, self.backend, self.reason = source, backend, reason


@functools.cache
def backend_available(name: str) -> bool:
    """True when ``name`` imports here (torchcodec fails to import without FFmpeg 5-7 libraries)."""
    module = {"torchcodec": "torchcodec.decoders", "decord": "decord", "pyav": "av"}[name]
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, OSError (missing .so), RuntimeError (torch ABI)
        log.debug("decode backend %s unavailable: %s", name, e)
        return False
    return True


def resolve_backend(backend: str) -> str:
    """Map ``"auto"`` to the fastest importable backend; check a named one imports."""
    if backend == "auto":
        for name in BACKENDS:
            if backend_available(name):
                return name
        raise ImportError("no video decode backend imports: install torchcodec, decord or av")
    if backend not in BACKENDS:
        raise ValueError(f"unknown decode backend {backend!r}; choose one of {('auto',) + BACKENDS}")
    if not backend_available(backend):
        extra = {
            "torchcodec": " (pip install 'wm-pipeline[torchcodec]')",
            "decord": " (pip install 'wm-pipeline[decord]')",
        }
        raise ImportError(
            f"decode backend {backend!r} does not import here{extra.get(backend, '')}; try backend='auto'"
        )
    return backend


def decode_video(
    data: bytes, indices: Sequence[int] | None = None, backend: str = "auto", source: str = "<bytes>"
) -> np.ndarray:
    """Decode frames ``indices`` (all frames when None) of an MP4 held in ``data``.

    Args:
        data: the file's bytes.
        indices: frame numbers, any order, repeats allowed; output follows this order.
        backend: "auto", "torchcodec", "decord" or "pyav".
        source: what to call the video in error messages (e.g. ``shard-000003.tar:ep_17``).
    Returns:
        uint8 ``[N, H, W, 3]`` RGB.
    Raises:
        DecodeError: bad bytes, or an index outside the video.
    """
    name = resolve_backend(backend)
    if not data:
        raise DecodeError(source, name, "empty file")
    wanted = None if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if wanted is not None and wanted.size and wanted.min() < 0:
        raise DecodeError(source, name, f"negative frame index {int(wanted.min())}")
    decode, errors = _BACKENDS[name]()
    try:
        frames = decode(data, wanted)
    except DecodeError:
        raise
    except _OutOfRange as e:
        raise DecodeError(source, name, str(e)) from None
    except errors as e:
        raise DecodeError(source, name, f"{type(e).__name__}: {str(e).strip()}") from e
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise DecodeError(
            source, name, f"backend returned {frames.dtype} {list(frames.shape)}, expected uint8 [N, H, W, 3]"
        )
    return frames


class _OutOfRange(Exception):
    pass


def _check_range(wanted: np.ndarray | None, n: int) -> None:
    if wanted is not None and wanted.size and wanted.max() >= n:
        raise _OutOfRange(f"frame index {int(wanted.max())} out of range: the video has {n} frames")


# ------------------------------------------------------------------------ backends
# Each factory imports its library on first use and returns (decode, exception types it raises
# on bad input). decode(data, wanted) -> uint8 [N, H, W, 3].


def _torchcodec():
    import torch
    from torchcodec.decoders import VideoDecoder

    def decode(data: bytes, wanted: np.ndarray | None) -> np.ndarray:
        # exact seek mode: frame i is the i-th frame in presentation order, as for the other backends
        decoder = VideoDecoder(data, dimension_order="NHWC", num_ffmpeg_threads=1, seek_mode="exact")
        n = len(decoder)
        _check_range(wanted, n)
        if wanted is None:
            batch = decoder.get_frames_in_range(0, n)
        else:
            batch = decoder.get_frames_at(torch.from_numpy(wanted))  # int64 even when empty
        return batch.data.numpy()

    return decode, (RuntimeError, ValueError, IndexError, _OutOfRange)


def _decord():
    import decord

    def decode(data: bytes, wanted: np.ndarray | None) -> np.ndarray:
        reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
        n = len(reader)
        _check_range(wanted, n)
        idx = list(range(n)) if wanted is None else wanted.tolist()
        frames = reader.get_batch(idx).asnumpy() if idx else np.zeros((0, *reader[0].shape), np.uint8)
        del reader  # frees FFmpeg state now rather than at some later collection
        return frames

    # DECORDError derives from TVMError -> Exception, not RuntimeError
    return decode, (decord.DECORDError, RuntimeError, ValueError, IndexError, _OutOfRange)


def _pyav():
    import av

    def decode(data: bytes, wanted: np.ndarray | None) -> np.ndarray:
        stop = None if wanted is None else (int(wanted.max()) + 1 if wanted.size else 0)
        frames = []
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = container.streams.video[0]
            stream.thread_count = 1
            # sequential decode to the last wanted frame: our files have short GOPs, so a seek
            # would save little, and frame counting stays exact on files with odd timestamps
            if stop != 0:
                for frame in container.decode(stream):
                    frames.append(frame.to_ndarray(format="rgb24"))
                    if stop is not None and len(frames) >= stop:
                        break
        if stop is not None and len(frames) < stop:
            raise _OutOfRange(f"frame index {stop - 1} out of range: the video has {len(frames)} frames")
        if not frames:
            return np.zeros((0, 0, 0, 3), np.uint8)
        if wanted is None:
            return np.stack(frames)
        return (
            np.stack([frames[i] for i in wanted.tolist()]) if wanted.size else np.zeros((0, *frames[0].shape), np.uint8)
        )

    # av.error.FFmpegError covers InvalidDataError and the other codec/container errors
    return decode, (av.error.FFmpegError, ValueError, IndexError, EOFError, _OutOfRange)


_BACKENDS = {"torchcodec": _torchcodec, "decord": _decord, "pyav": _pyav}
