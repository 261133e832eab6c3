"""`tagger learn` end to end on real audio: how often the owner's own names come out right.

The shared GTZAN clips become an owner's library (``tests/helpers.py: owner_library``):
the clips of the training split carry genre tags in the owner's own words (metal is
``Heavy``, hiphop ``Rap; Hip Hop`` or ``rap``, pop and rock partly ID3v1 numbers such as
``(13)`` and ``(17)``, reggae partly ``reggae`` with the alias ``reggae = "Roots Reggae"``),
the clips of the validation split carry none. Then, with the real command:

    tagger scan LIB                       # the shipped model; embeddings stored
    tagger learn LIB --min-tracks N       # the owner's genres from the 40 tagged clips
    tagger scan --model HEAD LIB          # the untagged clips get the owner's names

and counts, over the validation clips whose genre the owner has a name for, how many
files now hold that name. The embedding the head learns from is the shipped model's
pretrained branch (musicnn's features, projected on principal components fitted without
labels), which never saw a GTZAN genre label, so the validation clips' genres are unseen by
the embedding and by the head.

    python benchmarks/learn_accuracy.py [--min-tracks 3] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import helpers  # noqa: E402  (tests/helpers.py: the owner's library)

from tagger import tags  # noqa: E402


def tagger(cfg: Path, *args: str) -> dict:
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TAGGER_CONFIG", None)
    proc = subprocess.run([sys.executable, "-m", "tagger.cli", "--config", str(cfg), *args, "--json"], env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"tagger {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--min-tracks", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="build the library here and keep it (default: a temporary folder)")
    args = ap.parse_args()
    if not helpers.AUDIO_MINI.is_dir():
        raise SystemExit(f"needs {helpers.AUDIO_MINI} (the shared GTZAN clips)")
    tmp = tempfile.TemporaryDirectory()
    work = args.keep or Path(tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    records = helpers.owner_library(work / "lib")
    cfg = work / "config.toml"
    cfg.write_text(
        f'[database]\npath = "{work / "tagger.db"}"\n\n[model]\nmax_windows = 1\n\n[tags]\nmin_confidence = 0.0\n\n'
        "[learn.aliases]\n" + "".join(f'"{k}" = "{v}"\n' for k, v in helpers.OWNER_ALIASES.items())
    )
    tagger(cfg, "scan", str(work / "lib"))
    learnt = tagger(cfg, "learn", str(work / "lib"), "--min-tracks", str(args.min_tracks), "--out", str(work / "head"))
    second = tagger(cfg, "scan", "--model", str(work / "head"), str(work / "lib"))
    labels = learnt["bundle"]["labels"]
    right: Counter[str] = Counter()
    total: Counter[str] = Counter()
    elsewhere: Counter[tuple[str, str]] = Counter()
    for r in records:
        if r["split"] != "valid":
            continue
        got = "; ".join(tags.read_state(r["path"]).genres)
        expected = helpers.OWNER_LABELS.get(r["genre"], (None,))[0]
        if expected in labels:
            total[r["genre"]] += 1
            right[r["genre"]] += got == expected
        else:
            elsewhere[(r["genre"], got)] += 1
    n, k = sum(total.values()), sum(right.values())
    val = learnt["validation"]
    print(f"base model {learnt['base']['name']} (sha256 {learnt['base']['sha256'][:12]}); {time.perf_counter() - t0:.0f} s in all")
    print(f"learnt {len(labels)} genres from {learnt['tracks']} tagged clips (--min-tracks {args.min_tracks}): {', '.join(labels)}")
    dropped = ", ".join(f"{d['label']} ({d['tracks']})" for d in learnt["dropped"]) or "none"
    print(f"  dropped: {dropped}")
    if val:
        print(f"  tagger learn's own validation (album folds of the tagged clips): {val['accuracy']:.1%} (chance {val['chance']:.1%})")
    print(f"scan with the learnt genres: {second['notes'][0] if second['notes'] else ''}")
    print(f"untagged validation clips named right: {k}/{n} = {k / n:.1%} (chance 1/{len(labels)} = {1 / len(labels):.1%})")
    for g in sorted(total):
        print(f"  {g:<8} -> {helpers.OWNER_LABELS[g][0]:<14} {right[g]}/{total[g]}")
    print("validation clips of genres the owner never tagged got:", ", ".join(f"{g}->{got} {c}" for (g, got), c in sorted(elsewhere.items())))


if __name__ == "__main__":
    main()
