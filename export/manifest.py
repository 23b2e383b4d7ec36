"""``manifest.json``: what an artifact directory holds (format, precision, profile, weights, tools, device,
contracts, one entry per artifact with its file hash and input key), what it was built from, and the
refusal rules: ``load_artifacts`` refuses any difference from this run (profile, weights, format,
precision, tools, device architecture, a missing or modified file, a recorded contract that is not the one
this profile derives) with the command that rebuilds. Schema: ``docs/ARCHITECTURE.md``, "The manifest"."""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from hallolive_rt.errors import ArtifactMismatch
from hallolive_rt.profile import Profile

__all__ = ["MANIFEST", "SCHEMA", "ArtifactMismatch", "LoadedArtifacts", "load_artifacts", "read_manifest",
           "write_manifest", "sha256_file", "FileHashes", "tool_versions", "device_info", "rebuild_command", "artifact_key",
           "manifest_digest"]

MANIFEST = "manifest.json"
SCHEMA = 1


def sha256_file(path: str | Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


class FileHashes(dict):
    """``hashes(path)``: sha256 of a file, once per instance (a run, a load): five graphs share the DiT's weights."""

    def __call__(self, path: str | Path) -> str:
        path = Path(path)
        if path not in self:
            self[path] = sha256_file(path)
        return self[path]


def tool_versions(fmt: str) -> dict[str, str]:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in {"onnx": ("onnx",), "tensorrt": ("onnx", "tensorrt"), "aoti": ()}[fmt]:
        try:
            v[name] = __import__(name).__version__
        except ImportError:
            v[name] = "missing"
    return v


def device_info(device: str | torch.device) -> dict[str, str]:
    d = torch.device(device)
    if d.type == "cuda":
        cap = torch.cuda.get_device_capability(d)
        return {"kind": "cuda", "arch": f"sm_{cap[0]}{cap[1]}", "name": torch.cuda.get_device_name(d)}
    return {"kind": "cpu", "arch": platform.machine(), "name": platform.processor() or platform.machine()}


def rebuild_command(profile: str, weights: Mapping[str, str] | str, fmt: str, precision: str, out_dir: str | Path,
                    model_dir: str | None = None) -> str:
    if model_dir:
        ids = [weights] if isinstance(weights, str) else list(weights.values())
        src = f"--model-dir {model_dir}" + (" --ema" if any(w.endswith("@generator_ema") for w in ids) else "")
    else:
        w = weights if isinstance(weights, str) else next(iter(weights.values()), "random:0")
        seed = w.split(":", 1)[1] if w.startswith("random:") else "0"
        src = f"--random-weights --seed {seed}"
    return f"hallolive-rt export --preset {profile} {src} --format {fmt} --precision {precision} --out-dir {out_dir}"


def artifact_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def manifest_digest(m: Mapping) -> str:
    body = {k: v for k, v in m.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def write_manifest(out_dir: str | Path, m: dict) -> Path:
    m = {**m, "digest": manifest_digest(m)}
    p = Path(out_dir) / MANIFEST
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(m, indent=1, sort_keys=True))
    tmp.replace(p)  # atomic: a killed export never leaves half a manifest
    return p


def read_manifest(out_dir: str | Path) -> dict | None:
    """The manifest, or None when there is none (a corrupt or edited one raises ArtifactMismatch)."""
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        return None
    try:
        m = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactMismatch(f"{p}: not valid JSON ({e})") from e
    if m.get("schema") != SCHEMA:
        raise ArtifactMismatch(f"{p}: manifest schema {m.get('schema')!r}, this runtime reads {SCHEMA}")
    if m.get("digest") != manifest_digest(m):
        raise ArtifactMismatch(f"{p}: manifest was modified after export (its digest does not match its content)")
    return m


@dataclass
class LoadedArtifacts:
    root: Path
    manifest: dict
    paths: dict[str, Path]  # "<submodel>/<variant>" -> file
    rebuild: str = ""  # the command that rebuilds this directory where it is now (``root``)

    def path(self, submodel: str, variant: str) -> Path:
        return self.paths[f"{submodel}/{variant}"]

    def variants(self, submodel: str) -> list[str]:
        return [k.split("/", 1)[1] for k in self.paths if k.startswith(submodel + "/")]


def load_artifacts(out_dir: str | Path, profile: Profile, weights_id: Mapping[str, str] | str,
                   device: str | torch.device = "cpu", *, fmt: str | None = None, precision: str | None = None,
                   submodels: tuple[str, ...] | None = None, verify_hashes: bool = True) -> LoadedArtifacts:
    """Validate an artifact directory against this run; return its artifact paths or refuse. ``weights_id``:
    one id for every sub-model (``"random:0"``) or a mapping per sub-model."""
    root = Path(out_dir)
    try:
        m = read_manifest(root)
    except ArtifactMismatch as e:
        raise ArtifactMismatch(f"{e}\n  rebuild: {_cmd(None, profile, weights_id, fmt, precision, root)}") from None
    if m is None:
        raise ArtifactMismatch(f"{root}: no {MANIFEST} (not an export directory, or the export did not finish)\n"
                               f"  rebuild: {_cmd(None, profile, weights_id, fmt, precision, root)}")
    diffs = []
    if m["profile"]["name"] != profile.name or m["profile"]["digest"] != profile.digest():
        diffs.append(f"profile: artifacts built for {m['profile']['name']} ({m['profile']['digest']}), "
                     f"this run uses {profile.name} ({profile.digest()})")
    for what, want in (("format", fmt), ("precision", precision)):
        if want is not None and m[what] != want:
            diffs.append(f"{what}: artifacts are {m[what]}, this run wants {want}")
    subs = submodels or tuple(m["contracts"])
    diffs += contract_diffs(m, profile, subs)
    for sub in subs:
        want = weights_id if isinstance(weights_id, str) else weights_id.get(sub)
        have = m["weights"].get(sub)
        if want is not None and have != want:
            diffs.append(f"weights of {sub}: artifacts built from {have}, this run has {want}")
    if m["format"] in ("aoti", "tensorrt"):  # compiled code: exact tools and GPU architecture
        now = tool_versions(m["format"])
        for tool, ver in m["tools"].items():
            if tool != "python" and now.get(tool) != ver:
                diffs.append(f"{tool}: artifacts built with {ver}, this runtime has {now.get(tool)}")
        dev = device_info(device)
        if (dev["kind"], dev["arch"]) != (m["device"]["kind"], m["device"]["arch"]):
            diffs.append(f"device: artifacts built for {m['device']['kind']} {m['device']['arch']}, "
                         f"this run is on {dev['kind']} {dev['arch']}")
    paths = {}
    _hash = FileHashes()
    for key, a in m["artifacts"].items():
        if a["submodel"] not in subs:
            continue
        p = root / a["file"]
        if not p.is_file():
            diffs.append(f"missing artifact {key}: {p}")
            continue
        if verify_hashes and _hash(p) != a["sha256"]:
            diffs.append(f"artifact {key} was modified: sha256 of {p.name} differs from the manifest")
        if a.get("data_file"):
            dp = root / a["data_file"]
            if not dp.is_file():
                diffs.append(f"missing external data of {key}: {dp}")
            elif verify_hashes and _hash(dp) != a["data_sha256"]:
                diffs.append(f"external data of {key} was modified: {dp.name}")
        paths[key] = p
    for sub in subs:
        if sub not in m["contracts"]:
            diffs.append(f"no {sub} artifacts in this directory")
    cmd = _cmd(m, profile, weights_id, fmt, precision, root)
    if diffs:
        raise ArtifactMismatch(f"{root} does not match this run:\n  - " + "\n  - ".join(diffs) + f"\n  rebuild: {cmd}")
    return LoadedArtifacts(root, m, paths, cmd)


_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def contract_diffs(m: Mapping, profile: Profile, subs, limit: int = 6) -> list[str]:
    """How the contracts recorded in manifest ``m`` for ``subs`` differ from the ones ``profile`` derives at
    the manifest's precision (empty when they agree); at most ``limit`` lines."""
    from .contracts import contracts_for

    recorded = {s: m.get("contracts", {}).get(s) for s in subs if s in m.get("contracts", {})}
    if not recorded:
        return []
    prec = m.get("precision")
    if prec != "fp8" and prec not in _PRECISION_DTYPES:
        return [f"precision: unknown precision {prec!r} in the manifest"]
    from .fp8 import fp8_compute_dtype

    dtype = fp8_compute_dtype(profile.dtype) if prec == "fp8" else _PRECISION_DTYPES[prec]
    try:
        derived = contracts_for(profile, dtype)
    except ValueError as e:  # a profile this runtime cannot stream either
        return [f"profile {profile.name}: no contract can be derived ({e})"]
    out = [line for sub, rec in recorded.items()
           for line in _diff_contract(sub, rec, json.loads(json.dumps(derived[sub].to_dict())))]
    if len(out) > limit:
        out = out[:limit] + [f"... and {len(out) - limit} more contract differences"]
    return out


def _diff_contract(sub: str, rec: Mapping, want: Mapping) -> list[str]:
    """Recorded contract ``rec`` against the derived ``want`` (both ``Contract.to_dict()`` JSON)."""
    head = f"contract of {sub} (recorded in the manifest vs derived from this run's profile)"
    out = []
    for k in sorted(set(rec.get("meta", {})) | set(want.get("meta", {}))):
        a, b = rec.get("meta", {}).get(k), want.get("meta", {}).get(k)
        if a != b:
            out.append(f"{head}: {k} = {a!r}, this run needs {b!r}")
    rv, wv = ({v["name"]: v for v in c.get("variants", [])} for c in (rec, want))
    if set(rv) != set(wv):
        out.append(f"{head}: variants {sorted(rv)}, this run needs {sorted(wv)}")
    for name in sorted(set(rv) & set(wv)):
        a, b = rv[name], wv[name]
        for part in ("inputs", "outputs"):
            sa, sb = ([f"{x['name']} {x['shape']} {x['dtype']}" for x in c.get(part, [])] for c in (a, b))
            if sa != sb:
                bad = next(((x, y) for x, y in zip(sa, sb) if x != y), (len(sa), len(sb)))
                out.append(f"{head}: {sub}/{name} {part[:-1]} {bad[0]}, this run needs {bad[1]}")
        if a.get("static") != b.get("static") or a.get("updates") != b.get("updates"):
            out.append(f"{head}: {sub}/{name} static values {a.get('static')}, this run needs {b.get('static')}")
    return out


def _cmd(m, profile: Profile, weights_id, fmt, precision, root) -> str:
    fmt = fmt or (m or {}).get("format", "onnx")
    precision = precision or (m or {}).get("precision") or {"float32": "fp32", "bfloat16": "bf16",
                                                              "float16": "fp16"}[profile.dtype_name]
    model_dir = (m or {}).get("model_dir") if not (isinstance(weights_id, str) and weights_id.startswith("random:")) else None
    if model_dir is None and not (isinstance(weights_id, str) and weights_id.startswith("random:")):
        model_dir = "<MODEL_DIR>"
    return rebuild_command(profile.name, weights_id, fmt, precision, root, model_dir)


