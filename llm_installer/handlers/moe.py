"""MoEHandler and the mixture-of-experts families: Mixtral, Qwen2-MoE / Qwen3-MoE, DeepSeek-V2/V3.

In transformers 5 the routed experts of these families are *fused 3-D parameters*
(`mlp.experts.gate_up_proj` [experts, 2*inter, hidden] and `mlp.experts.down_proj`), not one Linear per
expert, so there is no `experts.*.w1` module to put LoRA on. The handler lists those parameter names;
`targets.resolve_lora_targets` sends them to PEFT's `target_parameters` (LoRA on an nn.Parameter).
The router (`mlp.gate`, a TopKRouter module, not a Linear) is trained in full through
`modules_to_save`; it is tiny. The seed's legacy names (`block_sparse_moe.gate`,
`block_sparse_moe.experts.*.w1/w2/w3`) are translated to these by the resolver.
"""

from __future__ import annotations

from typing import Any

from llm_installer.handlers.modules import LLAMA_ATTENTION
from llm_installer.handlers.transformer import TransformerHandler

ROUTER = ("mlp.gate",)
FUSED_EXPERTS = ("experts.gate_up_proj", "experts.down_proj")
DENSE_MLP = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # shared experts and dense layers


class MoEHandler(TransformerHandler):
    """Mixture of experts: router and experts trained, top-k routing, load-balancing loss applied."""

    name = "moe"
    families = ("moe (generic)",)
    description = "generic mixture-of-experts model (router + fused experts + attention)"
    default_model_family = "moe"
    is_generic = True
    attention_modules = LLAMA_ATTENTION
    mlp_modules = (*ROUTER, *FUSED_EXPERTS, *DENSE_MLP)
    best_seq_length = 2048

    def _estimate_model_size(self) -> float | None:
        """Memory follows the total parameter count (all experts are loaded)."""
        return self.model_info.params_billions

    def target_modules_for_size(self) -> tuple[list[str] | None, str]:
        """Attention + router + experts below 30B; attention + router above (experts dominate memory)."""
        attention = list(self.attention_modules)
        if self.size_class() == ">30B":
            return [*attention, *ROUTER], "size rule (>30B MoE: attention + router)"
        return [*attention, *self.mlp_modules], "MoE: attention + router + experts"

    def get_training_parameters(self) -> dict[str, Any]:
        params = super().get_training_parameters()
        cfg = self.config
        top_k = cfg.get("num_experts_per_tok") or self.model_info.num_experts_per_tok or 2
        params["moe_training"] = True
        params["expert_selection"] = f"top-{top_k}"
        params["load_balancing_loss_coef"] = float(cfg.get("router_aux_loss_coef") or 0.01)
        params["recommended_batch_size"] = 8  # the seed: larger batches spread tokens over experts
        return params

    def prepare_model_for_training(self, model: Any, training_config: dict[str, Any]) -> Any:
        """Every MoE key acts: `moe_training` switches the router's balancing loss on with
        `load_balancing_loss_coef`, and `expert_selection` ('top-k') sets how many experts each token
        is routed to during training (the model's own top-k unless a handler asks otherwise)."""
        model = super().prepare_model_for_training(model, training_config)
        params = self.training_params()
        cfg = training_config or {}
        if params.moe_training is not False:
            coef = cfg.get("load_balancing_loss_coef", params.load_balancing_loss_coef)
            apply_router_aux_loss(model, float(0.01 if coef is None else coef))
        top_k = parse_expert_selection(params.expert_selection)
        if top_k is not None:
            apply_expert_top_k(model, top_k)
        return model


def parse_expert_selection(value: Any) -> int | None:
    """'top-2' -> 2; None or an unreadable value -> None (the model's own routing)."""
    if isinstance(value, int):
        return value if value > 0 else None
    if isinstance(value, str) and value.lower().startswith("top-") and value[4:].isdigit():
        return int(value[4:]) or None
    return None


