"""Scale-out on Ray Serve with a real local Ray instance on CPU: one cluster for the whole module (starting Ray
and two replicas is most of the cost), two replicas of the tiny preset with one session slot each, sessions of
1-2 blocks. Two concurrent sessions land on different replicas and send the bytes of the single-process server
(same seeds), a third gets `busy`; health and Prometheus metrics per replica; a replica killed mid-stream ends
its session with `replica_lost` + 1011 while the other finishes, and Ray's replacement serves new sessions.
Ray's driver is a process of its own (tests/ray_driver.py); Ray is stopped in the fixture's finalizer and its
processes checked gone. 35-70 s on 2 cores, depending on the load."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("av")
pytest.importorskip("ray.serve")  # the ray extra (in the test extra: CI runs this module)

import torch  # noqa: E402

from hallolive_rt.runtime.serve import ray as hray  # noqa: E402
from hallolive_rt.runtime.serve.protocol import CLOSE_BUSY, CLOSE_INTERNAL, CLOSE_NORMAL  # noqa: E402
from tests.ray_driver import MARK  # noqa: E402
from tests.serve_helpers import (tiny_live, Client, decode_mp4, full_session, run_concurrently, running_server,  # noqa: E402
                                 session)

pytestmark = pytest.mark.slow  # > 30 s; CI's `pytest -q -n 2` still runs it

PROMPT = "A man in a grey coat says: <S>good evening<E>"
ROOT = Path(__file__).resolve().parents[1]
ARGS = dict(preset="tiny", kv_impl="torch", seed=0, replicas=2, max_sessions=1, gpus_per_replica=0,
            cpus_per_replica=0.5, allow_no_token=True, graceful_shutdown_timeout_s=2.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_pids(gcs_address: str) -> list[int]:
    """Processes of this Ray instance: every one of them names its GCS address on its command line."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and gcs_address.encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


class Driver:
    """tests/ray_driver.py in a process of its own (Ray's threads stay out of this one): one JSON line per
    request."""

    def __init__(self, cfg: dict, log):
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.ray_driver", json.dumps(cfg)], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
        self.info = self._read()

    def _read(self) -> dict:
        while True:  # Ray prints on the driver's stdout too: the replies are the marked lines
            line = self.proc.stdout.readline()
            assert line, f"the Ray driver ended (exit {self.proc.poll()}); its log is in the fixture's tmp dir"
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Ray on this machine (2 CPUs, no dashboard, a small object store), Serve on a free port, the app; all in
    tests/ray_driver.py's process, stopped in the finalizer, and every process of that Ray checked gone."""
    metrics_port = _free_port()
    env = {"RAY_metrics_report_interval_ms": "1000", "RAY_USAGE_STATS_ENABLED": "0"}  # read by Ray's processes
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    log_path = tmp_path_factory.mktemp("ray") / "driver.log"
    driver = None
    try:
        with open(log_path, "w") as log:
            driver = Driver({"args": ARGS, "ray_init": dict(num_cpus=2, include_dashboard=False, log_to_driver=False,
                                                           object_store_memory=96 * 2**20,
                                                           _metrics_export_port=metrics_port)}, log)
        url = driver.info["url"]
        yield {"addr": url.split("//")[1].rstrip("/"), "url": url, "metrics_port": metrics_port, "driver": driver}
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        if driver is not None:
            gcs = driver.info.get("gcs")
            if driver.proc.poll() is None:
                try:
                    driver.ask(op="quit")
                    driver.proc.wait(60)
                except (AssertionError, OSError, subprocess.TimeoutExpired, ValueError):
                    driver.proc.kill()
            if gcs is not None:  # no raylet, GCS, worker or proxy outlives the module
                deadline = time.monotonic() + 20
                while _cluster_pids(gcs) and time.monotonic() < deadline:
                    time.sleep(0.2)
                left = _cluster_pids(gcs)
                for pid in left:
                    os.kill(pid, signal.SIGKILL)
                assert not left, f"Ray processes left after ray.shutdown(): {left}"


@pytest.fixture(scope="module")
def reference():
    """The single-process server (`hallolive-rt serve`'s app in this process), same weights seed, on as many
    torch threads as a replica (``replica_threads``, whatever OMP_NUM_THREADS says): the bytes of 2-block
    sessions with noise seeds 0 and 1."""
    threads = torch.get_num_threads()
    torch.set_num_threads(hray.replica_threads(ARGS))
    try:
        live = tiny_live()
        with running_server(live) as addr:
            return {seed: full_session(addr, prompt=PROMPT, seed=seed, blocks=2).stream_bytes() for seed in (0, 1)}
    finally:
        torch.set_num_threads(threads)


