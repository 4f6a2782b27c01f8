"""The user cache folder: measurements and conversions worth keeping between runs, never needed for correctness.

Folder, first that is set: `LLM_INSTALLER_CACHE_DIR`, `$XDG_CACHE_HOME/llm-installer`, else
`~/.cache/llm-installer`. Everything in it may be deleted at any time; readers treat a missing, unreadable
or malformed file as absent, and writers replace files atomically so a concurrent reader (another run on
the same machine) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_DIR_ENV = "LLM_INSTALLER_CACHE_DIR"


def cache_dir() -> Path:
    """The cache folder (not created here)."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "llm-installer"


def read_json(path: Path) -> Any | None:
    """The JSON in `path`, or None when it is missing, unreadable or not valid JSON."""
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def write_json_atomic(path: Path, data: Any) -> bool:
    """Write `data` as JSON to `path` through a temporary file and a rename; False when it could not be written.

    A cache that cannot be written (read-only home, full disk) costs a re-measurement next time, nothing more,
    so the error is not raised.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        return False
    return True


__all__ = ["CACHE_DIR_ENV", "cache_dir", "read_json", "write_json_atomic"]
