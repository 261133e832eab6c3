"""Model windows/s, and end-to-end tracks/s of ``classify`` on 4-minute MP3s.

    python benchmarks/model_throughput.py [--model BUNDLE] [--tracks 24] [--batch 64]

Prints figures; nothing is asserted. Run on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
from _library import four_minute_mp3s  # noqa: E402

from tagger import features  # noqa: E402
from tagger.model.infer import Classifier  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--tracks", type=int, default=24)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--windows", type=int, default=3, help="windows per track")
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--work", default=None, help="folder for the generated MP3s (kept between runs)")
    args = ap.parse_args()
    import keras

    clf = Classifier(args.model, batch_size=args.batch, max_windows=args.windows, workers=args.workers)
    print(f"model {clf.bundle.name} ({clf.bundle.sha256[:12]}), backend {keras.backend.backend()}, {os.cpu_count()} CPUs, batch {args.batch}")
    x = np.random.default_rng(0).integers(0, 256, size=(args.batch * 4, features.N_MELS, features.N_COLUMNS), dtype=np.uint8)
    clf.predict_windows(x[: args.batch])  # build/trace
    t = time.perf_counter()
    clf.predict_windows(x)
    dt = time.perf_counter() - t
    print(f"model: {len(x) / dt:.1f} windows/s ({len(x)} windows of {features.N_COLUMNS} columns in {dt:.2f}s)")

    work = Path(args.work) if args.work else Path(tempfile.gettempdir()) / "tagger-bench-mp3"
    files = four_minute_mp3s(work, args.tracks)
    list(clf.classify(files[:2]))  # start the decode workers
    t = time.perf_counter()
    results = list(clf.classify(files))
    dt = time.perf_counter() - t
    clf.close()
    bad = [r for r in results if not r.ok]
    print(f"end to end: {len(files) / dt:.2f} tracks/s ({len(files)} four-minute MP3s, {args.windows} windows each, "
          f"{clf.workers} decode workers, {dt:.1f}s); {len(bad)} failed")


if __name__ == "__main__":
    main()
