"""BigVGAN's own config file (MMAudio ships ``bigvgan_vocoder.yml`` beside ``best_netG.pt``): read into the
``BigVGANConfig`` the loader uses, training keys ignored, clear errors naming the file and the key."""

from __future__ import annotations

import sys

import pytest
import torch

from hallolive_rt.model.vocoder import (
    BigVGANConfig,
    VocoderConfigError,
    build_vocoder,
    load_vocoder,
    load_vocoder_config,
)

pytest.importorskip("yaml")  # the `yaml` extra (also in `test`)

# The official file's layout: block-style lists, nested lists for the dilations, training-only keys mixed in.
OFFICIAL = """\
resblock: '1'
num_gpus: 0
batch_size: 64
num_mels: 80
learning_rate: 0.0001
adam_b1: 0.8
adam_b2: 0.99
lr_decay: 0.999
seed: 1234
upsample_rates:
- 4
- 4
- 2
- 2
- 2
- 2
upsample_kernel_sizes:
- 8
- 8
- 4
- 4
- 4
- 4
upsample_initial_channel: {channels}
resblock_kernel_sizes:
- 3
- 7
- 11
resblock_dilation_sizes:
- - 1
  - 3
  - 5
- - 1
  - 3
  - 5
- - 1
  - 3
  - 5
activation: snakebeta
snake_logscale: true
resolutions:
- - 1024
  - 120
  - 600
mpd_reshapes:
- 2
- 3
use_spectral_norm: false
dist_config:
  dist_backend: nccl
  world_size: 1
"""


def _write(tmp_path, text, name="bigvgan_vocoder.yml"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_official_yml_gives_the_released_config(tmp_path):
    cfg = load_vocoder_config(_write(tmp_path, OFFICIAL.format(channels=1536)))
    assert cfg == BigVGANConfig()  # the released 16 kHz vocoder; sampling_rate is not in the file
    assert cfg.resblock_dilation_sizes == ((1, 3, 5),) * 3 and cfg.hop_length == 256


def test_loader_takes_the_config_file(tmp_path):
    yml = _write(tmp_path, OFFICIAL.format(channels=128))
    assert load_vocoder_config(yml) == BigVGANConfig.tiny()
    src = build_vocoder(BigVGANConfig.tiny())
    ckpt = tmp_path / "best_netG.pt"
    torch.save({"generator": src.state_dict()}, ckpt)
    m = load_vocoder(ckpt, yml)
    assert m.cfg == BigVGANConfig.tiny()
    mel = torch.randn(1, 80, 6)
    with torch.no_grad():
        assert torch.equal(m(mel), src(mel))


def test_json_config_with_sampling_rate(tmp_path):
    import json

    import yaml

    data = yaml.safe_load(OFFICIAL.format(channels=1536))
    data["sampling_rate"] = 22050
    cfg = load_vocoder_config(_write(tmp_path, json.dumps(data), "config.json"))
    assert cfg.sampling_rate == 22050 and cfg.upsample_initial_channel == 1536


@pytest.mark.parametrize("edit,match", [
    (lambda t: t.replace("num_mels: 80\n", ""), r"missing key\(s\) 'num_mels' of the BigVGAN generator config"),
    (lambda t: t.replace("upsample_initial_channel: 1536", "upsample_initial_channel: wide"),
     r"key 'upsample_initial_channel' must be an integer, got 'wide'"),
    (lambda t: t.replace("snake_logscale: true", "snake_logscale: 1"), r"key 'snake_logscale' must be true or false"),
    (lambda t: t.replace("upsample_rates:\n- 4\n", "upsample_rates:\n- four\n"),
     r"key 'upsample_rates' must be a list of integers"),
    (lambda t: t.replace("resblock: '1'", "resblock: '2'"), r"resblock '2': only AMPBlock1"),
    (lambda t: "- just\n- a list\n", r"top level is a list, expected a mapping"),
    (lambda t: t + "bad: [unclosed\n", r"not valid YAML"),
])
def test_bad_files_name_the_file_and_key(tmp_path, edit, match):
    f = _write(tmp_path, edit(OFFICIAL.format(channels=1536)))
    with pytest.raises(VocoderConfigError, match=match) as e:
        load_vocoder_config(f)
    assert str(f) in str(e.value)
    with pytest.raises(VocoderConfigError, match="file not found"):
        load_vocoder_config(tmp_path / "nope.yml")


def test_missing_pyyaml_says_how_to_install(tmp_path, monkeypatch):
    f = _write(tmp_path, OFFICIAL.format(channels=1536))
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now raises ImportError
    with pytest.raises(VocoderConfigError, match=r"needs PyYAML: pip install -e '.\[yaml\]'"):
        load_vocoder_config(f)
