"""`python -m llm_installer`: the CLI, with Ctrl-C answered as "interrupted" (exit 130) from the start.

A Ctrl-C during the imports (typer, rich, the command modules) would otherwise print a traceback, and
one during Python's own `site` import ends the interpreter with "Fatal Python error" and exit 1. The
checkout's `./llm-installer` and the model folders' wrappers therefore start Python with `-S` and this
module imports `site` itself, inside the same guard as everything else.
"""

import sys


def run() -> None:
    """Entry point of `python -m llm_installer` and of the `llm-installer` console script."""
    try:
        if sys.flags.no_site:  # started with -S: add the site-packages (venv included) now, guarded
            import site

            site.main()
        from llm_installer.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    main()


if __name__ == "__main__":
    run()
