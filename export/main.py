"""``hallolive-rt export``: build every sub-model, export each contract variant, write the manifest; one pass and one
log line per artifact, skipping artifacts the manifest already lists as up to date."""

from __future__ import annotations

import contextlib
import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hallolive_rt.errors import ExportError
from hallolive_rt.options import ModelSource
from hallolive_rt.profile import Profile, load_profile

from .contracts import DTYPE_NAMES, SUBMODELS, Contract, contracts_for
from .fp8 import calibrate_dit, calibration_key, fp8_compute_dtype, fp8_layout, linear_weight_names, quantized_values
from .fp8 import manifest_entry as fp8_manifest_entry
from .fp8_graph import quantize_graph
from .manifest import (SCHEMA, FileHashes, artifact_key, device_info, read_manifest, rebuild_command, sha256_file,
                       tool_versions, write_manifest)
from .submodels import SUBMODEL_FILES, build_submodel, check_disk, check_memory, onnx_source, weights_ids, wrapper_for

__all__ = ["export_main", "PRECISIONS", "FORMATS", "ExportError"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": None}
FORMATS = ("onnx", "tensorrt", "aoti")
_EXT = {"onnx": ".onnx", "tensorrt": ".plan", "aoti": ".pt2"}


def export_main(model: ModelSource, format: str = "onnx", precision: str | None = None,
                out_dir: str | os.PathLike = "artifacts", *, submodels: tuple[str, ...] | None = None,
                opset: int | None = None, device: str | None = None, force: bool = False,
                fp64_time: bool | None = None, aoti_configs: dict | None = None,
                variants: tuple[str, ...] | None = None, log: Callable[[str], None] = print) -> Path:
    """Export the sub-models of a preset; returns the manifest path (CLI flags: ``hallolive-rt export --help``).
    Library-only: ``opset`` 18-20 (default 18; fp8: 19, needs 19-20), ``fp64_time``, ``aoti_configs``, ``variants``:
    only these "<submodel>/<variant>" artifacts of the sub-models they name, e.g. ("dit/a10_kv12",) for a one-block
    test; the manifest still records whole contracts, and the runtime refuses a stream needing a variant not there."""
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    _check_out_dir(Path(out_dir))
    profile = load_profile(model.preset)
    model.check_against(profile)
    model_dir, seed, ema = model.model_dir, model.seed, model.ema
    if format != "aoti":
        import importlib.util

        missing = [m for m in ("onnx", "onnxscript") if importlib.util.find_spec(m) is None]
        if missing:
            raise ExportError(f"--format {format} needs onnx and onnxscript ({', '.join(missing)} missing): "
                              "pip install 'hallolive-rt[export]'")
    precision = precision or {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[profile.dtype_name]
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    subs = tuple(submodels or SUBMODELS)
    unknown = [s for s in subs if s not in SUBMODELS]
    if unknown:
        raise ExportError(f"unknown sub-model(s) {unknown}; choose from {', '.join(SUBMODELS)}")
    fp8 = precision == "fp8"
    dtype = fp8_compute_dtype(profile.dtype) if fp8 else PRECISIONS[precision]
    opset = opset if opset is not None else (19 if fp8 else 18)
    device = device or ("cuda" if (format != "onnx" or fp8) and torch.cuda.is_available() else "cpu")
    if fp8:
        _check_fp8(profile, format, opset, device, subs)
    if format == "tensorrt":
        from .trt import TensorRTMissing, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTMissing as e:
            raise ExportError(str(e)) from None
    out = Path(out_dir)
    check_memory(profile, subs, dtype, format, device)  # before any weight is allocated
    if format != "aoti":  # weights files not on disk yet must fit there (a re-run rewrites in place)
        check_disk(profile, [s for s in subs if not (out / f"{s}_{profile.name}_{precision}.weights").is_file()],
                   dtype, next(d for d in (out, *out.absolute().parents) if d.is_dir()))
    wids = weights_ids(model_dir, seed, subs, ema=ema)  # raises for missing release files, before anything is written
    contracts = contracts_for(profile, dtype)
    unknown = sorted(set(variants or ()) - {f"{s}/{v.name}" for s in subs for v in contracts[s].variants})
    if unknown:
        raise ExportError(f"unknown variant(s) {unknown} of {', '.join(subs)} for preset {profile.name}")
    out.mkdir(parents=True, exist_ok=True)
    # float64 time embedding (release fidelity) where the target runs float64; TensorRT/ONNX cannot well
    fp64 = fp64_time if fp64_time is not None else format == "aoti"
    tools, dev = tool_versions(format), device_info(device)
    old = {} if force else read_manifest(out) or {}  # keep other sub-models' entries of the same build
    old_art, old_wf = old.get("artifacts", {}), old.get("weights_files", {})
    manifest = {
        "schema": SCHEMA, "format": format, "precision": precision, "tools": tools, "device": dev,
        "profile": {"name": profile.name, "digest": profile.digest()},
        "weights": {**old.get("weights", {}), **wids}, "model_dir": str(model_dir) if model_dir else None,
        "time_embedding": "float64" if fp64 else "float32", "opset": opset if format != "aoti" else None,
        "command": rebuild_command(profile.name, wids, format, precision, out, model_dir),
        "contracts": {**old.get("contracts", {}), **{s: contracts[s].to_dict() for s in subs}},
        "artifacts": {k: v for k, v in old_art.items() if v["submodel"] not in subs},
        "weights_files": {k: v for k, v in old_wf.items() if k not in subs},
    }
    quant = calibration_key(profile.stream.blocks, seed) if fp8 else None
    if fp8:
        manifest["fp8"] = fp8_manifest_entry(DTYPE_NAMES[dtype], profile.stream.blocks, seed, str(device))
    hashes, trt_ver = FileHashes(), tools.get("tensorrt", "")
    for sub in subs:
        contract: Contract = contracts[sub]
        todo = []
        for variant in contract.variants:
            key_name = f"{sub}/{variant.name}"
            if variants and any(v.startswith(sub + "/") for v in variants) and key_name not in variants:
                continue
            key = artifact_key(profile=profile.digest(), weights=wids[sub], precision=precision, format=format,
                               tools=tools, arch=dev["arch"], variant=variant.to_dict(), meta=contract.meta,
                               time=manifest["time_embedding"], opset=opset,
                               **({"quant": quant} if quant and sub == "dit" else {}))
            fname = _file_name(sub, variant.name, profile.name, precision, format, trt_ver, dev["arch"])
            prev = old_art.get(key_name)
            if prev and prev["key"] == key and _intact(out, prev, hashes):
                manifest["artifacts"][key_name] = prev
                log(f"[export] {key_name}: skipped (up to date) {prev['file']}")
                continue
            todo.append((variant, key_name, key, fname))
        if not todo:
            if sub in old_wf:  # graphs up to date: so is the weights file they were checked with
                manifest["weights_files"][sub] = old_wf[sub]
            continue
        if format == "aoti":
            _export_aoti(sub, profile, model_dir, seed, dtype, device, precision, contract, todo, out, manifest,
                         fp64, aoti_configs, log, ema=ema)
        else:
            _export_graphs(sub, profile, model_dir, seed, dtype, precision, format, contract, todo, out, manifest,
                           old_wf.get(sub), wids[sub], opset, hashes, log, device, ema=ema)
    return write_manifest(out, manifest)


def _check_out_dir(out: Path) -> None:
    """``out`` is a folder, or can be made one: refused before anything is built or written."""
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out-dir {str(out)!r} is a file, not a folder: choose a folder path (it is created "
                          "if missing)")
    base = next(d for d in (out, *out.absolute().parents) if d.exists())
    if not base.is_dir():
        raise ExportError(f"--out-dir {str(out)!r}: {str(base)!r} is a file, so the folder cannot be created")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ExportError(f"--out-dir {str(out)!r}: {str(base)!r} is not writable")


def _check_fp8(profile: Profile, format: str, opset: int, device: str, subs) -> None:
    """Refuse an fp8 request the exporter cannot honour, before anything is built or written."""
    if format == "aoti":
        raise ExportError("--precision fp8 is for --format onnx|tensorrt (Q/DQ graphs); "
                          "AOTInductor has no fp8 path here")
    if opset not in (19, 20):
        raise ExportError(f"--precision fp8 needs opset 19 or 20 (float8 QuantizeLinear/DequantizeLinear), not {opset}")
    if "dit" in subs and profile.decoders != "tiny" and torch.device(device).type != "cuda":
        raise ExportError(f"--precision fp8: calibrating the activation scales runs the full {profile.name} DiT "
                          f"through the streaming loop, which needs a GPU (device='cuda'); device is {device!r}. "
                          "Run the fp8 export on a machine with a CUDA GPU (or export bf16 here).")


def _intact(out: Path, entry: dict, hashes: FileHashes) -> bool:
    """The artifact's file (and its external weights file) are on disk with the recorded sha256."""
    files = [(entry["file"], entry["sha256"])]
    if entry.get("data_file"):
        files.append((entry["data_file"], entry["data_sha256"]))
    return all((out / f).is_file() and hashes(out / f) == h for f, h in files)


def _export_aoti(sub, profile, model_dir, seed, dtype, device, precision, contract, todo, out, manifest, fp64,
                 aoti_configs, log, *, ema: bool = False) -> None:
    from .aoti import export_aoti
    from .dit import dit_export_mode

    t0 = time.perf_counter()
    log(f"[export] {sub}: building {'release' if model_dir else 'random'} weights ({precision}) on {device} ...")
    model = build_submodel(sub, profile, model_dir, seed, dtype, device, ema=ema)
    log(f"[export] {sub}: built in {time.perf_counter() - t0:.1f} s")
    for variant, key_name, key, fname in todo:
        t0 = time.perf_counter()
        wrapper = wrapper_for(sub, model, contract, variant, functional=False)
        log(f"[export] {key_name}: AOTInductor compile (minutes on CPU) ...")
        with dit_export_mode(model, float64_time=fp64) if sub == "dit" else contextlib.nullcontext():
            export_aoti(wrapper, variant, out / fname, device=device, inputs=variant.sample_inputs(device=device),
                        inductor_configs=aoti_configs)
        _record(out, manifest, key_name, key, sub, variant, {"file": fname, "io": "inplace"}, t0, log)


def _export_graphs(sub, profile, model_dir, seed, dtype, precision, fmt, contract, todo, out, manifest, prev_weights,
                   weights_id, opset, hashes, log, device, *, ema: bool = False) -> None:
    """ONNX graphs on the meta device + the shared weights file (then TensorRT plans from them); for an
    fp8 DiT, calibration first, the quantized weights file, and the Q/DQ rewrite of every graph."""
    from .dit import dit_export_mode
    from .onnx import check_onnx, export_onnx
    from .weights_file import WeightsLayout, tensor_names, write_weights

    source = onnx_source(sub, profile, model_dir, seed, dtype, ema=ema)
    fp8 = precision == "fp8" and sub == "dit"
    layout = fp8_layout(source.model, linear_weight_names(source.model)) if fp8 else WeightsLayout.of(source.model)
    values = (lambda: quantized_values(source.values(), layout)) if fp8 else source.values
    if fp8:
        t0 = time.perf_counter()
        log(f"[export] dit: fp8 calibration ({profile.stream.blocks} blocks, seed {seed}) on {device} ...")
        cal = calibrate_dit(source.model, source.values(), profile, seed=seed, device=device, dtype=dtype)
        log(f"[export] dit: calibrated {len(cal.amax)} Linear inputs in {time.perf_counter() - t0:.1f} s")
    wfile = out / f"{sub}_{profile.name}_{precision}.weights"
    wkey = artifact_key(weights=weights_id, precision=precision, layout=layout.digest())
    if prev_weights and prev_weights["key"] == wkey and wfile.is_file() and hashes(wfile) == prev_weights["sha256"]:
        manifest["weights_files"][sub] = prev_weights
        log(f"[export] {sub}: weights skipped (up to date) {wfile.name}")
    else:
        t0 = time.perf_counter()
        log(f"[export] {sub}: writing {layout.total / 2**30:.2f} GiB of weights to {wfile.name} ...")
        write_weights(wfile, layout, values(), what=sub, log=log)
        hashes.pop(wfile, None)  # a stale file may have been hashed above
        manifest["weights_files"][sub] = {"file": wfile.name, "key": wkey, "sha256": hashes(wfile),
                                          "bytes": wfile.stat().st_size}
        write_manifest(out, manifest)  # an interrupted export keeps the (long) weights write
        log(f"[export] {sub}: weights written in {time.perf_counter() - t0:.1f} s")
    # float32 time embedding: ONNX/TensorRT targets are float64-free
    with dit_export_mode(source.model, float64_time=False) if sub == "dit" else contextlib.nullcontext():
        for variant, key_name, key, fname in todo:
            t0 = time.perf_counter()
            wrapper = wrapper_for(sub, source.model, contract, variant, functional=True)
            onnx_path = (out / fname).with_suffix(".onnx")  # the artifact itself for --format onnx
            names = tensor_names(wrapper, source.model)
            graph_pass = functools.partial(_fp8_pass, names=names, layout=layout, calibration=cal, log=log,
                                           what=key_name) if fp8 else None
            export_onnx(wrapper, variant, onnx_path, layout=layout, weights_file=wfile, names=names, opset=opset,
                        graph_pass=graph_pass)
            check_onnx(onnx_path, variant)
            entry = {"file": fname, "io": "functional"}
            if fmt == "onnx":
                entry.update(data_file=wfile.name, data_sha256=hashes(wfile))
            else:
                from .trt import build_engine

                log(f"[export] {key_name}: TensorRT build ...")
                build_engine(onnx_path, out / fname, precision, timing_cache=out / "timing.cache")
                entry["onnx"] = onnx_path.name
            _record(out, manifest, key_name, key, sub, variant, entry, t0, log)


def _fp8_pass(model, *, names, layout, calibration, log, what) -> None:
    n_w, n_a = quantize_graph(model, names, layout, calibration)
    log(f"[export] {what}: fp8 Q/DQ on {n_w} weights, {n_a} activations")


def _record(out, manifest, key_name, key, sub, variant, entry, t0, log) -> None:
    entry.update(sha256=sha256_file(out / entry["file"]), bytes=(out / entry["file"]).stat().st_size,
                 submodel=sub, variant=variant.name, key=key)
    manifest["artifacts"][key_name] = entry
    write_manifest(out, manifest)  # after every pass: an interrupted export keeps what it finished
    log(f"[export] {key_name}: exported {entry['file']} ({entry['bytes'] / 1e6:.1f} MB) "
        f"in {time.perf_counter() - t0:.1f} s")


def _file_name(sub, variant, profile, precision, fmt, trt_ver, arch) -> str:
    # plan and package names carry what they are bound to
    bound = {"tensorrt": f"_trt{trt_ver}_{arch}", "aoti": f"_torch{torch.__version__.split('+')[0]}_{arch}"}
    return f"{sub}_{variant}_{profile}_{precision}{bound.get(fmt, '')}{_EXT[fmt]}"


assert set(SUBMODEL_FILES) == set(SUBMODELS)
