"""collect_hidden against HF hidden states; batched probes against an fp64 Newton solve per layer; latent probes."""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import tokenize_prompts
from mu_fast.evaluate import collect_hidden, latent_probes, stratified_split, train_probes
from mu_fast.evaluate.probes import LinearProbes


# --------------------------------------------------------------- collect_hidden
@pytest.mark.parametrize("arch", ["llama", "gemma", "gemma2"])
@pytest.mark.parametrize("position", ["last", "subject_last"])
def test_collect_hidden_matches_hf_hidden_states(tokenizer, make_model, make_task, arch, position):
    model = make_model(arch, seed=4, num_hidden_layers=3)
    tok = tokenize_prompts(tokenizer, make_task(n_athletes=20, n_forget=7, seed=3).formats["paraphrase"]["forget"])
    got = collect_hidden(model, tok, position=position, batch_size=3)
    L = model.config.num_hidden_layers
    assert got.shape == (L + 1, len(tok), model.config.hidden_size) and got.dtype == torch.float32
    tol = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        for i, ids in enumerate(tok.input_ids):
            out = model.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
            pos = len(ids) - 1 if position == "last" else int(tok.subject_last[i])
            # HF: hidden_states[l] for l < L is the input of layer l (index 0: embeddings after Gemma's scaling).
            for layer in range(L):
                torch.testing.assert_close(got[layer, i], out.hidden_states[layer][0, pos], **tol)
            # HF's last entry has the final norm applied; ours is the last layer's raw output.
            torch.testing.assert_close(model.model.norm(got[L, i]), out.last_hidden_state[0, pos], **tol)


def test_collect_hidden_errors(tokenizer, make_model, make_task):
    from dataclasses import replace

    model = make_model("llama")
    ps = make_task(seed=1).forget_test
    tok = tokenize_prompts(tokenizer, replace(ps, subjects=None))
    with pytest.raises(ValueError, match="needs subjects"):
        collect_hidden(model, tok, position="subject_last")
    with pytest.raises(ValueError, match="position must be"):
        collect_hidden(model, tok, position="first")
    with pytest.raises(ValueError, match="empty"):
        collect_hidden(model, tok.subset([]))
    # Hooks are removed afterwards, also after an error.
    assert all(not layer._forward_hooks and not layer._forward_pre_hooks for layer in model.model.layers)


