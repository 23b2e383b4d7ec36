"""Scale-out on Ray Serve: N replicas (``LiveReplica``, one ``LiveServer`` each) serving the very app of
``hallolive-rt serve`` as their late-bound ASGI ingress; admission and lost replicas are handled in Ray's
proxy (``ray_proxy.py``). Entry points: ``build_app(args)`` (``serve run runtime/serve/ray_serve.yaml``),
``start`` and ``serve_ray_main`` (``serve --ray``)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import Callable

from ray import serve
from ray.serve.config import RequestRouterConfig

from hallolive_rt.errors import InputError
from hallolive_rt.options import FLAT_KEYS, from_flat, to_flat

from ..resolve import resolve_run
from .launch import TOKEN_ENV, check_bind, is_loopback, page_url
from .protocol import Limits
from .ray_proxy import PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH, ROUTER_PATH

__all__ = ["APP_NAME", "ADMISSION_HEADROOM", "LiveReplica", "ReplicaMetrics", "replica_devices", "replica_threads",
           "args_from_cli", "build_app", "check_resources", "start", "serve_ray_main", "PROXY_ENV"]

log = logging.getLogger("hallolive_rt.serve")

APP_NAME = "hallolive"
# requests a full replica still takes beyond its sessions: the busy answers (so that the client gets the
# busy event, not a hang in the proxy's queue), page loads and /health; they last milliseconds
ADMISSION_HEADROOM = 8
# Ray's bound on requests its proxy holds back; WebSockets beyond the headroom were measured to wait whatever
# it is (ray_proxy.py): they wait for a busy answer in flight, which takes milliseconds
MAX_QUEUED = 2 * ADMISSION_HEADROOM
PROXY_ENV = {PROXY_CALLBACK_ENV: PROXY_CALLBACK_PATH}  # the proxies inherit the controller's env_vars
TTFF_BOUNDS = [0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0]
BLOCK_BOUNDS = [0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2, 6.4]

_BUILD_KEYS = FLAT_KEYS - {"device", "vae_device"} | {"max_sessions"}  # devices: the replica's (Ray's GPUs)
_LIMIT_KEYS = {f.name for f in dataclasses.fields(Limits)}
_APP_KEYS = {"replicas", "gpus_per_replica", "cpus_per_replica", "torch_threads", "token", "allowed_origins",
             "allow_no_token", "graceful_shutdown_timeout_s"}


def replica_devices(gpus_per_replica: int) -> tuple[str, str | None]:
    """(DiT device, VAE device) inside a replica: Ray makes its own GPUs visible as cuda:0 (and cuda:1)."""
    if gpus_per_replica not in (0, 1, 2):
        raise InputError(f"--gpus-per-replica must be 0 (CPU), 1 (DiT and VAE on one GPU) or 2 (DiT on the "
                         f"first, VAE on the second), got {gpus_per_replica}")
    return {0: ("cpu", None), 1: ("cuda:0", None), 2: ("cuda:0", "cuda:1")}[gpus_per_replica]


def replica_threads(args: dict) -> int:
    """``torch_threads``, else the replica's CPUs (at least 1). Always set, never left to the environment: on
    CPU the numbers depend on it (reductions add in another order), so what compares against a replica sets it."""
    n = args.get("torch_threads")
    return _count("torch_threads", max(1, int(float(args.get("cpus_per_replica", 1.0)))) if n is None else n)


def _count(key: str, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise InputError(f"{key} must be an integer >= 1, got {v!r}")
    return v


class ReplicaMetrics:
    """A ``ServerObserver`` exporting a replica's numbers as Ray metrics (tagged with application, deployment
    and replica; ``ray_hallolive_*`` in Prometheus): TTFF and block time histograms, ``/health``'s p50/p95."""

    def __init__(self, server):
        from ray.serve import metrics

        self.server, self._lock = server, threading.Lock()
        self.active = metrics.Gauge("hallolive_active_sessions", description="sessions holding a slot")
        self.capacity = metrics.Gauge("hallolive_max_sessions", description="session slots of the replica")
        self.blocks = metrics.Counter("hallolive_blocks_served", description="blocks sent to clients")
        self.sessions_ended = metrics.Counter("hallolive_sessions_ended", description="sessions ended, by reason",
                                              tag_keys=("reason",))
        self.ttff = metrics.Histogram("hallolive_ttff_seconds", description="start message to first fragment",
                                      boundaries=TTFF_BOUNDS)
        self.block_time = metrics.Histogram("hallolive_block_seconds", description="time to make one block",
                                            boundaries=BLOCK_BOUNDS)
        self.quantiles = metrics.Gauge("hallolive_latency_quantile_seconds", description="p50 / p95 of the "
                                       "replica's recent TTFF and block times", tag_keys=("stat", "quantile"))
        self.capacity.set(server.max_sessions)
        self.active.set(server.active_sessions)

    def sessions(self, active: int) -> None:
        with self._lock:
            self.active.set(active)

    def first_block(self, ttff_s: float) -> None:
        with self._lock:
            self.ttff.observe(ttff_s)

    def block(self, block_s: float) -> None:
        st = self.server.stats()
        with self._lock:
            self.blocks.inc()
            self.block_time.observe(block_s)
            for stat in ("ttff_s", "block_s"):
                for q in ("p50", "p95"):
                    if st[stat][q] is not None:
                        self.quantiles.set(st[stat][q], tags={"stat": stat, "quantile": q})

    def ended(self, reason: str) -> None:
        with self._lock:
            self.sessions_ended.inc(tags={"reason": reason})


