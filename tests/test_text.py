"""umT5 text encoder + tokenizers: formula vs an independent reference, library cross-check, zeroed rows,
truncation reporting, checkpoint layout and loading. CPU, tiny config, fp32 unless stated."""

from __future__ import annotations

import html
import math
from dataclasses import replace

import pytest
import torch

from hallolive_rt.options import ModelSource, OutputOptions
from hallolive_rt.model.text import (
    TextEncoder,
    UMT5Config,
    build_text_encoder,
    encode_prompt,
    load_text_encoder,
    relative_position_buckets,
    release_text_encoder,
)
from hallolive_rt.model.text_tokenizer import ByteTokenizer, PromptError, clean_prompt, load_tokenizer
from hallolive_rt.weights import CheckpointError
from tests.conftest import assert_close
from tests.dit_fixtures import KEYS_DIR

KEYS = KEYS_DIR / "umt5_xxl_enc.txt"
PROMPTS = ["A woman in a red coat says: hello there!", "rain   on\ta  tin roof"]


# ---- independent reference of Wan's T5Encoder (shared_pos=False), written from the formula --------------
def _ref_bucket(rel: int, num_buckets: int, max_dist: int) -> int:
    half = num_buckets // 2
    base = half if rel > 0 else 0
    d = abs(rel)
    exact = half // 2
    if d < exact:
        return base + d
    return base + min(half - 1, exact + int(math.log(d / exact) / math.log(max_dist / exact) * (half - exact)))


def _ref_rms(x, w, eps):
    y = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return w * (y.to(w.dtype) if w.dtype in (torch.float16, torch.bfloat16) else y)


def _ref_gelu(x):  # tanh approximation, spelled out as the release does
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def reference_encoder(sd: dict, cfg: UMT5Config, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    b, n = ids.shape
    h, c = cfg.num_heads, cfg.dim_attn // cfg.num_heads
    table = torch.tensor([_ref_bucket(r, cfg.num_buckets, cfg.max_dist) for r in range(-(n - 1), n)])
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]
    buckets = table[rel + n - 1]  # [Lq, Lk]
    x = sd["token_embedding.weight"][ids]
    for i in range(cfg.num_layers):
        p = lambda k: sd[f"blocks.{i}.{k}"]  # noqa: E731
        y = _ref_rms(x, p("norm1.weight"), cfg.eps)
        q = (y @ p("attn.q.weight").T).view(b, n, h, c)
        k = (y @ p("attn.k.weight").T).view(b, n, h, c)
        v = (y @ p("attn.v.weight").T).view(b, n, h, c)
        bias = x.new_zeros(b, h, n, n) + p("pos_embedding.embedding.weight")[buckets].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(x.dtype).min)
        logits = torch.einsum("binc,bjnc->bnij", q, k) + bias
        a = torch.softmax(logits.float(), dim=-1).type_as(logits)
        o = torch.einsum("bnij,bjnc->binc", a, v).reshape(b, n, h * c)
        x = x + o @ p("attn.o.weight").T
        y = _ref_rms(x, p("norm2.weight"), cfg.eps)
        g = _ref_gelu(y @ p("ffn.gate.0.weight").T)
        x = x + ((y @ p("ffn.fc1.weight").T) * g) @ p("ffn.fc2.weight").T
    x = _ref_rms(x, sd["norm.weight"], cfg.eps)
    for row, length in zip(x, mask.gt(0).sum(1)):  # the release's wrapper zeroes the padding rows
        row[int(length):] = 0.0
    return x


@pytest.fixture(scope="module")
def tiny():
    cfg = UMT5Config.tiny()
    enc = build_text_encoder(cfg, generator=torch.Generator().manual_seed(1))
    return cfg, enc


# ---- formula ----------------------------------------------------------------------------------------------
def test_buckets_known_values():
    b = relative_position_buckets(300, 32, 128)
    # key - query = 0, +1, -1, -7, -8 (first log bucket), -127 (last below max_dist), -128, +200
    assert [int(b[0, 0]), int(b[0, 1]), int(b[1, 0]), int(b[7, 0]), int(b[8, 0])] == [0, 17, 1, 7, 8]
    assert [int(b[127, 0]), int(b[128, 0]), int(b[0, 200])] == [15, 15, 31]
    ref = torch.tensor([[_ref_bucket(j - i, 32, 128) for j in range(300)] for i in range(0, 300, 37)])
    assert torch.equal(b[::37], ref)


