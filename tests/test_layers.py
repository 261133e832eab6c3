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
