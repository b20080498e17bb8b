"""Report text cleaning exactly as the reference applies it (spec §1.7)."""

from __future__ import annotations

import re

# Invisible and legacy (cp1252-in-latin1) characters seen in exported reports.
_REPLACEMENTS = {
    "\u00a0": " ",
    "\u2000": " ",
    "\u2001": " ",
    "\u2002": " ",
    "\u2003": " ",
    "\u2004": " ",
    "\u2005": " ",
    "\u2006": " ",
    "\u2007": " ",
    "\u2008": " ",
    "\u2009": " ",
    "\u200a": " ",
    "\u202f": " ",
    "\u205f": " ",
    "\u3000": " ",
    "\u00ad": "",
    "\u200b": "",
    "\u200c": "",
    "\u200d": "",
    "\u2060": "",
    "\ufeff": "",
    "\u0096": "-",
    "\u0084": '"',
    "\u0093": '"',
    "\u0094": '"',
    "\u0091": "'",
    "\u0092": "'",
    "\u0082": "'",
    "\u0085": "...",
    "\u008a": "S",
    "\u0080": "€",
    "\u2028": "\n",
}
_TRANSLATE = str.maketrans(_REPLACEMENTS)
_PUNCT = ".,:;!?"
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,:;!?])")
_NO_SPACE_AFTER_PUNCT = re.compile(r"([.,:;!?])(?=[^\s.,:;!?])")
# ``\s`` includes newlines: blank lines collapse into one line break, as in the reference.
_SPACE_BEFORE_NEWLINE = re.compile(r"\s+\n")


def clean_punctuation(text: str) -> str:
    """The reference's ``clean_punctuation``, step for step.

    It splits decimals (``2.2 cm`` → ``2. 2 cm``); the released checkpoints learned that, so
    it is kept for prompts and targets built for them. Blank lines collapse (``\\s+\n``), and
    a non-empty text that strips to nothing becomes ``"."`` (a whitespace-only clinical
    field gives ``Question: .``, as the reference's prompts do).
    """
    if not text:
        return text
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _NO_SPACE_AFTER_PUNCT.sub(r"\1 ", text)
    text = _SPACE_BEFORE_NEWLINE.sub("\n", text)
    text = text.strip()
    if not text.endswith((".", "!", "?")):
        text += "."
    return text.translate(_TRANSLATE)
