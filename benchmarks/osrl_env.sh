#!/usr/bin/env bash
# Build OSRL's own environment (PyPI osrl-lib 0.1.0 + dsrl 0.1.0) in a virtual environment of its own,
# for benchmarks/osrl_parity.py. OSRL is not a dependency of lightning-saferl: its pins (torch 1.13,
# numpy<2, gym, safety-gymnasium 0.4.0 -> pygame 2.1.0 without a Python 3.11 wheel) clash with ours.
#
# Usage: benchmarks/osrl_env.sh [VENV_DIR]     (default: .venv-osrl in the current directory)
# Idempotent: each step checks whether its package already imports and skips it if so.
#
# Why this order (a plain `pip install osrl-lib` fails on Python 3.11):
#   1. torch 2.13.0 first, the CPU wheel; resolving torch later pulls CUDA wheels.
#   2. osrl-lib and dsrl with --no-deps: their declared pins (torch 1.13, safety-gymnasium 0.4.0) do not
#      install on Python 3.11; OSRL's trainers only need torch, numpy, tqdm and fsrl's utilities.
#   3. OSRL's runtime imports: numpy<2 scipy pyrallis easy-runner matplotlib h5py tqdm, fsrl (PyPI
#      fast-safe-rl, its logger and MLP helpers) with its tianshou 0.5.1 --no-deps, gymnasium, gym
#      (dsrl's offline env wrapper imports it), and bullet-safety-gym to evaluate on the Bullet tasks.
# The script's run exports DSRL_SUPPRESS_IMPORT_ERROR=1 (dsrl skips the safety-gymnasium and MetaDrive
# tasks it cannot import), MPLBACKEND=Agg and WANDB_MODE=offline; osrl_parity.py sets them too.
#
# Built with this script on 2026-12-07 (Python 3.11.7, x86_64 Linux, CPU only); the versions that worked (printed
# at the end of a build): torch 2.13.0+cpu, numpy 1.26.4, osrl-lib 0.1.0, dsrl 0.1.0, tianshou 0.5.1,
# fast-safe-rl 0.1.0, gymnasium 0.28.1, gym 0.26.2, bullet-safety-gym 1.4.0, pybullet 3.2.7, pyrallis 0.3.1,
# h5py 3.16.0, wandb 0.14.2, sentry-sdk 1.45.1, tensorboard 2.14.1, protobuf 4.25.9, PettingZoo 1.22.3,
# scipy 1.17.1, setuptools 80.10.2. pip reports osrl-lib's and fast-safe-rl's unmet pins (torch 1.13, scipy 1.10,
# protobuf 3.19, python-dateutil 2.8.2); none of them is needed for training and evaluating.
set -euo pipefail

VENV_DIR="${1:-.venv-osrl}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
export DSRL_SUPPRESS_IMPORT_ERROR=1 MPLBACKEND=Agg WANDB_MODE=offline PIP_DISABLE_PIP_VERSION_CHECK=1

if [ ! -x "$VENV_DIR/bin/python" ]; then
  "$PYTHON_BIN" -m venv "$VENV_DIR"
fi
PY="$VENV_DIR/bin/python"
PIP=("$PY" -m pip install --quiet)

has() { "$PY" -c "import $1" >/dev/null 2>&1; }
has_all() { local m; for m in "$@"; do has "$m" || return 1; done; }

has torch || "${PIP[@]}" "torch==2.13.0"
has osrl || "${PIP[@]}" --no-deps "osrl-lib==0.1.0"
has dsrl || "${PIP[@]}" --no-deps "dsrl==0.1.0"
# OSRL's and dsrl's runtime imports; numpy<2 because tianshou 0.5.1 and fsrl use numpy 1 APIs; gym because
# dsrl's offline_env imports it; setuptools<81 keeps pkg_resources, which wandb 0.14 imports.
has_all numpy scipy pyrallis easy_runner matplotlib h5py tqdm gymnasium gym pkg_resources \
  || "${PIP[@]}" "numpy<2" scipy pyrallis easy-runner matplotlib h5py tqdm "gymnasium==0.28.1" "gym==0.26.2" \
       "setuptools<81"
# fsrl (its loggers, imported by every OSRL trainer) imports wandb and tensorboard: wandb 0.14 with sentry-sdk<2,
# and tensorboard<2.15 so that both import with protobuf 4 (newer tensorboard needs protobuf 5's runtime_version,
# wandb 0.14's generated code predates it; fsrl's own pin protobuf~=3.19 is not needed).
has_all wandb tensorboard || "${PIP[@]}" "wandb==0.14.2" "sentry-sdk<2" "tensorboard<2.15" "protobuf>=4,<5"
# tianshou 0.5.1 and its own imports, without its pins on gymnasium and numpy.
has tianshou || { "${PIP[@]}" --no-deps "tianshou==0.5.1" && "${PIP[@]}" numba packaging "pettingzoo==1.22.3"; }
has fsrl || "${PIP[@]}" --no-deps "fast-safe-rl==0.1.0"
has bullet_safety_gym || { "${PIP[@]}" --no-deps "bullet-safety-gym==1.4.0" && "${PIP[@]}" pybullet; }

"$PY" - <<'EOF'
import importlib.metadata as md
import osrl.algorithms, dsrl, bullet_safety_gym, gymnasium  # noqa: F401
import fsrl.utils, tianshou  # noqa: F401
for name in ["torch", "numpy", "osrl-lib", "dsrl", "tianshou", "fast-safe-rl", "gymnasium", "gym",
             "bullet-safety-gym", "pybullet", "pyrallis", "h5py", "wandb", "tensorboard", "protobuf"]:
    print(f"{name}=={md.version(name)}")
EOF
