"""The authors' latent-knowledge probe, step by step as their sports script ran it (authors_repo.md §4.7).

1. Maintain-train facts grouped by answer in order of first appearance (their loop over
   ``train_df["sport"].unique()``), within a group in row order (sklearn's stratified split draws per class in
   row order, so grouping does not change which facts train the probes); classes numbered alphabetically by
   answer (their ``sport_dict``: baseball 0, basketball 1, football 2, golf 3; golf never occurs in maintain).
2. Features: ``hidden_states[l][:, -1]`` for l = 0..L-1 of left-padded batches (the last boundary skipped), fp32.
3. ``train_test_split(X, y, test_size=0.2, random_state=42, stratify=y)``, then per layer
   ``LogisticRegression(max_iter=1000)`` (lbfgs, multinomial, C=1) on the raw features; train and test accuracy.
4. The forget-test facts through the same probes, scored against the true and the edit answers.

Without scikit-learn, step 3 uses ``stratified_split(seed=42)`` (another split of the same sizes) and the same
objective solved by L-BFGS on the raw features (``train_probes(standardize=False)``); the result names what ran.
"""

from __future__ import annotations

from typing import Any

import torch

from mu_fast.data.base import FactTask


def _sklearn() -> Any | None:
    try:
        import sklearn
        import sklearn.linear_model  # noqa: F401
        import sklearn.model_selection  # noqa: F401
    except ImportError:
        return None
    return sklearn


def paper_maintain_order(task: FactTask) -> list[int]:
    """The authors' order of the maintain-train facts: grouped by answer in order of first appearance."""
    answers = list(task.maintain_train.answers)
    first_seen = {a: k for k, a in reversed(list(enumerate(answers)))}
    return sorted(range(len(answers)), key=lambda i: (first_seen[answers[i]], i))


def paper_latent_probes(model: Any, tokenizer: Any, task: FactTask, position: str = "last", batch_size: int = 64,
                        probe_backend: str = "auto", features: tuple[torch.Tensor, torch.Tensor] | None = None
                        ) -> dict[str, Any]:
    """``latent_probes(..., setting="paper")``: see the module docstring. Returns the keys of the standardised
    setting (``layers`` = 0..L-1) plus ``probe_train_acc`` (the authors' ``maintain_train_accs``) and
    ``train_rows`` (the maintain-train rows the probes were fit on, ascending). ``features``: as
    ``latent_probes``' (``probe_features(..., setting="paper")``: the maintain facts in ``paper_maintain_order``)."""
    from mu_fast.evaluate.formats import tokenized_set
    from mu_fast.evaluate.linear_probes import PROBE_BACKENDS, collect_hidden, stratified_split, train_probes

    if probe_backend not in PROBE_BACKENDS:
        raise ValueError(f"probe_backend must be one of {PROBE_BACKENDS}; got {probe_backend!r}")
    sklearn = _sklearn() if probe_backend in ("auto", "sklearn") else None
    if probe_backend == "sklearn" and sklearn is None:
        raise ValueError("probe_backend='sklearn' needs scikit-learn (pip install scikit-learn); or use 'torch'")
    answers = list(task.maintain_train.answers)
    order = paper_maintain_order(task)
    classes = sorted(set(answers), key=lambda a: a.strip())
    if len(classes) < 2:
        raise ValueError(f"task {task.name!r}: maintain-train facts have {len(classes)} answer class(es); probes need >= 2")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[answers[i]] for i in order], dtype=torch.int64)
    if features is None:
        maintain = tokenized_set(tokenizer, task, task.maintain_train).subset(order)
        forget = tokenized_set(tokenizer, task, task.forget_test)
        features = (collect_hidden(model, maintain, position, batch_size, padding="left"),
                    collect_hidden(model, forget, position, batch_size, padding="left"))
    h, h_forget = features[0][:-1].cpu(), features[1][:-1].cpu()  # [L, N, d]: the last boundary skipped, as the authors
    L, N = h.shape[0], h.shape[1]

    def class_ids(values: Any) -> torch.Tensor:
        return torch.tensor([index.get(a, -1) for a in values], dtype=torch.int64)

    truth, edit = class_ids(task.forget_test.answers), task.forget_test.edit_answers
    edit_ids = None if edit is None else class_ids(edit)
    if sklearn is not None:
        train_idx, test_idx = sklearn.model_selection.train_test_split(
            list(range(N)), test_size=0.2, random_state=42, stratify=y.numpy())
        split = f"sklearn train_test_split(test_size=0.2, random_state=42, stratify=y), scikit-learn {sklearn.__version__}"
        train_idx, test_idx = torch.tensor(train_idx), torch.tensor(test_idx)
        predict = _sklearn_predictions(sklearn, h, y, train_idx, {"train": h[:, train_idx], "test": h[:, test_idx],
                                                                  "forget": h_forget})
        probe = "sklearn LogisticRegression(max_iter=1000) per layer on raw features"
    else:
        train_idx, test_idx = stratified_split(y, 0.2, seed=42)
        split = "mu_fast stratified_split(0.2, seed=42) (scikit-learn not used)"
        probes = train_probes(h[:, train_idx], y[train_idx], len(classes), weight_decay=1.0 / len(train_idx),
                              steps=1000, standardize=False)
        predict = {k: probes.predict(v) for k, v in {"train": h[:, train_idx], "test": h[:, test_idx], "forget": h_forget}.items()}
        probe = "torch L-BFGS multinomial logistic regression on raw features (sklearn's objective, C=1)"

    def accuracy(pred: torch.Tensor, labels: torch.Tensor) -> list[float]:
        return (pred == labels[None]).double().mean(1).tolist()

    return {
        "layers": list(range(L)),
        "probe_train_acc": accuracy(predict["train"], y[train_idx]),
        "probe_acc": accuracy(predict["test"], y[test_idx]),
        "forget_acc_true": accuracy(predict["forget"], truth),
        "forget_acc_edit": None if edit_ids is None else accuracy(predict["forget"], edit_ids),
        "classes": classes,
        "n_train": int(train_idx.numel()),
        "train_rows": sorted(order[i] for i in train_idx.tolist()),
        "n_test": int(test_idx.numel()),
        "n_forget": len(task.forget_test),
        "position": position,
        "setting": "paper",
        "padding": "left",
        "split": split,
        "probe": probe,
    }


def _sklearn_predictions(sklearn: Any, h: torch.Tensor, y: torch.Tensor, train_idx: torch.Tensor,
                         evaluate: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer: fit LogisticRegression(max_iter=1000) on ``h[l, train_idx]`` and predict each ``evaluate`` set;
    returns ``{name: [L, M] int64}``."""
    import warnings

    out: dict[str, list[torch.Tensor]] = {k: [] for k in evaluate}
    for layer in range(h.shape[0]):
        clf = sklearn.linear_model.LogisticRegression(max_iter=1000)
        with warnings.catch_warnings():  # unconverged fits are part of the authors' recipe
            warnings.simplefilter("ignore")
            clf.fit(h[layer, train_idx].float().numpy(), y[train_idx].numpy())
        for name, features in evaluate.items():
            out[name].append(torch.from_numpy(clf.predict(features[layer].float().numpy())).to(torch.int64))
    return {k: torch.stack(v) for k, v in out.items()}
