"""The ``tagger`` command: a thin layer over the library API.

Exit status (all commands): 0 done, 1 done with some failures (files that could
not be decoded or tagged), 2 usage or configuration error, 3 database locked or
unusable, 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from . import exits, quiet
from .config import Config, ConfigError, load_config
from .exits import EXIT_DB, EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, fail


class Context:
    def __init__(self, config_file: str | None, verbose: int):
        self.config_file = config_file
        self.verbose = verbose
        self._config: Config | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            try:
                self._config = load_config(self.config_file)
            except ConfigError as exc:
                fail(f"configuration: {exc}", EXIT_USAGE)
        return self._config


pass_ctx = click.make_pass_decorator(Context)


class _Group(click.Group):
    """Ctrl-C exits with status 130 wherever it lands (click alone says "Aborted!" and exits 1)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            click.echo("tagger: interrupted", err=True)
            raise click.exceptions.Exit(EXIT_INTERRUPTED) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", envvar="TAGGER_CONFIG", type=click.Path(dir_okay=False), help="config.toml to use (also $TAGGER_CONFIG).")
@click.option("-v", "--verbose", count=True, help="More log output (-vv for debug).")
@click.version_option(package_name="tagger")
@click.pass_context
def main(ctx: click.Context, config_file: str | None, verbose: int) -> None:
    """Classify the genre of music files and write it into their tags."""
    from .paths import escape_streams

    escape_streams()  # a file name that is not UTF-8 is shown as caf\xe9.mp3, never a crash
    logging.basicConfig(
        level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    quiet.setup(verbose)  # stderr: tagger's own lines, not its libraries' start-up chatter
    ctx.obj = Context(config_file, verbose)


# --- model ---------------------------------------------------------------------


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--valid", "valid_split", type=click.Path(exists=True, dir_okay=False), help="Split file of validation ids (<genre>/<id>).")
@click.option("--train-split", type=click.Path(exists=True, dir_okay=False), help="Split file of training ids (default: DATA/splits/train.txt if present, else all not in --valid).")
@click.option("--valid-fraction", type=float, default=None, help="Hold out this fraction of clips (stratified) when there is no split file.")
@click.option("--epochs", type=int, default=None, help="Epochs per member.")
@click.option("--members", type=int, default=None, help="Models in the averaged ensemble.")
@click.option("--crop", type=int, default=None, help="Training crop width in columns.")
@click.option("--batch-size", type=int, default=None)
@click.option("--learning-rate", type=float, default=None)
@click.option("--patience", type=int, default=None, help="Early stopping: epochs without a better valid accuracy.")
@click.option("--seed", type=int, default=None)
@click.option("--select", type=click.Choice(["best", "last"]), default=None, help="Keep each member's best epoch on --valid (valid then overstates accuracy) or the last epoch (honest; default when the valid figure is to be reported).")
@click.option("--mixup", type=click.FloatRange(0), default=None, help="Mixup alpha (0 turns mixup off; default 0.3 for a DenseNet, 0 for the musicnn tops of --labelled).")
@click.option("--masks/--no-masks", default=True, help="SpecAugment time and frequency masks.")
@click.option("--arch", "arch_json", default=None, help='DenseNet settings as JSON, e.g. \'{"blocks": [4, 4, 4], "growth": 12}\'.')
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="runs/model", show_default=True, help="Bundle directory (checkpoints inside; rerun to resume).")
@click.option("--cache", "cache_dir", type=click.Path(file_okay=False), default=None, help="Feature cache for audio folders (default: OUT/../feature-cache).")
@click.option("--name", default=None, help="Model name recorded in the bundle.")
@click.option("--jobs", type=click.IntRange(1), default=1, show_default=True, help="Members trained in parallel processes (one thread each).")
@click.option("--teacher", type=click.Choice(["musicnn"]), default=None, help="Build the model on the pretrained musicnn tagger (frozen branch + linear head, or with --distill a DenseNet taught by it; needs `pip install --no-deps musicnn==0.1.0`).")
@click.option("--densenet", "densenet_bundle", type=click.Path(exists=True), default=None, help="With --teacher: a DenseNet bundle (from `tagger train`, same training data) pooled with the branch.")
@click.option("--densenet-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="With --densenet: its weight in the log-linear pool of the two branches.")
@click.option("--patches", type=click.IntRange(1, 10), default=None, help="With --teacher: 3-second patches of each window the teacher hears (default 5, with --labelled 6; speed knob).")
@click.option("--embedding-dim", type=click.IntRange(2), default=None, help="With --teacher: principal components kept as the embedding (default 256).")
@click.option("--head-c", type=float, default=None, help="With --teacher: inverse L2 strength of the logistic-regression head (default 0.02).")
@click.option("--distill", is_flag=True, help="With --teacher: train a DenseNet student to reproduce the teacher's tags and penultimate layer (plus the genres) instead of building the branch; the bundle is a plain DenseNet.")
@click.option("--extra", "extra_paths", type=click.Path(exists=True, dir_okay=False), multiple=True, help="With --distill: unlabelled windows (.npz with 'levels', e.g. ../shared/data/extra-music/windows.npz) that teach through the teacher only. Repeatable.")
@click.option("--tag-weight", type=float, default=None, help="With --distill: weight of the teacher-tag loss (default 10).")
@click.option("--penultimate-weight", type=float, default=None, help="With --distill: weight of the teacher-penultimate loss (default 1).")
@click.option("--genre-weight", type=float, default=None, help="With --distill: weight of the genre loss while distilling (default 0: the genres come in the fine-tuning).")
@click.option("--finetune-epochs", type=click.IntRange(0), default=None, help="With --distill: epochs of the DenseNet recipe on the labelled windows after distilling (default 60; 0 skips).")
@click.option("--labelled-per-batch", type=click.IntRange(1), default=None, help="With --distill and --extra: labelled windows in each batch, the rest unlabelled (default 12 of 32).")
@click.option("--labelled", "labelled_paths", type=click.Path(exists=True, dir_okay=False), multiple=True, help="With --teacher: more windows (.npz with 'levels' and 'ids') whose source genres are in the .csv beside it (columns id, genres, and optionally artist, source), mapped onto tagger's vocabulary by the label map. Repeatable.")
@click.option("--label-map", type=click.Path(exists=True, dir_okay=False), default=None, help="With --labelled: a TOML file of source genre = [labels] entries on top of the built-in table (tagger/vocabulary.py).")
@click.option("--vocabulary", "vocabulary_list", default=None, help="With --labelled: the model's labels, comma-separated (default: DATA's genres plus every mapped label with 20 or more windows, 'other' among them).")
@click.option("--cv", "cv_folds", type=click.IntRange(0), default=5, show_default=True, help="With --labelled: folds of the artist-grouped cross-validation that calibrates the probabilities and measures the precision curve (0 skips it).")
@click.option("--l2", type=float, default=None, help="With --labelled: L2 strength of the label-set head (default 0.1).")
@click.option("--top-weight", type=click.FloatRange(0, 1), default=0.5, show_default=True, help="With --labelled: share of the fine-tuned musicnn tops in the pooled logits (--members of them, default 5, each --epochs, default 30, at --learning-rate, default 3e-4; --members 0: the linear head alone).")
@click.option("--mel-stats/--no-mel-stats", default=True, show_default=True, help="With --labelled: the linear head also reads the window's mel statistics (spectral envelope, onset periodicity, modulation spectrum; tagger/teacher/melstats.py).")
@click.option("--patch-std/--no-patch-std", default=True, show_default=True, help="With --labelled: ... and the standard deviation of musicnn's features over the window's patches, beside their mean and max.")
@click.option("--band-corr/--no-band-corr", default=True, show_default=True, help="With --labelled: ... and how the window's 16 mel band groups move together (their levels' correlations).")
@click.option("--prior-shift", type=click.FloatRange(0, 1), default=0.25, show_default=True, help="With --labelled: shift the calibrated logits this far toward balanced genres (each genre's logit less this times the log of its mean held-out probability; fitted in the cross-validation, so --cv 0 leaves it out). 0: off.")
@pass_ctx
def train(ctx: Context, data, valid_split, train_split, valid_fraction, epochs, members, crop, batch_size, learning_rate, patience, seed, select, arch_json, out_dir, cache_dir, name, jobs, mixup, masks, teacher, densenet_bundle, densenet_weight, patches, embedding_dim, head_c, distill, extra_paths, tag_weight, penultimate_weight, labelled_per_batch, genre_weight, finetune_epochs, labelled_paths, label_map, vocabulary_list, cv_folds, l2, top_weight, mel_stats, patch_std, band_corr, prior_shift) -> None:
    """Train a genre model on DATA (PNG layout or <genre>/ audio folders)."""
    import numpy as np

    if (distill or extra_paths) and not teacher:
        fail("--distill and --extra need --teacher musicnn")
    if extra_paths and not distill:
        fail("--extra is used only with --distill")
    if labelled_paths and (not teacher or distill):
        fail("--labelled needs --teacher musicnn (without --distill)")
    if not labelled_paths and (label_map or vocabulary_list):
        fail("--label-map and --vocabulary are used only with --labelled")
    if cv_folds == 1:
        fail("--cv takes 2 or more folds (0 skips the cross-validation)")
    labelled = table = None
    if labelled_paths:
        from .vocabulary import LabelMapError, load_label_map

        try:
            table = load_label_map(label_map)  # checked before the training stack loads (seconds)
        except LabelMapError as exc:
            fail(str(exc))
        _need_train_extra("training")
        quiet.load_backend()  # Keras and TensorFlow without their start-up chatter on stderr
        from .teacher.mixed import LabelledError, concat, load_labelled

        try:
            labelled = concat([load_labelled(p) for p in labelled_paths])
        except LabelledError as exc:
            fail(str(exc))
    extra = None
    if extra_paths:
        _need_train_extra("training")
        quiet.load_backend()
        from .teacher.distill import load_extra

        try:
            extra = load_extra([Path(p) for p in extra_paths])
        except (OSError, ValueError) as exc:
            fail(str(exc))
    _need_train_extra("training")
    from .dataset import list_items, read_split
    from .model.train import TrainConfig, run_training

    cfg = TrainConfig()
    for key, value in {"epochs": epochs, "members": members, "crop": crop, "batch_size": batch_size, "learning_rate": learning_rate, "patience": patience, "seed": seed, "mixup_alpha": mixup, "select": select}.items():
        if value is not None:
            setattr(cfg, key, value)
    if not masks:
        cfg.time_masks = cfg.freq_masks = 0
    if arch_json:
        try:
            cfg.arch = json.loads(arch_json)
        except ValueError as exc:
            fail(f"--arch is not JSON: {exc}")
    out = Path(out_dir)
    cache = Path(cache_dir) if cache_dir else out.parent / "feature-cache"
    root = Path(data)
    default_train = root / "splits" / "train.txt"
    if train_split is None and default_train.is_file():
        train_split = str(default_train)
    all_ids = [i for i, _, _ in list_items(root)]
    valid_ids = read_split(valid_split) if valid_split else None
    train_ids = read_split(train_split) if train_split else None
    if valid_ids is None and valid_fraction:
        rng = np.random.default_rng(cfg.seed)
        pool = [i for i in all_ids if train_ids is None or i in set(train_ids)]
        by_genre: dict[str, list[str]] = {}
        for i in pool:
            by_genre.setdefault(i.split("/")[0], []).append(i)
        valid_ids = []
        for items in by_genre.values():
            k = max(1, round(len(items) * valid_fraction))
            valid_ids += [items[j] for j in rng.permutation(len(items))[:k]]
    if train_ids is None:
        held = set(valid_ids or [])
        train_ids = [i for i in all_ids if i not in held]
    overlap = set(train_ids) & set(valid_ids or [])
    if overlap:
        fail(f"{len(overlap)} clips are in both the training and the validation split (first: {sorted(overlap)[0]})")
    try:
        tr = _load_ids(data, train_ids, cache, "training data")
        va = _load_ids(data, valid_ids, cache, "validation data", labels=tr.labels) if valid_ids else None
    except ValueError as exc:
        fail(str(exc))
    route = "" if teacher and not distill else f"; {cfg.members} member(s) x {cfg.epochs} epochs"  # the teacher routes say their own
    click.echo(f"training on {tr.n_clips} clips ({len(tr.x)} windows), validating on {va.n_clips if va else 0}{route}", err=True)

    def progress(row: dict) -> None:
        if row.get("finished"):
            click.echo(f"member {row['member']} finished", err=True)
            return
        best = f" (best {row['best']:.1%})" if row.get("best", -1) >= 0 else ""
        val = f"  valid {row['val_accuracy']:.1%}{best}" if "val_accuracy" in row else ""
        click.echo(f"member {row['member']} epoch {row['epoch']:>3}/{row['epochs']}  loss {row['loss']:.3f}  lr {row['lr']:.2e}{val}  {row['seconds']:.1f}s", err=True)

    summary = {"source": root.name, "train": tr.summary(), "valid": va.summary() if va else None}
    if teacher:
        from .teacher.checkpoint import TeacherUnavailable

        try:
            if distill:
                from .teacher.distill import DistillConfig, load_extra, run_distillation

                dc = DistillConfig(arch=cfg.arch)
                if not masks:
                    dc.time_masks = dc.freq_masks = 0
                given = {
                    "seed": seed, "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate, "mixup_alpha": mixup,
                    "tag_weight": tag_weight, "penultimate_weight": penultimate_weight, "labelled_per_batch": labelled_per_batch,
                    "genre_weight": genre_weight, "finetune_epochs": finetune_epochs,
                }  # fmt: skip
                for key, value in given.items():
                    if value is not None:
                        setattr(dc, key, value)
                from .model.bundle import file_sha256

                summary["extra"] = [{"file": Path(p).name, "sha256": file_sha256(Path(p))} for p in extra_paths]
                bundle, metrics = run_distillation(
                    tr, va, extra if extra is not None else load_extra([]), dc, out, name=name or out.name, data_summary=summary,
                    cache_dir=cache.parent / "teacher-cache", progress=lambda s: click.echo(s, err=True),
                )
            elif labelled is not None:
                from .model.bundle import file_sha256
                from .teacher.branch import HeadConfig
                from .teacher.mixed import run_mixed_training
                from .teacher.top import TopConfig

                hc = HeadConfig(patches=6, mel_stats=mel_stats, patch_std=patch_std, band_corr=band_corr, prior_shift=prior_shift)
                for key, value in {"patches": patches, "embedding_dim": embedding_dim, "l2": l2, "seed": seed}.items():
                    if value is not None:
                        setattr(hc, key, value)
                tc = TopConfig()
                for key, value in {"members": members, "epochs": epochs, "learning_rate": learning_rate, "batch_size": batch_size, "mixup_alpha": mixup}.items():
                    if value is not None:
                        setattr(tc, key, value)
                hc.top = tc.to_dict() if tc.members > 0 else {}
                hc.top_weight = top_weight if tc.members > 0 else 0.0
                summary["labelled"] = [{"file": Path(p).name, "sha256": file_sha256(Path(p))} for p in labelled_paths]
                vocab = [v.strip().lower() for v in vocabulary_list.split(",") if v.strip()] if vocabulary_list else None
                try:
                    bundle, metrics = run_mixed_training(
                        tr, va, labelled, hc, out, name=name or out.name, data_summary=summary, cache_dir=cache.parent / "teacher-cache",
                        table=table, vocabulary=vocab, cv=cv_folds, progress=lambda s: click.echo(s, err=True),
                    )
                except ValueError as exc:
                    fail(str(exc))
                _echo_cv(metrics)
            else:
                from .teacher.branch import HeadConfig, run_branch_training

                hc = HeadConfig(densenet_weight=densenet_weight if densenet_bundle else 0.0)
                for key, value in {"patches": patches, "embedding_dim": embedding_dim, "c": head_c}.items():
                    if value is not None:
                        setattr(hc, key, value)
                bundle, metrics = run_branch_training(
                    tr, va, hc, out, name=name or out.name, data_summary=summary, cache_dir=cache.parent / "teacher-cache",
                    densenet_bundle=Path(densenet_bundle) if densenet_bundle else None, progress=lambda s: click.echo(s, err=True),
                )
        except TeacherUnavailable as exc:
            fail(str(exc))
    else:
        bundle, metrics = run_training(tr, va, cfg, out, name=name or out.name, data_summary=summary, progress=progress, jobs=jobs)
    click.echo(f"saved {bundle.path} (sha256 {bundle.sha256[:12]})")
    if "valid" in metrics:
        agreement = f"; tag agreement with the teacher {metrics['valid_tag_agreement']:.3f}" if "valid_tag_agreement" in metrics else ""
        click.echo(f"valid accuracy {metrics['valid']['accuracy']:.2%} on {metrics['valid']['n']} clips{agreement}")


def _echo_cv(metrics: dict) -> None:
    """The held-out figures of a mixed-data run, as ``tagger train`` prints them."""
    cv = metrics.get("cv")
    if not cv:
        return
    if "gtzan" in cv:
        click.echo(f"cross-validated GTZAN accuracy among its genres {cv['gtzan']['accuracy_among_its_genres']:.2%} on {cv['gtzan']['tracks']} clips")
    rm = cv.get("real_music")
    if rm:
        click.echo(f"cross-validated real music ({rm['tracks']} tracks), temperature {cv['temperature']:.3f}:")
        click.echo(f"  {'min_confidence':>14} {'right':>6} {'wrong':>6} {'nothing':>8} {'precision':>9}")
        for r in rm["curve"]:
            mark = "  <- suggested" if r["threshold"] == rm["min_confidence"] else ""
            click.echo(f"  {r['threshold']:>14.2f} {r['right']:>6.1%} {r['wrong']:>6.1%} {r['nothing']:>8.1%} {r['precision']:>9.1%}{mark}")


def _need_train_extra(what: str) -> None:
    """Training and export need Keras/TensorFlow, which a plain install leaves out."""
    import importlib.util

    missing = [m for m in ("keras", "tensorflow", "tf2onnx") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"{what} needs the train extra ({', '.join(missing)} not installed): pip install 'tagger[train]' (from a checkout: pip install '.[train]')")


@main.group()
def teacher() -> None:
    """The pretrained teacher (musicnn) and the bridge from our windows to its input."""


@teacher.command("calibrate")
@click.argument("audio", type=click.Path(exists=True, file_okay=False))
@click.argument("images", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def teacher_calibrate(audio, images, as_json) -> None:
    """Fit the bridge's gain on clips present both as AUDIO (<genre>/<id>.flac) and as window IMAGES (<genre>/<id>.png)."""
    try:
        from .teacher.calibrate import calibrate
    except ImportError as exc:
        fail(f"calibration needs the train extra ({exc.name} not installed): pip install '.[train]'")
    try:
        cal = calibrate(audio, images)
    except ValueError as exc:
        fail(str(exc))
    if as_json:
        click.echo(json.dumps(cal.to_json()))
    else:
        click.echo(f"log10 gain {cal.log10_gain:.3f}; correlation with musicnn's own input {cal.correlation:.3f}, RMSE {cal.rmse:.3f}, on {cal.clips} clips")


@main.command("export")
@click.argument("bundle", type=click.Path(exists=True, file_okay=False), required=False)
def export_cmd(bundle) -> None:
    """Write BUNDLE's model.onnx from its model.keras (default: the shipped model), checked against Keras."""
    _need_train_extra("export")
    from .model.bundle import BundleError, default_bundle_dir
    from .model.export import export_bundle
    from .teacher import load_keras

    path = Path(bundle) if bundle else default_bundle_dir()
    try:
        info = export_bundle(path, model=load_keras(path))
    except BundleError as exc:
        fail(str(exc))
    check = info["check"]
    click.echo(
        f"wrote {path / info['file']} (opset {info['opset']}, embedding {info['outputs']['embedding']}); "
        f"largest difference from Keras on {check['windows']} windows: probabilities {check['max_abs_diff_genre']:.1e}, "
        f"embedding {check['max_abs_diff_embedding']:.1e}"
    )


def _load_ids(data, ids, cache, what, labels=None):
    from rich.progress import Progress

    from .dataset import is_png_layout, load_dataset

    with Progress(transient=True, disable=not sys.stderr.isatty()) as bar:
        task = bar.add_task(f"loading {what}", total=None)
        ds = load_dataset(
            data, ids, labels=labels, cache_dir=None if is_png_layout(data) else cache,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
        )
    for path, reason in ds.failures:
        click.echo(f"skipped {path}: {reason}", err=True)
    return ds


@main.command()
@click.argument("data", type=click.Path(exists=True, file_okay=False))
@click.option("--model", "model_path", type=click.Path(exists=True), default=None, help="Model bundle directory (default: [model] path, else the shipped model).")
@click.option("--split", type=click.Path(exists=True, dir_okay=False), help="Evaluate only the <genre>/<id> lines of this file.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the confusion matrix as PNG, and the precision/coverage curve over min_confidence beside it (NAME.precision.png).")
@click.option("--max-windows", type=click.IntRange(1), default=None, help="Windows per audio track (default: [model] max_windows).")
@pass_ctx
def evaluate(ctx: Context, data, model_path, split, as_json, plot, max_windows) -> None:
    """Score a model on labelled DATA (PNG layout or <genre>/ audio folders)."""
    from .dataset import read_split
    from .model.bundle import BundleError, load_bundle
    from .model.evaluate import plot_confusion, report_from
    from .model.infer import Classifier

    cfg = ctx.config
    try:
        bundle = load_bundle(model_path or cfg.model.path or None)
    except BundleError as exc:
        fail(str(exc))
    ids = read_split(split) if split else None
    try:
        from .dataset import genre_folders

        data_labels = genre_folders(data)
        unknown = [g for g in data_labels if g not in bundle.labels]
        if unknown:
            from .vocabulary import SOURCE_MAP, key

            # A folder named as sources name the genre (Hip-Hop, R&B): say which label it is.
            hints = [f"{g} (name the folder {'/'.join(sorted(SOURCE_MAP[key(g)] & set(bundle.labels)))})" if SOURCE_MAP.get(key(g), frozenset()) & set(bundle.labels) else g for g in unknown]
            fail(f"{data}: genre folders the model has no label for: {', '.join(hints)}; its labels: {', '.join(bundle.labels)}")
        from .dataset import load_dataset

        ds = load_dataset(data, ids, labels=data_labels, max_windows=max_windows or cfg.model.max_windows)
    except ValueError as exc:
        fail(str(exc))
    for path, reason in ds.failures:
        click.echo(f"skipped {path}: {reason}", err=True)
    from .model import scoring
    from .model.evaluate import abstentions
    from .vocabulary import NONE_LABEL

    clf = Classifier(bundle, batch_size=cfg.model.batch_size, workers=0)
    probs = clf.predict_windows(ds.x)
    # A larger vocabulary is scored on its choice among the data's genres; what a scan
    # would write (or abstain from) at min_confidence is reported beside it.
    report = report_from(probs, ds, bundle.labels, among=data_labels)
    floor = cfg.tags.min_confidence
    written = abstentions(report, floor, NONE_LABEL)
    truth = [frozenset([bundle.labels[t]]) for t in report.truth]
    rows = scoring.curve(report.probabilities, bundle.labels, truth)
    if plot:
        plot_confusion(report, plot)
        stem = Path(plot)
        scoring.plot_curve(rows, stem.with_name(stem.stem + ".precision.png"), {"min_confidence": floor}, title=f"{bundle.name} on {Path(data).name} ({report.n} clips)")
    if as_json:
        out = report.to_json()
        out["model"] = {"name": bundle.name, "sha256": bundle.sha256}
        out["at_min_confidence"] = written
        out["curve"] = rows
        out["skipped"] = [{"path": p, "reason": r} for p, r in ds.failures]
        click.echo(json.dumps(out))
    else:
        click.echo(f"model {bundle.name} ({bundle.sha256[:12]})")
        click.echo(report.text())
        click.echo(
            f"\nat min_confidence {floor:.2f} a scan writes a genre on {written['written']} of {report.n} clips "
            f"({written['right']} right, {written['wrong']} wrong: precision {written['precision']:.1%}) and nothing on "
            f"{written['nothing']} ({written['none_of_its_genres']} of them 'none of my genres')"
        )
    if ds.failures:
        sys.exit(EXIT_FAILURES)


# --- library ---------------------------------------------------------------------


def open_database(ctx: Context):
    return exits.open_database(ctx.config)


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--dry-run", "-n", "--pretend", is_flag=True, help="Write nothing to files; show what would change (predictions are still recorded).")
@click.option("--force", is_flag=True, help="Re-classify files even if unchanged since their last scan.")
@click.option("--policy", type=click.Choice(["keep", "merge", "replace"]), default=None, help="What to do with a genre already in the file (default: [tags] policy).")
@click.option("--top-k", type=click.IntRange(1), default=None, help="Write up to K genres.")
@click.option("--min-confidence", type=click.FloatRange(0, 1), default=None, help="Do not tag below this probability.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with the summary and every file's outcome.")
@click.option("--model", "model_path", type=click.Path(exists=True), default=None, help="Model bundle or learnt genres (`tagger learn --out DIR`) to use instead of [model] path.")
@click.option("--embed", is_flag=True, help="Only store embeddings for files that have none (for learn and similar); no tags, no predictions.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True, help="Where decoding and the model run: this machine, or a Ray cluster (the ray extra; docs/cluster.md).")
@click.option("--address", default=None, help="Ray cluster to join with --engine ray: auto or HOST:PORT (default: [ray] address).")
@pass_ctx
def scan(ctx: Context, paths, dry_run, force, policy, top_k, min_confidence, as_json, model_path, embed, engine, address) -> None:
    """Classify and tag the music under PATHS (default: [library] folders)."""
    from .scan import run_scan

    sys.exit(run_scan(ctx, paths, dry_run=dry_run, force=force, policy=policy, top_k=top_k, min_confidence=min_confidence, as_json=as_json, model_path=model_path, embed=embed, engine=engine, address=address))


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--min-tracks", type=click.IntRange(1), default=None, help="Keep genres with at least N tracks (default: [learn] min_tracks, 15).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default=None, help="Where to save the learnt genres (default: 'learnt' next to the database).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the validation's confusion matrix as PNG.")
@click.option("--folds", type=click.IntRange(2), default=5, show_default=True, help="Validation folds (of whole albums).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_ctx
def learn(ctx: Context, paths, min_tracks, out_dir, plot, folds, as_json) -> None:
    """Learn the genres people set in PATHS (default: [library] folders), from stored embeddings.

    Only genres a person set count (never tagger's own); spellings are folded together
    and [learn.aliases] merges names. Validation holds out whole albums. The result is a
    bundle for `tagger scan --model DIR` or [model] path.
    """
    from rich.progress import Progress

    from .learn import LearnRefused, read_library, render
    from .learn import learn as run_learn
    from .library import walk
    from .model.bundle import BundleError
    from .model.evaluate import plot_confusion
    from .model.head import installed_base

    cfg = ctx.config
    roots = [Path(p).expanduser().absolute() for p in paths] if paths else cfg.folders()
    for r in roots:
        if not r.exists():
            fail(f"{r}: no such file or folder")
    try:
        base = installed_base(cfg.model.path or None)
    except BundleError as exc:
        fail(str(exc))
    db = open_database(ctx)
    out = Path(out_dir) if out_dir else cfg.database.resolved().parent / "learnt"
    walk_errors: list[tuple[str, str]] = []
    lib = cfg.library
    files = list(walk(roots, include=lib.include, exclude=lib.exclude, follow_symlinks=lib.follow_symlinks, on_error=lambda p, why: walk_errors.append((p, why))))
    for p, why in walk_errors:
        click.echo(f"tagger: skipped {p}: {why}", err=True)
    with Progress(transient=True, disable=as_json or not sys.stderr.isatty()) as bar:
        task = bar.add_task("reading tags", total=len(files))
        reading = read_library(files, separator=cfg.tags.separator, progress=lambda: bar.advance(task))
    for p, why in reading.unreadable:
        click.echo(f"tagger: {p}: {why}", err=True)
    try:
        result = run_learn(db, reading, base, out, aliases=cfg.learn.aliases, min_tracks=min_tracks or cfg.learn.min_tracks, folds=folds)
    except LearnRefused as exc:
        fail(f"learn: {exc}")
    except BundleError as exc:
        fail(str(exc))
    finally:
        db.dispose()
    if plot and result.validation is not None:
        plot_confusion(result.validation.report, plot, title=f"learnt genres: held-out albums, accuracy {result.validation.report.accuracy:.1%}")
    click.echo(json.dumps(result.to_json()) if as_json else render(result))
    sys.exit(EXIT_FAILURES if reading.unreadable or walk_errors else EXIT_OK)


@main.command()
@click.argument("file", type=click.Path())
@click.option("-n", "count", type=click.IntRange(1), default=10, show_default=True, help="How many tracks.")
@click.option("--playlist", type=click.Path(dir_okay=False), help="Also write FILE and its neighbours as an M3U playlist (.m3u8).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_ctx
def similar(ctx: Context, file, count, playlist, as_json) -> None:
    """The tracks most like FILE (cosine similarity of stored embeddings; read-only)."""
    from .model.bundle import BundleError
    from .model.head import installed_base
    from .similar import SimilarError, duration_of, nearest, write_playlist

    path = str(Path(file).expanduser().absolute())
    try:
        base = installed_base(ctx.config.model.path or None)
    except BundleError as exc:
        fail(str(exc))
    db = open_database(ctx)
    try:
        found = nearest(db, base, path, count)
        if playlist:
            write_playlist(playlist, path, found, seed_duration=duration_of(db, path))
    except SimilarError as exc:
        fail(str(exc), EXIT_FAILURES)
    except OSError as exc:
        fail(f"{playlist}: {exc.strerror or exc}", EXIT_FAILURES)
    finally:
        db.dispose()
    if as_json:
        click.echo(json.dumps({"query": path, "model": {"name": base.name, "sha256": base.sha256}, "tracks": [t.to_json() for t in found], "playlist": playlist}))
        return
    for t in found:
        genres = "; ".join(t.genres) or (f"({t.note})" if t.note else "(no genre)")
        click.echo(f"{t.similarity:6.3f}  {t.path}  [{genres}]")
    if not found:
        click.echo("no other track has an embedding of this model yet")
    if playlist:
        click.echo(f"wrote {playlist} ({len(found) + 1} tracks)")


@main.command()
@click.argument("paths", nargs=-1, type=click.Path())
@click.option("--all", "all_tracks", is_flag=True, help="Restore every file tagger has written to.")
@click.option("--dry-run", "-n", is_flag=True, help="Show what would be restored.")
@pass_ctx
def restore(ctx: Context, paths, all_tracks, dry_run) -> None:
    """Put back the genre files had before tagger wrote to them."""
    from .library import Library, Options

    if not paths and not all_tracks:
        fail("give PATH... or --all")
    db = open_database(ctx)
    lib = Library(db, None, Options.from_config(ctx.config, dry_run=dry_run))
    outcomes = lib.restore(None if all_tracks else list(paths))
    failed = 0
    for o in outcomes:
        if o.action == "failed":
            failed += 1
        click.echo(f"{o.action:<14} {o.path}  {'; '.join(o.before)} -> {'; '.join(o.genres) or '(no genre)'}  {o.reason}".rstrip())
    if not outcomes:
        click.echo("nothing to restore")
    sys.exit(EXIT_FAILURES if failed else EXIT_OK)


def _track_status(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A status the database knows (checked here, not by click.Choice: the list lives with the
    database layer, which ``tagger --help`` does not load)."""
    if value is None:
        return None
    from .store import TRACK_STATUSES

    if value.lower() not in TRACK_STATUSES:
        raise click.BadParameter(f"{value!r} is not a track status (one of {', '.join(TRACK_STATUSES)})")
    return value.lower()


@main.command()
@click.option("--genre", help="Top genre (model label or written name, case-insensitive).")
@click.option("--min-confidence", type=float, default=None)
@click.option("--status", callback=_track_status, help="Track status: pending, classified, tagged, kept, untagged, failed, removed, missing.")
@click.option("--path", "path_glob", help="Glob on the path, e.g. '*/Jazz/*'.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "csv"]), default="table", show_default=True)
@click.option("--limit", type=int, default=None)
@pass_ctx
def query(ctx: Context, genre, min_confidence, status, path_glob, fmt, limit) -> None:
    """List tracks with their genre (read-only)."""
    from .queries import query_tracks, render

    db = open_database(ctx)
    rows = query_tracks(db, genre=genre, min_confidence=min_confidence, status=status, path_glob=path_glob, limit=limit)
    click.echo(render(rows, fmt), nl=False)


@main.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def show(ctx: Context, file, as_json) -> None:
    """Everything known about one file: probabilities, tag history (read-only)."""
    from .queries import show_track

    db = open_database(ctx)
    info = show_track(db, str(Path(file).expanduser().absolute()))
    if info is None:
        fail(f"{file}: not in the database", EXIT_FAILURES)
    if as_json:
        click.echo(json.dumps(info, default=str))
        return
    click.echo(f"{info['path']}\n  status {info['status']}" + (f" ({info['last_error']})" if info["last_error"] else ""))
    click.echo(f"  size {info['size']}  duration {info['duration'] or 0:.1f}s  format {info['format']}  last scanned {info['last_scanned']}")
    for p in info["predictions"]:
        click.echo(f"  model {p['model']} ({p['created_at']}): chosen {', '.join(p['chosen']) or '-'}")
        for g, v in sorted(p["probabilities"].items(), key=lambda kv: -kv[1]):
            click.echo(f"    {g:<12} {v:6.1%} {'#' * round(v * 40)}")
    if info["tag_writes"]:
        click.echo("  tag history:")
        for w in info["tag_writes"]:
            flags = " (dry run)" if w["dry_run"] else " (restored)" if w["restored"] else ""
            click.echo(f"    {w['written_at']} {w['policy']}: {'; '.join(w['before']) or '(none)'} -> {'; '.join(w['after']) or '(none)'}{flags}  {w['reason'] or ''}".rstrip())


@main.command()
@click.option("--plot", type=click.Path(dir_okay=False), help="Draw the genre distribution to this PNG.")
@click.option("--json", "as_json", is_flag=True)
@pass_ctx
def stats(ctx: Context, plot, as_json) -> None:
    """Tracks per genre and per status (read-only)."""
    from .queries import plot_stats, track_stats

    db = open_database(ctx)
    st = track_stats(db)
    if plot:
        plot_stats(st, plot)
    if as_json:
        click.echo(json.dumps(st))
        return
    click.echo(f"{st['total']} tracks")
    click.echo("by status:")
    for k, v in st["by_status"].items():
        click.echo(f"  {k:<12}{v:>8}")
    click.echo("by top genre:")
    for k, v in st["by_genre"].items():
        click.echo(f"  {k:<12}{v:>8}")


# --- daemon ----------------------------------------------------------------------


@main.command()
@pass_ctx
def serve(ctx: Context) -> None:
    """Watch [library] folders and tag new and changed music (foreground; systemd runs this).

    SIGTERM/SIGINT stop it (exit 0), SIGHUP re-reads the config file. Logs go to stderr.
    """
    from tagger_service import serve as run_daemon

    sys.exit(run_daemon(ctx.config, verbose=ctx.verbose))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--errors", type=click.IntRange(0), default=10, show_default=True, help="How many recent errors to show.")
@pass_ctx
def status(ctx: Context, as_json, errors) -> None:
    """The daemon's queue, in-flight jobs, counts, recent errors and rate (read-only)."""
    from tagger_service.status import collect, render

    db = open_database(ctx)
    try:
        st = collect(db, errors=errors)
    finally:
        db.dispose()
    click.echo(json.dumps(st) if as_json else render(st), nl=as_json)


@main.group()
def db() -> None:
    """The genre database's schema."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
@pass_ctx
def db_upgrade(ctx: Context, revision) -> None:
    """Migrate the database to REVISION."""
    from .store.db import DatabaseLocked, upgrade

    path = ctx.config.database.resolved()
    try:
        rev = upgrade(path, revision, busy_timeout=ctx.config.database.busy_timeout)
    except DatabaseLocked as exc:
        fail(str(exc), EXIT_DB)
    click.echo(f"{path}: at revision {rev}")


@db.command("current")
@pass_ctx
def db_current(ctx: Context) -> None:
    """Show the database's revision and the code's head revision."""
    from .store.db import current

    path = ctx.config.database.resolved()
    if not path.exists():
        fail(f"{path}: no database yet (any tagger command creates it)", EXIT_FAILURES)
    rev, head = current(path)
    click.echo(f"{path}: revision {rev} (head {head}){'' if rev == head else ' - run `tagger db upgrade`'}")


@db.command("path")
@pass_ctx
def db_path(ctx: Context) -> None:
    """Print where the database is (for `sqlite3 $(tagger db path)`)."""
    click.echo(str(ctx.config.database.resolved()))


if __name__ == "__main__":  # pragma: no cover
    main()
