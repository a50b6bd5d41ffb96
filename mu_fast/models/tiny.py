"""Tiny random-weight HF models of every supported architecture, built from configs (no downloads).

Used by tests and CPU benchmarks. Shapes of real models live in ``REAL_SHAPES`` (from the shipped configs, ``mu_fast.models.shipped``).
"""

from __future__ import annotations

from typing import Any

import torch

from mu_fast.models.shipped import real_shapes

# Shapes of the shipped 7-9B configs (mu_fast/models/configs), keyed as the benchmarks and data files name them.
REAL_SHAPES: dict[str, dict[str, Any]] = {
    key: real_shapes(name)
    for key, name in (("llama3-8b", "llama-3-8b"), ("gemma-7b", "gemma-7b"), ("gemma2-9b", "gemma-2-9b"),
                      ("mistral-7b", "mistral-7b"), ("qwen2-7b", "qwen2-7b"))
}


def make_config(arch: str, **overrides: Any) -> Any:
    """A transformers config for ``arch`` in {llama, mistral, qwen2, gemma, gemma2}; tiny unless overridden."""
    import transformers

    classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "gemma": transformers.GemmaConfig,
        "gemma2": transformers.Gemma2Config,
    }
    if arch not in classes:
        raise ValueError(f"unsupported architecture {arch!r}; choose one of {sorted(classes)}")
    kwargs: dict[str, Any] = dict(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "gemma2":
        # Soft-capping and the sliding window are what make Gemma-2 special; keep both on.
        kwargs.update(final_logit_softcapping=30.0, attn_logit_softcapping=50.0, sliding_window=16)
    if arch == "mistral":
        kwargs.update(sliding_window=None)
    kwargs.update(overrides)
    config = classes[arch](**kwargs)
    # Eager attention is exact for every architecture here (Gemma-2 soft-capping included).
    config._attn_implementation = kwargs.get("attn_implementation", "eager")
    return config


def make_tiny_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Any:
    """A randomly initialised CausalLM of ``arch`` in eval mode, deterministic for ``seed``."""
    import transformers

    config = make_config(arch, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.to(dtype).eval()
