"""`hallolive-rt serve`: check the options and the bind, load the components once (``build_server``, which
a Ray Serve replica reuses), serve the app with uvicorn; every refusal is an ``InputError`` raised before
anything is loaded."""

from __future__ import annotations

import asyncio
import importlib.util
import ipaddress
import logging
import re
from collections.abc import Callable
from pathlib import Path

from hallolive_rt.cache_policy import ENDLESS
from hallolive_rt.errors import InputError
from hallolive_rt.options import DecoderOptions, DiTOptions, ModelSource, ServeOptions

from ..resolve import resolve_run
from .protocol import Limits
from .sessions import LiveServer

__all__ = ["SERVE_EXTRA_HINT", "RAY_EXTRA_HINT", "missing_serve_deps", "missing_ray_deps", "is_loopback",
           "check_bind", "build_server", "serve_main", "TOKEN_ENV"]

TOKEN_ENV = "HALLOLIVE_TOKEN"
SERVE_EXTRA_HINT = ("live sessions need the serve extra (FastAPI, uvicorn, websockets): "
                    "pip install -e '.[serve]'  (or pip install 'hallolive-rt[serve]')")
RAY_EXTRA_HINT = ("--ray needs the ray extra (Ray Serve and the serve extra): pip install -e '.[ray]'  "
                  "(or pip install 'hallolive-rt[ray]')")


def missing_serve_deps() -> list[str]:
    return [m for m in ("fastapi", "uvicorn", "websockets") if importlib.util.find_spec(m) is None]


def missing_ray_deps() -> list[str]:
    if importlib.util.find_spec("ray") is None:
        return ["ray"]
    return [] if importlib.util.find_spec("ray.serve") is not None else ["ray[serve]"]


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback bind without a token: anyone who reaches the port could drive the GPU."""
    if not is_loopback(host) and not token:
        raise InputError(f"--host {host} is reachable from other machines: pass --token SECRET (or set "
                         f"{TOKEN_ENV}); clients then connect with ?token=SECRET. Without --host the server "
                         f"binds 127.0.0.1 and needs no token")
    if token is not None and len(token) < 8:
        raise InputError("--token must have at least 8 characters")


def page_url(host: str, port: int, token: str | None = None) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"#token={token}" if token else "")


def build_server(*, model: ModelSource | None = None, dit: DiTOptions | None = None,
                 decoders: DecoderOptions | None = None, max_sessions: int = 1, limits: Limits | None = None,
                 replica_id: str | None = None) -> LiveServer:
    """Check the options (``resolve_run``, as ``stream`` does), then load every component once, the text
    encoder included (it stays resident: prompts arrive and switch at any time)."""
    from ..components import load_components

    if max_sessions < 1:
        raise InputError(f"--max-sessions must be >= 1, got {max_sessions}")
    model = model or ModelSource()
    run = resolve_run(model, dit or DiTOptions(), decoders or DecoderOptions(), blocks=ENDLESS)
    comps = load_components(run.profile, run.paths and Path(model.model_dir), dit_device=run.dit_device,
                            vae_device=run.vae_device, dtype=run.profile.dtype, seed=model.seed, ema=model.ema,
                            decoders=run.decoders)
    comps.dit.set_kv_impl(run.dit.kv_impl)  # builds the extension now (once), not inside the first session
    return LiveServer(comps, max_sessions=max_sessions, limits=limits, replica_id=replica_id, dit=run.dit,
                      decoders=run.decoders)


class _RedactToken(logging.Filter):
    """uvicorn logs request lines with their query string: keep ?token=... out of the logs."""

    _re = re.compile(r"(token=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args:
            record.args = tuple(self._re.sub(r"\1***", a) if isinstance(a, str) else a for a in record.args)
        return True


def serve_main(serving: ServeOptions | None = None, *, on_ready: Callable[[str], None] | None = None,
               **build) -> None:
    """Check the bind, build the server, serve until SIGTERM / SIGINT (every connection ended with
    ``server_shutdown`` + close 1001, back within 10 s: ``app.SHUTDOWN_S``). ``on_ready`` gets the page's URL."""
    serving = serving or ServeOptions()
    host, token = serving.host, serving.token
    build.setdefault("max_sessions", serving.max_sessions)
    check_bind(host, token)
    missing = missing_serve_deps()
    if missing:
        raise ImportError(f"{', '.join(missing)} not installed: {SERVE_EXTRA_HINT}")
    if serving.webrtc:
        from .webrtc import WEBRTC_EXTRA_HINT, webrtc_available

        if not webrtc_available():
            raise ImportError(f"--webrtc needs aiortc, which is not installed: {WEBRTC_EXTRA_HINT}")
    import uvicorn

    from .app import SHUTDOWN_S, create_app, leave_stuck_sessions, stop_on_signals

    server = build_server(**build)
    app = create_app(server, token=token, allowed_origins=serving.allowed_origins, webrtc=serving.webrtc,
                     ice_servers=serving.ice_servers)
    config = uvicorn.Config(app, host=host, port=serving.port, log_level=serving.log_level, lifespan="off",
                            ws_max_size=4 * server.limits.max_message_bytes, ws_per_message_deflate=False,
                            timeout_graceful_shutdown=SHUTDOWN_S["uvicorn"])
    for name in ("uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).addFilter(_RedactToken())
    userver = uvicorn.Server(config)

    async def run() -> None:
        stop_on_signals(userver, server, asyncio.get_running_loop())
        task = asyncio.create_task(userver.serve())
        while not userver.started and not task.done():
            await asyncio.sleep(0.05)
        if userver.started and on_ready is not None:
            on_ready(page_url(host, userver.servers[0].sockets[0].getsockname()[1], token))
        await task

    asyncio.run(run())
    leave_stuck_sessions(server)
