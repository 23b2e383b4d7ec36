"""The video decode runner: how a stream runs one latent frame z [B, 48, 1, h, w] of the Wan2.2 decoder
(eager, compiled, CUDA graph or compiled inside a CUDA graph; optionally ``channels_last_3d``), owning the
decoder's causal-conv caches as static state. Backends and their contract: ``docs/ARCHITECTURE.md``,
"The video decode runner"."""

from __future__ import annotations

import time
import weakref

import torch

from hallolive_rt.errors import InputError
from hallolive_rt.model.compile import RegionCompiler
from hallolive_rt.model.vae_video import WanVideoDecoder
from hallolive_rt.options import VideoDecodeOptions

__all__ = ["VideoDecodeRunner", "check_vae_options", "make_video_runner", "set_conv_layout"]

CL3D = torch.channels_last_3d


def check_vae_options(opts: VideoDecodeOptions, device: torch.device | str) -> None:
    """Raise ``InputError`` (before anything is loaded) unless ``opts`` can run on ``device``."""
    dev = torch.device(device)
    if opts.uses_cuda_graph and (dev.type != "cuda" or not torch.cuda.is_available()):
        where = ("no CUDA device is visible here" if not torch.cuda.is_available() else
                 f"the decoders are on {dev}")
        raise InputError(f"--vae-backend {opts.label} captures CUDA graphs, but {where}: pass --vae-device "
                         f"cuda[:N] on a GPU machine, or use --vae-backend eager or compiled")


# ---- weight layout: one per decoder, with an epoch so a stale runner cannot replay old addresses ----------

_LAYOUTS: "weakref.WeakKeyDictionary[WanVideoDecoder, tuple[bool, int]]" = weakref.WeakKeyDictionary()


def set_conv_layout(decoder: WanVideoDecoder, channels_last: bool) -> int:
    """Put every 5-D parameter (the Conv3d weights) in channels_last_3d or back in contiguous layout; returns
    the layout epoch, which grows when a weight moved (a runner prepared at an older epoch refuses to run)."""
    fmt = CL3D if channels_last else torch.contiguous_format
    _, epoch = _LAYOUTS.get(decoder, (False, 0))
    changed = False
    with torch.no_grad():
        for p in decoder.parameters():
            if p.dim() == 5 and not p.is_contiguous(memory_format=fmt):
                p.data = p.data.contiguous(memory_format=fmt)
                changed = True
    epoch += int(changed)
    _LAYOUTS[decoder] = (channels_last, epoch)
    return epoch


# ---- the runners -------------------------------------------------------------------------------------------

class VideoDecodeRunner:
    """The eager reference; subclasses replace ``_prepare`` and ``_run`` (see the module docstring)."""

    name = "eager"

    def __init__(self, decoder: WanVideoDecoder, opts: VideoDecodeOptions, batch: int, latent_h: int,
                 latent_w: int):
        self.decoder, self.opts = decoder, opts
        self.device, self.dtype = decoder.device, decoder.dtype
        fmt = CL3D if opts.channels_last else torch.contiguous_format
        st = decoder.new_state(batch, latent_h, latent_w)  # the weights' dtype and device
        self.state = st.with_layout(fmt) if opts.channels_last else st
        shape = (batch, decoder.z_dim, 1, latent_h, latent_w)
        self.z = torch.zeros(shape, dtype=self.dtype, device=self.device).contiguous(memory_format=fmt)
        self._epoch: int | None = None
        self.prepare_s: float | None = None

    @torch.no_grad()
    def prepare(self) -> None:
        """Weight layout, then the backend's own preparation (compile, warm-up, capture); state zeroed."""
        t = time.perf_counter()
        self._epoch = set_conv_layout(self.decoder, self.opts.channels_last)
        self.decoder.set_region_fn(None)  # eager blocks unless this runner compiles them (_prepare)
        self._prepare()
        self.reset()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prepare_s = time.perf_counter() - t

    def _prepare(self) -> None:
        pass

    def reset(self) -> None:
        """A new stream (the first-frame variant rewrites every slot anyway; this keeps states tidy)."""
        self.state.reset()

    @torch.no_grad()
    def decode_frame(self, z: torch.Tensor, first: bool) -> torch.Tensor:
        """z [B, z_dim, 1, h, w] -> frames [B, 3, n, 16h, 16w] (n = 1 if ``first`` else 4)."""
        if self._epoch is None:
            raise RuntimeError(f"video decode runner {self.opts.label}: call prepare() first")
        if _LAYOUTS.get(self.decoder, (None, None))[1] != self._epoch:
            raise RuntimeError(f"video decode runner {self.opts.label}: the decoder's weights were re-laid out "
                               f"after prepare() (another runner changed --vae-channels-last); prepare again")
        if tuple(z.shape) != tuple(self.z.shape):
            raise ValueError(f"decode_frame: z {tuple(z.shape)} does not fit this runner's input "
                             f"{tuple(self.z.shape)} (made for batch, latent_h, latent_w of the profile)")
        self.z.copy_(z)
        return self._run(bool(first))

    def _run(self, first: bool) -> torch.Tensor:
        return self.decoder.decode_frame(self.z, self.state, first)

    def _fill_input(self, gen: torch.Generator) -> None:
        """Small random latents for warm-up (never warm up or capture on zeros)."""
        self.z.copy_(torch.randn(self.z.shape, generator=gen, device=self.device) * 0.5)

    def describe(self) -> dict:
        return {"vae_backend": self.opts.backend, "vae_channels_last": self.opts.channels_last,
                "label": self.opts.label, "dtype": str(self.dtype).removeprefix("torch."),
                "variants": ["first", "steady"], "prepare_s": self.prepare_s,
                "state_bytes": self.state.nbytes}


