"""Values several stages must agree on, in one place (no imports: any module may use them cheaply).

Rules with logic keep their own home: instruct/base naming in `detect.instruct_by_name`, the chat format
(template and end-of-turn token actually used) in `chat_format.py`, the precision in `precision.py`.
"""

from __future__ import annotations

# The label of a position the loss skips (prompt, padding, tokens a processor inserted): PyTorch's
# CrossEntropyLoss default `ignore_index`, which transformers' models and TRL use too.
IGNORE_INDEX = -100

# ChatML, the fallback chat template when neither the tokenizer nor the handler has one.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Module-name parts of a vision-language model's image encoder, and of the projector that maps its
# output into the language model (trained with the text side, unlike the frozen encoder).
VISION_TOWER_NAMES: tuple[str, ...] = (
    "vision_tower",
    "vision_model",
    "visual",
    "image_encoder",
    "vision_encoder",
)
PROJECTOR_NAMES: tuple[str, ...] = (
    "multi_modal_projector", "mm_projector", "merger", "connector", "visual_projection",
)  # fmt: skip
