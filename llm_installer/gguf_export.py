"""`export NAME --gguf OUT`: the merged (or base) model as one GGUF file that llama.cpp and Ollama run.

Written with the `gguf` package alone (no llama.cpp build): `GGUFWriter` for the file, its
`TensorNameMap` for llama.cpp's tensor names, `gguf.quants` for q8_0/q4_0/... and `LlamaFileType` for
the file type. What each family needs beyond renaming follows llama.cpp's own converter, and
transformers' GGUF reader undoes it, which is what the round-trip tests check:

* llama/mistral (llama.cpp arch ``llama``): q_proj/k_proj rows are permuted for llama.cpp's rotary
  layout (pairs interleaved per head); transformers' reader permutes them back.
* gemma/gemma2: RMSNorm weights are stored as ``1 + w`` (llama.cpp multiplies by the stored weight,
  Gemma by ``1 + w``); gemma2 also states its soft-capping and sliding window.
* phi3: the fused ``qkv_proj`` and ``gate_up_proj`` stay fused (``attn_qkv``, ``ffn_up``).
* qwen2 keeps its q/k/v biases, qwen3 its per-head q/k norms; every family with tied embeddings gets no
  ``output.weight`` (llama.cpp reuses ``token_embd``).

Which tensors stay float32 follows llama.cpp: every 1-D tensor (norms, biases). A 2-D tensor whose rows
do not split into the quant's blocks falls back to f16; with a 4- or 5-bit quant the embedding and
output head are kept at q8_0, as llama.cpp's quantizer keeps the output head at higher precision.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llm_installer.errors import UserError

# model_type -> llama.cpp architecture name (gguf.MODEL_ARCH_NAMES values)
FAMILY_ARCH = {
    "llama": "llama",
    "mistral": "llama",  # llama.cpp's converter writes Mistral as arch llama
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "phi3": "phi3",
}
PERMUTE_QK = {"llama"}  # archs whose rotary layout needs llama.cpp's q/k row permutation
NORM_PLUS_ONE = {"gemma", "gemma2"}

# --quant name -> (gguf.GGMLQuantizationType name, gguf.LlamaFileType name)
QUANTS = {
    "f32": ("F32", "ALL_F32"),
    "f16": ("F16", "MOSTLY_F16"),
    "bf16": ("BF16", "MOSTLY_BF16"),
    "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
    "q5_1": ("Q5_1", "MOSTLY_Q5_1"),
    "q5_0": ("Q5_0", "MOSTLY_Q5_0"),
    "q4_1": ("Q4_1", "MOSTLY_Q4_1"),
    "q4_0": ("Q4_0", "MOSTLY_Q4_0"),
}
_LOW_BIT = {"q5_1", "q5_0", "q4_1", "q4_0"}
GGUF_MAGIC = b"GGUF"


@dataclass
class GgufResult:
    path: Path
    quant: str
    tensors: int
    size: int
    arch: str
    adapter: Path | None  # the adapter merged in, None for the base weights


def check_family(model_type: str | None) -> str:
    """llama.cpp's architecture for this model type, or the one-line refusal naming the family."""
    arch = FAMILY_ARCH.get(model_type or "")
    if arch is None:
        raise UserError(
            f"GGUF export does not support the {model_type or 'unknown'} family yet (supported: "
            f"{', '.join(FAMILY_ARCH)}); use --merge for a transformers folder instead"
        )
    return arch


def check_quant(quant: str) -> str:
    q = quant.lower()
    if q not in QUANTS:
        raise UserError(f"--quant {quant}: unknown GGUF type; choose one of {', '.join(QUANTS)}")
    return q


