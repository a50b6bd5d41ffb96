"""The edit step's memory settings change memory, not the gradient: micro-batches, LM micro-batches, LM-head chunks
and gradient checkpointing give the single pass's gradients (up to float summation order); compact gradients leave
no dense gradient of a partly selected parameter alive after backward."""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import pad_batch
from mu_fast.edit.loop import EditConfig, EditStep, _is_checkpointing, uses_compact_grads
from mu_fast.masks import Mask
from mu_fast.models.forward import lm_loss_backward_tensor
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model


class RecordingOptimizer(torch.optim.Optimizer):
    """Records the dense gradients at ``step()`` instead of updating (the gradient is what is compared)."""

    def __init__(self, params):
        super().__init__(list(params), {"lr": 1.0})
        self.grads: list[list[torch.Tensor | None]] = []

    def step(self, closure=None):
        self.grads.append([None if p.grad is None else p.grad.detach().clone() for g in self.param_groups for p in g["params"]])


def _batches(rng, vocab, n_forget=5, n_maintain=6, n_lm=5):
    lengths = torch.randint(4, 12, (n_forget + n_maintain,), generator=rng).tolist()
    facts = pad_batch([torch.randint(3, vocab, (n,), generator=rng).tolist() for n in lengths], pad_id=0)
    lm_lengths = torch.randint(3, 20, (n_lm,), generator=rng).tolist()
    lm = pad_batch([torch.randint(3, vocab, (n,), generator=rng).tolist() for n in lm_lengths], pad_id=0)
    targets = torch.randint(3, vocab, (n_forget + n_maintain,), generator=rng)
    return facts, lm, targets[:n_forget], targets[n_forget:]


def _gradients(model, mask, config, batches, unlearn=False):
    facts, lm, forget_targets, maintain_labels = batches
    recorder = {}

    def factory(named, mask, config):
        recorder["opt"] = RecordingOptimizer([p for _, p in named])
        return recorder["opt"]

    stepper = EditStep(model, mask, config, optimizer_factory=factory)
    try:
        out = stepper.step(facts, len(forget_targets), forget_targets, maintain_labels, lm, unlearn)
    finally:
        stepper.close()
    return recorder["opt"].grads[0], out


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("unlearn", [False, True])
@pytest.mark.parametrize("setting", [
    dict(micro_batch=3), dict(micro_batch=1), dict(lm_micro_batch=2), dict(lm_chunk_tokens=7),
    dict(grad_checkpointing=True), dict(micro_batch=4, lm_micro_batch=1, lm_chunk_tokens=5, grad_checkpointing=True),
])
def test_memory_settings_give_the_single_pass_gradients(arch, unlearn, setting, rng):
    model = make_tiny_model(arch, num_hidden_layers=3, dtype=torch.float64, initializer_range=0.2)
    mask = Mask.from_components(SiteTable(model), [Component("attn", 1, 2), Component("mlp", 0), Component("mlp", 2, 3)])
    batches = _batches(rng, model.config.vocab_size)
    base = EditConfig(steps=1, forget_coef=1.7, maintain_coef=0.6, lm_coef=0.9)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ref, ref_out = _gradients(model, mask, base, batches, unlearn)
    got, out = _gradients(model, mask, EditConfig(**{**base.__dict__, **setting}), batches, unlearn)
    assert all(g is not None for g in ref)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    for key in ("forget_loss", "maintain_loss", "lm_loss"):
        torch.testing.assert_close(out[key], ref_out[key], rtol=1e-10, atol=1e-12)
    assert not _is_checkpointing(model), "close() must restore checkpointing"
    assert not model.training and flags == {n: p.requires_grad for n, p in model.named_parameters()}, "close() must restore the flags"


def test_lm_loss_matches_full_logits_cross_entropy(rng):
    model = make_tiny_model("llama", dtype=torch.float64, initializer_range=0.2)
    _, lm, _, _ = _batches(rng, model.config.vocab_size)
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(True)
    loss = lm_loss_backward_tensor(model, lm, chunk_tokens=4)
    ours = model.model.layers[0].mlp.up_proj.weight.grad.clone()
    model.zero_grad()
    labels = torch.where(lm.attention_mask.bool(), lm.input_ids, torch.full_like(lm.input_ids, -100))[:, 1:]
    logits = model(input_ids=lm.input_ids, attention_mask=lm.attention_mask, position_ids=lm.position_ids).logits
    assert logits.dtype == torch.float64
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ours, model.model.layers[0].mlp.up_proj.weight.grad, rtol=1e-9, atol=1e-12)


