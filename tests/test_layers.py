"""The layout's one hard rule: nothing below the command line imports it.

``tagger/cli.py`` is the top; every other module of ``tagger`` and of the daemon
(``service/``, installed as ``tagger_service``) must work without it. Read from the
source with ``ast``, so an import inside a function counts too.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = {ROOT / "tagger" / "cli.py", ROOT / "tagger" / "__main__.py"}


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules ``path`` imports (``from . import x`` gives ``pkg.x``)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            out.add(base)
            out.update(f"{base}.{a.name}" for a in node.names)
    return out


def test_no_module_below_the_cli_imports_it() -> None:
    offenders = []
    for folder, package in ((ROOT / "tagger", "tagger"), (ROOT / "service", "tagger_service")):
        for path in sorted(folder.rglob("*.py")):
            if path in TOP:
                continue
            rel = path.relative_to(folder).with_suffix("").parts
            pkg = ".".join([package, *rel[:-1]])  # the package the module is in
            if "tagger.cli" in _imports(path, pkg):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == [], f"these import tagger.cli: {offenders}"


def _modules() -> dict[str, tuple[Path, str]]:
    """Every module of ``tagger`` and ``tagger_service``: name → (file, its package)."""
    out: dict[str, tuple[Path, str]] = {}
    for folder, package in ((ROOT / "tagger", "tagger"), (ROOT / "service", "tagger_service")):
        for path in folder.rglob("*.py"):
            rel = path.relative_to(folder).with_suffix("").parts
            if rel[-1] == "__init__":
                name = ".".join([package, *rel[:-1]])
                out[name] = (path, name)
            else:
                out[".".join([package, *rel])] = (path, ".".join([package, *rel[:-1]]))
    return out


def _edges(path: Path, package: str, modules: dict[str, tuple[Path, str]]) -> set[str]:
    """The modules of ours that ``path`` imports, at any depth of the file.

    ``from pkg import name`` is an edge to ``pkg.name`` when that is a module (a
    submodule import), else to ``pkg`` (a name from its ``__init__``).
    """
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([base] if base else [])])
            for a in node.names:
                out.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return {m for m in out if m in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected parts of more than one module, or a self-import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1 or v in graph[v]:
                found.append(sorted(part))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _edges(path, pkg, modules) for m, (path, pkg) in modules.items()}


def test_no_import_circle() -> None:
    """No file import cycle in ``tagger/`` or the daemon, counting imports inside functions."""
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_circle() -> None:
    """The check itself can fail: a circle through a function-level import is found."""
    graph = _graph()
    graph["tagger.model.bundle"] = graph["tagger.model.bundle"] | {"tagger.model.export"}
    assert ["tagger.model.bundle", "tagger.model.export"] in _cycles(graph)


def test_model_layer_never_imports_the_teacher() -> None:
    graph = _graph()
    offenders = {m: sorted(d for d in deps if d.startswith("tagger.teacher")) for m, deps in graph.items() if m.startswith("tagger.model")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_scan_and_serve_never_reach_training_code() -> None:
    """What ``tagger scan`` and the daemon import, all the way down, has no training code."""
    graph = _graph()
    training = {m for m in graph if m.startswith("tagger.teacher")} | {"tagger.model.train", "tagger.model.export", "tagger.model.densenet"}
    for top in ("tagger.scan", "tagger_service.daemon"):
        seen, todo = set(), [top]
        while todo:
            m = todo.pop()
            if m not in seen:
                seen.add(m)
                todo.extend(graph[m])
        assert not seen & training, (top, sorted(seen & training))


def test_a_nodes_tag_writer_makes_its_write_without_the_database_layer(synth_audio, tmp_path: Path) -> None:
    """A Ray worker node's writer imports the tag handlers, not SQLAlchemy or the library.

    Run in a fresh interpreter, as a writer process is: it makes a real write, which is
    read back here, and lists which of the driver's modules it had to import.
    """
    import shutil
    import subprocess
    import sys

    from tagger import tags

    f = tmp_path / "song.flac"
    shutil.copy(synth_audio(seconds=6.0, suffix=".flac"), f)
    code = (
        "import os, sys\n"
        "from tagger import tags\n"
        "from tagger.ray_stages import Writer\n"
        "from tagger.tags.orders import WriteOrder\n"
        f"p = {str(f)!r}\n"
        "st = os.stat(p)\n"
        "order = WriteOrder(p, ('Jazz',), tags.Marker(('Jazz',), 'm', 0.9), '; ', (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))\n"
        "w = Writer().write(order)\n"
        "assert w.error is None and not w.changed, w\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'alembic') or m in ('tagger.library', 'tagger.store')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
    assert tags.read_state(str(f)).genres == ("Jazz",)