def test_sessions_spread_over_replicas_third_is_busy_same_bytes_as_one_process(cluster, reference):
    addr = cluster["addr"]
    a, b = Client(addr), Client(addr)
    ha, hb = a.until("hello"), b.until("hello")  # each connection holds a slot from here
    assert ha["replicas"] == hb["replicas"] == 2 and ha["replica"] != hb["replica"]  # the least-loaded router
    c = Client(addr)
    busy = c.until("busy")
    assert busy["active_sessions"] == busy["max_sessions"] == 1 and busy["replicas"] == 2
    assert busy["replica"] in (ha["replica"], hb["replica"]) and "each of the 2 replicas" in busy["message"]
    assert c.recv() is None and c.close_code == CLOSE_BUSY
    a.send(type="start", prompt=PROMPT, seed=0, blocks=2)
    b.send(type="start", prompt=PROMPT, seed=1, blocks=2)
    run_concurrently([a, b])
    for client, hello, seed in ((a, ha, 0), (b, hb, 1)):
        assert client.close_code == CLOSE_NORMAL, client.types()[-4:]
        started = next(e for e in client.events if e["type"] == "started")
        assert started["replica"] == hello["replica"] and started["session"].startswith(hello["replica"])
        assert [e["index"] for e in client.events if e["type"] == "block"] == [0, 1]
        got = client.stream_bytes()
        assert got == reference[seed], (seed, len(got), len(reference[seed]))  # byte for byte
        (fg, ag), (fr, ar) = decode_mp4(got), decode_mp4(reference[seed])
        assert fg.shape == fr.shape and np.array_equal(fg, fr) and np.array_equal(ag, ar)
    assert a.stream_bytes() != b.stream_bytes()  # two seeds, two streams


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()


def _samples(text: str, name: str) -> dict[str, float]:
    """{replica: value} of the Prometheus samples of ``name`` (Ray prefixes ray_, counters may end _total)."""
    out = {}
    for m in re.finditer(rf"^ray_{name}(?:_total)?{{([^}}]*)}} (\S+)$", text, re.M):
        replica = re.search(r'replica="([^"]+)"', m.group(1))
        if replica:
            out[replica.group(1)] = out.get(replica.group(1), 0.0) + float(m.group(2))
    return out


def test_health_and_prometheus_metrics_per_replica(cluster):
    seen = set()
    for _ in range(6):  # /health answers from the replica the router picks: each reports itself
        h = json.loads(urllib.request.urlopen(cluster["url"] + "health", timeout=10).read())
        assert h["status"] == "ok" and h["replicas"] == 2 and h["active_sessions"] == 0
        assert h["blocks_served"] == 2 and h["ttff_s"]["n"] == 1 and h["block_s"]["p95"] > 0
        seen.add(h["replica"])
    deadline, text = time.monotonic() + 60, ""
    while time.monotonic() < deadline:  # Ray's metrics agent exports every second here (10 s by default)
        text = _scrape(cluster["metrics_port"])
        blocks = _samples(text, "hallolive_blocks_served")
        if len(blocks) == 2 and all(v >= 2 for v in blocks.values()):
            break
        time.sleep(1)
    else:
        raise AssertionError(f"no per-replica block counts in the scrape: {_samples(text, 'hallolive_blocks_served')}")
    assert seen <= set(blocks) and all(v == 2 for v in blocks.values())
    assert set(_samples(text, "hallolive_ttff_seconds_count")) == set(blocks)
    assert all(v == 2 for v in _samples(text, "hallolive_block_seconds_count").values())
    assert all(v == 1 for v in _samples(text, "hallolive_max_sessions").values())
    assert len(_samples(text, "hallolive_latency_quantile_seconds")) == 2


def test_a_replica_killed_mid_stream_ends_only_its_session_and_ray_replaces_it(cluster):
    addr = cluster["addr"]
    a = session(addr, prompt=PROMPT, seed=2, blocks=None)  # endless, both
    b = session(addr, prompt="A woman laughs and says: <S>of course<E>", seed=3, blocks=None)
    ra, rb = a.until("started")["replica"], b.until("started")["replica"]
    assert ra != rb
    a.until("block")
    at_kill = b.until("block")["index"]
    cluster["driver"].ask(op="kill", replica=ra)
    while a.recv() is not None:
        pass
    assert a.events[-1]["type"] == "error" and a.events[-1]["code"] == "replica_lost" and a.events[-1]["fatal"]
    assert a.close_code == CLOSE_INTERNAL and "end" not in a.types()

    def stop_after_one_more(c, ev):  # the other session keeps streaming, then ends as asked
        if ev["index"] > at_kill and "stop" not in c.__dict__:
            c.stop = True
            c.send(type="stop")

    b.run(on_block=stop_after_one_more)
    assert b.close_code == CLOSE_NORMAL and b.events[-1]["type"] == "end" and b.events[-1]["reason"] == "stopped"
    indices = [e["index"] for e in b.events if e["type"] == "block"]
    assert indices == list(range(len(indices))) and indices[-1] > at_kill
    assert not [e for e in b.events if e["type"] == "error"]

    deadline = time.monotonic() + 180
    while True:  # until Ray's replacement runs, the survivor takes one connection and a second one gets busy
        c, d = Client(addr), Client(addr)
        rc, hd = c.until("hello")["replica"], d.recv()
        if hd["type"] == "hello":
            break
        assert hd["type"] == "busy" and d.recv() is None and d.close_code == CLOSE_BUSY
        c.close()
        assert time.monotonic() < deadline, "Ray did not replace the killed replica"
        time.sleep(1)
    rd = hd["replica"]
    assert cluster["driver"].ask(op="running")["running"] == 2
    for x, seed in ((c, 4), (d, 5)):
        x.send(type="start", prompt=PROMPT, seed=seed, blocks=1)
    run_concurrently([c, d])
    assert c.close_code == d.close_code == CLOSE_NORMAL and c.events[-1]["reason"] == d.events[-1]["reason"] == "done"
    assert {rc, rd} - {rb} and ra not in (rc, rd)  # one of them is the replacement, a new replica
