"""The training precision: what `--precision {auto,fp32,bf16,fp16}` becomes on this machine, and why.

One home for the rule; the plan, `check` and the handlers ask `choose_precision` and show its `why`.
The handlers' side of it lives here too: `handler_precision` (the seed's hardware-aware pattern a handler
states) and `fit_handler_precision` (what `show --training` shows this machine can do), and so does the
serving dtype (`serving_precision`).

- CUDA: `auto` follows the compute capability: bf16 from 8.0 (native bf16 tensor cores), fp16 on 7.x
  (tensor cores, loss-scaled), fp32 below. An explicit bf16 or fp16 is honoured on any CUDA GPU (bf16
  below 8.0 is emulated and slower than fp16; the `why` says so).
- CPU: `auto` is measured, not read from the CPU flags. The flags were wrong both ways on the machines this
  project ran on: an AMD EPYC without AVX512-BF16 trained ~40x slower in bf16, while AVX512-BF16 gave
  ~1.9x and AMX ~6x. `probe_cpu_precision` times a forward+backward through the model's own MLP shapes in
  fp32 and under bf16 autocast, caches the answer per machine and torch version, and bf16 is chosen only
  when it is at least `BF16_MIN_SPEEDUP` times faster. An explicit bf16 is honoured on any CPU (autocast
  bf16 works everywhere, slowly without native instructions). fp16 on a CPU is refused: torch 2.13 can
  autocast fp16 on a CPU, but accelerate 1.15 (which applies the Trainer's autocast) enables no fp16
  autocast on a CPU device, so `TrainingArguments(fp16=True, use_cpu=True)` trains in fp32 without a word,
  and the plan would state a precision the run does not apply.
- Apple GPU (MPS): `auto` is fp32; an explicit fp16 (torch >= 2.5) or bf16 (torch >= 2.6, macOS 14) is
  honoured where accelerate accepts it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from llm_installer.errors import UserError

if TYPE_CHECKING:
    from llm_installer.hardware import Hardware

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
Precision = Literal["fp32", "bf16", "fp16"]

# bf16 on a CPU only when clearly faster: timing noise and the per-step casts must not tip a close call.
BF16_MIN_SPEEDUP = 1.15
PROBE_VERSION = 1  # bump when the probe's work changes: older cached answers are then not reused
CACHE_FILE_PREFIX = "precision-probe-"

# The probe's work. A training step sees batch x sequence rows (often 2,048). bf16 autocast recasts the frozen
# weights every step, a cost that weighs less at many rows, so fewer rows can only understate bf16's gain
# (AMX here, one thread: 3.9x at 512 rows, 6.8x at 2,048): the probe keeps up to 512 rows and shrinks a big
# model's layer shapes instead, to about 4 GFLOP a step (SmolLM2's 576 x 1,536 at 512 rows: 3.6).
_MAX_ROWS = 512
_MIN_ROWS = 16
_MAX_STEP_FLOPS = 4e9
_SLOW_STEP_MS = 200.0  # a first fp32 step slower than this (a slow or loaded machine) shrinks the rows
_CLEARLY_SLOWER = 2.0  # bf16 this many times slower than fp32 ends the timing
_DECIDED = (0.8, 1.5 * BF16_MIN_SPEEDUP)  # after 3 rounds a speedup outside this range is settled
_MIN_ROUNDS, _MAX_ROUNDS = 2, 7
_BUDGET_S = 1.5  # no further round is started that would end past this (after the process's set-up)


@dataclass(frozen=True)
class CpuProbe:
    """One measurement of fp32 vs bf16-autocast training speed on this CPU (or its cached copy)."""

    fp32_ms: float  # best fp32 step (forward + backward through Linear(h, i) and Linear(i, h))
    bf16_ms: float  # best bf16-autocast step; with `stopped_early`, a lower bound (bf16 was clearly slower)
    choice: Literal["bf16", "fp32"]
    cached: bool
    why: str  # one line, for the plan and `check`
    hidden: int  # the shapes timed: the model's, scaled down for big models
    intermediate: int
    rows: int
    rounds: int  # interleaved fp32/bf16 rounds timed
    stopped_early: bool
    seconds: float  # how long the measurement took when it was made (a cached answer costs ~nothing)

    @property
    def speedup(self) -> float:
        """fp32 time over bf16 time: above 1, bf16 is faster."""
        return self.fp32_ms / self.bf16_ms if self.bf16_ms > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """For a JSON plan or report (with the speedup)."""
        return {**asdict(self), "speedup": round(self.speedup, 3)}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run applies, what was asked, and the one-line reason."""

    precision: Precision
    requested: str  # what `--precision` said ("auto" when not given)
    source: Literal["flag", "measured", "gpu", "mps"]  # the flag, the CPU probe, the GPU's capability, MPS
    why: str
    probe: CpuProbe | None = None  # set when a CPU `auto` was decided by the probe

    @property
    def autocast_dtype(self) -> Any:
        """The `torch.autocast` dtype for this precision (None for fp32: no autocast)."""
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def to_dict(self) -> dict[str, Any]:
        """For a JSON plan or report."""
        return {
            "precision": self.precision,
            "requested": self.requested,
            "source": self.source,
            "why": self.why,
            "probe": self.probe.to_dict() if self.probe else None,
        }