def test_compact_gradients_leave_no_dense_gradient_of_partial_parameters(rng):
    model = make_tiny_model("llama", num_hidden_layers=2)
    mask = Mask.from_components(SiteTable(model), [Component("attn", 1, 2), Component("mlp", 0, 3), Component("mlp", 1)])
    config = EditConfig(steps=2, lr=1e-2)
    assert uses_compact_grads(mask, config)
    facts, lm, forget_targets, maintain_labels = _batches(rng, model.config.vocab_size)
    stepper = EditStep(model, mask, config)
    seen = {}
    original_step = stepper.optimizer.step

    def checking_step(*args, **kwargs):
        seen.update({name: p.grad is not None for name, p in stepper.named})
        return original_step(*args, **kwargs)

    stepper.optimizer.step = checking_step
    try:
        stepper.step(facts, len(forget_targets), forget_targets, maintain_labels, lm)
    finally:
        stepper.close()
    assert seen and not any(seen.values()), f"dense gradients alive at step(): {[n for n, v in seen.items() if v]}"
    assert not uses_compact_grads(Mask.from_components(SiteTable(model), [Component("mlp", 1)]), config)
    assert not uses_compact_grads(mask, EditConfig(optimizer="torch"))


def test_compact_and_dense_gradients_train_the_same_model(rng):
    batches = _batches(rng, 97)
    results = []
    for compact in (False, True):
        model = make_tiny_model("llama", num_hidden_layers=2)
        mask = Mask.from_components(SiteTable(model), [Component("attn", 1, 2), Component("mlp", 0, 3)])
        stepper = EditStep(model, mask, EditConfig(steps=3, lr=1e-2, compact_grads=compact))
        try:
            for _ in range(3):
                stepper.step(batches[0], len(batches[2]), batches[2], batches[3], batches[1])
        finally:
            stepper.close()
        results.append({n: p.detach().clone() for n, p in model.named_parameters()})
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=1e-5, atol=1e-6)


def test_bad_memory_settings_are_clear_errors():
    with pytest.raises(ValueError, match="micro_batch must be a positive integer"):
        EditConfig(micro_batch=0)
    with pytest.raises(ValueError, match="state_bits must be 32 or 8"):
        EditConfig(state_bits=4)
    with pytest.raises(ValueError, match="MaskedAdamW options"):
        EditConfig(optimizer="torch", state_bits=8)


def test_bitsandbytes_adamw8bit_option_trains_only_the_mask(rng):
    pytest.importorskip("bitsandbytes")
    from mu_fast.edit.loop import changed_elements, snapshot

    model = make_tiny_model("llama", num_hidden_layers=2, hidden_size=64, intermediate_size=256, head_dim=16)
    # whole matrices: the authors' recipe (partial selections are refused: block-quantized moments are not exactly 0
    # where the gradient is, so inactive elements would move)
    mask = Mask.from_components(SiteTable(model), [Component("mlp", 0), Component("attn.o", 1)])
    partial = Mask.from_components(SiteTable(model), [Component("attn", 1, 2)])
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="trains whole matrices.*state_bits=8"):
        EditStep(model, partial, EditConfig(optimizer="bnb8bit"))
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}, "a refused edit changed requires_grad"
    facts, lm, forget_targets, maintain_labels = _batches(rng, model.config.vocab_size)
    before = snapshot(model)
    stepper = EditStep(model, mask, EditConfig(steps=3, lr=1e-2, optimizer="bnb8bit"))
    try:
        assert stepper.optimizer_name == "bnb.AdamW8bit"
        for _ in range(3):
            stepper.step(facts, len(forget_targets), forget_targets, maintain_labels, lm)
        state_dtypes = {s["state1"].dtype for s in stepper.optimizer.state.values()}
    finally:
        stepper.close()
    changed = changed_elements(before, model)
    assert changed and set(changed) <= set(mask)
    for name, diff in changed.items():
        assert not (diff & ~mask.dense(name)).any(), f"inactive elements of {name} changed"
    assert torch.uint8 in state_dtypes  # 8-bit moments (bitsandbytes keeps tensors under 4096 elements in fp32)


def test_checkpointing_does_not_run_the_backward_through_frozen_layers_below_the_mask(rng):
    model = make_tiny_model("llama", num_hidden_layers=3)
    mask = Mask.from_components(SiteTable(model), [Component("mlp", 2)])  # only the top layer trains
    seen = []
    handle = model.model.layers[0].register_forward_hook(lambda mod, args, out: seen.append(
        (out[0] if isinstance(out, tuple) else out).requires_grad))
    facts, lm, forget_targets, maintain_labels = _batches(rng, model.config.vocab_size)
    stepper = EditStep(model, mask, EditConfig(steps=1, grad_checkpointing=True))
    try:
        stepper.step(facts, len(forget_targets), forget_targets, maintain_labels, lm)
    finally:
        stepper.close()
        handle.remove()
    assert seen and not any(seen), "layer 0's output required grad: the backward ran through frozen layers"
