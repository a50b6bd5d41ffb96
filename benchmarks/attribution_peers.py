"""Peer implementations of the same attribution run, for benchmarks/bench_attribution.py.

Every peer computes denoising AtP of the raw logit difference (answer minus the mean of wrong answers at the
last position), summed over prompts, for every attention head (``z`` = o_proj input) and every MLP output:
``heads [L, H]`` and ``mlp [L]`` in float32, so scores can be compared with mu_fast's before timing.
Prompts have equal length (no padding), the one layout every peer handles.
"""

from __future__ import annotations

from typing import Any

import torch


def _logit_diff(last_logits: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(last_logits.shape[0], device=last_logits.device)
    return (last_logits[rows, correct] - last_logits.gather(1, wrong).mean(1)).sum()


def plain_hf_hooks(model: Any, clean: torch.Tensor, corrupt: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> dict[str, torch.Tensor]:
    """The floor for "no framework": torch hooks on the HF modules, one no-grad clean forward caching the
    sites, one corrupt forward + backward with retain_grad at the sites, weights frozen, logits at the
    last position only."""
    layers = model.model.layers
    L, H = len(layers), model.config.num_attention_heads
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        acts: dict[tuple[str, int], torch.Tensor] = {}

        def hooks(store_grad: bool) -> list[Any]:
            out = []
            for i, layer in enumerate(layers):
                def pre(m, args, i=i):
                    z = args[0]
                    if store_grad:
                        if not z.requires_grad:  # only the first site: later ones must keep their upstream graph
                            z = z.detach().requires_grad_(True)
                        z.retain_grad()
                    acts[("z", i)] = z
                    return (z, *args[1:])

                def post(m, args, out_, i=i):
                    if store_grad:
                        out_.retain_grad()
                    acts[("mlp", i)] = out_

                out.append(layer.self_attn.o_proj.register_forward_pre_hook(pre))
                out.append(layer.mlp.register_forward_hook(post))
            return out

        handles = hooks(False)
        with torch.no_grad():
            model.model(input_ids=clean)
        for h in handles:
            h.remove()
        clean_acts = dict(acts)
        handles = hooks(True)
        hidden = model.model(input_ids=corrupt).last_hidden_state
        for h in handles:
            h.remove()
        logits = model.lm_head(hidden[:, -1]).float()
        cap = getattr(model.config, "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
        _logit_diff(logits, correct, wrong).backward()
        heads = torch.stack([((clean_acts[("z", i)] - acts[("z", i)].detach()) * acts[("z", i)].grad).float().view(*clean.shape, H, -1).sum((0, 1, 3)) for i in range(L)])
        mlp = torch.stack([((clean_acts[("mlp", i)] - acts[("mlp", i)].detach()) * acts[("mlp", i)].grad).float().sum() for i in range(L)])
        return {"heads": heads, "mlp": mlp}
    finally:
        for p, f in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(f)


def tl_tutorial(bridge: Any, clean: torch.Tensor, corrupt: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> dict[str, torch.Tensor]:
    """TransformerLens' Attribution_Patching_Demo recipe on a TransformerBridge: ``get_cache_fwd_and_bwd``
    (forward hooks caching every activation except ``*_input`` and backward hooks caching their gradients,
    full-vocabulary logits, weight gradients as loaded) on the clean and on the corrupt prompts, then
    ``(clean − corrupt) · corrupt_grad`` at ``hook_z`` and ``hook_mlp_out``."""

    def not_input(name: str) -> bool:
        return "_input" not in name

    def fwd_bwd(tokens: torch.Tensor) -> tuple[dict, dict]:
        bridge.reset_hooks()
        cache: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        bridge.add_hook(not_input, lambda act, hook: cache.__setitem__(hook.name, act.detach()), "fwd")
        bridge.add_hook(not_input, lambda act, hook: grads.__setitem__(hook.name, act.detach()), "bwd")
        logits = bridge(tokens)
        _logit_diff(logits[:, -1].float(), correct, wrong).backward()
        bridge.reset_hooks()
        bridge.zero_grad(set_to_none=True)
        return cache, grads

    clean_cache, _ = fwd_bwd(clean)
    corrupt_cache, corrupt_grads = fwd_bwd(corrupt)
    L = bridge.cfg.n_layers
    heads, mlp = [], []
    for i in range(L):
        z = f"blocks.{i}.attn.o.hook_in"  # canonical name of the hook_z alias (hook.name reports canonical names)
        diff = (clean_cache[z] - corrupt_cache[z]) * corrupt_grads[z]
        heads.append(diff.float().reshape(*clean.shape, bridge.cfg.n_heads, -1).sum((0, 1, 3)))
        m = f"blocks.{i}.mlp.hook_out"  # hook_mlp_out
        mlp.append(((clean_cache[m] - corrupt_cache[m]) * corrupt_grads[m]).float().sum())
    return {"heads": torch.stack(heads), "mlp": torch.stack(mlp)}


def tl_expert(bridge: Any, clean: torch.Tensor, corrupt: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> dict[str, torch.Tensor]:
    """An expert TransformerBridge run: ``names_filter`` restricted to ``hook_z`` / ``hook_mlp_out``, a no-grad
    clean ``run_with_cache``, one corrupt forward + backward with hooks on those names only, weights frozen
    (gradients enter at ``hook_embed``)."""
    L = bridge.cfg.n_layers
    # Canonical names of hook_z / hook_mlp_out (hooks report canonical names).
    names = [f"blocks.{i}.attn.o.hook_in" for i in range(L)] + [f"blocks.{i}.mlp.hook_out" for i in range(L)]
    flags = [p.requires_grad for p in bridge.parameters()]
    for p in bridge.parameters():
        p.requires_grad_(False)
    try:
        with torch.no_grad():
            _, clean_cache = bridge.run_with_cache(clean, names_filter=lambda n: n in names)
        acts: dict[str, torch.Tensor] = {}
        grads: dict[str, torch.Tensor] = {}
        bridge.reset_hooks()
        bridge.add_hook("hook_embed", lambda act, hook: act.detach().requires_grad_(True), "fwd")
        for n in names:
            bridge.add_hook(n, lambda act, hook: acts.__setitem__(hook.name, act.detach()), "fwd")
            bridge.add_hook(n, lambda g, hook: grads.__setitem__(hook.name, g.detach()), "bwd")
        logits = bridge(corrupt)
        _logit_diff(logits[:, -1].float(), correct, wrong).backward()
        bridge.reset_hooks()
    finally:
        for p, f in zip(bridge.parameters(), flags, strict=True):
            p.requires_grad_(f)
    heads = [((clean_cache[names[i]] - acts[names[i]]) * grads[names[i]]).float().reshape(*clean.shape, bridge.cfg.n_heads, -1).sum((0, 1, 3)) for i in range(L)]
    mlp = [((clean_cache[names[L + i]] - acts[names[L + i]]) * grads[names[L + i]]).float().sum() for i in range(L)]
    return {"heads": torch.stack(heads), "mlp": torch.stack(mlp)}


def nnsight_docs(lm: Any, clean: torch.Tensor, corrupt: torch.Tensor, correct: torch.Tensor, wrong: torch.Tensor) -> dict[str, torch.Tensor]:
    """nnsight's attribution-patching pattern: a clean trace saving the o_proj inputs and MLP outputs, then a
    corrupt trace whose metric runs ``.backward()`` with the sites' ``.grad`` saved in reverse order (weights
    as loaded, full-vocabulary logits)."""
    L = lm.config.num_hidden_layers
    H = lm.config.num_attention_heads
    # nnsight serves activations in forward order: read each layer's z, then its MLP output.
    clean_z, clean_m, zs, ms, g_z, g_m = ([None] * L for _ in range(6))
    with lm.trace(clean):
        for i in range(L):
            clean_z[i] = lm.model.layers[i].self_attn.o_proj.input.save()
            clean_m[i] = lm.model.layers[i].mlp.output.save()
    with lm.trace(corrupt):
        for i in range(L):
            zs[i] = lm.model.layers[i].self_attn.o_proj.input.save()
            ms[i] = lm.model.layers[i].mlp.output.save()
        logits = lm.lm_head.output
        metric = _logit_diff(logits[:, -1].float(), correct, wrong)
        with metric.backward():
            for i in reversed(range(L)):
                g_m[i] = ms[i].grad.save()
                g_z[i] = zs[i].grad.save()
    lm._module.zero_grad(set_to_none=True)
    heads = torch.stack([((clean_z[i] - zs[i]) * g_z[i]).float().view(*clean.shape, H, -1).sum((0, 1, 3)) for i in range(L)])
    mlp = torch.stack([((clean_m[i] - ms[i]) * g_m[i]).float().sum() for i in range(L)])
    return {"heads": heads.detach(), "mlp": mlp.detach()}
