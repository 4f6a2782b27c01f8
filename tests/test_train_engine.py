"""Engine pieces on a tiny model: padding-free packing and the labels-only head give the exact loss."""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm_installer.train.callbacks import AutoStopCallback, RunStats
from llm_installer.train.collate import PaddedCollator, PaddingFreeCollator, pack_rows
from llm_installer.train.loss import causal_lm_loss, split_head


@pytest.fixture(scope="module")
def tiny_lm():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=500,
        tie_word_embeddings=True,
    )
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()


def _examples(lengths, seed=0):
    rnd = random.Random(seed)
    out = []
    for n in lengths:
        ids = [rnd.randrange(3, 500) for _ in range(n)]
        cut = rnd.randrange(1, n)
        out.append({"input_ids": ids, "labels": [-100] * cut + ids[cut:]})
    return out


def _reference_loss(model, examples):
    """Token-weighted mean of transformers' own per-example loss: what an unpacked, unpadded run computes."""
    total = count = 0.0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        total += float(model(input_ids=ids, labels=labels).loss) * n
        count += n
    return total / count


def test_packed_padded_and_plain_losses_are_identical(tiny_lm):
    examples = _examples([7, 19, 12, 30, 3, 25])
    ref = _reference_loss(tiny_lm, examples)
    packed = PaddingFreeCollator(pad_token_id=0, max_row_tokens=40)(examples)
    padded = PaddedCollator(pad_token_id=0)(examples)
    assert packed["input_ids"].shape[0] < len(examples)  # several examples share a row
    with torch.no_grad():
        a = float(causal_lm_loss(tiny_lm, packed))
        b = float(causal_lm_loss(tiny_lm, padded))
        c = float(causal_lm_loss(tiny_lm, padded, head_on_labels=False))
    assert a == pytest.approx(ref, abs=1e-5)
    assert b == pytest.approx(ref, abs=1e-5)
    assert c == pytest.approx(ref, abs=1e-5)


def test_packed_examples_do_not_attend_to_each_other(tiny_lm):
    """Changing one example must not change the loss contribution of its row neighbour."""
    a, b = _examples([10, 12], seed=1)
    b2 = dict(b, input_ids=[t + 1 if t < 499 else 3 for t in b["input_ids"]])
    collate = PaddingFreeCollator(pad_token_id=0, max_row_tokens=64)
    only_a = {"input_ids": a["input_ids"], "labels": a["labels"]}
    with torch.no_grad():
        l1 = causal_lm_loss(tiny_lm, collate([only_a, dict(b, labels=[-100] * len(b["labels"]))]))
        l2 = causal_lm_loss(tiny_lm, collate([only_a, dict(b2, labels=[-100] * len(b2["labels"]))]))
    assert collate([a, b])["input_ids"].shape[0] == 1
    assert float(l1) == pytest.approx(float(l2), abs=1e-6)


def test_labels_only_head_gives_the_same_gradients(tiny_lm):
    examples = _examples([9, 14, 6], seed=2)
    batch = PaddedCollator(pad_token_id=0)(examples)
    grads = []
    for head_on_labels in (True, False):
        tiny_lm.zero_grad()
        causal_lm_loss(tiny_lm, batch, head_on_labels=head_on_labels).backward()
        grads.append(tiny_lm.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)
    assert split_head(tiny_lm) is not None


def test_padding_tokens_are_counted_apart():
    examples = _examples([5, 9, 4])
    packed = PaddingFreeCollator(pad_token_id=0, max_row_tokens=9)(examples)
    assert int(packed["num_real_tokens"]) == 18
    padded = PaddedCollator(pad_token_id=0)(examples)
    assert int(padded["num_real_tokens"]) == 18 and padded["input_ids"].numel() == 27


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=60), min_size=1, max_size=20), st.integers(16, 64))
def test_pack_rows_places_every_example_once_within_the_row_limit(lengths, cap):
    rows = pack_rows(lengths, cap)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    for row in rows:
        assert len(row) == 1 or sum(lengths[i] for i in row) <= cap


class _Control:
    should_training_stop = False
    should_save = False


class _State:
    global_step = 0


def _auto(**kw):
    stats = RunStats()
    base = dict(
        patience=2, overfitting_threshold=0.5, perfect_loss=0.01, plateau_cycles=None, plateau_tolerance=0.01
    )
    base.update(kw)
    return stats, AutoStopCallback(stats, **base)