def apply_expert_top_k(model: Any, top_k: int) -> int:
    """Route each token to `top_k` experts: the config's `num_experts_per_tok` and every router's `top_k`
    (transformers copies it into the router modules at construction). Returns the routers changed."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    experts = None
    for c in {id(config): config, id(text): text}.values():
        if c is not None and hasattr(c, "num_experts_per_tok"):
            c.num_experts_per_tok = top_k
            experts = (
                getattr(c, "num_local_experts", None)
                or getattr(c, "num_experts", None)
                or getattr(c, "n_routed_experts", None)
            )
    if experts is not None and top_k > int(experts):
        from llm_installer.errors import UserError

        raise UserError(f"expert_selection top-{top_k}: the model has only {experts} experts")
    changed = 0
    for module in model.modules():
        if hasattr(module, "top_k") and isinstance(module.top_k, int) and not callable(module.top_k):
            module.top_k = top_k
            changed += 1
    return changed


def apply_router_aux_loss(model: Any, coef: float) -> bool:
    """Ask the model to return router logits and add `coef` x load-balancing loss to its loss.

    transformers copies `router_aux_loss_coef` from the config into the model at construction, so the
    attribute is set on every module that holds it as well as on the config. Returns False when the
    architecture has no auxiliary loss (DeepSeek-V3 balances with a routing bias instead).
    """
    config = getattr(model, "config", None)
    has_aux = False
    if config is not None and hasattr(config, "router_aux_loss_coef"):
        config.router_aux_loss_coef = coef
        has_aux = True
    for module in model.modules():
        if hasattr(module, "router_aux_loss_coef") and not callable(module.router_aux_loss_coef):
            module.router_aux_loss_coef = coef
            has_aux = True
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "router_aux_loss_coef"):
            sub.router_aux_loss_coef = coef
    if has_aux and config is not None and hasattr(config, "output_router_logits"):
        config.output_router_logits = True
    return has_aux


class MixtralHandler(MoEHandler):
    """Mixtral 8x7B / 8x22B (top-2 of 8 experts)."""

    name = "mixtral"
    families = ("mixtral",)
    model_types = ("mixtral",)
    architectures = ("MixtralForCausalLM",)
    description = "Mixtral (router + fused experts + attention)"
    mlp_modules = (*ROUTER, *FUSED_EXPERTS)
    best_seq_length = 2048
    default_chat_template = "mistral"


class QwenMoEHandler(MoEHandler):
    """Qwen1.5/2-MoE (with a shared expert) and Qwen3-MoE."""

    name = "qwen_moe"
    families = ("qwen2_moe", "qwen3_moe")
    model_types = ("qwen2_moe", "qwen3_moe")
    architectures = ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM")
    description = "Qwen2-MoE / Qwen3-MoE (router + experts + shared expert)"
    mlp_modules = (*ROUTER, *FUSED_EXPERTS, "shared_expert.gate_proj", "shared_expert.up_proj",
                   "shared_expert.down_proj")  # fmt: skip
    best_seq_length = 2048
    default_chat_template = "chatml"
    end_of_turn_token = "<|im_end|>"


class DeepSeekMoEHandler(MoEHandler):
    """DeepSeek-V2 / V3: multi-head latent attention (q_a/q_b, kv_a/kv_b), routed + shared experts."""

    name = "deepseek"
    families = ("deepseek_v2", "deepseek_v3")
    model_types = ("deepseek_v2", "deepseek_v3")
    architectures = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")
    description = "DeepSeek-V2/V3 (MLA attention; router + routed/shared experts; dense first layers)"
    best_seq_length = 2048

    @property
    def attention_modules(self) -> tuple[str, ...]:  # type: ignore[override]
        """q_a/q_b_proj with a query LoRA rank (V3, V2), plain q_proj without (V2-Lite)."""
        query = ("q_a_proj", "q_b_proj") if self.config.get("q_lora_rank") else ("q_proj",)
        return (*query, "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
