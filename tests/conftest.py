"""Shared test set-up. Tests build their own small data; nothing is downloaded."""

import os

os.environ.setdefault("MUJOCO_GL", "egl")
os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Tiny models on 2 cores: one intra-op thread is several times faster than two (measured: 14 vs 173 ms
# per tiny world-model step under load), and subprocesses (torchrun ranks, CLI runs) inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
