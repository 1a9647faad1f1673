#!/usr/bin/env bash
# The device check (bench/device_check.py) as the one command of a device `run` call; see bench/README.md,
# "Device check". Installs the wheels in .whl/ when the call carried them (carry: [".whl"]), prints the GPU,
# runs the check and keeps its log beside the two JSON files in $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-$(mktemp -d)}
PYTHONUNBUFFERED=1 python3 bench/device_check.py --budget-s "${BUDGET_S:-420}" --out "$out" "$@" 2>&1 \
  | tee "$out/device_check.log"
