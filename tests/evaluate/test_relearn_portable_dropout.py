"""The relearning attack's LoRA dropout draws its masks with torch.rand, never with torch's bernoulli_ (which draws
from MKL's generator on Intel CPUs and from torch's own on AMD ones: other masks, other numbers, same seed)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from mu_fast.evaluate import relearn_attack
from mu_fast.evaluate.relearn import PortableDropout


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("train_mode", [False, True])
def test_the_attack_never_calls_bernoulli(train_mode, make_model, make_task, tokenizer):
    with OpLog() as log:
        relearn_attack(make_model(), tokenizer, make_task(), steps=2, lr=1e-2, eval_at=(0, 2), batch_size=8,
                       lm_batch_size=2, lora_dropout=0.3, score_in_train_mode=train_mode)
    assert "aten.rand" in log.ops  # the masks were drawn
    assert not {op for op in log.ops if "bernoulli" in op or "dropout" in op}, sorted(log.ops)


def test_portable_dropout_is_inverted_dropout_over_torch_rand(rng):
    x = torch.randn(64, 32, generator=rng, dtype=torch.float64)
    drop = PortableDropout(0.25).train()
    torch.manual_seed(7)
    got = drop(x)
    torch.manual_seed(7)
    keep = torch.rand(x.shape, dtype=x.dtype) >= 0.25
    assert torch.equal(got, x * keep / 0.75)
    assert torch.equal(drop.eval()(x), x) and not torch.equal(PortableDropout(0.25, always=True).eval()(x), x)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        PortableDropout(1.0)
