"""The dataset system: load any supported file or cached dataset, detect and validate each record's format,
render it through the model's chat template with the loss on answers only, split, and cache.

Entry points: `load_records(spec)` (data/load.py) and `prepare_dataset(spec, tokenizer, handler, settings)`
(data/prepare.py). Both are imported lazily here so `import llm_installer.data` stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = ["load_records", "prepare_dataset", "DataSettings", "PreparedData", "Record", "LoadResult"]


def __getattr__(name: str) -> Any:
    if name == "load_records":
        from llm_installer.data.load import load_records

        return load_records
    if name in ("prepare_dataset", "DataSettings", "PreparedData"):
        from llm_installer.data import prepare

        return getattr(prepare, name)
    if name in ("Record", "LoadResult"):
        from llm_installer.data import records

        return getattr(records, name)
    raise AttributeError(name)
