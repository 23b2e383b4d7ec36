"""FLOPs per block and stage at a profile's shapes: counted once on CPU, committed, looked up at bench time.

    python -m hallolive_rt.runtime.flops --preset hallolive-512x992     # -> runtime/flops/<preset>.json

Counting uses ``torch.utils.flop_counter`` on the meta device (the real architecture, no weights, no
compute): 33.4 -> 48.8 TFLOP per DiT forward and 37.4 TFLOP per latent frame of the video VAE at 512x992
(docs/FACTS.md section 7). That takes ~30 s of CPU for the full-size preset, which a GPU session should not
spend, so the counts of every static shape of the profile's own stream (and of each shorter stream) are
committed in ``runtime/flops/<preset>.json``, keyed by a digest of everything they depend on (the profile's
shapes except the block count and dtype, the DiT and decoder configs, the counting method). ``FlopCounts``
reads that file; a shape missing from it, or a file whose key does not match, is counted on the meta
device instead, with a message naming the command that refreshes the file (``source`` says which happened;
tests/test_flops.py fails while a committed file is stale).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from functools import lru_cache
from pathlib import Path

import torch

from hallolive_rt.profile import Profile, load_profile

__all__ = ["FlopCounts", "count_flops", "flops_key", "table_path", "write_table", "METHOD"]

METHOD = "torch.utils.flop_counter.FlopCounterMode on the meta device (v1)"
FLOPS_DIR = Path(__file__).resolve().parent / "flops"


def table_path(profile: Profile) -> Path:
    return FLOPS_DIR / f"{profile.name}.json"


def flops_key(profile: Profile) -> str:
    """Digest of what the counts depend on: shapes (not blocks or dtype), DiT + decoder configs, method."""
    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.release import decoder_configs

    shapes = profile.to_dict()
    shapes["stream"].pop("blocks")
    for k in ("dtype_name", "description"):
        shapes.pop(k)
    blob = json.dumps({"shapes": shapes, "dit": repr(load_fusion_config(profile.video_config, profile.audio_config)),
                       "decoders": repr(decoder_configs(profile)[:3]), "method": METHOD}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- counting on the meta device --------------------------------------------------------------------

def _count(run) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        run()
    return int(fc.get_total_flops())


@lru_cache(maxsize=None)
def _dit_forward_flops(profile: Profile, audio_len: int, kv_len: int, context: bool = False) -> int:
    from hallolive_rt.config import load_fusion_config
    from hallolive_rt.model.dit import DualStreamDiT
    from hallolive_rt.state import CacheLayout, DiTState
    from hallolive_rt.stream import Cursor

    cfg = load_fusion_config(profile.video_config, profile.audio_config)
    with torch.device("meta"):
        dit = DualStreamDiT(cfg).to(profile.dtype)
    dit.reset_rope()
    st = DiTState.allocate(cfg, profile, CacheLayout(slots=kv_len), device="meta", dtype=profile.dtype)
    s, v = profile.stream, profile.video
    cur = Cursor("meta")
    xv = torch.empty(s.batch, s.latent_frames_per_block, v.latent_channels, v.latent_height, v.latent_width,
                     device="meta", dtype=profile.dtype)
    xa = torch.empty(s.batch, audio_len, profile.audio.latent_channels, device="meta", dtype=profile.dtype)
    vt = torch.empty(s.batch, s.latent_frames_per_block, device="meta")
    at = torch.empty(s.batch, audio_len, device="meta")
    return _count(lambda: dit(xv, xa, vt, at, st, cur.positions(s.latent_frames_per_block, audio_len), kv_len,
                              context=context))


@lru_cache(maxsize=None)
def _vae_frame_flops(profile: Profile, first: bool) -> int:
    from hallolive_rt.model.vae_video import build_video_decoder
    from hallolive_rt.release import decoder_configs

    vd = build_video_decoder(decoder_configs(profile)[0], device="meta")
    v = profile.video
    st = vd.new_state(1, v.latent_height, v.latent_width, dtype=torch.float32, device="meta")
    z = torch.empty(1, v.latent_channels, 1, v.latent_height, v.latent_width, device="meta")
    return _count(lambda: vd.decode_frame(z, st, first))


@lru_cache(maxsize=None)
def _audio_window_flops(profile: Profile, tokens: int) -> int:
    from hallolive_rt.model.vae_audio import AudioVAEDecoder
    from hallolive_rt.model.vocoder import BigVGANVocoder
    from hallolive_rt.release import decoder_configs

    _, acfg, gcfg, _ = decoder_configs(profile)
    with torch.device("meta"):
        vae, voc = AudioVAEDecoder(acfg), BigVGANVocoder(gcfg)
    z = torch.empty(1, acfg.embed_dim, tokens, device="meta")
    return _count(lambda: voc(vae(z)))


def audio_window_tokens(profile: Profile, index: int) -> int:
    """Tokens the streamed audio decode of block ``index`` runs on: left context + block + lookahead."""
    s, left = profile.stream, profile.audio.stream_left_context
    return min(index * s.audio_tokens_per_block, left) + s.audio_tokens_per_block + s.future_audio_tokens


# ---- the lookup ----------------------------------------------------------------------------------------

def _load_table(profile: Profile) -> tuple[dict | None, str]:
    path = table_path(profile)
    cmd = f"python -m hallolive_rt.runtime.flops --preset {profile.name}"
    if not path.is_file():
        return None, f"no committed table ({path.name}); counted on the meta device (`{cmd}` writes one)"
    table = json.loads(path.read_text())
    key = flops_key(profile)
    if table.get("key") != key:
        print(f"hallolive_rt: {path} was counted for other shapes/configs (key {table.get('key')} != {key}): "
              f"counting on the meta device instead (~30 s at full size); refresh it with `{cmd}`",
              file=sys.stderr, flush=True)
        return None, f"stale table {path.name} (key mismatch); counted on the meta device"
    return table, f"committed table {path.name} (key {key})"


class FlopCounts:
    """FLOPs per block and stage for ``profile``: from the committed table, else counted (cached)."""

    def __init__(self, profile: Profile, *, use_table: bool = True, lean_context: bool = False):
        self.p = profile
        self.lean_context = lean_context  # the context pass counts only the lean forward's work (--lean-context)
        self.table, self.source = _load_table(profile) if use_table else (None, "counted on the meta device")
        self.counted: list[str] = []  # entries the table lacked

    def _get(self, section: str, key: str, count):
        if self.table is not None and key in self.table.get(section, {}):
            return int(self.table[section][key])
        if self.table is not None:
            self.counted.append(f"{section}[{key}]")
        return count()

    def dit_forward(self, plan, context: bool = False) -> int:
        """One forward at ``plan``'s shapes; ``context``: the lean t=0 pass (what reaches the caches only)."""
        return self._get("dit_context_forward" if context else "dit_forward", f"{plan.audio_len},{plan.video_kv_len}",
                         lambda: _dit_forward_flops(self.p, plan.audio_len, plan.video_kv_len, context))

    def dit_block(self, plan, steps: int) -> dict[str, int]:
        f, c = self.dit_forward(plan), self.dit_forward(plan, self.lean_context)
        return {"dit_steps": steps * f, "dit_context": c, "dit": steps * f + c}

    def vae_frame(self, first: bool) -> int:
        return self._get("vae_frame", "first" if first else "next", lambda: _vae_frame_flops(self.p, first))

    def vae_video_block(self, first_block: bool) -> int:
        n = self.p.stream.latent_frames_per_block
        if first_block:
            return self.vae_frame(True) + (n - 1) * self.vae_frame(False)
        return n * self.vae_frame(False)

    def audio_window(self, tokens: int) -> int:
        return self._get("audio_window", str(tokens), lambda: _audio_window_flops(self.p, tokens))

    def vae_audio_block(self, index: int) -> int:
        return self.audio_window(audio_window_tokens(self.p, index))

    def describe(self) -> dict:
        return {"source": self.source, "counted_missing_entries": list(dict.fromkeys(self.counted))}


