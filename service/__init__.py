"""``tagger serve``: the tagging daemon, installed as the package ``tagger_service``.

It lives in the top-level ``service/`` folder and is mapped to ``tagger_service`` in
``pyproject.toml`` (``[tool.setuptools] package-dir``), like ``migrations/`` is mapped to
``tagger._migrations``. The CLI commands ``tagger serve`` and ``tagger status`` are thin
wrappers around :func:`tagger_service.daemon.serve` and :mod:`tagger_service.status`.

Modules:

``daemon``     lifecycle: signals, systemd notifications, folder presence, reload, shutdown
``watcher``    watchdog observers (inotify, polling fallback), path filter, the settler
``worker``     the one thread that claims jobs in batches and runs them through
               :class:`tagger.library.Library` (the same pipeline as ``tagger scan``)
``reconcile``  the reconciling scan (at start, nightly, when a folder comes back)
``scheduler``  APScheduler jobs: reconciling scan, retry pump, database upkeep
``queue``      small job-queue helpers on top of :mod:`tagger.store.jobs`
``notify``     ``sd_notify`` (READY / WATCHDOG / STATUS / STOPPING)
``status``     what ``tagger status`` prints, read from the database
``logs``       stderr logging in a form journald shows well
"""

from __future__ import annotations

__all__ = ["serve"]


def serve(*args, **kwargs) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; see :func:`daemon.serve`."""
    from .daemon import serve as _serve

    return _serve(*args, **kwargs)
