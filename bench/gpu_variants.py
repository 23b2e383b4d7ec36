"""What `bash bench/gpu_session.sh` runs, in order of value: one ``Entry`` per check, measurement or variant,
each with its kind (what bench/gpu_phase.py runs: check, e2e, stages, pytest, script, ncu), its time box,
its priority (run order, lowest first), its options (run options of ``hallolive_rt.options.from_flat``
plus its kind's own, listed in ``KIND_OPTIONS``), what the dry run (tiny preset, CPU) changes, and the JSON
file its result goes to; measuring one more lever is one more entry, e.g. ``_dit_lever("v-dit-fused", 69,
"q/k/v projections as one GEMM per group", fuse_projections=True)``."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Entry", "ENTRIES", "KINDS", "KIND_OPTIONS", "entries", "output_files"]

KINDS = ("check", "e2e", "stages", "pytest", "script", "ncu")
# Each kind's own options (the rest of an entry's options are run options, from_flat's keys). vae_backend:
# a comma list of video decoder runners, each a run (bench_main's vae_variants); memory_cap_gib: the
# viewer's cap (bench/gpu_viewer.py); deadline_s: tests not started by then are skipped (pytest_deadline.py).
KIND_OPTIONS = {
    "check": ("backends", "blocks"),                      # runtime/bench_check.py check_backends
    "e2e": ("backends", "blocks", "warmup_runs", "compare_overlap", "vae_backend", "memory_cap_gib"),
    "stages": ("backends", "blocks", "modes", "warmup_runs", "vae_backend"),
    "pytest": ("args", "prebuild_kv_ext", "workers", "test_timeout_s", "deadline_s"),
    "script": ("script", "args", "out", "preset_arg"),   # out: "file" (--out F.json) or "dir" (one JSON in it)
    "ncu": ("target", "launch_count", "blocks", "warmup_blocks", "backends"),  # bench/gpu_ncu.py
}
# The dry run (tiny preset, CPU): no CUDA graphs on a CPU, so the eager reference only; 2 blocks, no warm-up.
DRY = {"backends": ["eager"], "blocks": 2, "warmup_runs": 0}
VIEWER_BLOCKS = 15  # > the full preset's 5-block clip: the rolling cache policy, as a live viewer streams
DRY_VIEWER_BLOCKS = 4  # > the tiny preset's 3-block clip: rolling too


@dataclass(frozen=True)
class Entry:
    """One entry. ``file``: the stem of the JSON it writes (``<card>-<file>.json``): its own file when
    ``file == name``, else one key (its name) of a shared file. ``artifacts``: other files it may write
    (counted against the session's 8). ``default=False``: runs only when named with ``--only``."""

    name: str
    kind: str
    box_s: int
    priority: int
    options: dict = field(default_factory=dict)
    dry: dict = field(default_factory=dict)
    dry_box_s: int = 120
    file: str = "variants"
    artifacts: tuple[str, ...] = ()
    default: bool = True
    note: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"entry {self.name}: kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def own_file(self) -> bool:
        return self.file == self.name

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
    runners, in one process; the dry run keeps what a CPU runs (channels_last_3d, eager) on one block."""
    return Entry(name, "stages", box_s=box_s, priority=priority,
                 options={"backends": ["eager"], "modes": ["vae"], "blocks": 3, "warmup_runs": 1,
                          "vae_backend": vae_backend},
                 dry={**DRY, "blocks": 1, "vae_backend": "eager+cl3d"}, note=note)


def _viewer(decoder: str, priority: int, cap_gib: int, vae_backend: str, *, box_s: int, suffix: str = "",
            **lever) -> Entry:
    """The viewer's measurement for one video decoder: the best DiT backend, a rolling stream of
    VIEWER_BLOCKS blocks under a GPU memory cap, one warm-up stream (compile, capture)."""
    what = "".join(f", {k}={v}" for k, v in lever.items())
    return Entry(f"e-viewer-{decoder}{suffix}", "e2e", box_s=box_s, priority=priority, file="e-viewer",
                 options={"backends": ["compiled"], "blocks": VIEWER_BLOCKS, "warmup_runs": 1,
                          "video_decoder": decoder, "vae_backend": vae_backend, "memory_cap_gib": cap_gib, **lever},
                 dry={**DRY, "blocks": DRY_VIEWER_BLOCKS}, dry_box_s=150,
                 note=f"what a viewer gets with the {decoder} video decoder{what}: compiled DiT, {VIEWER_BLOCKS} "
                      f"blocks (rolling caches), TTFF, steady FPS, inter-block gaps vs the 0.96 s a block plays, "
                      f"the real-time verdict, peak memory under a {cap_gib} GiB cap (and, should it not fit, "
                      f"the same run again uncapped)")


def _ncu(target: str, priority: int, launch_count: int, *, box_s: int) -> Entry:
    return Entry(f"p-ncu-{target}", "ncu", box_s=box_s, priority=priority, artifacts=("ncu-reports.zip",),
                 options={"target": target, "launch_count": launch_count, "blocks": 2, "warmup_blocks": 1,
                          "backends": ["eager"]},
                 dry={"blocks": 2, "warmup_blocks": 1},
                 note=f"Nsight Compute on the kernels of profiles/ncu.toml's {target!r} target (its sections and "
                      f"NVTX range), the first {launch_count} of them, over 2 eager blocks of the full preset")


ENTRIES = [
    # ---- correctness first: the fast DiT backends against eager on the same seed ----------------------------
    Entry("a-correctness", "check", box_s=120, priority=10, file="a-correctness",
          options={"backends": ["eager", "cudagraph", "compiled"], "blocks": 3},
          dry={"backends": ["eager"], "blocks": 2},
          note="cudagraph and compiled vs eager committed latents over 3 blocks, same seed; eager vs eager = "
               "noise floor (the compiled backend's inductor compile is inside the box)"),
    # ---- the viewer's measurement: one process per decoder, so each proves its own memory cap ---------------
    _viewer("full", 20, 32, "eager+cl3d", box_s=180),
    _viewer("taew2_2", 21, 24, "eager", box_s=165),
    # ---- the CUDA tests, bounded: tests not started by deadline_s are skipped, the summary still written -----
    Entry("d-cuda-tests", "pytest", box_s=165, priority=30, file="d-cuda-tests",
          options={"args": ["-m", "cuda", "tests/"], "prebuild_kv_ext": True, "workers": 4,
                   "test_timeout_s": 90, "deadline_s": 140},
          note="pytest -m cuda, 4 workers (the KV extension is built first, its build time and cause recorded); "
               "tests not started within 140 s are skipped as 'not run'"),
    # ---- the rest, by what each can still change --------------------------------------------------------------
    _vae_variant("v-vae-compiled", 40, "eager+cl3d,compiled-cudagraph+cl3d", "full video decoder: eager, "
                 "channels_last_3d, then compiled (inductor) and captured in channels_last_3d, at bf16", box_s=150),
    _ncu("vae", 45, 30, box_s=150),
    _ncu("dit", 46, 40, box_s=150),
    _viewer("taew2_2", 48, 24, "eager", box_s=165, suffix="-fp8", precision="fp8"),
    Entry("v-e2e-auto", "e2e", box_s=90, priority=50,
          options={"backends": ["auto"], "warmup_runs": 1}, dry={**DRY, "backends": ["auto"]},
          note="--backend auto end to end, the released 5 blocks, full decoder: what a default run gets "
               "(the pick and its reason are in backend_choice)"),
    Entry("b-e2e", "e2e", box_s=120, priority=55,
          options={"backends": ["eager", "cudagraph"], "warmup_runs": 1}, dry=DRY,
          note="full stream, eager then cudagraph, one process: TTFF, steady FPS, stages, gap p99, memory"),
    Entry("c-stages", "stages", box_s=90, priority=56,
          options={"backends": ["eager", "cudagraph"], "modes": ["dit", "vae"], "warmup_runs": 1}, dry=DRY,
          note="DiT-only and VAE-only stage times; projected two-device rate"),
    Entry("d-kv-write-bench", "script", box_s=45, priority=57,
          options={"script": "bench/kv_write_bench.py", "args": [], "out": "file"},
          dry={"args": ["--device", "cpu", "--tiny", "--dtype", "float32", "--warmup", "1", "--iters", "3",
                        "--repeat", "2"]},
          note="KV-cache ops: extension vs index_copy_ + separate RoPE, released video-block shapes"),
    Entry("v-fp8-deviation", "script", box_s=120, priority=60,
          options={"script": "bench/fp8_deviation.py", "args": ["--device", "cuda", "--blocks", "2", "--no-fp32"],
                   "out": "file", "preset_arg": True},
          dry={"args": ["--device", "cpu", "--blocks", "1", "--impls", "emulate"]},
          note="fp8 vs bf16 at full size: per-forward x0 rel-RMS, final latents, decoded frames PSNR"),
    _dit_lever("v-dit-compiled", 61, "DiT: the fusion layer compiled once for all layers (inductor) inside the "
               "CUDA graphs", box_s=150, backends=("cudagraph", "compiled")),
    Entry("v-overlap", "e2e", box_s=150, priority=62,
          options={"backends": ["cudagraph"], "blocks": 4, "warmup_runs": 1, "compare_overlap": True},
          dry={**DRY, "compare_overlap": True},
          note="decode of block i on its own low-priority stream while the DiT runs i+1, vs sequential"),
    Entry("c-stages-kv-ext", "stages", box_s=90, priority=63,
          options={"backends": ["eager", "cudagraph"], "modes": ["dit"], "kv_impl": "ext", "warmup_runs": 1},
          dry=DRY, note="DiT-only with --kv-impl ext"),
    _dit_lever("v-dit-fp8", 64, "DiT Linears in float8 e4m3 (torch._scaled_mm, per-row weight / per-token "
               "activation scales)", box_s=150, backends=("cudagraph", "compiled"), precision="fp8"),
    _vae_variant("v-vae-cl3d-graphs", 65, "eager+cl3d,cudagraph+cl3d,cudagraph", "video decoder: channels_last_3d, "
                 "then CUDA graphs of the per-frame decode, vs the eager decoder", box_s=100),
    _dit_lever("v-dit-lean-context", 66, "the t=0 context pass without the work that reaches no cache (~0.4% of "
               "the DiT's FLOPs)", lean_context=True),
    _dit_lever("v-dit-attn-cudnn", 68, "every attention through cuDNN's SDPA kernel (--attn-kernel cudnn) instead "
               "of PyTorch's pick", dry={"attn_kernel": "math"}, attn_kernel="cudnn"),
    _dit_lever("v-dit-fused", 69, "q/k/v (and cross-attention k/v) projections as one GEMM per group "
               "(--fuse-projections)", fuse_projections=True),
    # ---- opt-in (--only) ------------------------------------------------------------------------------------
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


def output_files(chosen: list[Entry], card: str) -> set[str]:
    """Every file a session of ``chosen`` may write: the entries' JSON, their artifacts, the session's own."""
    names = {f"{card}-{e.file}.json" for e in chosen} | {f"{card}-{a}" for e in chosen for a in e.artifacts}
    return names | {f"{card}-session.json", f"{card}-session.log"}
