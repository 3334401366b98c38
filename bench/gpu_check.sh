#!/usr/bin/env bash
# One GPU check for maintainers: the cuda tests, the ring on 2 and 4 processes sharing
# the GPU, an HF Llama on 2 ranks vs one GPU, the per-block kernel table and the ring's speed as
# a fraction of one SDPA call. Offline, with only torch, triton and transformers installed; at
# most 8 minutes on one GPU. Writes bench/results/gpu_check.json and gpu_check_summary.md.
#
#   bash bench/gpu_check.sh                 # on a CUDA machine
#   bash bench/gpu_check.sh --cpu-dry-run   # check the script itself on CPU (tiny shapes)
#
# A bare checkout does not import: passes/, runtime/ and kernels/ install as subpackages of
# seqpar_compiler. So the package is made importable first: an editable install without
# dependencies or network, or, where pip cannot, a temporary site folder of symlinks.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"

if ! "$PYTHON" -c "import seqpar_compiler.kernels, seqpar_compiler.runtime" >/dev/null 2>&1; then
    if ! "$PYTHON" -m pip install --no-deps --no-build-isolation --no-index -q -e . >/dev/null 2>&1; then
        SITE="$(mktemp -d)"
        trap 'rm -rf "$SITE"' EXIT
        mkdir -p "$SITE/seqpar_compiler"
        for f in seqpar_compiler/*; do ln -s "$PWD/$f" "$SITE/seqpar_compiler/$(basename "$f")"; done
        for sub in passes runtime kernels; do ln -s "$PWD/$sub" "$SITE/seqpar_compiler/$sub"; done
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        echo "gpu_check: using a temporary site layout at $SITE (pip install -e . was not possible)"
    fi
fi
"$PYTHON" -c "import seqpar_compiler.kernels, seqpar_compiler.runtime" || {
    echo "gpu_check: seqpar_compiler does not import; see the error above" >&2; exit 2; }

# 8 minutes in all: the script stops starting sections after its budget, this stops everything
timeout 480 "$PYTHON" bench/gpu_check.py "$@"
