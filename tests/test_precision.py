"""The training precision: the CPU probe really measures, caches per machine, survives a bad cache, and the
rule honours or refuses each `--precision` per device. Fake timings are used only for the decision logic."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from llm_installer import cache, precision
from llm_installer.errors import UserError
from llm_installer.hardware import GPU, Hardware

CPU = Hardware(cpu_count=2, ram_gb=8.0, ram_available_gb=4.0, torch_version=torch.__version__)


def _gpu(cc: tuple[int, int]) -> Hardware:
    return Hardware(
        cpu_count=2, ram_gb=8.0, ram_available_gb=4.0, cuda=True, gpus=(GPU("test GPU", 16.0, cc),)
    )


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(d))
    return d


def _cache_files(d):
    return sorted(d.glob(f"{precision.CACHE_FILE_PREFIX}*.json")) if d.is_dir() else []


class _CountingSteps:
    """Wraps (or replaces) the probe's one timed step and counts the calls per precision."""

    def __init__(self, monkeypatch, fake=None) -> None:
        self.calls: list[tuple[int, bool]] = []
        real = precision._step_ms

        def step(bench, rows, bf16):
            self.calls.append((rows, bf16))
            return fake(rows, bf16, len(self.calls)) if fake else real(bench, rows, bf16)

        monkeypatch.setattr(precision, "_step_ms", step)

    def bf16_rows(self) -> list[int]:
        return [rows for rows, bf16 in self.calls if bf16]


def test_probe_measures_this_cpu_and_caches_the_answer(_cache_dir, monkeypatch):
    steps = _CountingSteps(monkeypatch)  # the real step, only counted
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    t0 = time.perf_counter()
    probe = precision.probe_cpu_precision(256, 512, rows=256)
    took = time.perf_counter() - t0
    assert not probe.cached and steps.calls
    assert all(math.isfinite(v) and v > 0 for v in (probe.fp32_ms, probe.bf16_ms, probe.seconds))
    assert probe.fp32_ms < 1000 and probe.bf16_ms < 1000 * precision._CLEARLY_SLOWER
    assert probe.choice == ("bf16" if probe.speedup >= precision.BF16_MIN_SPEEDUP else "fp32")
    assert probe.why.startswith("measured on this CPU: bf16") and probe.choice in probe.why
    assert (probe.hidden, probe.intermediate) == (256, 512) and 0 < probe.rows <= 256
    assert took < 10  # ~0.3 s plus the process's first backward; generous for a loaded test machine
    assert torch.get_num_threads() == threads  # the probe's single thread is given back
    assert torch.equal(torch.get_rng_state(), rng)  # training's seeded RNG is not consumed
    [path] = _cache_files(_cache_dir)
    stored = json.loads(path.read_text())
    assert stored["key"]["torch"] == torch.__version__ and stored["key"]["hidden"] == 256
    assert stored["key"]["cpu"] and stored["key"]["cores"] >= 1

    n = len(steps.calls)
    again = precision.probe_cpu_precision(256, 512, rows=256)
    assert again.cached and len(steps.calls) == n  # no timing ran
    assert (again.fp32_ms, again.bf16_ms, again.choice) == (probe.fp32_ms, probe.bf16_ms, probe.choice)
    assert "cached" in again.why and again.why.endswith(
        f": {probe.choice}" + probe.why.split(probe.choice)[-1]
    )

    other = precision.probe_cpu_precision(256, 384, rows=256)  # other shapes: another key, measured
    assert not other.cached and len(steps.calls) > n and len(_cache_files(_cache_dir)) == 2


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[]",
        '{"key": "x"}',
        None,  # the right key, but a measurement with a wrong type
        "NaN",  # the right key, a NaN time
    ],
)
def test_a_corrupt_cache_file_is_measured_again_and_rewritten(_cache_dir, monkeypatch, content):
    fake = _CountingSteps(monkeypatch, fake=lambda rows, bf16, n: rows * (0.05 if bf16 else 0.1))
    first = precision.probe_cpu_precision(128, 256, rows=128)
    [path] = _cache_files(_cache_dir)
    if content is None or content == "NaN":
        stored = json.loads(path.read_text())
        stored["measured"]["fp32_ms"] = "fast" if content is None else float("nan")
        path.write_text(json.dumps(stored))
    else:
        path.write_text(content)
    n = len(fake.calls)
    probe = precision.probe_cpu_precision(128, 256, rows=128)
    assert not probe.cached and len(fake.calls) > n  # measured again
    assert probe.choice == first.choice == "bf16"
    assert json.loads(path.read_text())["measured"]["fp32_ms"] == probe.fp32_ms  # rewritten, valid
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert precision.probe_cpu_precision(128, 256, rows=128).cached


