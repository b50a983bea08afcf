"""Preemption: turn SIGUSR1 / SIGTERM into "checkpoint at the next step boundary, then exit 75".

Slurm sends SIGUSR1 before a time limit (``--signal=B:USR1@S`` via the sbatch trap) and SIGTERM
on cancel / requeue. The handler only records the signal; the trainer asks ``stop_requested()``
once per step, which all-reduces the flag so that every rank stops at the same step (a rank that
stopped alone would hang the others in their next collective). Signals arriving while the
checkpoint is being written only set the flag again: nothing is interrupted, and the checkpoint
directory is renamed into place only once complete (wm_pipeline.training.checkpoint), so a hard kill leaves
the previous checkpoint intact.

Installed from the start: `wm train` installs the handler before it imports torch or reads any data
(this module imports nothing heavy), so a signal during start-up (imports, data checks, building the
model, resuming) is held until the first step boundary and ends in a checkpoint and exit 75, like one
during training, instead of killing the process.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the annotation only: torch is imported where it is used
    import torch

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionHandler:
    def __init__(self, signals: tuple[int, ...] = SIGNALS):
        self.signals = signals
        self.received: str | None = None  # name of the first signal seen
        self.count = 0  # signals seen in total (repeats are queued, not acted on)
        self.stopping = False  # set by the trainer once the ranks agreed to stop
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: object) -> None:
        # Keep this tiny: it runs between two bytecodes of the training loop.
        self.count += 1
        if self.received is None:
            self.received = signal.Signals(signum).name

    def install(self) -> PreemptionHandler:
        if threading.current_thread() is not threading.main_thread():
            log.warning("not on the main thread: SIGUSR1/SIGTERM will not checkpoint")
            return self
        for sig in self.signals:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        if self.received is not None or self.stopping:
            # Preempted (here or on another rank): the process is on its way out with exit code 75.
            # Restoring the default handlers now would let a late SIGTERM (a second signal, or
            # torchrun closing the other workers) kill it (-15) after the checkpoint.
            return
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.uninstall()

    @property
    def local_flag(self) -> bool:
        return self.received is not None


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Logical OR of per-rank flags across all ranks (one all-reduce; identity on one process)."""
    import torch  # here, not at the top: `wm train` installs the handler before it imports torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
