"""The verification matrix: every family a handler claims x mode x method x precision, through run_training.

Each cell trains a tiny random-weight model of the family through the real `run_training` path (the plan,
the data pipeline, the PEFT model, our Trainer, the adapter write) for three optimizer steps (medium's warmup makes the first a zero step) and checks, on
the very model the Trainer trains:

- the batch the collator builds (padding-free packed rows, or padded rows for image data) gives the same
  loss and LoRA gradients as each of its examples alone: no example attends to another;
- exactly the intended parameters change (LoRA weights; router and experts for MoE; the projector but never
  the vision tower for vision-language models), and every frozen one is bit-identical;
- when the plan says bf16, the adapted layers really compute in bf16 during the Trainer's own step;
- the saved adapter reloads onto a fresh base model to the same logits, and the serving engine serves it
  (first cell of each family).

Cells: a pairwise covering of modes {fast, medium, slow} x methods {lora, dora} x precisions {fp32, bf16}:
every pair of values appears in some cell of every family. One model build serves all cells of a family.
A combination that is not supported must be refused at plan time with a one-line reason (asserted).
The learning half of the matrix (a short training on a fact makes `chat` answer it and stop at the
end-of-turn token) is in tests/test_end_of_turn.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from transformers import TrainerCallback

from llm_installer.train.plan import build_plan
from llm_installer.train.trainer import run_training
from tests.test_train_fixtures import cli_args

# Pairwise covering of (mode, method, precision): each pair of values of two dimensions occurs once.
CELLS = (
    ("fast", "lora", "fp32"),
    ("fast", "dora", "bf16"),
    ("medium", "lora", "bf16"),
    ("medium", "dora", "fp32"),
    ("slow", "lora", "fp32"),
    ("slow", "dora", "bf16"),
)

# name -> (tests.tiny family, config overrides). Windows of 8 tokens are shorter than the examples, so a
# sliding window really bites inside each example.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "mistral": ("mistral", {"sliding_window": None}),
    "mistral_window": ("mistral", {"sliding_window": 8}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "gemma": ("gemma", {}),
    "gemma2": ("gemma2", {"sliding_window": 8}),
    "gemma3_text": ("gemma3_text", {"sliding_window": 8}),
    "phi3_window": ("phi3", {"sliding_window": 8}),
    "starcoder2": ("starcoder2", {}),  # the code model
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "mixtral": ("mixtral", {}),
    "qwen2_moe": ("qwen2_moe", {}),
    "qwen3_moe": ("qwen3_moe", {}),
    "deepseek_v2": ("deepseek_v2", {}),
    "deepseek_v3": ("deepseek_v3", {}),
    "llava": ("llava", {}),
    "gemma3": ("gemma3", {}),
    # trains here on text only: its processor needs torchvision, which does not import beside the CPU build of
    # torch; its M-RoPE positions keep packed examples apart only with 4-row position ids, so it trains padded
    "qwen2_vl": ("qwen2_vl", {}),
}
VISION = {"llava", "gemma3"}
MOE = {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"}
SHARED_EXPERTS = {"qwen2_moe", "deepseek_v2", "deepseek_v3"}  # dense MLPs beside the routed experts

QUESTIONS = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("Name a prime number.", "Seven is prime."),
    ("Say hello.", "Hello there, it is good to meet you today!"),
    ("What colour is the sky?", "On a clear day the sky is blue because air scatters blue light most."),
    ("Count to five.", "One, two, three, four, five."),
    ("Who wrote Hamlet?", "William Shakespeare wrote Hamlet around the year 1600."),
]


def _build_variant(name: str, out: Path, tokenizer_dir: Path) -> Path:
    """A tiny model of the variant's family with its config overrides, SmolLM2's tokenizer beside it."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.tiny import _text_config, build_tiny_model

    family, overrides = VARIANTS[name]
    if not overrides:
        return build_tiny_model(family, out, tokenizer_dir)
    torch.manual_seed(0)
    cfg = _text_config(family)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    if "sliding_window" in overrides and hasattr(cfg, "use_sliding_window"):
        cfg.use_sliding_window = overrides["sliding_window"] is not None
    out.mkdir(parents=True, exist_ok=True)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(str(out))
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    return out


