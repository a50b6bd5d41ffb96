"""The per-architecture site table: the one place that knows how HF models name their components.

A *component* is what localization scores and masks select: an attention layer or one head, an MLP layer
or one neuron, or a single weight matrix. A *site* is where an activation is read or patched: the input
of ``o_proj`` (per-head ``z``, GQA aware), the input of ``down_proj`` (neuron activations), the outputs of
the attention block, of the MLP and of the decoder layer, and the token embeddings.

Shapes (HF ``nn.Linear`` weights are ``[out_features, in_features]``):
* q_proj ``[H*d_h, d]``, k_proj/v_proj ``[K*d_h, d]``, o_proj ``[d, H*d_h]``
* gate_proj/up_proj ``[d_mlp, d]``, down_proj ``[d, d_mlp]``
so head h owns q rows ``h*d_h:(h+1)*d_h`` and o_proj columns of the same range; its KV group g = h // (H/K)
owns k/v rows ``g*d_h:(g+1)*d_h``; neuron i owns row i of gate/up and column i of down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

ATTN_MATRICES = ("q", "k", "v", "o")
MLP_MATRICES = ("gate", "up", "down")
COMPONENT_KINDS = ("attn", "mlp") + tuple(f"attn.{m}" for m in ATTN_MATRICES) + tuple(f"mlp.{m}" for m in MLP_MATRICES)


@dataclass(frozen=True)
class ArchSpec:
    """Module names of one architecture family (all relative to the CausalLM)."""

    name: str
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    attn: str = "self_attn"
    mlp: str = "mlp"
    proj: tuple[tuple[str, str], ...] = (
        ("q", "q_proj"),
        ("k", "k_proj"),
        ("v", "v_proj"),
        ("o", "o_proj"),
        ("gate", "gate_proj"),
        ("up", "up_proj"),
        ("down", "down_proj"),
    )
    qkv_bias: bool = False
    # The norm whose *input* is the residual stream between attention and MLP ("resid_mid").
    mlp_input_norm: str = "post_attention_layernorm"
    # Gemma multiplies token embeddings by sqrt(d) inside the model; recorded for users of raw embeddings.
    embed_scaled: bool = False


ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama"),
    "mistral": ArchSpec("mistral"),
    "qwen2": ArchSpec("qwen2", qkv_bias=True),
    "gemma": ArchSpec("gemma", embed_scaled=True),
    "gemma2": ArchSpec("gemma2", embed_scaled=True, mlp_input_norm="pre_feedforward_layernorm"),
}


@dataclass(frozen=True, order=True)
class Component:
    """A scored/maskable unit. ``kind`` in COMPONENT_KINDS; ``index`` is a head (attn) or neuron (mlp).

    String form (also accepted by ``Component.parse``): ``a3`` attention layer 3, ``a3.5`` head 5 of it,
    ``m2`` MLP layer 2, ``m2.17`` neuron 17 of it, ``a3.q`` / ``m2.down`` a single matrix.
    """

    kind: str
    layer: int
    index: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in COMPONENT_KINDS:
            raise ValueError(f"unknown component kind {self.kind!r}; expected one of {COMPONENT_KINDS}")
        if self.index is not None and self.kind not in ("attn", "mlp"):
            raise ValueError(f"component {self.kind!r} is a whole matrix and takes no head/neuron index")

    def __str__(self) -> str:
        prefix = "a" if self.kind.startswith("attn") else "m"
        text = f"{prefix}{self.layer}"
        if "." in self.kind:
            text += "." + self.kind.split(".", 1)[1]
        elif self.index is not None:
            text += f".{self.index}"
        return text

    @classmethod
    def parse(cls, text: str) -> Component:
        """Inverse of ``str``: ``"a3"``, ``"a3.5"``, ``"m2"``, ``"m2.17"``, ``"a3.q"``, ``"m2.down"``."""
        if not text or text[0] not in "am":
            raise ValueError(f"cannot parse component {text!r}; expected e.g. 'a3', 'a3.5', 'm2', 'm2.17', 'a3.q'")
        family = "attn" if text[0] == "a" else "mlp"
        head, _, tail = text[1:].partition(".")
        try:
            layer = int(head)
        except ValueError as err:
            raise ValueError(f"cannot parse component {text!r}: layer {head!r} is not an integer") from err
        if not tail:
            return cls(family, layer)
        if tail.isdigit():
            return cls(family, layer, int(tail))
        return cls(f"{family}.{tail}", layer)


def _config_of(model_or_config: Any) -> Any:
    config = getattr(model_or_config, "config", model_or_config)
    # Multimodal wrappers keep the language model's config under text_config.
    return getattr(config, "text_config", None) or config


class SiteTable:
    """Names, shapes and selections of components for one HF causal LM (llama, gemma, gemma2, qwen2, mistral).

    Build it from a model or a config: ``SiteTable(model)``. Unknown architectures raise ``ValueError``
    listing the supported ones.
    """

    def __init__(self, model_or_config: Any):
        config = _config_of(model_or_config)
        arch = getattr(config, "model_type", None)
        if arch not in ARCHITECTURES:
            raise ValueError(
                f"unsupported architecture {arch!r}; mu_fast's site table knows {sorted(ARCHITECTURES)}. "
                "Add an ArchSpec to mu_fast.models.sites.ARCHITECTURES for a model with the same layout."
            )
        self.spec = ARCHITECTURES[arch]
        self.arch = arch
        self.n_layers: int = config.num_hidden_layers
        self.n_heads: int = config.num_attention_heads
        self.n_kv_heads: int = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = config.hidden_size
        self.d_mlp: int = config.intermediate_size
        self.head_dim: int = getattr(config, "head_dim", None) or self.d_model // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"num_attention_heads={self.n_heads} is not a multiple of num_key_value_heads={self.n_kv_heads}")
        self.final_logit_softcap: float | None = getattr(config, "final_logit_softcapping", None)
        self._proj = dict(self.spec.proj)

    # ----------------------------------------------------------------- names
    def layer_path(self, layer: int) -> str:
        self._check_layer(layer)
        return f"{self.spec.layers}.{layer}"

    def module_path(self, layer: int, matrix: str) -> str:
        """Module path of one projection, e.g. ``model.layers.3.self_attn.q_proj``."""
        if matrix not in self._proj:
            raise ValueError(f"unknown matrix {matrix!r}; expected one of {tuple(self._proj)}")
        block = self.spec.attn if matrix in ATTN_MATRICES else self.spec.mlp
        return f"{self.layer_path(layer)}.{block}.{self._proj[matrix]}"

    def param_name(self, layer: int, matrix: str, bias: bool = False) -> str:
        return self.module_path(layer, matrix) + (".bias" if bias else ".weight")

    def attn_path(self, layer: int) -> str:
        return f"{self.layer_path(layer)}.{self.spec.attn}"

    def mlp_path(self, layer: int) -> str:
        return f"{self.layer_path(layer)}.{self.spec.mlp}"

    def resid_mid_path(self, layer: int) -> str:
        """Module whose input is the residual stream after attention and before the MLP of ``layer``."""
        return f"{self.layer_path(layer)}.{self.spec.mlp_input_norm}"

    # ---------------------------------------------------------------- shapes
    def matrix_shape(self, matrix: str) -> tuple[int, int]:
        d, dh = self.d_model, self.head_dim
        return {
            "q": (self.n_heads * dh, d),
            "k": (self.n_kv_heads * dh, d),
            "v": (self.n_kv_heads * dh, d),
            "o": (d, self.n_heads * dh),
            "gate": (self.d_mlp, d),
            "up": (self.d_mlp, d),
            "down": (d, self.d_mlp),
        }[matrix]

    def kv_head_of(self, head: int) -> int:
        """The KV head that query head ``head`` reads under GQA."""
        return head // (self.n_heads // self.n_kv_heads)

    # ------------------------------------------------------------ selections
    def selections(self, component: Component) -> dict[str, tuple[str, range | None]]:
        """Parameters a component owns: ``{param_name: (kind, span)}`` with kind ``whole``/``rows``/``cols``
        and span the row/column range (None for whole). Consumed by ``mu_fast.masks.Mask``."""
        L, kind, idx = component.layer, component.kind, component.index
        self._check_layer(L)
        out: dict[str, tuple[str, range | None]] = {}
        if "." in kind:
            matrix = kind.split(".", 1)[1]
            out[self.param_name(L, matrix)] = ("whole", None)
            if self.spec.qkv_bias and matrix in ("q", "k", "v"):
                out[self.param_name(L, matrix, bias=True)] = ("whole", None)
            return out
        if kind == "attn" and idx is None:
            for m in ATTN_MATRICES:
                out.update(self.selections(Component(f"attn.{m}", L)))
            return out
        if kind == "mlp" and idx is None:
            for m in MLP_MATRICES:
                out[self.param_name(L, m)] = ("whole", None)
            return out
        if kind == "attn":
            if not 0 <= idx < self.n_heads:
                raise ValueError(f"head {idx} out of range for {self.n_heads} heads")
            dh = self.head_dim
            q_rows = range(idx * dh, (idx + 1) * dh)
            g = self.kv_head_of(idx)
            kv_rows = range(g * dh, (g + 1) * dh)
            out[self.param_name(L, "q")] = ("rows", q_rows)
            out[self.param_name(L, "k")] = ("rows", kv_rows)
            out[self.param_name(L, "v")] = ("rows", kv_rows)
            out[self.param_name(L, "o")] = ("cols", q_rows)
            if self.spec.qkv_bias:
                out[self.param_name(L, "q", bias=True)] = ("rows", q_rows)
                out[self.param_name(L, "k", bias=True)] = ("rows", kv_rows)
                out[self.param_name(L, "v", bias=True)] = ("rows", kv_rows)
            return out
        if not 0 <= idx < self.d_mlp:
            raise ValueError(f"neuron {idx} out of range for d_mlp={self.d_mlp}")
        neuron = range(idx, idx + 1)
        out[self.param_name(L, "gate")] = ("rows", neuron)
        out[self.param_name(L, "up")] = ("rows", neuron)
        out[self.param_name(L, "down")] = ("cols", neuron)
        return out

    def component_size(self, component: Component) -> int:
        """Number of parameters a component owns (KV rows of a head counted in full, as its mask selects them)."""
        total = 0
        for name, (kind, span) in self.selections(component).items():
            shape = self._shape_of_param(name)
            if kind == "whole":
                n = 1
                for s in shape:
                    n *= s
            elif kind == "rows":
                n = len(span) * (shape[1] if len(shape) > 1 else 1)
            else:
                n = len(span) * shape[0]
            total += n
        return total

    def layer_components(self, kinds: tuple[str, ...] = ("attn", "mlp")) -> list[Component]:
        """All layer-level components of the given kinds, in layer order."""
        return [Component(k, L) for L in range(self.n_layers) for k in kinds]

    # -------------------------------------------------------------- helpers
    def _shape_of_param(self, name: str) -> tuple[int, ...]:
        matrix = next(m for m, proj in self._proj.items() if f".{proj}." in name)
        shape = self.matrix_shape(matrix)
        return (shape[0],) if name.endswith(".bias") else shape

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} out of range for a model with {self.n_layers} layers")

    def __repr__(self) -> str:
        return (
            f"SiteTable({self.arch}: L={self.n_layers}, H={self.n_heads}, KV={self.n_kv_heads}, d={self.d_model}, "
            f"d_head={self.head_dim}, d_mlp={self.d_mlp})"
        )


def get_submodule(model: Any, path: str) -> Any:
    """``model.get_submodule`` with an error that names the architecture table when the path is missing."""
    try:
        return model.get_submodule(path)
    except AttributeError as err:
        raise ValueError(
            f"module {path!r} not found in {type(model).__name__}; the site table expects HF naming "
            "(model.layers.N.self_attn.q_proj ...). Pass the CausalLM itself, not a wrapper."
        ) from err
