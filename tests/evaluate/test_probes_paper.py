"""The authors' latent-probe setting: left-padded HF hidden states 0..L-1 at the last token, raw features, grouped
order, sklearn's stratified split (seed 42) and multinomial logistic regression; the standardised variant stays."""

from __future__ import annotations

import pytest
import torch

from mu_fast.data.base import tokenize_prompts
from mu_fast.evaluate import collect_hidden, latent_probes, train_probes


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("position", ["last", "subject_last"])
def test_left_padding_matches_right_padding(tokenizer, make_model, make_task, arch, position):
    model = make_model(arch, seed=4, num_hidden_layers=2)
    tok = tokenize_prompts(tokenizer, make_task(n_athletes=20, n_forget=7, seed=3).formats["paraphrase"]["forget"])
    right = collect_hidden(model, tok, position=position, batch_size=5)
    left = collect_hidden(model, tok, position=position, batch_size=5, padding="left")
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="padding must be"):
        collect_hidden(model, tok, padding="middle")


def authors_probe(model, tokenizer, task):
    """The authors' loop, written from their script: per sport in order of first appearance, left-padded batches
    of 32 through HF with output_hidden_states, hidden_states[l][:, -1] for l < L; sklearn split and probes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    L = model.config.num_hidden_layers
    tokenizer.padding_side = "left"

    def acts(prompts):
        out = [[] for _ in range(L)]
        for i in range(0, len(prompts), 32):
            enc = tokenizer(prompts[i : i + 32], return_tensors="pt", padding=True)
            with torch.no_grad():
                hs = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, output_hidden_states=True).hidden_states
            for layer in range(L):
                out[layer].append(hs[layer][:, -1])
        return [torch.cat(o).float().numpy() for o in out]

    sport_id = {s: k for k, s in enumerate(sorted({a.strip() for a in task.maintain_train.answers}))}
    answers = [a.strip() for a in task.maintain_train.answers]
    feats, labels, rows = [[] for _ in range(L)], [], []
    for sport in dict.fromkeys(answers):
        prompts = [p for p, a in zip(task.maintain_train.prompts, answers) if a == sport]
        rows += [i for i, a in enumerate(answers) if a == sport]
        for layer, a in enumerate(acts(prompts)):
            feats[layer].append(torch.from_numpy(a))
        labels += [sport_id[sport]] * len(prompts)
    forget = acts(list(task.forget_test.prompts))
    truth = [sport_id.get(a.strip(), -1) for a in task.forget_test.answers]
    train_acc, test_acc, forget_acc = [], [], []
    train_rows = sorted(train_test_split(rows, test_size=0.2, random_state=42, stratify=labels)[0])
    for layer in range(L):
        X = torch.cat(feats[layer]).numpy()
        X_train, X_test, y_train, y_test = train_test_split(X, labels, test_size=0.2, random_state=42, stratify=labels)
        probe = LogisticRegression(max_iter=1000).fit(X_train, y_train)
        train_acc.append(float((probe.predict(X_train) == y_train).mean()))
        test_acc.append(float((probe.predict(X_test) == y_test).mean()))
        forget_acc.append(float((probe.predict(forget[layer]) == truth).mean()))
    return train_acc, test_acc, forget_acc, train_rows


def test_paper_setting_reproduces_the_authors_loop(build_tokenizer, make_model, make_task):
    pytest.importorskip("sklearn", reason="scikit-learn not installed (lm-eval brings it)")
    tokenizer = build_tokenizer()
    model = make_model("llama", seed=2, num_hidden_layers=3, initializer_range=0.1)
    task = make_task(n_athletes=72, n_forget=12, seed=9)
    result = latent_probes(model, tokenizer, task, setting="paper")
    train_acc, test_acc, forget_acc, train_rows = authors_probe(model, tokenizer, task)
    assert result["train_rows"] == train_rows  # grouped by sport in order of first appearance, then split
    assert result["layers"] == [0, 1, 2]  # the last boundary is skipped
    assert result["probe_train_acc"] == pytest.approx(train_acc)
    assert result["probe_acc"] == pytest.approx(test_acc)
    assert result["forget_acc_true"] == pytest.approx(forget_acc)
    assert len(set(test_acc)) > 1 and 0 < min(test_acc) < 1  # not a trivial all-or-nothing probe
    assert result["setting"] == "paper" and result["padding"] == "left" and "sklearn" in result["probe"]
    assert result["classes"] == [" baseball", " basketball", " football"]
    assert result["n_train"] + result["n_test"] == len(task.maintain_train)
    standardized = latent_probes(model, tokenizer, task)
    assert standardized["setting"] == "standardized" and standardized["layers"] == [0, 1, 2, 3]


def test_torch_backend_without_sklearn(tokenizer, make_model, make_task, monkeypatch):
    import mu_fast.evaluate.probes_paper as paper

    model = make_model("llama", seed=6, num_hidden_layers=2, initializer_range=0.3)
    task = make_task(n_athletes=60, n_forget=10, seed=9)
    monkeypatch.setattr(paper, "_sklearn", lambda: None)
    result = latent_probes(model, tokenizer, task, setting="paper")
    assert "torch L-BFGS" in result["probe"] and "stratified_split" in result["split"]
    assert len(result["probe_acc"]) == 2 and all(0 <= a <= 1 for a in result["forget_acc_true"])
    with pytest.raises(ValueError, match="needs scikit-learn"):
        latent_probes(model, tokenizer, task, setting="paper", probe_backend="sklearn")
    with pytest.raises(ValueError, match="setting must be"):
        latent_probes(model, tokenizer, task, setting="exact")


def test_raw_feature_probes_match_sklearn(rng):
    """train_probes(standardize=False) solves sklearn's objective on raw features (offset and scaled here)."""
    linear = pytest.importorskip("sklearn.linear_model")
    L, N, d, C = 2, 240, 5, 3
    y = torch.randint(0, C, (N,), generator=rng)
    centers = torch.randn(C, d, generator=rng, dtype=torch.float64)
    x = (centers[y] + torch.randn(L, N, d, generator=rng, dtype=torch.float64)) * 4.0 + 3.0
    probes = train_probes(x, y, C, standardize=False, steps=1000, tolerance=1e-10)
    assert torch.equal(probes.mean, torch.zeros_like(probes.mean)) and torch.equal(probes.scale, torch.ones_like(probes.scale))
    for layer in range(L):
        clf = linear.LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x[layer].numpy(), y.numpy())
        want = torch.from_numpy(clf.predict_proba(x[layer].numpy()))
        torch.testing.assert_close(probes.predict_proba(x)[layer], want, atol=1e-4, rtol=0)
