"""The data behind each studio step, as plain JSON: the same calls the CLI commands make, without the tables.

store/fit for Models, data.inspect for Data, train.plan + train.dry_run for Plan, export for Export.
"""

from __future__ import annotations

import io
from typing import Any

from llm_installer import store
from llm_installer.errors import UserError
from llm_installer.studio import paths


def model_rows() -> list[dict[str, Any]]:
    """`llm-installer list` as rows: name, family, handler, parameters, size, adapter, status."""
    from llm_installer.commands.store_cmds import model_row

    store.recover_all()
    rows = []
    for folder in store.installed_folders():
        if folder.name == paths.STUDIO_DIR:
            continue
        rows.append(model_row(folder))
    return rows


def check_model(ref: str) -> dict[str, Any]:
    """`llm-installer check REF` as data: the model's facts, the fit rows and the verdict."""
    from llm_installer import fit, hardware
    from llm_installer.commands.store_cmds import _gb, _params

    info = fit.info_for_check(ref)
    hw = hardware.detect()
    report = fit.estimate(info, hw)
    return {
        "model_id": info.model_id,
        "family": info.family,
        "parameters": _params(info.num_parameters),
        "size": _gb(info.model_size_gb),
        "context_length": info.context_length,
        "machine": f"RAM {hw.ram_gb:.1f} GiB"
        + (f", GPU {hw.gpu.memory_gb:.1f} GiB" if hw.gpu else ", no GPU"),
        "rows": [
            {"use": r.label, "needs": _gb(r.gb), "fits_gpu": r.fits_gpu, "fits_ram": r.fits_ram}
            for r in report.rows
        ],
        "verdict": report.verdict,
        "settings": {k: str(v) for k, v in report.settings.items()},
    }


def verify_model(name: str) -> dict[str, Any]:
    from llm_installer.commands.store_cmds import reinstall_command

    folder = paths.model_folder(name)
    try:
        result = store.verify_folder(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"{folder.info_path.name} of {name} is damaged ({exc}); reinstall it") from None
    out = {
        "ok": result.ok,
        "checked": result.checked,
        "missing": [str(p) for p in result.missing],
        "changed": [str(p) for p in result.changed],
        "extra": [str(p) for p in result.extra],
    }
    out["message"] = (
        f"ok: all {result.checked} files match the manifest"
        if result.ok
        else f"{len(result.missing)} missing and {len(result.changed)} changed of {result.checked} files; "
        f"reinstall with `{reinstall_command(folder)}`"
    )
    return out


