"""AOTInductor packages load and match eager (fp32, CPU). One DiT variant builds in the default run (the
session's ``tiny_aoti_dir``, which the CLI tests stream from too: ~25 s of compile on 2 cores); the DiT's
other variants + a 3-block replay through the aoti backend, and one package of each other sub-model checked
against its eager wrapper, are marked slow (each package is another ~25 s compile).

Tolerance: atol 1e-4 (observed ~1e-6); the in-place cache writes must land in the caller's tensors.
"""

from __future__ import annotations

import pytest
import torch

from hallolive_rt.export.aoti import FAST_BUILD, load_aoti
from hallolive_rt.export.contracts import contracts_for
from hallolive_rt.export.dit import dit_export_mode
from hallolive_rt.export.submodels import build_submodel, wrapper_for
from hallolive_rt.profile import load_profile
from tests.conftest import assert_close


def test_dit_variant_package_matches_eager_and_writes_caches(tiny_aoti_dir):
    """The first block's package (kv 12 rows), fed as if it were writing the second block's rows (slot 12)
    while attending rows 0-11 it did not write: cached rows are read, and the in-place writes land in the
    caller's tensors, at the slot, as the eager forward's do."""
    from hallolive_rt.export.manifest import load_artifacts

    p = load_profile("tiny")
    contract = contracts_for(p)["dit"]
    v = contract.variants[0]  # a10_kv12
    arts = load_artifacts(tiny_aoti_dir, p, "random:0", "cpu", fmt="aoti", submodels=("dit",))
    runner = load_aoti(arts.path("dit", v.name))
    dit = build_submodel("dit", p, None, 0, torch.float32, "cpu")
    with dit_export_mode(dit, float64_time=True):
        mod = wrapper_for("dit", dit, contract, v, functional=False)
        ins = v.sample_inputs(seed=2)
        for i in range(4, 12):
            ins[i] = torch.randn_like(ins[i])
        ins[12].fill_(12)  # video_slot: rows 12-23 are written, rows 0-11 (random "history") attended
        ins[13].fill_(2)  # frame0
        orig = [t.clone() for t in ins]
        mine = [t.clone() for t in ins]
        with torch.no_grad():
            ref = mod(*ins)
        got = runner(*mine)
    assert len(got) == 2
    for g, r in zip(got, ref):
        assert_close(g, r, atol=1e-4, rtol=1e-4)
    for i in range(4, 8):  # caches [L, B, slots, H, D] mutated in place, identically, at rows 12-23 only
        assert torch.equal(mine[i][:, :, :12], orig[i][:, :, :12]) and torch.equal(mine[i][:, :, 24:], orig[i][:, :, 24:])
        assert not torch.equal(mine[i][:, :, 12:24], orig[i][:, :, 12:24])
        assert_close(mine[i], ins[i], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_dit_export_completes_the_directory_and_the_backend_replays_three_blocks(tmp_path, tiny_aoti_dir):
    import shutil

    from hallolive_rt.export.main import export_main
    from hallolive_rt.options import ModelSource
    from hallolive_rt.runtime.backends.aoti import AotiBackend
    from hallolive_rt.sampler import TorchNoise
    from hallolive_rt.stream import BlockStream
    from tests.dit_fixtures import tiny_inputs

    p = load_profile("tiny")
    # the session's first-block package is up to date: the export completes the directory around it
    art = shutil.copytree(tiny_aoti_dir, tmp_path / "art")
    logged = []
    export_main(ModelSource("tiny", random_weights=True), "aoti", None, art, submodels=("dit",), device="cpu",
                aoti_configs=FAST_BUILD, log=logged.append)
    assert any("dit/a10_kv12" in line and "skipped (up to date)" in line for line in logged), logged
    dit = build_submodel("dit", p, None, 0, torch.float32, "cpu")
    nv, na, ctx = tiny_inputs(p, p.stream.blocks)
    fb, n = p.stream.latent_frames_per_block, p.stream.audio_tokens_per_block

    def run(backend):
        bs = BlockStream(dit, p)
        if backend is not None:
            backend.prepare(bs, list(bs.policy.plans()))
            bs.step_fn = backend.step
        outs = list(bs.run(ctx, lambda i: nv[:, i * fb:(i + 1) * fb], lambda i: na[:, i * n:(i + 1) * n], TorchNoise(3)))
        return torch.cat([o.video for o in outs], 1), torch.cat([o.audio for o in outs], 1)

    ref = run(None)
    got = run(AotiBackend(art, weights_id="random:0"))
    for g, r in zip(got, ref):
        assert_close(g, r, atol=2e-4, rtol=1e-4)


@pytest.mark.slow
def test_decoder_and_text_packages_match_eager(tmp_path):
    """One package per other sub-model: the video VAE's steady frame (its conv history rewritten in place,
    as the eager decoder rewrites it), the audio decoder's longest window, the text encoder."""
    from hallolive_rt.export.main import export_main
    from hallolive_rt.export.manifest import load_artifacts
    from hallolive_rt.options import ModelSource

    p = load_profile("tiny")
    contracts = contracts_for(p)
    chosen = {"vae_video": contracts["vae_video"].variants[1], "audio": contracts["audio"].variants[-1],
              "text": contracts["text"].variants[0]}
    assert chosen["vae_video"].static == {"first": False}
    export_main(ModelSource("tiny", random_weights=True), "aoti", None, tmp_path, submodels=tuple(chosen),
                variants=tuple(f"{s}/{v.name}" for s, v in chosen.items()), device="cpu", aoti_configs=FAST_BUILD,
                log=lambda s: None)
    arts = load_artifacts(tmp_path, p, "random:0", "cpu", fmt="aoti", submodels=tuple(chosen))
    for sub, v in chosen.items():
        what = f"{sub}/{v.name}"
        mod = wrapper_for(sub, build_submodel(sub, p, None, 0, torch.float32, "cpu"), contracts[sub], v,
                          functional=False)
        ins = v.sample_inputs(seed=4)
        orig, mine = [t.clone() for t in ins], [t.clone() for t in ins]
        with torch.no_grad():
            ref = mod(*ins)
        got = load_aoti(arts.path(sub, v.name))(*mine)
        got, ref = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (got, ref))  # one output: a bare tensor
        assert len(got) == len(ref) == len(v.inplace_outputs), what
        for g, r in zip(got, ref):
            assert_close(g, r, atol=1e-4, rtol=1e-4, what=what)
        for m, i, o in zip(mine, ins, orig):
            assert_close(m, i, atol=1e-4, rtol=1e-4, what=f"{what} inputs after the call")
        changed = [not torch.equal(i, o) for i, o in zip(ins, orig)]
        assert changed == [sub == "vae_video" and k > 0 for k in range(len(ins))], (what, changed)
