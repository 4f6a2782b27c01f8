"""Terminal chat over the same `Engine` as the server (no HTTP in between).

The conversation history is kept here and re-rendered with the training chat template on every turn,
so what the model sees is exactly what it was trained on. Slash commands change the session:
``/reset``, ``/system TEXT``, ``/base``, ``/lora`` (or ``/adapter on|off``), ``/help``, ``/exit``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

from llm_installer.serve.engine import ADAPTER_NAME, Engine, SamplingParams

HELP = (
    "commands: /reset (forget the conversation), /system TEXT (set the system prompt), "
    "/base and /lora (or /adapter off|on) switch the adapter, /help, /exit"
)


@dataclass
class ChatSession:
    """History plus settings for one terminal conversation."""

    engine: Engine
    use_adapter: bool
    params: SamplingParams
    system: str | None = None
    history: list[dict[str, str]] = field(default_factory=list)

    @property
    def adapter(self) -> str | None:
        return (
            ADAPTER_NAME if self.use_adapter and self.engine.has_adapter and not self.engine.merged else None
        )

    @property
    def label(self) -> str:
        if self.engine.merged:
            return f"{self.engine.name}:lora (merged)"
        return self.engine.name + (":lora" if self.adapter else "")

    def messages(self, user_text: str) -> list[dict[str, str]]:
        msgs = [{"role": "system", "content": self.system}] if self.system else []
        return msgs + self.history + [{"role": "user", "content": user_text}]

    def ask(self, user_text: str, out: TextIO | None = None) -> str:
        """Send one user turn; stream the answer to `out` (if given) and keep both turns in the history."""
        prompt_ids = self.engine.chat_prompt_ids(self.messages(user_text))
        params = SamplingParams(**{**self.params.__dict__})
        room = self.engine.context_length - len(prompt_ids)
        if room < 1:
            raise ValueError("the conversation no longer fits the context; /reset to start again")
        if params.max_tokens is None or params.max_tokens > room:
            params.max_tokens = min(params.max_tokens or self.engine.default_max_tokens, room)
        parts: list[str] = []
        handle = self.engine.submit(prompt_ids, self.adapter, params)
        try:
            for ev in handle:
                if ev.error:
                    raise RuntimeError(ev.error)
                if ev.text:
                    parts.append(ev.text)
                    if out is not None:
                        out.write(ev.text)
                        out.flush()
        finally:  # Ctrl-C mid-answer: stop generating at once
            if not handle.done.is_set():
                handle.cancel()
        answer = "".join(parts)
        self.history += [{"role": "user", "content": user_text}, {"role": "assistant", "content": answer}]
        return answer

    def command(self, line: str) -> str | None:
        """Handle a slash command; returns a message to show, or None for /exit."""
        name, _, arg = line.strip().partition(" ")
        name = name.lower()
        if name in ("/exit", "/quit", "/bye"):
            return None
        if name == "/reset":
            self.history.clear()
            return "conversation cleared"
        if name == "/system":
            self.system = arg.strip() or None
            self.history.clear()
            return f"system prompt {'set' if self.system else 'removed'}; conversation cleared"
        if name in ("/base", "/lora") or name == "/adapter":
            want = (
                name == "/lora" if name != "/adapter" else arg.strip().lower() in ("on", "1", "yes", "lora")
            )
            if want and not self.engine.has_adapter:
                return "this model has no adapter loaded (train one, or start without --no-lora)"
            if not want and self.engine.merged:
                return "the adapter is merged into the weights (--merge-adapter): the base model is not available"
            self.use_adapter = want
            return f"now chatting with {self.label}"
        if name == "/help":
            return HELP
        return f"unknown command {name}; {HELP}"


def run_interactive(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """The read-answer loop; Ctrl-D or /exit ends it, Ctrl-C stops the current answer."""
    from llm_installer.console import err_console

    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout

    err_console.print(f"[bold]{session.label}[/bold] — {HELP}", soft_wrap=True, highlight=False)
    interactive = stdin.isatty()
    while True:
        if interactive:
            try:
                line = input("you> ")
            except EOFError:
                stdout.write("\n")
                return
        else:
            line = stdin.readline()
            if not line:
                return
            line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.startswith("/"):
            msg = session.command(line)
            if msg is None:
                return
            err_console.print(f"[dim]{msg}[/dim]", soft_wrap=True, highlight=False)
            continue
        stdout.write(f"{session.label}> ")
        stdout.flush()
        try:
            session.ask(line, out=stdout)
        except KeyboardInterrupt:
            err_console.print("\n[dim](stopped)[/dim]")
        except ValueError as exc:
            err_console.print(f"[yellow]{exc}[/yellow]")
        stdout.write("\n")
        stdout.flush()
