"""The official release's file layout under ``--model-dir`` (the DiT, the Wan2.2 VAE, MMAudio's VAE and
BigVGAN, umT5 and its tokenizer files) and the decoder configs a profile names: one statement of where
each file lives, shared by the runtime and the exporters. The layout is drawn in ``docs/ARCHITECTURE.md``,
"The release layout".
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path

from .model.text import UMT5Config
from .model.vae_audio import MMAudioVAEConfig
from .model.vae_video import WanVAEConfig
from .model.vocoder import BigVGANConfig
from .profile import Profile

__all__ = ["ModelFiles", "MODEL_FILES", "MissingModelFiles", "check_model_dir", "decoder_configs"]


@dataclass(frozen=True)
class ModelFiles:
    """Relative paths of the official release inside ``--model-dir`` (a trailing '/' marks a folder)."""

    dit: str = "Hallo-Live/hallolive_dit.pt"
    video_vae: str = "Wan2.2-TI2V-5B/Wan2.2_VAE.pth"
    audio_vae: str = "MMAudio/ext_weights/v1-16.pth"
    vocoder: str = "MMAudio/ext_weights/best_netG.pt"
    text_encoder: str = "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"
    tokenizer: str = "Wan2.1-T2V-1.3B/google/umt5-xxl/"
    tokenizer_alt: tuple[str, ...] = ("google/umt5-xxl/",)  # also accepted (the layout)

    def names(self) -> list[str]:
        return [f.name for f in fields(self) if not f.name.endswith("_alt")]

    def resolve(self, root: Path) -> dict[str, Path]:
        out = {n: root / getattr(self, n).rstrip("/") for n in self.names()}
        if not _present(out["tokenizer"], folder=True):
            for alt in self.tokenizer_alt:
                if _present(root / alt.rstrip("/"), folder=True):
                    out["tokenizer"] = root / alt.rstrip("/")
        return out


def _present(p: Path, *, folder: bool) -> bool:
    return (p.is_dir() and any(p.iterdir())) if folder else p.is_file()


MODEL_FILES = ModelFiles()

_WHERE = {  # where the official release publishes each file (shown for every missing one)
    "dit": "the Hallo-Live release (Hugging Face fudan-generative-ai/Hallo-Live)",
    "video_vae": "Wan-AI/Wan2.2-TI2V-5B on Hugging Face",
    "audio_vae": "MMAudio's ext_weights (hkchengrex/MMAudio release assets)",
    "vocoder": "MMAudio's ext_weights (hkchengrex/MMAudio release assets)",
    "text_encoder": "Wan-AI/Wan2.1-T2V-1.3B on Hugging Face",
    "tokenizer": "Wan-AI/Wan2.1-T2V-1.3B on Hugging Face, folder google/umt5-xxl/ (tokenizer files)",
}


class MissingModelFiles(FileNotFoundError):
    """One or more official files are missing; ``missing`` lists (relative path, where to get it)."""

    def __init__(self, root: Path, missing: list[tuple[str, str]]):
        self.root, self.missing = root, missing
        lines = "\n".join(f"  {rel:<52} from {where}" for rel, where in missing)
        super().__init__(f"--model-dir {root}: {len(missing)} of {len(MODEL_FILES.names())} model files missing:\n"
                         f"{lines}\n(the layout is the official download's; or pass --random-weights)")


def check_model_dir(root: str | Path, files: ModelFiles = MODEL_FILES) -> dict[str, Path]:
    """Absolute paths of every component, or ``MissingModelFiles`` listing all that are absent."""
    root = Path(root)
    paths = files.resolve(root)
    missing = []
    for name in files.names():
        rel = getattr(files, name)
        if not _present(paths[name], folder=rel.endswith("/")):
            missing.append((rel, _WHERE[name]))
    if missing:
        raise MissingModelFiles(root, missing)
    return paths


def decoder_configs(profile: Profile) -> tuple[WanVAEConfig, MMAudioVAEConfig, BigVGANConfig, UMT5Config]:
    """Configs named by ``profile.decoders`` ("full" = released sizes, "tiny" = CPU test sizes)."""
    if profile.decoders == "tiny":
        return WanVAEConfig.tiny(), MMAudioVAEConfig.tiny(), BigVGANConfig.tiny(), UMT5Config.tiny()
    if profile.decoders == "full":
        return WanVAEConfig(), MMAudioVAEConfig(), BigVGANConfig(), UMT5Config()
    raise ValueError(f"profile {profile.name}: decoders must be 'full' or 'tiny', got {profile.decoders!r}")
