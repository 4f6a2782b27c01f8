"""Family default chat templates, used when a (base) model's tokenizer brings none.

A family template is only used when each of its markers is ONE token of the tokenizer (a Llama-3
template on a tokenizer without `<|start_header_id|>` would tokenise its markers as plain text, and a
model trained to end answers with such pieces never emits a token anything stops on); otherwise ChatML
when its markers are single tokens, otherwise a plain-text template that ends each assistant turn with
the EOS. `llm_installer.chat_format.resolve_chat_format` applies this rule and finds the end-of-turn
token; `default_template_for` is the same choice for callers that only want the template.
"""

from __future__ import annotations

from typing import Any

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

GEMMA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

PHI3 = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

MISTRAL = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{{ ' ' + message['content'] | trim + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ '[INST] ' + message['content'] | trim + '\n\n' }}"
    "{% else %}{{ '[INST] ' + message['content'] | trim + ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)

PLAIN = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '### User:\n' + message['content'] + '\n\n' }}"
    "{% else %}{{ '### Assistant:\n' + message['content'] + eos_token + '\n\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    "chatml": CHATML,
    "llama3": LLAMA3,
    "gemma": GEMMA,
    "phi3": PHI3,
    "mistral": MISTRAL,
    "plain": PLAIN,
}

# Tokens a template needs in the vocabulary to be meaningful.
MARKERS: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "phi3": ("<|user|>", "<|assistant|>", "<|end|>"),
    "mistral": ("[INST]", "[/INST]"),
    "plain": (),
}


# Templates whose markers may be plain text: [INST] is not a token in older Mistral tokenizers, and the
# plain template has none; both end answers with the EOS token.
TEXT_MARKERS: frozenset[str] = frozenset({"mistral", "plain"})


def _has_markers(tok: Any, name: str) -> bool:
    """Each marker of template `name` is one token here (in the vocabulary is not enough)."""
    from llm_installer.chat_format import single_token_id

    if name == "mistral":
        return bool(getattr(tok, "bos_token", None))
    return all(single_token_id(tok, m) is not None for m in MARKERS[name])


def default_template_for(tok: Any, family_default: str | None) -> str:
    """The family default if its markers are single tokens, else ChatML if those are, else plain text."""
    for name in (family_default, "chatml"):
        if name and name in TEMPLATES and _has_markers(tok, name):
            return TEMPLATES[name]
    return PLAIN
