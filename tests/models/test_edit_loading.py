"""load_for_edit: frozen modules quantized (bitsandbytes on CPU), masked ones bf16 and trainable; bad input
fails in one line before any weight is read; device maps keep masked layers on the GPU."""

from __future__ import annotations

import os
import sys

import pytest
import torch

from mu_fast.masks import Mask
from mu_fast.models import load_for_edit
from mu_fast.models.device_map import check_masked_on_gpu, device_of, edit_device_map
from mu_fast.models.edit_loading import resolve_source
from mu_fast.models.frozen import is_quantized
from mu_fast.models.sites import Component, SiteTable
from mu_fast.models.tiny import make_tiny_model

TINY = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=97)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = make_tiny_model("llama", seed=5, dtype=torch.bfloat16, **TINY)
    path = tmp_path_factory.mktemp("ckpt") / "tiny-llama"
    model.save_pretrained(path)
    return path, model


def tiny_mask(model) -> Mask:
    return Mask.from_components(SiteTable(model), [Component("attn", 1, 2), Component("mlp", 0, 7), Component("mlp.down", 1)])


@pytest.mark.parametrize("frozen", ["bf16", "int8", "nf4"])
def test_masked_modules_stay_bf16_and_trainable_frozen_ones_are_quantized(frozen, checkpoint):
    path, reference = checkpoint
    mask = tiny_mask(reference)
    model, tokenizer, info = load_for_edit(path, mask, frozen=frozen)
    ref = dict(reference.named_parameters())
    masked_modules = {name.rsplit(".", 1)[0] for name in mask}
    linears = 0
    for name, module in model.named_modules():
        if name in masked_modules or name == "lm_head":
            assert type(module) is torch.nn.Linear and module.weight.dtype == torch.bfloat16
            assert torch.equal(module.weight.cpu(), ref[name + ".weight"])  # loaded, not re-initialised
        elif isinstance(module, torch.nn.Linear):
            linears += 1
            assert is_quantized(module) == (frozen != "bf16")
            assert type(module).__name__ == {"bf16": "Linear", "int8": "Linear8bitLt", "nf4": "Linear4bit"}[frozen]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(mask)
    assert info["quantized_modules"] == (linears if frozen != "bf16" else 0) and linears == 14 - len(masked_modules)
    assert info["skipped_modules"] == sorted(masked_modules | {"lm_head"})
    assert (info["frozen"], info["source"], info["path"], info["arch"]) == (frozen, "checkpoint", str(path), "llama")
    on_gpu = 21 if torch.cuda.is_available() else 0
    assert info["device_map"] == {"gpu": on_gpu, "cpu": 21 - on_gpu, "disk": 0} and tokenizer is None
    assert info["trainable_elements"] == mask.param_count()
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(input_ids=ids.to(model.device)).logits.float().cpu()
        want = reference(input_ids=ids).logits.float()
    if frozen == "bf16":
        assert all(torch.equal(p.cpu(), ref[n]) for n, p in model.named_parameters())
    else:  # the same model up to the quantization of its frozen weights
        assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.95


def test_config_hash_is_the_same_in_every_precision(checkpoint):
    path, reference = checkpoint
    hashes = {load_for_edit(path, tiny_mask(reference), frozen=f)[2]["config_hash"] for f in ("bf16", "int8", "nf4")}
    other = make_tiny_model("llama", **{**TINY, "rms_norm_eps": 1e-3})
    assert len(hashes) == 1
    from mu_fast.models.identity import config_hash

    assert config_hash(other.config) not in hashes


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Make any attempt to read weights fail loudly: bad input must be rejected before that."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad input was rejected")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def _bad_inputs(tmp_path, path, reference):
    mask = tiny_mask(reference)
    gemma = make_tiny_model("gemma", **TINY)
    wider = make_tiny_model("llama", **{**TINY, "intermediate_size": 192})
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    return {
        "missing checkpoint": ((tmp_path / "nowhere" / "ckpt", mask), {}, FileNotFoundError, "no checkpoint at"),
        "relative missing path": (("./no/such/ckpt", mask), {}, FileNotFoundError, "no checkpoint at"),
        "other architecture": ((path, Mask.from_components(SiteTable(gemma), [Component("mlp", 0)])), {}, ValueError,
                               "built for a gemma model but .* is llama"),
        "other shapes": ((path, Mask.from_components(SiteTable(wider), [Component("mlp", 0)])), {}, ValueError,
                         r"does not fit .*shape \(192, 64\) but the parameter has \(128, 64\)"),
        "unknown parameter": ((path, ["model.layers.0.mlp.up.weight"]), {}, ValueError, "not in the model"),
        "empty mask": ((path, Mask()), {}, ValueError, "selects no parameters"),
        "frozen fp8": ((path, mask), {"frozen": "fp8"}, ValueError, r"frozen='fp8'.*\('bf16', 'int8', 'nf4'\)"),
        "offload under a file": ((path, mask), {"offload_dir": blocker / "offload"}, PermissionError,
                                 "cannot be created: .*a-file is a file"),
        "offload is a file": ((path, mask), {"offload_dir": blocker}, PermissionError, "is a file, not a directory"),
        "offload holds files": ((path, mask), {"offload_dir": busy}, ValueError, r"holds other files \(\['notes.txt'\]\)"),
        "bad dtype": ((path, mask), {"dtype": "int4"}, ValueError, "unknown dtype 'int4'"),
    }


