"""The Ray driver of tests/test_serve_ray.py, in a process of its own: Ray leaves native threads in the process
that called ``ray.init`` after ``ray.shutdown``, and later tests of the same pytest process (the 20-session
RSS check) would see them. The test talks to it with one JSON line per request on stdin, and reads the lines
of stdout that start with ``MARK``:

    python -m tests.ray_driver '{"args": {...build_app args...}, "ray_init": {...}}'
    -> {"url": ..., "gcs": ...}            once Serve runs the application
    {"op": "kill", "replica": ID}    -> {"pid": ...}    SIGKILL that replica's process
    {"op": "running"}                -> {"running": N}  RUNNING replicas of a HEALTHY deployment
    {"op": "quit"}                   -> {"ok": true}    Serve and Ray shut down, then the process exits
"""

from __future__ import annotations

import json
import os
import signal
import sys


MARK = "ray-driver-reply "  # Ray itself prints to stdout too (e.g. "(raylet) A worker died ...")


def _reply(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def main() -> None:
    import ray
    from ray import serve

    from hallolive_rt.runtime.serve import ray as hray

    cfg = json.loads(sys.argv[1])
    url = hray.start(cfg["args"], port=0, ray_init=cfg["ray_init"])
    _reply({"url": url, "gcs": ray.get_runtime_context().gcs_address})
    try:
        for line in sys.stdin:
            req = json.loads(line)
            if req["op"] == "kill":  # Serve's actor name for the replica; its pid asked from inside it
                actor = ray.get_actor(f"SERVE_REPLICA::{hray.APP_NAME}#LiveReplica#{req['replica']}",
                                      namespace="serve")
                pid = ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)
                os.kill(pid, signal.SIGKILL)
                _reply({"pid": pid})
            elif req["op"] == "running":
                app = serve.status().applications.get(hray.APP_NAME)
                dep = app.deployments.get("LiveReplica") if app else None
                ok = dep is not None and dep.status == "HEALTHY"
                _reply({"running": dep.replica_states.get("RUNNING", 0) if ok else 0})
            elif req["op"] == "quit":
                break
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    _reply({"ok": True})


if __name__ == "__main__":
    main()
