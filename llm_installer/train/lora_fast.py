"""A fused forward/backward for PEFT's LoRA linear layers during training.

Why: PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as separate autograd nodes: two
small matmuls, a scaling multiply and an add forward, and twice as many nodes backward, for each of the
7 x n_layers adapted projections. On a CPU those extra elementwise passes over (tokens x out_features)
tensors and the autograd bookkeeping cost a tenth of a step for a small model. Here one autograd Function
does the same maths with the scaling folded into `addmm` (no separate multiply or add pass) and the
LoRA part of the input gradient accumulated into the frozen weight's input gradient in place:

    forward   y  = x W^T + b + s (x A^T) B^T
    backward  gx = g W + s (g B) A      gB = s g^T (x A^T)      gA = s (g B)^T x

The parameters stay PEFT's own `lora_A` / `lora_B` weights, so saving, loading, merging and the optimizer
see no difference. LoRA dropout, when on, is applied to the LoRA path's input outside the Function
(autograd backpropagates through its mask). Anything the fused path was not written for (DoRA and other
variants, several active adapters, disabled or merged adapters, a quantized or non-Linear base layer,
mixed-adapter batches) goes through PEFT's unchanged forward. Equality with PEFT's forward and gradients
is tested.

Under autocast (bf16 or fp16, CPU or CUDA) the Function computes in the autocast dtype, as autocast makes
PEFT's `base(x)` and LoRA matmuls do, and returns that dtype; autocast itself cannot do it here, as it
leaves in-place ops such as `addmm_` alone (a float32 `lora_B` there stops the run). `torch.amp.custom_fwd`
was not used: its `cast_inputs` pins one device type and one dtype per Function class, and `custom_bwd`
enters an autocast context on every backward, fp32 ones included. Instead the caller passes the autocast
dtype (None outside autocast, where nothing is cast and the float32 path is unchanged), the operands are
cast once in `forward`, and `backward` hands each gradient back in its own input's dtype (float32 for the
LoRA weights), so it gives the same result whether or not the backward itself runs under autocast.
"""

from __future__ import annotations

from typing import Any


