"""Bad input from the command line ends in exit code 2 with one clear line and nothing left behind; every
option has help text that fits 80 columns; progress is a bar on a terminal and one line per block in logs.

In-process (typer's CliRunner, or the function the command calls): no interpreter start per case."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pytest
from rich.console import Console
from typer.main import get_command
from typer.testing import CliRunner

from hallolive_rt.cache_policy import AppendPolicy, RollingPolicy, choose_policy
from hallolive_rt.cli import app
from hallolive_rt.model.rope import ROPE_POSITIONS
from hallolive_rt.options import ModelSource, OutputOptions
from hallolive_rt.profile import load_profile
from hallolive_rt.runtime.decode_pipeline import DecodedBlock
from hallolive_rt.errors import InputError
from hallolive_rt.runtime.stream_run import stream_main
from hallolive_rt.runtime.progress import StreamProgress as _Progress

COMMANDS = ("stream", "export", "bench", "profile")


def _run(*args):
    return CliRunner().invoke(app, list(args))


def _one_error_line(r, needle):
    assert r.exit_code == 2, (r.exit_code, r.output[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], r.stderr
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception


def _nothing_in(folder):
    assert sorted(p.name for p in folder.iterdir()) == [], list(folder.iterdir())


# ---- 2. --future-audio-frames: the range the RoPE tables leave -------------------------------------------

@pytest.mark.parametrize("preset,blocks,limit", [("tiny", None, 994), ("tiny", "endless", 994),
                                                 ("hallolive-512x992", None, 874), ("hallolive-512x992", 1, 994),
                                                 ("hallolive-512x992", "endless", 874)])
def test_future_frames_past_the_tables_are_refused_up_front_with_the_range(tmp_path, preset, blocks, limit):
    """30 + F audio tokens follow the longest history the policy feeds in a 1024-position table: F up to
    1024 - 30 x (history blocks + 1); one more is refused before any weight is loaded (the full preset's
    20 GB of random weights would take minutes: the refusal is immediate)."""
    out = tmp_path / "o.mp4"
    with pytest.raises(InputError) as e:
        stream_main("hi", model=ModelSource(preset, random_weights=preset != "tiny"), blocks=blocks,
                    outputs=OutputOptions(out=str(out)), future_audio_frames=limit + 1, progress=False)
    msg = str(e.value)
    assert f"F = {limit + 1} is out of range: F must be in 0..{limit}" in msg and "1024 positions" in msg, msg
    assert ("append policy" in msg) == (blocks != "endless"), msg
    _nothing_in(tmp_path)
    p = load_profile(preset).with_overrides(future_audio_tokens=limit)
    n = None if blocks == "endless" else (blocks or p.stream.blocks)
    choose_policy(p, n)  # the limit itself is accepted


@pytest.mark.parametrize("preset", ["tiny", "hallolive-512x992"])
def test_at_the_limit_every_position_of_a_long_stream_stays_in_the_tables(preset):
    """The bound is exact: at F = limit the positions of 2000 rolling blocks (re-based many times) and of the
    released clip reach the table's end and never pass it."""
    base = load_profile(preset)
    for pol_cls, kw in ((RollingPolicy, {"blocks": 2000}), (AppendPolicy, {})):
        limit, _ = pol_cls(base, **kw).future_tokens_limit()
        pol = pol_cls(base.with_overrides(future_audio_tokens=limit), **kw)
        fb = base.stream.latent_frames_per_block
        ends = [p.audio0 + p.audio_len for p in pol.plans()]
        assert max(ends) == ROPE_POSITIONS, (pol_cls.__name__, max(ends))
        assert all(p.audio0 >= 0 and p.frame0 + fb <= ROPE_POSITIONS for p in pol.plans())


# ---- 4. bad input: one line, exit 2, nothing left ----------------------------------------------------------

def test_a_prompt_that_is_not_utf8_is_named(tmp_path):
    r = _run("stream", "--prompt", "hi \udcff there", "--out", str(tmp_path / "o.mp4"))  # argv of $'hi \xff there'
    _one_error_line(r, "the prompt is not valid UTF-8: byte(s) ff at character 3")
    _nothing_in(tmp_path)


def test_export_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "afile"
    f.write_text("keep me")
    _one_error_line(_run("export", "--out-dir", str(f)), "is a file, not a folder")
    assert f.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("args,needle", [
    (["--target", "bogus"], "--target picks an Nsight Compute kernel target"),
    (["--session", "ncu", "--target", "bogus"], "unknown ncu target 'bogus'"),
    (["--session", "bogus"], "unknown --session 'bogus'"),
    (["--bogus-flag"], "No such option: --bogus-flag"),
    (["--kv-impl", "fast"], "Invalid value for '--kv-impl'"),
])
def test_profile_refuses_before_making_its_folder(tmp_path, monkeypatch, args, needle):
    monkeypatch.chdir(tmp_path)
    _one_error_line(_run("profile", "--out-dir", str(tmp_path / "prof"), *args), needle)
    _nothing_in(tmp_path)


