#!/usr/bin/env bash
# Bootstrap of the release run (experiments/release_gpu.py) on a GPU machine without a package
# registry (Python 3.12, torch >= 2.11, timm, accelerate, huggingface_hub, safetensors; no
# pyautoattack).
#
#   bash experiments/release_gpu.sh --prepare        # with network: wheels -> .whl/, data -> .data/
#   bash experiments/release_gpu.sh [ARGS...]        # on the GPU machine: install, check versions, run ARGS
#
# --prepare downloads the wheels the GPU machine lacks (pyautoattack only; pip download
# --no-deps, Python 3.12) into .whl/ and copies the CIFAR-10-JPEG archives from
# ../shared/data/cifar10-jpeg/ into .data/cifar10-jpeg/; both folders are git-ignored and are
# copied to the GPU machine with the checkout.  The pyautoattack wheel is 42 MB, almost all
# of it a test checkpoint (pyautoattack/examples/model_test.pt) that the package never imports;
# --prepare rewrites the wheel without pyautoattack/examples/ (and without those files' RECORD
# lines), which keeps checkout + wheel + data under 64 MiB.
#
# The run installs .whl/*.whl and the project itself with --no-index --no-deps into a target
# folder put first on PYTHONPATH (nothing else is installed or upgraded), checks the versions
# (release_gpu.py --check-env: torch >= 2.11 suffices), then runs
# `python experiments/release_gpu.py ARGS` (default --device cuda --budget-min 8 --pack $OUT when OUT is set).
# PYTHON (default python3) and RELEASE_SITE (default /tmp/timm-edl-site) can be set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
SITE=${RELEASE_SITE:-/tmp/timm-edl-site}
WHEELS=.whl
DATA=.data/cifar10-jpeg
SHARED=${SHARED_DATA:-../shared/data/cifar10-jpeg}
AUTOATTACK=pyautoattack==0.2.0

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p "$WHEELS" "$DATA"
    rm -f "$WHEELS"/pyautoattack-*.whl
    "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d "$WHEELS" "$AUTOATTACK"
    "$PYTHON" - "$WHEELS" <<'EOF'
import sys, zipfile
from pathlib import Path
for wheel in Path(sys.argv[1]).glob('pyautoattack-*.whl'):
    slim = wheel.with_suffix('.slim')
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(slim, 'w', zipfile.ZIP_DEFLATED) as dst:
        for item in src.infolist():
            if item.filename.startswith('pyautoattack/examples/'):
                continue
            data = src.read(item.filename)
            if item.filename.endswith('.dist-info/RECORD'):
                data = b''.join(line for line in data.splitlines(keepends=True)
                                if not line.startswith(b'pyautoattack/examples/'))
            dst.writestr(item, data)
    slim.replace(wheel)
    print(f'{wheel}: {wheel.stat().st_size / 2**20:.2f} MiB (without pyautoattack/examples/)')
EOF
    cp "$SHARED"/train.tar.gz "$SHARED"/test.tar.gz "$SHARED"/SHA256SUMS "$DATA"/
    (cd "$DATA" && sha256sum -c --quiet SHA256SUMS)
    du -sh "$WHEELS" "$DATA"
    echo 'prepared: copy the checkout with .whl/ and .data/ to the GPU machine and run: bash experiments/release_gpu.sh --budget-min 8 --pack OUT'
    exit 0
fi

shopt -s nullglob
wheels=("$WHEELS"/*.whl)
mkdir -p "$SITE"
if (( ${#wheels[@]} )); then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "${wheels[@]}"
fi
# the project itself, without its dependencies (they are the machine's own)
if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$SITE" . ; then
    echo "release: pip could not install the project; using the checkout on PYTHONPATH" >&2
    export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export TIMM_EDL_DATA_DIR=${TIMM_EDL_DATA_DIR:-$PWD/.data}
export TIMM_EDL_CACHE_DIR=${TIMM_EDL_CACHE_DIR:-/tmp/timm-edl-cache}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1

args=("$@")
(( ${#args[@]} )) || args=(--device cuda --budget-min 8 ${OUT:+--pack "$OUT"})
device=cuda
for ((i = 0; i < ${#args[@]}; i++)); do
    [[ "${args[$i]}" == "--device" ]] && device="${args[$((i + 1))]}"
    [[ "${args[$i]}" == --device=* ]] && device="${args[$i]#--device=}"
done
"$PYTHON" experiments/release_gpu.py --check-env --device "$device"
exec "$PYTHON" experiments/release_gpu.py "${args[@]}"
