"""LoRA target verification and resolution (the seed's "Test Module Names" tip, made a feature).

Pattern syntax (for `lora_target_modules`, `lora_modules_to_save` and `--target-modules`):
  - a module's full name: `model.layers.0.self_attn.q_proj`
  - a short or dotted name: `q_proj`, `self_attn.q_proj`, `language_model.q_proj` — its dot-separated
    parts must appear in this order in the module's path, the last part being the module's own name
    (so the seed's `language_model.q_proj` matches `model.language_model.layers.3.self_attn.q_proj`)
  - a glob: `*` (and `?`, `[..]`) inside a part, e.g. `block_sparse_moe.experts.*.w1`, `layers.1?.*_proj`
  - `re:<regex>`: a regular expression that must match the whole module name
  - `all-linear` / `auto` / None: every linear layer except the output head (and any vision tower)

A pattern that names no module may name a parameter (MoE experts are fused 3-D parameters in
transformers 5): it then goes to PEFT's `target_parameters`. The seed's Mixtral names from older
transformers (`block_sparse_moe.*`, `experts.*.w1/w2/w3`) are translated to the current layout.
Modules that PEFT cannot wrap with LoRA but that hold weights (MoE routers) are trained in full via
`modules_to_save`.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable
from typing import Any

from llm_installer.console import warn
from llm_installer.errors import UserError

AUTO_VALUES = {"auto", "all-linear", "all_linear"}
GROUPS = ("attention", "mlp", "experts", "router", "vision", "projector", "embeddings", "other")

VISION_PARTS = {"vision_tower", "vision_model", "visual", "image_encoder", "vision_encoder"}
PROJECTOR_PARTS = {"multi_modal_projector", "mm_projector", "merger", "connector", "visual_projection"}
ROUTER_PARTS = {"gate", "router", "shared_expert_gate"}
EXPERT_PARTS = {"experts", "shared_expert", "shared_experts"}
EMBEDDING_PARTS = {
    "embed_tokens", "wte", "wpe", "embed_in", "embed_out", "lm_head", "word_embeddings",
    "embed_positions", "position_embeddings",
}  # fmt: skip
ATTENTION_PARTS = {"self_attn", "attn", "attention", "cross_attn", "cross_attention", "encoder_attn"}
MLP_PARTS = {"mlp", "feed_forward", "ffn"}
PEFT_PARTS = {
    "base_model", "base_layer", "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
    "lora_magnitude_vector", "modules_to_save", "original_module", "default",
}  # fmt: skip

# Older transformers names (the seed's Example 3) -> transformers 5 names.
_LEGACY_PARTS = {"block_sparse_moe": "mlp", "feed_forward": "mlp"}
_LEGACY_EXPERT = {
    "w1": "gate_up_proj",
    "w3": "gate_up_proj",
    "gate_proj": "gate_up_proj",
    "up_proj": "gate_up_proj",
    "w2": "down_proj",
    "down_proj": "down_proj",
}


# ---- matching --------------------------------------------------------------------------------------


def _part_match(pattern_part: str, name_part: str) -> bool:
    if any(c in pattern_part for c in "*?["):
        return fnmatch.fnmatchcase(name_part, pattern_part)
    return pattern_part == name_part


def match_pattern(pattern: str, name: str) -> bool:
    """Whether `pattern` (see the module docstring) names the module/parameter `name`."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if pattern == name:
        return True
    pparts = pattern.split(".")
    nparts = name.split(".")
    if not _part_match(pparts[-1], nparts[-1]):
        return False
    i = 0
    for part in nparts[:-1]:  # the other parts must appear in order (greedy subsequence)
        if i < len(pparts) - 1 and _part_match(pparts[i], part):
            i += 1
    return i == len(pparts) - 1


def _is_lora_layer(module: Any) -> bool:
    """Layers PEFT's LoRA can wrap: Linear (incl. quantised), GPT-2's Conv1D, Embedding, Conv."""
    import torch

    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d)):
        return True
    return type(module).__name__ in {"Conv1D", "Linear4bit", "Linear8bitLt"}


