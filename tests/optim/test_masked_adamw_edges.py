"""MaskedAdamW at the edges a user can reach: parameters changed under the optimizer (memory safety)."""

from __future__ import annotations

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.optim import MaskedAdamW, backend_availability

BACKENDS = [b for b in ("cpu", "triton", "torch") if backend_availability("cpu")[b] == "available"]


def _opt(backend, shape=(64, 32), compact_grads=False, **kw):
    w = torch.nn.Parameter(torch.randn(shape))
    mask = Mask().add("w", shape, "rows", list(range(shape[0] - 8, shape[0])))  # the last rows: past a smaller tensor
    opt = MaskedAdamW([("w", w)], mask=mask, lr=1e-2, backend=backend, compact_grads=compact_grads, **kw)
    return w, opt


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["smaller", "other_shape", "dtype", "non_contiguous"])
def test_replaced_parameter_data_is_refused_before_any_write(backend, change):
    w, opt = _opt(backend)
    # A guard region around the replacement: the kernels would write into it if they trusted the old table.
    arena = torch.zeros(64 * 32 * 2)
    replacement = {
        "smaller": arena[: 16 * 32].view(16, 32),
        "other_shape": arena[: 64 * 32].view(32, 64),
        "dtype": torch.zeros(64, 32, dtype=torch.float64),
        "non_contiguous": arena[: 64 * 32].view(32, 64).t(),
    }[change]
    w.data = replacement
    w.grad = torch.ones_like(w)
    before = arena.clone()
    with pytest.raises(RuntimeError, match=r"'w' is now a.*built for a contiguous torch.float32 \(64, 32\).*new MaskedAdamW"):
        opt.step()
    assert torch.equal(arena, before), "the optimizer wrote into memory it does not own"


@pytest.mark.parametrize("backend", BACKENDS)
def test_replaced_parameter_is_refused_by_the_compact_gradient_hook(backend):
    w, opt = _opt(backend, compact_grads=True)
    w.data = torch.zeros(16, 32)
    with pytest.raises(RuntimeError, match="'w' is now a"):
        (w * 2).sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_shape_replacement_is_still_trained(backend):
    w, opt = _opt(backend)
    w.data = torch.zeros(64, 32)  # a new tensor of the same layout: the table still describes it
    w.grad = torch.ones_like(w)
    opt.step()
    assert bool((w.detach()[-8:] != 0).all()) and bool((w.detach()[:-8] == 0).all())


# ------------------------------------------------------------------------------------- missing gradients
@pytest.mark.parametrize("compact", [False, True], ids=["dense_grads", "compact_grads"])
@pytest.mark.parametrize("state_bits,dtype", [(32, torch.float32), (8, torch.float32), (32, "bf16_master"),
                                              (8, "bf16_master")])
@pytest.mark.parametrize("backend", BACKENDS)
def test_parameter_without_gradient_keeps_every_bit(backend, state_bits, dtype, compact, rng):
    """Every kernel variant (fp32 / 8-bit state, master copy, dense / compact gradients) leaves a parameter without
    a gradient untouched: its values, moments (codes and absmax) and master copy, while the others train."""
    master = dtype == "bf16_master"
    dtype = torch.bfloat16 if master else dtype
    a = torch.nn.Parameter(torch.randn(16, 40, generator=rng).to(dtype))
    b = torch.nn.Parameter(torch.randn(300, generator=rng).to(dtype))
    mask = Mask().add("a", a.shape, "cols", [1, 2, 30]).add("b", b.shape)
    opt = MaskedAdamW([("a", a), ("b", b)], mask=mask, lr=1e-2, weight_decay=0.1, state_bits=state_bits,
                      master_weights=master, compact_grads=compact, backend=backend, tile=256)

    def backward(use_b: bool) -> None:
        opt.zero_grad(set_to_none=True)
        loss = (a.float() * torch.randn(a.shape, generator=rng)).sum()
        if use_b:
            loss = loss + (b.float() * torch.randn(b.shape, generator=rng)).sum()
        loss.backward()

    backward(True)
    opt.step()
    before_a, before_b, before_state = a.detach().clone(), b.detach().clone(), _state_of(opt, b)
    backward(False)
    opt.step()
    assert torch.equal(b.detach(), before_b)
    after = _state_of(opt, b)
    assert before_state.keys() == after.keys() and all(torch.equal(before_state[k], after[k]) for k in after), \
        [k for k in after if not torch.equal(before_state[k], after[k])]
    assert not torch.equal(a.detach(), before_a)
    assert float(opt.state[a]["step"]) == 2.0 and float(opt.state[b]["step"]) == 1.0


def _state_of(opt, p):
    """Copies of a parameter's optimizer state (moments or codes and absmax, master), by name."""
    return {k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor) and k != "step"}