def _function():
    import torch

    class FusedLoraLinear(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, x_drop, weight, bias, lora_a, lora_b, scaling: float, dtype):
            shape = x.shape
            ctx.dtypes = None
            if dtype is not None:  # under autocast: every operand in its dtype, as autocast casts PEFT's
                ctx.dtypes = (x.dtype, None if x_drop is None else x_drop.dtype, lora_a.dtype, lora_b.dtype)
                ctx.bias_dtype = None if bias is None else bias.dtype
                x, weight, lora_a, lora_b = x.to(dtype), weight.to(dtype), lora_a.to(dtype), lora_b.to(dtype)
                x_drop = None if x_drop is None else x_drop.to(dtype)
                bias = None if bias is None else bias.to(dtype)
            x2 = x.reshape(-1, shape[-1])
            xd = x2 if x_drop is None else x_drop.reshape(-1, shape[-1])
            xa = xd @ lora_a.t()
            if bias is not None:
                y = torch.addmm(bias, x2, weight.t())
            else:
                y = x2 @ weight.t()
            y.addmm_(xa, lora_b.t(), alpha=scaling)
            ctx.save_for_backward(xd, xa, weight, lora_a, lora_b)
            ctx.separate = x_drop is not None
            ctx.scaling = scaling
            ctx.shape = shape
            return y.view(*shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            xd, xa, weight, lora_a, lora_b = ctx.saved_tensors
            s = ctx.scaling
            g = grad.reshape(-1, grad.shape[-1])
            if ctx.dtypes is not None:
                g = g.to(xa.dtype)
            gb = g @ lora_b  # (tokens, r)
            grad_x = grad_xd = grad_a = grad_b = grad_bias = None
            if ctx.separate:  # dropout on the LoRA path: its input gradient goes back through the mask
                if ctx.needs_input_grad[0]:
                    grad_x = (g @ weight).view(ctx.shape)
                if ctx.needs_input_grad[1]:
                    grad_xd = (gb @ lora_a).mul_(s).view(ctx.shape)
            elif ctx.needs_input_grad[0]:
                grad_x = (g @ weight).addmm_(gb, lora_a, alpha=s).view(ctx.shape)
            if ctx.needs_input_grad[4]:
                grad_a = (gb.t() @ xd).mul_(s)
            if ctx.needs_input_grad[5]:
                grad_b = (g.t() @ xa).mul_(s)
            if ctx.needs_input_grad[3]:
                grad_bias = g.sum(0)
            if ctx.dtypes is not None:  # computed in the autocast dtype, handed back in each input's own
                x_dtype, xd_dtype, a_dtype, b_dtype = ctx.dtypes
                grad_x = None if grad_x is None else grad_x.to(x_dtype)
                grad_xd = None if grad_xd is None else grad_xd.to(xd_dtype)
                grad_a = None if grad_a is None else grad_a.to(a_dtype)
                grad_b = None if grad_b is None else grad_b.to(b_dtype)
                grad_bias = None if grad_bias is None else grad_bias.to(ctx.bias_dtype)
            return grad_x, grad_xd, None, grad_bias, grad_a, grad_b, None, None

    return FusedLoraLinear


_FN: Any = None
# Device types whose autocast state is checked per call (`torch.is_autocast_enabled` refuses e.g. 'meta').
_AUTOCAST_DEVICES = ("cpu", "cuda", "xpu", "mps", "hpu")


def _fused_forward(layer: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    """Bound to each fused layer as its `forward` (a bound method, so `copy.deepcopy` rebinds it)."""
    import torch

    global _FN
    active = layer.active_adapters
    if (
        args
        or kwargs
        or layer.disable_adapters
        or layer.merged
        or len(active) != 1
        or active[0] not in layer.lora_A
        or active[0] in getattr(layer, "lora_variant", {})
    ):
        return type(layer).forward(layer, x, *args, **kwargs)
    name = active[0]
    base = layer.base_layer
    a = layer.lora_A[name].weight
    b = layer.lora_B[name].weight
    device = x.device.type
    dtype = None
    if device in _AUTOCAST_DEVICES and torch.is_autocast_enabled(device):
        # Autocast does not cast inside an autograd Function's in-place ops: cast here, to the dtype autocast
        # gives PEFT's `base(x)` and LoRA matmuls (float64 operands autocast leaves alone: PEFT's path).
        if torch.float64 in (x.dtype, base.weight.dtype, a.dtype, b.dtype):
            return type(layer).forward(layer, x, *args, **kwargs)
        dtype = torch.get_autocast_dtype(device)
    elif x.dtype != a.dtype or base.weight.dtype != a.dtype:
        return type(layer).forward(layer, x, *args, **kwargs)
    if _FN is None:
        _FN = _function()
    dropout = layer.lora_dropout[name]
    if isinstance(dropout, torch.nn.Identity) or not layer.training:
        x_drop = None
    else:  # PEFT casts the LoRA input to the adapter's dtype before its dropout (a bf16 `x` under autocast)
        x_drop = dropout(x if x.dtype == a.dtype else x.to(a.dtype))
    return _FN.apply(x, x_drop, base.weight, base.bias, a, b, float(layer.scaling[name]), dtype)


def fuse_lora_layers(model: Any) -> int:
    """Route every eligible PEFT LoRA Linear of `model` through the fused Function; returns how many.

    Eligible: a plain `torch.nn.Linear` base (not quantized, not Conv, not an embedding) whose weight and
    bias are frozen. Adapter state is checked on every call, so toggling adapters later still behaves
    exactly like PEFT.
    """
    import types

    import torch
    from peft.tuners.lora.layer import Linear as LoraLinear

    count = 0
    for module in model.modules():
        if not isinstance(module, LoraLinear) or "forward" in module.__dict__:
            continue
        base = module.base_layer
        if type(base) is not torch.nn.Linear or base.weight.requires_grad:
            continue
        if base.bias is not None and base.bias.requires_grad:
            continue
        module.forward = types.MethodType(_fused_forward, module)
        count += 1
    return count


def unfuse_lora_layers(model: Any) -> None:
    """Give every fused layer back PEFT's own forward."""
    for module in model.modules():
        fwd = module.__dict__.get("forward")
        if getattr(fwd, "__func__", None) is _fused_forward:
            del module.__dict__["forward"]


__all__ = ["fuse_lora_layers", "unfuse_lora_layers"]
