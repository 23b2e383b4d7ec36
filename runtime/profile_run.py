"""``hallolive-rt profile`` as one function: ``profile_stream(session, stream_args, out_dir, ...)`` checks the
stream's options now (the CLI's own parser, ``parse``), puts the stream's MP4 into ``out_dir`` unless
``--out`` is given (an output the user named must not exist without ``--overwrite``), then runs the stream
under Nsight Systems / Nsight Compute (a subprocess of the command line ``runtime/profiling.py`` builds) or
under the PyTorch profiler in this process (``run``), and removes an ``out_dir`` it created if the run
failed before writing anything."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hallolive_rt.errors import InputError

from . import profiling

__all__ = ["ProfileResult", "profile_stream"]


@dataclass
class ProfileResult:
    exit_code: int
    lines: list[str] = field(default_factory=list)  # what to print: the stage table, where the trace is


def _stream_args(args: list[str], out_dir: Path, session: str, parse: Callable) -> list[str]:
    """The stream options, parsed (and refused) now; the MP4 into ``out_dir`` unless --out is given."""
    try:
        sctx = parse(args)
    except Exception as e:  # click's usage errors; `--help` of stream (click's Exit) passes through
        if type(e).__name__ == "Exit":
            raise
        msg = getattr(e, "format_message", e.__str__)()
        raise InputError(f"{msg} (the options after the profile's own are `hallolive-rt stream` options: "
                         f"see hallolive-rt stream --help)") from None
    named = [n for n in ("out", "frames_out", "wav_out", "metrics") if sctx.get_parameter_source(n).name == "COMMANDLINE"]
    for name in named if not sctx.params["overwrite"] else ():
        if Path(sctx.params[name]).exists():
            raise InputError(f"--{name.replace('_', '-')} {str(sctx.params[name])!r} exists; pass --overwrite to "
                             f"replace it, or choose another path")
    args = list(args)
    if "out" not in named:
        args += ["--out", str(out_dir / "stream.mp4")]  # the profile's own folder: rewritten like its traces
    if "--overwrite" not in args:
        args.append("--overwrite")  # checked above; warm-up runs of the torch session write them again
    if session == "torch" and "--overlap" not in args and "--no-overlap" not in args:
        args.append("--no-overlap")  # the PyTorch profiler records the thread that started it
    return args


def profile_stream(session: str, stream_args: list[str], out_dir: Path, *, target: str | None,
                   warmup_runs: int | None, parse: Callable, run: Callable[[list[str]], int | None]) -> ProfileResult:
    """Profile one ``stream`` run (see the module docstring). ``run(args)`` runs the stream in this process
    and returns its exit code."""
    if session not in profiling.SESSIONS:
        raise InputError(f"unknown --session {session!r}: choose {', '.join(profiling.SESSIONS)}")
    if target is not None:
        if session != "ncu":
            raise InputError(f"--target picks an Nsight Compute kernel target: it applies to --session ncu, not "
                             f"{session}")
        try:
            profiling.load_session_preset("ncu").get_target(target)
        except profiling.PresetError as e:
            raise InputError(f"--target: {e}") from None
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(f"--out-dir {str(out_dir)!r} is a file, not a folder: choose a folder path")
    args = _stream_args(stream_args, out_dir, session, parse)
    created, ok = not out_dir.exists(), False
    try:
        if session in ("nsys", "ncu"):
            cmd = profiling.build_command(session, None, args, out_dir=str(out_dir), target=target,
                                          warmup_runs=warmup_runs)
            if profiling.find_profiler(session) is None:
                err = InputError(profiling.missing_profiler_message(session, cmd))
                err.exit_code = 3
                raise err
            out_dir.mkdir(parents=True, exist_ok=True)
            code = subprocess.call(cmd)
            ok = code == 0
            return ProfileResult(code)

        def run_stream() -> None:
            code = run(args)
            if code:
                err = InputError(f"the profiled stream failed (exit code {code})")
                err.exit_code = code
                raise err

        trace, table = profiling.run_torch_session(run_stream, out_dir,
                                                   warmup_runs=1 if warmup_runs is None else warmup_runs)
        ok = True
        return ProfileResult(0, [str(table), f"trace: {trace} (open in https://ui.perfetto.dev)"])
    finally:
        if not ok and created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()  # a failed session leaves no empty folder behind