@pytest.mark.parametrize("backend", BACKENDS)
def test_compact_grads_parameter_frozen_at_build_trains_once_it_requires_grad(backend, rng):
    """compact_grads=True over a parameter with requires_grad=False builds (torch refuses a hook there), skips it,
    and trains it once requires_grad is set (its hook is registered at the next step)."""
    a = torch.nn.Parameter(torch.randn(8, 8, generator=rng))
    b = torch.nn.Parameter(torch.randn(8, generator=rng), requires_grad=False)
    opt = MaskedAdamW([("a", a), ("b", b)], lr=1e-2, compact_grads=True, backend=backend, tile=256)
    before = b.detach().clone()
    (a.sum() + b.sum()).backward()
    opt.step()
    assert torch.equal(b.detach(), before)
    b.requires_grad_(True)
    opt.zero_grad()
    (a.sum() + b.sum()).backward()
    opt.step()  # the hook arrives late: this step gathers the dense gradient b already holds
    assert b.grad is None and not torch.equal(b.detach(), before) and float(opt.state[b]["step"]) == 1.0
    opt.zero_grad()
    (a.sum() + 2 * b.sum()).backward()
    assert b.grad is None  # the hook now frees it during backward
    opt.step()
    assert float(opt.state[b]["step"]) == 2.0


# --------------------------------------------------------------------------------------- add_param_group
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_param_group_with_a_mask_trains_the_new_group_and_keeps_the_old_state(backend, rng):
    w = torch.nn.Parameter(torch.randn(12, 10, generator=rng))
    v = torch.nn.Parameter(torch.randn(7, 10, generator=rng))
    w_twin, v_twin = (torch.nn.Parameter(t.detach().clone()) for t in (w, v))
    mask_w = Mask().add("w", w.shape, "rows", [0, 3, 4])
    opt = MaskedAdamW([("w", w)], mask=mask_w, lr=1e-2, weight_decay=0.1, backend=backend, tile=256)
    alone_w = MaskedAdamW([("w", w_twin)], mask=mask_w, lr=1e-2, weight_decay=0.1, backend=backend, tile=256)
    grads = [(torch.randn(w.shape, generator=rng), torch.randn(v.shape, generator=rng)) for _ in range(4)]
    for gw, _ in grads[:2]:
        w.grad, w_twin.grad = gw.clone(), gw.clone()
        opt.step()
        alone_w.step()
    cols = torch.zeros(v.shape, dtype=torch.bool)
    cols[:, [2, 5]] = True
    opt.add_param_group({"params": [("v", v)], "mask": [cols], "lr": 5e-2})
    alone_v = MaskedAdamW([("v", v_twin)], mask={"v": cols}, lr=5e-2, weight_decay=0.1, backend=backend, tile=256)
    for gw, gv in grads[2:]:
        w.grad, w_twin.grad, v.grad, v_twin.grad = gw.clone(), gw.clone(), gv.clone(), gv.clone()
        opt.step()
        alone_w.step()
        alone_v.step()
    assert torch.equal(w.detach(), w_twin.detach())  # w's moments and step count survived the rebuild
    assert torch.equal(v.detach(), v_twin.detach())  # v: its own step count (from 0) and its group's lr
    assert float(opt.state[w]["step"]) == 4.0 and float(opt.state[v]["step"]) == 2.0


def test_add_param_group_state_dict_round_trip(rng):
    w, v = torch.nn.Parameter(torch.randn(6, 5, generator=rng)), torch.nn.Parameter(torch.randn(9, generator=rng))

    def build(w, v):
        opt = MaskedAdamW([("w", w)], mask={"w": "whole"}, lr=1e-2)
        opt.add_param_group({"params": [("v", v)], "mask": "whole", "lr": 3e-2})
        return opt

    opt = build(w, v)
    v0 = v.detach().clone()
    grads = [(torch.randn(6, 5, generator=rng), torch.randn(9, generator=rng)) for _ in range(4)]
    for gw, gv in grads[:2]:
        w.grad, v.grad = gw, gv
        opt.step()
    saved = opt.state_dict()
    twins = [torch.nn.Parameter(t.detach().clone()) for t in (w, v)]
    twin_opt = build(*twins)
    twin_opt.load_state_dict(saved)
    for gw, gv in grads[2:]:
        for params, o in (((w, v), opt), (twins, twin_opt)):
            params[0].grad, params[1].grad = gw.clone(), gv.clone()
            o.step()
    assert torch.equal(w.detach(), twins[0].detach()) and torch.equal(v.detach(), twins[1].detach())
    assert not torch.equal(v.detach(), v0) and float(twin_opt.state[twins[1]]["step"]) == 4.0
    assert twin_opt.param_groups[1]["lr"] == 3e-2