def cuda_precision(compute_capability: tuple[int, int] | None) -> Precision:
    """`auto` on a CUDA GPU: bf16 from compute capability 8.0, fp16 on 7.x, fp32 below (or unknown)."""
    major = compute_capability[0] if compute_capability else 0
    return "bf16" if major >= 8 else "fp16" if major >= 7 else "fp32"


def handler_precision(hw: Hardware) -> tuple[str, bool]:
    """(training_precision, supports_flash_attention) a handler states for `hw`: the seed's
    hardware-aware pattern (compute capability >= 8: bf16 + flash attention, 7.x: fp16 + flash, below:
    fp32); "auto" off CUDA, where the plan measures bf16 against fp32 (`choose_precision`)."""
    if hw.cuda and hw.compute_capability:
        best = cuda_precision(hw.compute_capability)
        return best, best != "fp32"
    return "auto", False


def fit_handler_precision(wanted: str | None, hw: Hardware) -> str | None:
    """A handler's `training_precision` this machine cannot do well, downgraded; None = keep `wanted`.

    On CUDA bf16 below compute capability 8.0 becomes what it supports, fp16 without tensor cores fp32;
    an explicit fp32 stays fp32. On a CPU bf16/fp16 become "auto": the plan measures bf16 against fp32
    and fp16 has no CPU autocast."""
    if hw.cuda:
        best = cuda_precision(hw.compute_capability)
        if (wanted == "bf16" and best != "bf16") or (wanted == "fp16" and best == "fp32"):
            return best
        return None
    return "auto" if wanted in ("bf16", "fp16") else None


def serving_precision(hw: Hardware) -> Precision:
    """The dtype `chat` / `start` load a model in: the GPU's compute-capability rule, fp32 on an Apple GPU,
    and on a CPU bf16 where the CPU has native bf16 (AVX512-BF16 / AMX; FACTS: 114 vs 65.9 tok/s decode on
    SmolLM2) — a decode is matmul-bound, not the training step `probe_cpu_precision` times."""
    if hw.cuda:
        return cuda_precision(hw.compute_capability)
    if hw.mps:
        return "fp32"
    return "bf16" if hw.cpu_bf16_fast else "fp32"


