"""Which files of a model repository or folder to install.

A repository often carries the same weights several times (safetensors and pickle `.bin`, ONNX,
TFLite, Flax msgpack, GGUF quantisations, Core ML, `original/` checkpoints for other runtimes). We
keep only what transformers needs: config, tokenizer, chat template, generation/processor configs and
one copy of the weights, preferring safetensors. Pickle files can run code when loaded, so they are
kept only when they are the only weights and the user passed --allow-pickle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import PurePosixPath

from llm_installer.errors import SourceError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SKIP_SUFFIXES = (
    ".onnx",
    ".onnx_data",
    ".tflite",
    ".msgpack",
    ".h5",
    ".ot",
    ".mlmodel",
    ".gguf",
    ".ggml",
    ".npz",
    ".pb",
    ".engine",
    ".xml",  # OpenVINO IR
)
SKIP_DIRS = {
    "original",
    "onnx",
    "tflite",
    "coreml",
    "openvino",
    "flax",
    "tf",
    "gguf",
    "mlx",
    ".cache",
    ".git",
}
SKIP_NAMES = {
    ".gitattributes",
    "training_args.bin",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
}


@dataclass
class Selection:
    """The files to install and those left out (with the reason, for the install summary)."""

    files: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def weights(self) -> list[str]:
        return [f for f in self.files if f.endswith((".safetensors", *PICKLE_SUFFIXES))]


def select_files(names: list[str], *, allow_pickle: bool, what: str) -> Selection:
    """Choose the files to install from a repository/folder listing (`what` names it in errors)."""
    sel = Selection()
    candidates: list[str] = []
    for name in sorted(names):
        p = PurePosixPath(name)
        if p.name in SKIP_NAMES:
            sel.skipped[name] = "not needed"
        elif any(part in SKIP_DIRS or part.startswith(".") for part in p.parts[:-1]):
            sel.skipped[name] = f"{p.parts[0]}/ copy for another runtime"
        elif p.suffix in SKIP_SUFFIXES or ".mlpackage" in name or ".mlmodelc" in name:
            sel.skipped[name] = f"{p.suffix or 'other'} format, not used by transformers"
        else:
            candidates.append(name)
    # Per folder: safetensors present -> drop pickle weights (and their index) in that folder.
    by_dir: dict[str, list[str]] = {}
    for name in candidates:
        by_dir.setdefault(str(PurePosixPath(name).parent), []).append(name)
    pickle_needed: list[str] = []
    for folder_files in by_dir.values():
        has_st = any(f.endswith(".safetensors") for f in folder_files)
        for f in folder_files:
            is_pickle = f.endswith(PICKLE_SUFFIXES)
            is_pickle_index = f.endswith((".bin.index.json", ".pt.index.json"))
            if has_st and (is_pickle or is_pickle_index):
                sel.skipped[f] = "pickle copy of the safetensors weights"
            elif has_st and f.endswith(".safetensors") and PurePosixPath(f).name.startswith("consolidated"):
                others = [
                    x
                    for x in folder_files
                    if x.endswith(".safetensors") and not PurePosixPath(x).name.startswith("consolidated")
                ]
                if others:
                    sel.skipped[f] = "consolidated copy for another runtime"
                else:
                    sel.files.append(f)
            elif is_pickle:
                pickle_needed.append(f)
                sel.files.append(f)
            else:
                sel.files.append(f)
    if pickle_needed and not allow_pickle:
        raise SourceError(
            f"{what} has only pickle weights ({', '.join(pickle_needed[:3])}), which can run code when loaded; "
            "pass --allow-pickle if you trust it"
        )
    return sel
