"""The byte model of one edit step: what ``EditStep`` allocates, term by term, from first principles.

Terms (bytes on the device; every tensor rounded up to the 512-byte block of the CUDA caching allocator):

* **frozen weights**: every parameter the mask does not name, in its stored precision. bf16: 2 B/element. int8
  (``Linear8bitLt``): 1 B/element + fp32 row scales. nf4 (``Linear4bit``, blocks of 64 with double-quantized
  statistics, as ``mu_fast.models.frozen`` loads them): 0.5 B/element + a uint8 absmax per 64 + an fp32 absmax per
  64·256. Embeddings, the LM head, norms and every module that holds a masked parameter stay bf16.
* **masked weights**: the masked parameters, whole, in bf16 (a row selection still keeps the whole matrix).
* **gradients**: dense bf16 ``.grad`` of each masked parameter (compact gradients off; they live from the backward
  that makes them to ``step()``), or the fp32 compact buffer (4 B per state element, ``SegmentTable.state_numel``)
  plus the one dense gradient the backward of a layer makes before the hook gathers and frees it.
* **optimizer state**: MaskedAdamW's compact buffers, exactly as ``SegmentTable`` lays them out (fp32 m, v: 8 B per
  state element; 8-bit: 2 B + two fp32 absmax per 256; fp32 master +4 B), its tile table, per-tile fp64 partial sums and per-parameter scalars;
  torch AdamW: m, v in the parameter dtype (bf16: 4 B/element of every masked parameter) plus the foreach step's
  temporaries (one bf16 copy of every parameter); bitsandbytes AdamW8bit: 2 B/element + two fp32 absmax per 256
  (fp32 moments for parameters under 4096 elements); torch/bitsandbytes with a partial mask add one bf16 gradient mask
  per partially selected parameter.
* **activations**: tensors autograd saves for backward, per token and layer (``layer_saved``; only from the lowest
  block whose input or weights require grad: nothing below it records a graph; with int8 frozen weights bitsandbytes
  also keeps the input of every frozen matrix whose input requires grad), plus the worst moment of one layer's
  backward (``backward_stage``: gradients of its activations while part of its saved tensors still live). With
  checkpointing, each layer from the lowest trainable one keeps only its input, and the layer being differentiated
  is recomputed whole.
* **logits**: the fact pass reads ``[B, V]`` at each prompt's last token (bf16 head output, fp32 copy, log-softmax
  and its gradients: ``FACT_LOGIT_COPIES`` fp32-equivalents); the LM pass runs the head in chunks of
  ``lm_chunk_tokens`` positions (``LM_LOGIT_COPIES``), next to the trunk's output, its detached copy and that copy's
  gradient ``[tokens, d]``; ``FACT_LOGITS_KEPT``: the fp32 fact logits a reference in ``EditStep.step`` keeps alive.
* **workspace**: what no tensor list shows: a dequantized frozen weight (bitsandbytes' backward, the largest frozen
  matrix, bf16) and ``WORKSPACE_BYTES`` for cuBLAS workspaces and kernels' scratch (a stated constant; a trace, which
  sees neither, is compared with ``MemoryPlan.tensor_total``).
* **allocator**: what torch's caching allocator reserves beyond the live tensors (segment rounding, cached blocks
  too small or too split to reuse): ``mu_fast.memory.allocator.allocator_slack`` of the largest per-layer backward
  working set, the largest LM-head working set and the most a forward leaves for its backward (see there for the
  rule and how it was fitted and checked). With it the
  peak is *reserved* bytes (``torch.cuda.max_memory_reserved``), not only allocated ones.

The peak is the largest of three moments: the fact pass, the LM pass (they run one after the other, so their
activations never coexist; gradients made by the first persist into the second) and the optimizer step. Each pass
is walked from its head down through the layers, as its backward runs, keeping the largest live total.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from mu_fast.masks import Mask
from mu_fast.memory.allocator import allocator_slack
from mu_fast.models.forward import lm_chunk_tokens
from mu_fast.memory.shapes import BatchShape, ModelShape

ALLOC = 512
CATEGORIES = ("frozen_weights", "masked_weights", "gradients", "optimizer_state", "activations", "logits", "workspace",
              "allocator")
WORKSPACE_BYTES = 256 * 2**20  # cuBLAS workspaces + allocator slack (stated; calibrate with torch.cuda.max_memory_allocated)
FACT_LOGIT_COPIES = 4.0  # fp32 [B, V] tensors alive at the head's backward (fp32 logits, log-softmax, 2 gradients)
LM_LOGIT_COPIES = 4.0  # fp32 [chunk, V] tensors alive at a chunk's backward (same list)
SOFTCAP_LOGIT_COPIES = 0.5  # Gemma-2's final tanh soft-capping keeps one bf16 [rows, V] more
# fp32 fact logits [rows, V] kept alive through the LM pass and the optimizer step (EditStep drops every reference).
FACT_LOGITS_KEPT = 0
NORM_BACKWARD = 4  # fp32 [tokens, d] temporaries of an RMSNorm's backward (Gemma-2's post-feedforward norm)
RECOMPUTE_LEFTOVER = 2  # bf16 [tokens, d] tensors a checkpointed layer's recompute leaves alive (its output, input copy)
# transformers' activation_checkpointing_enable also calls enable_input_require_grads(): the embedding output would
# then require grad, so every layer (not only those from the lowest trainable one) would keep its input and be
# recomputed and differentiated in backward. EditStep removes that hook (non-reentrant checkpoints do not need it).
CHECKPOINT_FROM_EMBEDDINGS = False
_MATRIX = re.compile(r"\.layers\.(\d+)\..*\b(q|k|v|o|gate|up|down)_proj\.(weight|bias)$")
_LAYER = re.compile(r"\.layers\.(\d+)\.")
ATTN, MLP = ("q", "k", "v", "o"), ("gate", "up", "down")


def rounded(nbytes: float) -> int:
    return int(-(-int(math.ceil(nbytes)) // ALLOC) * ALLOC) if nbytes > 0 else 0


@dataclass(frozen=True)
class Settings:
    """The memory knobs of one candidate (the ``EditConfig`` fields of the same names, plus ``frozen``).
    compact_grads is resolved (True/False), lm_chunk_tokens is the chunk actually used."""

    frozen: str = "bf16"
    grad_checkpointing: bool = False
    micro_batch: int | None = None
    lm_micro_batch: int | None = None
    state_bits: int = 32
    master_weights: bool = False
    compact_grads: bool = False
    optimizer: str = "auto"
    lm_chunk_tokens: int | None = None


@dataclass
class Estimate:
    """Bytes per category at the peak, the peak itself, where it is reached, and each phase's peak."""

    breakdown: dict[str, int]
    total: int
    phase: str
    phases: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------- the mask