# --------------------------------------------------------------- train_probes
def newton_reference(x: torch.Tensor, y: torch.Tensor, n_classes: int, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """fp64 Newton's method for one layer: mean CE + lam/2 ||W||^2 on standardised x; returns (W [d,C], b [C])."""
    x = x.double()
    mean, std = x.mean(0), x.std(0, unbiased=False)
    z = (x - mean) / std
    N, d = z.shape
    theta = torch.zeros((d + 1) * n_classes, dtype=torch.float64)

    def objective(t: torch.Tensor) -> torch.Tensor:
        W, b = t[: d * n_classes].view(d, n_classes), t[d * n_classes :]
        return torch.nn.functional.cross_entropy(z @ W + b, y) + 0.5 * lam * W.square().sum()

    for _ in range(50):
        g = torch.autograd.functional.jacobian(objective, theta)
        H = torch.autograd.functional.hessian(objective, theta)
        # The softmax parametrisation has a null direction (shifting every bias equally); tiny ridge on b.
        H = H + 1e-10 * torch.eye(H.shape[0], dtype=torch.float64)
        theta = theta - torch.linalg.solve(H, g)
        if g.abs().max() < 1e-12:
            break
    return theta[: d * n_classes].view(d, n_classes), theta[d * n_classes :]


def planted(L: int, N: int, d: int, C: int, signal_layers: set[int], gen: torch.Generator):
    """Features [L, N, d] and labels [N]: on signal layers the label is a linear function of the features
    (argmax of x @ W_true); on the others the features are independent noise."""
    y = torch.randint(0, C, (N,), generator=gen)
    x = torch.randn(L, N, d, generator=gen)
    for layer in signal_layers:
        w_true = torch.randn(d, C, generator=gen)
        # Resample features until the planted rule gives the labels: x = noise + 3 * direction of the class.
        x[layer] = torch.randn(N, d, generator=gen) + 3.0 * w_true.T[y] / w_true.norm(dim=0)[y, None]
    return x, y


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_batched_probes_equal_per_layer_newton(rng, dtype, solver):
    L, N, d, C = 3, 90, 5, 3
    x, y = planted(L, N, d, C, {0}, rng)
    x = x * torch.rand(1, 1, d, generator=rng) * 4 + 2  # unequal scales and offsets: standardisation matters
    lam = 0.05
    probes = train_probes(x, y, C, weight_decay=lam, steps=500, dtype=dtype, tolerance=1e-10, solver=solver)
    for layer in range(L):
        W, b = newton_reference(x[layer], y, C, lam)
        z = (x[layer].double() - x[layer].double().mean(0)) / x[layer].double().std(0, unbiased=False)
        want = torch.softmax(z @ W + b, -1)
        got = probes.predict_proba(x[layer : layer + 1].repeat(L, 1, 1))[layer].double()
        # fp32: the strong-Wolfe line search stalls once objective changes fall below fp32 resolution;
        # measured ~2e-4 in the probabilities (fp64: ~1e-12).
        tol = 1e-3 if dtype == torch.float32 else 1e-7
        torch.testing.assert_close(got, want, atol=tol, rtol=0)


def test_newton_probes_sit_at_the_minimum_whatever_the_round_off(rng):
    """Nearly separable features at the default (sklearn C=1) penalty, where L-BFGS stops far from the minimum (on
    the demo organism a 1e-15 relative change of the features moved its weights by up to 1.8): the Newton probes
    of features changed by 1e-15 relative, and solved on 1 or 2 threads, agree to 1e-9, and their gradient is 0."""
    L, N, d, C = 3, 400, 24, 3
    x, y = planted(L, N, d, C, {0, 1, 2}, rng)
    x = x.double() * 3
    runs = []
    for k, threads in ((0, 1), (1, 1), (2, 2)):
        noise = torch.randn(x.shape, generator=rng, dtype=torch.float64) * 1e-15 if k else 0
        old = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            runs.append(train_probes(x * (1 + noise), y, C, solver="newton"))
        finally:
            torch.set_num_threads(old)
    for probes in runs[1:]:
        torch.testing.assert_close(probes.weight, runs[0].weight, atol=1e-9, rtol=0)
        torch.testing.assert_close(probes.bias, runs[0].bias, atol=1e-9, rtol=0)
    # the returned point is the minimum: the objective's gradient there is round-off
    probes = runs[0]
    z = ((x - probes.mean[:, None]) / probes.scale[:, None]).detach()
    weight = probes.weight.clone().requires_grad_(True)
    bias = probes.bias.clone().requires_grad_(True)
    ce = torch.nn.functional.cross_entropy(torch.baddbmm(bias[:, None], z, weight).reshape(L * N, C), y.repeat(L),
                                           reduction="none").view(L, N).mean(1)
    (ce + 0.5 / N * weight.square().sum(dim=(1, 2))).sum().backward()
    assert float(weight.grad.abs().max()) < 1e-10 and float(bias.grad.abs().max()) < 1e-10


def test_a_class_without_training_examples_is_never_predicted(rng):
    """Its minimum is at bias -inf: Newton solves over the present classes and gives the absent one -inf."""
    x, y = planted(2, 60, 4, 2, {0}, rng)
    probes = train_probes(x, y, 3, solver="newton")
    assert torch.isinf(probes.bias[:, 2]).all() and (probes.bias[:, 2] < 0).all()
    assert (probes.weight[:, :, 2] == 0).all() and torch.isfinite(probes.bias[:, :2]).all()
    proba = probes.predict_proba(x)
    assert (proba[..., 2] == 0).all() and torch.allclose(proba.sum(-1), torch.ones(2, 60, dtype=proba.dtype))
    assert (probes.predict(x) != 2).all()
    # the same minimum over the present classes as a two-class problem
    two = train_probes(x, y, 2, solver="newton")
    torch.testing.assert_close(probes.predict_proba(x)[..., :2], two.predict_proba(x), atol=1e-9, rtol=0)
    with pytest.raises(ValueError, match="solver must be one of"):
        train_probes(x, y, 2, solver="sgd")


def test_probes_recover_planted_signal_and_sit_at_chance_on_noise(rng):
    L, N, d, C = 4, 1200, 16, 3
    x, y = planted(L, N, d, C, {1, 3}, rng)
    train, test = torch.arange(0, 600), torch.arange(600, N)
    probes = train_probes(x[:, train], y[train], C)
    acc = probes.accuracy(x[:, test], y[test])
    assert acc.shape == (L,)
    assert acc[1] > 0.9 and acc[3] > 0.9, acc
    # Chance is 1/3; 5 binomial standard deviations of a 600-example accuracy.
    bound = 5 * (1 / 3 * 2 / 3 / len(test)) ** 0.5
    assert (acc[[0, 2]] - 1 / 3).abs().max() < bound, acc
    assert probes.predict(x[:, test]).shape == (L, len(test))


def test_constant_features_predict_one_class(rng):
    x = torch.ones(2, 30, 4)
    x[1] = torch.randn(30, 4, generator=rng)
    y = torch.tensor([0] * 20 + [1] * 10)
    probes = train_probes(x, y, 2)
    assert torch.isfinite(probes.weight).all()
    assert probes.predict(x)[0].unique().tolist() == [0]  # the majority class


def test_train_probes_errors(rng):
    x = torch.randn(2, 10, 3, generator=rng)
    with pytest.raises(ValueError, match=r"\[L, N, d\]"):
        train_probes(x[0], torch.zeros(10, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="labels must be"):
        train_probes(x, torch.zeros(9, dtype=torch.int64), 2)
    with pytest.raises(ValueError, match="labels must be integers"):
        train_probes(x, torch.full((10,), 2), 2)
    probes = train_probes(x, torch.arange(10) % 2, 2)
    with pytest.raises(ValueError, match="features must be"):
        probes.predict(torch.randn(3, 4, 3))


def test_matches_sklearn_logistic_regression(rng):
    sklearn_linear = pytest.importorskip("sklearn.linear_model", reason="scikit-learn not installed (optional peer)")
    L, N, d, C = 2, 300, 6, 3
    x, y = planted(L, N, d, C, {0}, rng)
    x = x.double()
    x = (x - x.mean(1, keepdim=True)) / x.std(1, unbiased=False, keepdim=True)  # standardised as train_probes does
    probes = train_probes(x, y, C, dtype=torch.float64, steps=500, tolerance=1e-10)
    for layer in range(L):
        clf = sklearn_linear.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x[layer].numpy(), y.numpy())
        want = torch.from_numpy(clf.predict_proba(x[layer].numpy())).double()
        got = probes.predict_proba(x)[layer]
        torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


# --------------------------------------------------------------- split and latent probes
def test_stratified_split(rng):
    labels = torch.randint(0, 3, (101,), generator=rng)
    train, test = stratified_split(labels, 0.2, seed=42)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert sorted(train.tolist() + test.tolist()) == list(range(101))
    for c in range(3):
        n_c = int((labels == c).sum())
        assert int((labels[test] == c).sum()) == round(0.2 * n_c)
    again = stratified_split(labels, 0.2, seed=42)
    assert torch.equal(again[0], train) and torch.equal(again[1], test)
    assert not torch.equal(stratified_split(labels, 0.2, seed=7)[1], test)


def test_latent_probes_read_the_subject(tokenizer, make_model, make_task):
    """The name's last syllable decides the sport, so at the subject's last token the embedding layer (index 0)
    decodes the true sport of every forget athlete and never the (different) edit sport."""
    model = make_model("llama", seed=2)
    task = make_task(n_athletes=60, n_forget=12, seed=13)
    result = latent_probes(model, tokenizer, task, position="subject_last")
    L = model.config.num_hidden_layers
    assert result["layers"] == list(range(L + 1))
    assert result["classes"] == [" football", " baseball", " basketball"]  # " golf" never seen in maintain
    assert result["n_train"] + result["n_test"] == len(task.maintain_train)
    assert result["n_forget"] == len(task.forget_test)
    assert result["forget_acc_true"][0] == 1.0
    assert result["forget_acc_edit"][0] == 0.0
    assert result["probe_acc"][0] == 1.0
    assert all(len(result[k]) == L + 1 for k in ("probe_acc", "forget_acc_true", "forget_acc_edit"))


def test_latent_probes_last_token_layer0_is_uninformative(tokenizer, make_model, make_task):
    """At the last prompt token the embedding layer sees the same token ("of") for every prompt: the probe can
    only predict one class there."""
    model = make_model("llama", seed=2)
    task = make_task(n_athletes=60, n_forget=12, seed=13)
    result = latent_probes(model, tokenizer, task, position="last")
    truth = torch.tensor([[" football", " baseball", " basketball"].index(a) for a in task.forget_test.answers])
    shares = torch.bincount(truth, minlength=3).double() / len(truth)
    assert any(abs(result["forget_acc_true"][0] - float(s)) < 1e-6 for s in shares)


def test_linear_probes_dataclass_roundtrip():
    probes = LinearProbes(torch.zeros(2, 3, 4), torch.zeros(2, 4), torch.zeros(2, 3), torch.ones(2, 3), torch.zeros(2))
    assert probes.n_layers == 2
    assert probes.predict_proba(torch.randn(2, 5, 3)).sum(-1).allclose(torch.ones(2, 5))


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (GPU-only check)")


@requires_cuda
def test_collect_hidden_and_probes_on_cuda_match_cpu(tokenizer, make_model, make_task, rng):
    torch.backends.cuda.matmul.allow_tf32 = False
    model = make_model("llama", seed=4, num_hidden_layers=3)
    tok = tokenize_prompts(tokenizer, make_task(n_athletes=20, n_forget=7, seed=3).formats["paraphrase"]["forget"])
    cpu = collect_hidden(model, tok, position="subject_last", batch_size=3)
    gpu = collect_hidden(model.cuda(), tok, position="subject_last", batch_size=3)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=1e-5)
    x, y = planted(3, 300, 8, 3, {1}, rng)
    probes_cpu = train_probes(x, y, 3, tolerance=1e-10)
    probes_gpu = train_probes(x.cuda(), y.cuda(), 3, tolerance=1e-10)
    # Both stop within ~1e-8 of the same optimum (see the Newton test); reduction orders differ.
    torch.testing.assert_close(probes_gpu.predict_proba(x.cuda()).cpu(), probes_cpu.predict_proba(x), atol=1e-6, rtol=0)
