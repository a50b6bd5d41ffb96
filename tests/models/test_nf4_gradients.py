"""nf4-frozen edits get the gradient of the dequantized bf16 model, also after a no-grad eval-mode forward.

On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` at such a forward for a kernel with no backward
(``mu_fast.models.frozen``). The tests force bitsandbytes to believe the CPU has AVX512-BF16, so the repacking path
runs, and fails without the fix, on every CPU.
"""

from __future__ import annotations

import pytest
import torch
import transformers

bnb = pytest.importorskip("bitsandbytes")

from mu_fast.edit.loop import EditConfig, EditStep  # noqa: E402
from mu_fast.masks import Mask  # noqa: E402
from mu_fast.models import build_random_model, load_for_edit  # noqa: E402
from mu_fast.models.tiny import make_tiny_model  # noqa: E402

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97)
MASKS = {
    "one matrix": ["model.layers.0.mlp.down_proj.weight"],
    "whole MLP": [f"model.layers.0.mlp.{m}_proj.weight" for m in ("gate", "up", "down")],
}
CPU = torch.device("cpu")


@pytest.fixture
def cpu_with_avx512bf16(monkeypatch):
    """Every Linear4bit built from now on takes the CPU for one with AVX512-BF16 (the repacking path)."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)
    assert bnb.nn.Linear4bit(64, 64).support_avx512bf16_for_cpu


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_tiny_model("llama", seed=5, dtype=torch.bfloat16, **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    model.save_pretrained(path)
    return path, model


def _load(source, checkpoint, names):
    """(nf4 model, bf16 model of the same weights) on the CPU; the nf4 one frozen but ``names``."""
    path, reference = checkpoint
    mask = Mask.whole(reference, names)
    if source == "checkpoint":
        model = load_for_edit(path, mask, frozen="nf4", device_map="cpu", progress=False)[0]
        dense = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)  # same attention kernel
    else:  # build_random_model and the organism quantize through mu_fast.models.frozen.quantized_linear
        modules = sorted({n.rsplit(".", 1)[0] for n in names})
        model = build_random_model(reference.config, device=CPU, frozen="nf4", trainable_modules=modules)
        dense = build_random_model(reference.config, device=CPU, frozen="bf16", trainable_modules=modules)
    return model, dense, mask


def _dequantized(model, dense):
    """``dense`` with every frozen Linear set to the bf16 dequantization of ``model``'s nf4 layer."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert len(layers) > 5
    for name, layer in layers.items():
        weight = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
        dense.get_submodule(name).weight.data.copy_(weight)
    return dense.eval()


def _grads(model, names):
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    params = dict(model.named_parameters())
    for name, p in params.items():
        p.grad = None
        p.requires_grad_(name in names)
    logits = model(input_ids=ids).logits.float()
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    return {n: params[n].grad for n in names}


def _assert_close(got, want, rtol):
    for name, g in want.items():
        assert got[name] is not None, f"{name} got no gradient"
        error = (got[name].float() - g.float()).norm() / g.float().norm()
        assert error < rtol, f"{name}: gradient off by {error:.1%} from the dequantized bf16 model's"


def _repack(model):
    """Repack every 4-bit layer as ``Linear4bit.forward`` does at a no-grad eval forward on an AVX512-BF16 CPU (done
    directly: on another CPU a forward of the repacked layer fails, so a real one cannot set this up everywhere)."""
    for layer in model.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = True
            weight = layer.weight
            weight.data, weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(weight.data, weight.quant_state)


@pytest.mark.parametrize("source", ["checkpoint", "random"])
@pytest.mark.parametrize("which", list(MASKS))
def test_nf4_gradient_equals_dequantized_bf16_after_a_no_grad_eval_forward(source, which, checkpoint, cpu_with_avx512bf16):
    names = MASKS[which]
    model, dense, _ = _load(source, checkpoint, names)
    dense = _dequantized(model, dense)
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():  # as the known-facts check and edit(eval_fn=...) run it
        model.eval()(input_ids=ids)
    _assert_close(_grads(model, names), _grads(dense, names), rtol=2e-2)


@pytest.mark.parametrize("which", list(MASKS))
def test_the_edit_step_unpacks_a_model_repacked_before_it_got_it(which, checkpoint, cpu_with_avx512bf16):
    """A model whose 4-bit layers were already repacked for CPU inference (loaded by the user, run once without
    gradients) trains like its dequantized model once handed to the edit: the same codes, the block scales rounded
    to bf16 by the repacking."""
    names = MASKS[which]
    model, dense, mask = _load("checkpoint", checkpoint, names)
    before = {}
    for name, layer in model.named_modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            state = layer.weight.quant_state
            scales = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
            before[name] = (layer.weight.data.clone(), scales.to(torch.bfloat16).float())
    _repack(model)
    stepper = EditStep(model, mask, EditConfig(steps=1))
    try:
        got = _grads(model, names)
        _assert_close(got, _grads(_dequantized(model, dense), names), rtol=2e-2)
    finally:
        stepper.close()
    assert not any(getattr(m, "support_avx512bf16_for_cpu", False) for m in model.modules())
    for name, (codes, scales) in before.items():
        weight = model.get_submodule(name).weight
        assert torch.equal(weight.data, codes) and torch.equal(weight.quant_state.absmax, scales), name


def test_attribution_on_a_repacked_nf4_model_equals_the_dequantized_bf16_models(checkpoint, cpu_with_avx512bf16):
    """AtP backpropagates through the frozen layers above each site: on a model whose 4-bit layers were repacked
    (a user's model, run once without gradients) its scores are those of the dequantized model."""
    from mu_fast.localize.attribution import attribute
    from mu_fast.localize.metrics import logit_diff

    model, dense, _ = _load("checkpoint", checkpoint, MASKS["one matrix"])
    dense = _dequantized(model, dense)
    _repack(model)
    gen = torch.Generator().manual_seed(4)
    clean, corrupt = torch.randint(0, 97, (4, 9), generator=gen), torch.randint(0, 97, (4, 9), generator=gen)
    metric = logit_diff(torch.randint(0, 97, (4,), generator=gen), torch.randint(0, 97, (4,), generator=gen),
                        normalize=None)
    got = attribute(model, clean, corrupt, metric, sites=("mlp", "attn"), backend="torch")
    want = attribute(dense, clean, corrupt, metric, sites=("mlp", "attn"), backend="torch")
    for kind in ("mlp", "attn"):
        error = (got.per_prompt[kind].float() - want.per_prompt[kind].float()).norm() / want.per_prompt[kind].float().norm()
        assert error < 2e-2, f"{kind} scores off by {error:.1%} from the dequantized bf16 model's"
