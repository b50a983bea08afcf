"""Decode backends on real H.264 files made with PyAV: identical frames, clear errors."""

import numpy as np
import pytest

from shards.decode import BACKENDS, DecodeError, backend_available, decode_video, resolve_backend
from shards.encode import encode_video

AVAILABLE = [b for b in BACKENDS if backend_available(b)]


def moving_square(t: int = 24, h: int = 32, w: int = 64) -> np.ndarray:
    """uint8 [T, H, W, 3]: a gradient background with a square that moves one step per frame."""
    frames = np.zeros((t, h, w, 3), np.uint8)
    frames[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None, None, :]
    frames[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[None, :, None]
    for i in range(t):
        frames[i, 4:12, i : i + 8, 2] = 250
    return frames


@pytest.fixture(scope="module")
def video():
    frames = moving_square()
    return frames, encode_video(frames, fps=10.0)


def test_pyav_and_one_fast_backend_are_installed():
    assert "pyav" in AVAILABLE
    assert len(AVAILABLE) >= 2, f"only {AVAILABLE} import; the identity test needs two backends"
    assert resolve_backend("auto") == AVAILABLE[0]


@pytest.mark.parametrize("backend", AVAILABLE)
def test_frames_match_the_encoded_input(video, backend):
    frames, data = video
    out = decode_video(data, backend=backend)
    assert out.dtype == np.uint8 and out.shape == frames.shape
    err = np.abs(out.astype(np.int16) - frames.astype(np.int16))
    assert err.mean() < 3, f"{backend}: mean abs error {err.mean():.2f}"
    # the moving square makes frames distinct: each decoded frame is closest to its own input
    dist = np.abs(out[:, None].astype(np.int16) - frames[None].astype(np.int16)).mean(axis=(2, 3, 4))
    assert (dist.argmin(axis=1) == np.arange(len(frames))).all()


def test_backends_return_identical_frames(video):
    _, data = video
    picks = [17, 0, 5, 5, 23, 8]  # unsorted, repeated, across GOP boundaries
    ref_all = decode_video(data, backend="pyav")
    ref_pick = decode_video(data, picks, backend="pyav")
    assert np.array_equal(ref_pick, ref_all[picks])
    for backend in AVAILABLE:
        assert np.array_equal(decode_video(data, backend=backend), ref_all), backend
        assert np.array_equal(decode_video(data, picks, backend=backend), ref_pick), backend
        assert np.array_equal(decode_video(data, list(range(0, 24, 4)), backend=backend), ref_all[::4]), backend


@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_bad_bytes_raise_decode_error_naming_the_source(video, backend, damage):
    _, data = video
    bad = {"truncated": data[: len(data) // 3], "garbage": bytes(range(256)) * 8, "empty": b""}[damage]
    with pytest.raises(DecodeError) as info:
        decode_video(bad, backend=backend, source="shard-000007.tar:episode_3")
    msg = str(info.value)
    assert "shard-000007.tar:episode_3" in msg and backend in msg
    assert info.value.backend == backend and info.value.source == "shard-000007.tar:episode_3"


@pytest.mark.parametrize("backend", AVAILABLE)
def test_index_outside_the_video_is_a_decode_error(video, backend):
    _, data = video
    with pytest.raises(DecodeError, match="out of range: the video has 24 frames"):
        decode_video(data, [3, 24], backend=backend, source="clip.mp4")
    with pytest.raises(DecodeError, match="negative"):
        decode_video(data, [-1], backend=backend)


def test_unknown_backend_is_refused(video):
    with pytest.raises(ValueError, match="unknown decode backend 'ffmpeg-cli'"):
        decode_video(video[1], backend="ffmpeg-cli")