def _text_data(folder: Path) -> Path:
    path = folder / "chat.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in QUESTIONS
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _image_data(folder: Path) -> Path:
    from PIL import Image

    rows = []
    for i, (name, colour) in enumerate(
        {"Red": (220, 20, 20), "Blue": (20, 20, 220), "Green": (20, 200, 20)}.items()
    ):
        image = Image.new("RGB", (40, 30), colour)
        image.save(folder / f"{name.lower()}.png")
        rows.append(
            {
                "image": f"{name.lower()}.png",
                "question": "What colour is it?",
                "answer": f"It is {name.lower()}." + " Yes." * i,
            }
        )
    path = folder / "images.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


class Probe(TrainerCallback):
    """Looks at the model the Trainer trains: the batch check and a snapshot at the start, the model at the end."""

    def __init__(self, precision: str) -> None:
        self.precision = precision
        self.before: dict[str, Any] = {}
        self.trainable: set[str] = set()
        self.batch_check: dict[str, float] = {}
        self.layer_dtypes: set[Any] = set()
        self.model: Any = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.batch_check = batch_equals_examples(model, train_dataloader, self.precision)
        self._hooks = watch_lora_output_dtypes(model, self.layer_dtypes)  # during the Trainer's first step

    def on_step_end(self, args, state, control, **kwargs):
        for h in getattr(self, "_hooks", []):
            h.remove()
        self._hooks = []

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.model = model


def _autocast(precision: str):
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _examples(dataloader, n: int = 4) -> list[dict[str, Any]]:
    dataset = dataloader.dataset
    return [dataset[i] for i in range(min(n, len(dataset)))]


def batch_equals_examples(model: Any, dataloader: Any, precision: str) -> dict[str, float]:
    """Loss and LoRA gradients of one collated batch vs the token-weighted sum over its examples alone.

    Run in eval mode (no dropout) with the router's balancing loss off (it is a statistic of the whole
    batch, not a per-token loss), in the run's precision. Returns the relative differences."""

    from llm_installer.train.loss import IGNORE, causal_lm_loss

    collate = dataloader.collate_fn
    examples = _examples(dataloader)
    config = model.get_base_model().config
    coef = getattr(config, "router_aux_loss_coef", None)
    if coef is not None:
        config.router_aux_loss_coef = 0.0
    params = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    was_training = model.training
    model.eval()
    try:

        def loss_and_grads(batches: list[dict[str, Any]]) -> tuple[float, list[Any]]:
            model.zero_grad(set_to_none=True)
            total = 0.0
            counts = []
            for b in batches:
                counts.append(int((b["labels"][:, 1:] != IGNORE).sum()))
            n = sum(counts)
            for b, c in zip(batches, counts, strict=True):
                b = {k: v for k, v in b.items() if k != "num_real_tokens"}
                with _autocast(precision):
                    loss = causal_lm_loss(model, b) * (c / n)
                loss.backward()
                total += float(loss.detach())
            return total, [p.grad.detach().clone() for p in params]

        whole, g_whole = loss_and_grads([collate(examples)])
        alone, g_alone = loss_and_grads([collate([e]) for e in examples])
    finally:
        model.zero_grad(set_to_none=True)
        if coef is not None:
            config.router_aux_loss_coef = coef
        model.train(was_training)
    num = max(float((a - b).abs().max()) for a, b in zip(g_whole, g_alone, strict=True))
    den = max(float(b.abs().max()) for b in g_alone) or 1.0
    return {"loss": abs(whole - alone) / abs(alone), "grad": num / den, "grad_scale": den}


