"""The paper's latent-knowledge probe, ``latent_probes`` (authors_repo.md §4.7), in two settings.

``"paper"`` is the authors' exactly: raw (unstandardised) residual streams at boundaries 0..L-1 (the last one skipped),
collected with left padding and the model's default position ids, maintain-train facts grouped by answer in order of
first appearance, classes numbered alphabetically (their ``sport_dict``), sklearn's ``train_test_split(test_size=0.2,
random_state=42, stratify=y)`` and ``LogisticRegression(max_iter=1000)`` per layer (without scikit-learn: this
package's stratified split and the same objective solved by L-BFGS on raw features; the result says which;
``mu_fast.evaluate.probes_paper``). ``"standardized"`` (the default) standardises features per layer, probes every
boundary 0..L and uses right padding.

The features and probes (``collect_hidden``, ``train_probes``, ``LinearProbes``, ``stratified_split``) are in
``mu_fast.evaluate.linear_probes`` and importable from here too. ``probe_features`` collects what ``latent_probes``
fits, ``probe_features_variants`` the same for the K edited variants of a ``BatchedDeltas`` in one pass (a sweep
batch, ``ModelSession.execute_batch``); ``latent_probes(..., features=...)`` takes either.
"""

from __future__ import annotations

from typing import Any

import torch

from mu_fast.data.base import FactTask, TokenizedPrompts
from mu_fast.evaluate.linear_probes import (
    NEWTON_MAX_PARAMS,
    PADDING_SIDES,
    POSITIONS,
    PROBE_BACKENDS,
    PROBE_SOLVERS,
    LinearProbes,
    collect_hidden,
    collect_hidden_variants,
    decoder_layers,
    stratified_split,
    train_probes,
)

SETTINGS = ("standardized", "paper")

__all__ = ["NEWTON_MAX_PARAMS", "PADDING_SIDES", "POSITIONS", "PROBE_BACKENDS", "PROBE_SOLVERS", "SETTINGS",
           "LinearProbes", "collect_hidden", "decoder_layers", "latent_probes", "probe_features",
           "probe_features_variants", "probe_prompts", "stratified_split", "train_probes"]


def probe_prompts(tokenizer: Any, task: FactTask, setting: str = "standardized"
                  ) -> tuple[TokenizedPrompts, TokenizedPrompts, str]:
    """``(maintain-train, forget-test, padding side)``: the prompts ``latent_probes`` reads features of, tokenized
    (cached on the task), in the setting's order (``"paper"``: maintain facts grouped by answer) and padding."""
    from mu_fast.evaluate.formats import tokenized_set

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}; got {setting!r}")
    maintain = tokenized_set(tokenizer, task, task.maintain_train)
    forget = tokenized_set(tokenizer, task, task.forget_test)
    if setting == "standardized":
        return maintain, forget, "right"
    from mu_fast.evaluate.probes_paper import paper_maintain_order

    return maintain.subset(paper_maintain_order(task)), forget, "left"


def probe_features(model: Any, tokenizer: Any, task: FactTask, position: str = "last", batch_size: int = 64,
                   setting: str = "standardized") -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(maintain-train, forget-test)`` features ``latent_probes`` fits and scores: ``collect_hidden`` of the
    ``probe_prompts``, each ``[L+1, N, d]`` on the model's device."""
    maintain, forget, padding = probe_prompts(tokenizer, task, setting)
    return (collect_hidden(model, maintain, position, batch_size, padding),
            collect_hidden(model, forget, position, batch_size, padding))