BAD = ["missing checkpoint", "relative missing path", "other architecture", "other shapes", "unknown parameter",
       "empty mask", "frozen fp8", "offload under a file", "offload is a file", "offload holds files", "bad dtype"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_before_any_loading_and_writes_nothing(case, checkpoint, tmp_path, no_weight_loading):
    path, reference = checkpoint
    args, kwargs, error, message = _bad_inputs(tmp_path, path, reference)[case]
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    ckpt_before = sorted(p.name for p in path.iterdir())
    with pytest.raises(error, match=message) as caught:
        load_for_edit(*args, **kwargs)
    assert "\n" not in str(caught.value)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert sorted(p.name for p in path.iterdir()) == ckpt_before


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write to any directory")
def test_unwritable_offload_dir(checkpoint, tmp_path, no_weight_loading):
    path, reference = checkpoint
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        with pytest.raises(PermissionError, match="not writable|cannot be created"):
            load_for_edit(path, tiny_mask(reference), offload_dir=locked / "offload")
        assert not (locked / "offload").exists()
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("frozen", ["int8", "nf4"])
def test_quantized_frozen_weights_need_bitsandbytes(frozen, checkpoint, monkeypatch, no_weight_loading):
    from mu_fast.models.frozen import require_bitsandbytes

    path, reference = checkpoint
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now raises ImportError
    with pytest.raises(ValueError, match=f"frozen='{frozen}' needs bitsandbytes.*pip install 'bitsandbytes"):
        load_for_edit(path, tiny_mask(reference), frozen=frozen)
    assert require_bitsandbytes("bf16") is None  # bf16 does not need it


def test_hub_ids_fail_fast_offline(checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub-cache"))
    with pytest.raises(ValueError, match="'someorg/no-such-model' is neither a local folder nor in the HF cache, and "
                                         "HF_HUB_OFFLINE=1") as caught:
        load_for_edit("someorg/no-such-model", tiny_mask(checkpoint[1]))
    assert "\n" not in str(caught.value)


def test_random_and_organism_sources_resolve_their_configs():
    source = resolve_source("random:gemma2-9b")
    assert (source.kind, source.ref, source.config.num_hidden_layers) == ("random", "random:gemma-2-9b", 42)
    with pytest.raises(ValueError, match="no shipped config named 'gpt2'"):
        resolve_source("random:gpt2")
    with pytest.raises(ValueError, match="unknown organism preset 'huge'"):
        resolve_source("organism:huge")


def test_organism_loads_with_quantized_frozen_layers(ci_organism, cache_root, monkeypatch):
    monkeypatch.setenv("MU_FAST_CACHE_DIR", str(cache_root))  # where the session's CI organism is cached
    mask = Mask.from_components(SiteTable(ci_organism.model), [Component("mlp", 0)])
    model, tokenizer, info = load_for_edit("organism:ci", mask, frozen="nf4")
    assert info["organism"].path == ci_organism.path and info["organism_hash"] == ci_organism.config.config_hash()
    assert tokenizer is not None and info["source"] == "organism"
    assert type(model.model.layers[0].mlp.down_proj) is torch.nn.Linear
    assert type(model.model.layers[1].mlp.down_proj).__name__ == "Linear4bit"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(mask)


# ----------------------------------------------------------------- device maps (planned on the meta device)
def _gemma2_meta():
    from mu_fast.models.random_model import build_random_model

    return build_random_model("gemma-2-9b", device="meta")


FLU = [f"model.layers.{L}.mlp.{m}" for L in range(2, 7) for m in ("gate_proj", "up_proj", "down_proj")]


@pytest.mark.parametrize("frozen, gpu_gib, cpu_gib", [("bf16", 6, 2), ("nf4", 4, 1)])
def test_device_map_pins_masked_layers_to_the_gpu_and_offloads_the_rest(frozen, gpu_gib, cpu_gib):
    from accelerate.utils import compute_module_sizes

    from mu_fast.models.device_map import quantized_dtypes

    model = _gemma2_meta()
    budget = {0: gpu_gib * 2**30, "cpu": cpu_gib * 2**30}
    device_map = edit_device_map(model, FLU, frozen, torch.bfloat16, budget)
    assert all(device_of(device_map, f"model.layers.{L}") == 0 for L in range(2, 7))
    assert {device_of(device_map, f"model.layers.{L}") for L in range(42)} == {0, "cpu", "disk"}
    sizes = compute_module_sizes(model, dtype=torch.bfloat16, special_dtypes=quantized_dtypes(model, frozen, FLU))
    on_gpu = sum(sizes[name] for name, device in device_map.items() if device == 0)
    assert on_gpu <= budget[0]
    check_masked_on_gpu(device_map, FLU)
    # nf4 stores a frozen layer in about a quarter of the bytes of the (bf16-MLP) masked layer 2.
    assert sizes["model.layers.10"] < (0.4 if frozen == "nf4" else 1.01) * sizes["model.layers.2"]


def test_device_map_refuses_masked_layers_larger_than_the_gpu_and_offloaded_masks():
    model = _gemma2_meta()
    with pytest.raises(ValueError, match=r"5 layer\(s\) holding masked modules .*need 1\.[0-9]+ GiB on GPU 0 .* has 1\.00 GiB"):
        edit_device_map(model, FLU, "nf4", torch.bfloat16, {0: "1GiB", "cpu": "40GiB"})
    with pytest.raises(ValueError, match="puts masked module 'model.layers.3.mlp.gate_proj' on 'cpu'"):
        check_masked_on_gpu({"model.layers.2": 0, "model.layers.3": "cpu", "": 0}, FLU)
