"""File names as the file system has them: any bytes, not only UTF-8.

Linux names are bytes. A library copied from an old Windows share or a Samba
mount can hold ``caf\\xe9.mp3`` (Latin-1), which is not UTF-8. Python hands such
names over as ``str`` with the undecodable bytes as lone surrogates
(``os.fsdecode``: ``'caf\\udce9.mp3'``), and every file-system call takes them
back exactly. Three places cannot: SQLite text, a terminal, a log. This module
is what tagger uses at those borders, so that every path the file system can
hold is walked, tagged, stored, shown and found again, losslessly:

* **the database** (:func:`to_db` / :func:`from_db`): a UTF-8 name is stored as
  plain ``TEXT``, as before; any other is stored as a ``BLOB`` of its exact
  bytes in the same column (SQLite allows both). A BLOB never equals a TEXT, so
  the key stays unique, and ``GLOB`` / ``LIKE`` match a BLOB's bytes;
* **people** (:func:`display`): undecodable bytes are shown as ``\\xNN``
  (``caf\\xe9.mp3``), and :func:`parse` turns that form back into the name, so
  what ``tagger query`` printed can be pasted into ``tagger show``;
* **streams** (:func:`escape_streams`): stdout and stderr escape whatever they
  cannot encode instead of raising, so no name ever crashes a command or a log.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import re
import sys
from typing import TextIO

#: Lone surrogates ``os.fsdecode`` makes of undecodable bytes 0x80-0xff.
_SURROGATE = re.compile("[\udc80-\udcff]")
#: The display form of such a byte.
_ESCAPED = re.compile(r"\\x([89a-fA-F][0-9a-fA-F])")
ERRORS = "tagger.escape"


def is_text(path: str) -> bool:
    """Whether the name is valid Unicode (no undecodable bytes in it)."""
    return path.isascii() or _SURROGATE.search(path) is None


def to_db(path: str) -> str | bytes:
    """What the database stores: the name itself when it is text, else its bytes."""
    return path if is_text(path) else os.fsencode(path)


def from_db(value: str | bytes) -> str:
    """The name back from the database (a BLOB comes back as bytes)."""
    return os.fsdecode(value) if isinstance(value, bytes | bytearray | memoryview) else value


def display(text: str) -> str:
    """``text`` with undecodable bytes as ``\\xNN``: safe for any terminal, log or TEXT column."""
    return _SURROGATE.sub(lambda m: f"\\x{ord(m.group()) - 0xDC00:02x}", text)


def parse(text: str) -> str:
    """The name behind a :func:`display` form: ``\\xNN`` (80-ff) becomes that byte again."""
    return _ESCAPED.sub(lambda m: chr(0xDC00 + int(m.group(1), 16)), text)


def candidates(text: str) -> list[str]:
    """The name as given and, if different, the name its ``\\xNN`` escapes stand for."""
    parsed = parse(text)
    return [text] if parsed == text else [text, parsed]


def _escape(exc: UnicodeError) -> tuple[str, int]:
    """Codec error handler: undecodable bytes as ``\\xNN``, other unencodable characters
    as ``backslashreplace`` would write them."""
    if not isinstance(exc, UnicodeEncodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    out = "".join(
        f"\\x{ord(c) - 0xDC00:02x}" if 0xDC80 <= ord(c) <= 0xDCFF else c.encode("ascii", "backslashreplace").decode()
        for c in bad
    )
    return out, exc.end


codecs.register_error(ERRORS, _escape)


def escape_streams(*streams: TextIO | None) -> None:
    """Make text streams (default: stdout and stderr) escape what they cannot encode.

    Python's stdout raises on a lone surrogate (stderr writes ``\\udce9``); a file
    name must never crash a command or be shown in a form nobody can read.
    """
    for stream in streams or (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(ValueError, OSError):  # a closed or detached stream
                reconfigure(errors=ERRORS)