def _is_conv1d(module: Any) -> bool:
    return type(module).__name__ == "Conv1D"


def output_head_names(model: Any) -> set[str]:
    """Full names of the output head (and tied input embeddings are left alone anyway)."""
    names: set[str] = set()
    head = None
    if hasattr(model, "get_output_embeddings"):
        try:
            head = model.get_output_embeddings()
        except (AttributeError, NotImplementedError):
            head = None
    for name, module in model.named_modules():
        if (head is not None and module is head) or name.rsplit(".", 1)[-1] in ("lm_head", "embed_out"):
            names.add(name)
    return names


def _in_vision_tower(name: str) -> bool:
    parts = name.split(".")
    return any(p in VISION_PARTS for p in parts) and not any(p in PROJECTOR_PARTS for p in parts)


def _mentions_vision(pattern: str) -> bool:
    return any(v in pattern for v in VISION_PARTS)


def _legacy_translation(pattern: str) -> str | None:
    """The transformers 5 spelling of a Mixtral-era pattern, or None when it has none."""
    parts = pattern.split(".")
    new = [_LEGACY_PARTS.get(p, p) for p in parts]
    if "experts" in new:
        i = new.index("experts")
        rest = [p for p in new[i + 1 :] if p != "*" and not p.isdigit()]
        if len(rest) == 1 and rest[0] in _LEGACY_EXPERT:
            new = [*new[: i + 1], _LEGACY_EXPERT[rest[0]]]
    out = ".".join(new)
    return out if out != pattern else None


# ---- verification ---------------------------------------------------------------------------------


def _as_patterns(patterns: Any) -> list[str] | None:
    if patterns is None:
        return None
    if isinstance(patterns, str):
        if patterns.strip().lower() in AUTO_VALUES:
            return None
        return [p.strip() for p in patterns.split(",") if p.strip()]
    return [str(p) for p in patterns]


