"""File names that are not valid UTF-8 (Python carries their bytes as lone surrogates).

Such a name can be opened, but not written into UTF-8 JSON, Parquet or a terminal that is
strict about encodings; the batch commands report it as one failed item instead.
"""

from __future__ import annotations


def is_utf8(text: str) -> bool:
    """Whether ``text`` (e.g. a file name from ``os.listdir``) encodes as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """``text`` safe to print and to store as UTF-8: the bytes of a non-UTF-8 file name are
    written ``\\xNN`` (``scan_\\xff.nii.gz``); anything else is unchanged."""
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")
