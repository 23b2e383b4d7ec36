"""Scale-out pieces that need no Ray cluster (a few seconds): the proxy middleware on scripted ASGI apps, the
application builder's checks and the deployment options it sets, the YAML example against Ray's own schema,
and the refusals of `serve --ray`. The cluster itself: tests/test_serve_ray.py."""

from __future__ import annotations

import asyncio
import importlib
import json
from pathlib import Path

import pytest

pytest.importorskip("av")  # live sessions mux with PyAV (absent on the GPU image: skip, not an error)
pytest.importorskip("ray.serve")  # the ray extra (in the test extra: CI runs these)
yaml = pytest.importorskip("yaml")

from typer.testing import CliRunner  # noqa: E402

from hallolive_rt.cli import app  # noqa: E402
from hallolive_rt.runtime.serve import launch  # noqa: E402
from hallolive_rt.runtime.serve import ray as hray  # noqa: E402
from hallolive_rt.runtime.serve.protocol import CLOSE_BUSY, CLOSE_INTERNAL, Limits  # noqa: E402
from hallolive_rt.runtime.serve.ray_proxy import (PROXY_CALLBACK_ENV, PROXY_CALLBACK_PATH, ROUTER_PATH,  # noqa: E402
                                                  LeastLoadedRouter, SessionGuard)
from hallolive_rt.errors import InputError  # noqa: E402
from hallolive_rt.options import DecoderOptions, DiTOptions, ModelSource  # noqa: E402

YAML = Path(__file__).resolve().parents[1] / "runtime" / "serve" / "ray_serve.yaml"


def _guard(inner, *, path="/ws", kind="websocket", client=()):
    """Run SessionGuard over ``inner``; ``client``: what the client sends. -> messages the client got."""
    got, incoming = [], list(client) or [{"type": "websocket.connect"}]

    async def receive():
        if incoming:
            return incoming.pop(0)
        await asyncio.sleep(3600)

    async def send(msg):
        got.append(msg)

    asyncio.run(SessionGuard(inner)({"type": kind, "path": path}, receive, send))
    return got


def _error(msg) -> dict:
    assert msg["type"] == "websocket.send", msg
    return json.loads(msg["text"])


def test_a_replica_lost_after_the_handshake_becomes_an_error_event_and_1011():
    async def inner(scope, receive, send):  # what Ray's proxy does when the replica dies mid-stream
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": "{}"})

    got = _guard(inner)
    assert [m["type"] for m in got] == ["websocket.accept", "websocket.send", "websocket.send", "websocket.close"]
    err = _error(got[2])
    assert err["type"] == "error" and err["code"] == "replica_lost" and err["fatal"] and err["v"] == 1
    assert got[3]["code"] == CLOSE_INTERNAL and got[3]["reason"] == "replica_lost"

    async def raising(scope, receive, send):
        await send({"type": "websocket.accept"})
        raise RuntimeError("actor died")

    got = _guard(raising)
    assert _error(got[1])["code"] == "replica_lost" and got[2]["code"] == CLOSE_INTERNAL


def test_a_proxy_http_error_before_the_handshake_becomes_unavailable():
    for status, close in ((503, CLOSE_BUSY), (429, CLOSE_BUSY), (500, CLOSE_INTERNAL)):
        async def inner(scope, receive, send, status=status):  # backpressure / no replica: an HTTP answer
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"Request dropped due to backpressure"})

        got = _guard(inner)
        assert [m["type"] for m in got] == ["websocket.accept", "websocket.send", "websocket.close"], got
        err = _error(got[1])
        assert err["code"] == "unavailable" and str(status) in err["message"] and got[2]["code"] == close


def test_what_the_replica_or_client_ended_passes_through():
    async def closes(scope, receive, send):
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000, "reason": "done"})

    assert [m["type"] for m in _guard(closes)] == ["websocket.accept", "websocket.close"]

    async def client_leaves(scope, receive, send):
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass

    got = _guard(client_leaves, client=[{"type": "websocket.connect"}, {"type": "websocket.disconnect", "code": 1001}])
    assert [m["type"] for m in got] == ["websocket.accept"]

    async def returns(scope, receive, send):
        await send({"type": "websocket.accept"})

    assert len(_guard(returns, path="/other")) == 1  # another application's socket: untouched
    got = _guard(lambda s, r, send: send({"type": "http.response.start", "status": 404}), kind="http", path="/ws")
    assert got == [{"type": "http.response.start", "status": 404}]


def test_router_and_middleware_are_named_by_working_import_paths():
    mod, _, name = ROUTER_PATH.rpartition(".")
    assert getattr(importlib.import_module(mod), name) is LeastLoadedRouter
    mod, _, name = PROXY_CALLBACK_PATH.rpartition(".")
    mws = getattr(importlib.import_module(mod), name)()
    assert [m.cls for m in mws] == [SessionGuard]
    assert hray.PROXY_ENV == {PROXY_CALLBACK_ENV: PROXY_CALLBACK_PATH}


