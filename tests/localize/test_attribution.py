"""attribute(): AtP / EAP-IG / exact on tiny models of every supported architecture.

Oracles written here, independent of mu_fast's hook code: central finite differences of the metric along
each unit's activation difference (the first-order value AtP must equal), plain forward passes for the
metrics, and one prompt at a time for batch/padding invariance.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

from mu_fast.data.base import pad_batch
from mu_fast.localize.attribution import attribute
from mu_fast.localize.metrics import logit_diff, logprob, prob
from mu_fast.models.sites import SiteTable
from mu_fast.models.tiny import make_tiny_model

ARCHS = ["llama", "mistral", "qwen2", "gemma", "gemma2"]
V = 97


@functools.lru_cache(maxsize=None)
def tiny(arch: str, dtype: torch.dtype = torch.float64):
    """Shared per arch/dtype (attribute never changes weights). Gemma-2 needs eager attention (soft-capping);
    sdpa elsewhere keeps attention in fp64 (the eager softmax runs in fp32)."""
    impl = "eager" if arch == "gemma2" else "sdpa"
    return make_tiny_model(arch, seed=3, dtype=dtype, initializer_range=0.25, attn_implementation=impl)


def on_triton_device(model):
    """Triton kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests/conftest.py)."""
    return copy.deepcopy(model).to("cuda") if torch.cuda.is_available() else model


def make_pair(rng: torch.Generator, B: int = 3, lengths=(6, 4, 5)):
    clean = [torch.randint(3, V, (n,), generator=rng).tolist() for n in lengths[:B]]
    corrupt = []
    for seq in clean:
        seq = list(seq)
        for t in (1, 2):
            if t < len(seq) - 1:
                seq[t] = int(torch.randint(3, V, (1,), generator=rng))
        corrupt.append(seq)
    correct = torch.randint(3, V, (B,), generator=rng)
    wrong = torch.randint(3, V, (B, 2), generator=rng)
    return clean, corrupt, correct, wrong


def site_module(table: SiteTable, kind: str, layer: int) -> tuple[str, str]:
    return {
        "head": (table.module_path(layer, "o"), "input"),
        "neuron": (table.module_path(layer, "down"), "input"),
        "mlp": (table.mlp_path(layer), "output"),
    }[kind]


def metric_with_edit(model, batch, metric, kind, layer, group, group_size, delta, eps):
    """Sum over prompts of the raw metric with ``eps · delta`` added to one unit's activation (all positions)."""
    table = SiteTable(model)
    path, io = site_module(table, kind, layer)
    module = model.get_submodule(path)
    cols = slice(group * group_size, (group + 1) * group_size)

    def edit(x):
        x = x.clone()
        x[..., cols] += eps * delta[..., cols]
        return x

    if io == "input":
        handle = module.register_forward_pre_hook(lambda m, args: (edit(args[0]), *args[1:]))
    else:
        handle = module.register_forward_hook(lambda m, args, out: edit(out))
    try:
        with torch.no_grad():
            out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    finally:
        handle.remove()
    rows = torch.arange(batch.input_ids.shape[0])
    logits = out.logits[rows, batch.last_pos].to(torch.float64)
    return float(metric(logits, rows, batch).sum())


def site_acts(model, batch, kind, layer):
    table = SiteTable(model)
    path, io = site_module(table, kind, layer)
    module = model.get_submodule(path)
    got = {}

    def keep_input(m, args):
        got["a"] = args[0].detach().clone()

    def keep_output(m, args, out):
        got["a"] = out.detach().clone()

    handle = module.register_forward_pre_hook(keep_input) if io == "input" else module.register_forward_hook(keep_output)
    try:
        with torch.no_grad():
            model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids)
    finally:
        handle.remove()
    return got["a"]


@pytest.mark.parametrize(
    "arch,direction", [(a, "noise") for a in ARCHS] + [("llama", "denoise"), ("gemma2", "denoise")], ids=str
)
def test_atp_equals_finite_difference_fp64(arch, direction, rng):
    model = tiny(arch)
    table = SiteTable(model)
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logit_diff(correct, wrong, normalize=None)
    res = attribute(model, clean, corrupt, metric, sites=("head", "neuron", "mlp"), direction=direction, reduce="sum", backend="torch")
    cb, kb = pad_batch(clean, 0), pad_batch(corrupt, 0)
    base, other = (cb, kb) if direction == "noise" else (kb, cb)
    # RMSNorm (and Gemma-2's eager softmax) compute in fp32 even in fp64 models, so metric values carry ~1e-7
    # relative noise: a 4th-order stencil with a large step keeps noise/h and h^4 terms near 1e-5.
    h, rtol = 2e-2, 2e-4
    checks = [("head", 0, 1, table.head_dim), ("head", 1, 3, table.head_dim), ("neuron", 1, 7, 1), ("mlp", 0, 0, table.d_model)]
    for kind, layer, group, size in checks:
        delta = site_acts(model, other, kind, layer) - site_acts(model, base, kind, layer)
        f = {k: metric_with_edit(model, base, metric, kind, layer, group, size, delta, k * h) for k in (-2, -1, 1, 2)}
        fd = (f[-2] - 8 * f[-1] + 8 * f[1] - f[2]) / (12 * h)
        got = res.mlp[layer] if kind == "mlp" else (res.heads if kind == "head" else res.neurons)[layer, group]
        scale = max(abs(fd), float(res.heads.abs().max()))
        assert abs(float(got) - fd) <= rtol * scale, (kind, layer, group, float(got), fd)


