"""Shared test set-up. Tests build their own small data; nothing is downloaded."""

import os
import subprocess
from pathlib import Path

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on 2 cores: one intra-op thread is several times faster than two (measured: 14 vs 173 ms
# per tiny world-model step under load), and subprocesses (torchrun ranks, CLI runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


import pytest  # noqa: E402


@pytest.fixture
def small_tmpfs(tmp_path):
    """``mount(size) -> folder``: a real size-limited tmpfs (a full disk on demand; mounting again
    resizes it). Skips where the machine cannot mount one."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    mounted = []

    def mount(size: int) -> Path:
        opts = f"size={size}" if not mounted else f"remount,size={size}"
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(mnt)], capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(size)
        return mnt

    yield mount
    if mounted:
        subprocess.run(["umount", str(mnt)], check=False)
