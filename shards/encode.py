"""Encode frames to deterministic H.264 MP4 bytes (PyAV + libx264).

Why these settings:

- ``yuv420p``: what every decoder (decord, torchcodec, PyAV, browsers) plays. It needs even width
  and height; odd sizes are *rejected* (``EncodeError``), not padded, so that ``meta.json``'s
  height/width are always the true pixel size of the stored frames.
- constant fps, ``pts = 0, 1, 2, ...`` in a ``1/fps`` time base: frame index == pts, so readers can
  seek by index without a timestamp table.
- GOP of ``GOP`` frames, no B-frames, scene-cut detection off: a keyframe every ``GOP`` frames
  exactly, so decoding any frame costs at most ``GOP - 1`` extra frames.
- single-threaded x264 and the ``bitexact`` flags on codec and muxer (no encoder-version string,
  no creation time): the same frames always give the same bytes, so a resumed or parallel ingest
  writes byte-identical shards (tested in tests/test_writer.py).
"""

from __future__ import annotations

import io
from fractions import Fraction

import av
import numpy as np

GOP = 8
CRF = 18  # visually near-lossless; pixels come back within a few levels of the input
PRESET = "veryfast"
PIX_FMT = "yuv420p"
CODEC = "libx264"


class EncodeError(ValueError):
    """Frames that cannot be encoded (wrong dtype/shape, odd size, empty)."""


def fps_fraction(fps: float) -> Fraction:
    """``fps`` as the rational stream rate (29.97 -> 2997/100)."""
    if not (fps > 0 and np.isfinite(fps)):
        raise EncodeError(f"fps must be a positive number, got {fps}")
    return Fraction(fps).limit_denominator(100_000)


def check_frames(frames: np.ndarray) -> tuple[int, int, int]:
    """Check ``frames`` is uint8 ``[T, H, W, 3]`` with T > 0 and even H, W; returns (T, H, W)."""
    if not isinstance(frames, np.ndarray):
        raise EncodeError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise EncodeError(f"frames must be uint8, got {frames.dtype}")
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise EncodeError(f"frames must be [T, H, W, 3], got shape {list(frames.shape)}")
    t, h, w, _ = frames.shape
    if t == 0:
        raise EncodeError("zero frames")
    if h == 0 or w == 0 or h % 2 or w % 2:
        raise EncodeError(f"height and width must be even and positive for H.264 {PIX_FMT}, got {h}x{w}")
    return t, h, w


def codec_options() -> dict[str, str]:
    """libx264 options shared by the writer and the ingest benchmark's plain-PyAV baseline."""
    return {
        "preset": PRESET,
        "crf": str(CRF),
        "g": str(GOP),
        "keyint_min": str(GOP),
        "bf": "0",
        "sc_threshold": "0",
        "threads": "1",
        # x264's own flags: one thread, no scene-cut keyframes, fixed GOP. No lookahead, macroblock
        # tree or weighted prediction: with them x264's output was seen to depend on the memory
        # state of the process (same frames, different bytes once in ~50 encodes at 32x32).
        "x264-params": f"threads=1:scenecut=0:keyint={GOP}:min-keyint={GOP}:rc-lookahead=0:mbtree=0:weightp=0",
    }


def encode_video(frames: np.ndarray, fps: float) -> bytes:
    """Encode uint8 ``[T, H, W, 3]`` RGB frames to MP4 bytes (deterministic for equal input)."""
    t, h, w = check_frames(frames)
    rate = fps_fraction(fps)
    buf = io.BytesIO()
    # bitexact: no encoder version string or creation time in the container. A track timescale
    # equal to the rate's numerator makes pts step by rate.denominator (by 1 for integer fps)
    # instead of the muxer's default 1/10240-ish clock.
    muxer_options = {"fflags": "+bitexact", "video_track_timescale": str(rate.numerator)}
    with av.open(buf, mode="w", format="mp4", options=muxer_options) as container:
        stream = container.add_stream(CODEC, rate=rate, options=codec_options())
        stream.width, stream.height, stream.pix_fmt = w, h, PIX_FMT
        stream.time_base = 1 / rate
        stream.codec_context.thread_count = 1
        stream.codec_context.flags |= av.codec.context.Flags.bitexact
        frames = np.ascontiguousarray(frames)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(frames[i], format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()
