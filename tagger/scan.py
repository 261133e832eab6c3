"""``tagger scan``: one pass over a library, with progress and a summary.

Each file's result is committed as soon as it is known, so Ctrl-C loses nothing
that was done and the next scan carries on with what was not (the files not yet
recorded still differ from the database).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path

import click

from .library import FileStat, Library, Options, Outcome, walk

log = logging.getLogger(__name__)


class Reporter:
    """A rich progress bar on a terminal, plain log lines elsewhere."""

    def __init__(self, total: int, quiet: bool):
        self.total = total
        self.done = 0
        self.t0 = time.monotonic()
        self.last_line = self.t0
        self.quiet = quiet
        self.bar = None
        if not quiet and sys.stderr.isatty() and total:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]scanning"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]:.1f} tracks/s"),
                TimeRemainingColumn(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task("scan", total=total, rate=0.0)

    def rate(self) -> float:
        return self.done / max(1e-9, time.monotonic() - self.t0)

    def step(self, outcome: Outcome) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.update(self.task, advance=1, rate=self.rate())
            if outcome.action == "failed":
                self.bar.console.print(f"[red]failed[/red] {outcome.path}: {outcome.reason}", highlight=False)
            return
        if self.quiet:
            return
        if outcome.action == "failed":
            click.echo(f"failed {outcome.path}: {outcome.reason}", err=True)
        now = time.monotonic()
        if now - self.last_line >= 10 or self.done == self.total:
            self.last_line = now
            eta = (self.total - self.done) / max(self.rate(), 1e-9)
            click.echo(f"{self.done}/{self.total} files, {self.rate():.1f} tracks/s, eta {eta:.0f}s", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


SUMMARY_ORDER = ("tagged", "would-tag", "kept", "low-confidence", "no-genre", "unchanged", "changed", "failed")


def run_scan(ctx, paths, *, dry_run: bool, force: bool, policy, top_k, min_confidence, as_json: bool, model_path=None, embed: bool = False, engine: str = "local", address: str | None = None) -> int:
    """Walk, classify, tag, record; returns the exit status (see ``tagger.exits``).

    ``model_path`` overrides ``[model] path`` (a model bundle or a learnt head); ``embed``
    only fills in missing embeddings (no tags, no predictions). ``engine="ray"`` decodes
    and classifies on the Ray cluster at ``address`` (:mod:`tagger.ray_engine`); every
    other stage is the same.
    """
    from .embedding import head_from_stored
    from .exits import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, fail, open_database
    from .model.bundle import BundleError
    from .model.head import load_any, make_classifier, written_names
    from .store.db import DatabaseLocked

    cfg = ctx.config
    cluster = _ray_engine(engine, address, embed, cfg)
    roots = [Path(p).expanduser().absolute() for p in paths] if paths else cfg.folders()
    missing_roots = [r for r in roots if not r.exists()]
    for r in missing_roots:
        click.echo(f"tagger: {r}: no such file or folder", err=True)
    roots = [r for r in roots if r.exists()]
    if not roots:
        fail("nothing to scan")
    try:
        bundle = load_any(model_path or cfg.model.path or None)
    except BundleError as exc:
        fail(str(exc))
    db = open_database(cfg)
    names = written_names(bundle, cfg.tags.names)  # a learnt head writes its labels as they are
    options = Options.from_config(cfg, policy=policy, top_k=top_k, min_confidence=min_confidence, dry_run=dry_run, names=names)
    walk_errors: list[tuple[str, str]] = []
    t0 = time.monotonic()
    counts: Counter[str] = Counter()
    outcomes: list[Outcome] = []
    interrupted = False
    stored: list[FileStat] = []
    classifier = make_classifier(bundle, batch_size=cfg.model.batch_size, max_windows=cfg.model.max_windows, workers=cfg.model.workers or None)
    library = Library(db, classifier, options)
    if embed:
        return _run_embed(library, cfg, roots, as_json, missing_roots)
    reporter = None
    try:
        files: list[FileStat] = list(
            walk(
                roots,
                include=cfg.library.include,
                exclude=cfg.library.exclude,
                follow_symlinks=cfg.library.follow_symlinks,
                on_error=lambda p, why: walk_errors.append((p, why)),
                on_swept=None if dry_run else _swept,
            )
        )
        for p, why in walk_errors:
            click.echo(f"tagger: skipped {p}: {why}", err=True)
        known = library.known()
        todo, unchanged = library.changed(files, known, force=force)
        # Unchanged files whose tags were decided under other settings (or not settled:
        # a dry run, a failed write) get these settings from their stored prediction.
        retag = library.unsettled(files, todo)
        # Under a learnt head, files already scanned get its genres from their stored
        # embeddings (no decoding), then are applied like any stored prediction.
        stored = head_from_stored(library, files, todo)
        retagged = set(retag)
        retag += [f for f in stored if f not in retagged]
        counts["unchanged"] += unchanged - len(retag)
        _mark_vanished(library, roots, known, {f.path for f in files}, walk_errors)
        if cluster is not None and (todo or retag):
            # Before any tag is written (the settings applied from stored predictions too):
            # no cluster is one line and exit 2 with nothing done. And before the progress
            # display, which wraps stdout: the engine's own redirect of it is then undone
            # last, and the summary goes to the real stdout.
            cluster.connect()
        reporter = Reporter(len(todo) + len(retag), quiet=as_json)
        for f in retag:
            outcome = library.reapply(f)
            if outcome is None:  # no prediction to apply: classify it
                todo.append(f)
                continue
            counts[outcome.action] += 1
            outcomes.append(outcome)
            reporter.step(outcome)
        if todo:
            # Register the model now: a locked database fails here, before anything is decoded.
            _ = library.model_id
            if cluster is not None:
                cluster.connect()  # no cluster: one line and exit 2, before anything is decoded
        for outcome in library.process(todo) if cluster is None else cluster.process(library, todo):
            counts[outcome.action] += 1
            outcomes.append(outcome)
            reporter.step(outcome)
    except KeyboardInterrupt:
        interrupted = True
    except DatabaseLocked as exc:
        if reporter:
            reporter.close()
        classifier.close()
        fail(str(exc), 3)
    except Exception as exc:
        if cluster is None or not _is_cluster_error(exc):
            raise
        if reporter:
            reporter.close()
        fail(str(exc))  # what was done is recorded; the next scan continues with the rest
    finally:
        if reporter:
            reporter.close()
        classifier.close()
        if cluster is not None:
            cluster.close()
        db.dispose()
    elapsed = time.monotonic() - t0
    processed = len(outcomes)  # not counts: "unchanged" also counts the files skipped unopened
    summary = {
        "roots": [str(r) for r in roots],
        "seconds": round(elapsed, 2),
        "tracks_per_second": round(processed / elapsed, 2) if elapsed > 0 else None,
        "counts": {k: counts.get(k, 0) for k in SUMMARY_ORDER},
        "dry_run": dry_run,
        "interrupted": interrupted,
        "model": {"name": bundle.name, "sha256": bundle.sha256},
        "skipped_paths": [{"path": p, "reason": r} for p, r in walk_errors],
        "failures": [{"path": o.path, "reason": o.reason} for o in outcomes if o.action == "failed"],
        "notes": _notes(outcomes, options) + ([f"learnt genres given to {len(stored)} files from their stored embeddings (no decoding)"] if stored else []),
    }
    if as_json:
        summary["files"] = [o.to_json() for o in outcomes]
        click.echo(json.dumps(summary))
    else:
        if dry_run:
            for o in outcomes:
                if o.action == "would-tag":
                    click.echo(f"would tag {o.path}: {'; '.join(o.before) or '(no genre)'} -> {'; '.join(o.genres)} ({o.confidence:.0%})")
        parts = ", ".join(f"{v} {k}" for k, v in summary["counts"].items() if v)
        click.echo(f"{'interrupted: ' if interrupted else ''}{parts or 'nothing to do'} in {elapsed:.1f}s" + (f" ({summary['tracks_per_second']} tracks/s)" if processed else ""))
        for note in summary["notes"]:
            click.echo(f"  {note}")
        reasons = Counter(f["reason"] for f in summary["failures"])
        for why, n in reasons.most_common():
            click.echo(f"  {n} failed: {why}")
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILURES if counts["failed"] or walk_errors or missing_roots else EXIT_OK


def _swept(path: str) -> None:
    click.echo(f"tagger: removed {path}: a temporary copy left by an interrupted tagger", err=True)


def _ray_engine(engine: str, address: str | None, embed: bool, cfg):
    """The Ray engine for ``--engine ray`` (None for a local scan); usage errors exit 2."""
    from .exits import fail

    if engine != "ray":
        if address:
            fail("--address is for --engine ray")
        return None
    from . import ray_engine

    if not ray_engine.available():
        fail(f"--engine ray needs Ray: {ray_engine.EXTRA}")
    if embed:
        fail("--embed runs on this machine only: leave out --engine ray")
    return ray_engine.RayEngine(address or cfg.ray.address, batch_size=cfg.model.batch_size, max_windows=cfg.model.max_windows, model_actors=cfg.ray.model_actors)


def _is_cluster_error(exc: Exception) -> bool:
    from .ray_engine import RayEngineError

    return isinstance(exc, RayEngineError)


def _notes(outcomes: list[Outcome], options: Options) -> list[str]:
    """What the settings left undone that a reader would otherwise have to guess.

    ``--top-k 2`` that wrote one genre on most files says why: the second was below
    ``min_confidence``.
    """
    short = sum(1 for o in outcomes if o.below and o.action != "failed")
    if not short:
        return []
    k, floor = options.top_k, options.min_confidence
    what = "second genre" if k == 2 else f"fewer than {k} genres: the rest"
    return [f"{what} below min_confidence {floor:.2f} on {short} file{'s' if short != 1 else ''}"]


def _mark_vanished(library: Library, roots: list[Path], known: dict, seen: set[str], walk_errors) -> None:
    """Tracks under a scanned folder that are no longer there become ``missing``.

    Folders that could not be read are left out, so an unreadable or unmounted
    folder never turns a library into "missing".
    """
    from .store import repo

    bad = tuple(p.rstrip("/") + "/" for p, _ in walk_errors)
    prefixes = [str(r).rstrip("/") + "/" for r in roots if r.is_dir()]
    if not prefixes:
        return
    gone = [
        p
        for p, (_, _, status) in known.items()
        if status not in ("missing", "removed") and p not in seen and any(p.startswith(x) for x in prefixes) and not any(p.startswith(b) for b in bad)
    ]
    if gone:
        with library.db.session() as s:
            repo.mark_missing(s, gone)


def _run_embed(library: Library, cfg, roots: list[Path], as_json: bool, missing_roots: list[Path]) -> int:
    """``tagger scan --embed``: embeddings for the files that have none; no tags, no predictions."""
    from .embedding import embed, missing_embeddings
    from .exits import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, fail
    from .store.db import DatabaseLocked

    t0 = time.monotonic()
    counts: Counter[str] = Counter()
    failures: list[dict[str, str]] = []
    walk_errors: list[tuple[str, str]] = []
    interrupted = False
    reporter = None

    def step(r) -> None:
        if not r.ok:
            failures.append({"path": r.path, "reason": r.error or ""})
        if reporter is not None:
            reporter.step(Outcome(r.path, "failed" if not r.ok else "embedded", reason=r.error or ""))

    try:
        lib = cfg.library
        files = list(walk(roots, include=lib.include, exclude=lib.exclude, follow_symlinks=lib.follow_symlinks, on_error=lambda p, why: walk_errors.append((p, why)), on_swept=_swept))
        for p, why in walk_errors:
            click.echo(f"tagger: skipped {p}: {why}", err=True)
        todo = missing_embeddings(library, files)
        counts["present"] = len(files) - len(todo)
        reporter = Reporter(len(todo), quiet=as_json)
        counts.update(embed(library, todo, on_result=step))
    except KeyboardInterrupt:
        interrupted = True
    except DatabaseLocked as exc:
        fail(str(exc), 3)
    finally:
        if reporter:
            reporter.close()
        if library.classifier is not None:
            library.classifier.close()
        library.db.dispose()
    elapsed = time.monotonic() - t0
    summary = {"roots": [str(r) for r in roots], "seconds": round(elapsed, 2), "embedded": counts["embedded"], "already": counts["present"], "failed": counts["failed"], "failures": failures, "interrupted": interrupted}
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{'interrupted: ' if interrupted else ''}{counts['embedded']} embedded, {counts['present']} already had an embedding, {counts['failed']} failed in {elapsed:.1f}s")
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILURES if counts["failed"] or walk_errors or missing_roots else EXIT_OK