def test_encoder_matches_reference_fp32(tiny):
    cfg, enc = tiny
    info = ByteTokenizer(cfg.text_len)(PROMPTS)
    got = enc(info.ids, info.mask)
    want = reference_encoder(enc.state_dict(), cfg, info.ids, info.mask)
    assert got.shape == (2, cfg.text_len, cfg.dim)
    assert_close(got, want, rtol=1e-5, atol=1e-5, what="tiny umT5 fp32 vs reference")


def test_encoder_matches_reference_bf16(tiny):
    """bf16, as the release runs: the fused tanh-GELU rounds once where the release rounds per op."""
    cfg, enc = tiny
    enc16 = build_text_encoder(cfg, dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    info = ByteTokenizer(cfg.text_len)(PROMPTS)
    got = enc16(info.ids, info.mask)
    want = reference_encoder(enc16.state_dict(), cfg, info.ids, info.mask)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), want.float(), rtol=0.05, atol=0.05, what="tiny umT5 bf16 vs reference")


def test_rows_past_prompt_are_zero(tiny):
    cfg, enc = tiny
    tok = load_tokenizer(None, text_len=cfg.text_len)
    ctx, info = encode_prompt(enc, tok, PROMPTS)
    assert ctx.shape == (2, cfg.text_len, cfg.dim) and ctx.dtype == torch.float32
    for i, n in enumerate(info.lengths):
        assert n == len(info.texts[i].encode()) + 1  # bytes + EOS
        assert torch.all(ctx[i, n:] == 0)
        assert torch.all(ctx[i, :n].abs().amax(-1) > 0)
    # padding does not leak into the prompt's rows: encoding a prompt alone gives the same rows
    alone, _ = encode_prompt(enc, tok, PROMPTS[1])
    assert_close(alone[0], ctx[1], rtol=1e-5, atol=1e-5, what="batch vs single prompt")


def test_matches_transformers_umt5(tiny):
    """Cross-check with the library implementation through a Wan -> HF key map (optional dependency)."""
    transformers = pytest.importorskip("transformers")
    cfg, enc = tiny
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab, d_model=cfg.dim, d_kv=cfg.head_dim, d_ff=cfg.dim_ffn, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_dist, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        layer_norm_epsilon=cfg.eps,
    )
    hf_cfg._attn_implementation = "eager"
    hf = transformers.UMT5EncoderModel(hf_cfg).eval()
    rename = {
        "norm1": "layer.0.layer_norm", "attn.q": "layer.0.SelfAttention.q", "attn.k": "layer.0.SelfAttention.k",
        "attn.v": "layer.0.SelfAttention.v", "attn.o": "layer.0.SelfAttention.o",
        "pos_embedding.embedding": "layer.0.SelfAttention.relative_attention_bias",
        "norm2": "layer.1.layer_norm", "ffn.gate.0": "layer.1.DenseReluDense.wi_0",
        "ffn.fc1": "layer.1.DenseReluDense.wi_1", "ffn.fc2": "layer.1.DenseReluDense.wo",
    }
    hf_sd = {}
    for k, v in enc.state_dict().items():
        if k == "token_embedding.weight":
            hf_sd["shared.weight"] = hf_sd["encoder.embed_tokens.weight"] = v
        elif k == "norm.weight":
            hf_sd["encoder.final_layer_norm.weight"] = v
        else:
            _, i, rest = k.split(".", 2)
            stem = rest.rsplit(".", 1)[0]
            hf_sd[f"encoder.block.{i}.{rename[stem]}.weight"] = v
    hf.load_state_dict(hf_sd, strict=True)
    info = ByteTokenizer(cfg.text_len)(PROMPTS)
    with torch.no_grad():
        out = hf(input_ids=info.ids, attention_mask=info.mask).last_hidden_state
    out = out * info.mask[..., None]
    assert_close(enc(info.ids, info.mask), out, rtol=1e-5, atol=1e-5, what="ours vs transformers UMT5EncoderModel")


