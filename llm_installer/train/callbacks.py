"""Trainer callbacks: auto-stop, graceful interrupt, live progress, best-adapter keeping, token counting.

They are transformers `TrainerCallback`s so the loop stays transformers' own (and `accelerate launch`-able);
each one only reads the trainer state and flips `control` flags.
"""

from __future__ import annotations

import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback


@dataclass
class RunStats:
    """Counters shared between the loss function and the callbacks."""

    real_tokens: int = 0  # non-padding tokens trained on
    computed_tokens: int = 0  # tokens the model computed (incl. padding)
    label_tokens: int = 0
    train_seconds: float = 0.0
    started: float = field(default_factory=time.perf_counter)
    stop_reason: str | None = None
    best_eval_loss: float | None = None
    best_step: int | None = None
    last_train_loss: float | None = None
    last_eval_loss: float | None = None

    @property
    def tokens_per_second(self) -> float:
        elapsed = time.perf_counter() - self.started
        return self.real_tokens / elapsed if elapsed > 0 else 0.0

    @property
    def padding_fraction(self) -> float:
        return 1 - self.real_tokens / self.computed_tokens if self.computed_tokens else 0.0


class InterruptFlag:
    """Turns the first Ctrl-C / SIGTERM into a request to checkpoint and stop; a second one is a hard stop."""

    def __init__(self) -> None:
        self.signal_name: str | None = None
        self._old: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.signal_name = signal.Signals(signum).name
        for sig, old in self._old.items():  # a second signal acts immediately
            signal.signal(sig, old)

    def __enter__(self) -> InterruptFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()

    @property
    def requested(self) -> bool:
        return self.signal_name is not None


class InterruptCallback(TrainerCallback):
    """After the step in flight, save a checkpoint and stop when an interrupt was requested."""

    def __init__(self, flag: InterruptFlag, stats: RunStats) -> None:
        self.flag = flag
        self.stats = stats

    def on_step_end(self, args, state, control, **kwargs):
        if self.flag.requested:
            self.stats.stop_reason = f"interrupted ({self.flag.signal_name}) at step {state.global_step}"
            control.should_save = True
            control.should_training_stop = True
        return control


class AutoStopCallback(TrainerCallback):
    """Early stopping on validation loss, overfitting detection, perfect-loss and plateau stops.

    - early stop: the validation loss did not improve (by > `min_delta`) for `patience` evaluations;
    - overfitting: validation minus training loss is above `overfitting_threshold` and grew at each of the
      last two evaluations;
    - perfect loss: the recent training loss is below `perfect_loss` (nothing left to learn);
    - plateau (circle mode): the epoch's mean training loss improved by less than `plateau_tolerance`
      (relative) for `plateau_cycles` epochs in a row.
    """

    def __init__(
        self,
        stats: RunStats,
        *,
        patience: int | None,
        overfitting_threshold: float | None,
        perfect_loss: float | None,
        plateau_cycles: int | None,
        plateau_tolerance: float,
        min_delta: float = 1e-4,
    ) -> None:
        self.stats = stats
        self.patience = patience or 0
        self.overfitting_threshold = overfitting_threshold or 0.0
        self.perfect_loss = perfect_loss or 0.0
        self.plateau_cycles = plateau_cycles or 0
        self.plateau_tolerance = plateau_tolerance
        self.min_delta = min_delta
        self.bad_evals = 0
        self.gaps: list[float] = []
        self.recent_train: list[float] = []
        self.epoch_losses: list[float] = []
        self.epoch_means: list[float] = []
        self.flat_epochs = 0

    def _stop(self, control, reason: str) -> None:
        if self.stats.stop_reason is None:
            self.stats.stop_reason = reason
        control.should_training_stop = True
        control.should_save = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return control
        loss = float(logs["loss"])
        self.recent_train = (self.recent_train + [loss])[-3:]
        self.epoch_losses.append(loss)
        recent = sum(self.recent_train) / len(self.recent_train)
        if self.perfect_loss and len(self.recent_train) >= 2 and recent < self.perfect_loss:
            self._stop(
                control,
                f"perfect loss: training loss {recent:.4f} < {self.perfect_loss} at step {state.global_step}",
            )
        return control

    def on_epoch_end(self, args, state, control, **kwargs):
        if not self.epoch_losses:
            return control
        mean = sum(self.epoch_losses) / len(self.epoch_losses)
        self.epoch_losses = []
        if self.plateau_cycles and self.epoch_means:
            prev = self.epoch_means[-1]
            improvement = (prev - mean) / prev if prev > 0 else 0.0
            self.flat_epochs = self.flat_epochs + 1 if improvement < self.plateau_tolerance else 0
            if self.flat_epochs >= self.plateau_cycles:
                self._stop(
                    control,
                    f"plateau: training loss improved < {self.plateau_tolerance:.0%} for "
                    f"{self.plateau_cycles} cycles (now {mean:.4f}, cycle {len(self.epoch_means) + 1})",
                )
        self.epoch_means.append(mean)
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return control
        ev = float(metrics["eval_loss"])
        if self.patience:
            best = self.stats.best_eval_loss
            if best is not None and ev > best - self.min_delta:
                self.bad_evals += 1
            else:
                self.bad_evals = 0
            if self.bad_evals >= self.patience:
                self._stop(
                    control,
                    f"early stopping: validation loss did not improve for {self.patience} "
                    f"evaluation(s) (best {best:.4f} at step {self.stats.best_step})",
                )
        if self.overfitting_threshold and self.recent_train:
            train = sum(self.recent_train) / len(self.recent_train)
            gap = ev - train
            self.gaps.append(gap)
            g = self.gaps[-3:]
            if gap > self.overfitting_threshold and len(g) == 3 and g[0] < g[1] < g[2]:
                self._stop(
                    control,
                    f"overfitting: validation loss {ev:.4f} exceeds training loss {train:.4f} by "
                    f"{gap:.2f} (> {self.overfitting_threshold}) and the gap keeps growing",
                )
        return control


