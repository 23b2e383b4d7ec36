"""Shared test setup: markers that skip cleanly, deterministic seeds, the tiny profile."""

from __future__ import annotations

import pytest
import torch


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
    ``FAST_BUILD``: one AOTInductor compile (about a minute on 2 cores), shared by every test that needs a
    package (tests/test_export_aoti.py, tests/test_cli_artifacts.py)."""
    from hallolive_rt.export.aoti import FAST_BUILD
    from hallolive_rt.export.main import export_main
    from hallolive_rt.options import ModelSource

    out = tmp_path_factory.mktemp("aoti") / "art"
    export_main(ModelSource("tiny", random_weights=True), "aoti", None, out, submodels=("dit",), variants=("dit/a10_kv12",),
                device="cpu", aoti_configs=FAST_BUILD, log=lambda s: None)
    return out


def assert_close(actual, expected, *, rtol, atol, what=""):
    """torch.testing.assert_close with max/mean error in the message (habit 7 of STYLE.md)."""
    a, e = actual.detach().double(), expected.detach().double()
    err = (a - e).abs()
    msg = (f"{what}: max abs err {err.max().item():.3e}, mean abs err {err.mean().item():.3e}, "
           f"max |expected| {e.abs().max().item():.3e}")
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda _m: msg)