def probe_features_variants(model: Any, tokenizer: Any, task: FactTask, deltas: Any, position: str = "last",
                            batch_size: int = 64, setting: str = "standardized"
                            ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``probe_features`` of each of the K configurations of ``deltas`` (a ``mu_fast.edit.batched.BatchedDeltas``
    over ``model``, none applied), in one forward per batch (``collect_hidden_variants``); element k is what
    ``latent_probes(..., features=...)`` takes under ``deltas.variant(k)``. Holds K times the features of one run
    on the model's device."""
    maintain, forget, padding = probe_prompts(tokenizer, task, setting)
    return list(zip(collect_hidden_variants(model, maintain, deltas, position, batch_size, padding),
                    collect_hidden_variants(model, forget, deltas, position, batch_size, padding), strict=True))


def _checked(features: tuple[torch.Tensor, torch.Tensor] | None, maintain: TokenizedPrompts,
             forget: TokenizedPrompts) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``features`` after checking they hold one row per maintain-train and forget-test prompt (None stays None)."""
    if features is None:
        return None
    if len(features) != 2 or any(h.dim() != 3 or h.shape[1] != len(t) for h, t in zip(features, (maintain, forget))):
        raise ValueError(f"features must be (maintain [L+1, {len(maintain)}, d], forget [L+1, {len(forget)}, d]) as "
                         f"probe_features returns; got shapes {[tuple(h.shape) for h in features]}")
    return features[0], features[1]


def latent_probes(
    model: Any,
    tokenizer: Any,
    task: FactTask,
    position: str = "last",
    test_fraction: float = 0.2,
    seed: int = 42,
    batch_size: int = 64,
    weight_decay: float | None = None,
    steps: int = 200,
    setting: str = "standardized",
    probe_backend: str = "auto",
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """The paper's latent-knowledge probe (authors_repo.md §4.7), for every layer boundary at once.

    setting: "standardized" (below) or "paper" (the authors' exact recipe, module docstring; ``test_fraction``,
    ``seed``, ``weight_decay`` and ``steps`` do not apply, probe_backend "auto" | "sklearn" | "torch" picks the
    solver). Both results carry ``"setting"``, ``"padding"`` and ``"probe"`` (which solver ran).

    Features: the residual stream at the last prompt token (``position``) of the training-format prompts.
    Probes are trained on the maintain-train facts (a seeded stratified ``1-test_fraction`` part; the rest
    measures probe quality) and applied to the forget facts (``task.forget_test``), scored against the true
    answer and against the edit answer. Classes: ``task.classes`` restricted to the answers seen in maintain
    training (an edit answer outside them, e.g. " golf", can never be predicted and scores 0).

    Returns ``{"layers": [0..L], "probe_acc": [L+1] (held-out maintain), "forget_acc_true": [L+1],
    "forget_acc_edit": [L+1] or None, "classes", "n_train", "n_test", "n_forget", "position"}``; lists of
    floats. The paper skipped the last boundary; here it is included (index L, before the final norm).

    features: the ``(maintain-train, forget-test)`` residual streams this call would collect (``probe_features``, or
    ``probe_features_variants`` for K edited variants in one pass); None collects them from ``model``.
    """
    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}; got {setting!r}")
    if setting == "paper":
        from mu_fast.evaluate.probes_paper import paper_latent_probes

        if features is not None:
            features = _checked(features, *probe_prompts(tokenizer, task, setting)[:2])
        return paper_latent_probes(model, tokenizer, task, position, batch_size, probe_backend, features)
    maintain, forget, _ = probe_prompts(tokenizer, task, setting)
    order = list(task.classes) if task.classes else sorted(set(task.maintain_train.answers))
    seen = set(task.maintain_train.answers)
    classes = [c for c in order if c in seen] + sorted(seen - set(order))
    if len(classes) < 2:
        raise ValueError(
            f"task {task.name!r}: maintain-train facts have {len(classes)} answer class(es) {classes}; probes need >= 2"
        )
    index = {c: i for i, c in enumerate(classes)}

    def class_ids(answers: Any) -> torch.Tensor:
        return torch.tensor([index.get(a, -1) for a in answers], dtype=torch.int64)

    y_maintain = class_ids(task.maintain_train.answers)
    train_idx, test_idx = stratified_split(y_maintain, test_fraction, seed)
    h_maintain, h_forget = _checked(features, maintain, forget) or probe_features(model, tokenizer, task, position,
                                                                                  batch_size, setting)
    probes = train_probes(
        h_maintain[:, train_idx.to(h_maintain.device)],
        y_maintain[train_idx],
        len(classes),
        weight_decay=weight_decay,
        steps=steps,
    )
    edit = task.forget_test.edit_answers
    return {
        "layers": list(range(h_maintain.shape[0])),
        "probe_acc": probes.accuracy(h_maintain[:, test_idx.to(h_maintain.device)], y_maintain[test_idx]).tolist()
        if test_idx.numel()
        else None,
        "forget_acc_true": probes.accuracy(h_forget, class_ids(task.forget_test.answers)).tolist(),
        "forget_acc_edit": None if edit is None else probes.accuracy(h_forget, class_ids(edit)).tolist(),
        "classes": classes,
        "n_train": int(train_idx.numel()),
        "n_test": int(test_idx.numel()),
        "n_forget": len(task.forget_test),
        "position": position,
        "setting": "standardized",
        "padding": "right",
        "probe": "torch L-BFGS multinomial logistic regression on per-layer standardised features",
    }
