"""GGUF source: dequantise a GGUF file into an ordinary safetensors transformers folder.

Every later stage (detection, handlers, training, serving) then sees a plain transformers model with
its tokenizer and chat template; nothing downstream has to know the model came from GGUF.
"""

from __future__ import annotations

from pathlib import Path


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "float32") -> Path:
    """Load `gguf_path` with transformers (needs `gguf`), write safetensors + tokenizer into `out_dir`.

    transformers refuses to save a GGUF-loaded model as "quantized" until the quantizer marker is
    cleared; by then the weights are already plain tensors, so clearing it is safe.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=getattr(torch, dtype)
    )
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


# ---- fast metadata reading (for `check`): gguf.GGUFReader parses every vocabulary entry (~10 s) ----

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


def read_gguf_metadata(path: Path) -> tuple[dict, list[tuple[str, list[int]]]]:
    """(key/value metadata, [(tensor name, shape)]) of a GGUF file, reading only its header.

    Arrays are returned as their length (`{"__len__": n}`) except short ones, so the 49k-entry vocabulary
    is skipped rather than decoded. Raises SourceError for a file that is not GGUF.
    """
    import struct

    from llm_installer.errors import SourceError

    def unpack(fh, fmt: str):
        size = struct.calcsize(fmt)
        data = fh.read(size)
        if len(data) != size:
            raise EOFError
        return struct.unpack(fmt, data)[0]

    def read_str(fh) -> str:
        n = unpack(fh, "<Q")
        return fh.read(n).decode("utf-8", errors="replace")

    def skip_or_read(fh, vtype: int, keep: bool):
        if vtype in _SCALARS:
            return unpack(fh, _SCALARS[vtype])
        if vtype == _STRING:
            if keep:
                return read_str(fh)
            fh.seek(unpack(fh, "<Q"), 1)
            return None
        if vtype == _ARRAY:
            itype, count = unpack(fh, "<I"), unpack(fh, "<Q")
            small = count <= 64
            if itype in _SCALARS and not small:
                fh.seek(struct.calcsize(_SCALARS[itype]) * count, 1)
                return {"__len__": count}
            items = [skip_or_read(fh, itype, small) for _ in range(count)]
            return items if small else {"__len__": count}
        raise ValueError(f"unknown GGUF value type {vtype}")

    try:
        with open(path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise ValueError("no GGUF magic")
            version = unpack(fh, "<I")
            if version < 2:
                raise ValueError(f"GGUF version {version} is too old")
            n_tensors, n_kv = unpack(fh, "<Q"), unpack(fh, "<Q")
            meta: dict = {}
            for _ in range(n_kv):
                key = read_str(fh)
                vtype = unpack(fh, "<I")
                meta[key] = skip_or_read(fh, vtype, keep=not key.startswith("tokenizer.ggml.merges"))
            tensors = []
            for _ in range(n_tensors):
                name = read_str(fh)
                n_dims = unpack(fh, "<I")
                shape = [unpack(fh, "<Q") for _ in range(n_dims)]
                fh.read(12)  # ggml type (u32) and data offset (u64)
                tensors.append((name, shape))
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise SourceError(f"{path} is not a readable GGUF file ({exc}); re-download it") from None
    return meta, tensors