@serve.deployment(name="LiveReplica")
@serve.ingress()
class LiveReplica:
    """One replica: one LiveServer on this actor's GPU(s), served by ``create_app`` (late-bound ingress)."""

    async def __init__(self, build: dict, limits: Limits, token: str | None, allowed_origins: tuple[str, ...],
                       replicas: int, threads: int = 1):
        import torch

        from .launch import build_server

        torch.set_num_threads(threads)  # replica_threads: before anything runs

        rid = serve.get_replica_context().replica_id.unique_id  # the replica tag of Ray's metrics and logs
        # loading takes minutes at full size: off the replica's event loop, which answers Ray meanwhile
        model, dit, decoders = from_flat(build)
        self.server = await asyncio.to_thread(build_server, model=model, dit=dit, decoders=decoders,
                                              max_sessions=build.get("max_sessions", 1), limits=limits,
                                              replica_id=rid)
        self.server.replicas = replicas
        self.server.observer = ReplicaMetrics(self.server)
        self._token, self._origins = token, tuple(allowed_origins)
        log.info("replica %s ready: %s, %d session slot(s)", rid, self.server.info()["device"],
                 self.server.max_sessions)

    def __serve_build_asgi_app__(self):
        from .app import create_app

        return create_app(self.server, token=self._token, allowed_origins=self._origins)


def args_from_cli(*, model, dit, decoders, max_sessions: int, gpus_per_replica: int | None, replicas: int,
                  limits: Limits, token: str | None, allowed_origins) -> dict:
    """``serve --ray``'s options as ``build_app`` arguments: Ray, not --device, chooses each replica's GPU."""
    device = model.device
    build = {k: v for k, v in to_flat(model, dit, decoders).items() if k not in ("device", "vae_device")}
    if model.vae_device is not None:
        raise InputError("with --ray the decoders' device follows --gpus-per-replica (2: the replica's second "
                         "GPU); drop --vae-device")
    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or index:
        raise InputError(f"with --ray, --device is cpu or cuda (Ray gives each replica its own GPUs), got {device!r}")
    gpus = gpus_per_replica if gpus_per_replica is not None else (0 if kind == "cpu" else 1)
    if (kind == "cpu") != (gpus == 0):
        raise InputError(f"--device {device} with --gpus-per-replica {gpus}: CPU replicas have 0 GPUs, "
                         f"CUDA replicas 1 or 2")
    return {**build, "max_sessions": max_sessions, **dataclasses.asdict(limits), "replicas": replicas,
            "gpus_per_replica": gpus, "token": token, "allowed_origins": tuple(allowed_origins)}


