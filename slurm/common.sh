# Shared by the sbatch scripts: find the Python that has wm-pipeline installed.
# WM_PYTHON wins; else the repo's .venv (scripts are submitted from a checkout); else python3 on PATH.
wm_python() {
  if [ -n "${WM_PYTHON:-}" ]; then echo "$WM_PYTHON"; return; fi
  local here=${SLURM_SUBMIT_DIR:-$PWD}
  for p in "$here/.venv/bin/python" "$(dirname "$here")/.venv/bin/python"; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  command -v python3
}
log() { echo "[$(date +%H:%M:%S)] [job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID}] $*"; }