@dataclass(frozen=True)
class MaskLayout:
    """Which projection matrices the mask trains, per layer; and the layers whose input is treated as requiring
    grad because the mask names a norm in them (or the embedding: layer 0). The LM head and final norm record no
    graph in the trunk."""

    per_layer: dict[int, frozenset[str]]
    rg_inputs: frozenset[int]

    @classmethod
    def of(cls, mask: Mask) -> MaskLayout:
        per_layer: dict[int, set[str]] = {}
        rg_inputs = set()
        for name in mask:
            if match := _MATRIX.search(name):
                per_layer.setdefault(int(match[1]), set()).add(match[2])
            elif match := _LAYER.search(name):
                rg_inputs.add(int(match[1]))
            elif "embed" in name:
                rg_inputs.add(0)
        return cls({k: frozenset(v) for k, v in per_layer.items()}, frozenset(rg_inputs))

    def lowest(self, n_layers: int) -> int:
        """The lowest layer whose forward records a graph."""
        return min([*self.per_layer, *self.rg_inputs], default=n_layers)


# ------------------------------------------------------------------------------------------------- weights
def _param_tensors(s: ModelShape) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, kind) of every parameter: kind "linear" (a quantizable projection) or "bf16"."""
    out = [("model.embed_tokens.weight", (s.vocab, s.d), "bf16"), ("model.norm.weight", (s.d,), "bf16")]
    if not s.tied:
        out.append(("lm_head.weight", (s.vocab, s.d), "bf16"))
    for layer in range(s.n_layers):
        for m in ATTN + MLP:
            block = "self_attn" if m in ATTN else "mlp"
            out.append((f"model.layers.{layer}.{block}.{m}_proj.weight", s.matrix_shape(m), "linear"))
            if s.qkv_bias and m in ("q", "k", "v"):
                out.append((f"model.layers.{layer}.{block}.{m}_proj.bias", (s.matrix_shape(m)[0],), "bf16"))
        norms = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
        out += [(f"model.layers.{layer}.{norm}.weight", (s.d,), "bf16") for norm in norms[: s.n_norms]]
    return out


def quantized_bytes(shape: tuple[int, ...], frozen: str) -> int:
    """Device bytes of one frozen Linear weight ``[out, in]`` stored as ``frozen``."""
    n = math.prod(shape)
    if frozen == "bf16":
        return rounded(2 * n)
    if frozen == "int8":
        return rounded(n) + rounded(4 * shape[0])  # int8 codes + fp32 row scales (SCB)
    if frozen == "nf4":  # packed codes, uint8 absmax per 64, fp32 absmax per 64·256, offset, nf4 code table
        return rounded(n / 2) + rounded(n / 64) + rounded(4 * math.ceil(n / 64 / 256)) + 2 * ALLOC
    raise ValueError(f"frozen={frozen!r}; choose bf16, int8 or nf4")


def weight_bytes(s: ModelShape, mask: Mask, frozen: str) -> tuple[int, int, int]:
    """(frozen bytes, masked bytes, largest frozen quantized matrix in elements)."""
    masked_modules = {n.rsplit(".", 1)[0] for n in mask}
    frozen_bytes = masked = largest = 0
    for name, shape, kind in _param_tensors(s):
        if name in mask:
            masked += rounded(2 * math.prod(shape))
        elif kind == "linear" and frozen != "bf16" and name.rsplit(".", 1)[0] not in masked_modules:
            frozen_bytes += quantized_bytes(shape, frozen)
            largest = max(largest, math.prod(shape))
        else:
            frozen_bytes += rounded(2 * math.prod(shape))
    rotary = rounded(2 * s.head_dim) * 2  # inv_freq buffers (fp32 [head_dim / 2], and their original)
    return frozen_bytes + rotary, masked, largest


# -------------------------------------------------------------------------------------- optimizer, gradients
def segment_table(mask: Mask, state_bits: int):
    """The SegmentTable MaskedAdamW lays out for ``mask`` (one bf16 bucket)."""
    from mu_fast.optim.segments import DEFAULT_TILE, SegmentTable

    align = 256 if state_bits == 8 else 1
    return SegmentTable([(n, mask.shape(n), mask[n], 0) for n in mask], tile=DEFAULT_TILE, align=align)


def optimizer_bytes(mask: Mask, st: Settings) -> tuple[int, int, int]:
    """(persistent state bytes, step-time temporaries, compact gradient buffer bytes)."""
    numels = [math.prod(mask.shape(n)) for n in mask]
    partial = [math.prod(mask.shape(n)) for n in mask if mask[n].kind != "whole"]
    if st.optimizer in ("auto", "masked"):
        table = segment_table(mask, st.state_bits)
        n = table.state_numel
        if st.state_bits == 8:
            state = 2 * rounded(n) + 2 * rounded(4 * n / 256) + 4 * rounded(4 * 256)
        else:
            state = 2 * rounded(4 * n)
        state += rounded(4 * n) if st.master_weights else 0
        state += rounded(table.tiles.numel() * 8) + rounded(table.index.numel() * 4) + rounded(8 * table.n_tiles)
        slots = len(mask)  # per-slot group, step, has-grad flag and coefficient rows; hyper rows, control, counter
        state += 3 * rounded(8 * slots) + rounded(4 * 16 * slots) + 3 * ALLOC
        return state, 0, rounded(4 * n) if st.compact_grads else 0
    masks = sum(rounded(2 * k) for k in partial)  # the bf16 gradient masks of partially selected parameters
    if st.optimizer == "torch":
        return sum(2 * rounded(2 * k) for k in numels) + masks, sum(rounded(2 * k) for k in numels), 0
    if st.optimizer == "bnb8bit":
        state = sum(2 * rounded(k) + 2 * rounded(4 * math.ceil(k / 256)) if k >= 4096 else 2 * rounded(4 * k)
                    for k in numels)
        return state + masks + 2 * rounded(1024), 0, 0
    raise ValueError(f"optimizer={st.optimizer!r}; choose auto, masked, torch or bnb8bit")


# ------------------------------------------------------------------------------------------------ activations
@dataclass(frozen=True)
class LayerSaved:
    """Bytes one decoder layer saves for backward: its attention half (input norm, attention, Gemma-2's post-attention
    norm) and MLP half (pre-MLP norm, MLP, Gemma-2's post-feedforward norm), with the parts the backward frees early."""

    attn: float
    mlp: float
    post_norm: float  # the post-feedforward norm's input (Gemma-2): freed first
    down_in: float  # the down projection's input: freed with that projection's backward
    probs: float  # eager attention's bf16 probabilities: freed before the softmax backward
    rg_out: bool  # the layer's output requires grad

    @property
    def total(self) -> float:
        return self.attn + self.mlp


def layer_saved(s: ModelShape, trained: frozenset[str], rg_in: bool, rows: int, T: int, int8: bool,
                padded: bool) -> LayerSaved:
    """What one decoder layer saves for backward over ``rows × T`` tokens (the rotary cos/sin, 4 B × head_dim per
    token, are shared by all layers and counted once per pass).

    rg_in: the layer's input requires grad. A matrix's input is saved when the matrix trains (for its weight
    gradient) or, with int8 frozen weights, when its input requires grad (bitsandbytes keeps it). Autograd saves
    what each op's backward needs: a norm its fp32 input (4 B × d); SDPA q, k, v (KV heads expanded when the batch is
    padded), output, fp32 log-sum-exp and the layer's bf16 additive mask; eager attention q, k, v, the fp32
    probabilities, their bf16 copy (and the soft-capping tanh); the MLP its gate and up outputs and the activation.
    """
    n = rows * T
    d, dm, H, hd = s.d, s.d_mlp, s.n_heads, s.head_dim
    kv_saved = H if (padded or s.attn == "eager") else s.n_kv_heads
    norm = n * (4 * d + 4)

    def inp(matrix: str, rg: bool) -> bool:
        return matrix in trained or (int8 and rg)

    attn = norm if rg_in else 0.0
    if any(inp(m, rg_in) for m in ("q", "k", "v")):
        attn += n * 2 * d
    q_rg, k_rg, v_rg = (rg_in or m in trained for m in ("q", "k", "v"))
    core, probs = q_rg or k_rg or v_rg, 0.0
    if s.attn == "sdpa" and core:
        attn += n * (4 * H * hd + 4 * kv_saved * hd + 4 * H) + 2 * rows * T * T
    elif s.attn == "eager":
        scores_rg = q_rg or k_rg
        attn += n * 2 * H * hd * (int(k_rg) + int(q_rg) + int(scores_rg))  # q, k, v copies
        probs = n * H * T * 2 * v_rg
        attn += n * H * T * (4 + 2 * s.softcap) * scores_rg + probs
    if inp("o", core) and not (s.attn == "sdpa" and core):
        attn += n * 2 * H * hd
    attn_rg = core or "o" in trained
    if s.n_norms == 4 and attn_rg:
        attn += norm
    rg_mid = rg_in or attn_rg
    mlp = norm if rg_mid else 0.0
    if inp("gate", rg_mid) or inp("up", rg_mid):
        mlp += n * 2 * d
    gate_rg, up_rg = rg_mid or "gate" in trained, rg_mid or "up" in trained
    mlp += n * 2 * dm * (2 * gate_rg + up_rg)  # gate output (for the activation), up output, activation
    down_in = n * 2 * dm if inp("down", gate_rg or up_rg) else 0.0
    rg_out = rg_mid or gate_rg or up_rg or "down" in trained
    post_norm = norm if s.n_norms == 4 and rg_out else 0.0
    return LayerSaved(attn, mlp + down_in + post_norm, post_norm, down_in, probs, rg_out)


def backward_stage(s: ModelShape, saved: LayerSaved, n: int, T: int, wgrad: int) -> tuple[float, float]:
    """(activation bytes, gradient bytes) alive at the worst moment of one layer's backward, its own saved tensors
    included (n tokens; wgrad: a weight gradient made before it is accumulated / gathered, 0 if none).

    Each moment carries the incoming residual gradient (bf16 [n, d]) and what the layer has not yet freed:
    * Gemma-2's post-feedforward norm, differentiated first: ``NORM_BACKWARD`` fp32 [n, d] temporaries;
    * the down projection: its input gradient (bf16 [n, d_mlp]) and ``wgrad``;
    * the MLP's product: that gradient and the gradients of both factors (3 × bf16 [n, d_mlp]);
    * attention (the MLP half freed): eager, the bf16 and fp32 gradients of the probabilities (2 fp32 [n, H, T]
      with the bf16 probabilities freed); SDPA, the gradients of q, k, v and the output (4 × bf16 [n, H·head_dim]).
    """
    d, dm, H = s.d, s.d_mlp, s.n_heads
    g = 2 * d * n
    mlp_open = saved.total - saved.post_norm
    moments = [(g + saved.total + NORM_BACKWARD * 4 * d * n * (s.n_norms == 4), 0.0),
               (g + mlp_open + 2 * dm * n, float(wgrad)),
               (g + mlp_open - saved.down_in + 6 * dm * n, 0.0)]
    if s.attn == "eager":
        moments.append((g + saved.attn - saved.probs + 8 * H * T * n, 0.0))
    else:
        moments.append((g + saved.attn + 8 * H * s.head_dim * n, 0.0))
    return max(moments, key=sum)


# ------------------------------------------------------------------------------------------------- the passes
@dataclass
class _Pass:
    """One forward+backward of ``rows`` sequences of ``T`` tokens: its peak and the breakdown there."""

    peak: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)
    layer_work: float = 0.0  # the most one layer's backward holds of its own (saved, recomputed, made)
    head_work: float = 0.0  # the LM head's logit tensors at its backward
    saved: float = 0.0  # what the forward leaves for the backward (saved tensors, or checkpointed inputs)

    def see(self, **parts: float) -> None:
        total = sum(parts.values())
        if total > self.peak:
            self.peak, self.parts = total, parts