def choose_precision(
    requested: str | None,
    hw: Hardware,
    *,
    hidden: int,
    intermediate: int | None,
    rows: int = _MAX_ROWS,
    device: str | None = None,
) -> PrecisionChoice:
    """The precision a training run on `hw` applies for `--precision requested`.

    `hidden` / `intermediate` are the model's hidden and MLP sizes (intermediate None: 4 x hidden), `rows`
    the tokens of one training batch (batch size x sequence length): the CPU probe times those shapes.
    `device` overrides `hw.accelerator` (a CPU run on a machine with a GPU). An explicit precision the device
    cannot apply raises a one-line `UserError` naming the flag.
    """
    req = (requested or "auto").strip().lower()
    if req not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)} (got {requested!r})")
    dev = device or hw.accelerator
    if dev == "cuda":
        cc = hw.compute_capability
        cc_text = f"{cc[0]}.{cc[1]}" if cc else "unknown"
        if req == "auto":
            best = cuda_precision(cc)
            return PrecisionChoice(best, req, "gpu", f"GPU compute capability {cc_text}: {best}")
        note = ""
        if req == "bf16" and cuda_precision(cc) != "bf16":
            note = f" (compute capability {cc_text} has no native bf16: emulated, slower than fp16)"
        elif req == "fp16" and cuda_precision(cc) == "fp32":
            note = f" (compute capability {cc_text} has no fp16 tensor cores: little faster than fp32)"
        return PrecisionChoice(req, req, "flag", f"--precision {req}{note}")  # type: ignore[arg-type]
    if dev == "mps":
        if req == "auto":
            return PrecisionChoice("fp32", req, "mps", "Apple GPU: fp32 is the safe choice")
        if req != "fp32":
            need = (2, 5) if req == "fp16" else (2, 6)
            if _torch_version(hw) < need:
                raise UserError(
                    f"--precision {req} on an Apple GPU needs torch >= {need[0]}.{need[1]} "
                    f"(this is {hw.torch_version}); use --precision fp32"
                )
        return PrecisionChoice(req, req, "flag", f"--precision {req}")  # type: ignore[arg-type]
    # CPU
    if req == "fp16":
        raise UserError(
            "--precision fp16 is not available on a CPU: the trainer (accelerate) applies no fp16 autocast "
            "there and would train in fp32; use --precision bf16 or fp32"
        )
    if req in ("fp32", "bf16"):
        return PrecisionChoice(req, req, "flag", f"--precision {req}")  # type: ignore[arg-type]
    probe = probe_cpu_precision(hidden, intermediate, rows=rows)
    return PrecisionChoice(probe.choice, req, "measured", probe.why, probe)


