"""Shipped 7-9B configs and random-weight models of their shapes (meta device for the full sizes)."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from mu_fast.models import SHIPPED, build_random_model, shipped_config
from mu_fast.models.frozen import is_quantized
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import REAL_SHAPES

# Parameter counts on the models' hub pages (8.03B, 8.54B, 9.24B, 7.24B, 7.62B) and each config's source.
PUBLISHED = {
    "llama-3-8b": (8.03, "meta-llama/Meta-Llama-3-8B"),
    "gemma-7b": (8.54, "google/gemma-7b"),
    "gemma-2-9b": (9.24, "google/gemma-2-9b"),
    "mistral-7b": (7.24, "mistralai/Mistral-7B-v0.1"),
    "qwen2-7b": (7.62, "Qwen/Qwen2-7B"),
}


@pytest.mark.parametrize("name", SHIPPED)
def test_meta_model_has_the_config_shapes_and_published_size(name):
    config = shipped_config(name)
    model = build_random_model(name, device="meta")
    params = dict(model.named_parameters())
    d, dh = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    H, K, F = config.num_attention_heads, config.num_key_value_heads, config.intermediate_size
    assert params["model.embed_tokens.weight"].shape == (config.vocab_size, d)
    for L in (0, config.num_hidden_layers - 1):
        p = f"model.layers.{L}."
        assert params[p + "self_attn.q_proj.weight"].shape == (H * dh, d)
        assert params[p + "self_attn.k_proj.weight"].shape == (K * dh, d)
        assert params[p + "self_attn.o_proj.weight"].shape == (d, H * dh)
        assert params[p + "mlp.gate_proj.weight"].shape == (F, d)
        assert params[p + "mlp.down_proj.weight"].shape == (d, F)
    assert f"model.layers.{config.num_hidden_layers}.mlp.up_proj.weight" not in params
    assert (config.model_type == "qwen2") == ("model.layers.0.self_attn.q_proj.bias" in params)
    assert config.tie_word_embeddings == (model.lm_head.weight is model.model.embed_tokens.weight)
    total = sum(p.numel() for p in model.parameters())
    assert round(total / 1e9, 2) == PUBLISHED[name][0]


@pytest.mark.parametrize("name", SHIPPED)
def test_files_record_their_source_and_build_the_declared_architecture(name):
    raw = json.loads(resources.files("mu_fast.models").joinpath("configs", f"{name}.json").read_text())
    assert raw["_mu_fast_source"] == PUBLISHED[name][1]
    config = shipped_config(name)
    assert config.model_type == raw["model_type"] and type(config).__name__.lower().startswith(raw["model_type"])
    assert config.vocab_size == raw["vocab_size"] and config.num_hidden_layers == raw["num_hidden_layers"]


def test_gemma2_specifics_survive_loading():
    config = shipped_config("gemma-2-9b")
    assert (config.attn_logit_softcapping, config.final_logit_softcapping) == (50.0, 30.0)
    assert (config.sliding_window, config.query_pre_attn_scalar, config.head_dim) == (4096, 256, 256)
    assert config.layer_types[:2] == ["sliding_attention", "full_attention"]


def test_aliases_overrides_and_errors():
    assert shipped_config("llama3-8b").to_dict() == shipped_config("meta-llama/Meta-Llama-3-8B").to_dict()
    assert shipped_config("gemma2_9b").num_hidden_layers == 42
    scaled = shipped_config("gemma-2-9b", num_hidden_layers=4, hidden_size=256)
    assert (scaled.num_hidden_layers, scaled.hidden_size, len(scaled.layer_types)) == (4, 256, 4)
    with pytest.raises(ValueError, match=r"no shipped config named 'gpt2'.*'gemma-2-9b'.*'qwen2-7b'"):
        shipped_config("gpt2")
    with pytest.raises(ValueError, match=r"no field\(s\) \['hiden_size'\]"):
        shipped_config("mistral-7b", hiden_size=8)


def test_real_shapes_and_paper_tables_come_from_the_shipped_configs():
    from mu_fast.localize.paper_graphs import paper_site_table

    for key, name in (("llama3-8b", "llama-3-8b"), ("gemma-7b", "gemma-7b"), ("gemma2-9b", "gemma-2-9b")):
        config = shipped_config(name)
        shapes = REAL_SHAPES[key]
        assert shapes["arch"] == config.model_type and shapes["vocab_size"] == config.vocab_size
        assert (shapes["hidden_size"], shapes["intermediate_size"], shapes["num_hidden_layers"]) == (
            config.hidden_size, config.intermediate_size, config.num_hidden_layers)
        table, expect = paper_site_table(name), SiteTable(config)
        assert repr(table) == repr(expect)
        assert table.component_size(Component("mlp", 0)) == 3 * config.hidden_size * config.intermediate_size


SCALED = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=256, num_attention_heads=4,
              num_key_value_heads=2, head_dim=32, vocab_size=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def assert_quantization_of(module: torch.nn.Module, dense: torch.Tensor, frozen: str) -> None:
    """The bitsandbytes layer holds ``dense`` up to its quantization step: int8 rows of absmax/127 (half a step
    of rounding), NF4 blocks of 64 whose widest code gap is 0.3038 x absmax (between the codes -1 and -0.6962)."""
    import bitsandbytes as bnb

    weight = module.weight
    if frozen == "int8":
        absmax = dense.abs().amax(1, keepdim=True)
        restored = weight.data.float() * weight.SCB.float()[:, None] / 127
        bound = 0.5 * absmax / 127 + absmax * 2**-10  # + the fp16 rounding of the input to the quantizer
    else:
        restored = bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float().reshape(dense.shape)
        blocks = dense.reshape(-1, 64).abs().amax(1, keepdim=True)
        bound = (0.5 * 0.3038 * blocks + blocks * 2**-7).expand(-1, 64).reshape(dense.shape)
    assert ((restored - dense).abs() <= bound).all()
    assert not torch.equal(restored, torch.zeros_like(restored))


@pytest.mark.parametrize("name", ["llama-3-8b", "gemma-2-9b", "qwen2-7b"])
def test_scaled_random_models_quantize_the_frozen_linears_of_the_bf16_model(name):
    config = shipped_config(name, **SCALED)
    trainable = ["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.q_proj"]
    models = {f: build_random_model(config, frozen=f, trainable_modules=trainable, seed=3) for f in ("bf16", "int8", "nf4")}
    bf16 = dict(models["bf16"].named_parameters())
    assert (config.model_type == "gemma2") == (models["bf16"].lm_head.weight is models["bf16"].model.embed_tokens.weight)
    norm = models["bf16"].model.norm.weight
    assert torch.all(norm == (0.0 if config.model_type.startswith("gemma") else 1.0))
    assert 0.015 < float(bf16["model.layers.1.mlp.down_proj.weight"].float().std()) < 0.025
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    ref = models["bf16"](input_ids=ids).logits.float()
    for frozen in ("int8", "nf4"):
        model = models[frozen]
        for mname, module in model.named_modules():
            if mname in trainable or mname == "lm_head":
                assert type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
                assert torch.equal(module.weight, models["bf16"].get_submodule(mname).weight)
                assert module.weight.requires_grad == (mname in trainable)
            elif isinstance(module, torch.nn.Linear):
                assert is_quantized(module) and not module.weight.requires_grad
                dense = models["bf16"].get_submodule(mname).weight.float()
                assert_quantization_of(module, dense, frozen)
        got = model(input_ids=ids).logits.float()
        assert torch.isfinite(got).all()
        assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.95
    assert {n for n, p in models["bf16"].named_parameters() if p.requires_grad} == {
        "model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight",
    } | ({"model.layers.1.self_attn.q_proj.bias"} if config.model_type == "qwen2" else set())


def test_random_model_is_deterministic_and_checks_its_arguments():
    config = shipped_config("mistral-7b", **SCALED)
    a = build_random_model(config, seed=1, layers=1)
    b = build_random_model(config, seed=1, layers=1)
    c = build_random_model(config, seed=2, layers=1)
    assert a.config.num_hidden_layers == 1 and len(a.model.layers) == 1
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.model.layers[0].mlp.up_proj.weight, c.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ValueError, match="trainable module 'model.layers.0.mlp.up'"):
        build_random_model(config, trainable_modules=["model.layers.0.mlp.up"])
    with pytest.raises(ValueError, match="frozen='fp8'"):
        build_random_model(config, frozen="fp8")
    with pytest.raises(ValueError, match="layers must be a positive integer"):
        build_random_model(config, layers=0)
