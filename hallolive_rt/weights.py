"""Checkpoint loading shared by every sub-model: read a file (mmap, no copy), check its keys against a
module built on the meta device, and assign the tensors in place (nothing is allocated twice).
Errors name the file, the first few offending keys and how many there are, so a user can tell a wrong
download from a wrong layout at a glance. Sub-model specific layouts (prefixes, nesting, weight-norm
folding) live next to their model and call into the functions here."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from hallolive_rt.errors import CheckpointError

__all__ = ["CheckpointError", "read_checkpoint", "strip_and_select", "check_state_dict", "assign_state_dict",
           "materialize_non_persistent", "file_digest"]

_SHOW = 5  # how many offending keys a message lists before "... and N more"


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    more = f" ... and {len(names) - _SHOW} more" if len(names) > _SHOW else ""
    return f"{len(names)}: {shown}{more}"


def read_checkpoint(path: str | os.PathLike) -> dict[str, object]:
    """A torch pickle (``.pt``/``.pth``, zip, via mmap) or ``.safetensors`` file's top level as a dict
    (tensors stay memory-mapped); ``CheckpointError`` for a missing file, neither format, or a non-dict."""
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: file not found")
    with open(p, "rb") as fh:
        head = fh.read(16)
    if p.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        try:
            from safetensors.torch import load_file
        except ImportError as e:  # pragma: no cover - declared dependency
            raise CheckpointError(f"{p}: reading .safetensors needs the 'safetensors' package") from e
        try:
            return dict(load_file(str(p), device="cpu"))
        except Exception as e:
            raise CheckpointError(f"{p}: not a valid safetensors file ({e})") from e
    if not zipfile.is_zipfile(p):
        raise CheckpointError(f"{p}: not a PyTorch checkpoint (expected a torch.save zip archive or a "
                              f".safetensors file; the file starts with {head[:8]!r}). Re-download it from "
                              "the official release.")
    try:
        obj = torch.load(p, map_location="cpu", mmap=True, weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{p}: cannot be read as a PyTorch checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{p}: top level is a {type(obj).__name__}, expected a dict of tensors")
    return dict(obj)


def strip_and_select(sd: Mapping[str, object], *, prefix: str = "",
                     drop_substrings: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Keep tensor entries under ``prefix`` (removed) and delete every ``drop_substrings`` occurrence."""
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if not isinstance(v, torch.Tensor) or not k.startswith(prefix):
            continue
        name = k[len(prefix):]
        for s in drop_substrings:
            name = name.replace(s, "")
        out[name] = v
    return out


def check_state_dict(expected: Mapping[str, torch.Size | tuple[int, ...]], got: Mapping[str, torch.Tensor],
                     file: str | os.PathLike, *, what: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` if ``got`` is missing, adds, or mis-shapes any key of ``expected``."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    mismatched = [f"{k} (file {tuple(got[k].shape)}, model {tuple(expected[k])})" for k in expected
                  if k in got and tuple(got[k].shape) != tuple(expected[k])]
    if not (missing or unexpected or mismatched):
        return
    parts = [f"{file}: does not match the {what}"]
    if missing:
        parts.append(f"  missing keys {_listing(missing)}")
    if unexpected:
        parts.append(f"  unexpected keys {_listing(unexpected)}")
    if mismatched:
        parts.append(f"  shape mismatches {_listing(mismatched)}")
    parts.append("  Is this the right file for this model and config? Compare with the official download layout.")
    raise CheckpointError("\n".join(parts))


def assign_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], file: str | os.PathLike, *,
                      dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                      what: str = "checkpoint") -> nn.Module:
    """Check ``sd`` against ``module``'s persistent state (usually built on meta) and load it with
    ``assign=True``: the (mmapped) tensors become its parameters without a second copy, floating ones cast
    to ``dtype``, all moved to ``device`` if given. Non-persistent buffers: ``materialize_non_persistent``."""
    expected = {k: v.shape for k, v in module.state_dict(keep_vars=True).items()}
    check_state_dict(expected, sd, file, what=what)
    conv: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        if device is not None:
            v = v.to(device)
        conv[k] = v
    module.load_state_dict(conv, strict=True, assign=True)
    return module


def materialize_non_persistent(module: nn.Module, init: Callable[[nn.Module], None], device) -> None:
    """Re-create tables that a meta-device build left empty (e.g. RoPE), by calling ``init`` on ``device``."""
    with torch.device(device):
        init(module)


def file_digest(path: str | os.PathLike, *, chunk: int = 1 << 24, fast: bool = True) -> str:
    """A content hash of a weights file for manifests: sha256 of size + first/last 16 MiB when ``fast``."""
    import hashlib

    p = Path(path)
    h = hashlib.sha256()
    size = p.stat().st_size
    h.update(str(size).encode())
    with open(p, "rb") as fh:
        if fast and size > 2 * chunk:
            h.update(fh.read(chunk))
            fh.seek(size - chunk)
            h.update(fh.read(chunk))
        else:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    return h.hexdigest()
