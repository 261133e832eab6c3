"""Disk taken by ``pip install .``: a fresh virtual environment, then what is in it.

    python benchmarks/install_size.py [--extras train] [--source CHECKOUT] [--keep DIR]

Makes a venv in a temporary folder with the Python running this script, installs this
checkout (or ``--source``, e.g. an older commit's files) with ``pip install .`` (or
``.[EXTRAS]``; not editable), and prints the venv's
size on disk (allocated blocks, hard links counted once) and the largest installed
distributions. Prints figures; nothing is asserted. Uses pip's cache when it has one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def disk_usage(path: Path) -> int:
    """Bytes allocated under ``path`` (like ``du -s``: blocks, each inode once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def by_distribution(venv: Path) -> list[tuple[str, int]]:
    """Size of each installed distribution, from its RECORD (files it installed)."""
    code = (
        "import json, os, importlib.metadata as m\n"
        "out = {}\n"
        "for d in m.distributions():\n"
        "    n = 0\n"
        "    for f in d.files or []:\n"
        "        p = f.locate()\n"
        "        try: n += os.lstat(p).st_blocks * 512\n"
        "        except OSError: pass\n"
        "    out[d.metadata['Name']] = n\n"
        "print(json.dumps(out))\n"
    )
    import json

    out = subprocess.run([str(venv / "bin" / "python"), "-c", code], capture_output=True, text=True, check=True).stdout
    return sorted(json.loads(out).items(), key=lambda kv: -kv[1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--extras", default="", help="extras to install too, e.g. train or gpu")
    ap.add_argument("--keep", default=None, help="make the venv here and keep it")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--source", default=str(ROOT), help="the checkout to install (default: this one)")
    args = ap.parse_args()
    base = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="tagger-install-"))
    venv = base / "venv"
    spec = f"{args.source}[{args.extras}]" if args.extras else args.source
    try:
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        empty = disk_usage(venv)
        subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", spec], check=True)
        total = disk_usage(venv)
        mib = 1024 * 1024
        print(f"pip install {'.[' + args.extras + ']' if args.extras else '.'}: {total / mib:.0f} MiB on disk "
              f"({(total - empty) / mib:.0f} MiB installed into a {empty / mib:.0f} MiB empty venv); largest:")
        for name, size in by_distribution(venv)[: args.top]:
            print(f"    {name:<24} {size / mib:7.1f} MiB")
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
