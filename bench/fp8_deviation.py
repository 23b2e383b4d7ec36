"""The ``--precision fp8`` deviation table: per-forward x0, final latents and decoded-frame PSNR of fp8 (and
bf16) against bf16 / fp32 on the same seeded stream (``hallolive_rt.runtime.fp8_report``).

    python bench/fp8_deviation.py                                        # tiny preset, CPU (emulated)
    python bench/fp8_deviation.py --preset hallolive-512x992 --device cuda --blocks 2 --no-fp32 \
        --out bench/results/h200-fp8-deviation-hallolive-512x992.json   # full size, random weights, GPU

Writes bench/results/<cpu|gpu>-fp8-deviation-<preset>.json unless --out is given, and prints the table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hallolive_rt.runtime.fp8_report import fp8_deviation  # noqa: E402
from hallolive_rt.runtime.metrics import write_json  # noqa: E402


def _fmt(row: dict) -> str:
    x = row["x0_rel_rms"]
    psnr = row.get("frames_psnr_db")
    return (f"{row['run']:>14} vs {row['vs']:<5} x0 rel-RMS video max {x['video']['max']:.2e} mean "
            f"{x['video']['mean']:.2e} | audio max {x['audio']['max']:.2e} mean {x['audio']['mean']:.2e} | "
            f"latents video {row['latents_rel_rms']['video']:.2e} audio {row['latents_rel_rms']['audio']:.2e}"
            + (f" | frames PSNR {psnr:.1f} dB" if psnr is not None else ""))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", help="tiny (CPU) or hallolive-512x992 (GPU, random weights)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--blocks", type=int, default=None, help="blocks to stream (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-fp32", action="store_true", help="skip the fp32 reference run (47 GB at full size)")
    ap.add_argument("--impls", default="scaled_mm,emulate", help="fp8 implementations to run (comma-separated)")
    ap.add_argument("--act-scale", default="token", choices=["token", "tensor"])
    ap.add_argument("--no-decode", action="store_true", help="skip decoding frames (no PSNR column)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default: bench/results/<cpu|gpu>-fp8-deviation-<preset>.json)")
    a = ap.parse_args(argv)
    res = fp8_deviation(a.preset, device=a.device, blocks=a.blocks, seed=a.seed, with_fp32=not a.no_fp32,
                        impls=tuple(a.impls.split(",")), act_scale=a.act_scale, decode=not a.no_decode,
                        log=lambda m: print(m, file=sys.stderr))
    res["command"] = "python bench/fp8_deviation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(a.out) if a.out else REPO / "bench" / "results" / (
        f"{'cpu' if res['emulated'] else 'gpu'}-fp8-deviation-{res['preset']}.json")
    write_json(res, out)
    for row in res["rows"]:
        print(_fmt(row))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
