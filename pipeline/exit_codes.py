"""Exit codes of every `wm` command (documented in docs/CLI.md; the sbatch scripts rely on them)."""

OK = 0
FAILED = 1            # an unexpected error (a bug): a traceback is printed
USAGE = 2             # bad arguments or configuration, or the output folder is in use by another
                      # job (shards.folder_lock.FolderBusy): a one-line message, no traceback
DATA_FAILURES = 3     # the job finished, but some inputs could not be used (see failures.jsonl)
NONFINITE_LOSS = 4    # training stopped on a NaN/inf loss
PREEMPTED = 75        # checkpointed after SIGUSR1/SIGTERM; rerun the same command to resume (EX_TEMPFAIL)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code USAGE."""
