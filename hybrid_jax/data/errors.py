"""Error types of the data pipeline; an entry point turns them into a one-line exit message."""

from __future__ import annotations


class DataNotFoundError(FileNotFoundError):
    """A named dataset, split, feature or directory is missing (or not prepared) where looked for.

    ``str(error)`` is one line naming what is missing and where, so a trainer can do
    ``except DataNotFoundError as e: sys.exit(f"error: {e}")``.
    """

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
