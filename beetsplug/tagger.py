"""tagger's genres inside beets: ``beet tagger [QUERY]``, and a genre for each imported item.

A thin layer over tagger's library API: the same decoding, batched ONNX Runtime
classifier (:func:`tagger.model.head.make_classifier`, a model bundle or learnt genres)
and the same choice of genres (:meth:`tagger.library.Options.choose`) as ``tagger scan``.
What differs is where the result goes: beets' own ``genres`` field, two flexible
attributes (``tagger_confidence``, ``tagger_model``), tagger's marker (``tagger_marker``,
written into the file as ``tagger scan`` writes it) and, when beets writes, the file's
tags through beets (``item.try_write()``). tagger's own database is not touched.

Behaviour follows beets' ``lastgenre``: ``auto`` adds an import stage, ``force: no`` leaves
items that have a genre alone, ``-p`` shows and changes nothing. Enable with
``plugins: tagger`` in beets' ``config.yaml``; options go under ``tagger:``.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from beets import ui
from beets.dbcore import types
from beets.library import Album, Item
from beets.plugins import BeetsPlugin

# tagger.config is dataclasses only (no numpy, no model): cheap at every beet start.
from tagger.config import ModelConfig, TagsConfig
from tagger.vocabulary import NONE_LABEL

if TYPE_CHECKING:
    from beets.importer import ImportSession, ImportTask
    from beets.library import Library

    from tagger.library import Options
    from tagger.model.infer import Classification

_TAGS = TagsConfig()
#: the item field that holds tagger's marker (see :func:`_marker_field`)
MARKER_FIELD = "tagger_marker"
_MODEL = ModelConfig()


def _marker_field() -> Any:
    """tagger's marker (``TAGGER_GENRE``: which genres tagger added, by which model) as a
    field beets writes with the rest: ``tagger scan`` then knows these genres as tagger's
    own, and ``tagger learn`` never learns from them as if a person had chosen them."""
    from mediafile import (
        ASFStorageStyle,
        MediaField,
        MP3DescStorageStyle,
        MP4StorageStyle,
        StorageStyle,
    )

    from tagger.tags import asf, mp4
    from tagger.tags.base import MARKER_NAME

    return MediaField(
        MP3DescStorageStyle(MARKER_NAME),
        MP4StorageStyle(mp4.MARKER_KEY),
        StorageStyle(MARKER_NAME),
        ASFStorageStyle(asf.MARKER_KEY),
    )


def _joined(obj: Item | Album) -> str:
    """``$genre``: beets 2.7+ keeps genres as a list (``$genres``); this is the same
    values joined the way beets prints that list, for formats and paths that name ``$genre``."""
    return types.MULTI_VALUE_DSV.format(list(obj.get("genres") or []))


class TaggerPlugin(BeetsPlugin):
    """``beet tagger`` and, with ``auto``, genres for items imported without one."""

    item_types: ClassVar[dict[str, types.Type]] = {
        "tagger_confidence": types.NullFloat(2),
        "tagger_model": types.STRING,
    }

    def __init__(self) -> None:
        super().__init__()
        self.config.add(
            {
                "auto": True,
                "force": False,
                # the defaults of tagger's own config.toml ([tags] min_confidence, top_k)
                "min_confidence": _TAGS.min_confidence,
                "count": _TAGS.top_k,
                "model": "",
                "names": {},
            }
        )
        if self.config["auto"].get(bool):
            self.import_stages = [self.imported]
        self.add_media_field(MARKER_FIELD, _marker_field())
        if "genre" not in Item._fields:  # beets < 2.7 has its own string field
            self.template_fields["genre"] = _joined
            self.album_template_fields["genre"] = _joined
        self._classifier: Any = None
        self._options: Options | None = None
        self.register_listener("cli_exit", self.close)

    # --- settings and the model, loaded on first use -------------------------------------

    def options(self) -> Options:
        """``min_confidence``, ``count`` and ``names`` as tagger's :class:`Options`."""
        if self._options is None:
            from tagger.library import Options

            floor = float(self.config["min_confidence"].as_number())
            count = self.config["count"].get(int)
            if not 0.0 <= floor <= 1.0:
                raise ui.UserError(f"tagger.min_confidence must be between 0 and 1, got {floor}")
            if count < 1:
                raise ui.UserError(f"tagger.count must be at least 1, got {count}")
            names = self.config["names"].get(dict) or {}
            self._options = Options(top_k=count, min_confidence=floor, names={**_TAGS.names, **{str(k): str(v) for k, v in names.items()}})
        return self._options

    def classifier(self) -> Any:
        """The classifier for ``model`` (a bundle, learnt genres, or the shipped model)."""
        if self._classifier is None:
            from tagger.model.bundle import BundleError
            from tagger.model.head import load_any, make_classifier, written_names

            path = self.config["model"].as_str() or None
            try:
                bundle = load_any(os.path.expanduser(path) if path else None)
            except BundleError as exc:
                raise ui.UserError(f"tagger: {exc}") from None
            opts = self.options()
            opts.names = written_names(bundle, opts.names)  # learnt genres are written as learnt
            self._classifier = make_classifier(bundle, batch_size=_MODEL.batch_size, max_windows=_MODEL.max_windows, workers=_MODEL.workers or None)
        return self._classifier

    def close(self, **_: Any) -> None:
        """Stop the decode workers (``cli_exit``)."""
        if self._classifier is not None:
            self._classifier.close()
            self._classifier = None

    # --- the work ---------------------------------------------------------------------------

    def classify(self, items: Sequence[Item]) -> Iterator[tuple[Item, Classification]]:
        """Each item with its classification, as each batch finishes (input order)."""
        if not items:
            return
        results = self.classifier().classify(os.fsdecode(item.path) for item in items)
        yield from zip(items, results, strict=True)

    def process(self, items: Sequence[Item], *, write: bool, pretend: bool, echo: Callable[[str], None]) -> Counter[str]:
        """Classify ``items``, set their genres, store them (and write the files if ``write``).

        A file that is missing or cannot be decoded is reported and skipped; one whose best
        genre is below ``min_confidence`` is reported and left without a genre. Returns the
        count of each outcome (``tagged``, ``would-tag``, ``low-confidence``, ``failed``).
        """
        counts: Counter[str] = Counter()
        opts = self.options()
        total = len(items)
        for i, (item, result) in enumerate(self.classify(items), 1):
            where = f"[{i}/{total}] {item}"
            if not result.ok:
                counts["failed"] += 1
                self._log.warning("skipped {}: {}: {}", item, os.fsdecode(item.path), result.error)
                continue
            labels, top, _ = opts.choose(result.probabilities)
            if not labels:
                best, p = max(result.probabilities.items(), key=lambda kv: kv[1])
                if best == NONE_LABEL:
                    counts["no-genre"] += 1
                    self._log.warning("no genre for {}: none of the model's genres ({} {:.2f})", item, best, p)
                else:
                    counts["low-confidence"] += 1
                    self._log.warning("no genre for {}: low confidence ({} {})", item, opts.display(best), opts.shortfall(p))
                continue
            genres = [opts.display(g) for g in labels]
            shown = types.MULTI_VALUE_DSV.format(genres)
            before = list(item.get("genres") or [])
            if pretend:
                counts["would-tag"] += 1
                echo(f"{where}: would set genres {shown} ({top:.0%})" + (f", replacing {types.MULTI_VALUE_DSV.format(before)}" if before else ""))
                continue
            from tagger.tags import Marker

            model = self.classifier().bundle.sha256[:12]  # the id tagger's own marker names
            item.genres = genres
            item.tagger_confidence = round(float(top), 4)
            item.tagger_model = model
            item[MARKER_FIELD] = Marker(tuple(genres), model, round(float(top), 4)).dumps()
            if write:
                item.try_write()  # beets logs a failed write; its database still gets the genres
            item.store()
            counts["tagged"] += 1
            echo(f"{where}: {shown} ({top:.0%})")
        return counts

    # --- beets' hooks -----------------------------------------------------------------------

    def commands(self) -> list[ui.Subcommand]:
        cmd = ui.Subcommand("tagger", help="set genres with tagger's model (offline)")
        cmd.parser.add_option("-f", "--force", action="store_true", default=None, help="replace genres items already have")
        cmd.parser.add_option("-p", "--pretend", action="store_true", default=False, help="show what would be set and change nothing")
        cmd.func = self.command
        return [cmd]

    def command(self, lib: Library, opts: Any, args: list[str]) -> None:
        force = opts.force if opts.force is not None else self.config["force"].get(bool)
        items = list(lib.items(args))
        todo = [it for it in items if force or not it.get("genres")]
        kept = len(items) - len(todo)
        if kept:
            ui.print_(f"tagger: {kept} of {len(items)} items already have a genre and keep it (--force replaces)")
        t0 = time.monotonic()
        try:
            counts = self.process(todo, write=ui.should_write(), pretend=opts.pretend, echo=ui.print_)
        finally:
            self.close()
        seconds = time.monotonic() - t0
        order = ("tagged", "would-tag", "low-confidence", "failed")
        parts = ", ".join(f"{counts[k]} {k}" for k in order if counts[k]) or "nothing to do"
        rate = f" ({len(todo) / seconds:.1f} tracks/s)" if todo and seconds > 0 else ""
        ui.print_(f"tagger: {parts} in {seconds:.1f}s{rate}" + ("; pretend: nothing changed" if opts.pretend else ""))

    def imported(self, session: ImportSession, task: ImportTask) -> None:
        """Import stage: a genre for each imported item that has none (all, with ``force``).

        The items are stored; beets writes the files afterwards, as for any field it sets.
        """
        force = self.config["force"].get(bool)
        items = [it for it in task.imported_items() if force or not it.get("genres")]
        self.process(items, write=False, pretend=False, echo=self._log.info)
