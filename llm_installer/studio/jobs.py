"""Studio jobs: installs (a thread running `install.install`) and trainings (the `train` CLI as a subprocess).

Jobs live in the studio server, not in a page: a reload or a second browser lists the same jobs, and closing
the page stops nothing. Trainings run one at a time (the machine's cores are shared); a second training of a
model that already has one running or queued is refused, trainings of other models wait in the queue.
Stop sends SIGINT, which the trainer handles like Ctrl-C: it saves a checkpoint and writes the adapter and
report; `--resume` continues from it.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_installer import store
from llm_installer.errors import UserError

_ids = itertools.count(1)
ACTIVE = ("queued", "running", "stopping")


class Busy(UserError):
    """The model already has a job queued or running (HTTP 409)."""

    status = 409


@dataclass
class Job:
    """One install or training, as the page sees it (`public()`)."""

    kind: str  # install | train
    model: str
    argv: list[str] = field(default_factory=list)
    id: int = field(default_factory=lambda: next(_ids))
    state: str = "queued"  # queued | running | stopping | done | stopped | failed
    error: str | None = None
    message: str = ""
    progress: float | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    ended: float | None = None
    run_dir: Path | None = None
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    exit_code: int | None = None

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "model": self.model,
            "state": self.state,
            "error": self.error,
            "message": self.message,
            "progress": self.progress,
            "created": self.created,
            "started": self.started,
            "ended": self.ended,
            "run": self.run_dir.name if self.run_dir else None,
            "command": " ".join(["llm-installer", *self.argv]) if self.argv else None,
        }


def last_error_line(text: str) -> str | None:
    """The CLI's one-line `error: ...` from a log (it prints nothing else on a failure)."""
    for line in reversed(text.splitlines()):
        if line.startswith("error:"):
            return line[len("error:") :].strip()
    return None


def read_metrics(run_dir: Path | None, since: int = 0) -> list[dict[str, Any]]:
    """metrics.jsonl lines from index `since` (a line still being written is left for the next read)."""
    if run_dir is None or not (run_dir / "metrics.jsonl").is_file():
        return []
    rows: list[dict[str, Any]] = []
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            break
    return rows[since:]