def test_an_unwritable_cache_costs_a_measurement_not_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(blocker / "cache"))  # a folder inside a file: cannot exist
    _CountingSteps(monkeypatch, fake=lambda rows, bf16, n: rows * 0.1)
    probe = precision.probe_cpu_precision(128, 256, rows=128)
    assert not probe.cached and probe.choice == "fp32"
    assert not precision.probe_cpu_precision(128, 256, rows=128).cached


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_DIR_ENV, str(tmp_path / "mine"))
    assert cache.cache_dir() == tmp_path / "mine"
    monkeypatch.delenv(cache.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_dir() == tmp_path / "xdg" / "llm-installer"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_dir() == tmp_path / "home" / ".cache" / "llm-installer"


# The decision logic, on fake step times (ms as a function of rows): never a stand-in for the real probe.


def _per_row(fp32: float, bf16: float):
    return lambda rows, is_bf16, n: rows * (bf16 if is_bf16 else fp32)


def test_bf16_clearly_faster_is_chosen(monkeypatch):
    _CountingSteps(monkeypatch, fake=_per_row(0.1, 0.05))
    probe = precision.probe_cpu_precision(576, 1536, rows=512)
    assert probe.choice == "bf16" and probe.speedup == pytest.approx(2.0)
    assert probe.why == "measured on this CPU: bf16 25.6 ms vs fp32 51.2 ms per layer step (2.00x): bf16"
    assert not probe.stopped_early and probe.rounds >= precision._MIN_ROUNDS


@pytest.mark.parametrize("bf16_per_row", [0.12, 0.095])  # slower; faster but under the 1.15x bar
def test_bf16_not_clearly_faster_gives_fp32(monkeypatch, bf16_per_row):
    _CountingSteps(monkeypatch, fake=_per_row(0.1, bf16_per_row))
    probe = precision.probe_cpu_precision(576, 1536, rows=512)
    assert probe.choice == "fp32" and "bf16 needs >= 1.15x" in probe.why


def test_a_40x_slower_bf16_is_stopped_early(monkeypatch):
    steps = _CountingSteps(monkeypatch, fake=_per_row(0.1, 4.0))  # no bf16 instructions: 40x per row
    probe = precision.probe_cpu_precision(576, 1536, rows=512)
    assert probe.choice == "fp32" and probe.stopped_early and probe.rounds == 0
    assert max(steps.bf16_rows()) == 512 // 16 and len(steps.bf16_rows()) == 2  # one rung, confirmed once
    bf16_cost = sum(rows * 4.0 for rows in steps.bf16_rows())
    assert bf16_cost <= 512 * 4.0 / 8  # all of bf16's timing: an eighth of one full (40x) bf16 step
    assert "bf16 >= " in probe.why and "stopped early" in probe.why


def test_one_slow_first_bf16_call_is_no_verdict(monkeypatch):
    """A load spike (or kernel set-up) on bf16's first call must not cache 'fp32' on a bf16-fast CPU."""

    def fake(rows, bf16, n):
        return 5000.0 if bf16 and n == 4 else rows * (0.03 if bf16 else 0.1)  # call 4: bf16's first

    steps = _CountingSteps(monkeypatch, fake=fake)
    probe = precision.probe_cpu_precision(576, 1536, rows=512)
    assert steps.calls[3][1] is True
    assert probe.choice == "bf16" and not probe.stopped_early


def test_a_slow_machine_gets_fewer_rows(monkeypatch):
    steps = _CountingSteps(monkeypatch, fake=_per_row(2.0, 1.0))  # 1 s per fp32 step at 512 rows
    probe = precision.probe_cpu_precision(576, 1536, rows=512)
    assert probe.rows < 512 and probe.fp32_ms <= precision._SLOW_STEP_MS * 1.1
    assert max(r for r, _ in steps.calls[3:]) == probe.rows and probe.choice == "bf16"


def test_big_models_are_probed_on_scaled_down_shapes(monkeypatch):
    _CountingSteps(monkeypatch, fake=_per_row(0.1, 0.05))
    probe = precision.probe_cpu_precision(4096, 14336, rows=2048)
    assert probe.rows == 512 and 8 * probe.rows * probe.hidden * probe.intermediate <= 1.05 * 4e9
    assert probe.intermediate / probe.hidden == pytest.approx(14336 / 4096, rel=0.05)


# The rule: one home for every device and flag.


def test_auto_on_a_cpu_is_the_probe(monkeypatch):
    _CountingSteps(monkeypatch, fake=_per_row(0.1, 0.05))
    choice = precision.choose_precision("auto", CPU, hidden=576, intermediate=1536, rows=2048)
    assert (choice.precision, choice.source, choice.requested) == ("bf16", "measured", "auto")
    assert choice.probe is not None and choice.why == choice.probe.why
    assert choice.autocast_dtype is torch.bfloat16
    assert precision.choose_precision(None, CPU, hidden=576, intermediate=1536).probe.cached


@pytest.mark.parametrize("flag", ["fp32", "bf16", "BF16"])
def test_explicit_cpu_precisions_are_honoured_without_a_probe(monkeypatch, flag):
    monkeypatch.setattr(precision, "_measure", lambda *a: pytest.fail("an explicit flag must not probe"))
    choice = precision.choose_precision(flag, CPU, hidden=576, intermediate=1536)
    assert (choice.precision, choice.source, choice.probe) == (flag.lower(), "flag", None)
    assert choice.why == f"--precision {flag.lower()}"


def test_fp16_on_a_cpu_is_refused_with_the_flag_named():
    with pytest.raises(UserError, match=r"^--precision fp16 is not available on a CPU") as err:
        precision.choose_precision("fp16", CPU, hidden=576, intermediate=1536)
    assert "\n" not in str(err.value)


def test_an_unknown_precision_is_refused():
    with pytest.raises(UserError, match=r"--precision must be one of auto, fp32, bf16, fp16"):
        precision.choose_precision("int8", CPU, hidden=576, intermediate=1536)


@pytest.mark.parametrize("cc,best", [((9, 0), "bf16"), ((8, 0), "bf16"), ((7, 5), "fp16"), ((6, 1), "fp32")])
def test_cuda_auto_follows_compute_capability(monkeypatch, cc, best):
    monkeypatch.setattr(precision, "_measure", lambda *a: pytest.fail("no CPU probe for a GPU run"))
    choice = precision.choose_precision("auto", _gpu(cc), hidden=576, intermediate=1536)
    assert (choice.precision, choice.source) == (best, "gpu") and f"{cc[0]}.{cc[1]}" in choice.why
    assert _gpu(cc).best_precision() == best  # the old method reads the same rule


def test_cuda_explicit_values_are_honoured_with_a_note():
    old = _gpu((7, 0))
    bf16 = precision.choose_precision("bf16", old, hidden=64, intermediate=None)
    assert bf16.precision == "bf16" and "emulated" in bf16.why
    assert (
        precision.choose_precision("fp16", _gpu((8, 6)), hidden=64, intermediate=None).why
        == "--precision fp16"
    )
    assert precision.choose_precision("fp32", _gpu((9, 0)), hidden=64, intermediate=None).precision == "fp32"


def test_a_cpu_run_on_a_gpu_machine_uses_the_cpu_rule():
    with pytest.raises(UserError, match="fp16"):
        precision.choose_precision("fp16", _gpu((8, 0)), hidden=64, intermediate=128, device="cpu")


def test_mps_rule():
    mps = Hardware(cpu_count=8, ram_gb=16.0, ram_available_gb=8.0, mps=True, torch_version="2.5.1")
    assert precision.choose_precision("auto", mps, hidden=64, intermediate=128).precision == "fp32"
    assert precision.choose_precision("fp16", mps, hidden=64, intermediate=128).precision == "fp16"
    with pytest.raises(UserError, match=r"--precision bf16 on an Apple GPU needs torch >= 2.6"):
        precision.choose_precision("bf16", mps, hidden=64, intermediate=128)


def test_a_choice_serialises_for_the_plan(monkeypatch):
    _CountingSteps(monkeypatch, fake=_per_row(0.1, 0.05))
    data = json.loads(
        json.dumps(precision.choose_precision("auto", CPU, hidden=64, intermediate=128).to_dict())
    )
    assert data["precision"] == "bf16" and data["source"] == "measured" and data["probe"]["speedup"] == 2.0
    assert precision.choose_precision("fp32", CPU, hidden=64, intermediate=128).to_dict()["probe"] is None


def test_trainer_autocast_reaches_a_directly_called_backbone_only_inside_accelerator_autocast(tmp_path):
    """What the trainer relies on (transformers 5.24 / accelerate 1.15): `bf16=True, use_cpu=True` autocasts
    only the prepared model's own `forward` (accelerate wraps it); a loss that calls the backbone and head
    directly runs in fp32 unless it enters `accelerator.autocast()`. fp16 on a CPU gets no autocast at all."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, Trainer, TrainingArguments

    cfg = AutoConfig.for_model(
        "llama",
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=64,
    )
    model = get_peft_model(
        AutoModelForCausalLM.from_config(cfg), LoraConfig(r=2, target_modules=["down_proj"])
    )
    seen: list[torch.dtype] = []
    down = model.get_base_model().model.layers[0].mlp.down_proj.base_layer
    down.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def args(**kw):
        return TrainingArguments(str(tmp_path), use_cpu=True, report_to=[], **kw)

    acc = Trainer(model=model, args=args(bf16=True)).accelerator
    prepared = acc.prepare_model(model)
    ids = torch.tensor([[1, 2, 3]])
    backbone = prepared.get_base_model().model
    backbone(input_ids=ids)
    with acc.autocast():
        backbone(input_ids=ids)
    prepared(input_ids=ids)
    assert seen == [torch.float32, torch.bfloat16, torch.bfloat16]
    assert not Trainer(model=model, args=args(fp16=True)).accelerator.native_amp


@pytest.mark.parametrize("cc", [(9, 0), (8, 0), (7, 5), (6, 1)])
def test_the_handlers_and_serving_rules_live_here_and_read_the_gpu_rule(cc):
    gpu = _gpu(cc)
    best = precision.cuda_precision(cc)
    assert precision.handler_precision(gpu) == (best, best != "fp32")  # the seed's hardware-aware pattern
    assert precision.serving_precision(gpu) == best == gpu.best_precision()
    # a handler's wish this GPU cannot do well is downgraded; one it can do (or fp32) is kept
    assert precision.fit_handler_precision("bf16", gpu) == (None if best == "bf16" else best)
    assert precision.fit_handler_precision("fp16", gpu) == ("fp32" if best == "fp32" else None)
    assert precision.fit_handler_precision("fp32", gpu) is None


@pytest.mark.parametrize("fast", [True, False])
def test_on_a_cpu_handlers_say_auto_and_serving_follows_native_bf16(fast):
    cpu = Hardware(cpu_count=2, ram_gb=8.0, ram_available_gb=6.0, cpu_bf16_fast=fast)
    assert precision.handler_precision(cpu) == ("auto", False)  # the plan measures
    assert precision.fit_handler_precision("bf16", cpu) == "auto"
    assert precision.fit_handler_precision("fp16", cpu) == "auto"
    assert precision.fit_handler_precision("fp32", cpu) is None
    assert precision.serving_precision(cpu) == ("bf16" if fast else "fp32")