def _evaluate(cb, stats, value, step):
    """What the trainer does at an evaluation: auto-stop looks first, then the best value is recorded."""
    control, state = _Control(), _State()
    state.global_step = step
    cb.on_evaluate(None, state, control, metrics={"eval_loss": value})
    if stats.best_eval_loss is None or value < stats.best_eval_loss:
        stats.best_eval_loss, stats.best_step = value, step
    return control


def test_early_stopping_after_patience_evaluations():
    stats, cb = _auto(overfitting_threshold=0)
    assert not _evaluate(cb, stats, 2.0, 1).should_training_stop
    assert not _evaluate(cb, stats, 1.5, 2).should_training_stop
    assert not _evaluate(cb, stats, 1.6, 3).should_training_stop
    control = _evaluate(cb, stats, 1.7, 4)
    assert control.should_training_stop and control.should_save
    assert stats.stop_reason.startswith("early stopping") and "best 1.5000 at step 2" in stats.stop_reason


def test_overfitting_when_the_gap_keeps_growing():
    stats, cb = _auto(patience=0)
    for step, (train, val) in enumerate([(1.0, 1.2), (0.6, 1.3), (0.3, 1.4)], start=1):
        cb.on_log(None, _State(), _Control(), logs={"loss": train})
        cb.recent_train = [train]
        control = _evaluate(cb, stats, val, step)
    assert control.should_training_stop and stats.stop_reason.startswith("overfitting")


def test_perfect_loss_and_plateau():
    stats, cb = _auto()
    control = _Control()
    for loss in (0.005, 0.004):
        cb.on_log(None, _State(), control, logs={"loss": loss})
    assert control.should_training_stop and stats.stop_reason.startswith("perfect loss")

    stats, cb = _auto(plateau_cycles=2, perfect_loss=0)
    control = _Control()
    for epoch_loss in (2.0, 1.0, 0.999, 0.998):
        cb.on_log(None, _State(), control, logs={"loss": epoch_loss})
        cb.on_epoch_end(None, _State(), control)
    assert control.should_training_stop and stats.stop_reason.startswith("plateau")


def test_per_example_sdpa_on_one_packed_row_matches_the_reference(tiny_lm):
    """packed_sdpa: a whole batch in one row, attention per example, same loss and same generation."""
    from llm_installer.train.attention import register

    examples = _examples([7, 19, 12, 30, 3, 25], seed=4)
    ref = _reference_loss(tiny_lm, examples)
    batch = PaddingFreeCollator(pad_token_id=0, max_row_tokens=10_000)(examples)
    assert batch["input_ids"].shape[0] == 1 and int(batch["num_real_tokens"]) == batch["input_ids"].numel()
    prompt = torch.tensor([[5, 6, 7, 8]])
    plain = tiny_lm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    tiny_lm.set_attn_implementation(register())
    try:
        with torch.no_grad():
            loss = float(causal_lm_loss(tiny_lm, batch))
        packed = tiny_lm.generate(input_ids=prompt, max_new_tokens=6, do_sample=False)
    finally:
        tiny_lm.set_attn_implementation("sdpa")
    assert loss == pytest.approx(ref, abs=1e-5)
    assert packed.tolist() == plain.tolist()


def test_per_example_sdpa_gradients_match_unpacked_examples(tiny_lm):
    """packed_sdpa's backward (split per example, grouped-query heads) gives the unpacked gradients."""
    from llm_installer.train.attention import register

    examples = _examples([9, 4, 17, 2, 11], seed=7)
    n_labels = sum(sum(1 for t in ex["labels"][1:] if t != -100) for ex in examples)
    tiny_lm.zero_grad(set_to_none=True)
    for ex in examples:  # reference: each example alone, losses summed token-weighted
        ids, labels = torch.tensor([ex["input_ids"]]), torch.tensor([ex["labels"]])
        n = int((labels[:, 1:] != -100).sum())
        (tiny_lm(input_ids=ids, labels=labels).loss * n / n_labels).backward()
    ref = {k: p.grad.clone() for k, p in tiny_lm.named_parameters()}
    tiny_lm.zero_grad(set_to_none=True)
    batch = PaddingFreeCollator(pad_token_id=0, max_row_tokens=10_000)(examples)
    batch.pop("num_real_tokens")
    tiny_lm.set_attn_implementation(register())
    try:
        causal_lm_loss(tiny_lm, batch).backward()
    finally:
        tiny_lm.set_attn_implementation("sdpa")
    for k, p in tiny_lm.named_parameters():
        assert torch.allclose(p.grad, ref[k], atol=1e-5), k
    tiny_lm.zero_grad(set_to_none=True)