@pytest.mark.parametrize("arch", ARCHS)
def test_heads_sum_to_attn_and_neurons_to_mlp(arch, rng):
    model = tiny(arch)
    clean, corrupt, correct, wrong = make_pair(rng)
    res = attribute(model, clean, corrupt, logit_diff(correct, wrong, normalize=None), sites=("head", "attn", "neuron", "mlp"))
    torch.testing.assert_close(res.per_prompt["heads"].sum(-1), res.per_prompt["attn"], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(res.per_prompt["neurons"].sum(-1), res.per_prompt["mlp"], rtol=1e-9, atol=1e-12)
    scores = res.layer_scores()
    assert len(scores) == 2 * model.config.num_hidden_layers
    for (comp, value) in scores.items():
        expect = res.heads[comp.layer].sum() if comp.kind == "attn" else res.mlp[comp.layer]
        assert value == pytest.approx(float(expect))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("method", ["atp", "eap-ig"])
def test_fused_backends_equal_reference(arch, method, rng):
    model = tiny(arch)
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logit_diff(correct, wrong)
    kinds = ("head", "q", "k", "v", "neuron", "mlp", "attn", "layer")
    ref = attribute(model, clean, corrupt, metric, sites=kinds, method=method, ig_steps=3, backend="reference")
    for backend in ("torch", "triton"):
        target = on_triton_device(model) if backend == "triton" else model
        got = attribute(target, clean, corrupt, metric, sites=kinds, method=method, ig_steps=3, backend=backend)
        # On a GPU machine the Triton run is on CUDA, where fp32 RMSNorm rounds differently from the CPU.
        rtol = 1e-5 if next(target.parameters()).is_cuda else 1e-9
        for key, t in ref.per_prompt.items():
            torch.testing.assert_close(got.per_prompt[key].cpu(), t, rtol=rtol, atol=rtol * float(t.abs().max()), msg=f"{backend} {key}")
    assert set(ref.scores) == {"heads", "q", "k", "v", "neurons", "mlp", "attn", "layer"}
    assert ref.k.shape == (model.config.num_hidden_layers, model.config.num_key_value_heads)


def test_eap_ig_one_step_is_atp(rng):
    model = tiny("llama")
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logprob(correct)
    atp = attribute(model, clean, corrupt, metric, sites=("head", "mlp"))
    ig1 = attribute(model, clean, corrupt, metric, sites=("head", "mlp"), method="eap-ig", ig_steps=1)
    ig4 = attribute(model, clean, corrupt, metric, sites=("head", "mlp"), method="eap-ig", ig_steps=4)
    torch.testing.assert_close(ig1.heads, atp.heads, rtol=0, atol=0)
    assert not torch.allclose(ig4.heads, atp.heads)


@pytest.mark.parametrize("arch", ARCHS)
def test_padding_side_and_batch_composition_invariance(arch, rng):
    # fp32 (fp64 + eager + left padding gives NaN in transformers 5); normalize=None keeps prompts independent.
    model = tiny(arch, dtype=torch.float32)
    clean, corrupt, correct, wrong = make_pair(rng, B=3, lengths=(7, 3, 5))
    metric = logit_diff(correct, wrong, normalize=None)
    sites = ("head", "neuron", "mlp")
    right = attribute(model, clean, corrupt, metric, sites=sites, padding_side="right")
    left = attribute(model, clean, corrupt, metric, sites=sites, padding_side="left")
    micro = attribute(model, clean, corrupt, metric, sites=sites, micro_batch=1)
    for i in range(3):
        alone = attribute(model, clean[i : i + 1], corrupt[i : i + 1], logit_diff(correct[i : i + 1], wrong[i : i + 1], normalize=None), sites=sites)
        for key in right.per_prompt:
            ref = alone.per_prompt[key][0]
            tol = 1e-4 * float(ref.abs().max()) + 1e-6
            for res in (right, left, micro):
                torch.testing.assert_close(res.per_prompt[key][i], ref, rtol=0, atol=tol)


def test_normalisation_mean_and_prompt(rng):
    model = tiny("qwen2")
    clean, corrupt, correct, wrong = make_pair(rng)
    raw = attribute(model, clean, corrupt, logit_diff(correct, wrong, normalize=None), sites=("head",))
    mean = attribute(model, clean, corrupt, logit_diff(correct, wrong, normalize="mean"), sites=("head",))
    per = attribute(model, clean, corrupt, logit_diff(correct, wrong, normalize="prompt"), sites=("head",))
    gap = raw.clean_metric - raw.corrupt_metric
    torch.testing.assert_close(mean.per_prompt["heads"], raw.per_prompt["heads"] / gap.mean())
    torch.testing.assert_close(per.per_prompt["heads"], raw.per_prompt["heads"] / gap[:, None, None])
    assert mean.reduce == "mean" and torch.allclose(mean.heads, mean.per_prompt["heads"].mean(0))
    total = attribute(model, clean, corrupt, logit_diff(correct, wrong), sites=("head",), reduce="sum")
    torch.testing.assert_close(total.heads, mean.per_prompt["heads"].sum(0))


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_metrics_match_full_forward(arch, rng):
    model = tiny(arch)
    clean, corrupt, correct, wrong = make_pair(rng)
    choices = torch.tensor([5, 9, 17, int(correct[0]), int(correct[1]), int(correct[2])])
    batch = pad_batch(clean, 0)
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids).logits
    last = full[torch.arange(3), batch.last_pos].double()
    rows = torch.arange(3)
    expect = {
        "logit_diff": last[rows, correct] - last.gather(1, wrong).mean(1),
        "prob": torch.softmax(last, -1)[rows, correct],
        "logprob": torch.log_softmax(last, -1)[rows, correct],
        "prob_choices": torch.softmax(last[:, torch.unique(choices)], -1)[rows, torch.searchsorted(torch.unique(choices), correct)],
    }
    metrics = {"logit_diff": logit_diff(correct, wrong, None), "prob": prob(correct), "logprob": logprob(correct), "prob_choices": prob(correct, choices)}
    for name, metric in metrics.items():
        res = attribute(model, clean, corrupt, metric, sites=("mlp",), direction="denoise")
        torch.testing.assert_close(res.clean_metric, expect[name], rtol=1e-6, atol=1e-9, msg=name)
        torch.testing.assert_close(metric(last), expect[name], rtol=1e-12, atol=1e-12, msg=name)