def _match_one(model: Any, pattern: str, modules: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(module names, parameter names) one pattern names; vision tower excluded unless it says so."""
    vision_ok = _mentions_vision(pattern)
    mods = [n for n in modules if n and match_pattern(pattern, n) and (vision_ok or not _in_vision_tower(n))]
    if mods:
        return mods, []
    params = [
        n for n, _ in model.named_parameters()
        if match_pattern(pattern, n) and (vision_ok or not _in_vision_tower(n))
        and not _is_lora_layer(modules.get(n.rsplit(".", 1)[0]))
    ]  # fmt: skip
    return [], params


def verify_target_modules(model: Any, patterns: Iterable[str] | str | None) -> dict[str, list[str]]:
    """Check every pattern against the loaded model: {pattern: [matched module/parameter names]}.

    Warns naming each pattern that matches nothing (after trying the transformers 5 spelling of
    legacy names); raises UserError when no pattern matches anything.
    """
    pats = _as_patterns(patterns)
    modules = dict(model.named_modules())
    if pats is None:
        auto = auto_target_modules(model)
        if not auto:
            raise UserError("no linear layer found to adapt with LoRA; give --target-modules explicitly")
        return {"all-linear": auto}
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for pattern in pats:
        mods, params = _match_one(model, pattern, modules)
        if not mods and not params:
            alt = _legacy_translation(pattern)
            if alt:
                mods, params = _match_one(model, alt, modules)
        if mods or params:
            found[pattern] = mods + params
        else:
            found[pattern] = []
            missing.append(pattern)
    if missing and len(missing) == len(pats):
        examples = ", ".join(
            sorted({n.rsplit(".", 1)[-1] for n, m in modules.items() if _is_lora_layer(m)})[:12]
        )
        raise UserError(
            f"none of the LoRA target modules {', '.join(pats)} exists in this model; "
            f"its adaptable layers are named: {examples} (use --target-modules with those, or all-linear)"
        )
    if missing:
        warn(f"LoRA target pattern(s) matched nothing in this model and are ignored: {', '.join(missing)}")
    return found


def auto_target_modules(model: Any) -> list[str]:
    """Every Linear/Conv1D layer except the output head, the vision tower and the projector."""
    heads = output_head_names(model)
    out = []
    for name, module in model.named_modules():
        if not name or name in heads or _in_vision_tower(name):
            continue
        if any(p in PROJECTOR_PARTS for p in name.split(".")):
            continue
        if _is_lora_layer(module) and not isinstance(module, _embedding_types()):
            out.append(name)
    return out


def _embedding_types() -> tuple[type, ...]:
    import torch

    return (torch.nn.Embedding,)


# ---- resolution into LoraConfig kwargs ------------------------------------------------------------


def resolve_lora_targets(model: Any, params: dict[str, Any]) -> dict[str, Any]:
    """kwargs for `peft.LoraConfig` from a handler's parameters, checked against the loaded model.

    Returns `target_modules` (short names, a regex, or full names — whichever PEFT matches to exactly the
    verified set), `target_parameters` when fused expert weights are targeted, `modules_to_save`
    (routers and the handler's `lora_modules_to_save`) and `fan_in_fan_out` for GPT-2's Conv1D.
    """
    modules = dict(model.named_modules())
    try:
        matched = verify_target_modules(model, params.get("lora_target_modules"))
    except UserError:
        # generic fallback handlers guess module names; an unknown architecture gets all linear layers
        if str(params.get("lora_targets_fallback", "")).lower() not in AUTO_VALUES:
            raise
        warn(
            f"none of the handler's LoRA targets ({', '.join(_as_patterns(params.get('lora_target_modules')) or [])}) "
            "exists in this model; using all linear layers except the output head"
        )
        matched = verify_target_modules(model, None)
    save_patterns = _as_patterns(params.get("lora_modules_to_save")) or []

    save: list[str] = []
    for pattern in save_patterns:
        names = [n for n in modules if n and match_pattern(pattern, n)]
        outer = [n for n in names if not any(n.startswith(o + ".") for o in names if o != n)]
        if not outer:
            warn(f"modules_to_save pattern {pattern!r} matched nothing in this model and is ignored")
        save.extend(n for n in outer if n not in save)

    target_modules: list[str] = []
    target_parameters: list[str] = []
    for names in matched.values():
        for name in names:
            module = modules.get(name)
            if module is None:  # a parameter name
                target_parameters.append(name)
            elif _is_lora_layer(module):
                target_modules.append(name)
            else:
                _expand_container(name, module, target_modules, target_parameters, save)

    def inside_saved(n: str) -> bool:
        return any(n == s or n.startswith(s + ".") for s in save)

    target_modules = sorted({n for n in target_modules if not inside_saved(n)})
    target_parameters = sorted({n for n in target_parameters if not inside_saved(n.rsplit(".", 1)[0])})
    if not target_modules and not target_parameters and not save:
        raise UserError("the LoRA targets matched only modules that cannot be adapted; use --target-modules")

    out: dict[str, Any] = {
        "target_modules": _compress_modules(model, target_modules) if target_modules else [],
        "modules_to_save": save or None,
    }
    if target_parameters:
        out["target_parameters"] = _compress_parameters(model, target_parameters)
    if any(_is_conv1d(modules[n]) for n in target_modules):
        out["fan_in_fan_out"] = True
    return out


def _expand_container(
    name: str, module: Any, target_modules: list[str], target_parameters: list[str], save: list[str]
) -> None:
    """A matched module LoRA cannot wrap: its linear children, else its 3-D weights, else train it whole."""
    children = [f"{name}.{n}" for n, m in module.named_modules() if n and _is_lora_layer(m)]
    if children:
        target_modules.extend(children)
        return
    direct = list(module.named_parameters(recurse=False))
    fused = [f"{name}.{n}" for n, p in direct if p.dim() >= 3]
    if fused:
        target_parameters.extend(fused)
    elif direct and name not in save:
        save.append(name)  # e.g. a MoE router (TopKRouter): small, trained in full


def _layer_template(name: str) -> str:
    return r"\.".join(r"\d+" if p.isdigit() else re.escape(p) for p in name.split("."))


def _compress_modules(model: Any, names: list[str]) -> list[str] | str:
    """The shortest PEFT `target_modules` that selects exactly `names` among the model's modules."""
    wanted = set(names)
    all_names = [n for n, _ in model.named_modules() if n]
    for depth in (1, 2):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in wanted})
        chosen = {n for n in all_names if n in suffixes or any(n.endswith("." + s) for s in suffixes)}
        if chosen == wanted:
            return suffixes
    by_parent: dict[str, set[str]] = {}
    for n in wanted:  # layers.\d+.self_attn.(?:q_proj|k_proj): one alternative per parent path
        parent, _, leaf = n.rpartition(".")
        by_parent.setdefault(_layer_template(parent), set()).add(re.escape(leaf))
    alternatives = [
        f"{parent}\\.(?:{'|'.join(sorted(leaves))})" for parent, leaves in sorted(by_parent.items())
    ]
    regex = alternatives[0] if len(alternatives) == 1 else "(?:" + "|".join(alternatives) + ")"
    if {n for n in all_names if re.fullmatch(regex, n)} == wanted:
        return regex
    return sorted(wanted)


