#!/usr/bin/env bash
# Paper-scale GPU run of every medad bundle in a fixed wall budget (issue #12); see scripts/gpu_run.py.
#
#   bash scripts/gpu_run.sh [OUTPUT_DIR] [gpu_run.py options ...]     # OUTPUT_DIR defaults to $OUT
#
# 1. needs a Python with torch (on a CUDA machine: its CUDA build; a missing torch is installed with pip, which pulls
#    the CUDA build from PyPI); torch is never reinstalled when it imports;
# 2. installs this repository without extras (`pip install -e .`) unless medad and its dependencies already import
#    from this checkout; on a machine without a package index, put the wheels of the missing dependencies in a
#    folder and set MEDAD_WHEELS=<folder> (default: <repo>/.whl when it exists): they are installed from there;
# 3. runs scripts/gpu_run.py; everything printed also goes to OUTPUT_DIR/gpu_run.log.
# Without CUDA, gpu_run.py says so in one line and runs on the CPU at toy size.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-}}"
if [ -z "$OUT_DIR" ]; then
    echo "usage: bash scripts/gpu_run.sh OUTPUT_DIR [options]   (or set \$OUT)" >&2
    exit 2
fi
shift || true
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
export PYTHONUNBUFFERED=1
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_run.log"

{
    report="import torch; print('[gpu_run.sh] torch', torch.__version__, 'CUDA' if torch.cuda.is_available() else 'no CUDA')"
    if ! "$PYTHON" -c "$report" 2>/dev/null; then
        echo "[gpu_run.sh] torch is missing: pip install torch"
        "$PYTHON" -m pip install torch
        "$PYTHON" -c "$report"
    fi

    # medad from THIS checkout, with the dependencies a run imports
    check="import medad, monai, nibabel, nilearn, jsonschema, nrrd, slicerio, einops, skimage, pandas, pyarrow, matplotlib, tqdm;
import pathlib, sys; sys.exit(0 if pathlib.Path(medad.__file__).resolve().parents[1] == pathlib.Path('$REPO') else 1)"
    if "$PYTHON" -c "$check" 2>/dev/null; then
        echo "[gpu_run.sh] medad and its dependencies already import from $REPO"
    else
        WHEELS="${MEDAD_WHEELS:-$REPO/.whl}"
        if [ -d "$WHEELS" ]; then
            echo "[gpu_run.sh] installing the wheels in $WHEELS, then medad (no index)"
            "$PYTHON" -m pip install -q --no-index --no-deps "$WHEELS"/*.whl
            "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e "$REPO"
        else
            echo "[gpu_run.sh] pip install -e $REPO"
            "$PYTHON" -m pip install -q -e "$REPO"
        fi
    fi
    cd "$REPO"
    "$PYTHON" "$REPO/scripts/gpu_run.py" --out "$OUT_DIR" "$@"
} 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
