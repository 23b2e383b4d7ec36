"""``--backend auto``: what it picks and why, and that its table holds the committed measurements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hallolive_rt.options import DiTOptions
from hallolive_rt.runtime.backends.auto import EVIDENCE, pick_backend

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def _dit_ms(result: dict, backend: str) -> float:
    return result["results"][backend]["stage_ms_median"]["dit"]


def test_the_table_holds_the_committed_numbers():
    by = {e.backend: e for e in EVIDENCE}
    stages = json.loads((RESULTS / "h100-c-stages.json").read_text())["dit"]
    assert by["cudagraph"].dit_ms == pytest.approx(_dit_ms(stages, "cudagraph"), abs=0.01)
    assert by["cudagraph"].baseline_ms == pytest.approx(_dit_ms(stages, "eager"), abs=0.01)
    correctness = json.loads((RESULTS / "h100-a-correctness.json").read_text())
    assert by["cudagraph"].within_bound is correctness["summary"]["cudagraph_vs_eager"]["within_bound"] is True
    compiled = json.loads((RESULTS / "h100-variants.json").read_text())["v-dit-compiled"]["dit"]
    assert by["compiled"].dit_ms == pytest.approx(_dit_ms(compiled, "compiled"), abs=0.01)
    assert by["compiled"].baseline_ms == pytest.approx(_dit_ms(compiled, "cudagraph"), abs=0.01)
    # no committed file holds a full-size deviation of compiled from eager: it must not be the default yet
    committed = [json.loads(f.read_text()) for f in RESULTS.glob("*correctness*.json")]
    assert not any("compiled_vs_eager" in c.get("summary", {}) for c in committed)
    assert by["compiled"].within_bound is None
    for e in EVIDENCE:
        assert all((RESULTS.parent.parent / s).is_file() for s in e.sources), e.sources


def test_cpu_picks_eager_and_says_why():
    c = pick_backend("cpu")
    assert c.name == "eager" and "cpu" in c.reason


def test_cuda_picks_the_fastest_backend_within_the_bound_and_names_what_it_passed_over():
    c = pick_backend(torch.device("cuda", 0))
    assert c.name == "cudagraph"
    assert "bit-identical" in c.reason and "h100-a-correctness.json" in c.reason
    assert "passed over: compiled" in c.reason and "not measured" in c.reason


def test_auto_is_the_default_and_the_session_describes_its_choice(tiny_profile):
    from hallolive_rt.runtime.components import load_components
    from hallolive_rt.runtime.session import StreamSession

    assert DiTOptions().backend == "auto"
    comps = load_components(tiny_profile, None, with_text=False)
    d = StreamSession(comps, tiny_profile, blocks=1).describe()
    assert d["backend"] == "eager" and d["backend_choice"]["asked"] == "auto"
    assert d["backend_choice"]["picked"] == "eager" and "cpu" in d["backend_choice"]["reason"]
    d = StreamSession(comps, tiny_profile, dit=DiTOptions(backend="eager"), blocks=1).describe()
    assert "backend_choice" not in d  # named, not chosen
