"""ASF (WMA): repeated ``WM/Genre`` attributes, marker as ``TAGGER/Genre``.

Mutagen puts the first value in the extended content description and the
others in the metadata library object, the layout Windows Media Player
uses for multiple genres. ``WM/Picture`` and every other attribute are left
alone.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from mutagen.asf import ASF, ASFBaseAttribute, ASFUnicodeAttribute, ASFValue

from tagger.tags.base import MultiValueHandler

GENRE_KEY = "WM/Genre"
MARKER_KEY = "TAGGER/Genre"


class ASFHandler(MultiValueHandler):
    """``WM/Genre`` (repeated) for the genre, ``TAGGER/Genre`` for the marker."""

    FAMILY = "asf"
    GENRE_KEY = GENRE_KEY
    MARKER_KEY = MARKER_KEY

    def _wrap(self, value: str) -> ASFUnicodeAttribute:
        return ASFUnicodeAttribute(value)

    def _dump(self, value: ASFBaseAttribute) -> dict[str, Any]:
        # The value's type, language and stream too: they decide where ASF keeps it.
        data = value.value
        if isinstance(data, bytes):
            data = {"base64": base64.b64encode(data).decode("ascii")}
        return {"type": value.TYPE, "value": data, "language": value.language, "stream": value.stream}

    def _load(self, data: dict[str, Any]) -> ASFBaseAttribute:
        value = data["value"]
        if isinstance(value, dict):
            value = base64.b64decode(value["base64"])
        return ASFValue(value, data["type"], language=data["language"], stream=data["stream"])


def open_asf(path: Path) -> ASFHandler:
    return ASFHandler(ASF(path))
