"""Model windows/s and memory on ONNX Runtime, and end-to-end tracks/s of ``classify``.

    python benchmarks/model_throughput.py [--model BUNDLE] [--chunks 4,8,16,64] [--tracks 24] [--batch 64]

1. The model alone, for each ``--chunks`` size (windows per ONNX Runtime call on the CPU,
   ``tagger.model.runtime.CPU_CHUNK``), each in a fresh process: windows/s over
   ``--windows`` random 387-column windows, the process's RSS after and its peak.
2. ``classify`` end to end on 4-minute MP3s with the defaults (decode workers, batches of
   ``--batch``), ``--windows-per-track`` windows each.

Prints figures; nothing is asserted. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from tagger import features  # noqa: E402
from tagger.model.bundle import load_bundle  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return float(f.read().split("VmRSS:")[1].split()[0]) / 1024


def model_alone(model: str, chunk: int, windows: int, arena: bool) -> dict:
    """In this process: windows/s and memory of one session running ``windows`` windows."""
    from tagger.model.runtime import OnnxModel

    bundle = load_bundle(model or None)
    before = rss_mb()
    m = OnnxModel(bundle.path / "model.onnx", chunk=chunk, arena=arena)
    x = np.random.default_rng(0).integers(0, 256, size=(windows, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    m.run(x[:chunk])  # first run: allocations, kernels chosen
    t = time.perf_counter()
    m.run(x)
    dt = time.perf_counter() - t
    return {
        "chunk": chunk, "arena": arena, "windows_per_s": round(windows / dt, 1), "providers": m.providers,
        "rss_before_mb": round(before), "rss_after_mb": round(rss_mb()),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="")
    ap.add_argument("--chunks", default="4,8,16,64", help="CPU chunk sizes to compare (comma-separated)")
    ap.add_argument("--windows", type=int, default=128, help="windows per model-alone timing")
    ap.add_argument("--no-arena", action="store_true", help="also time each chunk without ONNX Runtime's memory arena")
    ap.add_argument("--tracks", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--windows-per-track", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the generated MP3s (kept between runs)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        chunk, arena = args.child.split(":")
        print(json.dumps(model_alone(args.model, int(chunk), args.windows, arena == "1")))
        return

    bundle = load_bundle(args.model or None)
    print(f"model {bundle.name} ({bundle.sha256[:12]}), {os.cpu_count()} CPUs")
    for chunk in [int(c) for c in args.chunks.split(",") if c]:
        for arena in (True, False) if args.no_arena else (True,):
            out = subprocess.run(
                [sys.executable, __file__, "--model", args.model, "--windows", str(args.windows), "--child", f"{chunk}:{int(arena)}"],
                capture_output=True, text=True, check=True,
            ).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"model alone, {r['chunk']:>3} windows per call{'' if arena else ', no arena'}: {r['windows_per_s']:6.1f} windows/s; "
                  f"RSS {r['rss_before_mb']} MB before the session, {r['rss_after_mb']} MB after, peak {r['peak_rss_mb']} MB ({r['providers'][0]})", flush=True)

    if not args.tracks:
        return
    from _library import four_minute_mp3s

    from tagger.model.infer import Classifier

    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "tagger-bench-mp3"
    files = four_minute_mp3s(work, args.tracks)
    clf = Classifier(bundle, batch_size=args.batch, max_windows=args.windows_per_track, workers=args.workers)
    list(clf.classify(files[:2]))  # start the decode workers, load the model
    t = time.perf_counter()
    results = list(clf.classify(files))
    dt = time.perf_counter() - t
    clf.close()
    bad = [r for r in results if not r.ok]
    print(f"end to end: {len(files) / dt:.2f} tracks/s ({len(files)} four-minute MP3s, {args.windows_per_track} windows each, "
          f"{clf.workers} decode workers, batches of {args.batch}, {dt:.1f}s); {len(bad)} failed")


if __name__ == "__main__":
    main()
