"""Models: the per-architecture site table, tiny test models, loading, and the gathered-logits forward."""

from mu_fast.models.sites import ARCHITECTURES, ArchSpec, Component, SiteTable

__all__ = ["ARCHITECTURES", "ArchSpec", "Component", "SiteTable"]
