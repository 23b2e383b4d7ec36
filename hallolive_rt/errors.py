"""The error types every layer raises, in one module that imports nothing of the product: a caller
catches an error of another layer without importing that layer, so no import circle forms over an
exception class. Each message says what is wrong (which file, key, shape or flag) and what to do."""

from __future__ import annotations

__all__ = ["InputError", "ConfigError", "ProfileError", "CheckpointError", "ExportError", "ArtifactMismatch",
           "BackendUnavailable", "MediaError", "OutputWriteError", "OutputClaimError", "OutputBusy",
           "OutputExists", "StageError"]


class InputError(ValueError):
    """A bad input found before any output was opened (CLI exit code ``exit_code``)."""

    exit_code = 2


class ConfigError(ValueError):
    """A config file with missing, unknown or inconsistent fields."""


class ProfileError(ValueError):
    """An unknown preset or an inconsistent profile file."""


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be used: unreadable, not a checkpoint, or the wrong keys/shapes."""


class ExportError(RuntimeError):
    """A request the exporter refuses before doing any work (flags, memory, missing tools)."""


class ArtifactMismatch(RuntimeError):
    """An artifact directory that does not fit the current run; the message says why and how to rebuild."""


class BackendUnavailable(RuntimeError):
    """A backend that cannot run here; the message says what is missing and how to get it."""


class MediaError(RuntimeError):
    """An output path that cannot be written, or input that does not match the stream's shape."""


class OutputWriteError(MediaError):
    """A write failed mid-stream (disk full, ...); every output was cut back to its last complete block."""


class OutputClaimError(RuntimeError):
    """An output this process may not write (another writer holds it, or it exists)."""


class OutputBusy(OutputClaimError):
    """Another process is writing the output."""


class OutputExists(OutputClaimError):
    """The output exists and ``overwrite`` was not given."""


class StageError(RuntimeError):
    """A failure inside one stage of a running stream (``stage``: dit, vae_video, vae_audio, writer); the
    original exception is its ``__cause__``."""

    def __init__(self, stage: str, cause: BaseException):
        super().__init__(f"{stage}: {type(cause).__name__}: {cause}")
        self.stage = stage