def probe_cpu_precision(
    hidden: int, intermediate: int | None, *, rows: int = _MAX_ROWS, use_cache: bool = True
) -> CpuProbe:
    """Whether bf16 autocast trains faster than fp32 on this CPU at these shapes: measured once, then cached.

    The cache key is the CPU model and its bf16-relevant flags, the core count, the torch version, the
    shapes and the probe's version; the answer is kept as JSON in the user cache folder
    (`llm_installer.cache.cache_dir()`). A missing or malformed cache file is measured again and rewritten.
    """
    from llm_installer import cache

    hidden, intermediate, rows = _check_shapes(hidden, intermediate, rows)
    key = _cache_key(hidden, intermediate, rows)
    path = cache.cache_dir() / f"{CACHE_FILE_PREFIX}{_key_digest(key)}.json"
    if use_cache:
        hit = _from_cache(cache.read_json(path), key)
        if hit is not None:
            return hit
    measured = _measure(hidden, intermediate, rows)
    probe = _result(measured, cached=False)
    if use_cache:
        cache.write_json_atomic(
            path, {"key": key, "measured": measured, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        )
    return probe


def _torch_version(hw: Hardware) -> tuple[int, int]:
    """(major, minor) of the torch `hw` was detected with, (0, 0) when unknown."""
    import re

    m = re.match(r"(\d+)\.(\d+)", hw.torch_version or "")
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _check_shapes(hidden: int, intermediate: int | None, rows: int) -> tuple[int, int, int]:
    if not isinstance(hidden, int) or hidden <= 0:
        raise ValueError(f"hidden must be a positive int, got {hidden!r}")
    if not intermediate:
        intermediate = 4 * hidden
    if not isinstance(intermediate, int) or intermediate <= 0:
        raise ValueError(f"intermediate must be a positive int, got {intermediate!r}")
    return hidden, intermediate, max(_MIN_ROWS, min(int(rows), _MAX_ROWS))


# Flags that change how fast bf16 or fp32 matmuls run (x86 and ARM): a part of the cache key.
_RELEVANT_FLAGS = frozenset(
    {
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512_bf16",
        "avx512_fp16",
        "avx512_vnni",
        "avx_vnni",
        "amx_tile",
        "amx_bf16",
        "amx_fp16",
        "asimd",
        "bf16",
        "sve",
        "sve2",
        "sme",
        "i8mm",
    }
)


def _cache_key(hidden: int, intermediate: int, rows: int) -> dict[str, Any]:
    import torch

    from llm_installer import hardware

    return {
        "probe_version": PROBE_VERSION,
        "cpu": hardware.cpu_model(),
        "flags": sorted(hardware._cpu_flags() & _RELEVANT_FLAGS),
        "cores": hardware.detect().cpu_count,
        "torch": torch.__version__,
        "hidden": hidden,
        "intermediate": intermediate,
        "rows": rows,
    }


def _key_digest(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


_MEASURED_FIELDS = {
    "fp32_ms": float,
    "bf16_ms": float,
    "hidden": int,
    "intermediate": int,
    "rows": int,
    "rounds": int,
    "stopped_early": bool,
    "seconds": float,
}


def _from_cache(data: Any, key: dict[str, Any]) -> CpuProbe | None:
    """The cached probe when `data` is a well-formed entry for exactly `key`, else None (measure again)."""
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    measured = data.get("measured")
    if not isinstance(measured, dict):
        return None
    clean: dict[str, Any] = {}
    for name, kind in _MEASURED_FIELDS.items():
        value = measured.get(name)
        if kind is bool:
            if not isinstance(value, bool):
                return None
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            return None  # also NaN
        clean[name] = kind(value)
    if clean["fp32_ms"] <= 0 or clean["bf16_ms"] <= 0:
        return None
    return _result(clean, cached=True)


def _result(measured: dict[str, Any], *, cached: bool) -> CpuProbe:
    """The decision on a measurement: bf16 only when it is at least BF16_MIN_SPEEDUP times faster."""
    fp32_ms, bf16_ms = measured["fp32_ms"], measured["bf16_ms"]
    speedup = fp32_ms / bf16_ms
    choice: Literal["bf16", "fp32"] = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    notes = []
    if measured["stopped_early"]:
        notes.append("bf16 stopped early")
    if cached:
        notes.append("cached")
    at_least = ">= " if measured["stopped_early"] else ""
    why = (
        f"measured on this CPU: bf16 {at_least}{bf16_ms:.1f} ms vs fp32 {fp32_ms:.1f} ms per layer step "
        f"({speedup:.2f}x{', ' + ', '.join(notes) if notes else ''}): {choice}"
        + ("" if choice == "bf16" else f" (bf16 needs >= {BF16_MIN_SPEEDUP}x)")
    )
    return CpuProbe(choice=choice, cached=cached, why=why, **measured)


def _probe_shapes(hidden: int, intermediate: int, rows: int) -> tuple[int, int]:
    """The model's (hidden, intermediate), scaled down together when one step would pass _MAX_STEP_FLOPS."""
    flops = 8.0 * rows * hidden * intermediate  # two Linears, forward + input gradient (LoRA: frozen weights)
    if flops <= _MAX_STEP_FLOPS:
        return hidden, intermediate
    f = (_MAX_STEP_FLOPS / flops) ** 0.5
    return max(16, round(hidden * f / 16) * 16), max(16, round(intermediate * f / 16) * 16)


class _Bench:
    """Two frozen Linear weights (hidden -> intermediate -> hidden) and inputs per row count.

    Plain tensors from their own generator rather than `nn.Linear` modules, whose initialisation would draw
    from the global RNG and shift a seeded training run.
    """

    def __init__(self, hidden: int, intermediate: int) -> None:
        import torch

        self.gen = torch.Generator().manual_seed(0)
        self.up = torch.randn(intermediate, hidden, generator=self.gen) * hidden**-0.5
        self.down = torch.randn(hidden, intermediate, generator=self.gen) * intermediate**-0.5
        self.inputs: dict[int, Any] = {}

    def input(self, rows: int) -> Any:
        import torch

        if rows not in self.inputs:
            x = torch.randn(rows, self.up.shape[1], generator=self.gen).requires_grad_(True)
            self.inputs[rows] = x
        return self.inputs[rows]


def _step_ms(bench: _Bench, rows: int, bf16: bool) -> float:
    """One LoRA-like training step of the bench in ms: forward (under bf16 autocast or not) and backward to
    the input (the frozen base weights get no gradient in LoRA training, as here)."""
    import torch
    import torch.nn.functional as F

    x = bench.input(rows)
    x.grad = None
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = F.linear(F.linear(x, bench.up), bench.down)
    y.sum().backward()  # a scalar, as a loss: `backward(grad)` would import sympy on its first call (~1 s)
    return (time.perf_counter() - start) * 1e3


def _measure(hidden: int, intermediate: int, rows: int) -> dict[str, Any]:
    """Interleaved fp32 / bf16 rounds, best time of each, bounded to about _BUDGET_S.

    It runs on one thread: on a shared machine a multi-threaded step mostly measures how long its threads
    wait for each other's time slices (2 threads at load 10 on 2 cores: bf16 58 ms vs 16 ms on one thread),
    while the fp32/bf16 ratio of one core is what the choice needs. Best-of (not mean) because load only
    ever adds time; rounds alternate which precision goes first so drifting load favours neither.

    bf16 is first timed on 1/16, then 1/4, then all of the rows: bf16 slower on a part of the rows than
    fp32 on all of them ends the probe there, so a CPU without bf16 instructions (40x slower) costs a few
    fp32 steps' time instead of a 40x step. A rung that trips is timed again right after a fresh fp32 step
    and must trip against that one too: a load spike (or a first call's kernel set-up) is no verdict, and
    a wrong "fp32" would be cached. The tripping time is then a lower bound of a full bf16 step.
    """
    import torch

    start = time.perf_counter()
    h, i = _probe_shapes(hidden, intermediate, rows)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            bench = _Bench(h, i)
            _step_ms(bench, _MIN_ROWS, False)  # the process's first matmuls and backward: set-up, not timing
            budget_start = time.perf_counter()
            _step_ms(bench, rows, False)  # this shape's first call
            first = _step_ms(bench, rows, False)
            if first > _SLOW_STEP_MS and rows > _MIN_ROWS:  # a slow or busy machine: less work per step
                rows = max(_MIN_ROWS, int(rows * _SLOW_STEP_MS / first) // _MIN_ROWS * _MIN_ROWS)
                _step_ms(bench, rows, False)
                first = _step_ms(bench, rows, False)
            fp32 = [first]
            bf16: list[float] = []
            stopped = False
            for rung in sorted({max(_MIN_ROWS, rows // 16), max(_MIN_ROWS, rows // 4), rows}):
                t = _step_ms(bench, rung, True)
                if t > _CLEARLY_SLOWER * min(fp32):
                    fresh = _step_ms(bench, rows, False)
                    fp32.append(fresh)
                    t = min(t, _step_ms(bench, rung, True))
                    if t > _CLEARLY_SLOWER * fresh:
                        bf16.append(t)
                        stopped = True
                        break
                if rung == rows:
                    bf16.append(t)
            rounds = 0
            while not stopped and rounds < _MAX_ROUNDS:
                for is_bf16 in (True, False) if rounds % 2 else (False, True):
                    (bf16 if is_bf16 else fp32).append(_step_ms(bench, rows, is_bf16))
                rounds += 1
                a, b = min(fp32), min(bf16)
                if b > _CLEARLY_SLOWER * a:
                    stopped = True
                elif rounds >= 3 and not _DECIDED[0] < a / b < _DECIDED[1]:
                    break
                elif (
                    rounds >= _MIN_ROUNDS
                    and time.perf_counter() - budget_start + 1.5 * (a + b) / 1e3 > _BUDGET_S
                ):
                    break
    finally:
        torch.set_num_threads(threads)
    return {
        "fp32_ms": round(min(fp32), 3),
        "bf16_ms": round(min(bf16), 3),
        "hidden": h,
        "intermediate": i,
        "rows": rows,
        "rounds": rounds,
        "stopped_early": stopped,
        "seconds": round(time.perf_counter() - start, 3),
    }


__all__ = [
    "BF16_MIN_SPEEDUP",
    "PRECISIONS",
    "CpuProbe",
    "PrecisionChoice",
    "choose_precision",
    "cuda_precision",
    "probe_cpu_precision",
]
