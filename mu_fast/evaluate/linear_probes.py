"""Residual-stream features per layer and linear probes trained for all layers at once.

``collect_hidden`` reads the residual stream at one token per prompt (the last prompt token, or the
subject's last token) entering every decoder layer and leaving the last one: ``[L+1, N, d]``, index 0 =
the embeddings as the first layer sees them (Gemma's sqrt(d) scaling included), index l = output of layer
l-1, index L = output of the last layer *before* the final norm. Forward hooks read only the gathered
positions, so no ``[B, T, d]`` activation is kept.

``train_probes`` fits a multinomial logistic regression for every layer jointly: one ``[L, d, C]`` weight,
features standardised per layer, the objective summed over layers (the layers do not interact, so the joint
minimum is every layer's own minimum) and minimised by full-batch L-BFGS. The objective per layer is
``mean CE + weight_decay/2 · ||W||²`` (bias unpenalised), i.e. sklearn's ``LogisticRegression(C)`` with
``weight_decay = 1/(C·N)``; the default, ``1/N``, is sklearn's default ``C=1`` that the paper used.

The latent-knowledge probe built on these, ``latent_probes``, is in ``mu_fast.evaluate.probes`` (the authors' setting
in ``mu_fast.evaluate.probes_paper``); both import this module, which imports neither.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import Batch, TokenizedPrompts, pad_batch
from mu_fast.evaluate.metrics import (
    attached,
    check_token_ids,
    eval_mode,
    length_sorted_batches,
    model_device,
    repeat_batch,
    variant_prompts_per_batch,
)
from mu_fast.models.forward import decoder_of

POSITIONS = ("last", "subject_last")
PADDING_SIDES = ("right", "left")
PROBE_BACKENDS = ("auto", "sklearn", "torch")
PROBE_SOLVERS = ("auto", "newton", "lbfgs")
# Newton's Hessian per layer is ((d+1)·C)² floats: 2048 parameters are 32 MB in fp64 (a 7-9B model's d=4096 with 3-4
# classes is far above, and goes to L-BFGS).
NEWTON_MAX_PARAMS = 2048


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    """The decoder layers of a CausalLM (``model.model.layers`` for every supported architecture)."""
    layers = getattr(decoder_of(model), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no decoder layers at .model.layers; pass a HF *ForCausalLM model")
    return layers


def collect_hidden(
    model: Any, tokenized: TokenizedPrompts, position: str = "last", batch_size: int = 64, padding: str = "right"
) -> torch.Tensor:
    """Residual stream at one token per prompt for every layer boundary: ``[L+1, N, d]`` float32 (float64 for a
    float64 model: a cast to float32 would round kernel-level differences onto either side of a float32 value) on
    the model's device (prompt order). ``position`` is "last" (the last prompt token, which predicts the answer)
    or "subject_last" (the subject's last token; needs subjects in the PromptSet). ``padding``: "right" (position
    ids count real tokens) or "left" with the model's default position ids, as the authors' probe called HF
    (RoPE scores depend on relative positions only, so both agree up to rounding)."""
    return _collect_hidden(model, tokenized, position, batch_size, padding)[0]


def collect_hidden_variants(
    model: Any, tokenized: TokenizedPrompts, deltas: Any, position: str = "last", batch_size: int = 64,
    padding: str = "right",
) -> list[torch.Tensor]:
    """``collect_hidden`` of the model edited by each of the K configurations of ``deltas`` (a
    ``mu_fast.edit.batched.BatchedDeltas`` over ``model``, none applied), in one forward per batch: each batch of
    ``variant_prompts_per_batch(batch_size, K)`` prompts is repeated K times (group-major) inside ``deltas.groups``.
    Returns K ``[L+1, N, d]`` tensors on the model's device; element k equals ``collect_hidden`` under
    ``deltas.variant(k)`` up to float summation order (~1e-16 in fp64)."""
    if deltas.model is not model:
        raise ValueError("deltas were built over another model; pass the model the BatchedDeltas edit")
    return _collect_hidden(model, tokenized, position, batch_size, padding, deltas)


def _collect_hidden(model: Any, tokenized: TokenizedPrompts, position: str, batch_size: int, padding: str,
                    deltas: Any = None) -> list[torch.Tensor]:
    """``collect_hidden`` (``deltas`` None: one ``[L+1, N, d]`` tensor) or ``collect_hidden_variants`` (K of them)."""
    if position not in POSITIONS:
        raise ValueError(f"position must be one of {POSITIONS}; got {position!r}")
    if padding not in PADDING_SIDES:
        raise ValueError(f"padding must be one of {PADDING_SIDES}; got {padding!r}")
    n = len(tokenized)
    if n == 0:
        raise ValueError(f"the prompt set {tokenized.source.name!r} is empty; there is nothing to probe")
    if position == "subject_last" and tokenized.subject_last is None:
        raise ValueError(
            f"position='subject_last' needs subjects, but the prompt set {tokenized.source.name!r} has none; "
            "build the PromptSet with subjects=... or use position='last'"
        )
    check_token_ids(model, tokenized)
    layers = decoder_layers(model)
    device = model_device(model)
    d = int(model.config.hidden_size)
    wide = torch.promote_types(next(model.parameters()).dtype, torch.float32)
    groups = 1 if deltas is None else len(deltas)
    out = torch.empty(groups, len(layers) + 1, n, d, dtype=wide, device=device)
    pad_id = int(getattr(model.config, "pad_token_id", None) or 0)
    current: dict[str, Any] = {}

    def store(index: int, hidden: torch.Tensor) -> None:
        """Every group's rows of ``hidden`` ``[groups·B, T, d]`` at their positions into ``out[:, index]``."""
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        picked = hidden[rows, current["pos"]].to(wide)  # [groups·B, d]
        out[:, index, current["rows"]] = picked.view(groups, -1, picked.shape[-1])

    def read_input(module: Any, args: tuple, kwargs: dict) -> None:
        store(0, args[0] if args else kwargs["hidden_states"])

    def read_output(index: int):
        def hook(module: Any, args: tuple, output: Any) -> None:
            store(index + 1, output[0] if isinstance(output, tuple) else output)

        return hook

    per_batch = batch_size if deltas is None else variant_prompts_per_batch(batch_size, groups)
    delta = None if deltas is None else deltas.values - deltas.base
    handles = [layers[0].register_forward_pre_hook(read_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(read_output(i)) for i, layer in enumerate(layers)]
    try:
        with eval_mode(model), (contextlib.nullcontext() if deltas is None else attached(deltas)):
            for idx in length_sorted_batches([len(s) for s in tokenized.input_ids], per_batch):
                rows = torch.tensor(idx, dtype=torch.int64)
                batch = pad_batch([tokenized.input_ids[i] for i in idx], pad_id, side=padding).to(device)
                if position == "last":
                    pos = batch.last_pos
                else:  # subject indices count real tokens; left padding shifts them by the row's pad count
                    shift = batch.input_ids.shape[1] - batch.attention_mask.sum(1) if padding == "left" else 0
                    pos = tokenized.subject_last[rows].to(device) + shift
                current.update(rows=rows.to(device), pos=pos.repeat(groups) if groups > 1 else pos)
                if deltas is None:
                    _decoder_forward(model, batch, padding)
                    continue
                b = len(idx)
                with deltas.groups([(k, k * b, (k + 1) * b) for k in range(groups)], delta):
                    _decoder_forward(model, repeat_batch(batch, groups), padding)
    finally:
        for handle in handles:
            handle.remove()
    return list(out.unbind(0))


def _decoder_forward(model: Any, batch: Batch, padding: str) -> None:
    decoder_of(model)(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids if padding == "right" else None,
        use_cache=False,
    )


# ------------------------------------------------------------------ probes
@dataclass
class LinearProbes:
    """One multinomial logistic-regression probe per layer.

    weight: ``[L, d, C]``, bias: ``[L, C]`` (on standardised features); mean / scale: ``[L, d]`` per-layer
    standardisation (features are mapped to ``(x - mean) / scale`` before the probe). final_loss: ``[L]``
    training objective per layer at the end.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    scale: torch.Tensor
    final_loss: torch.Tensor

    @property
    def n_layers(self) -> int:
        return int(self.weight.shape[0])

    def _check(self, features: torch.Tensor) -> None:
        L, d = self.weight.shape[0], self.weight.shape[1]
        if features.dim() != 3 or features.shape[0] != L or features.shape[2] != d:
            raise ValueError(
                f"features must be [L={L}, M, d={d}] like the training features; got {tuple(features.shape)}"
            )

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits ``[L, M, C]`` of features ``[L, M, d]``."""
        self._check(features)
        x = (features.to(self.weight) - self.mean[:, None]) / self.scale[:, None]
        return torch.baddbmm(self.bias[:, None], x, self.weight)

    def predict_proba(self, features: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[L, M, C]``."""
        return torch.softmax(self.logits(features), dim=-1)

    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted class per layer and example: ``[L, M]`` int64."""
        return self.logits(features).argmax(dim=-1)

    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Fraction of ``labels [M]`` predicted per layer: ``[L]`` float32. Labels outside ``[0, C)`` (e.g.
        -1 for a class the probes never saw) count as wrong."""
        if labels.dim() != 1 or labels.shape[0] != features.shape[1]:
            raise ValueError(f"labels must be [M={features.shape[1]}]; got {tuple(labels.shape)}")
        hits = self.predict(features) == labels.to(self.weight.device)[None]
        return hits.float().mean(dim=1)


def train_probes(
    features: torch.Tensor,
    labels: torch.Tensor,
    n_classes: int,
    weight_decay: float | None = None,
    steps: int = 200,
    lr: float = 1.0,
    tolerance: float = 1e-5,
    dtype: torch.dtype = torch.float64,
    standardize: bool = True,
    solver: str = "auto",
) -> LinearProbes:
    """Fit one multinomial logistic regression per layer, all layers in one batched problem.

    features: ``[L, N, d]`` (any float dtype/device; computed in ``dtype`` on that device). labels: ``[N]``
    int64 in ``[0, n_classes)``. weight_decay: L2 coefficient λ of ``mean CE + λ/2 ||W||²`` (default 1/N,
    sklearn's C=1). steps: L-BFGS iterations (each evaluates the objective about once or twice); lr: the
    L-BFGS step scale (1 with the strong-Wolfe line search); tolerance: stop when the largest gradient
    entry of the summed objective falls below it (measured on L=5, N=1000, d=128, CPU: 1e-7 took 9x longer
    than 1e-5 for the same predictions and probabilities within 5e-4). dtype: fp64 by default: each
    evaluation is one ``[L, N, d] x [L, d, C]`` product, and in fp32 the line search stalls once objective
    changes drop below fp32 resolution (measured: class probabilities ~2e-4 from the optimum). standardize: False
    fits the raw features (mean 0, scale 1 in the result), sklearn's setting and the paper's.

    solver: "newton" solves to the optimum (damped Newton, exact Hessian per layer, see ``_newton``); "lbfgs" runs
    L-BFGS as described above; "auto" takes Newton when each layer's ``(d+1)·C`` parameters are at most
    ``NEWTON_MAX_PARAMS`` and L-BFGS otherwise. Why Newton: the objective is strictly convex, so its minimum is one
    point, but L-BFGS stops at ``steps`` or ``tolerance`` far from it on nearly separable features (measured on the
    demo organism, 428 x 64 features, 4 classes: after 200 or 1000 iterations a 1e-15 relative change of the
    features moved the weights by 3e-2 to 1.8), so which side of the boundary a prediction falls depended on the
    CPU's kernels. Newton reaches the minimum to round-off, so predictions change only with the features.

    Each evaluation reads all features twice (forward and backward), so on CPU the solve is memory-bound
    and was not faster than a per-layer sklearn loop (2-core CPU, see the evaluate report); the batched
    form exists for GPUs, where all layers go in one sequence of launches.
    """
    if features.dim() != 3:
        raise ValueError(f"features must be [L, N, d]; got shape {tuple(features.shape)}")
    L, N, d = features.shape
    if N == 0:
        raise ValueError("features hold no examples (N=0); there is nothing to train a probe on")
    if labels.dim() != 1 or labels.shape[0] != N:
        raise ValueError(f"labels must be [N={N}] to match features {tuple(features.shape)}; got {tuple(labels.shape)}")
    if n_classes < 2:
        raise ValueError(f"n_classes must be >= 2; got {n_classes}")
    if labels.dtype not in (torch.int64, torch.int32) or int(labels.min()) < 0 or int(labels.max()) >= n_classes:
        raise ValueError(
            f"labels must be integers in [0, {n_classes}); got dtype {labels.dtype}, range "
            f"[{int(labels.min())}, {int(labels.max())}]"
        )
    lam = 1.0 / N if weight_decay is None else float(weight_decay)
    if lam < 0:
        raise ValueError(f"weight_decay must be >= 0; got {weight_decay}")
    x = features.to(dtype)
    mean = x.mean(dim=1)  # [L, d]
    std = x.std(dim=1, unbiased=False)
    # Constant features (e.g. the embedding of a token shared by every prompt) carry no signal; scale 1
    # keeps them at 0 instead of dividing by zero.
    scale = torch.where(std > 1e-6 * (1 + mean.abs()), std, torch.ones_like(std))
    if not standardize:
        mean, scale = torch.zeros_like(mean), torch.ones_like(scale)
    x = (x - mean[:, None]) / scale[:, None]
    y = labels.to(device=x.device, dtype=torch.int64)
    weight = torch.zeros(L, d, n_classes, dtype=dtype, device=x.device, requires_grad=True)
    bias = torch.zeros(L, n_classes, dtype=dtype, device=x.device, requires_grad=True)

    def per_layer_loss() -> torch.Tensor:
        logits = torch.baddbmm(bias[:, None], x, weight)  # [L, N, C]
        ce = F.cross_entropy(logits.reshape(L * N, n_classes), y.repeat(L), reduction="none").view(L, N).mean(1)
        return ce + 0.5 * lam * weight.square().sum(dim=(1, 2))

    if solver not in PROBE_SOLVERS:
        raise ValueError(f"solver must be one of {PROBE_SOLVERS}; got {solver!r}")
    if solver == "newton" or (solver == "auto" and (d + 1) * n_classes <= NEWTON_MAX_PARAMS):
        with torch.no_grad():
            # A class without training examples has its minimum at bias -inf: solve over the present classes and
            # give the absent ones -inf, so they are never predicted and have probability 0.
            present = torch.bincount(y, minlength=n_classes) > 0
            remap = torch.cumsum(present, 0) - 1
            w_in, b_in = _newton(x, remap[y], int(present.sum()), lam, max_iter=max(steps, 1))
            weight = torch.zeros(L, d, n_classes, dtype=dtype, device=x.device)
            bias = torch.full((L, n_classes), float("-inf"), dtype=dtype, device=x.device)
            weight[:, :, present], bias[:, present] = w_in, b_in
        with torch.no_grad():
            final = _objective(x, y, n_classes, lam, weight, bias)
        return LinearProbes(weight, bias, mean, scale, final)

    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=lr,
        max_iter=steps,
        history_size=20,
        tolerance_grad=tolerance,
        tolerance_change=torch.finfo(dtype).eps,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = per_layer_loss().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        final = per_layer_loss()
    return LinearProbes(weight.detach(), bias.detach(), mean, scale, final)


def _objective(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float, weight: torch.Tensor,
               bias: torch.Tensor) -> torch.Tensor:
    """Per-layer ``mean CE + lam/2 ||W||²``: ``[L]``."""
    L, N, _ = x.shape
    logits = torch.baddbmm(bias[:, None], x, weight)
    ce = F.cross_entropy(logits.reshape(L * N, n_classes), y.repeat(L), reduction="none").view(L, N).mean(1)
    return ce + 0.5 * lam * weight.square().sum(dim=(1, 2))


def _newton(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float,
            max_iter: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise every layer's ``mean CE + lam/2 ||W||²`` by damped Newton: ``(weight [L, d, C], bias [L, C])``.

    Parameters per layer: ``theta [(d+1), C]`` (the bias is the last row). Gradient ``Zᵀ(P - Y)/N + lam·W``;
    Hessian ``(1/N) Σ_n (diag(p_n) - p_n p_nᵀ) ⊗ z_n z_nᵀ + lam·I`` on the weight rows. Adding a constant to every
    class's bias changes nothing (softmax), so the Hessian is singular along that one direction u (the gradient has no
    component in it); adding ``s·u uᵀ`` (s: the mean diagonal) gives u the eigenvalue s and leaves every other
    eigenpair as it was, so the solve is well conditioned and the step unchanged. (A tiny ridge instead was measured
    to leave 3e-5 of round-off in the biases.)

    Far from the minimum each step is halved until the Armijo condition holds (per layer). The Newton step is the
    distance to the minimum once there, so a layer whose largest step entry is below 1e-6 of its parameters' scale
    takes full steps (quadratic convergence; the objective no longer changes measurably, so Armijo cannot judge), and
    it is done when that entry falls below 1e-13 of the scale or stops shrinking (round-off), or after ``max_iter``
    steps. Where it stops is the minimum to round-off, whichever side of a threshold the last step fell.
    """
    L, N, d = x.shape
    C, P = n_classes, (d + 1) * n_classes
    dtype, device = x.dtype, x.device
    z = torch.cat([x, torch.ones(L, N, 1, dtype=dtype, device=device)], dim=2)  # [L, N, d+1]
    target = F.one_hot(y, C).to(dtype)  # [N, C]
    theta = torch.zeros(L, d + 1, C, dtype=dtype, device=device)
    rows = torch.full((d + 1, 1), lam, dtype=dtype, device=device)
    rows[d] = 0.0  # the bias is not penalised
    reg_diag = rows.expand(d + 1, C).reshape(P)

    def objective(t: torch.Tensor) -> torch.Tensor:
        return _objective(x, y, C, lam, t[:, :d], t[:, d])

    value = objective(theta)
    active = torch.ones(L, dtype=torch.bool, device=device)
    previous = torch.full((L,), float("inf"), dtype=dtype, device=device)
    for _ in range(max_iter):
        p = torch.softmax(torch.bmm(z, theta), dim=2)  # [L, N, C]
        g = torch.bmm(z.transpose(1, 2), p - target) / N + rows * theta
        zp = (z[..., :, None] * p[..., None, :]).reshape(L, N, P)  # [L, N, (d+1)·C]
        hess = -torch.bmm(zp.transpose(1, 2), zp) / N
        block = torch.einsum("lni,lnj,lna->liaj", z, z, p) / N  # [L, d+1, C, d+1]: the diag(p) part, a = b
        hess.view(L, d + 1, C, d + 1, C).add_(torch.diag_embed(block.permute(0, 1, 3, 2)).permute(0, 1, 3, 2, 4))
        scale = hess.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(torch.finfo(dtype).tiny)  # [L]
        hess += torch.diag_embed(reg_diag)
        hess[:, d * C:, d * C:] += scale[:, None, None] / C  # the gauge u = 1/√C on the bias: H u = 0 -> scale·u
        chol, info = torch.linalg.cholesky_ex(hess)
        flat_g = g.reshape(L, P, 1)
        if bool((info != 0).any()):  # numerically indefinite: a least-squares step still descends
            step = -torch.linalg.lstsq(hess, flat_g).solution
        else:
            step = -torch.cholesky_solve(flat_g, chol)
        step = step.view(L, d + 1, C) * active[:, None, None]
        size = step.abs().amax(dim=(1, 2))
        magnitude = 1.0 + theta.abs().amax(dim=(1, 2))
        near = size <= 1e-6 * magnitude  # at the minimum's doorstep: full steps
        slope = (g * step).sum(dim=(1, 2))  # [L], <= 0
        t = torch.ones(L, dtype=dtype, device=device)
        for _ in range(60):
            trial = objective(theta + t[:, None, None] * step)
            ok = near | ~active | (trial <= value + 1e-4 * t * slope)
            if bool(ok.all()):
                break
            t = torch.where(ok, t, 0.5 * t)
        theta = theta + t[:, None, None] * step
        value = objective(theta)
        done = (size <= 1e-13 * magnitude) | (near & (size > 0.5 * previous))
        previous = torch.where(active, size, previous)
        active &= ~done
        if not bool(active.any()):
            break
    return theta[:, :d].contiguous(), theta[:, d].contiguous()


def stratified_split(
    labels: torch.Tensor, test_fraction: float = 0.2, seed: int = 42
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded stratified split of indices ``0..N-1``: ``(train_idx, test_idx)`` int64, each class split
    ``round(test_fraction · n_class)`` to test (at least one example of a class stays in train)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1); got {test_fraction}")
    gen = torch.Generator().manual_seed(seed)
    train, test = [], []
    for cls in torch.unique(labels.cpu()).tolist():
        members = torch.nonzero(labels.cpu() == cls).flatten()
        members = members[torch.randperm(members.numel(), generator=gen)]
        k = min(int(round(test_fraction * members.numel())), members.numel() - 1)
        test.append(members[:k])
        train.append(members[k:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values
