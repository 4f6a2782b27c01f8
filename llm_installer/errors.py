"""Errors a user can fix.

Every `UserError` carries a one-line message naming the file, record or flag at fault and what to do.
The CLI prints it as `error: <message>` without a traceback (`--debug` shows one) and exits with
`exit_code` (2 for bad input, 1 for a failed check such as `verify`).
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """A problem the user can fix; printed as one line, never a traceback."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ModelNotFoundError(UserError):
    """A model name or path that is not installed / does not exist."""


class InvalidNameError(UserError):
    """A model name or path that would escape the models folder or has odd characters."""


class SourceError(UserError):
    """A model source (hub, local folder, GGUF file) could not provide the model."""


class DataError(UserError):
    """A dataset file or record that cannot be used."""


class CheckFailed(UserError):
    """A verification found a problem (e.g. `verify` found a changed file): exit code 1."""

    exit_code = 1


def is_disk_full(exc: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT anywhere in the chain, or safetensors' Rust "StorageFull" error."""
    seen = 0
    e: BaseException | None = exc
    while e is not None and seen < 8:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left on device" in text or "StorageFull" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
        seen += 1
    return False
