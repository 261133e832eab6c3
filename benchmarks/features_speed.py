"""Cost of the representation: ``window_matrix`` per 30-second window, and its imports.

    python benchmarks/features_speed.py [--windows 200] [--rounds 3]

A decode worker turns every window it decodes into the model's matrix, with scipy's
FFT (``features.use_scipy_fft``) and one BLAS thread; a one-file scan makes one window
with numpy's FFT in a process that has to import what it needs first. So this prints,
each from a fresh interpreter: the CPU time of one ``window_matrix`` call on 30 s of
noise under a slow swell with each FFT (best and median of ``--rounds`` rounds), and the
wall time of importing ``tagger.features`` and making one window against importing
numpy alone. Prints figures; nothing is asserted.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

PER_WINDOW = """
import sys, time
import numpy as np
from threadpoolctl import threadpool_limits
threadpool_limits(1)  # after numpy, as in the decode workers
from tagger import features
if sys.argv[1] == "scipy":
    features.use_scipy_fft()
t = np.arange(features.WINDOW_SAMPLES) / features.SAMPLE_RATE
rng = np.random.default_rng(0)
y = (rng.standard_normal(t.size) * (0.3 + 0.2 * np.sin(2 * np.pi * 0.5 * t))).astype(np.float32)
features.window_matrix(y)
c = time.process_time()
for _ in range(int(sys.argv[2])):
    features.window_matrix(y)
print((time.process_time() - c) / int(sys.argv[2]) * 1e3)
"""

FIRST_WINDOW = (
    "import numpy as np; from tagger import features as F; "
    "F.window_matrix(np.random.default_rng(0).standard_normal(F.WINDOW_SAMPLES).astype(np.float32))"
)


def fresh_process(code: str, *argv: str) -> tuple[float, str]:
    """(wall seconds, stdout) of ``python -c code argv...`` in a fresh interpreter."""
    t = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True)
    return time.perf_counter() - t, out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    per: dict[str, list[float]] = {"numpy": [], "scipy": []}
    for _ in range(args.rounds):  # alternating, each in its own process
        for backend in per:
            per[backend].append(float(fresh_process(PER_WINDOW, backend, str(args.windows))[1]))
    for backend, ms in per.items():
        print(f"window_matrix with {backend}'s FFT: {min(ms):.2f} ms CPU per window at best, median {statistics.median(ms):.2f} ms ({args.rounds} rounds of {args.windows}, one BLAS thread)")
    base = statistics.median(fresh_process("import numpy")[0] for _ in range(5))
    first = statistics.median(fresh_process(FIRST_WINDOW)[0] for _ in range(5))
    print(f"fresh process: import numpy {base:.3f} s; import tagger.features and make one window {first:.3f} s (median of 5; {first - base:.3f} s more)")


if __name__ == "__main__":
    main()