def prepare_gguf_out(out: Path, force: bool) -> None:
    """Refuse a destination the export must not overwrite: a folder, a non-GGUF file, or any file
    without --force."""
    if out.suffix.lower() != ".gguf":
        raise UserError(f"--gguf {out}: give a file name ending in .gguf")
    if out.is_dir():
        raise UserError(f"--gguf {out} is a folder; give a file name ending in .gguf")
    if not out.exists():
        return
    if not force:
        raise UserError(f"{out} already exists; choose another file or pass --force")
    with out.open("rb") as fh:
        if fh.read(4) != GGUF_MAGIC:
            raise UserError(f"{out} is not a GGUF file; --force only replaces a GGUF: choose another file")


def _cfg(config: Any, *names: str, default: Any = None) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _rope(config: Any) -> tuple[float, float]:
    """(rope theta, partial rotary factor); refuses rope scaling llama.cpp needs extra tensors for."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    legacy = getattr(config, "rope_scaling", None)
    if isinstance(legacy, dict):
        params = {**legacy, **params}
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind not in ("default", "linear"):
        raise UserError(
            f"GGUF export does not support {kind!r} rope scaling yet (only none or linear); "
            "use --merge for a transformers folder instead"
        )
    theta = params.get("rope_theta", _cfg(config, "rope_theta", default=10000.0))
    partial = params.get("partial_rotary_factor", _cfg(config, "partial_rotary_factor", default=1.0))
    return float(theta), float(partial)


def add_model_metadata(writer: Any, config: Any, arch: str, name: str) -> None:
    """The hyper-parameters llama.cpp reads (and transformers' GGUF reader maps back to a config)."""
    heads = int(config.num_attention_heads)
    hidden = int(config.hidden_size)
    head_dim = int(_cfg(config, "head_dim", default=hidden // heads))
    theta, partial = _rope(config)
    writer.add_name(name)
    writer.add_context_length(int(_cfg(config, "max_position_embeddings", default=4096)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(_cfg(config, "num_key_value_heads", default=heads)))
    writer.add_layer_norm_rms_eps(float(_cfg(config, "rms_norm_eps", default=1e-6)))
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(int(head_dim * partial))
    writer.add_vocab_size(int(config.vocab_size))
    params = dict(getattr(config, "rope_parameters", None) or {})
    if params.get("rope_type") == "linear":
        writer.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params.get("factor", 1.0)))
    if head_dim != hidden // heads or arch in ("gemma", "gemma2", "qwen3"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch == "gemma2":
        _warn_query_scale(config, head_dim)
        writer.add_attn_logit_softcapping(float(_cfg(config, "attn_logit_softcapping", default=50.0)))
        writer.add_final_logit_softcapping(float(_cfg(config, "final_logit_softcapping", default=30.0)))
    window = _cfg(config, "sliding_window")
    if window and arch in ("gemma2", "phi3"):
        writer.add_sliding_window(int(window))


def _warn_query_scale(config: Any, head_dim: int) -> None:
    """llama.cpp scales Gemma-2 queries by 1/sqrt(head_dim) (hidden/heads for the 27B model) and reads
    no key for it, so a model whose query_pre_attn_scalar says otherwise would run differently there."""
    from llm_installer.console import warn

    scalar = _cfg(config, "query_pre_attn_scalar")
    allowed = {head_dim, int(config.hidden_size) // int(config.num_attention_heads)}
    if scalar is not None and int(scalar) not in allowed:
        warn(
            f"query_pre_attn_scalar is {scalar}, not the head size {head_dim}: llama.cpp scales Gemma-2 "
            "attention by the head size, so its answers may differ from transformers'"
        )


# ----- tokenizer -----------------------------------------------------------------------------------------
def _tokenizer_json(tokenizer: Any) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError(
            "GGUF export needs a fast (tokenizer.json) tokenizer; this model's tokenizer has none"
        )
    return json.loads(backend.to_str())


def _byte_level(tj: dict) -> bool:
    parts = json.dumps([tj.get("pre_tokenizer"), tj.get("decoder")])
    return '"ByteLevel"' in parts


def _pre_tokenizer(tj: dict) -> str:
    """llama.cpp's name for how this byte-level BPE splits text before merging."""
    text = json.dumps(tj.get("pre_tokenizer"))
    if "\\\\p{N}{1,3}" in text:
        return "llama-bpe"
    if '"Split"' in text and "(?i:'s" in text:
        return "qwen2"
    if '"Digits"' in text and '"individual_digits": true' in text:
        return "smollm"
    if text.count('"type"') == 1:  # a lone ByteLevel: GPT-2's own regex
        return "gpt2"
    return "default"


def _merges(tj: dict) -> list[str]:
    return [m if isinstance(m, str) else " ".join(m) for m in tj["model"].get("merges") or []]


def token_table(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens by id, llama.cpp token types), padded to the embedding's rows with unused tokens."""
    import gguf

    types = gguf.TokenType
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = dict(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    tokens, kinds = [], []
    for i in range(vocab_size):
        tok = by_id.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            kinds.append(int(types.UNUSED))
        elif i in added:
            tokens.append(tok)
            kinds.append(int(types.CONTROL if added[i].special else types.USER_DEFINED))
        elif tok.startswith("<0x") and tok.endswith(">") and len(tok) == 6:
            tokens.append(tok)
            kinds.append(int(types.BYTE))
        else:
            tokens.append(tok)
            kinds.append(int(types.NORMAL))
    if len(by_id) > vocab_size:
        raise UserError(
            f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} embeddings; "
            "GGUF needs one per token"
        )
    return tokens, kinds


def add_tokenizer_metadata(writer: Any, tokenizer: Any, chat_format: Any, vocab_size: int) -> None:
    """Vocabulary, merges, special ids, stop token and chat template, as llama.cpp reads them."""
    tj = _tokenizer_json(tokenizer)
    tokens, kinds = token_table(tokenizer, vocab_size)
    model = (tj.get("model") or {}).get("type")
    if model == "BPE" and _byte_level(tj):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer(tj))
        writer.add_add_space_prefix(False)
    elif model == "BPE" and tj["model"].get("byte_fallback"):  # SentencePiece converted to BPE
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores([0.0 if k != 1 else -float(i) for i, k in enumerate(kinds)])
        writer.add_add_space_prefix('"Metaspace"' in json.dumps(tj) or '"Prepend"' in json.dumps(tj))
    else:
        raise UserError(
            f"GGUF export supports byte-level BPE and SentencePiece-style BPE tokenizers; this one is "
            f"{model or 'unknown'}: use --merge for a transformers folder instead"
        )
    writer.add_token_list(tokens)
    writer.add_token_types(kinds)
    if merges := _merges(tj):
        writer.add_token_merges(merges)
    for tid, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if tid is not None:
            add(int(tid))
    # llama.cpp (and transformers' reader) stop at eos: make it the token that ends a turn
    writer.add_eos_token_id(int(chat_format.end_of_turn_id))
    writer.add_eot_token_id(int(chat_format.end_of_turn_id))
    writer.add_add_bos_token(_adds_bos(tokenizer))
    writer.add_add_eos_token(False)
    writer.add_chat_template(chat_format.template)


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    return tokenizer("a").input_ids[:1] == [bos]


# ----- tensors -------------------------------------------------------------------------------------------
def _permute_qk(weights: Any, n_head: int) -> Any:
    """llama.cpp's rotary layout for llama q/k rows: each head's two halves interleaved in pairs.

    The inverse of transformers' reader (`LlamaTensorProcessor._reverse_permute_weights`)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def gguf_tensors(model: Any, arch: str) -> list[tuple[str, Any]]:
    """(llama.cpp name, float32 numpy array) for every weight the file needs, in the model's order."""
    import gguf

    config = model.config
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    names = gguf.get_tensor_name_map(arch_enum, int(config.num_hidden_layers))
    heads = int(config.num_attention_heads)
    kv_heads = int(_cfg(config, "num_key_value_heads", default=heads))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    out = []
    for hf_name, tensor in model.state_dict().items():
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise UserError(f"GGUF export does not know where {hf_name} goes in a {arch} file")
        data = tensor.detach().float().cpu().numpy()
        if arch in PERMUTE_QK and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _permute_qk(data, heads)
        elif arch in PERMUTE_QK and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = _permute_qk(data, kv_heads)
        if arch in NORM_PLUS_ONE and name.endswith("norm.weight"):
            data = data + 1.0
        out.append((name, data))
    return out


def tensor_type(name: str, data: Any, quant: str) -> Any:
    """The GGML type a tensor gets under --quant: float32 for 1-D ones, f16 where blocks do not fit."""
    import gguf

    qt = gguf.GGMLQuantizationType
    if data.ndim < 2 or quant == "f32":
        return qt.F32
    want = qt[QUANTS[quant][0]]
    if quant in _LOW_BIT and name in ("token_embd.weight", "output.weight"):
        want = qt.Q8_0
    block = gguf.GGML_QUANT_SIZES[want][0]
    if data.shape[-1] % block:
        return qt.F16
    return want


def encode(data: Any, kind: Any) -> Any:
    """The array GGUFWriter stores for this type (f32/f16 as numpy floats, the rest as packed bytes)."""
    import gguf
    import numpy as np

    qt = gguf.GGMLQuantizationType
    if kind == qt.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if kind == qt.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return gguf.quants.quantize(np.ascontiguousarray(data, dtype=np.float32), kind)


def _add_tensors(writer: Any, tensors: list[tuple[str, Any]], quant: str) -> None:
    """Encode every tensor (the slow part for 4/8-bit types) under a progress bar."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from llm_installer.console import err_console

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err_console, transient=True) as progress:
        task = progress.add_task(f"GGUF {quant}", total=len(tensors))
        for name, data in tensors:
            kind = tensor_type(name, data, quant)
            writer.add_tensor(
                name, encode(data, kind), raw_dtype=kind if kind.name not in ("F32", "F16") else None
            )
            progress.advance(task)


def write_gguf(
    out: Path, model: Any, tokenizer: Any, chat_format: Any, *, arch: str, quant: str, name: str
) -> int:
    """Write the file to a temporary name beside `out` and rename it in place; returns the tensor count."""
    import gguf

    tensors = gguf_tensors(model, arch)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".partial-{out.name}-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch)
        add_model_metadata(writer, model.config, arch, name)
        add_tokenizer_metadata(writer, tokenizer, chat_format, int(model.config.vocab_size))
        writer.add_file_type(int(gguf.LlamaFileType[QUANTS[quant][1]]))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        _add_tensors(writer, tensors, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)  # mkstemp makes it private; the file is for other tools to read
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(tensors)


def export_gguf(
    folder: Any,
    out: str | Path,
    *,
    quant: str = "f16",
    lora: str | Path | None = None,
    no_lora: bool = False,
    force: bool = False,
    progress: Any = None,
) -> GgufResult:
    """The merged model (the base with `no_lora`, or when there is no adapter) as one GGUF file at `out`.

    The family, quant type and destination are checked before anything heavy loads; the weights come
    from `export.merged_model`, the same merge `--merge` writes."""
    from llm_installer.export import _resolve_lora, merged_model

    out = Path(out).expanduser().resolve()
    no_lora = no_lora or _resolve_lora(folder, lora) is None  # nothing trained yet: the base as it is
    quant = check_quant(quant)
    arch = check_family(folder.load_info().model_type or _config_model_type(folder))
    prepare_gguf_out(out, force)
    model, tokenizer, chat_format, lora_dir = merged_model(
        folder, lora=lora, no_lora=no_lora, progress=progress
    )
    check_family(model.config.model_type)
    count = write_gguf(out, model, tokenizer, chat_format, arch=arch, quant=quant, name=folder.name)
    return GgufResult(out, quant, count, out.stat().st_size, arch, lora_dir)


def _config_model_type(folder: Any) -> str | None:
    try:
        return json.loads((folder.model_dir / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError):
        return None