def inspect_view(data: list[str], model: str | None, max_seq_length: int | None) -> dict[str, Any]:
    """`llm-installer data inspect` as data; the tokenizer is the model's, else the bundled one."""
    from llm_installer.commands.data_cmd import _tokenizer_and_handler
    from llm_installer.data.inspect import histogram, inspect_data

    files = [str(paths.resolve_data_path(d)) for d in data]
    if model:
        paths.model_folder(model)  # a name of the store, not a path
    tokenizer, handler = _tokenizer_and_handler(model or None)
    report = inspect_data(files, tokenizer, handler=handler, max_seq_length=max_seq_length)
    result = report.result
    shown = dict(zip(files, data, strict=True))
    rejects = [(r.origin, r.reason) for r in result.rejects] + report.render_rejects
    lengths = sorted(report.lengths)
    n = len(lengths)
    return {
        "notes": list(result.notes),
        "files": [
            {
                "file": shown.get(f.path, paths.studio_path(f.path)),
                "type": f.kind,
                "format": f.format,
                "records": f.records,
                "rejects": f.rejects,
            }
            for f in result.files
        ],
        "records": len(result.records),
        "rejected": [{"origin": _short(o, shown), "reason": r} for o, r in rejects[:50]],
        "rejected_total": len(rejects),
        "duplicates": len(result.duplicates),
        "tokenizer": report.tokenizer_name,
        "chat_format": report.chat_format,
        "lengths": {
            "min": lengths[0],
            "median": lengths[n // 2],
            "max": lengths[-1],
            "total": sum(lengths),
            "trained": sum(report.trained),
        }
        if n
        else None,
        "histogram": [{"range": a, "count": c} for a, c, _ in histogram(report.lengths)],
        "over_limit": report.over_limit,
        "example": [{"text": t, "trained": bool(m)} for t, m in report.example],
        "example_origin": _short(report.example_origin, shown),
        "example_more": report.example_more,
    }


def _short(origin: str, shown: dict[str, str]) -> str:
    """A record's origin with the real file path replaced by the page's name for it."""
    for real, name in shown.items():
        origin = origin.replace(real, name)
    return origin


PLAN_FIELDS = {  # the form's fields -> the train flag (CLI spelling without --) and its type
    "mode": str,
    "method": str,
    "epochs": int,
    "max_steps": int,
    "batch_size": int,
    "gradient_accumulation": int,
    "learning_rate": float,
    "lora_r": int,
    "lora_alpha": int,
    "lora_dropout": float,
    "target_modules": str,
    "max_seq_length": int,
    "max_examples": int,
    "validation_split": float,
    "patience": int,
    "precision": str,
    "packing": bool,
    "seed": int,
    "system_prompt": str,
}


def train_args(form: dict[str, Any]) -> dict[str, Any]:
    """The plan's user flags from the page's form: empty fields are 'not given', bad types one line."""
    args: dict[str, Any] = {}
    for key, kind in PLAN_FIELDS.items():
        value = form.get(key)
        if value is None or value == "":
            continue
        try:
            args[key] = value if kind is bool and isinstance(value, bool) else kind(value)
        except (TypeError, ValueError):
            raise UserError(f"{key.replace('_', '-')}: expected {kind.__name__}, got {value!r}") from None
        if kind is bool and not isinstance(value, bool):
            raise UserError(f"{key.replace('_', '-')}: expected true or false, got {value!r}")
    if form.get("data"):
        args["data"] = str(paths.resolve_data_path(str(form["data"])))
    if form.get("resume"):
        args["resume"] = True
    return args


def cli_argv(model: str, form: dict[str, Any]) -> list[str]:
    """`train MODEL --data ... --mode ...` for the subprocess: the same flags the plan was built from."""
    args = train_args(form)
    argv = ["train", model]
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            argv.append(flag if value or key == "resume" else f"--no-{key.replace('_', '-')}")
        else:
            argv += [flag, str(value)]
    return argv


def plan_view(model: str, form: dict[str, Any]) -> dict[str, Any]:
    """`train --dry-run` as data: settings with value, source and why; parameter groups; memory; data."""
    from rich.console import Console

    from llm_installer.train.dry_run import print_dry_run
    from llm_installer.train.plan import build_plan
    from llm_installer.train.trainer import resume_args

    folder = paths.model_folder(model)
    args = train_args(form)
    args["_allow_no_data"] = True
    args = resume_args(folder.runs_dir, args)
    plan = build_plan(folder, args)
    shown = io.StringIO()
    out = print_dry_run(plan, console=Console(file=shown, width=160, color_system=None))
    groups = [
        (r["group"], r["trainable"], r["total"]) if isinstance(r, dict) else tuple(r)
        for r in out["parameters"]
    ]
    return {
        "settings": [
            {"key": k, **v, "value": _jsonable(v["value"])} for k, v in out["plan"]["settings"].items()
        ],
        "parameters": [{"group": str(g), "trainable": int(t), "total": int(n)} for g, t, n in groups],
        "trainable": out["trainable"],
        "memory": {k: round(v, 3) for k, v in out["memory"].items()},
        "verdict": out["verdict"],
        "data": {k: _jsonable(v) for k, v in out["data"].items()},
        "command": " ".join(["llm-installer", *cli_argv(model, form)]),
    }


def _jsonable(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
