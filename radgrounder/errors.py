"""The one error type the project raises for bad input."""

from __future__ import annotations

from os import PathLike


class RadGrounderError(Exception):
    """Bad input or an unusable file.

    The message names the file or field and says what is wrong. The CLI prints it as one
    line on stderr and exits non-zero.
    """

    def __init__(self, message: str, *, path: str | PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)