def _walk(s: ModelShape, layout: MaskLayout, st: Settings, rows: int, T: int, lm: bool, grads_exist: bool,
          dense_grads: dict[int, int], transient: dict[int, int], padded: bool, kept_logits: float = 0.0) -> _Pass:
    """Walk one pass: the head's backward, then each layer's backward from the top down.

    grads_exist: the masked parameters' dense gradients already exist (a later micro-batch or the LM pass); else
    each layer's appear as its backward runs. transient: bytes of the weight gradient a layer's backward makes
    before it is accumulated, gathered or masked.
    """
    n, low, int8 = rows * T, layout.lowest(s.n_layers), st.frozen == "int8"
    saved, rg = {}, False
    if st.grad_checkpointing and CHECKPOINT_FROM_EMBEDDINGS:
        low, rg = 0, True
    for layer in range(low, s.n_layers):
        rg = rg or layer in layout.rg_inputs
        saved[layer] = layer_saved(s, layout.per_layer.get(layer, frozenset()), rg, rows, T, int8, padded)
        rg = saved[layer].rg_out
    top = (4 * s.d + 4) * n if rg else 0  # the final norm
    top += 4 * s.head_dim * n if saved else 0  # rotary cos/sin, one pair per pass
    kept = {j: (2 * s.d * n if st.grad_checkpointing else saved[j].total) for j in saved}
    softcap = 4 * SOFTCAP_LOGIT_COPIES if s.softcap else 0.0
    if lm:  # trunk output [rows, T, d], its detached copy and that copy's gradient [rows·(T-1), d], bf16
        const = 2 * s.d * n + 4 * s.d * rows * (T - 1)
        chunk = min(st.lm_chunk_tokens or lm_chunk_tokens(s.vocab), rows * (T - 1))
        head = chunk * s.vocab * (4 * LM_LOGIT_COPIES + softcap) + kept_logits
        after_head = kept_logits
    else:  # logits at the last token: [rows, V]; the fp32 copy lives until the step deletes it
        const = 0.0
        head = rows * s.vocab * (4 * FACT_LOGIT_COPIES + softcap) + kept_logits
        after_head = 4 * rows * s.vocab + kept_logits
    all_grads = sum(dense_grads.values())
    result = _Pass()
    result.see(activations=sum(kept.values()) + top + const, logits=head, gradients=all_grads if grads_exist else 0)
    result.head_work, result.saved = head, sum(kept.values()) + top + const
    made = 0
    for layer in sorted(saved, reverse=True):
        below = sum(v for j, v in kept.items() if j < layer)
        own = kept[layer] + RECOMPUTE_LEFTOVER * 2 * s.d * n if st.grad_checkpointing else 0
        made += dense_grads.get(layer, 0)
        grads = all_grads if grads_exist else made
        wgrad = transient.get(layer, 0) if (grads_exist or st.compact_grads) else 0
        act, grad = backward_stage(s, saved[layer], n, T, wgrad)
        result.see(activations=below + own + act + const, logits=after_head, gradients=grads + grad)
        result.layer_work = max(result.layer_work, own + act + grad)
    return result


