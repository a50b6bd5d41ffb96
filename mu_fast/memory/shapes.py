"""What the memory plan reads: the model's shapes (from a transformers config), the per-step batch, the budget."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

# Architectures whose transformers implementation has no SDPA path (soft-capped attention runs eagerly).
_EAGER_ONLY = ("gemma2",)
_NORMS_PER_LAYER = {"gemma2": 4}  # input, post-attention, pre-feedforward, post-feedforward; others: 2


@dataclass(frozen=True)
class BatchShape:
    """The per-step batch. Defaults are the paper's (authors_repo.md §3): 64 forget + 64 maintain fact prompts
    packed in one batch, and 64 LM texts of 100 tokens.

    fact_tokens: padded length of the packed fact prompts (sports prompts tokenize to ~15-30 tokens; 24 is typical).
    padded: whether batches carry padding (an attention mask): real batches of prompts of varied length do, and
    then SDPA attention expands the KV heads of GQA models instead of attending per KV group.
    """

    n_forget: int = 64
    n_maintain: int = 64
    fact_tokens: int = 24
    n_lm: int = 64
    lm_tokens: int = 100
    padded: bool = True

    def __post_init__(self) -> None:
        for name in ("n_forget", "n_maintain", "fact_tokens"):
            if getattr(self, name) <= 0:
                raise ValueError(f"BatchShape.{name} must be positive; got {getattr(self, name)}")
        if self.n_lm < 0 or (self.n_lm and self.lm_tokens < 2):
            raise ValueError(f"BatchShape needs n_lm ≥ 0 and lm_tokens ≥ 2; got n_lm={self.n_lm}, lm_tokens={self.lm_tokens}")

    @property
    def n_facts(self) -> int:
        return self.n_forget + self.n_maintain


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a decoder-only CausalLM that memory depends on (read from its transformers config).

    d: hidden size; d_mlp: MLP width; n_heads / n_kv_heads / head_dim: attention; vocab; n_layers; tied: the LM
    head shares the embedding matrix; n_norms: RMSNorms per layer; attn: "sdpa" or "eager" (the implementation the
    model runs; eager saves ``[B, H, T, T]`` probabilities); softcap: Gemma-2's attention logit soft-capping (one more
    saved ``[B, H, T, T]`` tensor in eager attention); qkv_bias: Qwen2's q/k/v biases.
    """

    arch: str
    d: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    n_layers: int
    tied: bool
    n_norms: int
    attn: str
    softcap: bool
    qkv_bias: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        from mu_fast.models.sites import ARCHITECTURES

        config = getattr(config, "text_config", None) or config
        arch = getattr(config, "model_type", None)
        if arch not in ARCHITECTURES:
            raise ValueError(f"memory plan: unsupported architecture {arch!r}; supported: {sorted(ARCHITECTURES)}")
        heads = config.num_attention_heads
        attn = getattr(config, "_attn_implementation", None) or ("eager" if arch in _EAGER_ONLY else "sdpa")
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"memory plan: attention implementation {attn!r} is not modelled; use 'sdpa' or 'eager'")
        return cls(
            arch=arch,
            d=config.hidden_size,
            d_mlp=config.intermediate_size,
            n_heads=heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab=config.vocab_size,
            n_layers=config.num_hidden_layers,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
            n_norms=_NORMS_PER_LAYER.get(arch, 2),
            attn=attn,
            softcap=bool(getattr(config, "attn_logit_softcapping", None)),
            qkv_bias=ARCHITECTURES[arch].qkv_bias,
        )

    def matrix_shape(self, matrix: str) -> tuple[int, int]:
        q, kv = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        return {"q": (q, self.d), "k": (kv, self.d), "v": (kv, self.d), "o": (self.d, q),
                "gate": (self.d_mlp, self.d), "up": (self.d_mlp, self.d), "down": (self.d, self.d_mlp)}[matrix]

    def linear_numel_per_layer(self) -> int:
        return sum(math.prod(self.matrix_shape(m)) for m in ("q", "k", "v", "o", "gate", "up", "down"))

    def param_count(self) -> int:
        """Every parameter, tied embeddings counted once."""
        bias = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim if self.qkv_bias else 0
        per_layer = self.linear_numel_per_layer() + bias + self.n_norms * self.d
        return self.n_layers * per_layer + self.d + self.vocab * self.d * (1 if self.tied else 2)


def resolve_config(model_config: Any) -> Any:
    """A transformers config: the argument itself, or a shipped config by name (``mu_fast.models.shipped_config``)."""
    if isinstance(model_config, str):
        try:
            from mu_fast.models import shipped_config  # type: ignore[attr-defined]
        except ImportError as err:
            raise ValueError(
                f"model {model_config!r}: shipped configs by name need mu_fast.models.shipped_config ({err}); "
                "pass a transformers config instead"
            ) from err
        return shipped_config(model_config)
    if not hasattr(model_config, "hidden_size") and not hasattr(model_config, "text_config"):
        raise TypeError(f"model_config must be a transformers config or a shipped model name; got {type(model_config).__name__}")
    return model_config


_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_budget(budget: int | float | str | None, option: str | None = None) -> int | None:
    """Bytes of a device budget: an int (bytes), or a string with a unit such as "24GB" (10^9), "24GiB" (2^30),
    "12000MB", "1.5 TB", "4096B". None stays None (no budget). A string without a unit is refused: "24" is far
    more likely 24 GB than 24 bytes. option: the command-line option the text came from, named in the errors
    (``--budget 24: give a unit, e.g. 24GB``)."""
    what = f"{option} {budget}" if option else f"budget {budget!r}"
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float, str)):
        raise TypeError(f"budget must be bytes (int) or a string like '24GB'; got {type(budget).__name__}")
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", budget)
        if match and not match[2]:
            raise ValueError(f"{what}: give a unit, e.g. {match[1]}GB (10^9 bytes) or {match[1]}GiB (2^30)")
        unit = match and match[2].lower()
        if not match or unit not in _UNITS:
            raise ValueError(f"{what}: cannot read it; write a number and a unit, e.g. 24GB, 24GiB, 12000MB "
                             "(GB = 10^9 bytes, GiB = 2^30)")
        value = float(match[1]) * _UNITS[unit]
    else:
        value = float(budget)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{what}: must be a positive number of bytes")
    return int(value)


def gb(nbytes: int | float) -> str:
    """Bytes as decimal gigabytes with two decimals (the unit GPUs are sold in... approximately)."""
    return f"{nbytes / 1e9:.2f} GB"
