"""Shared test setup: markers that skip cleanly, deterministic seeds, the tiny profile, the cores shared
between pytest-xdist workers, one AOTInductor package for the whole run."""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config):
    """Under ``-n N`` each worker (and every process a test starts) gets its share of the cores, so that N
    workers never run more compute threads than the machine has."""
    workers = os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if workers:
        threads = max(1, (os.cpu_count() or 1) // int(workers))
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    has_cuda = torch.cuda.is_available()
    try:
        import tensorrt  # noqa: F401

        has_trt = True
    except ImportError:
        has_trt = False
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(reason="needs TensorRT (not installable in this workplace)")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip_cuda)
        if "trt" in item.keywords and not has_trt:
            item.add_marker(skip_trt)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_profile():
    from hallolive_rt.profile import load_profile

    return load_profile("tiny")


@pytest.fixture(scope="session")
def tiny_aoti_dir(tmp_path_factory):
    """What `hallolive-rt export --preset tiny --format aoti --submodels dit --out-dir DIR` writes, for the
    first block's DiT variant only (a10_kv12; the exporter's library-only ``variants`` filter) and with
    ``FAST_BUILD``: one AOTInductor compile (~25 s on 2 cores), shared by every test that needs a package
    (tests/test_export_aoti.py, tests/test_cli_artifacts.py). Under pytest-xdist the workers share one
    directory: the first builds it under a lock, the others find the package up to date. Read-only."""
    from filelock import FileLock

    from hallolive_rt.export.aoti import FAST_BUILD
    from hallolive_rt.export.main import export_main
    from hallolive_rt.options import ModelSource

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    out = root / "aoti-art"
    with FileLock(str(root / "aoti-art.lock")):
        export_main(ModelSource("tiny", random_weights=True), "aoti", None, out, submodels=("dit",),
                    variants=("dit/a10_kv12",), device="cpu", aoti_configs=FAST_BUILD, log=lambda s: None)
    return out


def assert_close(actual, expected, *, rtol, atol, what=""):
    """torch.testing.assert_close with max/mean error in the message (habit 7 of STYLE.md)."""
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs()
    msg = (f"{what}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}, "
           f"max |expected| {e.abs().max().item():.3e}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda _m: msg)