def test_export_has_static_shapes(tiny):
    """No data-dependent shape or host sync in forward: torch.export traces it as one graph."""
    cfg, enc = tiny
    info = ByteTokenizer(cfg.text_len)(PROMPTS)
    ep = torch.export.export(enc, (info.ids, info.mask), strict=False)
    assert_close(ep.module()(info.ids, info.mask), enc(info.ids, info.mask), rtol=0, atol=0, what="exported")


# ---- tokenizers --------------------------------------------------------------------------------------------
def test_byte_tokenizer_truncation_is_reported():
    tok = ByteTokenizer(16)
    text = "abcdefghijklmnopqrstuvwxyz"
    info = tok([text, "short"])
    assert info.ids.shape == (2, 16) and info.lengths == (16, 6)
    assert info.dropped == (26 - 15, 0) and info.dropped_text == (text[15:], "")
    assert int(info.ids[0, 15]) == ByteTokenizer.EOS and tok.decode(info.ids[0].tolist()) == text[:15]
    assert info.truncated and len(info.truncation_messages()) == 1
    assert "11 token(s)" in info.truncation_messages()[0] and "pqrstuvwxyz" in info.truncation_messages()[0]
    assert not tok("short").truncated


@pytest.mark.parametrize("bad", ["", "   \n\t ", "&nbsp;"])
def test_empty_prompt_is_rejected(tiny, bad):
    cfg, enc = tiny
    with pytest.raises(PromptError, match="prompt 1 is empty"):
        encode_prompt(enc, ByteTokenizer(cfg.text_len), ["fine", bad])