class BestTracker(TrainerCallback):
    """Remembers the best validation loss; with `keep_dir`, saves the adapter each time it improves."""

    def __init__(self, stats: RunStats, keep_dir: Path | None = None) -> None:
        self.stats = stats
        self.keep_dir = keep_dir

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not metrics or "eval_loss" not in metrics:
            return control
        ev = float(metrics["eval_loss"])
        self.stats.last_eval_loss = ev
        if self.stats.best_eval_loss is None or ev < self.stats.best_eval_loss:
            self.stats.best_eval_loss = ev
            self.stats.best_step = state.global_step
            if self.keep_dir is not None and model is not None:
                model.save_pretrained(str(self.keep_dir))
                (self.keep_dir / "best_step.txt").write_text(f"{state.global_step} {ev}\n")
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.stats.last_train_loss = float(logs["loss"])
        return control


class ProgressCallback(TrainerCallback):
    """A live rich progress bar: step / total, loss, validation loss, tokens/s and ETA."""

    def __init__(self, stats: RunStats, console: Any, enabled: bool = True) -> None:
        self.stats = stats
        self.console = console
        self.enabled = enabled
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.stats.started = time.perf_counter()  # tokens/s counts training, not model loading
        if not self.enabled:
            return control
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.progress.start()
        total = state.max_steps if state.max_steps and state.max_steps < 10**7 else None
        self.task = self.progress.add_task("train", total=total, completed=state.global_step, info="")
        return control

    def _info(self) -> str:
        s = self.stats
        parts = []
        if s.last_train_loss is not None:
            parts.append(f"loss {s.last_train_loss:.4f}")
        if s.last_eval_loss is not None:
            parts.append(f"val {s.last_eval_loss:.4f}")
        from llm_installer.train.distributed import world_size

        # the bar is the main process's; the others train alike batches at the same pace, so the whole
        # run's rate is this process's times the number of processes (the end-of-run figure is summed)
        parts.append(f"{s.tokens_per_second * world_size():.0f} tok/s")
        return "  ".join(parts)

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info())
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, info=self._info())
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step, info=self._info())
            self.progress.stop()
            self.progress = None
        return control


class MetricsFileCallback(TrainerCallback):
    """Appends one JSON line per logged step to `runs/<ts>/metrics.jsonl`, and a last line with the stop reason.

    A file, not a socket: the studio (or `tail -f`) follows a training that runs in another process, and a
    page reloaded mid-run reads the whole curve back. Each line is written and closed at once, so a reader
    never sees half a line except the one being appended (readers skip a line that does not parse).
    """

    def __init__(self, path: Path, stats: RunStats, enabled: bool = True) -> None:
        self.path = Path(path)
        self.stats = stats
        self.enabled = enabled
        self._t0: float | None = None
        self._step0 = 0

    def _write(self, row: dict[str, Any]) -> None:
        import json

        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
        except OSError:  # a full disk: the chart misses a point; the trainer's own saving reports it
            pass

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._step0 = time.perf_counter(), state.global_step
        if self.enabled:
            self._write({"event": "begin", "step": state.global_step, "max_steps": state.max_steps})
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.enabled or not logs or not ("loss" in logs or "eval_loss" in logs):
            return control
        done = state.global_step - self._step0
        elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
        left = max(0, (state.max_steps or 0) - state.global_step)
        row = {
            "step": state.global_step,
            "max_steps": state.max_steps,
            "epoch": round(float(state.epoch or 0), 4),
            "loss": logs.get("loss"),
            "eval_loss": logs.get("eval_loss"),
            "tokens_per_s": round(self.stats.tokens_per_second, 1),
            "eta_s": round(elapsed / done * left, 1) if done > 0 else None,
        }
        self._write(row)
        return control

    def on_train_end(self, args, state, control, **kwargs):
        if self.enabled:
            reason = self.stats.stop_reason or f"finished at step {state.global_step} of {state.max_steps}"
            self._write({"event": "end", "step": state.global_step, "stop_reason": reason})
        return control