def build_app(args: dict):
    """``serve run``'s builder (``args``: the YAML's), checked before anything is deployed. A token (``token``,
    else $HALLOLIVE_TOKEN here) is required unless ``allow_no_token``: safe only if every proxy binds 127.0.0.1."""
    unknown = set(args) - _BUILD_KEYS - _LIMIT_KEYS - _APP_KEYS
    if unknown:
        raise InputError(f"unknown application argument(s) {sorted(unknown)}; known: "
                         f"{sorted(_BUILD_KEYS | _LIMIT_KEYS | _APP_KEYS)}")
    for key in ("replicas", "max_sessions"):
        _count(key, args.get(key, 1))
    gpus = args.get("gpus_per_replica", 1)
    dit_device, vae_device = replica_devices(gpus)
    build = {k: args[k] for k in _BUILD_KEYS if k in args}
    model, dit, decoders = from_flat(build)  # the checks that hold on any node, before anything is deployed
    resolve_run(model, dit, decoders, devices=False)
    build.update(device=dit_device, vae_device=vae_device)
    try:
        limits = Limits(**{k: args[k] for k in _LIMIT_KEYS if k in args})
    except TypeError as e:
        raise InputError(f"limits: {e}") from e
    token = args.get("token") or os.environ.get(TOKEN_ENV) or None
    if token is None and not args.get("allow_no_token", False):
        raise InputError(f"a Ray Serve proxy is usually reachable from other machines: give the application a "
                         f"token (args: token: ..., or set {TOKEN_ENV} where the application is built); clients "
                         f"then connect with ?token=... Only when every proxy binds 127.0.0.1, allow_no_token: true")
    if token is not None and len(token) < 8:
        raise InputError("token must have at least 8 characters")
    replicas, max_sessions = args.get("replicas", 1), args.get("max_sessions", 1)
    cpus = float(args.get("cpus_per_replica", 1.0))
    # a WebSocket is an ongoing request for its whole life (ray_proxy.py: why the headroom)
    return LiveReplica.options(
        num_replicas=replicas, max_ongoing_requests=max_sessions + ADMISSION_HEADROOM, max_queued_requests=MAX_QUEUED,
        request_router_config=RequestRouterConfig(request_router_class=ROUTER_PATH),
        ray_actor_options={"num_cpus": cpus, "num_gpus": gpus}, graceful_shutdown_wait_loop_s=0.5,
        graceful_shutdown_timeout_s=float(args.get("graceful_shutdown_timeout_s", 10.0)),
    ).bind(build, limits, token, tuple(args.get("allowed_origins", ())), replicas, replica_threads(args))


def check_resources(args: dict, have: dict) -> None:
    """Refuse a deployment that ``have`` (``ray.cluster_resources()`` of a Ray started here, which cannot
    grow) cannot place: Ray would otherwise wait for the missing GPUs / CPUs forever."""
    replicas, gpus = args.get("replicas", 1), args.get("gpus_per_replica", 1)
    cpus = float(args.get("cpus_per_replica", 1.0))
    for name, need in (("GPU", replicas * gpus), ("CPU", replicas * cpus)):
        if need > have.get(name, 0):
            raise InputError(f"{replicas} replica(s) need {need:g} {name}(s), this machine offers Ray "
                             f"{have.get(name, 0):g}: lower --replicas (or --gpus-per-replica), or join a larger "
                             f"cluster with --ray-address")


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start(args: dict, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
          ray_init: dict | None = None) -> str:
    """Build the application, start Ray unless connected (``address`` None: a new local instance; ``auto`` or
    ``ray://...``: a cluster) and Serve (its proxy on ``host:port``, with ``PROXY_ENV``), deploy; the page's URL."""
    import ray

    app = build_app(args)
    port = port or _free_port(host)
    if not ray.is_initialized():
        ray.init(address=address, **(ray_init or {}))
        if address is None:
            check_resources(args, ray.cluster_resources())
    serve.start(http_options={"host": host, "port": port}, controller_options={"runtime_env": {"env_vars": PROXY_ENV}})
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    return page_url(host, port)


def serve_ray_main(args: dict, *, host: str = "127.0.0.1", port: int = 8000, address: str | None = None,
                   on_ready: Callable[[str], None] | None = None) -> None:
    """``hallolive-rt serve --ray``: the bind rules of one process, then ``start``; serves until interrupted,
    then removes the application (and stops Ray if this process started it)."""
    import ray

    token = args.get("token")
    check_bind(host, token)
    try:
        url = start(dict(args, allow_no_token=is_loopback(host)), host=host, port=port, address=address)
        if on_ready is not None:
            on_ready(url + (f"#token={token}" if token else ""))
        while True:  # Ray's processes serve; this one only holds the deployment
            time.sleep(3600)
    finally:
        if ray.is_initialized():
            try:
                serve.delete(APP_NAME)
            finally:
                ray.shutdown()

