"""Adapters for users of TransformerLens and nnsight.

* ``unwrap_model``: the plain HF CausalLM inside a TransformerLens ``TransformerBridge`` (``.original_model``)
  or an nnsight ``LanguageModel`` (``._module``), so mu_fast's hooks run on the very same weights next to
  the wrapper's own hooks. A legacy ``HookedTransformer`` re-implements the model with converted weights
  and is refused with the fix.
* Results keyed by TransformerLens hook names: ``AttributionResult.to_tl_names()`` (``blocks.{L}.attn.hook_z``
  -> ``[H]``, ``blocks.{L}.mlp.hook_post`` -> ``[d_mlp]``, ``blocks.{L}.hook_mlp_out`` ...).
"""

from __future__ import annotations

from typing import Any

from mu_fast.models.sites import ARCHITECTURES


def _is_hf_causal_lm(model: Any) -> bool:
    config = getattr(model, "config", None)
    return config is not None and getattr(config, "model_type", None) in ARCHITECTURES and hasattr(model, "get_output_embeddings")


def unwrap_model(model: Any) -> Any:
    """The HF CausalLM to hook: the model itself, ``bridge.original_model`` for a TransformerLens
    TransformerBridge, or ``lm._module`` for an nnsight LanguageModel. Raises TypeError otherwise."""
    if _is_hf_causal_lm(model):
        return model
    kind = type(model).__name__
    if kind == "HookedTransformer":
        raise TypeError(
            "a TransformerLens HookedTransformer re-implements the model with converted weights, so HF site names "
            "do not exist on it. Load the checkpoint with transformers (or TransformerBridge.boot_transformers) "
            "and pass that model; use result.to_tl_names() to get scores keyed by TransformerLens hook names"
        )
    for attr in ("original_model", "_module", "_model"):
        inner = getattr(model, attr, None)
        if inner is not None and _is_hf_causal_lm(inner):
            return inner
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    raise TypeError(
        f"cannot attribute a {kind} (model_type {model_type!r}); pass a HF *ForCausalLM of {sorted(ARCHITECTURES)}, "
        "a TransformerLens TransformerBridge or an nnsight LanguageModel wrapping one"
    )