def test_add_param_group_without_a_mask(rng):
    w, v = torch.nn.Parameter(torch.randn(4, 4, generator=rng)), torch.nn.Parameter(torch.randn(3, generator=rng))
    unmasked = MaskedAdamW([w], lr=0.1)  # mask=None: every parameter whole, new ones too
    unmasked.add_param_group({"params": [v]})
    v.grad, w.grad = torch.ones(3), torch.ones(4, 4)
    before = v.detach().clone()
    unmasked.step()
    assert not torch.equal(v.detach(), before)
    u = torch.nn.Parameter(torch.randn(5, generator=rng))
    masked = MaskedAdamW([("w", w)], mask=Mask().add("w", (4, 4), "rows", [1]), lr=0.1)
    with pytest.raises(ValueError, match=r"no mask entry; give the group a 'mask' key.*opt.set_mask"):
        masked.add_param_group({"params": [("u", u)]})
    assert len(masked.param_groups) == 1 and u not in masked.state  # refused: nothing was added


# ------------------------------------------------------------------------------ torch AdamW's options
@pytest.mark.parametrize("option,value", [("amsgrad", True), ("differentiable", True),
                                          ("decoupled_weight_decay", False)])
def test_unsupported_adamw_options_are_refused(option, value, rng):
    w = torch.nn.Parameter(torch.randn(3, 3, generator=rng))
    with pytest.raises(ValueError, match=f"{option}={value}.*use {option}={not value}"):
        MaskedAdamW([{"params": [w], option: value}])
    if option != "decoupled_weight_decay":
        with pytest.raises(ValueError, match=f"{option}={value}"):
            MaskedAdamW([w], **{option: value})
    opt = MaskedAdamW([w])
    opt.param_groups[0][option] = value  # switched on in place after construction
    w.grad = torch.ones(3, 3)
    with pytest.raises(ValueError, match=f"{option}={value}"):
        opt.step()


def test_implementation_hints_are_accepted_and_change_nothing(rng):
    w0 = torch.randn(5, 6, generator=rng)
    g = torch.randn(5, 6, generator=rng)
    results = []
    for hints in ({}, dict(foreach=True, fused=True, capturable=True)):
        w = torch.nn.Parameter(w0.clone())
        opt = MaskedAdamW([w], lr=1e-2, **hints)
        w.grad = g.clone()
        opt.step()
        results.append(w.detach())
    assert torch.equal(*results)


def test_a_tensor_passed_twice_is_refused(rng):
    w = torch.nn.Parameter(torch.randn(4, 6, generator=rng))
    other = torch.nn.Parameter(torch.randn(3, generator=rng))
    with pytest.raises(ValueError, match="'0' and '1' are the same tensor.*pass each tensor once"):
        MaskedAdamW([w, w])
    with pytest.raises(ValueError, match="'emb' and 'head' are the same tensor"):
        MaskedAdamW([("emb", w), ("head", w)])
    with pytest.raises(ValueError, match="same tensor"):
        MaskedAdamW([{"params": [w]}, {"params": [other, w]}])
    opt = MaskedAdamW([w])
    with pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [w], "mask": "whole"})
    base = torch.randn(10, 6, generator=rng)
    with pytest.raises(ValueError, match="share memory"):
        MaskedAdamW([torch.nn.Parameter(base[:6]), torch.nn.Parameter(base[4:])])


# -------------------------------------------------------------------------------------------- messages
def test_empty_selection_says_it_selects_nothing(rng):
    from mu_fast.masks import Selection

    w = torch.nn.Parameter(torch.randn(4, 6, generator=rng))
    empty_rows = Selection("rows", torch.zeros(0, dtype=torch.int64))
    for value in (empty_rows, torch.zeros(4, 6, dtype=torch.bool)):
        with pytest.raises(ValueError, match="'w' selects no elements; select at least one element, or leave 'w' out"):
            MaskedAdamW([("w", w)], mask={"w": value})
    with pytest.raises(ValueError, match="not in the mask.*drops a selection with no elements"):
        MaskedAdamW([("w", w)], mask=Mask().add("w", (4, 6), "rows", []))


@pytest.mark.parametrize("compact", [False, True], ids=["dense_grads", "compact_grads"])
def test_sparse_gradient_is_reported_as_sparse(compact):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = MaskedAdamW([("weight", emb.weight)], compact_grads=compact)
    with pytest.raises(ValueError, match=r"'weight' is sparse.*needs dense gradients.*sparse=False"):
        emb(torch.tensor([1, 2])).sum().backward()  # compact: the hook sees it during backward
        opt.step()


def test_loading_a_torch_adamw_state_dict_says_so(rng):
    w = torch.nn.Parameter(torch.randn(4, 6, generator=rng))
    torch_opt = torch.optim.AdamW([w])
    w.grad = torch.ones(4, 6)
    torch_opt.step()
    with pytest.raises(ValueError, match=r"torch.optim.AdamW .*state_dict.*not a MaskedAdamW one.*moments start at zero"):
        MaskedAdamW([w]).load_state_dict(torch_opt.state_dict())
