"""What a run leaves for a person to read: the loss plot, report.md, and before/after answers."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from llm_installer.constants import IGNORE_INDEX

if TYPE_CHECKING:
    from llm_installer.chat_format import ChatFormat

IGNORE = IGNORE_INDEX


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


@dataclass
class Answer:
    """One greedy answer and how it ended: at a stop token (the end of turn) or at the token limit."""

    text: str
    stopped: bool
    new_tokens: int


def generate_with_stops(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
) -> list[Answer]:
    """Greedy answers to `prompts` (batch 1 each, the model's own generate; with the prompt's images).

    `stop_ids` should be the model's ChatFormat.stop_token_ids, the ids `chat` and `start` stop at, so
    an answer that stops here stops there too (and one that does not is reported as running on).
    """
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
            new = out[0, ids.shape[1] :].tolist()
            stopped = bool(new) and new[-1] in (eos or [])
            text = tokenizer.decode(new, skip_special_tokens=True).strip()
            answers.append(Answer(text, stopped, len(new)))
    if was_training:
        model.train()
    return answers


def generate_answers(
    model: Any,
    tokenizer: Any,
    prompts: list[dict[str, Any]],
    *,
    max_new_tokens: int,
    stop_ids: list[int] | None = None,
) -> list[str]:
    """The texts of `generate_with_stops` (for callers that do not need how each answer ended)."""
    answers = generate_with_stops(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
    return [a.text for a in answers]


def _answer_line(answer: Answer | str | None, end_of_turn: str | None) -> str:
    if answer is None:
        return ""
    if isinstance(answer, str):
        return answer
    if answer.stopped:
        return f"{answer.text} _(stopped at {end_of_turn or 'a stop token'})_"
    return f"{answer.text} _(no end-of-turn token within {answer.new_tokens} tokens: `chat` would run on)_"


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
    before: list[Answer] | list[str],
    after: list[Answer] | list[str],
    chat_format: ChatFormat | None = None,
) -> Path:
    """report.md: what was trained, how it ended, and the answers before and after on held-out prompts.

    With `chat_format`, the report names the template and end-of-turn token the model was trained with
    (the ones `chat`, `start` and `export` use) and says of each answer whether it stopped at it.
    """
    m = info["metrics"]
    eot = chat_format.end_of_turn if chat_format is not None else None
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
        *([f"- chat format: {chat_format.describe()}"] if chat_format is not None else []),
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
            f"- before: {_answer_line(before[i] if i < len(before) else None, eot)}",
            f"- after: {_answer_line(after[i] if i < len(after) else None, eot)}",
            "",
        ]
    if not prompts:
        lines.append("(no held-out prompt with an answer to show)")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path
