"""to_float64: the RMSNorm and rotary modules of a float64 model compute in float64 (no float32 islands), and in
float32 the replacements compute bit for bit what transformers' own modules compute."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from mu_fast.models.precision import WideRMSNorm, WideRotaryEmbedding, to_float64
from mu_fast.models.tiny import make_config


def tiny(arch: str, rng: torch.Generator):
    import transformers

    config = make_config(arch, vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=64)
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=rng)))
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    for p in model.parameters():  # RMSNorm weights start at 0 / 1: give them values
        p.data.add_(0.1 * torch.randn(p.shape, generator=rng))
    return model


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2"])
def test_float32_replacements_equal_the_originals_bit_for_bit(arch, rng):
    model = tiny(arch, rng)
    ids = torch.randint(0, 50, (3, 11), generator=rng)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    swapped = copy.deepcopy(model)
    for parent in list(swapped.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RMSNorm"):
                setattr(parent, name, WideRMSNorm(child))
            elif type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, name, WideRotaryEmbedding(child))
    with torch.no_grad():
        got = swapped(input_ids=ids).logits
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2"])
def test_float64_model_has_no_float32_islands(arch, rng):
    model = to_float64(tiny(arch, rng))
    names = {type(m).__name__ for m in model.modules()}
    assert not {n for n in names if n.endswith("RMSNorm") and n != "WideRMSNorm"}, names
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    seen = []
    hooks = [m.register_forward_hook(lambda mod, args, out: seen.append(out)) for m in model.modules()
             if isinstance(m, (WideRMSNorm, WideRotaryEmbedding))]
    ids = torch.randint(0, 50, (2, 9), generator=rng)
    with torch.no_grad():
        model(input_ids=ids)
    for hook in hooks:
        hook.remove()
    outs = [t for o in seen for t in (o if isinstance(o, tuple) else (o,))]
    assert outs and all(t.dtype == torch.float64 for t in outs)
    # float64 all through: the RMSNorm output equals a float64 reference, far below float32's resolution
    norm = next(m for m in model.modules() if isinstance(m, WideRMSNorm))
    x = torch.randn(4, 32, generator=rng, dtype=torch.float64)
    ref = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
    ref = ref * (1.0 + norm.weight) if norm.gemma_style else norm.weight * ref
    torch.testing.assert_close(norm(x), ref, rtol=1e-14, atol=1e-14)


def test_float64_model_survives_deepcopy_and_pickle(rng):
    model = to_float64(tiny("llama", rng))
    ids = torch.randint(0, 50, (2, 7), generator=rng)
    with torch.no_grad():
        want = model(input_ids=ids).logits
    for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        with torch.no_grad():
            assert torch.equal(other(input_ids=ids).logits, want)
    assert set(dict(model.named_parameters())) == set(dict(tiny("llama", rng).named_parameters()))
