#!/usr/bin/env bash
# bench/gpu_check.sh [OUT_DIR] [--dry-run]
# On a GPU machine with no package registry: installs what msdetr imports and the machine lacks from
# the wheels in .gpu-wheels/ (made by `make gpu-wheels`), then runs bench/gpu_check.py, which writes
# OUT_DIR/RESULTS-gpu.md, summary.json and one log per step (OUT_DIR defaults to bench/gpu-out).
# --dry-run skips the installs and runs every step on the CPU with tiny shapes (TRITON_INTERPRET=1).
# The python used is $PYTHON, else .venv/bin/python when it exists, else python3.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="$ROOT/bench/gpu-out"
DRY_RUN=0
for arg in "$@"; do
    case "$arg" in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,7p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $arg" >&2; exit 2 ;;
        *) OUT_DIR="$arg" ;;
    esac
done
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON=python3; fi
fi
cd "$ROOT" || exit 2
mkdir -p "$OUT_DIR"

# Imported at module level by msdetr, bench/train_step.py and the configs; the wheel file names.
MODULES="hydra omegaconf antlr4 pycocotools torchdata msdetr"
WHEELS="hydra_core omegaconf antlr4_python3_runtime pycocotools torchdata"

if [ "$DRY_RUN" = 1 ]; then
    echo "gpu_check.sh: dry run, no installs"
elif "$PYTHON" -c "import $(echo $MODULES | tr ' ' ',')" 2>/dev/null; then
    echo "gpu_check.sh: everything imports already, no installs"
else
    if [ ! -d .gpu-wheels ]; then
        echo "gpu_check.sh: .gpu-wheels/ is missing: run 'make gpu-wheels' where the registry is reachable and copy .gpu-wheels/ into this checkout" >&2
        exit 2
    fi
    files=()
    for name in $WHEELS; do
        found=(.gpu-wheels/"$name"-*.whl)
        if [ ! -e "${found[0]}" ]; then echo "gpu_check.sh: no $name wheel in .gpu-wheels/" >&2; exit 2; fi
        files+=("${found[@]}")
    done
    # --no-deps: their own needs (numpy, PyYAML, packaging, requests, torch) are on the machine, and
    # the resolver must not try to replace the machine's torch with the project's pin.
    "$PYTHON" -m pip install -q --no-index --no-deps --find-links .gpu-wheels "${files[@]}" || exit 2
    # The editable install needs no network with --no-build-isolation; where the machine's setuptools
    # is too old for pyproject.toml, src/ on PYTHONPATH does the same for this script.
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-build-isolation -e . ; then
        echo "gpu_check.sh: editable install failed; using PYTHONPATH=src" >&2
    fi
fi
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

args=(--out "$OUT_DIR")
if [ "$DRY_RUN" = 1 ]; then
    args+=(--dry-run)
else
    unset TRITON_INTERPRET
fi
"$PYTHON" bench/gpu_check.py "${args[@]}"
status=$?
echo "gpu_check.sh: exit $status; results in $OUT_DIR/RESULTS-gpu.md"
exit $status
