"""The model store: where models live and how a name maps to a folder.

Layout of one installed model (see docs/architecture.md):

    <models_dir>/<org>_<name>/
        model/            weights (safetensors), config, tokenizer, chat template
        model_info.json   ModelInfo + manifest (source, revision, files with size and sha256)
        train.sh start.sh thin wrappers that call the CLI for this folder
        lora/             the active adapter (adapter files, adapter_info.json, report)
        runs/<timestamp>/ checkpoints, logs, loss plot, training report

Models folder, first that is set: `--models-dir`, `LLM_INSTALLER_MODELS_DIR`, `./models` beside the
checkout's `./llm-installer` script (it exports LLM_INSTALLER_CHECKOUT_MODELS_DIR), else
`$XDG_DATA_HOME/llm-installer/models` (default `~/.local/share/llm-installer/models`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from llm_installer.errors import InvalidNameError, ModelNotFoundError
from llm_installer.model_info import ModelInfo

INFO_FILE = "model_info.json"
MODEL_SUBDIR = "model"
LORA_SUBDIR = "lora"
RUNS_SUBDIR = "runs"
PARTIAL_PREFIX = ".partial-"  # in-progress installs are built in <models_dir>/.partial-<folder>

_models_dir_override: Path | None = None

# One path segment: letters, digits, '.', '_', '-' (no leading dot, so '..' and hidden names are out).
_SEGMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def set_models_dir(path: str | os.PathLike[str] | None) -> None:
    """Set the models folder for this process (the CLI's --models-dir)."""
    global _models_dir_override
    _models_dir_override = Path(path).expanduser().resolve() if path else None


def models_dir() -> Path:
    """The models folder in force (see the module docstring for the order)."""
    if _models_dir_override is not None:
        return _models_dir_override
    for var in ("LLM_INSTALLER_MODELS_DIR", "LLM_INSTALLER_CHECKOUT_MODELS_DIR"):
        value = os.environ.get(var)
        if value:
            return Path(value).expanduser().resolve()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "llm-installer" / "models"


def folder_name(model_ref: str) -> str:
    """Map a model reference to its folder name: 'org/name' -> 'org_name', 'name' -> 'name'.

    Refuses anything that could escape the models folder or carries odd characters.
    """
    ref = model_ref.strip()
    parts = ref.split("/")
    if not ref or len(parts) > 2 or not all(_SEGMENT.match(p) for p in parts) or ".." in ref:
        raise InvalidNameError(
            f"invalid model name {model_ref!r}: use 'org/name' or 'name' made of letters, digits, '.', '_' and '-'"
        )
    return "_".join(parts)


@dataclass(frozen=True)
class ModelFolder:
    """Paths of one model folder in the store."""

    root: Path

    @property
    def name(self) -> str:
        return self.root.name

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_SUBDIR

    @property
    def info_path(self) -> Path:
        return self.root / INFO_FILE

    @property
    def lora_dir(self) -> Path:
        return self.root / LORA_SUBDIR

    @property
    def runs_dir(self) -> Path:
        return self.root / RUNS_SUBDIR

    @property
    def is_complete(self) -> bool:
        return self.info_path.is_file() and self.model_dir.is_dir()

    @property
    def has_adapter(self) -> bool:
        return (self.lora_dir / "adapter_config.json").is_file()

    def load_info(self) -> ModelInfo:
        """Read model_info.json (ModelInfo fields plus the manifest under 'manifest')."""
        try:
            data = json.loads(self.info_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ModelNotFoundError(
                f"{self.root} is not a complete install (no {INFO_FILE}); reinstall it with --force"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelNotFoundError(f"{self.info_path} is damaged ({exc}); reinstall with --force") from None
        return ModelInfo.model_validate(data.get("info", data))

    def read_raw_info(self) -> dict:
        """The whole model_info.json as a dict (info + manifest)."""
        return json.loads(self.info_path.read_text(encoding="utf-8"))


def folder_for(model_ref: str) -> ModelFolder:
    """The folder a model reference maps to in the store (it may not exist yet)."""
    return ModelFolder(models_dir() / folder_name(model_ref))


def find_model(name_or_path: str) -> ModelFolder:
    """Find an installed model by folder name, model id ('org/name') or a path to its folder.

    A path (containing os.sep or starting with '.' or '~') must point at a complete model folder;
    names are looked up in the models folder only, so they can never escape it.
    """
    ref = name_or_path.strip()
    looks_like_path = ref.startswith((".", "/", "~")) or os.sep in ref and Path(ref).expanduser().exists()
    if looks_like_path:
        root = Path(ref).expanduser().resolve()
        folder = ModelFolder(root)
        if not folder.is_complete:
            raise ModelNotFoundError(f"{ref} is not an installed model folder (no {INFO_FILE} and model/)")
        return folder
    folder = folder_for(ref)
    if not folder.root.exists():
        raise ModelNotFoundError(
            f"model {ref!r} is not installed in {models_dir()}; run `llm-installer list` to see installed models "
            f"or `llm-installer install {ref}`"
        )
    if not folder.is_complete:
        raise ModelNotFoundError(
            f"model {ref!r} is an incomplete install; run `llm-installer install {ref} --force` to redo it"
        )
    return folder


def installed_folders() -> list[ModelFolder]:
    """Every model folder in the store (complete or not), sorted by name; partial builds excluded."""
    base = models_dir()
    if not base.is_dir():
        return []
    return sorted(
        (ModelFolder(p) for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda f: f.name,
    )
