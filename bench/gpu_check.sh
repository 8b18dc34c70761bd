#!/usr/bin/env bash
# The GPU check (bench/gpu_check.py): GPU paths against the CPU, then timings, figures in $OUT/gpu_check.json.
#
#   bash bench/gpu_check.sh --cpu    # any machine: CPU workers, tiny models, about a minute (CI: .ci/run)
#   bash bench/gpu_check.sh          # a lent GPU machine (one H100): sized for under 8 minutes
#
# The GPU machine reaches no package registry: it installs the wheels listed in bench/gpu_wheels.txt, which the
# session carries in .whl/ (git-ignored). Fetch them here, once, in the repository root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#       --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl -r bench/gpu_wheels.txt
#
# then make one device `run` with carry [".whl"], timeout_s 540 and the command `bash bench/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
OUT=${OUT:-$(mktemp -d)}
if [ "${1:-}" != "--cpu" ]; then
    if [ ! -d .whl ]; then
        echo "bench/gpu_check.sh: no .whl/ folder: fetch the wheels first (see the top of this script)" >&2
        exit 2
    fi
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
python3 bench/gpu_check.py --out "$OUT" "$@" 2>&1 | tee "$OUT/gpu_check.log"
