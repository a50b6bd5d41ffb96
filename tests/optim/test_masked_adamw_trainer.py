"""MaskedAdamW in real training loops over a tiny HF model with a mask from the site table: a plain loop with the
edit loop's calls, and transformers' Trainer (optimizers=(opt, scheduler), checkpointing the optimizer)."""

from __future__ import annotations

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model
from mu_fast.optim import MaskedAdamW


def _model_and_mask():
    model = make_tiny_model("llama", num_hidden_layers=2).train()
    table = SiteTable(model)
    mask = Mask.from_components(table, [Component("attn", 0, 1), Component("mlp", 1, 3), Component("mlp", 1, 9),
                                         Component("attn.v", 1)])
    return model, mask


def _check_only_masked_moved(model, before, mask):
    moved = 0
    for name, p in model.named_parameters():
        if name not in mask:
            assert torch.equal(p.detach(), before[name]), f"{name} is not masked but changed"
            continue
        active = mask.dense(name)
        assert torch.equal(p.detach()[~active], before[name][~active]), f"{name}: an inactive element changed"
        moved += int((p.detach()[active] != before[name][active]).sum())
    assert moved > 0.9 * mask.param_count()


@pytest.mark.parametrize("compact_grads", [False, True], ids=["dense_grads", "compact_grads"])
def test_edit_loop_calls(compact_grads, rng):
    model, mask = _model_and_mask()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW(mask.trainable_parameters(model), mask=mask, lr=1e-2, weight_decay=0.0, compact_grads=compact_grads)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4)
    ids = torch.randint(0, model.config.vocab_size, (4, 12), generator=rng)
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        if compact_grads:
            opt.clip_grad_norm_(1.0)
        else:
            torch.nn.utils.clip_grad_norm_([p for _, p in mask.trainable_parameters(model)], 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    _check_only_masked_moved(model, before, mask)


def test_hf_trainer_uses_masked_adamw(tmp_path, rng):
    transformers = pytest.importorskip("transformers")
    model, mask = _model_and_mask()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = MaskedAdamW(mask.trainable_parameters(model), mask=mask, lr=1e-2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=3)
    ids = torch.randint(0, model.config.vocab_size, (8, 10), generator=rng)
    data = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, save_strategy="steps", save_steps=3,
        logging_steps=1, report_to=[], use_cpu=True, max_grad_norm=1.0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, sched))
    trainer.train()
    _check_only_masked_moved(model, before, mask)
    saved = torch.load(next(tmp_path.glob("checkpoint-*")) / "optimizer.pt", weights_only=False)
    fresh = MaskedAdamW(mask.trainable_parameters(model), mask=mask, lr=1e-2)
    fresh.load_state_dict(saved)
    assert bool((fresh._slot_step == 3.0).all())
    for key, value in opt._buckets[0].state_tensors().items():
        assert torch.equal(value, fresh._buckets[0].state_tensors()[key]), key
