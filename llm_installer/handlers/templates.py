"""Family default chat templates, used when a (base) model's tokenizer brings none.

A family template is only used when the tokenizer really has its marker tokens (a Llama-3 template on
a tokenizer without `<|start_header_id|>` would tokenise its markers as plain text); otherwise ChatML
when `<|im_start|>` exists, otherwise a plain-text template that ends each assistant turn with the EOS.
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


def _has_markers(tok: Any, name: str) -> bool:
    vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
    markers = MARKERS[name]
    if name == "mistral":  # [INST] is plain text in older Mistral tokenizers
        return bool(getattr(tok, "bos_token", None))
    return all(m in vocab for m in markers)


def default_template_for(tok: Any, family_default: str | None) -> str:
    """The family default if the tokenizer has its markers, else ChatML if it has those, else plain text."""
    for name in (family_default, "chatml"):
        if name and name in TEMPLATES and _has_markers(tok, name):
            return TEMPLATES[name]
    return PLAIN