def estimate(s: ModelShape, mask: Mask, st: Settings, batch: BatchShape, workspace: int = WORKSPACE_BYTES,
             cache: dict | None = None) -> Estimate:
    """The peak bytes of one edit step of a model of shape ``s`` with ``mask`` and memory settings ``st``.
    cache: a dict reused across calls for the same model and mask (the weight and optimizer terms)."""
    cache = {} if cache is None else cache
    layout = cache.get("layout") or cache.setdefault("layout", MaskLayout.of(mask))
    key_w, key_o = ("weights", st.frozen), ("optimizer", st.optimizer, st.state_bits, st.master_weights, st.compact_grads)
    frozen, masked, largest_quantized = cache.get(key_w) or cache.setdefault(key_w, weight_bytes(s, mask, st.frozen))
    state, step_temp, compact = cache.get(key_o) or cache.setdefault(key_o, optimizer_bytes(mask, st))
    dense = {}
    transient: dict[int, int] = {}
    for name in mask:
        layer = int(m[1]) if (m := _MATRIX.search(name)) else 0
        size = rounded(2 * math.prod(mask.shape(name)))
        dense[layer] = dense.get(layer, 0) + (0 if st.compact_grads else size)
        copies = 2 if (st.optimizer in ("torch", "bnb8bit") and mask[name].kind != "whole") else 1
        transient[layer] = max(transient.get(layer, 0), copies * size)
    dequant = rounded(2 * largest_quantized)
    micro = min(st.micro_batch or batch.n_facts, batch.n_facts)
    kept_logits = FACT_LOGITS_KEPT * 4 * s.vocab * micro
    passes = {"facts": _walk(s, layout, st, micro, batch.fact_tokens, False, micro < batch.n_facts, dense, transient,
                             batch.padded, kept_logits if micro < batch.n_facts else 0.0)}
    if batch.n_lm:
        lm_rows = min(st.lm_micro_batch or batch.n_lm, batch.n_lm)
        passes["lm"] = _walk(s, layout, st, lm_rows, batch.lm_tokens, True, True, dense, transient, batch.padded,
                             kept_logits)
    slack = allocator_slack(*(max(getattr(p, k) for p in passes.values()) for k in ("layer_work", "head_work", "saved")))
    fixed = dict(frozen_weights=frozen, masked_weights=masked, optimizer_state=state, gradients=compact,
                 workspace=workspace + dequant, allocator=slack)
    phases = {name: _combine(fixed, p.parts) for name, p in passes.items()}
    phases["step"] = _combine(fixed, {"gradients": sum(dense.values()), "optimizer_state": step_temp, "logits": kept_logits})
    phase = max(phases, key=lambda k: phases[k][0])
    return Estimate(phases[phase][1], phases[phase][0], phase, {k: v[0] for k, v in phases.items()})


def _combine(fixed: dict[str, int], parts: dict[str, float]) -> tuple[int, dict[str, int]]:
    out = {k: int(fixed.get(k, 0) + parts.get(k, 0)) for k in CATEGORIES}
    return sum(out.values()), out
