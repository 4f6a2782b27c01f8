"""What a run leaves for a person to read: the loss plot, report.md, and before/after answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

IGNORE = -100


def held_out_prompts(examples: list[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Up to `n` (prompt ids, expected ids) pairs: the tokens before the first label, and the labelled ones.

    The prompt is the rendered conversation up to the answer (chat template and generation prompt
    included), so generating from it asks the model exactly what training taught. An image or video
    example's prompt also keeps its media tensors (`media`: pixel_values etc.), so a vision-language model
    answers about the picture it was trained on.
    """
    from llm_installer.data.collate import MEDIA_KEYS

    out: list[dict[str, Any]] = []
    if n <= 0:
        return out
    for ex in examples:
        labels = ex["labels"]
        first = next((i for i, t in enumerate(labels) if t != IGNORE), None)
        if first is None or first == 0:
            continue
        expected = [t for t in labels[first:] if t != IGNORE]
        prompt: dict[str, Any] = {"prompt": list(ex["input_ids"][:first]), "expected": expected}
        media = {k: ex[k] for k in MEDIA_KEYS if ex.get(k) is not None}
        if media and ex.get("token_type_ids") is not None:
            media["token_type_ids"] = [list(ex["token_type_ids"][:first])]
        if media:
            prompt["media"] = media
        out.append(prompt)
        if len(out) >= n:
            break
    return out


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (batch 1 each, the model's own generate; with the prompt's images)."""
    import torch

    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = stop_ids or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    answers = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p["prompt"]], device=device)
            media = {k: torch.as_tensor(v).to(device) for k, v in (p.get("media") or {}).items()}
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                **media,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos,
                pad_token_id=pad,
            )
            answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    if was_training:
        model.train()
    return answers


def loss_history(
    log_history: list[dict[str, Any]],
) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    train = [(int(e["step"]), float(e["loss"])) for e in log_history if "loss" in e and "step" in e]
    val = [(int(e["step"]), float(e["eval_loss"])) for e in log_history if "eval_loss" in e and "step" in e]
    return train, val


def plot_losses(log_history: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Training and validation loss against the optimizer step, as a PNG (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = loss_history(log_history)
    if not train and not val:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], label="train", color="tab:blue")
    if val:
        ax.plot([s for s, _ in val], [v for _, v in val], label="validation", color="tab:orange", marker="o")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
    return path


def write_report(
    path: Path,
    *,
    info: dict[str, Any],
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    before: list[str],
    after: list[str],
) -> Path:
    """report.md: what was trained, how it ended, and the answers before and after on held-out prompts."""
    m = info["metrics"]
    lines = [
        f"# Training report: {info['base_model']['model_id']}",
        "",
        f"- stop reason: **{info['stop_reason']}**",
        f"- handler: {info['handler']}, method: {info['plan']['settings']['method']['value']}, "
        f"mode: {info['plan']['settings']['mode']['value']}",
        f"- examples: {info['data']['train_examples']} train, {info['data']['validation_examples']} validation",
        f"- steps: {m.get('global_step')}, epochs: {m.get('epoch')}",
        f"- final training loss: {m.get('train_loss_last')}, best validation loss: {m.get('best_eval_loss')}",
        f"- trained tokens/s (non-padding): {m.get('tokens_per_second')}, padding: {m.get('padding_fraction')}",
        "",
        "![loss](loss.png)",
        "",
        "## Answers before and after training (held-out prompts, greedy)",
        "",
    ]
    for i, p in enumerate(prompts):
        prompt_text = tokenizer.decode(p["prompt"], skip_special_tokens=True).strip()
        expected = tokenizer.decode(p["expected"], skip_special_tokens=True).strip()
        lines += [
            f"### Prompt {i + 1}",
            "",
            "```",
            prompt_text[-600:],
            "```",
            "",
            f"- expected: {expected}",
            f"- before: {before[i] if i < len(before) else ''}",
            f"- after: {after[i] if i < len(after) else ''}",
            "",
        ]
    if not prompts:
        lines.append("(no held-out prompt with an answer to show)")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