def watch_lora_output_dtypes(model: Any, seen: set[Any]) -> list[Any]:
    """Forward hooks on the adapted layers that record the dtype each one computes its output in."""
    import torch
    from peft.tuners.lora.layer import LoraLayer, ParamWrapper

    # not the fused-expert wrappers: the experts' matmuls run in bf16 too, but the MoE block adds their
    # weighted outputs into a buffer of the hidden states' own dtype, which is what such a hook would see
    return [
        m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype) if torch.is_tensor(out) else None)
        for m in model.modules()
        if isinstance(m, LoraLayer) and hasattr(m, "base_layer") and not isinstance(m, ParamWrapper)
    ]


def _logits(model: Any, input_ids: Any) -> Any:
    """fp32 logits; for the trained model, past the autocast that accelerate wrapped its forward in."""
    import torch

    forward = getattr(model, "_original_forward", None) or model.forward
    with torch.no_grad():
        return forward(input_ids=input_ids).logits.float()


@pytest.fixture(scope="module")
def installed(tmp_path_factory, smollm2_tokenizer_dir):
    """name -> (installed ModelFolder, data file), built on first use; one build serves every cell."""
    from llm_installer import store
    from llm_installer.install import install_model

    root = tmp_path_factory.mktemp("matrix")
    models = root / "models"
    cache: dict[str, Any] = {}

    def get(name: str):
        store.set_models_dir(models)
        if name not in cache:
            src = _build_variant(name, root / "src" / name, smollm2_tokenizer_dir)
            folder = install_model(str(src), name=f"test/{name}")
            data = _image_data(src) if name in VISION else _text_data(src)
            cache[name] = (folder, data)
        return cache[name]

    return get


