"""`llm-installer data inspect`: look at a dataset the way training will see it, before training."""

from __future__ import annotations

from typing import Annotated, Any

import typer

data_app = typer.Typer(
    help="Look at datasets before training. Example: llm-installer data inspect train.jsonl --model smollm2",
    no_args_is_help=True,
)


@data_app.command("inspect")
def inspect_cmd(
    paths: Annotated[
        list[str],
        typer.Argument(
            metavar="PATH",
            help="Data files, folders, quoted globs, comma-mixes or name:split of a cached HF dataset.",
        ),
    ],
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Installed model whose tokenizer and chat template to use."),
    ] = None,
    format: Annotated[
        str | None, typer.Option("--format", "-f", help="Force one format (default: detect per record).")
    ] = None,
    max_seq_length: Annotated[
        int | None, typer.Option("--max-seq-length", help="Count records longer than this many tokens.")
    ] = None,
    show_rejects: Annotated[int, typer.Option("--show-rejects", help="How many rejects to list.")] = 10,
    trust_remote_code: Annotated[
        bool,
        typer.Option(
            "--trust-remote-code", help="Allow --model's own tokenizer code to run (asked each time)."
        ),
    ] = False,
) -> None:
    """Detected format per file, record counts, rejects with reasons, token lengths and one rendered example.

    Example: llm-installer data inspect data/train.jsonl "data/extra/*.json" --model smollm2-135m-instruct
    """
    from llm_installer import consent
    from llm_installer.console import console, warn
    from llm_installer.data.inspect import inspect_data
    from llm_installer.data.loaders import resolve_spec

    consent.grant(trust_remote_code)
    for path in paths:  # fail fast on a wrong path, before the tokenizer takes seconds to load
        resolve_spec(path, [])
    tokenizer, handler = _tokenizer_and_handler(model)
    with console.status("reading data…"):
        report = inspect_data(paths, tokenizer, handler=handler, format=format, max_seq_length=max_seq_length)
    print_records(report, show_rejects)
    if tokenizer is None:
        warn("no tokenizer available (pass --model NAME): token statistics skipped")
        return
    print_token_stats(report, max_seq_length)
    if report.example or report.pair:
        print_example(report)


def print_records(report: Any, show_rejects: int) -> None:
    """Notes, the files table, counts, rejects (up to `show_rejects`) and the first duplicates."""
    from rich.table import Table

    from llm_installer.console import console

    result = report.result
    for note in result.notes:
        console.print(f"[cyan]note:[/cyan] {note}", soft_wrap=True)
    table = Table(title="Files", title_justify="left")
    for col in ("file", "type", "format", "records", "rejects"):
        table.add_column(col, justify="right" if col in ("records", "rejects") else "left")
    for f in result.files:
        table.add_row(f.path, f.kind, f.format, str(f.records), str(f.rejects))
    console.print(table)

    rejects = [(r.origin, r.reason) for r in result.rejects] + report.render_rejects
    console.print(
        f"records: [bold]{len(result.records)}[/bold] usable, [bold]{len(rejects)}[/bold] rejected, "
        f"[bold]{len(result.duplicates)}[/bold] exact duplicates"
    )
    if rejects:
        console.print("[yellow]rejects[/yellow] (training skips these; --strict stops on them):")
        for origin, reason in rejects[:show_rejects]:
            console.print(f"  {origin}: {reason}", soft_wrap=True, markup=False)
        if len(rejects) > show_rejects:
            console.print(f"  … and {len(rejects) - show_rejects} more (--show-rejects N)")
    for dup, first in result.duplicates[:3]:
        console.print(f"  duplicate: {dup} repeats {first}", soft_wrap=True, markup=False)


def print_token_stats(report: Any, max_seq_length: int | None) -> None:
    """Token lengths (sampled on big data), the chat format, records over the limit and a histogram."""
    from llm_installer.console import console
    from llm_installer.data.inspect import histogram

    result = report.result
    if report.sampled < len(result.records):
        console.print(
            f"\ntoken statistics from {report.sampled} of {len(result.records)} records, spread over the data",
            soft_wrap=True,
        )
    if report.cut:
        from llm_installer.data.inspect import STAT_MAX_CHARS

        console.print(
            f"{report.cut} record(s) longer than {STAT_MAX_CHARS:,} characters: counted on their first "
            f"{STAT_MAX_CHARS:,} (training truncates to --max-seq-length)",
            soft_wrap=True,
        )
    if report.lengths:
        lengths = sorted(report.lengths)
        n = len(lengths)
        console.print(
            f"\ntokens per record ({report.tokenizer_name}): min {lengths[0]}, median {lengths[n // 2]}, "
            f"p95 {lengths[min(n - 1, int(n * 0.95))]}, max {lengths[-1]}, total {sum(lengths)}, "
            f"trained {sum(report.trained)}"
        )
        if report.chat_format:
            console.print(f"chat format: {report.chat_format}", soft_wrap=True, markup=False)
        if max_seq_length:
            console.print(f"longer than --max-seq-length {max_seq_length}: {report.over_limit} record(s)")
        for label, count, bar in histogram(report.lengths):
            console.print(f"  {label:>13} │{bar:<30} {count}", markup=False)


def print_example(report: Any) -> None:
    """One rendered example, trained tokens green (or between « and » without colours)."""
    from rich.text import Text

    from llm_installer.console import console

    if report.pair:  # a preference pair shows its prompt and both answers
        from llm_installer.data.preference import print_pair

        print_pair(console, report.pair, report.example_origin)
        return
    console.print(
        f"\nexample {report.example_origin}: [green]green = trained (loss)[/green], [dim]dim = masked[/dim]",
        soft_wrap=True,
    )
    text = Text()
    plain = console.color_system is None  # no colours (a pipe, NO_COLOR): bracket the trained tokens
    if plain:
        console.print("(no colours here: trained tokens are between « and »)")
    previous = False
    for token, trained in report.example:
        if plain and trained != previous:
            text.append("«" if trained else "»")
        text.append(token, style="bold green" if trained else "dim")
        previous = trained
    if plain and previous:
        text.append("»")
    if report.example_more:
        text.append(f" … ({report.example_more} more tokens)", style="dim")
    console.print(text, soft_wrap=True)


def _tokenizer_and_handler(model: str | None):
    """The installed model's tokenizer (or processor) and handler; else the bundled SmolLM2 tokenizer."""
    from llm_installer.console import warn
    from llm_installer.errors import UserError

    if model:
        from llm_installer import loading, store
        from llm_installer.consent import allow_remote_code

        folder = store.find_model(model)
        info = folder.load_info()
        trust = allow_remote_code(info)
        handler = None
        try:
            from llm_installer.handlers.registry import get_handler

            handler = get_handler(info)
        except ImportError:
            pass
        processor = loading.load_processor(folder.model_dir, trust_remote_code=trust)
        if processor is not None and hasattr(processor, "image_processor"):
            return processor, handler
        tok = loading.load_tokenizer(folder.model_dir, trust_remote_code=trust)
        tok.name_or_path = model
        return tok, handler
    try:
        from llm_installer.data.inspect import bundled_tokenizer

        tok = bundled_tokenizer()
        tok.name_or_path = "bundled SmolLM2-135M-Instruct"
        return tok, None
    except UserError as exc:
        warn(str(exc))
        return None, None


def register(app: typer.Typer) -> None:
    app.add_typer(
        data_app, name="data", help="Inspect datasets before training (formats, rejects, token lengths)."
    )