def test_cleaning_matches_release_whitespace_rule():
    regex = pytest.importorskip("regex")
    s = " a\u3000b\x1cc\xa0\xa0d\t\ne &amp;amp; f "
    want = regex.sub(r"\s+", " ", html.unescape(html.unescape(s)).strip()).strip()
    assert clean_prompt(s, fix_text=False) == want == "a b\x1cc d e & f"


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A tiny T5-style (unigram, EOS appended) tokenizer saved the way the official files are read."""
    transformers = pytest.importorskip("transformers")
    words = ["a", "cat", "dog", "sits", "on", "the", "mat", "."] + list("abcdefghijklmnopqrstuvwxyz")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0 - 0.01 * i) for i, w in enumerate(words)]  # word-initial pieces
    vocab += [(w, -5.0 - 0.01 * i) for i, w in enumerate(words)]
    d = tmp_path_factory.mktemp("umt5_tok")
    transformers.T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(str(d))
    return d


def test_umt5_tokenizer_matches_release_call_and_reports_truncation(hf_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("ftfy")
    tok = load_tokenizer(hf_tokenizer_dir, text_len=8)
    prompts = ["a  cat\tsits on the mat.", "dog", "the cat sits on the mat the dog sits"]
    info = tok(prompts)
    direct = transformers.AutoTokenizer.from_pretrained(str(hf_tokenizer_dir), local_files_only=True)(
        [" ".join(p.split()) for p in prompts], padding="max_length", truncation=True, max_length=8,
        add_special_tokens=True, return_tensors="pt")
    assert torch.equal(info.ids, direct.input_ids) and torch.equal(info.mask, direct.attention_mask)
    assert info.lengths == (8, 2, 8) and info.dropped == (0, 0, 2)
    assert info.dropped_text[2] == "dog sits" and int(info.ids[2, 7]) == 1  # EOS kept last
    with pytest.raises(PromptError, match="empty"):
        tok(["  "])


def test_missing_tokenizer_dir_is_explained(tmp_path, monkeypatch):
    from hallolive_rt.model import text_tokenizer

    monkeypatch.setattr(text_tokenizer, "require_text_extra", lambda: None)  # as if the `text` extra were there
    with pytest.raises(PromptError, match="google/umt5-xxl"):
        load_tokenizer(tmp_path / "nope")


@pytest.mark.parametrize("module", ["transformers", "ftfy"])
def test_missing_text_extra_is_named_first_with_the_install_command(tmp_path, monkeypatch, module):
    """A --model-dir run needs the `text` extra before anything else: the message says how to get it."""
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # `import <module>` now raises ImportError
    for where in (tmp_path / "nope", tmp_path):  # the extra is reported before the folder is looked at
        with pytest.raises(PromptError) as e:
            load_tokenizer(where)
        msg = str(e.value)
        assert "pip install -e '.[text]'" in msg and "--model-dir" in msg
        assert module in msg.split("missing: ")[1].split(")")[0]


def test_model_dir_run_asks_for_the_text_extra_before_the_files(tmp_path, monkeypatch):
    import sys

    from hallolive_rt.errors import InputError
    from hallolive_rt.runtime.stream_run import stream_main

    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(InputError, match=r"pip install -e '\.\[text\]'") as e:
        stream_main("hello", model=ModelSource(preset="hallolive-512x992", model_dir=str(tmp_path)), outputs=OutputOptions(out=str(tmp_path / "x.mp4")), progress=False)
    assert "model files missing" not in str(e.value) and not (tmp_path / "x.mp4").exists()


# ---- config, checkpoint layout, loading --------------------------------------------------------------------
def test_configs_match_profiles(tiny_profile):
    from hallolive_rt.profile import load_profile

    full = load_profile("hallolive-512x992")
    assert (UMT5Config().dim, UMT5Config().text_len) == (full.text.text_dim, full.text.text_len)
    tiny = UMT5Config.tiny()
    assert (tiny.dim, tiny.text_len) == (tiny_profile.text.text_dim, tiny_profile.text.text_len)
    assert UMT5Config.tiny().vocab == ByteTokenizer.VOCAB_SIZE


@pytest.mark.skipif(not KEYS.is_file(), reason="shared/ key lists not present (set HALLOLIVE_KEYS_DIR)")
def test_meta_state_dict_matches_release_key_list():
    lines = [ln for ln in KEYS.read_text().splitlines() if ln and not ln.startswith("#")]
    want = {}
    for ln in lines:
        name, shape, _ = ln.split("\t")
        want[name] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    with torch.device("meta"):
        enc = TextEncoder(UMT5Config())
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == want
    assert len(got) == 242 and sum(math.prod(s) for s in got.values()) == 5_680_910_336


def test_load_round_trip_and_release(tiny, tmp_path):
    cfg, enc = tiny
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    sd16 = {k: v.to(torch.bfloat16) for k, v in enc.state_dict().items()}  # stored like the release file
    torch.save(sd16, path)
    loaded = load_text_encoder(path, cfg, dtype=torch.float32)
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, sd16[k].float()), k
    info = ByteTokenizer(cfg.text_len)(PROMPTS)
    want = reference_encoder({k: v.float() for k, v in sd16.items()}, cfg, info.ids, info.mask)
    assert_close(loaded(info.ids, info.mask), want, rtol=1e-5, atol=1e-5, what="loaded vs reference")
    release_text_encoder(loaded)
    assert all(p.is_meta for p in loaded.parameters())


def test_wrong_keys_fail_with_names(tiny, tmp_path):
    cfg, enc = tiny
    sd = dict(enc.state_dict())
    sd["blocks.1.ffn.gate.weight"] = sd.pop("blocks.1.ffn.gate.0.weight")
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as e:
        load_text_encoder(path, cfg, dtype=torch.float32)
    msg = str(e.value)
    assert str(path) in msg and "'blocks.1.ffn.gate.0.weight'" in msg and "'blocks.1.ffn.gate.weight'" in msg
    ok = tmp_path / "ok.pth"
    torch.save(enc.state_dict(), ok)
    with pytest.raises(CheckpointError, match="shape mismatches"):
        load_text_encoder(ok, replace(cfg, dim_ffn=128), dtype=torch.float32)


def test_tokenizer_encoder_mismatch_is_refused(tiny):
    cfg, enc = tiny
    small = build_text_encoder(replace(cfg, vocab=100))
    with pytest.raises(ValueError, match="do not belong together"):
        encode_prompt(small, ByteTokenizer(cfg.text_len), "\u00e9t\u00e9")


@pytest.mark.cuda
def test_release_frees_gpu_memory(tiny):
    cfg, _ = tiny
    enc = build_text_encoder(cfg, device="cuda", dtype=torch.bfloat16, generator=torch.Generator().manual_seed(1))
    ctx, _ = encode_prompt(enc, ByteTokenizer(cfg.text_len), PROMPTS)
    before = torch.cuda.memory_allocated()
    weights = sum(p.numel() * p.element_size() for p in enc.parameters())
    release_text_encoder(enc)
    assert before - torch.cuda.memory_allocated() >= weights
    assert ctx.is_cuda and ctx.dtype == torch.bfloat16 and torch.isfinite(ctx).all()
