#!/usr/bin/env bash
# The GPU session: every check and measurement of hallolive-rt on one GPU, in one command of at most
# 9 min 15 s (bench/gpu_driver.py: BUDGET_S = 555 s, setup included; a last entry's kill adds 20 s at most).
#
#   HALLOLIVE_GIT_COMMIT=<sha> bash bench/gpu_session.sh   # on the GPU machine; the sha names the commit
#                                                          # where the tree was copied without its .git
#   bash bench/gpu_session.sh --dry-run                    # every entry, tiny preset, CPU (tests/test_gpu_session.py)
#   bash bench/gpu_session.sh --only p-ncu-vae,v-dit-fp8   # chosen entries (opt-in ones too)
#   python bench/gpu_table.py "$OUT"                       # the tables again, from the output folder
#
# Needs python3 with torch (CUDA), numpy, typer, rich, safetensors, pytest (pytest-xdist and pytest-timeout
# are used where installed), nvcc / cmake / ninja for the KV extension, ncu for the p-ncu-* entries (they are
# "skipped" without it). PyAV and the `nvtx` package are not needed: no entry writes MP4, and NVTX ranges fall
# back to torch.cuda.nvtx. The package is made importable from this checkout: already installed, else
# `pip install --no-deps --no-build-isolation --no-index -e .`, else a folder of symbolic links on PYTHONPATH.
#
# The entries (bench/gpu_variants.py), in priority order, each in its own process and time box (box = the
# most it may take; an entry starts only if its whole box still fits the budget, so setup, a-correctness
# and both viewer entries always start: 60 + 120 + 180 + 165 = 525 s):
#   setup              nvidia-smi, nvcc / cmake / ninja, install, import probe                 box  60 s
#   a-correctness      cudagraph and compiled vs eager, 3 blocks, same seed: per-block max / mean relative
#                      error of the committed latents; eager vs eager = the noise floor          box 120 s
#   e-viewer-full      the viewer's measurement, full video decoder (eager, channels_last_3d): compiled
#                      DiT, 15 blocks (rolling caches), one warm-up stream, allocator capped at 32 GiB:
#                      TTFF, steady FPS, inter-block gap p50 / p99 vs 0.96 s, real_time, peak memory, fits box 180 s
#   e-viewer-taew2_2   the same with the tiny preview decoder (random weights: the same compute), 24 GiB box 165 s
#   d-cuda-tests       KV extension build (timed, cause on failure), then pytest -m cuda on 4 workers; tests
#                      not started within 140 s are skipped as "not run"                        box 165 s
#   v-vae-compiled     full video decoder: eager, channels_last_3d, compiled-cudagraph+cl3d (bf16)   box 150 s
#   p-ncu-vae          Nsight Compute, profiles/ncu.toml's vae target, first 30 kernels, 2 blocks   box 150 s
#   p-ncu-dit          the same for the dit target (one denoising step's kernels), first 40        box 150 s
#   v-e2e-auto         --backend auto end to end, 5 blocks, full decoder                            box  90 s
#   b-e2e, c-stages, d-kv-write-bench, v-fp8-deviation, v-dit-compiled, v-overlap, c-stages-kv-ext,
#   v-dit-fp8, v-vae-cl3d-graphs, v-dit-lean-context, v-dit-attn-cudnn, v-dit-fused: the baseline
#   stream and stages, the KV ops, the speed levers, each if its box still fits                boxes 45-150 s
#   aoti-dit           AOTInductor DiT package (23 GB of constants, minutes of compile): only with --only
#
# Times measured by this script on one H100 80GB HBM3 at commit fa40c9a (bench/results/h100-session.json):
# setup 11 s, a-correctness 26 s without the compiled backend (whose inductor compile took 25 s in
# v-dit-compiled), b-e2e 44 s, c-stages 37 s, KV extension build 30 s, d-kv-write-bench 5 s, the levers
# 19-63 s each; pytest -m cuda did not finish in one process within 235 s (inductor compiles of ~50 s per
# compiled-backend test), hence the workers and the deadline. Not measured on a GPU yet: the viewer entries,
# v-vae-compiled, the ncu entries, v-e2e-auto; their boxes are estimates (model build ~15 s, compile ~30 s,
# 2 x 15 blocks at ~1 s each). At bf16 neither viewer run is expected to fit its cap (weights and caches
# alone: 35.4 GiB with the full decoder, ~32.7 GiB with taew2_2): it then records fits=false and runs again
# uncapped (bench/gpu_viewer.py), inside the same box.
# A phase past its box is recorded "timeout" (its finished blocks kept), one that raises "error", one that
# cannot run here "skipped"; the next phase runs either way.
#
# Output, in --out, else $OUT, else bench/results/gpu-session (at most 8 files, each under 16 MiB):
#   <card>-a-correctness.json  <card>-e-viewer.json (one key per decoder)  <card>-d-cuda-tests.json
#   <card>-variants.json (one key per other entry)  <card>-ncu-reports.zip (the .ncu-rep files, while under
#   15 MiB)  <card>-session.json (setup, statuses, the tables)  <card>-session.log (everything printed)
# with <card> = h100 / h200 (from nvidia-smi). bench/results/README.md says how to commit them. The last lines
# printed are the viewer's table, then one line per entry with its status and headline numbers.
set -uo pipefail
export HALLOLIVE_SESSION_T0="${HALLOLIVE_SESSION_T0:-$(date +%s.%N)}"
cd "$(dirname "$0")/.."
PY="$(command -v python3 || command -v python)"
exec "$PY" bench/gpu_driver.py "$@"
