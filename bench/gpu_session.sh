#!/usr/bin/env bash
# Every GPU check and measurement the open issues need, in phases that each fit one 10-minute device call.
#
#   bash bench/gpu_session.sh setup tests kv     # call 1: deps, `pytest -m cuda`, KV-cache microbenchmark
#   bash bench/gpu_session.sh e2e                # call 2: full-size bench, eager vs cudagraph, e2e + dit + vae
#   bash bench/gpu_session.sh aoti               # call 3: full-size AOTInductor DiT package vs eager
#
# Results go to $OUT (the device tool brings them back; commit them under bench/results/). The device image
# has torch, Triton, nvcc, onnx and onnxruntime but may lack our pure-Python dependencies and PyAV; `setup`
# installs whatever is missing from a carried wheel folder `.wheels/` (ignored by git), made here with e.g.
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       --platform manylinux2014_x86_64 typer rich nvtx safetensors av onnxscript -d .wheels
# and named in the run's `carry`. Each phase logs to $OUT/<phase>.log; a failing phase does not stop the rest.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD:${PYTHONPATH:-}" OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
GPU="$(python -c 'import torch; print(torch.cuda.get_device_name(0).split()[-1].lower() if torch.cuda.is_available() else "cpu")' 2>/dev/null)"

phase_setup() {
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    python -c 'import sys, torch; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda)'
    local missing
    missing=$(python - <<'EOF'
import importlib.util
mods = {"typer": "typer", "rich": "rich", "av": "av", "nvtx": "nvtx", "safetensors": "safetensors",
        "numpy": "numpy", "onnxscript": "onnxscript", "pytest": "pytest"}
print(" ".join(pkg for mod, pkg in mods.items() if importlib.util.find_spec(mod) is None))
EOF
)
    if [ -n "$missing" ]; then
        echo "missing: $missing"
        if [ -d .wheels ]; then
            pip install --no-index --find-links .wheels $missing
        else
            echo "no .wheels/ carried: phases that need $missing will fail"
        fi
    fi
    # the package itself, without resolving dependencies from an index (there is none on the device)
    pip install --no-deps --no-build-isolation -e . >/dev/null && echo "hallolive-rt installed (editable)"
}

phase_tests() {
    python -m pytest -q -m cuda -rs tests/ 2>&1 | tee "$OUT/pytest_cuda_$GPU.txt" | tail -40
}

phase_kv() {
    python bench/kv_write_bench.py --out "$OUT/kv_write_bench_$GPU.json"
}

phase_e2e() {
    for mode in e2e dit vae; do
        hallolive-rt bench --preset hallolive-512x992 --random-weights --backends eager,cudagraph --mode "$mode" \
            --out "$OUT/bench_${mode}_$GPU.json"
    done
}

phase_aoti() {
    python bench/export_aoti_bench.py --preset hallolive-512x992 --variants 1 --out "$OUT"
}

[ $# -gt 0 ] || set -- setup tests kv
for phase in "$@"; do
    echo "=== $phase ($(date -u +%H:%M:%S))"
    if ! declare -F "phase_$phase" >/dev/null; then
        echo "unknown phase $phase (setup tests kv e2e aoti)"
        continue
    fi
    "phase_$phase" 2>&1 | tee "$OUT/$phase.log"
    echo "=== $phase exit ${PIPESTATUS[0]}"
done
