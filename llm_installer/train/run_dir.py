"""Run folders, checkpoints, resume, and the atomic adapter write (what `run_training` keeps on disk).

`runs/<timestamp>/` holds a run's checkpoints (`checkpoint-N/`, each complete only once its marker is
written), `run_info.json` (the plan and fingerprints a resume is checked against) and the report; the
adapter is swapped into `lora/` (or --output) whole, never half-written.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from llm_installer import faults
from llm_installer.errors import UserError
from llm_installer.train.plan import TrainingPlan

RUN_INFO = "run_info.json"
ADAPTER_INFO = "adapter_info.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


def _timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def new_run_dir(runs_dir: Path) -> Path:
    """runs/<YYYYmmdd-HHMMSS>[-n]/ — names sort in creation order."""
    runs_dir.mkdir(parents=True, exist_ok=True)
    base = _timestamp()
    for n in range(1000):
        name = base if n == 0 else f"{base}-{n:03d}"
        path = runs_dir / name
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UserError(f"cannot create a run folder in {runs_dir}: too many runs this second")


COMPLETE_MARKER = ".complete"


def mark_checkpoint_complete(ckpt: Path) -> None:
    """Flush a just-saved checkpoint's files to disk, then write its marker: only then may --resume use it.

    A kill or a full disk during the save leaves a folder without the marker, which resume skips."""
    if not ckpt.is_dir():
        return
    for f in ckpt.iterdir():
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    marker = ckpt / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as fh:
        fh.write("complete\n")
        fh.flush()
        os.fsync(fh.fileno())


def checkpoint_is_complete(ckpt: Path) -> bool:
    """The marker is there and the files a resume reads are still whole (a rotation may have been cut)."""
    if not (ckpt / COMPLETE_MARKER).is_file():
        return False
    try:
        json.loads((ckpt / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return any(ckpt.glob("*.safetensors")) and (ckpt / "optimizer.pt").is_file()


def checkpoints(run_dir: Path, *, complete_only: bool = True) -> list[Path]:
    """checkpoint-N folders of a run in numeric order (checkpoint-10 after checkpoint-9); by default only
    the complete ones (see `mark_checkpoint_complete`)."""
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found) if not complete_only or checkpoint_is_complete(p)]


def find_resume_checkpoint(runs_dir: Path, resume: str) -> Path:
    """`latest`: the newest run that has a checkpoint, its highest step; else a run or checkpoint path."""
    if resume == "latest":
        runs = (
            sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.name)
            if runs_dir.is_dir()
            else []
        )
        for run in reversed(runs):
            cks = checkpoints(run)
            if cks:
                return cks[-1]
        raise UserError(f"--resume: no checkpoint found under {runs_dir}; start a new run without --resume")
    path = Path(resume).expanduser()
    if not path.is_absolute() and not path.exists() and (runs_dir / resume).exists():
        path = runs_dir / resume
    if not path.exists():
        raise UserError(f"--resume-from {resume}: no such run or checkpoint folder")
    if _CKPT.match(path.name) and path.is_dir():
        if not checkpoint_is_complete(path):
            raise UserError(
                f"--resume-from {resume}: that checkpoint is incomplete (its save was cut short); resume from "
                f"its run folder {path.parent} to take the newest complete checkpoint"
            )
        return path.resolve()
    cks = checkpoints(path)
    if not cks:
        raise UserError(
            f"--resume-from {resume}: no complete checkpoint-N folder inside; pick a run under {runs_dir}"
        )
    return cks[-1].resolve()


def resume_args(runs_dir: Path, args: dict[str, Any]) -> dict[str, Any]:
    """The flags of the run being resumed, overlaid with the ones given now.

    `train NAME --resume` must continue the run as it was started (its mode, data, rank...), so the
    printed resume command needs no flag repeated; a flag given now still wins and is then checked by the
    fingerprint like any other change."""
    from llm_installer.train.plan import USER_KEYS

    resume = args.get("resume_from") or ("latest" if args.get("resume") else None)
    if not resume:
        return args
    ckpt = find_resume_checkpoint(runs_dir, str(resume))
    try:
        old = json.loads((ckpt.parent / RUN_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return args  # check_resume_compatible names the missing file
    settings = old.get("plan", {}).get("settings", {})
    given = {
        key: entry["value"]
        for key, entry in settings.items()
        if key in USER_KEYS
        and key != "resume"
        and entry.get("source") == "user"
        and str(entry.get("why", "")).startswith("--")
    }
    return {**given, **args}


def check_resume_compatible(run_dir: Path, fingerprint: str, plan: TrainingPlan) -> None:
    """Refuse to continue a run made with another base model, dataset or recipe (naming what changed)."""
    info_path = run_dir / RUN_INFO
    try:
        old = json.loads(info_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise UserError(
            f"cannot resume from {run_dir}: {RUN_INFO} is missing or damaged; start a new run"
        ) from None
    if old.get("fingerprint") == fingerprint:
        return
    changed = []
    om, nm = old.get("plan", {}).get("model", {}), plan.model
    for key in ("model_id", "revision"):
        if om.get(key) != nm.get(key):
            changed.append(f"base model {key} {om.get(key)!r} -> {nm.get(key)!r}")
    from llm_installer.train.plan import NOT_FINGERPRINTED

    oldset = {k: v.get("value") for k, v in old.get("plan", {}).get("settings", {}).items()}
    for key, value in plan.values().items():
        if key in NOT_FINGERPRINTED or key in ("data",):
            continue
        if key in oldset and json.dumps(oldset[key], default=str) != json.dumps(value, default=str):
            changed.append(f"{key} {oldset[key]!r} -> {value!r}")
    what = "; ".join(changed) or "the plan"
    raise UserError(
        f"cannot resume {run_dir.name}: it was trained differently ({what}); run without --resume to start "
        f"a new run, or resume with the original settings"
    )


# ---------------------------------------------------------------------------------------------------------
# Writing the adapter atomically


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_adapter_leftovers(target: Path) -> None:
    """Undo what a killed adapter write left beside `target`: a half-written `.NAME.tmp-PID` is removed; a
    `.NAME.old-PID` (the previous adapter, moved aside just before the swap) goes back when `target` is
    missing, else it is removed. Only leftovers of processes that are gone are touched."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    for kind in ("tmp", "old"):
        for path in parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if not pid.isdigit() or _pid_alive(int(pid)):
                continue
            if kind == "old" and not target.exists():
                os.replace(path, target)
            else:
                shutil.rmtree(path, ignore_errors=True)