def test_build_app_sets_admission_and_devices(monkeypatch):
    monkeypatch.delenv(launch.TOKEN_ENV, raising=False)
    with pytest.raises(InputError, match="token"):
        hray.build_app({"preset": "tiny", "gpus_per_replica": 0})
    d = hray.build_app({"preset": "tiny", "gpus_per_replica": 2, "replicas": 3, "max_sessions": 2,
                        "allow_no_token": True, "max_unacked_blocks": 2})._bound_deployment
    assert d.num_replicas == 3 and d.max_ongoing_requests == 2 + hray.ADMISSION_HEADROOM
    assert d.max_queued_requests == hray.MAX_QUEUED and d.ray_actor_options["num_gpus"] == 2
    assert d._deployment_config.request_router_config.request_router_class == ROUTER_PATH
    build, limits, token, origins, replicas, threads = d.init_args
    assert build == {"preset": "tiny", "max_sessions": 2, "device": "cuda:0", "vae_device": "cuda:1"}
    assert limits == Limits(max_unacked_blocks=2) and token is None and replicas == 3 and threads == 1
    monkeypatch.setenv(launch.TOKEN_ENV, "from-the-environment")
    assert hray.build_app({"preset": "tiny", "gpus_per_replica": 0})._bound_deployment.init_args[2] == \
        "from-the-environment"
    assert hray.build_app({"preset": "tiny", "gpus_per_replica": 0, "cpus_per_replica": 3})._bound_deployment \
        .init_args[5] == 3  # torch threads: the replica's CPUs
    assert hray.replica_devices(0) == ("cpu", None) and hray.replica_devices(1) == ("cuda:0", None)


@pytest.mark.parametrize("args,match", [
    ({"replica": 2}, "unknown application argument"),
    ({"replicas": 0}, "replicas must be"),
    ({"gpus_per_replica": 3}, "gpus-per-replica"),
    ({"preset": "nope"}, "unknown preset"),
    ({"preset": "hallolive-512x992"}, "needs weights"),
    ({"token": "short"}, "8 characters"),
])
def test_build_app_refusals(args, match):
    with pytest.raises(InputError, match=match):
        hray.build_app({"allow_no_token": True, "gpus_per_replica": 0, **args})


def test_cli_options_map_to_replica_devices():
    def args(device="cuda", vae_device=None, gpus_per_replica=None):
        return hray.args_from_cli(model=ModelSource(preset="tiny", device=device, vae_device=vae_device),
                                  dit=DiTOptions(), decoders=DecoderOptions(), max_sessions=1,
                                  gpus_per_replica=gpus_per_replica, replicas=2, limits=Limits(), token=None,
                                  allowed_origins=())

    a = args()
    assert a["gpus_per_replica"] == 1 and a["replicas"] == 2 and a["client_timeout_s"] == 30.0
    assert "device" not in a and a["preset"] == "tiny"  # Ray, not --device, picks a replica's GPU
    assert args(device="cpu")["gpus_per_replica"] == 0
    for kw, match in ((dict(device="cuda:1"), "cpu or cuda"), (dict(vae_device="cuda:1"), "--vae-device"),
                      (dict(device="cpu", gpus_per_replica=1), "CPU replicas")):
        with pytest.raises(InputError, match=match):
            args(**kw)


def test_replica_threads_are_set_from_the_replica_cpus_or_torch_threads():
    assert hray.replica_threads({}) == 1 and hray.replica_threads({"cpus_per_replica": 0.5}) == 1
    assert hray.replica_threads({"cpus_per_replica": 4}) == 4
    assert hray.replica_threads({"cpus_per_replica": 4, "torch_threads": 2}) == 2
    for bad in (0, 1.5, True, "2"):
        with pytest.raises(InputError, match="torch_threads"):
            hray.replica_threads({"torch_threads": bad})


def test_a_local_ray_that_cannot_place_the_replicas_is_refused():
    hray.check_resources({"replicas": 2, "gpus_per_replica": 0, "cpus_per_replica": 0.5}, {"CPU": 1.0})
    hray.check_resources({"replicas": 4, "gpus_per_replica": 2, "cpus_per_replica": 4}, {"CPU": 16.0, "GPU": 8.0})
    with pytest.raises(InputError, match="need 8 GPU"):
        hray.check_resources({"replicas": 8}, {"CPU": 64.0, "GPU": 4.0})
    with pytest.raises(InputError, match="need 3 CPU"):
        hray.check_resources({"replicas": 3, "gpus_per_replica": 0}, {"CPU": 2.0})


def test_the_yaml_example_is_a_valid_serve_config_whose_app_builds(monkeypatch):
    from ray.serve.schema import ServeDeploySchema

    cfg = ServeDeploySchema.model_validate(yaml.safe_load(YAML.read_text()))
    assert cfg.controller_options.runtime_env["env_vars"] == hray.PROXY_ENV
    (spec,) = cfg.applications
    mod, _, name = spec.import_path.partition(":")
    builder = getattr(importlib.import_module(mod), name)
    assert builder is hray.build_app and spec.route_prefix == "/"
    monkeypatch.setenv(launch.TOKEN_ENV, "yaml-example-token")
    d = builder(spec.args)._bound_deployment
    assert d.num_replicas == spec.args["replicas"] and d.ray_actor_options["num_gpus"] == 2
    assert d.init_args[0]["preset"] == "hallolive-512x992" and d.init_args[2] == "yaml-example-token"


def test_serve_ray_refusals(monkeypatch):
    monkeypatch.delenv(launch.TOKEN_ENV, raising=False)
    res = CliRunner().invoke(app, ["serve", "--replicas", "2"])
    assert res.exit_code == 2 and "go with --ray" in res.output
    monkeypatch.setattr(launch, "missing_ray_deps", lambda: ["ray"])
    res = CliRunner().invoke(app, ["serve", "--ray"])
    assert res.exit_code == 2 and "pip install -e '.[ray]'" in res.output
    monkeypatch.undo()
    monkeypatch.delenv(launch.TOKEN_ENV, raising=False)
    for argv, match in ((["--host", "0.0.0.0"], "--token"), (["--vae-device", "cpu"], "--vae-device"),
                        (["--preset", "nope"], "unknown preset"), (["--gpus-per-replica", "1"], "CPU replicas")):
        res = CliRunner().invoke(app, ["serve", "--ray", *argv])  # refused before Ray starts
        assert res.exit_code == 2 and match in res.output, res.output
