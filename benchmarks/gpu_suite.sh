#!/usr/bin/env bash
# The GPU suite: every benchmark on the ~1B random Llama (LoRA r=8 on all 7 projections, batch 4x256, bf16),
# the speed and memory goals as ratios in one run, printed as a benchmarks/RESULTS.md section.
#
#   bash benchmarks/gpu_suite.sh [--size 1b|small] [--device cuda|cpu] [--dtype bf16|fp32] [--out FILE]
#
# Defaults: --size 1b --device cuda (bf16 base). --out FILE appends the section to FILE.
# CI runs it on the CPU so that it does not rot: OMP_NUM_THREADS=1 bash benchmarks/gpu_suite.sh --size small --device cpu
#
# Needs only the working tree and a Python with torch, transformers, peft, numpy, tqdm, opt-einsum and
# safetensors (a stock GPU image): pyro-ppl and pyro-api come from the wheels in benchmarks/wheels (pure Python,
# installed into a temporary directory, offline) when `import pyro` fails, and the project is imported from the
# working tree, installed or not (benchmarks/_common.py maps guides/ to pyro_lora.guides as setup.cfg does).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
export PYRO_LORA_SUITE_START="${PYRO_LORA_SUITE_START:-$(date +%s)}"
export PYRO_LORA_SUITE_CMD="bash benchmarks/gpu_suite.sh${*:+ $*}"

if ! "$PY" -c "import pyro" >/dev/null 2>&1; then
    SITE="${PYRO_LORA_SITE:-${TMPDIR:-/tmp}/pyro_lora_site}"
    mkdir -p "$SITE"
    echo "gpu_suite: pyro is not installed; installing benchmarks/wheels/*.whl into $SITE" >&2
    if ! "$PY" -m pip install -q --no-index --no-deps --upgrade --target "$SITE" "$REPO"/benchmarks/wheels/*.whl; then
        echo "gpu_suite: pip failed; unpacking the wheels instead (pure Python: a wheel is a zip of its package)" >&2
        for wheel in "$REPO"/benchmarks/wheels/*.whl; do
            "$PY" -m zipfile -e "$wheel" "$SITE"
        done
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    "$PY" -c "import pyro; print('gpu_suite: pyro', pyro.__version__, 'from', pyro.__file__)" >&2
fi

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
exec "$PY" "$REPO/benchmarks/suite.py" "$@"