class CompiledRunner(VideoDecodeRunner):
    """Regional compilation: the decoder's repeated block (``decoder.region``: the residual block of the full
    decoder, the MemBlock of the tiny one) compiled once, fullgraph, and run by every block of that shape;
    the rest of the frame stays eager (inside a CUDA graph with ``compiled-cudagraph``). Both variants
    (first and steady frame) are compiled in ``prepare``."""

    name = "compiled"

    def _compile(self) -> None:
        self.compiler = RegionCompiler(self.decoder.region, inner=self.opts.compile_backend)
        self.decoder.set_region_fn(self.compiler.fn)
        self._fn = self.decoder.decode_frame
        gen = torch.Generator(device=self.device).manual_seed(4321)
        t = time.perf_counter()
        for first in (True, False):  # the first call of each variant compiles it
            self._fill_input(gen)
            self._call(first)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.compile_s = time.perf_counter() - t

    def _call(self, first: bool) -> torch.Tensor:
        with self.compiler.limits():
            return self._fn(self.z, self.state, first)

    def _prepare(self) -> None:
        self._compile()

    def _run(self, first: bool) -> torch.Tensor:
        return self._call(first)

    def describe(self) -> dict:
        d = super().describe()
        if self.opts.compiles:
            d.update(compile_backend=self.opts.compile_backend, compile_s=getattr(self, "compile_s", None),
                     **({"region": self.compiler.stats()} if hasattr(self, "compiler") else {}))
        return d


class CudaGraphRunner(CompiledRunner):
    """Both variants captured as CUDA graphs (steady first: it is the larger) into one private pool (they
    never run concurrently); warm-up, and a compile, run on a side stream before the capture."""

    name = "cudagraph"

    def __init__(self, *args, warmup_iters: int = 2, **kw):
        super().__init__(*args, **kw)
        check_vae_options(self.opts, self.device)
        self.warmup_iters = warmup_iters
        self._graphs: dict[bool, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _prepare(self) -> None:
        fn = self.decoder.decode_frame
        with torch.cuda.device(self.device):
            main = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):
                if self.opts.compiles:
                    self._compile()
                    fn = lambda z, state, first: self._call(first)  # noqa: E731 - self.z is z
                gen = torch.Generator(device=self.device).manual_seed(1234)
                for first in (False, True):
                    for _ in range(self.warmup_iters):
                        self._fill_input(gen)
                        fn(self.z, self.state, first)
            main.wait_stream(side)
            pool = torch.cuda.graph_pool_handle()
            for first in (False, True):
                g = torch.cuda.CUDAGraph()
                # thread_local: a decode thread of another stream may run CUDA calls meanwhile
                with torch.cuda.graph(g, pool=pool, capture_error_mode="thread_local"):
                    out = fn(self.z, self.state, first)
                self._graphs[first] = (g, out)

    def _run(self, first: bool) -> torch.Tensor:
        g, out = self._graphs[first]
        g.replay()
        return out


def make_video_runner(decoder, opts: VideoDecodeOptions | None, batch: int, latent_h: int,
                      latent_w: int) -> VideoDecodeRunner:
    """The runner ``opts`` names (not yet prepared: call ``prepare()`` on the decoder's device)."""
    opts = opts or VideoDecodeOptions()
    cls = (CudaGraphRunner if opts.uses_cuda_graph else CompiledRunner if opts.compiles else VideoDecodeRunner)
    return cls(decoder, opts, batch, latent_h, latent_w)