def test_callable_metrics_equal_builtin(rng):
    model = tiny("mistral")
    clean, corrupt, correct, wrong = make_pair(rng)
    builtin = attribute(model, clean, corrupt, logit_diff(correct, wrong, None), sites=("head", "mlp"))

    def two_args(logits, batch):
        return logits[torch.arange(logits.shape[0]), correct] - logits.gather(1, wrong).mean(1)

    def three_args(logits, batch, rows):
        return logits[torch.arange(logits.shape[0]), correct[rows]] - logits.gather(1, wrong[rows]).mean(1)

    for fn, kw in ((two_args, {}), (three_args, {"micro_batch": 2})):
        got = attribute(model, clean, corrupt, fn, sites=("head", "mlp"), **kw)
        assert got.metric == fn.__name__
        for key in builtin.per_prompt:
            torch.testing.assert_close(got.per_prompt[key], builtin.per_prompt[key], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="row-aware"):
        attribute(model, clean, corrupt, two_args, sites=("head",), micro_batch=2)


def test_errors_name_the_problem(rng):
    model = tiny("llama")
    clean, corrupt, correct, wrong = make_pair(rng)
    metric = logit_diff(correct, wrong)
    with pytest.raises(ValueError, match="different lengths"):
        attribute(model, clean, [corrupt[0], corrupt[1][:-1], corrupt[2]], metric)
    with pytest.raises(ValueError, match="unknown site"):
        attribute(model, clean, corrupt, metric, sites=("heads", "resid_mid"))
    with pytest.raises(ValueError, match="method"):
        attribute(model, clean, corrupt, metric, method="acdc")
    with pytest.raises(ValueError, match="entries for 3 prompts"):
        attribute(model, clean, corrupt, logit_diff(correct[:2], wrong[:2]))
    with pytest.raises(TypeError, match="HF"):
        attribute(torch.nn.Linear(2, 2), clean, corrupt, metric)
    res = attribute(model, clean, corrupt, metric, sites=("mlp",))
    with pytest.raises(AttributeError, match="'head' in sites"):
        res.heads


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")


@requires_cuda
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_gpu_bf16_triton_error_within_twice_torch(arch, rng):
    """bf16 on CUDA: the Triton path's error against an fp32 reference is at most 2x the torch path's."""
    shape = dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512)
    fp32 = make_tiny_model(arch, seed=1, dtype=torch.float32, initializer_range=0.05, **shape).cuda()
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    V = 512
    clean = torch.randint(3, V, (16, 20), generator=rng)
    corrupt = clean.clone()
    corrupt[:, 3:6] = torch.randint(3, V, (16, 3), generator=rng)
    metric = logit_diff(torch.randint(3, V, (16,), generator=rng), torch.randint(3, V, (16, 2), generator=rng))
    sites = ("head", "neuron", "mlp")
    ref = attribute(fp32, clean, corrupt, metric, sites=sites, backend="reference")
    tri = attribute(bf16, clean, corrupt, metric, sites=sites, backend="triton")
    tor = attribute(bf16, clean, corrupt, metric, sites=sites, backend="torch")
    for key in ref.per_prompt:
        err_triton = (tri.per_prompt[key] - ref.per_prompt[key]).abs().max()
        err_torch = (tor.per_prompt[key] - ref.per_prompt[key]).abs().max()
        assert err_triton <= 2 * err_torch + 1e-6 * ref.per_prompt[key].abs().max(), key
