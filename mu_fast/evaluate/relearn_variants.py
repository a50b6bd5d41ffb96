"""The relearning attack on K edited variants at once: K LoRA adapters trained together over one frozen model.

``relearn_attack_variants(model, tokenizer, task, deltas, seeds, **settings)`` returns, per configuration k of a
``mu_fast.edit.batched.BatchedDeltas``, what ``relearn_attack(model, tokenizer, task, seed=seeds[k], **settings)``
returns with ``deltas.variant(k)`` applied, without writing any variant into the model (multi-LoRA style):

* every linear layer LoRA adapts (peft's ``"all-linear"``) gets K adapter pairs ``(A_k, B_k)``, run as a forward hook
  that adds, to group k's rows only, ``B_k(A_k(dropout_k(x_k))) · scale`` (peft's order of operations); the variants'
  deltas are added per group by ``BatchedDeltas.groups``;
* the initial ``A_k, B_k`` are peft's own: for each seed, ``get_peft_model`` runs under ``fork_rng`` +
  ``manual_seed(seed)`` as in ``relearn_attack``, its adapter weights are copied out and the model unloaded;
* dropout: the single run draws ``torch.rand(x.shape)`` from the global generator in each adapted module's forward
  (``PortableDropout``), continuing the stream ``get_peft_model`` left. Group k's masks come from a generator set to
  that state, drawn in the same module order with the single run's shape (its rows, its own padded length);
* per step every group draws its relearn / maintain / LM examples from its own seeded generator, exactly as the
  single run; one forward for all groups' relearn+maintain rows, one for all groups' LM texts, each group's losses
  averaged over its own rows / targets, one backward of their sum (groups never mix), then K ``torch.optim.AdamW``
  with K ``CosineAnnealingLR`` (the single run's optimizer, per configuration);
* evaluations at ``eval_at`` score every variant in one pass per set (``prompt_scores_variants``).

Equality: to float summation order (``x·W0 + x·D`` instead of ``x·(W0 + D)``, and a common padded length; ~1e-12
in fp64 after 20 steps), argmax fields aside from exact ties. Settings whose random draws cannot be matched run
``relearn_attack`` per variant instead (same results, no speed-up): ``score_in_train_mode=True`` (the authors'
scoring dropout), a base model with active dropout of its own (its draws interleave with the adapters'), and adapted
layers that are not plain ``nn.Linear`` (quantized models).

Speed (``benchmarks/bench_relearn_variants.py``: the CI organism, K=8 sweep variants, the organism's settings of 20
steps at rank 16, AMD EPYC, 1 thread, 5 interleaved pairs, CPU time): K single attacks 20.0 s, batched 19.8 s, a
median per-pair ratio of 0.98x, i.e. no gain on this CPU (the step is GEMM- and dropout-draw-bound; the batch pads
the K groups to one length and adds the K deltas). ``ModelSession.execute_batch`` therefore batches it on CUDA only
(one launch sequence for K groups, where it is meant to pay); the GPU measurement is owed (benchmarks/GPU_OWED.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mu_fast.data.base import FactTask, pad_batch
from mu_fast.evaluate.metrics import attached, model_device, prompt_scores_variants, set_accuracy
from mu_fast.evaluate.relearn import _Cycle, effective_lora_rank, relearn_attack, relearn_inputs, relearn_result
from mu_fast.models.forward import gathered_logits, head_logits, lm_chunk_tokens, lm_targets, trunk_hidden

if TYPE_CHECKING:
    from mu_fast.edit.batched import BatchedDeltas


def _fork_devices(device: torch.device) -> list[int]:
    if device.type != "cuda":
        return []
    return [device.index if device.index is not None else torch.cuda.current_device()]


def _rng_state(device: torch.device) -> torch.Tensor:
    """The global generator's state that ``torch.rand(..., device=device)`` draws from."""
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def peft_initial_adapters(model: Any, rank: int, lora_alpha: float, lora_dropout: float, seed: int
                          ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], float, torch.Tensor]:
    """peft's initial LoRA weights for ``seed``, as ``relearn_attack`` creates them, and the RNG state after.

    Returns ``({module name: (A [r, in], B [out, r])}, scale, state)``: ``state`` is the global generator's state
    (the model's device) right after ``get_peft_model``, where the single run's dropout draws continue. The model is
    unloaded again and its ``requires_grad`` flags restored; the caller's global RNG is untouched (``fork_rng``).
    """
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    device = model_device(model)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=_fork_devices(device)):
        torch.manual_seed(seed)
        config = LoraConfig(r=rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules="all-linear")
        peft_model = get_peft_model(model, config)
        try:
            state = _rng_state(device).clone()
            weights, scales = {}, set()
            for name, module in model.named_modules():
                if isinstance(module, LoraLayer):
                    weights[name] = (module.lora_A["default"].weight.detach().clone(),
                                     module.lora_B["default"].weight.detach().clone())
                    scales.add(float(module.scaling["default"]))
        finally:
            restored = peft_model.unload()
            assert restored is model
            for name, p in model.named_parameters():
                p.requires_grad_(requires_grad[name])
    if len(scales) != 1:
        raise ValueError(f"peft gave the adapters several scales ({sorted(scales)}); expected alpha / rank for all")
    return weights, scales.pop(), state


