"""Redraw a bundle's ``precision.png`` from the curve its training run stored in ``bundle.json``.

    python scripts/precision_plot.py [BUNDLE] [--min-confidence 0.6]

The training run marks the threshold it suggests; the shipped default is chosen afterwards
(docs/genres.md), so the shipped plot marks both. No model runs: the curve is the training
run's artist-grouped cross-validation, as stored.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tagger.library import Options
from tagger.model import scoring

DEFAULT = Path(__file__).resolve().parents[1] / "tagger" / "models" / "default"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("bundle", nargs="?", default=str(DEFAULT))
    ap.add_argument("--min-confidence", type=float, default=Options().min_confidence, help="the default to mark (the config's)")
    args = ap.parse_args()
    bundle = Path(args.bundle)
    cv = json.loads((bundle / "bundle.json").read_text())["metrics"]["cv"]
    rm = cv["real_music"]
    marks = {"default min_confidence": args.min_confidence, "suggested by the training run": rm["min_confidence"]}
    title = f"held-out real music ({rm['tracks']} tracks, {cv['folds']}-fold by artist)"
    scoring.plot_curve(rm["curve"], bundle / "precision.png", marks, title=title)
    print(f"{bundle / 'precision.png'}: {', '.join(f'{k} {v:.2f}' for k, v in marks.items())}")


if __name__ == "__main__":
    main()
