"""``hallolive-rt export``: build every sub-model, export each contract variant, write the manifest.

One pass per artifact, one log line per pass (``exported`` / ``skipped (up to date)``). A pass is up to
date when the manifest already lists the artifact with the same key (profile digest, weights id,
precision, format, tool versions, device arch, contract, time embedding, opset) and the file on disk
still has the recorded sha256.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hallolive_rt.profile import Profile, load_profile

from .contracts import SUBMODELS, Contract, contracts_for
from .manifest import (SCHEMA, artifact_key, device_info, read_manifest, rebuild_command, sha256_file,
                       tool_versions, write_manifest)
from .submodels import SUBMODEL_FILES, build_submodel, check_memory, weights_ids, wrapper_for

__all__ = ["export_main", "PRECISIONS", "FORMATS", "ExportError"]

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp8": None}
FORMATS = ("onnx", "tensorrt", "aoti")
_EXT = {"onnx": ".onnx", "tensorrt": ".plan", "aoti": ".pt2"}


class ExportError(RuntimeError):
    """A request the exporter refuses before doing any work (flags, memory, missing tools)."""


def _default_precision(profile: Profile) -> str:
    return {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[profile.dtype_name]


def export_main(preset: str, model_dir: str | None, random_weights: bool, format: str = "onnx",
                precision: str | None = None, out_dir: str | os.PathLike = "artifacts", seed: int = 0, *,
                submodels: tuple[str, ...] | None = None, opset: int = 18, device: str | None = None,
                force: bool = False, fp64_time: bool | None = None, aoti_configs: dict | None = None,
                log: Callable[[str], None] = print) -> Path:
    """Export the sub-models of a preset; returns the manifest path.

    CLI flags (``hallolive-rt export``):
      --preset P            profile name or .toml path (shapes, batch, blocks)
      --model-dir D         release weights (Hallo-Live/, Wan2.2-TI2V-5B/, MMAudio/, Wan2.1-T2V-1.3B/)
      --random-weights      random weights instead (exclusive with --model-dir); --seed N picks them
      --format F            onnx | tensorrt | aoti
      --precision X         fp32 | bf16 | fp16 | fp8 (default: the profile's dtype); fp8 needs a Q/DQ ONNX
      --out-dir DIR         artifact directory (manifest.json + one file per sub-model variant)
      (library-only: submodels, opset 18-20, device, force re-export, fp64_time, aoti_configs)
    """
    if bool(model_dir) == bool(random_weights):
        raise ExportError("pass exactly one of --model-dir DIR or --random-weights")
    if format not in FORMATS:
        raise ExportError(f"--format {format!r}: choose one of {', '.join(FORMATS)}")
    profile = load_profile(preset)
    precision = precision or _default_precision(profile)
    if precision not in PRECISIONS:
        raise ExportError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "fp8":
        raise ExportError("--precision fp8: TensorRT builds FP8 only from an explicitly quantized (Q/DQ) ONNX, "
                          "which this exporter does not produce; quantize the bf16 ONNX (e.g. NVIDIA ModelOpt) "
                          "and build it with hallolive_rt.export.trt.build_engine(..., precision='fp8')")
    dtype = PRECISIONS[precision]
    subs = tuple(submodels or SUBMODELS)
    unknown = [s for s in subs if s not in SUBMODELS]
    if unknown:
        raise ExportError(f"unknown sub-model(s) {unknown}; choose from {', '.join(SUBMODELS)}")
    device = device or ("cuda" if format != "onnx" and torch.cuda.is_available() else "cpu")
    if format == "tensorrt":
        from .trt import TensorRTMissing, require_tensorrt

        try:
            require_tensorrt()
        except TensorRTMissing as e:
            raise ExportError(str(e)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    check_memory(profile, subs, dtype, format, device)  # before any weight is allocated
    # float64 time embedding (release fidelity) where the target runs float64; TensorRT/ONNX cannot well
    fp64 = fp64_time if fp64_time is not None else format == "aoti"
    wids = weights_ids(model_dir, seed, subs)
    tools = tool_versions(format)
    dev = device_info(device)
    contracts = contracts_for(profile, dtype)
    old = None if force else read_manifest(out)
    old_art = (old or {}).get("artifacts", {})
    manifest = {
        "schema": SCHEMA, "format": format, "precision": precision,
        "profile": {"name": profile.name, "digest": profile.digest()},
        "weights": dict(wids), "model_dir": str(model_dir) if model_dir else None, "tools": tools, "device": dev,
        "time_embedding": "float64" if fp64 else "float32", "opset": opset if format != "aoti" else None,
        "command": rebuild_command(profile.name, wids, format, precision, out, model_dir),
        "contracts": {s: contracts[s].to_dict() for s in subs}, "artifacts": {},
    }
    if old:  # keep other sub-models' entries of the same build (partial re-exports)
        manifest["artifacts"] = {k: v for k, v in old_art.items() if v["submodel"] not in subs}
        manifest["contracts"] = {**old.get("contracts", {}), **manifest["contracts"]}
        manifest["weights"] = {**old.get("weights", {}), **manifest["weights"]}
    trt_ver = tools.get("tensorrt", "")
    for sub in subs:
        contract: Contract = contracts[sub]
        model = None
        for variant in contract.variants:
            key_name = f"{sub}/{variant.name}"
            key = artifact_key(profile=profile.digest(), weights=wids[sub], precision=precision, format=format,
                               tools=tools, arch=dev["arch"], variant=variant.to_dict(), meta=contract.meta,
                               time=manifest["time_embedding"], opset=opset)
            fname = _file_name(sub, variant.name, profile.name, precision, format, trt_ver, dev["arch"])
            prev = old_art.get(key_name)
            if prev and prev["key"] == key and (out / prev["file"]).is_file() and \
                    sha256_file(out / prev["file"]) == prev["sha256"]:
                manifest["artifacts"][key_name] = prev
                log(f"[export] {key_name}: skipped (up to date) {prev['file']}")
                continue
            if model is None:
                t0 = time.perf_counter()
                log(f"[export] {sub}: building {'random' if random_weights else 'release'} weights ({precision}) ...")
                model = build_submodel(sub, profile, model_dir, seed, dtype, device)
                log(f"[export] {sub}: built in {time.perf_counter() - t0:.1f} s")
            t0 = time.perf_counter()
            entry = _export_one(sub, model, contract, variant, out / fname, format, precision, opset, device,
                                fp64, aoti_configs, log)
            entry.update(submodel=sub, variant=variant.name, key=key)
            manifest["artifacts"][key_name] = entry
            write_manifest(out, manifest)  # after every pass: an interrupted export keeps what it finished
            log(f"[export] {key_name}: exported {entry['file']} ({entry['bytes'] / 1e6:.1f} MB) "
                f"in {time.perf_counter() - t0:.1f} s")
        del model
    return write_manifest(out, manifest)


def _file_name(sub, variant, profile, precision, fmt, trt_ver, arch) -> str:
    if fmt == "tensorrt":  # plan names carry what a plan is bound to
        return f"{sub}_{variant}_{profile}_{precision}_trt{trt_ver}_{arch}{_EXT[fmt]}"
    if fmt == "aoti":
        return f"{sub}_{variant}_{profile}_{precision}_torch{torch.__version__.split('+')[0]}_{arch}{_EXT[fmt]}"
    return f"{sub}_{variant}_{profile}_{precision}{_EXT[fmt]}"


def _export_one(sub, model, contract, variant, path: Path, fmt, precision, opset, device, fp64, aoti_configs,
                log) -> dict:
    from .dit import dit_export_mode

    functional = fmt != "aoti"
    wrapper = wrapper_for(sub, model, contract, variant, functional=functional)
    inputs = variant.sample_inputs(device=device if fmt == "aoti" else "cpu")
    ctx = dit_export_mode(model, float64_time=fp64) if sub == "dit" else _null()
    with ctx:
        if fmt == "aoti":
            from .aoti import export_aoti

            log(f"[export] {sub}/{variant.name}: AOTInductor compile (minutes on CPU) ...")
            export_aoti(wrapper, variant, path, device=device, inputs=inputs, inductor_configs=aoti_configs)
            entry = {"file": path.name, "io": "inplace"}
        else:
            from .onnx import check_onnx, export_onnx

            onnx_path = path if fmt == "onnx" else path.with_suffix(".onnx")
            export_onnx(wrapper, variant, onnx_path, opset=opset, inputs=inputs)
            check_onnx(onnx_path, variant)
            entry = {"file": path.name, "io": "functional"}
            if fmt == "tensorrt":
                from .trt import build_engine

                log(f"[export] {sub}/{variant.name}: TensorRT build ...")
                build_engine(onnx_path, path, precision, timing_cache=path.parent / "timing.cache")
                entry["onnx"] = onnx_path.name
    entry["sha256"] = sha256_file(path)
    entry["bytes"] = path.stat().st_size
    data = path.with_name(path.name + ".data")
    if fmt == "onnx" and data.is_file():
        entry["data_file"], entry["data_sha256"] = data.name, sha256_file(data)
        entry["bytes"] += data.stat().st_size
    return entry


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


assert set(SUBMODEL_FILES) == set(SUBMODELS)
