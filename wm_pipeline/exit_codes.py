"""Exit codes of every `wm` command (documented in README.md and docs/TRAINING.md; the sbatch
scripts rely on them)."""

OK = 0
FAILED = 1  # an unexpected error (a bug): a traceback is printed
USAGE = 2  # bad arguments or configuration, an unreadable weights / config file (named), or the
# output folder is in use by another job (shards.folder_lock.FolderBusy): a one-line
# message, no traceback
DATA_FAILURES = 3  # the job finished, but some inputs could not be used (see failures.jsonl)
NONFINITE_LOSS = 4  # training stopped on a NaN/inf loss
WRITE_FAILED = 74  # an output could not be written (disk full, quota, read-only or failing disk): one line
# naming the path and the room needed; nothing half-written is left: `wm train` removed
# the partial checkpoint and kept the last complete one, `wm ingest` / `wm collect` the
# partial shard and kept the complete ones (shards.writer.DiskFull): make room and rerun
# to resume (EX_IOERR)
PREEMPTED = 75  # checkpointed after SIGUSR1/SIGTERM; rerun the same command to resume (EX_TEMPFAIL)
BROKEN_PIPE = 141  # stdout was closed by its reader (`wm inspect DIR | head`): the command ends quietly,
# with the status a shell shows for a process ended by SIGPIPE (128 + 13)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code USAGE."""


class WriteFailed(Exception):
    """An output file could not be written (OSError such as ENOSPC): printed as one line naming the path,
    exit code WRITE_FAILED."""
