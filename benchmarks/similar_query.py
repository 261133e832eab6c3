"""`tagger similar` over a large library: query latency on a synthetic database.

Builds a real SQLite file through the store (migrations, the shipped model's row in
``models``, N tracks and N embeddings of the given dimension, float16 as tagger stores
them, in clusters so that neighbours mean something), then times
``tagger.similar.nearest`` — load every embedding of the model, cosine against the
query, top n — for several query tracks, and one whole ``tagger similar --json``
process (Python start-up and imports included).

    python benchmarks/similar_query.py --tracks 100000 --dim 180

The track paths point at files that do not exist, so reading the neighbours' genres
from their tags fails at once; on a real library that is n small tag reads more.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tagger.model.bundle import load_bundle  # noqa: E402
from tagger.similar import nearest  # noqa: E402
from tagger.store import embeddings, repo  # noqa: E402
from tagger.store.db import open_db  # noqa: E402
from tagger.store.models import Embedding, Track, utcnow  # noqa: E402


def build(path: Path, tracks: int, dim: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    bundle = load_bundle()
    db = open_db(path)
    with db.session() as s:
        model_id = repo.ensure_model(s, bundle.sha256, bundle.name, bundle.labels)
    centres = rng.normal(size=(64, dim)).astype(np.float32)
    now = utcnow()
    step = 10_000
    for start in range(0, tracks, step):
        ids = range(start + 1, min(tracks, start + step) + 1)
        rows = [
            {"id": i, "path": f"/music/artist{i // 200:04d}/album{i // 10:05d}/track{i:06d}.flac", "size": 1, "mtime": 1.0,
             "status": "tagged", "first_seen": now, "last_scanned": now, "updated_at": now}
            for i in ids
        ]
        x = np.maximum(centres[rng.integers(0, 64, len(rows))] + rng.normal(scale=0.7, size=(len(rows), dim)), 0) * 3
        with db.session() as s:
            s.connection().execute(Track.__table__.insert(), rows)
            s.connection().execute(
                Embedding.__table__.insert(),
                [{"track_id": r["id"], "model_id": model_id, "dim": dim, "vector": embeddings.encode(v), "windows": 2, "created_at": now} for r, v in zip(rows, x, strict=True)],
            )
    db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tracks", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=256, help="embedding size (the shipped model's is 256)")
    ap.add_argument("--queries", type=int, default=10)
    ap.add_argument("-n", type=int, default=10)
    ap.add_argument("--db", type=Path, default=None, help="reuse or create this database file")
    args = ap.parse_args()
    tmp = tempfile.TemporaryDirectory()
    path = args.db or Path(tmp.name) / "tagger.db"
    t0 = time.perf_counter()
    if not path.exists():
        build(path, args.tracks, args.dim)
    built = time.perf_counter() - t0
    db = open_db(path)
    bundle = load_bundle()
    rng = np.random.default_rng(1)
    times, cpu = [], []
    for q in rng.integers(1, args.tracks + 1, args.queries):
        query = f"/music/artist{q // 200:04d}/album{q // 10:05d}/track{q:06d}.flac"
        t, c = time.perf_counter(), time.process_time()
        found = nearest(db, bundle, query, args.n)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
        assert len(found) == args.n
    db.dispose()
    env = {**os.environ, "TAGGER_CONFIG": ""}
    cfg = Path(tmp.name) / "config.toml"
    cfg.write_text(f'[database]\npath = "{path}"\n')
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(cfg), "similar", "--json", query], env=env, capture_output=True, text=True)
    whole = time.perf_counter() - t
    assert proc.returncode == 0, proc.stderr
    assert len(json.loads(proc.stdout)["tracks"]) == args.n
    size = path.stat().st_size / 1e6
    print(f"database: {args.tracks} tracks, {args.dim}-value embeddings, {size:.0f} MB (built in {built:.1f}s); {os.cpu_count()} CPUs")
    print(f"query (load {args.tracks} embeddings, cosine, top {args.n}): median {statistics.median(times) * 1000:.0f} ms, "
          f"max {max(times) * 1000:.0f} ms over {len(times)} queries; CPU time median {statistics.median(cpu) * 1000:.0f} ms")
    print(f"load average while measuring: {os.getloadavg()[0]:.1f}")
    print(f"`tagger similar --json` process, start-up included: {whole:.2f} s")


if __name__ == "__main__":
    main()