class Jobs:
    """The studio's job list and training queue (one worker thread starts queued trainings in turn)."""

    def __init__(self, log_dir: Path, python: str | None = None) -> None:
        self.log_dir = log_dir
        self.python = python or sys.executable
        self.jobs: dict[int, Job] = {}
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.on_trained: list[Any] = []  # callbacks(model) when a training ends (the compare engine reloads)
        threading.Thread(target=self._worker, name="studio-train-queue", daemon=True).start()

    # ----- listing ----------------------------------------------------------------------------------------
    def get(self, job_id: int) -> Job:
        job = self.jobs.get(job_id)
        if job is None:
            raise UserError(f"no job {job_id} in this studio")
        return job

    def listing(self) -> list[dict[str, Any]]:
        with self.lock:
            return [j.public() for j in sorted(self.jobs.values(), key=lambda j: j.id)]

    def busy(self, model: str) -> Job | None:
        """The install or training of `model` that is queued or running, if any."""
        return next((j for j in self.jobs.values() if j.model == model and j.state in ACTIVE), None)

    # ----- installs -----------------------------------------------------------------------------------------
    def start_install(self, ref: str, name: str, expected_bytes: int | None, **kwargs: Any) -> Job:
        """Install in a thread (the install module itself); progress = bytes in its partial folder."""
        with self.lock:
            other = self.busy(name)
            if other is not None:
                raise Busy(f"{name} already has a {other.kind} job ({other.state}); wait for it to finish")
            job = Job("install", name, argv=["install", ref, "--name", name], state="running")
            job.started = time.time()
            self.jobs[job.id] = job
        threading.Thread(target=self._install, args=(job, ref, expected_bytes, kwargs), daemon=True).start()
        return job

    def _install(self, job: Job, ref: str, expected: int | None, kwargs: dict[str, Any]) -> None:
        from llm_installer.install import install

        done = threading.Event()
        watcher = threading.Thread(target=self._watch_partial, args=(job, expected, done), daemon=True)
        watcher.start()
        try:
            result = install(ref, name=job.model, **kwargs)
            job.state, job.progress = "done", 1.0
            job.message = "installed" if result.installed else "already installed"
        except UserError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a bug: one line, as the CLI prints it
            job.state, job.error = "failed", f"unexpected {type(exc).__name__}: {exc}"
        finally:
            done.set()
            job.ended = time.time()

    @staticmethod
    def _watch_partial(job: Job, expected: int | None, done: threading.Event) -> None:
        partial = store.partial_dir(job.model)
        while not done.wait(0.5):
            try:
                size = sum(p.stat().st_size for p in partial.rglob("*") if p.is_file())
            except OSError:  # a file renamed or removed while counting (or no partial folder yet)
                continue
            job.message = f"{store.human_size(size)} written"
            if expected:
                job.progress = min(0.99, size / expected)

    # ----- trainings ----------------------------------------------------------------------------------------
    def queue_training(self, model: str, argv: list[str]) -> Job:
        """Queue `llm-installer <argv>` for `model`; refused while the model has a job queued or running."""
        with self.lock:
            other = self.busy(model)
            if other is not None:
                raise Busy(
                    f"{model} already has a {other.kind} job ({other.state}, job {other.id}); "
                    "one training at a time per model: stop it or wait for it to finish"
                )
            job = Job("train", model, argv=argv)
            self.jobs[job.id] = job
            self.wake.notify_all()
        return job

    def stop(self, job_id: int) -> Job:
        """A queued job is dropped; a running one gets SIGINT (checkpoint, adapter and report are written)."""
        with self.lock:
            job = self.get(job_id)
            if job.kind != "train" or job.state not in ACTIVE:
                raise UserError(f"job {job_id} is not a queued or running training ({job.state})")
            if job.state == "queued":
                job.state, job.ended, job.message = "stopped", time.time(), "removed from the queue"
                return job
            job.state = "stopping"
            if job.proc is not None and job.proc.poll() is None:
                job.proc.send_signal(signal.SIGINT)
        return job

    def shutdown(self, timeout: float = 60.0) -> None:
        """The studio is closing: queued trainings are dropped, running ones stopped as by Stop (SIGINT),
        then killed if they have not saved within `timeout` seconds. Nothing is left running unseen."""
        with self.lock:
            for job in self.jobs.values():
                if job.kind == "train" and job.state == "queued":
                    job.state, job.message = "stopped", "the studio closed"
            running = [j for j in self.jobs.values() if j.proc is not None and j.proc.poll() is None]
        for job in running:
            job.proc.send_signal(signal.SIGINT)
        for job in running:
            try:
                job.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                job.proc.kill()
                job.proc.wait()

    def _next(self) -> Job:
        with self.lock:
            while True:
                queued = [j for j in self.jobs.values() if j.kind == "train" and j.state == "queued"]
                running = any(
                    j.kind == "train" and j.state in ("running", "stopping") for j in self.jobs.values()
                )
                if queued and not running:
                    job = min(queued, key=lambda j: j.id)
                    job.state, job.started = "running", time.time()
                    return job
                self.wake.wait(1.0)

    def _worker(self) -> None:
        while True:
            job = self._next()
            try:
                self._run_training(job)
            except Exception as exc:  # never let one job end the queue
                job.state, job.error = "failed", f"unexpected {type(exc).__name__}: {exc}"
            job.ended = time.time()
            with self.lock:
                self.wake.notify_all()
            for fn in self.on_trained:
                fn(job.model)

    def _run_training(self, job: Job) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        job.log_path = self.log_dir / f"job-{job.id}.log"
        runs = store.models_dir() / job.model / store.RUNS_SUBDIR
        before = {p.name: _mtime(p / "metrics.jsonl") for p in runs.iterdir()} if runs.is_dir() else {}
        cmd = [self.python, "-m", "llm_installer", "--models-dir", str(store.models_dir()), *job.argv]
        env = dict(os.environ, COLUMNS="120", NO_COLOR="1", PYTHONUNBUFFERED="1")
        with job.log_path.open("wb") as log:
            job.proc = subprocess.Popen(
                cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
            if job.state == "stopping":  # Stop pressed between queue and start
                job.proc.send_signal(signal.SIGINT)
            while job.proc.poll() is None:
                job.run_dir = job.run_dir or _current_run(runs, before)
                time.sleep(0.5)
        job.exit_code = job.proc.returncode
        job.run_dir = job.run_dir or _current_run(runs, before)
        text = job.log_path.read_text(encoding="utf-8", errors="replace")
        end = [r for r in read_metrics(job.run_dir) if r.get("event") == "end"]
        job.message = _final_stop_reason(job.run_dir) or (end[-1]["stop_reason"] if end else "")
        if job.exit_code == 0:
            job.state = "done"
        elif job.exit_code == 130 and end:
            job.state = "stopped"
        else:
            job.state = "failed"
            job.error = last_error_line(text) or f"the training ended with exit code {job.exit_code}"


def _final_stop_reason(run_dir: Path | None) -> str | None:
    """The trainer's own last word on why it stopped (run_info.json), once the run has finished."""
    try:
        return json.loads((run_dir / "run_info.json").read_text(encoding="utf-8")).get("stop_reason")
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _current_run(runs: Path, before: dict[str, float]) -> Path | None:
    """The run folder this training writes: a new one, or (a resume) the one whose metrics file grew."""
    if not runs.is_dir():
        return None
    for p in sorted(runs.iterdir(), key=_mtime, reverse=True):
        metrics = p / "metrics.jsonl"
        if p.is_dir() and (p.name not in before or (metrics.is_file() and _mtime(metrics) > before[p.name])):
            return p
    return None


def remove_upload_leftovers(folder: Path) -> None:
    """Delete half-written uploads of an earlier studio that was killed mid-upload."""
    if folder.is_dir():
        for p in folder.glob(".*.part"):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
