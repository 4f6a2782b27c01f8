"""`llm-installer handlers`: every handler (user ones first), the models it covers and its formats."""

from __future__ import annotations

from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("handlers")
    def handlers_command(
        verbose: Annotated[
            bool,
            typer.Option(
                "--verbose", "-v", help="Also show LoRA target modules and where each handler is from."
            ),
        ] = False,
    ) -> None:
        """List the model handlers: families each covers and the dataset formats it supports.

        User handlers come from $LLM_INSTALLER_HANDLERS_DIR (else ~/.config/llm-installer/handlers) and
        from installed packages' `llm_installer.handlers` entry points; they take precedence over the
        built-in ones. See docs/handlers.md to write one.

        Example: llm-installer handlers --verbose
        """
        from rich.table import Table

        from llm_installer.console import console
        from llm_installer.handlers.registry import all_handlers
        from llm_installer.handlers.user import handlers_dirs

        table = Table(title="Model handlers (first match wins: user handlers, then built-in, then generic)")
        table.add_column("handler")
        table.add_column("covers")
        table.add_column("families")
        table.add_column("dataset formats", overflow="fold")
        if verbose:
            table.add_column("LoRA targets (small model)", overflow="fold")
            table.add_column("from", overflow="fold")
        example = {"model_id": "example/model-instruct", "num_parameters": 500_000_000}
        for cls in all_handlers():
            covers = [*cls.model_types, *(f"id~{p}" for p in cls.model_id_patterns)]
            if verbose:
                covers += list(cls.architectures)
            try:
                params = cls(example).get_training_parameters()
                formats = _formats_cell(list(params.get("dataset_formats") or []))
                targets = params.get("lora_target_modules")
            except Exception as exc:  # a broken user handler: show it, do not hide the others
                formats, targets = f"[red]error: {exc}[/red]", None
            row = [
                f"[bold]{cls.name}[/bold]",
                ", ".join(covers) or "[dim](fallback)[/dim]",
                ", ".join(cls.families) or "-",
                formats,
            ]
            if verbose:
                row.append(", ".join(targets) if targets else "auto: all linear layers but the output head")
                row.append(f"{cls.origin} ({cls.__module__}.{cls.__qualname__})")
            table.add_row(*row)
        console.print(table)
        dirs = ", ".join(str(d) for d in handlers_dirs())
        console.print(f"[dim]User handler folder: {dirs} (set LLM_INSTALLER_HANDLERS_DIR to change it)[/dim]")


def _formats_cell(formats: list[str]) -> str:
    """Dataset formats, with the full text set abbreviated so the table stays readable."""
    from llm_installer.handlers.base import TEXT_FORMATS

    if set(TEXT_FORMATS) <= set(formats):
        extra = [f for f in formats if f not in TEXT_FORMATS]
        first = f"{formats[0]} first; " if formats and formats[0] != TEXT_FORMATS[0] and not extra else ""
        return first + "all text formats" + (f" + {', '.join(extra)}" if extra else "")
    return ", ".join(formats)