def count_flops(profile: Profile, plans, steps: int, counts: FlopCounts | None = None) -> list[dict[str, int]]:
    """Per block: FLOPs of dit, dit_steps, dit_context, vae_video, vae_audio."""
    fc = counts or FlopCounts(profile)
    return [{**fc.dit_block(pl, steps), "vae_video": fc.vae_video_block(pl.index == 0),
             "vae_audio": fc.vae_audio_block(pl.index)} for pl in plans]


# ---- writing the table ----------------------------------------------------------------------------------

def write_table(profile: Profile, path: Path | None = None) -> Path:
    """Count every static shape of ``profile``'s stream of 1..blocks blocks on the meta device; write JSON."""
    from hallolive_rt.cache_policy import choose_policy

    fc = FlopCounts(profile, use_table=False)
    dit, lean, audio = {}, {}, {}
    for n in range(1, profile.stream.blocks + 1):
        for pl in choose_policy(profile, n).plans():
            dit[f"{pl.audio_len},{pl.video_kv_len}"] = fc.dit_forward(pl)
            lean[f"{pl.audio_len},{pl.video_kv_len}"] = fc.dit_forward(pl, context=True)
            tokens = audio_window_tokens(profile, pl.index)
            audio[str(tokens)] = fc.audio_window(tokens)
    table = {"preset": profile.name, "key": flops_key(profile), "method": METHOD,
             "command": f"python -m hallolive_rt.runtime.flops --preset {profile.name}",
             "note": "FLOPs (multiply-add = 2) of one forward per static shape; keys: dit_forward and "
                     "dit_context_forward (the lean t=0 pass, --lean-context) 'audio_len,video_kv_len', vae_frame "
                     "'first'/'next' (one latent frame), audio_window tokens",
             "dit_forward": dict(sorted(dit.items())), "dit_context_forward": dict(sorted(lean.items())), "vae_frame": {"first": fc.vae_frame(True),
                                                                     "next": fc.vae_frame(False)},
             "audio_window": dict(sorted(audio.items(), key=lambda kv: int(kv[0])))}
    path = path or table_path(profile)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(table, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", action="append", help="profile name (repeatable); default: every preset")
    ap.add_argument("--out", type=Path, default=None, help="output file (one preset only); default: the "
                    "committed runtime/flops/<preset>.json")
    args = ap.parse_args(argv)
    from hallolive_rt.profile import list_profiles

    names = args.preset or list_profiles()
    if args.out is not None and len(names) != 1:
        ap.error("--out takes exactly one --preset")
    for name in names:
        print(write_table(load_profile(name), args.out))


if __name__ == "__main__":
    main()
