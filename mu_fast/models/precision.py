"""A float64 model that really computes in float64: the same numbers from every CPU's kernels.

``model.double()`` leaves two float32 islands in transformers' Llama / Gemma / Gemma-2 / Mistral / Qwen2 models:
the RMSNorm statistics (the input is cast to float32 and back) and the rotary cos/sin (computed from float32
frequencies). Their round-off differs between CPU kernels (vectorized pow/rsqrt/cos/sin), by ~1e-7, and an edit
carries it into every number: measured on the demo organism, a float64 edit after ``.double()`` alone differed by
up to 7e-8 in its loss between portable and native kernels (benchmarks/results/CPU/demo_numerics*.json).
``to_float64`` replaces those modules with ones that compute in the input's precision (float32 and wider: bit for
bit what the originals compute in float32), keeping the same parameters and names, so masks, snapshots and state
dicts see the same model.
"""

from __future__ import annotations

from typing import Any

import torch


class WideRMSNorm(torch.nn.Module):
    """RMSNorm in ``promote_types(input, float32)``: Llama-style (``weight * normed``) or Gemma-style
    (``normed * (1 + weight)``, computed before the cast back)."""

    def __init__(self, source: torch.nn.Module) -> None:
        super().__init__()
        self.weight = source.weight
        self.eps = float(getattr(source, "variance_epsilon", getattr(source, "eps", 1e-6)))
        self.gemma_style = type(source).__name__.startswith("Gemma")
        self.replaces = type(source).__name__

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        wide = torch.promote_types(x.dtype, torch.float32)
        h = x.to(wide)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.gemma_style:
            return (h * (1.0 + self.weight.to(wide))).type_as(x)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, replaces {self.replaces}"


class WideRotaryEmbedding(torch.nn.Module):
    """Default (unscaled-type) rotary embedding whose cos/sin are computed in ``promote_types(x, float32)``."""

    def __init__(self, source: torch.nn.Module) -> None:
        super().__init__()
        self.register_buffer("inv_freq", source.inv_freq, persistent=False)
        self.attention_scaling = float(getattr(source, "attention_scaling", 1.0))
        self.replaces = type(source).__name__

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wide = torch.promote_types(x.dtype, torch.float32)
        freqs = position_ids[..., None].to(wide) * self.inv_freq.to(device=x.device, dtype=wide)
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.attention_scaling).to(x.dtype), (emb.sin() * self.attention_scaling).to(x.dtype)


def _replacement(module: torch.nn.Module) -> torch.nn.Module | None:
    name = type(module).__name__
    if name.endswith("RMSNorm") and isinstance(getattr(module, "weight", None), torch.nn.Parameter):
        return WideRMSNorm(module)
    if name.endswith("RotaryEmbedding") and getattr(module, "rope_type", "default") == "default" \
            and isinstance(getattr(module, "inv_freq", None), torch.Tensor):
        return WideRotaryEmbedding(module)
    return None


def to_float64(model: Any) -> Any:
    """``model`` in float64 with its RMSNorm and rotary modules computing in float64 (module docstring); in place,
    returned for chaining. Other modules keep their classes; parameter names are unchanged."""
    model = model.to(torch.float64)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child)
            if new is not None:
                setattr(parent, name, new)
    return model
