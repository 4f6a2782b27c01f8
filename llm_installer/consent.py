"""Consent to run a model's own Python code: one rule for every load (docs/robustness.md).

A model whose config names code of its own (`auto_map` with a model type transformers does not know)
runs that code when loaded with `trust_remote_code=True`. Whether to allow it is the user's decision
for this one command, given as `--trust-remote-code`; it is never read from the model folder. A
folder's `model_info.json` saying `trust_remote_code: true` only records that the model *needs* code,
and anyone who can write to the folder can write that line, so reading it as permission would let a
downloaded or copied folder run its Python file on `chat`, `start`, `train` or `export` unasked.

So every load asks `allow_remote_code(info)`: without consent it is False, and a model that needs
code is refused before anything is loaded; with consent it is True and says once which code will run.
"""

from __future__ import annotations

from typing import Any

from llm_installer.errors import UserError

_granted = False  # set by the command line for this process only (--trust-remote-code)
_warned: set[str] = set()


def grant(flag: bool) -> None:
    """Record the user's --trust-remote-code for this process (the CLI calls this once per command)."""
    global _granted
    _granted = bool(flag)


def needs_remote_code(info: Any) -> bool:
    """Whether the model runs code of its own: the detection record, or its config's `auto_map` with a
    model type transformers does not know (the same test as at install time)."""
    if bool(getattr(info, "trust_remote_code", False)):
        return True
    config = getattr(info, "config", None) or {}
    if not isinstance(config, dict) or not config.get("auto_map"):
        return False
    try:
        from llm_installer.detect import _known_model_types

        return str(config.get("model_type")) not in _known_model_types()
    except ImportError:  # pragma: no cover - transformers is a dependency
        return True


def allow_remote_code(info: Any, *, granted: bool | None = None) -> bool:
    """The `trust_remote_code` value for loading the model described by `info`.

    `granted` is the caller's own consent (Python callers); None means this process's
    --trust-remote-code. Raises UserError when the model needs code and consent was not given.
    """
    consent = _granted if granted is None else bool(granted)
    name = str(getattr(info, "model_id", None) or "this model")
    if not consent:
        if needs_remote_code(info):
            raise UserError(
                f"{name} needs custom Python code from its model folder, which runs when it is loaded; "
                "read that code, then pass --trust-remote-code to this command to allow it"
            )
        return False
    if needs_remote_code(info) and name not in _warned:
        _warned.add(name)
        from llm_installer.console import warn

        warn(f"running {name}'s own Python code from its model folder (--trust-remote-code)")
    return True
