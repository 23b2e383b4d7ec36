"""Argument checks of the KV-cache ops, mirroring cpp_ext/checks.h for the fake kernels and the reference.
They read metadata only (shapes, dtypes, devices, strides, ints), never a tensor's value, so they run on
FakeTensors under torch.compile and inside CUDA-graph capture. Messages name the op, the argument, the
expected and the actual value, like the C++ ones."""

from __future__ import annotations

import torch

CACHE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _fail(op: str, msg: str) -> None:
    raise RuntimeError(f"hallolive_kv::{op}: {msg}")


def check_cache(op: str, cache: torch.Tensor) -> None:
    if cache.dim() != 4:
        _fail(op, f"`cache` must be 4-D [B, S, H, D], got shape {list(cache.shape)}")
    if cache.dtype not in CACHE_DTYPES:
        _fail(op, f"`cache` dtype must be float32, bfloat16 or float16, got {cache.dtype}")
    if not cache.is_contiguous():
        _fail(op, f"`cache` must be contiguous [B, S, H, D], got strides {list(cache.stride())} "
                  f"for shape {list(cache.shape)}")
    if cache.shape[3] % 2:
        _fail(op, f"`cache` head_dim D must be even (RoPE pairs), got D={cache.shape[3]}")


def check_block(op: str, src: torch.Tensor, cache: torch.Tensor) -> None:
    if src.dim() != 4:
        _fail(op, f"`src` must be 4-D [B, N, H, D], got shape {list(src.shape)}")
    b, _, h, d = cache.shape
    if (src.shape[0], src.shape[2], src.shape[3]) != (b, h, d):
        _fail(op, f"`src` must have shape [B={b}, N, H={h}, D={d}] to match `cache` {list(cache.shape)}, "
                  f"got {list(src.shape)}")
    if src.dtype != cache.dtype:
        _fail(op, f"`src` dtype must equal `cache` dtype {cache.dtype}, got {src.dtype}")
    if src.device != cache.device:
        _fail(op, f"`src` must be on `cache`'s device {cache.device}, got {src.device}")
    if src.shape[3] > 1 and src.stride(3) != 1:
        _fail(op, f"`src` last dimension must be contiguous (stride 1), got strides {list(src.stride())}")


def check_offset(op: str, offset: torch.Tensor, cache: torch.Tensor) -> None:
    if offset.dtype != torch.int64:
        _fail(op, f"`offset` dtype must be int64, got {offset.dtype}")
    if tuple(offset.shape) != (1,):
        _fail(op, f"`offset` must have shape [1], got {list(offset.shape)}")
    if offset.device != cache.device:
        _fail(op, f"`offset` must be on `cache`'s device {cache.device} (a host offset cannot change "
                  f"between CUDA graph replays), got {offset.device}")


def check_ring(op: str, ring_start: int, ring_size: int, n: int, s: int) -> None:
    if ring_start < 0 or ring_size < 0:
        _fail(op, f"`ring_start` and `ring_size` must be >= 0, got ring_start={ring_start}, "
                  f"ring_size={ring_size}")
    if ring_start + ring_size > s:
        _fail(op, f"ring [ring_start={ring_start}, ring_start+ring_size={ring_start + ring_size}) must fit "
                  f"in the cache's S={s} slots")
    if ring_size and n > ring_size:
        _fail(op, f"a block of N={n} rows would overwrite itself in a ring of ring_size={ring_size} slots")


def check_table(op: str, name: str, t: torch.Tensor, rows: int, cache: torch.Tensor) -> None:
    half = cache.shape[3] // 2
    if tuple(t.shape) != (rows, half):
        _fail(op, f"`{name}` must have shape [{rows}, {half}] (rows, D/2), got {list(t.shape)}")
    if t.dtype != torch.float32:
        _fail(op, f"`{name}` dtype must be float32, got {t.dtype}")
    if t.device != cache.device:
        _fail(op, f"`{name}` must be on `cache`'s device {cache.device}, got {t.device}")
    if not t.is_contiguous():
        _fail(op, f"`{name}` must be contiguous, got strides {list(t.stride())}")


def check_rows(op: str, start: int, length: int, s: int) -> None:
    if start < 0 or length < 0 or start + length > s:
        _fail(op, f"rows [start={start}, start+length={start + length}) must lie inside the cache's "
                  f"S={s} slots")


def validate_write_block(cache, src, offset, ring_start, ring_size, op="write_block") -> None:
    check_cache(op, cache)
    check_block(op, src, cache)
    check_offset(op, offset, cache)
    check_ring(op, ring_start, ring_size, src.shape[1], cache.shape[1])


def validate_rope_write_block(cache, src, cos, sin, offset, ring_start, ring_size) -> None:
    op = "rope_write_block"
    validate_write_block(cache, src, offset, ring_start, ring_size, op=op)
    check_table(op, "cos", cos, src.shape[1], cache)
    check_table(op, "sin", sin, src.shape[1], cache)


def validate_rerotate(cache, cos_delta, sin_delta, start, length) -> None:
    op = "rerotate"
    check_cache(op, cache)
    check_rows(op, start, length, cache.shape[1])
    check_table(op, "cos_delta", cos_delta, length, cache)
    check_table(op, "sin_delta", sin_delta, length, cache)