class MultiLora:
    """K LoRA adapters over one model's linear layers, as forward hooks reading the groups of a ``BatchedDeltas``.

    weights[k]: ``{module name: (A, B)}`` of configuration k (trainable leaf tensors); states[k]: the generator state
    its dropout masks are drawn from. Inside ``dropping(lengths)`` every adapted module drops group i's input with
    probability ``p`` (``torch.rand`` of shape ``[rows_i, lengths[i], ...]``, the rest of a longer padded batch kept);
    otherwise the adapters run without dropout. ``remove()`` takes the hooks off.
    """

    def __init__(self, model: Any, deltas: BatchedDeltas,
                 weights: Sequence[dict[str, tuple[torch.Tensor, torch.Tensor]]], scale: float, p: float, states: Sequence[torch.Tensor]):
        self.deltas, self.weights, self.scale, self.p = deltas, list(weights), scale, float(p)
        device = model_device(model)
        self.generators = []
        for state in states:
            gen = torch.Generator(device=device)
            gen.set_state(state)
            self.generators.append(gen)
        self.lengths: list[int] | None = None
        modules = dict(model.named_modules())
        self.handles = [modules[name].register_forward_hook(self._hook(name)) for name in self.weights[0]]

    def parameters(self, k: int) -> list[torch.Tensor]:
        """Configuration k's trainable tensors (A, B per module, in model order)."""
        return [t for pair in self.weights[k].values() for t in pair]

    @contextlib.contextmanager
    def dropping(self, lengths: Sequence[int]) -> Iterator[None]:
        """Dropout on inside; ``lengths[i]``: the padded length of group i's batch in its single run."""
        self.lengths = list(lengths)
        try:
            yield
        finally:
            self.lengths = None

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, name: str) -> Any:
        def hook(module: torch.nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            segments = self.deltas._segments  # the groups of the batched forward now running
            if segments is None:
                raise RuntimeError(f"{name}: the K adapters run only inside BatchedDeltas.groups (row blocks)")
            pairs = [self.weights[k][name] for k, _, _ in segments]
            x = inputs[0].to(pairs[0][0].dtype)
            sizes = [hi - lo for _, lo, hi in segments]
            if self.lengths is not None and self.p > 0.0:
                if x.dim() < 3:
                    raise ValueError(f"{name}: LoRA dropout per group needs [rows, tokens, ...] inputs; got {x.shape}")
                keep = []
                for (k, _, _), rows, length in zip(segments, sizes, self.lengths, strict=True):
                    drawn = torch.rand((rows, length, *x.shape[2:]), generator=self.generators[k], dtype=x.dtype,
                                       device=x.device) >= self.p  # the single run's torch.rand(x.shape)
                    keep.append(drawn if length == x.shape[1] else torch.cat(
                        [drawn, drawn.new_ones((rows, x.shape[1] - length, *x.shape[2:]))], 1))
                x = x * torch.cat(keep, 0) / (1.0 - self.p)
            if len(set(sizes)) == 1:  # equal groups (every forward here): one batched GEMM per factor
                xs = x.reshape(len(sizes), -1, x.shape[-1])
                a = torch.stack([pair[0] for pair in pairs])  # [K, r, in]
                b = torch.stack([pair[1] for pair in pairs])  # [K, out, r]
                lora = torch.bmm(torch.bmm(xs, a.transpose(1, 2)), b.transpose(1, 2)).reshape(*output.shape)
            else:
                lora = torch.cat([F.linear(F.linear(xk, a), b)
                                  for xk, (a, b) in zip(x.split(sizes), pairs, strict=True)])
            return (output + lora * self.scale).to(output.dtype)

        return hook


def _matchable(model: Any, names: Sequence[str]) -> bool:
    """Whether the batched attack reproduces the single runs' random draws and layers (module docstring)."""
    modules = dict(model.named_modules())
    if any(type(modules[n]) is not torch.nn.Linear for n in names):  # noqa: E721 (quantized subclasses)
        return False
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules()):
        return False
    config = getattr(model, "config", None)
    return not any(float(getattr(config, key, 0.0) or 0.0) > 0 for key in
                   ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout"))


def _lm_losses_backward(model: Any, batch: Any, segments: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
    """Per group the mean next-token CE over its own targets (``lm_loss_backward`` per group, chunked the same way),
    backpropagated as one sum; returns the K detached losses. The forward must run inside the groups' context."""
    hidden = trunk_hidden(model, batch)
    targets = lm_targets(batch, hidden.device)  # [B, T-1]
    h = hidden[:, :-1]
    leaf = h.detach().requires_grad_(True)
    chunk = lm_chunk_tokens(model.get_output_embeddings().weight.shape[0])
    losses = []
    for _, lo, hi in segments:
        rows, want = leaf[lo:hi].reshape(-1, leaf.shape[-1]), targets[lo:hi].reshape(-1)
        denominator = (want != -100).sum().clamp(min=1)
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
        for start in range(0, rows.shape[0], chunk):
            part = slice(start, start + chunk)
            logits = head_logits(model, rows[part])
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = F.cross_entropy(logits, want[part], reduction="sum", ignore_index=-100) / denominator
            loss.backward()
            total = total + loss.detach()
        losses.append(total)
    if h.requires_grad:
        h.backward(leaf.grad)
    return losses


def relearn_attack_variants(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    deltas: BatchedDeltas,
    seeds: Sequence[int],
    steps: int = 20,
    lr: float = 2e-4,
    lora_rank: int = 512,
    lora_alpha: float = 32,
    lora_dropout: float = 0.05,
    batch_size: int = 32,
    cf_target_false_bug: bool = False,
    eval_at: tuple[int, ...] = (0, 10, 20),
    progress: bool = False,
    lm_batch_size: int = 16,
    lm_max_tokens: int = 128,
    eval_batch_size: int = 64,
    mcq_system_prompt: bool = False,
    score_in_train_mode: bool = False,
) -> list[dict[str, Any]]:
    """``relearn_attack`` of each of ``deltas``' K configurations (seed ``seeds[k]``), trained together.

    Returns K result dicts; element k equals ``relearn_attack(model, tokenizer, task, seed=seeds[k], ...)`` under
    ``deltas.variant(k)`` to float tolerance (module docstring), every loss and evaluation included. The settings
    are ``relearn_attack``'s. ``model`` is left as it was: parameters, ``requires_grad`` flags, train/eval mode,
    forwards, and the global RNG. Settings the batched form cannot match run per variant (module docstring).
    """
    if deltas.model is not model:
        raise ValueError("deltas were built over another model; pass the model the BatchedDeltas edit")
    if len(seeds) != len(deltas):
        raise ValueError(f"got {len(seeds)} seeds for {len(deltas)} configurations; pass one seed per configuration")
    settings = dict(steps=steps, lr=lr, lora_rank=lora_rank, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                    batch_size=batch_size, cf_target_false_bug=cf_target_false_bug, eval_at=eval_at,
                    progress=progress, lm_batch_size=lm_batch_size, lm_max_tokens=lm_max_tokens,
                    eval_batch_size=eval_batch_size, mcq_system_prompt=mcq_system_prompt,
                    score_in_train_mode=score_in_train_mode)
    if steps < 0:
        raise ValueError(f"steps must be >= 0; got {steps}")
    bad = [s for s in eval_at if not 0 <= s <= steps]
    if bad:
        raise ValueError(f"eval_at steps {bad} are outside 0..steps={steps}")
    inputs = relearn_inputs(model, tokenizer, task, cf_target_false_bug, mcq_system_prompt, lm_max_tokens)
    rank = effective_lora_rank(model, lora_rank)
    inits = {} if score_in_train_mode else {
        seed: peft_initial_adapters(model, rank, lora_alpha, lora_dropout, seed) for seed in dict.fromkeys(seeds)}
    if score_in_train_mode or not _matchable(model, list(inits[seeds[0]][0])):
        out = []
        for k, seed in enumerate(seeds):
            with deltas.variant(k):
                out.append(relearn_attack(model, tokenizer, task, seed=seed, **settings))
        return out

    k_count, device = len(deltas), model_device(model)
    was_training = bool(model.training)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    weights = [{n: tuple(t.clone().requires_grad_(True) for t in pair) for n, pair in inits[s][0].items()}
               for s in seeds]
    adapters = MultiLora(model, deltas, weights, inits[seeds[0]][1], lora_dropout, [inits[s][2] for s in seeds])
    evals: list[dict[int, dict[str, Any]]] = [{} for _ in range(k_count)]
    losses: list[list[dict[str, float]]] = [[] for _ in range(k_count)]
    delta = deltas.values - deltas.base

    def evaluate(step: int) -> None:
        for k in range(k_count):
            evals[k][step] = {}
        for what, tokenized in inputs.eval_tok.items():
            for k, scores in enumerate(prompt_scores_variants(model, tokenized, deltas, batch_size=eval_batch_size)):
                evals[k][step][what] = set_accuracy(scores)

    def group_batch(seqs: list[list[list[int]]]) -> tuple[Any, list[tuple[int, int, int]], list[int]]:
        rows = [s for group in seqs for s in group]
        bounds = torch.tensor([0] + [len(g) for g in seqs]).cumsum(0).tolist()
        segments = [(k, bounds[k], bounds[k + 1]) for k in range(k_count)]
        return pad_batch(rows, inputs.pad_id, side="right").to(device), segments, [max(map(len, g)) for g in seqs]

    try:
        for p in model.parameters():
            p.requires_grad_(False)
        optimizers = [torch.optim.AdamW(adapters.parameters(k), lr=lr, weight_decay=0.0) for k in range(k_count)]
        schedules = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=max(steps, 1)) for o in optimizers]
        gens = [torch.Generator().manual_seed(seed) for seed in seeds]
        draws = [(_Cycle(len(inputs.relearn_tok), g), _Cycle(len(inputs.maintain_tok), g)) for g in gens]
        lm_draws = [_Cycle(len(inputs.lm_ids), g) for g in gens] if inputs.lm_ids else None
        bar = range(1, steps + 1)
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(bar, desc=f"relearn x{k_count}", leave=False)
        with attached(deltas), torch.random.fork_rng(devices=_fork_devices(device)):
            if 0 in eval_at:
                evaluate(0)
            for step in bar:
                model.train()
                for optimizer in optimizers:
                    optimizer.zero_grad(set_to_none=True)
                picks = [(r.take(batch_size), m.take(batch_size)) for r, m in draws]
                batch, segments, lengths = group_batch(
                    [[inputs.relearn_tok.input_ids[i] for i in r] + [inputs.maintain_tok.input_ids[i] for i in m]
                     for r, m in picks])
                targets = torch.cat([torch.cat([inputs.relearn_labels[r], inputs.maintain_labels[m]])
                                     for r, m in picks])
                with deltas.groups(segments, delta), adapters.dropping(lengths):
                    ce = F.cross_entropy(gathered_logits(model, batch), targets.to(device), reduction="none")
                step_losses = []
                for (_, lo, hi), (r, _) in zip(segments, picks, strict=True):
                    step_losses.append((ce[lo:lo + len(r)].mean(), ce[lo + len(r):hi].mean()))
                torch.stack([a + b for a, b in step_losses]).sum().backward()
                lm = [float("nan")] * k_count
                if lm_draws is not None:
                    batch, segments, lengths = group_batch(
                        [[inputs.lm_ids[i] for i in d.take(lm_batch_size)] for d in lm_draws])
                    with deltas.groups(segments, delta), adapters.dropping(lengths):
                        lm = [float(v) for v in _lm_losses_backward(model, batch, segments)]
                for optimizer, schedule in zip(optimizers, schedules, strict=True):
                    optimizer.step()
                    schedule.step()
                for k, (relearn_loss, maintain_loss) in enumerate(step_losses):
                    losses[k].append({"relearn": float(relearn_loss.detach()),
                                      "maintain": float(maintain_loss.detach()), "lm": lm[k]})
                if step in eval_at:
                    evaluate(step)
    finally:
        adapters.remove()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
    run_settings = {"steps": steps, "lr": lr, "lora_rank": lora_rank, "lora_alpha": lora_alpha,
                    "cf_target_false_bug": cf_target_false_bug, "score_in_train_mode": score_in_train_mode,
                    "lm_batch_size": lm_batch_size}
    return [relearn_result(inputs, run_settings, rank, evals[k], losses[k]) for k in range(k_count)]
