#!/usr/bin/env bash
# One-time set-up of a fresh machine, safe to rerun (it skips what is already done):
#   1. Debian packages: FFmpeg 5.1 libraries (torchcodec), Mesa EGL/OSMesa (MuJoCo rendering);
#   2. .venv with PyTorch (the CPU build, pinned, where there is no NVIDIA GPU) and this package.
# Called by `make demo` and `make test`; it is not meant to be run by hand, but can be.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.setup-stamp
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)

debian_packages=(libavcodec59 libavformat59 libavdevice59 libavfilter8 libswscale6 libswresample4 libavutil57
                 libegl1 libegl-mesa0 libgl1-mesa-dri libgles2 libosmesa6)
missing=()
if command -v dpkg-query >/dev/null 2>&1; then
  for p in "${debian_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
fi
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq >/dev/null
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[setup] warning: missing Debian packages (${missing[*]}); install them as root for torchcodec and EGL rendering" >&2
  fi
fi

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "[setup] creating $VENV"; "$PY" -m venv "$VENV"; }
pip=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# make test / make demo use every feature: the decord backend, VAE world models (diffusers), text encoders
# (transformers); a user's plain `pip install wm-pipeline` needs none of them (pyproject.toml extras)
extras=test,decord,vae,text
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "[setup] NVIDIA GPU found: installing the default (CUDA) torch build"
  "${pip[@]}" "torch>=2.3"
  "${pip[@]}" -e ".[$extras,gpu]" || "${pip[@]}" -e ".[$extras]"   # flash-attn is optional (SDPA covers it)
else
  # The CPU build; any other torch spec pulls a multi-GB CUDA build (see docs/INSTALL.md).
  echo "[setup] no GPU: installing torch==2.13.0 (CPU build)"
  "${pip[@]}" torch==2.13.0
  "${pip[@]}" -e ".[$extras]" "torchcodec==0.13.0"
fi
echo "$want" > "$STAMP"
echo "[setup] done: $VENV"
