"""Memory planning for localized edits: estimate the device peak of an edit step, choose the cheapest settings that
fit a budget, and check the estimate by tracing a real step on fake tensors.

    from mu_fast.memory import plan, plan_report
    p = plan("gemma-2-9b", mask, device_bytes="24GB")      # or a transformers config
    print(p.format()); cfg = p.edit_config()               # the EditConfig with the chosen settings
    b = plan_batch("llama-3-8b", [mask] * 16, device_bytes="80GB")   # K configurations trained together
    b.k, b.groups_per_pass                                 # how many fit, and how many groups per forward/backward

``mu_fast.memory.trace.trace_peak`` (imported lazily: it builds models) is the check.
"""

from mu_fast.memory.batch import BatchPlan, plan_batch
from mu_fast.memory.estimate import CATEGORIES, WORKSPACE_BYTES, Estimate, Settings, estimate
from mu_fast.memory.plan import Candidate, MemoryPlan, describe, plan, plan_report
from mu_fast.memory.shapes import BatchShape, ModelShape, parse_budget


def trace_peak(*args, **kwargs):
    """``mu_fast.memory.trace.trace_peak`` (see there)."""
    from mu_fast.memory.trace import trace_peak as _trace_peak

    return _trace_peak(*args, **kwargs)


__all__ = ["BatchPlan", "BatchShape", "CATEGORIES", "Candidate", "Estimate", "MemoryPlan", "ModelShape", "Settings",
           "WORKSPACE_BYTES", "describe", "estimate", "parse_budget", "plan", "plan_batch", "plan_report", "trace_peak"]