@pytest.mark.parametrize("name", list(VARIANTS))
def test_matrix(name, installed, tmp_path, monkeypatch):
    import torch

    from llm_installer import store

    folder, data = installed(name)
    monkeypatch.setenv("LLM_INSTALLER_MODELS_DIR", str(folder.root.parent))
    store.set_models_dir(folder.root.parent)
    failures: list[str] = []
    for i, (mode, method, precision) in enumerate(CELLS):
        cell = f"{name} {mode}/{method}/{precision}"
        out = tmp_path / f"adapter-{mode}-{method}-{precision}"
        argv = ["--data", str(data), "--mode", mode, "--method", method, "--precision", precision,
                "--max-steps", "3", "--batch-size", "3", "--validation-split", "0", "--no-tensorboard",
                "--output", str(out), "--seed", "0", "--force-epochs"]  # fmt: skip
        plan = build_plan(folder, cli_args(*argv))
        # a short report: the report path runs, cheaply
        plan["settings"]["report_prompts"] = {"value": 1, "source": "test", "why": "matrix"}
        plan["settings"]["report_max_new_tokens"] = {"value": 4, "source": "test", "why": "matrix"}
        probe = Probe(plan.value("precision"))
        result = run_training(plan, show_progress=False, extra_callbacks=[probe])
        assert result.metrics["global_step"] == 3, cell
        model = probe.model
        fp32 = plan.value("precision") == "fp32"

        # 1. the batch is its examples: no attention across them, padding changes nothing
        tol = 1e-4 if fp32 else 3e-2
        check = probe.batch_check
        if not (check["loss"] < tol and check["grad"] < (1e-3 if fp32 else 8e-2)):
            failures.append(f"{cell}: batch vs examples differ {check} ({plan.value('attn_implementation')})")

        # 2. exactly the intended parameters changed
        after = dict(model.named_parameters())
        changed = {n for n, p in after.items() if not torch.equal(p.detach(), probe.before[n])}
        frozen_changed = changed - probe.trainable
        if frozen_changed:
            failures.append(f"{cell}: frozen parameters changed: {sorted(frozen_changed)[:4]}")
        stuck = probe.trainable - changed
        if name == "qwen2_vl":  # trained on text here: its projector (the merger) sees no image, no gradient
            stuck = {n for n in stuck if ".visual.merger." not in n}
        if stuck:
            failures.append(f"{cell}: trainable parameters did not change: {sorted(stuck)[:4]}")
        names = probe.trainable
        if not any("lora_" in n for n in names):
            failures.append(f"{cell}: no LoRA weights trained")
        if name in MOE:
            if not any("experts" in n and "lora_" in n for n in names):
                failures.append(f"{cell}: MoE experts not trained")
            if not any(n.endswith("gate.weight") or ".gate.modules_to_save" in n for n in names):
                failures.append(f"{cell}: MoE router not trained")
            if name in SHARED_EXPERTS and not any("shared_expert" in n and "lora_A" in n for n in names):
                failures.append(f"{cell}: the shared experts' MLP got no LoRA")
        if name == "qwen2_vl" and any(n.startswith("base_model.model.model.visual.blocks") for n in names):
            failures.append(f"{cell}: the vision tower trains")
        if name in VISION:
            if any(t in n for n in names for t in ("vision_tower", "vision_model")):
                failures.append(f"{cell}: the vision tower trains")
            if not any("multi_modal_projector" in n for n in names):
                failures.append(f"{cell}: the projector does not train")
        if method == "dora" and not any("lora_magnitude_vector" in n for n in names):
            failures.append(f"{cell}: --method dora but no DoRA magnitude vector trains")

        # 3. the precision the plan states is the one the layers compute in
        want = torch.float32 if fp32 else torch.bfloat16
        if probe.layer_dtypes != {want}:
            failures.append(
                f"{cell}: plan says {plan.value('precision')}, layers computed {probe.layer_dtypes}"
            )

        # 4. the saved adapter reloads to the same logits (in fp32 both)
        from llm_installer.loading import load_model
        from llm_installer.train.lora_setup import load_adapter

        model.eval()
        ids = torch.tensor([[1, 504, 3458, 314, 260, 3575, 282, 4649, 47, 2]])
        trained = _logits(model, ids)
        base = load_model(folder.model_dir, task=folder.load_info().task or "causal_lm", dtype="fp32")
        reloaded = load_adapter(base, out).eval()
        diff = float((trained - _logits(reloaded, ids)).abs().max())
        if diff > 1e-4:
            failures.append(f"{cell}: reloaded adapter logits differ by {diff:.2e}")
        info = json.loads((out / "adapter_info.json").read_text())
        assert info["method"] == method and info["plan"]["settings"]["precision"]["value"] == plan.value(
            "precision"
        )

        # 5. the engine serves it (once per family: loading the engine is the slow part)
        if i == 0:
            from llm_installer.serve.engine import ADAPTER_NAME, Engine, SamplingParams

            engine = Engine.load(folder.name, lora=out, dtype="fp32").start()
            greedy4 = SamplingParams(max_tokens=4, temperature=0)
            try:
                # a base request in flight beside the adapter one: PEFT's mixed batches, or separate ones
                base = engine.submit([1, 504, 3458], None, greedy4)
                done = engine.generate([1, 504, 3458], ADAPTER_NAME, greedy4)
                base_events = list(base)
            finally:
                engine.stop()
            if any(ev.error for ev in base_events) or not base_events[-1].finish_reason:
                failures.append(
                    f"{cell}: the base request beside the adapter one failed: {base_events[-1]!r}"
                )
            greedy = reloaded.generate(
                torch.tensor([[1, 504, 3458]]), max_new_tokens=4, do_sample=False, pad_token_id=0
            )[0, 3:]
            served = engine.tokenizer.encode(done.text, add_special_tokens=False)
            if done.finish_reason not in ("stop", "length") or (
                done.finish_reason == "length" and engine.tokenizer.decode(greedy) != done.text
            ):
                failures.append(
                    f"{cell}: engine answered {done!r}, the reloaded model {greedy.tolist()} ({served})"
                )
    assert not failures, "\n".join(failures)
