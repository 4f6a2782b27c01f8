"""Store commands: check, install, list, show, verify, remove, doctor.

Only typer/rich/stdlib at module level: `llm-installer --help` must not pay for importing torch,
transformers or huggingface_hub. The work happens in install.py, detect.py, fit.py and store.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from llm_installer.console import console


def _gb(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} GiB" if value >= 0.1 else f"{value * 1024:.0f} MiB"


def _params(n: int | None) -> str:
    if not n:
        return "-"
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.1f}{suffix}"
    return str(n)


def _handler_name(info: Any) -> str:
    """The handler that would train this model, or '-' while the handlers package is not available."""
    try:
        from llm_installer.handlers.registry import get_handler
    except ImportError:
        return "-"
    try:
        return str(get_handler(info).name)
    except Exception:  # a handler bug must not break `list`
        return "-"


def _info_table(info: Any, title: str | None = None) -> Table:
    table = Table(title=title, show_header=False, box=None, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("model id", info.model_id),
        ("source", info.source + (f" @ {info.revision}" if info.revision else "")),
        ("family", f"{info.family or '-'} (model_type {info.model_type or '-'})"),
        ("architecture", info.architecture or "-"),
        ("task", info.task + ("" if info.trainable else " (not trainable here)")),
        ("parameters", _params(info.num_parameters)),
    ]
    if info.num_experts:
        rows.append(("experts", f"{info.num_experts} ({info.num_experts_per_tok or '?'} per token)"))
        rows.append(("active parameters", _params(info.num_active_parameters)))
    rows += [
        ("weights on disk", _gb(info.model_size_gb)),
        ("context length", str(info.context_length or "-")),
        ("dtype", info.dtype or "-"),
        ("chat template", "yes" if info.has_chat_template else "no"),
        ("instruct", "yes" if info.is_instruct else "no (base model)"),
        ("remote code", "needed (--trust-remote-code)" if info.trust_remote_code else "no"),
    ]
    for key, value in rows:
        table.add_row(key, value)
    return table


def reinstall_command(folder: Any) -> str:
    """The command that reinstalls `folder` from where it came from (its manifest's source), so a
    `verify` failure names one that works: a folder or GGUF install is reinstalled from its path under
    its own name, not from a Hub id that does not exist."""
    import shlex

    try:
        manifest = folder.read_raw_info().get("manifest", {})
    except (OSError, ValueError):
        manifest = {}
    source, ref = manifest.get("source"), manifest.get("ref")
    if source in ("local", "gguf") and ref:
        return f"llm-installer install {shlex.quote(str(ref))} --name {folder.name} --force"
    if source in ("hub", "bundled") and ref:
        from llm_installer import store

        try:
            default = store.folder_name(str(ref))
        except Exception:
            default = None
        name = "" if default == folder.name else f" --name {folder.name}"
        revision = manifest.get("revision") if source == "hub" else None
        rev = f" --revision {revision}" if revision else ""
        return f"llm-installer install {ref}{name}{rev} --force"
    return f"llm-installer install {folder.name} --force"


def _confirm(path: Path, yes: bool) -> bool:
    """Ask before deleting `path`; without a terminal to ask on, --yes is required."""
    from llm_installer.errors import UserError

    if yes:
        return True
    if not sys.stdin.isatty():
        raise UserError(f"refusing to delete {path} without confirmation: pass --yes")
    if typer.confirm(f"delete {path} (model, adapter and runs)?", default=False):
        return True
    console.print("nothing removed")
    return False


def install_cmd(
    model: Annotated[str, typer.Argument(help="Hub id, folder, .gguf file or smollm2-135m-instruct.")],
    name: Annotated[str | None, typer.Option("--name", help="Name in the models folder.")] = None,
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Reinstall over an existing install.")] = False,
    exist_ok: Annotated[bool, typer.Option("--exist-ok", help="Do nothing if already installed.")] = False,
    link: Annotated[bool, typer.Option("--link", help="Symlink a local folder's files, not copy.")] = False,
    allow_pickle: Annotated[
        bool, typer.Option("--allow-pickle", help="Allow pickle weights (.bin/.pt), which can run code.")
    ] = False,
    trust_remote_code: Annotated[
        bool,
        typer.Option("--trust-remote-code", help="Allow a model that needs code from its repository."),
    ] = False,
) -> None:
    from llm_installer.install import install

    result = install(
        model,
        name=name,
        revision=revision,
        force=force,
        link=link,
        allow_pickle=allow_pickle,
        trust_remote_code=trust_remote_code,
        exist_ok=exist_ok,
    )
    folder = result.folder
    info = folder.load_info()
    if not result.installed:  # --exist-ok found it there: say so, do not claim an install
        console.print(
            f"already installed: {info.model_id} in {folder.root} (nothing done; --force reinstalls it)",
            soft_wrap=True,
        )
        return
    console.print(
        f"[green]installed[/green] {info.model_id} -> {folder.root} "
        f"({info.family or '?'}, {_params(info.num_parameters)} parameters, {_gb(info.model_size_gb)})",
        soft_wrap=True,
    )
    console.print(
        f"next: llm-installer show {folder.name}   |   {folder.root}/train.sh --data FILE", soft_wrap=True
    )


def check_cmd(
    model: Annotated[str, typer.Argument(help="Hub id, folder, .gguf file, installed name or bundled name.")],
    revision: Annotated[str | None, typer.Option("--revision", help="Hub branch, tag or commit.")] = None,
) -> None:
    from llm_installer import fit, hardware

    info = fit.info_for_check(model, revision=revision)
    hw = hardware.detect()
    console.print(_info_table(info, title=f"{info.model_id}"))
    report = fit.estimate(info, hw)
    table = Table(
        title=f"memory needed vs this machine (RAM {hw.ram_gb:.1f} GiB"
        + (f", GPU {hw.gpu.memory_gb:.1f} GiB)" if hw.gpu else ", no GPU)")
    )
    table.add_column("use")
    table.add_column("needs", justify="right")
    table.add_column("fits GPU")
    table.add_column("fits RAM")
    for row in report.rows:
        table.add_row(
            row.label,
            _gb(row.gb),
            "-" if row.fits_gpu is None else ("yes" if row.fits_gpu else "no"),
            "yes" if row.fits_ram else "no",
        )
    console.print(table)
    console.print(f"[bold]verdict:[/bold] {report.verdict}", soft_wrap=True)
    for key, value in report.settings.items():
        console.print(f"  {key}: {value}", soft_wrap=True)


def list_cmd() -> None:
    from llm_installer import store

    for note in store.recover_all():  # leftovers of killed installs and removes whose lock is free
        console.print(f"[dim]{note}[/dim]", soft_wrap=True)
    folders = store.installed_folders()
    base = store.models_dir()
    partials = sorted(
        p.name[len(store.PARTIAL_PREFIX) :]
        for p in (base.iterdir() if base.is_dir() else [])
        if p.is_dir() and p.name.startswith(store.PARTIAL_PREFIX)
    )
    if not folders and not partials:
        console.print(
            f"no models installed in {store.models_dir()} (try: llm-installer install smollm2-135m-instruct)",
            soft_wrap=True,
        )
        return
    from rich import box

    table = Table(
        title=f"models in {store.models_dir()}",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    for col in ("name", "family", "handler", "parameters", "size", "adapter", "status"):
        table.add_column(
            col,
            justify="right" if col in ("parameters", "size") else "left",
            no_wrap=col != "name",
            overflow="fold",
        )
    for folder in folders:
        row = model_row(folder)
        table.add_row(
            row["name"],
            row["family"],
            row["handler"],
            row["parameters"],
            row["size"],
            "yes" if row["adapter"] else "-",
            {"ready": "[green]ready[/green]", "incomplete": "[yellow]incomplete[/yellow]"}.get(
                row["status"], "[red]damaged[/red]"
            ),
        )
    for name in partials:
        table.add_row(name, "-", "-", "-", "-", "-", "[yellow]partial[/yellow]")
    console.print(table)
    if partials:
        console.print("partial: an interrupted install; run the same install command again to resume it")


def model_row(folder: Any) -> dict[str, Any]:
    """One installed model as `list` shows it (and the studio's Models table): name, model id, family,
    handler, parameters, size, adapter, status ("ready", "incomplete" or "damaged")."""
    from llm_installer import store

    status, info = store.folder_status(folder), None
    if status != "incomplete":
        try:
            info = folder.load_info()
        except Exception:
            status = "damaged"
    return {
        "name": folder.name,
        "model_id": info.model_id if info else None,
        "family": (info.family or "-") if info else "-",
        "handler": _handler_name(info) if info else "-",
        "parameters": _params(info.num_parameters) if info else "-",
        "size": _gb(info.model_size_gb) if info else "-",
        "adapter": folder.has_adapter,
        "status": status,
    }


def show_cmd(
    name: Annotated[str, typer.Argument(help="Installed model name, model id or folder path.")],
    training: Annotated[
        bool,
        typer.Option("--training", help="Also show the training parameters and where each comes from."),
    ] = False,
) -> None:
    from llm_installer import store

    folder = store.find_model(name)
    info = folder.load_info()
    raw = folder.read_raw_info()
    manifest = raw.get("manifest", {})
    console.print(_info_table(info, title=f"{folder.name}  ({folder.root})"))
    files = manifest.get("files", [])
    console.print(
        f"[bold]installed[/bold] {manifest.get('installed_at', '?')} from {manifest.get('source', '?')} "
        f"{manifest.get('ref', '')}" + (f" @ {manifest['revision']}" if manifest.get("revision") else ""),
        soft_wrap=True,
    )
    console.print(
        f"[bold]files[/bold] {len(files)}, {_gb(sum(f['size'] for f in files) / 1024**3)}; "
        f"status {store.folder_status(folder)}; handler {_handler_name(info)}",
        soft_wrap=True,
    )
    if folder.has_adapter:
        import json

        adapter_info = folder.lora_dir / "adapter_info.json"
        extra = ""
        if adapter_info.is_file():
            try:
                data = json.loads(adapter_info.read_text(encoding="utf-8"))
                extra = " " + ", ".join(
                    f"{k}={v}" for k, v in list(data.items())[:6] if not isinstance(v, (dict, list))
                )
            except (OSError, ValueError):
                extra = " (adapter_info.json unreadable)"
        console.print(f"[bold]adapter[/bold] {folder.lora_dir}{extra}", soft_wrap=True)
    else:
        console.print(
            "[bold]adapter[/bold] none (train one with ./train.sh in the model folder)", soft_wrap=True
        )
    if training:
        from llm_installer.handlers.describe import render_training_parameters

        console.print(render_training_parameters(info))


def verify_cmd(name: Annotated[str, typer.Argument(help="Installed model name or folder path.")]) -> None:
    from llm_installer import store
    from llm_installer.errors import CheckFailed

    folder = store.find_model(name)
    try:
        result = store.verify_folder(folder)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckFailed(f"{folder.info_path} is damaged ({exc}); reinstall with --force") from None
    for path in result.missing:
        console.print(f"[red]missing[/red] {path}")
    for path in result.changed:
        console.print(f"[red]changed[/red] {path}")
    for path in result.extra:
        console.print(f"[yellow]not in manifest[/yellow] {path}")
    if not result.ok:
        raise CheckFailed(
            f"{folder.name}: {len(result.missing)} missing and {len(result.changed)} changed of "
            f"{result.checked} files; reinstall with `{reinstall_command(folder)}`"
        )
    console.print(f"[green]ok[/green] {folder.name}: all {result.checked} files match the manifest")


def remove_cmd(
    name: Annotated[str, typer.Argument(help="Installed model name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    from llm_installer import store
    from llm_installer.errors import ModelNotFoundError, UserError

    base = store.models_dir().resolve()
    try:
        folder = store.find_model(name)
    except ModelNotFoundError:
        # An incomplete install (or a partial build) can still be removed by name.
        folder = store.folder_for(name)
        if not folder.root.exists() and not store.partial_dir(folder.name).is_dir():
            raise
    root = folder.root.resolve() if folder.root.exists() else folder.root
    if root.parent != base:
        raise UserError(
            f"{name} is not a folder of the models folder {base}; `remove` deletes only installed models"
        )
    shown = root if root.exists() else store.partial_dir(root.name)
    if not _confirm(shown, yes):
        return
    removed = store.remove_model(root.name)  # takes the install lock: never under a running install
    what = "the partial install " if removed.name.startswith(store.PARTIAL_PREFIX) else ""
    console.print(f"removed {what}{removed}")


def doctor_cmd() -> None:
    from llm_installer import fit

    table = Table(title="llm-installer doctor", show_header=False)
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    for key, value in fit.doctor_rows():
        table.add_row(key, value)
    console.print(table)


def register(app: typer.Typer) -> None:
    """Add the store commands to the app (each is a top-level function above, as in serve_cmd)."""
    app.command(
        "install",
        help=(
            "Install a model: a Hub id (org/name), a local folder, a .gguf file, or the bundled "
            "smollm2-135m-instruct (works offline).\n\nExample: llm-installer install smollm2-135m-instruct"
        ),
    )(install_cmd)
    app.command(
        "check",
        help=(
            "Say whether a model fits this machine before installing it: Hub models are judged from their "
            "config and file list only (no weights downloaded).\n\nExample: llm-installer check Qwen/Qwen3-0.6B"
        ),
    )(check_cmd)
    app.command("list", help="List installed models.\n\nExample: llm-installer list")(list_cmd)
    app.command(
        "show",
        help="Show what is known about an installed model.\n\nExample: llm-installer show smollm2-135m-instruct",
    )(show_cmd)
    app.command(
        "verify",
        help="Re-hash an installed model's files against its manifest; exit 1 if any is missing or changed.\n\n"
        "Example: llm-installer verify smollm2-135m-instruct",
    )(verify_cmd)
    app.command(
        "remove",
        help="Delete an installed model (and its adapter).\n\nExample: llm-installer remove smollm2-135m-instruct --yes",
    )(remove_cmd)
    app.command(
        "doctor",
        help="Check this machine: Python, torch, GPU, RAM, disk, packages, Hub.\n\nExample: llm-installer doctor",
    )(doctor_cmd)