def check_adapter_target(target: Path, model_root: Path) -> None:
    """Refuse an adapter destination whose contents a write would destroy.

    Writing an adapter replaces its folder whole, so the target must be new, empty, or an adapter folder
    already (it has adapter_config.json); never the model folder, its weights, or a folder holding them."""
    target = Path(target).expanduser().resolve()
    root = Path(model_root).resolve()
    if target == root or root.is_relative_to(target) or target.is_relative_to(root / "model"):
        raise UserError(
            f"--output {target}: that is the model's own folder (or holds it); writing the adapter there would "
            "replace it: give a new or empty folder"
        )
    if target.exists() and not target.is_dir():
        raise UserError(f"--output {target}: it is a file; give a new or empty folder")
    if target.is_dir() and any(target.iterdir()) and not (target / "adapter_config.json").is_file():
        raise UserError(
            f"--output {target}: the folder holds other files and an adapter write would replace them all: "
            "give a new or empty folder, or an adapter folder to overwrite"
        )


def write_adapter_atomically(
    model: Any,
    target: Path,
    info: dict[str, Any],
    extra_files: list[Path] = (),
    source_dir: Path | None = None,
) -> Path:
    """Save the adapter into a temp folder beside `target`, then swap it in: never a half-written lora/."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_adapter_leftovers(target)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if source_dir is not None:
            shutil.copytree(source_dir, tmp)
        else:
            model.save_pretrained(str(tmp))
        (tmp / ADAPTER_INFO).write_text(json.dumps(info, indent=2, default=str), encoding="utf-8")
        for f in extra_files:
            if f and Path(f).is_file():
                shutil.copy2(f, tmp / Path(f).name)
        if target.exists():
            os.replace(target, old)
            faults.point("adapter.old-aside")
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return target