def _compress_parameters(model: Any, names: list[str]) -> list[str]:
    """The shortest `target_parameters` suffixes that select exactly `names` (PEFT matches by suffix)."""
    wanted = set(names)
    all_names = [n for n, _ in model.named_parameters()]
    for depth in (2, 3):
        suffixes = sorted({".".join(n.split(".")[-depth:]) for n in wanted})
        chosen = {n for n in all_names if n in suffixes or any(n.endswith("." + s) for s in suffixes)}
        if chosen == wanted:
            return suffixes
    return sorted(wanted)


# ---- parameter groups -----------------------------------------------------------------------------


def parameter_group(name: str) -> str:
    """Which group a parameter belongs to (attention, mlp, experts, router, vision, projector, ...)."""
    parts = [p for p in name.split(".") if p not in PEFT_PARTS]
    pset = set(parts)
    if pset & PROJECTOR_PARTS or (parts and parts[-1].startswith("mm_input_projection")):
        return "projector"
    if pset & VISION_PARTS:
        return "vision"
    if pset & ROUTER_PARTS:
        return "router"
    if pset & EXPERT_PARTS:
        return "experts"
    if pset & EMBEDDING_PARTS:
        return "embeddings"
    if pset & ATTENTION_PARTS:
        return "attention"
    if pset & MLP_PARTS:
        return "mlp"
    return "other"


def parameter_group_table(model: Any) -> list[tuple[str, int, int]]:
    """Rows (group, trainable parameters, total parameters) for the groups present in `model`."""
    trainable = dict.fromkeys(GROUPS, 0)
    total = dict.fromkeys(GROUPS, 0)
    for name, param in model.named_parameters():
        if ".original_module." in name:  # PEFT keeps a frozen copy beside each modules_to_save module
            continue
        group = parameter_group(name)
        n = param.numel()
        total[group] += n
        if param.requires_grad:
            trainable[group] += n
    return [(g, trainable[g], total[g]) for g in GROUPS if total[g]]


def _fmt(n: int) -> str:
    for unit, div in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def render_parameter_groups(rows: list[tuple[str, int, int]], title: str = "Trainable parameters by group"):
    """A rich Table of the group rows (frozen groups shown as such)."""
    from rich.table import Table

    table = Table(title=title)
    table.add_column("group")
    table.add_column("trainable", justify="right")
    table.add_column("total", justify="right")
    table.add_column("%", justify="right")
    sum_t = sum(r[1] for r in rows)
    sum_all = sum(r[2] for r in rows)
    for group, t, a in rows:
        pct = f"{100 * t / a:.2f}" if a else "-"
        table.add_row(group, _fmt(t) if t else "[dim]frozen[/dim]", _fmt(a), pct)
    table.add_row(
        "[bold]all[/bold]", _fmt(sum_t), _fmt(sum_all), f"{100 * sum_t / sum_all:.2f}" if sum_all else "-"
    )
    return table
