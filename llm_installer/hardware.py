"""Facts about this machine that decide precision, quantisation and fit: CPU, RAM, GPU, disk.

`detect()` imports torch lazily; results are cached per process.
"""

from __future__ import annotations

import functools
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gb: float
    compute_capability: tuple[int, int]


@dataclass(frozen=True)
class Hardware:
    cpu_count: int
    ram_gb: float
    ram_available_gb: float
    cuda: bool = False
    gpus: tuple[GPU, ...] = field(default_factory=tuple)
    mps: bool = False
    cpu_bf16_fast: bool = False  # AVX512-BF16 / AMX: bf16 matmuls several times faster than fp32
    torch_version: str | None = None
    torch_cuda_version: str | None = None

    @property
    def gpu(self) -> GPU | None:
        return self.gpus[0] if self.gpus else None

    @property
    def compute_capability(self) -> tuple[int, int] | None:
        return self.gpu.compute_capability if self.gpu else None

    @property
    def accelerator(self) -> str:
        return "cuda" if self.cuda else "mps" if self.mps else "cpu"

    def best_precision(self) -> str:
        """The old rule, kept until its callers move to `llm_installer.precision.choose_precision`.

        On a GPU it is that module's compute-capability rule; on a CPU it trusts the bf16 flags, which
        `choose_precision` replaces with a timed probe (the flags said "fast" on machines where bf16 training
        was slower than fp32).
        """
        if self.cuda and self.compute_capability:
            from llm_installer.precision import cuda_precision

            return cuda_precision(self.compute_capability)
        if self.mps:
            return "fp32"
        return "bf16" if self.cpu_bf16_fast else "fp32"

    def supports_flash_attention(self) -> bool:
        return bool(self.cuda and self.compute_capability and self.compute_capability[0] >= 8)

    def to_dict(self) -> dict:
        return asdict(self)


def _meminfo() -> tuple[float, float]:
    total = avail = 0.0
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                kb = float(rest.split()[0])
                if key == "MemTotal":
                    total = kb / 1024**2
                elif key == "MemAvailable":
                    avail = kb / 1024**2
    except (OSError, ValueError, IndexError):
        pass
    return total, avail


def _cpu_flags() -> set[str]:
    """The first CPU's instruction-set flags (x86 `flags`, ARM `Features`), empty where /proc is absent."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_model() -> str:
    """The CPU's model name with its family/model/stepping numbers where /proc/cpuinfo has them.

    A cache key part: a virtual machine often reports a generic name ("Intel(R) Xeon(R) Processor"), and the
    numbers tell its CPU generations apart. Elsewhere it is what `platform` knows.
    """
    import platform

    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or fields.get("Model") or fields.get("Hardware") or ""
    numbers = [f"{k} {fields[k]}" for k in ("cpu family", "model", "stepping", "CPU part") if fields.get(k)]
    if not name:
        name = platform.processor() or platform.machine() or "unknown"
    return f"{name} ({', '.join(numbers)})" if numbers else name


def cpu_bf16_fast() -> bool:
    """True when the CPU has native bf16 matmul instructions (AVX512-BF16 or AMX-BF16)."""
    flags = _cpu_flags()
    return bool({"avx512_bf16", "amx_bf16"} & flags)


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """Probe the machine once (imports torch)."""
    import torch

    total, avail = _meminfo()
    gpus: list[GPU] = []
    cuda = bool(torch.cuda.is_available())
    if cuda:
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            gpus.append(GPU(props.name, props.total_memory / 1024**3, (props.major, props.minor)))
    mps = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    return Hardware(
        cpu_count=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1),
        ram_gb=total,
        ram_available_gb=avail,
        cuda=cuda,
        gpus=tuple(gpus),
        mps=mps,
        cpu_bf16_fast=cpu_bf16_fast(),
        torch_version=torch.__version__,
        torch_cuda_version=torch.version.cuda,
    )


def disk_free_gb(path: Path) -> float:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free / 1024**3