def test_profile_of_a_stream_that_fails_leaves_no_empty_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = _run("profile", "--out-dir", "prof", "--warmup-runs", "0", "--preset", "nope")
    assert r.exit_code == 2 and "unknown preset" in r.stderr, r.output
    _nothing_in(tmp_path)


def test_bench_on_cpu_runs_the_backends_that_can_run_and_names_its_own_flag(tmp_path):
    out = tmp_path / "b.json"
    r = _run("bench", "--preset", "tiny", "--device", "cpu", "--blocks", "1", "--kv-impl", "torch", "--out", str(out))
    assert r.exit_code == 0, r.output[-3000:]
    assert list(json.loads(out.read_text())["results"]) == ["eager"]
    assert "auto: on cpu only eager runs" in r.stderr
    r = _run("bench", "--preset", "tiny", "--device", "cpu", "--backends", "eager,cudagraph")
    _one_error_line(r, "--backends cudagraph cannot run here")
    assert "use --backends eager" in r.stderr and "--backend " not in r.stderr.replace("--backends", "")


def test_artifacts_flag_without_a_compiled_backend_and_the_reverse(tmp_path):
    _one_error_line(_run("stream", "--out", str(tmp_path / "o.mp4"), "--backend", "eager", "--artifacts",
                         str(tmp_path)), "--artifacts is read by --backend aoti or tensorrt only")
    # --backend auto (the default) runs what the directory holds: this one holds no export
    r = _run("stream", "--out", str(tmp_path / "o.mp4"), "--artifacts", str(tmp_path))
    assert r.exit_code == 2 and "no manifest.json" in r.stderr, r.output
    _one_error_line(_run("stream", "--out", str(tmp_path / "o.mp4"), "--backend", "aoti"),
                    "pass --artifacts DIR")
    _nothing_in(tmp_path)


# ---- 7. --help and progress ---------------------------------------------------------------------------

def test_every_option_of_every_command_has_help_text():
    group = get_command(app)
    assert set(COMMANDS) <= set(group.commands)
    missing = [f"{name} {p.opts[0]}" for name, cmd in group.commands.items() for p in cmd.params
               if p.param_type_name == "option" and not (p.help or "").strip()]
    assert not missing, missing
    seed = next(p for p in group.commands["export"].params if p.name == "seed")
    assert "random weights" in seed.help and "noise" not in seed.help


@pytest.mark.parametrize("command", COMMANDS)
def test_help_fits_80_columns_and_names_every_option_in_full(command):
    r = CliRunner().invoke(app, [command, "--help"], terminal_width=80, env={"COLUMNS": "80"})
    assert r.exit_code == 0, r.output
    text = r.stdout
    too_wide = [ln for ln in text.splitlines() if len(ln) > 80]
    assert not too_wide, too_wide
    assert "…" not in text
    cmd = get_command(app).commands[command]
    for p in cmd.params:
        for opt in getattr(p, "opts", []) + getattr(p, "secondary_opts", []):
            assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,/]|$)", text, re.M), (command, opt)
    if command in ("stream", "export", "bench"):  # the --model-dir help names every file, whole
        flat = re.sub(r"-\s+", "-", " ".join(text.split()))  # wrapped lines may break after a hyphen
        for f in ("Hallo-Live/hallolive_dit.pt", "MMAudio/ext_weights/best_netG.pt", "google/umt5-xxl/"):
            assert f in flat, f


def _block(i):
    return DecodedBlock(i, np.zeros((8, 2, 2, 3), np.uint8), np.zeros(16, np.float32),
                        {"dit": 48.3, "vae_video": 100.0, "vae_audio": 20.0}, 0.0, 0.52, 1.0)


@pytest.mark.parametrize("total", [10, None])
def test_progress_bar_keeps_its_bar_and_count_at_80_columns(total):
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with _Progress(con, total, True) as bar:
        for i in range(3):
            bar.update(_block(i))
        bar.bar.refresh()
    lines = [ln.rstrip("\r") for ln in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "\n", buf.getvalue()).split("\n")]
    last = [ln for ln in lines if ln.strip()][-1]
    assert len(last) <= 80 and "━" in last, last
    assert ("3/10" if total else "3/?") in last and "DiT 48 ms" in last, last


@pytest.mark.parametrize("total", [3, None])
def test_logs_get_one_line_per_block_endless_included(total):
    buf = io.StringIO()
    con = Console(file=buf, width=80, force_terminal=False)
    with _Progress(con, total, True) as bar:
        for i in range(3):
            bar.update(_block(i))
    lines = buf.getvalue().splitlines()
    of = "" if total is None else "/3"
    assert [ln.split("]")[0] for ln in lines] == [f"[1{of}", f"[2{of}", f"[3{of}"], lines
    assert all("block" in ln and "dit 48 ms" in ln for ln in lines)


def test_the_stream_command_logs_each_block_when_stderr_is_not_a_terminal(tmp_path):
    r = _run("stream", "--blocks", "2", "--out", str(tmp_path / "o.mp4"), "--kv-impl", "torch", "--no-overlap")
    assert r.exit_code == 0, r.output[-3000:]
    assert [ln.split(" ")[0] for ln in r.stderr.splitlines() if ln.startswith("[")] == ["[1/2]", "[2/2]"], r.stderr
