#!/usr/bin/env bash
# The LaBraM-Base seed study (issue 7) on the GPU host, one call of the device tool (see device_seed_study.py).
#
# Run from the repository root, with .scratch/device-seed-study (written by `python simulations/device_seed_study.py
# prepare`) carried along:
#
#     bash simulations/device_seed_study.sh
#
# It installs STUDY/whl/*.whl (Flower and what it imports; the host has torch, peft, numpy, scipy, typer, rich but no
# Flower and no MNE) into a target folder, puts it and the tree first on PYTHONPATH, and runs
# `device_seed_study.py run`: the cells not finished in STUDY/results/*.tar.xz, JOBS at a time, within BUDGET seconds
# of this script's start; OUT/seed_study_labram_base.tar.xz, OUT/progress.txt and OUT/gpu.csv come back.
# For the next call, put that tarball into STUDY/results/ (any name ending in .tar.xz) and call again.
#
# Environment: OUT (default ./out), STUDY (.scratch/device-seed-study), JOBS (10), BUDGET (530 s), PYTHON (python3),
# WHL (STUDY/whl), SITE (/tmp/site-seed-study), ARGS (more options of `device_seed_study.py run`, e.g.
# "--backbone labram-small --device cpu --rounds 1 --local-epochs 1 --seeds 0 --only 'paper/.*ffa'").
set -uo pipefail
start=$(date +%s)
STUDY=${STUDY:-.scratch/device-seed-study}
OUT=${OUT:-out}
JOBS=${JOBS:-10}
BUDGET=${BUDGET:-530}
PYTHON=${PYTHON:-python3}
WHL=${WHL:-$STUDY/whl}
SITE=${SITE:-/tmp/site-seed-study}
ARGS=${ARGS:-}
mkdir -p "$OUT"
if [ ! -f "$STUDY/eegmat-pack/fedeeg-windows-pack.json" ]; then
    echo "no window pack in $STUDY/eegmat-pack: run 'python simulations/device_seed_study.py prepare' and carry $STUDY" >&2
    exit 3
fi
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$WHL"/*.whl \
    2>&1 | grep -v -i "warning" || true
export PYTHONPATH="$SITE:$PWD"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 HF_HUB_OFFLINE=1 \
    PYTHONUNBUFFERED=1 FEDEEG_ENGINE=inprocess
"$PYTHON" - <<'EOF' || exit 4
import importlib.util, sys
import torch, flwr, fedeeg.federation.inprocess  # noqa: F401  (fails here, not in every cell, if something is missing)
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda {torch.cuda.is_available()}"
      + (f" ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "")
      + f", flwr {flwr.__version__} from {flwr.__file__.rsplit('/', 2)[0]}, mne installed: "
      + str(importlib.util.find_spec("mne") is not None))
EOF
gpu_pid=""
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader -l 5 >"$OUT/gpu.csv" 2>/dev/null &
    gpu_pid=$!
fi
left=$((BUDGET - ($(date +%s) - start)))
echo "setup took $(( $(date +%s) - start )) s; $left s left for the cells"
eval "\"$PYTHON\" simulations/device_seed_study.py run --study \"$STUDY\" --out \"$OUT\" --jobs $JOBS --budget $left $ARGS"
rc=$?
[ -n "$gpu_pid" ] && kill "$gpu_pid" 2>/dev/null
exit $rc
