"""What `bash bench/gpu_session.sh` runs on a lent GPU, in order: one entry per phase or variant.

To measure a speed lever (issue #15: compiled DiT step, fp8, VAE graph, overlap, ...), add ONE entry:

    Entry("c-stages-fused", "stages", box_s=80, priority=70,
          options={"modes": ["dit"], "fuse_projections": True},
          note="DiT-only with --fuse-projections"),

Fields
  name       unique; the key of its result in <card>-variants.json (or, with own_file, <card>-<name>.json)
  kind       what runs (bench/gpu_phase.py): check (cudagraph vs eager latents), e2e (bench_main e2e),
             stages (bench_main dit and/or vae, + the projected two-device rate), pytest, script
  box_s      time box on the GPU: the entry starts only if this much of the session's budget is left, and
             is killed (recorded as "timeout", its finished blocks kept) when it runs past it
  priority   run order, lowest first; the baseline (a)-(c) comes first, so it always fits (gpu_session.sh)
  options    bench options: backends, blocks, modes (stages), kv_impl, fuse_projections, attn_kernel,
             warmup_runs, seed, overlap, vae_backend, vae_channels_last, compare_overlap (bench_main's
             keywords; check takes the DiT ones only; preset and device are the session's); pytest: args, prebuild_kv_ext; script: script,
             args, out ("file": --out FILE.json, "dir": --out DIR holding one JSON), preset_arg
  dry        what --dry-run (tiny preset, CPU) changes: no CUDA graphs on a CPU, smaller runs
  dry_box_s  time box in the dry run
  own_file   the baseline phases each write their own JSON; variants share <card>-variants.json (the
             device tool brings back at most 8 files)
  default    False: runs only when named with --only (e.g. the AOTI package: 23 GB of constants)

Budget (documented in bench/gpu_session.sh): the default boxes of setup + (a) + (b) + (c) sum to 510 s of
the 525 s budget, so they always start; (d) and the variants run in what the baseline leaves (each only
if its whole box still fits). Estimates per phase are in gpu_session.sh's header.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Entry", "ENTRIES", "KINDS", "entries"]

KINDS = ("check", "e2e", "stages", "pytest", "script")
# The dry run (tiny preset, CPU): no CUDA graphs on a CPU, so the eager reference only; 2 blocks, no warm-up.
DRY = {"backends": ["eager"], "blocks": 2, "warmup_runs": 0}


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str
    box_s: int
    priority: int
    options: dict = field(default_factory=dict)
    dry: dict = field(default_factory=dict)
    dry_box_s: int = 120
    own_file: bool = False
    default: bool = True
    note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"entry {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    def resolved(self, dry_run: bool) -> dict:
        """Options for this session (the dry-run changes merged over them)."""
        return {**self.options, **(self.dry if dry_run else {})}

    def box(self, dry_run: bool) -> int:
        return self.dry_box_s if dry_run else self.box_s


def _dit_lever(name: str, priority: int, note: str, *, box_s: int = 90, backends=("cudagraph",),
               dry: dict | None = None, **lever) -> Entry:
    """A DiT-only variant (stages, 3 blocks, one warm-up) with one lever set; the dry run keeps the lever
    unless ``dry`` replaces it (a CPU cannot run every kernel)."""
    return Entry(name, "stages", box_s=box_s, priority=priority,
                 options={"backends": list(backends), "modes": ["dit"], "blocks": 3, "warmup_runs": 1, **lever},
                 dry={**DRY, **(lever if dry is None else dry)}, note=note)


def _vae_variant(name: str, priority: int, vae_backend: str, note: str, *, box_s: int) -> Entry:
    """A decoders-only variant (stages, 3 blocks, one warm-up): the eager decoder, then ``vae_backend``'s
    runners, in one process; the dry run keeps what a CPU runs (channels_last_3d, eager)."""
    return Entry(name, "stages", box_s=box_s, priority=priority,
                 options={"backends": ["eager"], "modes": ["vae"], "blocks": 3, "warmup_runs": 1,
                          "vae_backend": vae_backend},
                 dry={**DRY, "vae_backend": "eager+cl3d"}, note=note)


ENTRIES = [
    # ---- the baseline: (a) correctness, (b) end to end, (c) stages -------------------------------------------
    Entry("a-correctness", "check", box_s=150, priority=10, own_file=True,
          options={"backends": ["eager", "cudagraph", "compiled"], "blocks": 3}, dry=DRY,
          note="cudagraph and compiled vs eager committed latents over 3 blocks, same seed; eager vs eager = "
               "noise floor (compiled: the full-size deviation of the fastest DiT backend, ~30 s of compile)"),
    Entry("b-e2e", "e2e", box_s=180, priority=20, own_file=True,
          options={"backends": ["eager", "cudagraph"], "warmup_runs": 1}, dry=DRY,
          note="full stream, eager then cudagraph, one process: TTFF, steady FPS, stages, gap p99, memory"),
    Entry("c-stages", "stages", box_s=120, priority=30, own_file=True,
          options={"backends": ["eager", "cudagraph"], "modes": ["dit", "vae"], "warmup_runs": 1},
          dry=DRY,
          note="DiT-only and VAE-only stage times; projected two-device rate"),
    # ---- the headline: every lever that measured faster, together (first H100 session) -------------------------
    Entry("v-e2e-best", "e2e", box_s=150, priority=35,
          options={"backends": ["compiled"], "vae_backend": "eager+cl3d", "warmup_runs": 1},
          dry={**DRY, "vae_backend": "eager+cl3d"},
          note="full stream with the levers that paid on the H100 (compiled DiT 1.72x, channels_last_3d decoder "
               "1.06x, overlap 1.46x), the released 5 blocks: TTFF, steady FPS against the targets"),
    # ---- (d) checks ---------------------------------------------------------------------------------------------
    Entry("d-cuda-tests", "pytest", box_s=240, priority=40, own_file=True,
          options={"args": ["-m", "cuda", "tests/"], "prebuild_kv_ext": True, "workers": 4},
          note="pytest -m cuda (the KV extension is built first, its build time and cause recorded)"),
    Entry("d-kv-write-bench", "script", box_s=60, priority=50, own_file=True,
          options={"script": "bench/kv_write_bench.py", "args": [], "out": "file"},
          dry={"args": ["--device", "cpu", "--tiny", "--dtype", "float32", "--warmup", "1", "--iters", "3",
                        "--repeat", "2"]},
          note="KV-cache ops: extension vs index_copy_ + separate RoPE, released video-block shapes"),
    # ---- variants: one entry per lever (issue #15) ------------------------------------------------------------------
    # What the first H100 session could not measure comes first (the full-size fp8 deviation table, the
    # compiled decoder), then the levers it measured, in the order of their measured gain, each against
    # the baseline of (c) from the same session; a later session can name any of them with --only. On a
    # CPU (the dry run) the CUDA-graph variants fall back to what a CPU runs, so every entry's code path
    # still runs in CI.
    Entry("c-stages-kv-ext", "stages", box_s=90, priority=62,
          options={"backends": ["eager", "cudagraph"], "modes": ["dit"], "kv_impl": "ext", "warmup_runs": 1},
          dry=DRY, note="(c) DiT-only with --kv-impl ext"),
    _vae_variant("v-vae-cl3d-graphs", 64, "eager+cl3d,cudagraph+cl3d,cudagraph", "video decoder: channels_last_3d, "
                 "then CUDA graphs of the per-frame decode, vs the eager decoder", box_s=100),
    _dit_lever("v-dit-compiled", 60, "DiT: the fusion layer compiled once for all layers (inductor) inside the "
               "CUDA graphs", box_s=150, backends=("cudagraph", "compiled")),
    _dit_lever("v-dit-fp8", 63, "DiT Linears in float8 e4m3 (torch._scaled_mm, per-row weight / per-token "
               "activation scales)", box_s=150, backends=("cudagraph", "compiled"), precision="fp8"),
    Entry("v-fp8-deviation", "script", box_s=120, priority=55,
          options={"script": "bench/fp8_deviation.py", "args": ["--device", "cuda", "--blocks", "2", "--no-fp32"],
                   "out": "file", "preset_arg": True},
          dry={"args": ["--device", "cpu", "--blocks", "1", "--impls", "emulate"]},
          note="fp8 vs bf16 at full size: per-forward x0 rel-RMS, final latents, decoded frames PSNR"),
    Entry("v-overlap", "e2e", box_s=150, priority=61,
          options={"backends": ["cudagraph"], "blocks": 4, "warmup_runs": 1, "compare_overlap": True},
          dry={**DRY, "compare_overlap": True},
          note="decode of block i on its own low-priority stream while the DiT runs i+1, vs sequential"),
    _dit_lever("v-dit-lean-context", 66, "the t=0 context pass without the work that reaches no cache (~0.4% of "
               "the DiT's FLOPs)", lean_context=True),
    _vae_variant("v-vae-compiled", 56, "compiled-cudagraph+cl3d", "video decoder compiled (inductor) and captured, "
                 "channels_last_3d", box_s=150),
    _dit_lever("v-dit-attn-cudnn", 68, "every attention through cuDNN's SDPA kernel (--attn-kernel cudnn) instead "
               "of PyTorch's pick", dry={"attn_kernel": "math"}, attn_kernel="cudnn"),
    _dit_lever("v-dit-fused", 69, "q/k/v (and cross-attention k/v) projections as one GEMM per group "
               "(--fuse-projections)", fuse_projections=True),
    # ---- opt-in (--only) ----------------------------------------------------------------------------------------
    Entry("aoti-dit", "script", box_s=540, priority=90, default=False,
          options={"script": "bench/export_aoti_bench.py", "args": ["--variants", "1"], "out": "dir",
                   "preset_arg": True},
          note="AOTInductor DiT package vs eager: 23 GB of constants, minutes of compile; never by default"),
]


def entries(only: list[str] | None = None) -> list[Entry]:
    """The entries to run, by priority: the default ones, or exactly those named in ``only``."""
    names = {e.name for e in ENTRIES}
    if len(names) != len(ENTRIES):
        raise ValueError("entry names must be unique")
    if only:
        unknown = [n for n in only if n not in names]
        if unknown:
            raise ValueError(f"unknown entries {unknown}; known: {sorted(names)}")
        chosen = [e for e in ENTRIES if e.name in only]
    else:
        chosen = [e for e in ENTRIES if e.default]
    return sorted(chosen, key=lambda e: e.priority)
