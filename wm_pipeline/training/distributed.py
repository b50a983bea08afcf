"""Processes and devices: the Accelerator, seeds derived per rank, barriers, clean shutdown.

One process: ``wm train ...``. Many: ``torchrun --nproc_per_node N -m wm_pipeline train ...`` (DDP;
gloo on CPU, NCCL on GPU). Two traps this module guards against (see ../shared/FACTS.md):

- without ``Accelerator(cpu=True)`` on a CPU-only machine accelerate silently runs N independent
  world-size-1 processes: we pass ``cpu=True`` when there is no CUDA and check the world size
  against torchrun's ``WORLD_SIZE``;
- gloo processes abort at exit (SIGABRT) unless the process group is destroyed first; even then a
  few percent still do, so the CLI leaves with ``os._exit`` after flushing (``finish_process``).
"""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys

import torch
import torch.distributed as dist

from wm_pipeline.exit_codes import UsageError

log = logging.getLogger(__name__)


def launched_world_size() -> int:
    """The world size the launcher asked for (torchrun / accelerate set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def mixed_precision(precision: str) -> str:
    """Run-config precision -> accelerate's mixed_precision: bf16 autocast on CUDA, fp32 on CPU."""
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return {"fp32": "no", "bf16": "bf16"}[precision]


def make_accelerator(precision: str = "auto"):
    """An Accelerator for this process; fails (exit 2) if it did not join the launched world."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision(precision))
    expected = launched_world_size()
    if accelerator.num_processes != expected:
        raise UsageError(
            f"accelerate started {accelerator.num_processes} process(es) but the launcher asked for "
            f"{expected} (WORLD_SIZE); launch with torchrun --nproc_per_node N -m wm_pipeline train ..."
        )
    return accelerator


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from any parts, e.g. ``(seed, "data", step, rank)``: stable across runs and
    machines (unlike ``hash()``), and independent streams for different parts."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on at least one (one all-reduce, so also a barrier);
    ``flag`` itself on one process. Lets every rank learn that one rank failed (e.g. a checkpoint write)
    instead of leaving the others waiting in the next collective."""
    if not is_distributed():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def shutdown() -> None:
    """Tear down the process group (after the DDP model and optimizer are gone)."""
    gc.collect()
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as e:  # shutting down: never mask the run's own exit code
            log.debug("destroy_process_group failed: %s", e)


def finish_process(code: int) -> None:
    """Exit a torchrun worker now, flushed, skipping interpreter teardown (gloo SIGABRT trap)."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
