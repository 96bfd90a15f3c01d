"""User-facing errors: the CLI prints them as one message, without a traceback."""

from __future__ import annotations


class CxrlabError(Exception):
    """An error caused by the user's input; its message says what was received and how to fix it."""


class ImageReadError(CxrlabError):
    """An image file that cannot be decoded.

    Args:
        path: the file.
        reason: why it could not be read (short, human-readable).
    """

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
