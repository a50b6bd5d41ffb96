"""edit_batched: K configurations trained together equal their K single ``edit`` runs.

Reference: ``edit`` on a deep copy of the same fp64 model per configuration (``optimizer="torch"``, or
``optimizer="masked"`` where a partial mask has weight decay, which torch AdamW refuses). Tolerance: loss history,
gradient norms and final edited weights agree to 1e-9 (relative for losses, absolute for weights) in fp64; the
differences come only from float summation order (a batch padded to a longer length, x·W0 + x·D instead of
x·(W0 + D)); measured at most ~5e-16 on these models. Inactive elements and the base weights are compared bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch

from mu_fast.edit.batched import BatchedDeltas, adamw_update_, cosine_lrs, edit_batched
from mu_fast.edit.loop import EditConfig, edit
from mu_fast.masks import Mask
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model
from tests._tiny_task import structured_masks, tiny_task, word_tokenizer

TOL = 1e-9


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: a second thread only contends (measured: 3.8 s → 0.23 s for one comparison on a shared 2-core CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer():
    return word_tokenizer()


def _model(tokenizer, arch="llama", seed=None, layers=3):
    seed = int(torch.randint(0, 2**31 - 1, ())) if seed is None else seed  # fresh weights each run
    model = make_tiny_model(arch, seed=seed, vocab_size=len(tokenizer), num_hidden_layers=layers, dtype=torch.float64,
                            initializer_range=0.2)
    model.test_seed = seed  # named in _compare's failures, to reproduce them
    return model


def _bits(t):
    return t.detach().view(torch.int64) if t.dtype == torch.float64 else t.detach().view(torch.int32)


def _masks(model, structure):
    return structured_masks(model, structure, torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()))))


CONFIGS = [dict(steps=4, lr=2e-2, seed=1, maintain_batch=5, lm_batch=3),
           dict(steps=3, lr=5e-2, seed=7, forget_coef=2.0, maintain_coef=0.5, maintain_batch=8, lm_batch=2, grad_clip=0.3),
           dict(steps=5, lr=1e-2, seed=3, lm_coef=0.0, maintain_batch=3, betas=(0.8, 0.99), eps=1e-6)]


def _compare(model, tokenizer, task, masks, configs, eval_fn=None, norm_tol=TOL, groups_per_pass=None):
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    seed = getattr(model, "test_seed", None)
    out = edit_batched(model, tokenizer, task, masks, configs, eval_fn=eval_fn, groups_per_pass=groups_per_pass)
    for name, p in model.named_parameters():  # the frozen base is never written
        assert torch.equal(_bits(p), _bits(before[name])), f"edit_batched changed the base weight {name}"
    for k, (mask, config) in enumerate(zip(masks, configs, strict=True)):
        ref_model = copy.deepcopy(model)
        ref = edit(ref_model, tokenizer, task, mask, config, progress=False, eval_fn=eval_fn)
        got = out[k]
        assert len(got.history) == len(ref.history) == config.steps
        assert got.trainable_elements == ref.trainable_elements
        for a, b in zip(ref.history, got.history, strict=True):
            assert a.keys() == b.keys()
            for key in a:
                tol = norm_tol if key == "grad_norm" else TOL
                assert abs(a[key] - b[key]) <= tol * max(1.0, abs(a[key])), (seed, k, a["step"], key, a[key], b[key])
        edited = out.deltas.edited(k)
        assert set(edited) == set(mask)
        for name, p in ref_model.named_parameters():
            if name not in mask:
                continue
            diff = (edited[name] - p.detach()).abs().max()
            assert diff <= TOL, (seed, k, name, float(diff))
            inactive = ~mask.dense(name)
            assert torch.equal(_bits(edited[name])[inactive], _bits(before[name])[inactive]), f"inactive {name} moved"
            assert not torch.equal(edited[name], before[name]), f"configuration {k} did not train {name}"
        if eval_fn is not None:
            assert [e["step"] for e in got.evals] == [e["step"] for e in ref.evals]
            for a, b in zip(ref.evals, got.evals, strict=True):
                assert abs(a["value"] - b["value"]) <= TOL * max(1.0, abs(a["value"]))
    return out


@pytest.mark.parametrize("structure", ["rows", "cols", "heads", "whole", "elements", "mixed"])
def test_batched_equals_single_edits(structure, tokenizer):
    model = _model(tokenizer)
    configs = [EditConfig(optimizer="torch", **c) for c in CONFIGS]
    _compare(model, tokenizer, tiny_task(), _masks(model, structure), configs)


def test_weight_decay_on_partial_masks_and_unlearning(tokenizer):
    """Weight decay acts on W0 + D of the selected elements only (MaskedAdamW's rule; torch AdamW refuses it on
    partial masks), on an unlearning task, on Gemma-2 (soft-capping); two groups per pass (passes of 2 and 1)."""
    model = _model(tokenizer, arch="gemma2")
    configs = [EditConfig(optimizer="masked", weight_decay=wd, **c) for wd, c in zip((0.1, 0.0, 0.5), CONFIGS, strict=True)]
    # MaskedAdamW reports its gradient norm in fp32 (its control vector), hence the looser tolerance there only
    _compare(model, tokenizer, tiny_task(unlearn=True), _masks(model, "mixed"), configs, norm_tol=1e-6, groups_per_pass=2)


def test_eval_fn_sees_each_variant(tokenizer):
    model = _model(tokenizer, layers=2)
    probe = torch.randint(4, len(tokenizer), (2, 6))

    def eval_fn(m):
        return {"value": float(m(input_ids=probe).logits.double().square().mean())}

    t = SiteTable(model)
    masks = [Mask.from_components(t, [Component("mlp", 0)]), Mask.from_components(t, [Component("attn", 1, 1)])]
    configs = [EditConfig(optimizer="torch", steps=4, lr=3e-2, eval_every=2, seed=5),
               EditConfig(optimizer="torch", steps=3, lr=1e-2, eval_every=1, seed=6)]
    _compare(model, tokenizer, tiny_task(), masks, configs, eval_fn=eval_fn)


def test_apply_and_restore_variant(tokenizer):
    model = _model(tokenizer, layers=2)
    t = SiteTable(model)
    masks = [Mask.from_components(t, [Component("mlp", 1, 2)]), Mask.from_components(t, [Component("attn", 0)])]
    out = edit_batched(model, tokenizer, tiny_task(), masks, [EditConfig(steps=2, lr=1e-2, seed=s) for s in (0, 1)])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for k in (0, 1, 0):
        out.deltas.apply(k)  # apply switches variants, restoring the previous one first
        edited = out.deltas.edited(k)
        for name, p in model.named_parameters():
            want = edited.get(name, before[name])
            assert torch.equal(_bits(p), _bits(want)), (k, name)
    out.deltas.restore()
    with out.deltas.variant(1) as m:
        assert not torch.equal(m.get_parameter(t.param_name(0, "q")), before[t.param_name(0, "q")])
    for name, p in model.named_parameters():
        assert torch.equal(_bits(p), _bits(before[name])), name
    delta = out.deltas.to_edit_delta(0)
    assert set(delta.values) == set(masks[0])
    moved = out.deltas.delta(0)
    assert all(v.abs().max() > 0 for v in moved.values())


def test_adamw_update_matches_torch_adamw_per_configuration():
    """The vectorized update over K compact states equals K torch AdamW optimizers (weight decay on the full value),
    each with its own lr, betas, eps, decay and step; a configuration that is not live stays bit-identical."""
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    K, sizes = 4, [7, 13, 1, 30]
    hyper = [dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0),
             dict(lr=3e-3, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
             dict(lr=5e-2, betas=(0.5, 0.9), eps=1e-4, weight_decay=0.5),
             dict(lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01)]
    start = [torch.randn(n, dtype=torch.float64) for n in sizes]
    refs = [torch.nn.Parameter(s.clone()) for s in start]
    opts = [torch.optim.AdamW([p], **h) for p, h in zip(refs, hyper, strict=True)]
    values = torch.cat(start)
    m, v = torch.zeros_like(values), torch.zeros_like(values)
    config_of = torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)])
    f64 = dict(dtype=torch.float64)
    steps_done = [0] * K
    for it in range(6):
        live = [k for k in range(K) if not (k == 2 and it >= 3)]  # configuration 2 finishes after 3 steps
        grads = [torch.randn(n, dtype=torch.float64) for n in sizes]
        for k in live:
            refs[k].grad = grads[k].clone()
            opts[k].step()
            steps_done[k] += 1
        frozen = values[config_of == 2].clone()
        adamw_update_(values, torch.cat(grads), m, v, lr=torch.tensor([h["lr"] for h in hyper], **f64),
                      weight_decay=torch.tensor([h["weight_decay"] for h in hyper], **f64),
                      beta1=torch.tensor([h["betas"][0] for h in hyper], **f64),
                      beta2=torch.tensor([h["betas"][1] for h in hyper], **f64),
                      eps=torch.tensor([h["eps"] for h in hyper], **f64), step=torch.tensor(steps_done, **f64),
                      config_of=config_of, live=torch.tensor([k in live for k in range(K)]))
        if 2 not in live:
            assert torch.equal(values[config_of == 2], frozen)
        for k in range(K):
            assert torch.allclose(values[config_of == k], refs[k].detach(), rtol=1e-14, atol=1e-15), (it, k)


def test_cosine_lrs_are_the_schedulers_values():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7)
    want = []
    for _ in range(7):
        want.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert cosine_lrs(0.3, 7) == want


def test_memory_per_configuration(tokenizer):
    """Persistent bytes per configuration: values + base values + two moments of its selected elements (16 B per
    element in fp32); the frozen weights are shared."""
    model = make_tiny_model("llama", vocab_size=len(tokenizer))  # fp32, 2 layers, d=32, d_mlp=48
    t = SiteTable(model)
    mask = Mask.from_components(t, [Component("mlp", 0)])
    one, four = BatchedDeltas(model, [mask]), BatchedDeltas(model, [mask] * 4)
    per = mask.param_count()
    assert per == 3 * 32 * 48
    assert one.state_bytes(0) == 16 * per == 73_728
    buffers = (four.values, four.base, four.exp_avg, four.exp_avg_sq)
    assert sum(b.numel() * b.element_size() for b in buffers) == 4 * one.state_bytes(0)


def test_clear_errors(tokenizer):
    model = _model(tokenizer, layers=2)
    t = SiteTable(model)
    mask = Mask.from_components(t, [Component("mlp", 0)])
    task = tiny_task()
    with pytest.raises(ValueError, match="one mask per configuration"):
        edit_batched(model, tokenizer, task, [mask], [EditConfig(steps=1)] * 2)
    with pytest.raises(ValueError, match="micro_batch"):
        edit_batched(model, tokenizer, task, [mask], [EditConfig(steps=1, micro_batch=2)])
    with pytest.raises(ValueError, match="nn.Linear"):
        emb = Mask.whole(model, ["model.embed_tokens.weight"])
        edit_batched(model, tokenizer, task, [emb], [EditConfig(steps=1)])
    with pytest.raises(ValueError, match="groups_per_pass"):
        edit_batched(model, tokenizer, task, [mask], [EditConfig(steps=1)], groups_per_pass=0)
    with pytest.raises(ValueError, match="selects no parameters"):
        edit_batched(model, tokenizer, task, [Mask()], [EditConfig(steps=1)])


def test_fp32_matches_edit_with_its_default_optimizer(tokenizer):
    """fp32, ``edit``'s default optimizer (MaskedAdamW): same losses to 1e-4 relative and weights to 1e-5 (fp32
    rounding of a different summation order, compounded over 4 steps)."""
    model = make_tiny_model("llama", seed=int(torch.randint(0, 2**31 - 1, ())), vocab_size=len(tokenizer),
                            num_hidden_layers=3, initializer_range=0.2)
    masks = _masks(model, "mixed")
    configs = [EditConfig(weight_decay=0.05, **c) for c in CONFIGS]
    out = edit_batched(model, tokenizer, tiny_task(), masks, configs)
    for k, (mask, config) in enumerate(zip(masks, configs, strict=True)):
        ref_model = copy.deepcopy(model)
        ref = edit(ref_model, tokenizer, tiny_task(), mask, config, progress=False)
        for a, b in zip(ref.history, out[k].history, strict=True):
            for key in ("forget_loss", "maintain_loss", "lm_loss", "grad_norm", "lr"):
                assert abs(a[key] - b[key]) <= 1e-4 * max(1.0, abs(a[key])), (k, key, a[key], b[key])
        edited = out.deltas.edited(k)
        for name, p in ref_model.named_parameters():
            if name in mask:
                assert (edited[name] - p.detach()).abs().max() <= 1e-5, (k, name)


def test_qkv_biases(tokenizer):
    """Qwen-2's q/k/v biases: head rows of a bias, a whole bias, and a random element mask of a bias (a Mask stores it
    as rows) next to rows of its weight."""
    model = _model(tokenizer, arch="qwen2")
    t = SiteTable(model)
    qb = t.param_name(1, "q", bias=True)
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))
    masks = [Mask.from_components(t, [Component("attn", 0, 1), Component("attn", 2, 2)]),
             Mask.from_components(t, [Component("attn.v", 1)]),
             Mask().add(qb, (t.matrix_shape("q")[0],), "elements", torch.rand(t.matrix_shape("q")[0], generator=g) < 0.4)
             .add(t.param_name(1, "q"), t.matrix_shape("q"), "rows", [0, 5, 9])]
    kinds = {masks[0][t.param_name(0, "q", bias=True)].kind, masks[1][t.param_name(1, "v", bias=True)].kind, masks[2][qb].kind}
    assert kinds == {"rows", "whole"}
    _compare(model, tokenizer, tiny_task(), masks, [EditConfig(optimizer="torch", **c) for c in CONFIGS])
