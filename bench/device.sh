#!/usr/bin/env bash
# The one prepared GPU run (bench/device/): device.json, device.md and device.log into OUT, in at most 8 minutes.
#
#   bash bench/device_wheels.sh             # here, once: the wheels the GPU machine lacks, into .whl/
#   bash bench/device.sh OUT                # on the GPU machine, from the repository root, .whl/ carried along
#   bash bench/device.sh OUT --dry-run      # on any CPU: every stage at toy size (~3-4 minutes on 2 cores)
#   bash bench/device.sh OUT --only embed,serving   # a second try of some stages
#
# Runs with the python3 on the PATH (PYTHON=... to choose another) and the project from this checkout, not an
# installed copy. Exit status 0 when every stage ran (or was skipped with its reason), 1 when one failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 1 || "$1" == -* ]]; then
  echo "usage: bash bench/device.sh OUT [--dry-run] [--only STAGES] [--budget SECONDS]" >&2
  exit 2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m bench.device "$@"
