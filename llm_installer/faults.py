"""Named fault points: make this process die, stop or be interrupted at an exact moment (tests only).

Timing a `kill -9` against a running install is flaky: the interesting windows (between two renames of a
reinstall, say) last microseconds. So the store and the installer call `point("swap.old-aside")` at each
moment a crash could leave something behind, and the robustness tests (tests/test_faults_store.py) run
the real CLI in a subprocess with

    LLM_INSTALLER_FAULT="<point>=<action>[,<point>=<action>...]"

where the action is `kill` (SIGKILL itself: nothing runs after it, no `finally`, as after a power cut),
`int` (SIGINT itself: the Ctrl-C path), or `stop` (SIGSTOP itself, so the test can do something, such as
fill the disk or start a second process, before it sends SIGCONT). With the variable unset (always, for
users) a point costs one dictionary look-up.
"""

from __future__ import annotations

import os
import signal

ENV = "LLM_INSTALLER_FAULT"

# Every point the code calls, so a typo in a test fails loudly instead of never firing.
POINTS = (
    "install.locked",  # the install holds its lock, nothing written yet
    "install.fetching",  # the partial folder exists and the disk check passed; files are about to be fetched
    "install.complete",  # the partial folder is complete (manifest written), not yet in place
    "swap.user-data-moved",  # a reinstall moved lora/ and runs/ into the new folder
    "swap.old-aside",  # the old install was renamed aside, the new one not yet in place
    "swap.new-in-place",  # the new install is in place, the old one not yet deleted
    "remove.locked",  # `remove` holds the lock, nothing deleted yet
    "remove.trashed",  # `remove` renamed the model aside, its files not yet deleted
    "checkpoint.partial",  # a checkpoint's adapter and optimizer are written, its RNG and trainer state not yet
    "checkpoint.written",  # the Trainer wrote a checkpoint's files, its completion marker not yet
    "adapter.old-aside",  # an adapter write moved the previous adapter aside, the new one not yet in place
)

_ACTIONS = {"kill": signal.SIGKILL, "int": signal.SIGINT, "stop": signal.SIGSTOP}


def point(name: str) -> None:
    """Act on fault point `name` if LLM_INSTALLER_FAULT names it; else do nothing."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    if name not in POINTS:  # pragma: no cover - a programming error in the caller
        raise ValueError(f"unknown fault point {name!r}")
    for item in spec.split(","):
        where, _, action = item.strip().partition("=")
        if where == name:
            if action not in _ACTIONS:
                raise ValueError(f"{ENV}: unknown action {action!r} for {name} (use kill, int or stop)")
            os.kill(os.getpid(), _ACTIONS[action])
