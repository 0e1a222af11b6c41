"""Text from runs, shown to people: one rule for the command line and the Markdown export.

Run ids, step names, tags, notes, comments, requests, errors and what a store reports come
from agents, users and tools. Some characters act instead of showing (move the cursor, clear
the screen, set a terminal's title, reorder a line, hide text): :data:`ACTING`. Every output
for people shows each of them as an escape, in the form that output reads back:

- :func:`visible`: a value (an id, a name, a note) with backslash escapes, its backslashes
  doubled, so that two values never show alike (``a\\x1bb`` is not ``a<ESC>b``);
- :func:`said`: a message, which quotes its values already, with backslash escapes;
- :func:`json_escaped`: a JSON document with JSON's ``\\u`` escapes, the same data.
"""

from __future__ import annotations

import json
import re

__all__ = ["ACTING", "IN_MESSAGE", "json_escaped", "said", "visible"]

ACTING = (r"\x00-\x1f\x7f-\x9f"  # C0 controls (ESC, BEL, CR, LF, TAB...), DEL, C1 controls
          # Unicode format characters (Cf): the soft hyphen, prepended marks, bidirectional
          # marks, embeddings, overrides and isolates, zero-width characters, the BOM,
          # interlinear annotations, tag characters; and the line and paragraph separators.
          r"\xad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f"
          r"\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd"
          r"\U00013430-\U0001343f\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0001"
          r"\U000e0020-\U000e007f")
"""Every character of the Unicode categories Cc, Cf, Zl and Zp (Unicode 15.1), as the inside
of a regular expression's character class."""
IN_VALUE = re.compile(rf"[\\{ACTING}]")
"""What a value (an id, a name, a note) shows escaped: also its backslashes, so that the
escaped form reads back as one value only (``a\\x1bb`` is not ``a<ESC>b``)."""
IN_MESSAGE = re.compile(rf"[{ACTING}]")
"""What a message shows escaped: it quotes its values already (``run 'a\\x1bb'``)."""
IN_DOCUMENT = re.compile(rf"(?!\n)[{ACTING}]")
"""What a JSON document shows escaped: its own line breaks stay (JSON writes the line breaks
of its strings as ``\\n``)."""
_NAMED = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}


def escaped(char: str) -> str:
    """``char`` as a backslash escape that a shell's ``$'...'`` reads back as ``char``:
    ``\\x1b``, ``\\r``, ``\\u202e``, ``\\U000e0001``; a backslash as ``\\\\``."""
    named = _NAMED.get(char)
    if named is not None:
        return named
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def visible(value: str) -> str:
    """A value (an id, a name, a note) for people: each character that would act, and each
    backslash, as a backslash escape (``run\\x1b[31m``, ``a\\\\b``), on one line."""
    return IN_VALUE.sub(lambda found: escaped(found[0]), value)


def said(message: str) -> str:
    """A message, or one line of it, for people: each character that would act as a
    backslash escape. Its values are quoted (``repr``) or :func:`visible`."""
    return IN_MESSAGE.sub(lambda found: escaped(found[0]), message)


def json_escaped(text: str) -> str:
    """JSON text with each character that would act as a JSON escape (``\\u001b``,
    ``\\u202e``), its own line breaks kept: the same document, exact and valid (outside its
    strings JSON has no such character)."""
    return IN_DOCUMENT.sub(lambda found: json.dumps(found[0])[1:-1], text)
