"""preset_config: a named preset's EditConfig for one localization method (its method group's settings)."""

from mu_fast.edit import EditConfig
from mu_fast.sweep.presets import preset_config


def test_preset_config_takes_the_settings_of_the_methods_group():
    from mu_fast.organism.lr_choice import organism_groups

    groups = organism_groups()
    assert preset_config("organism", "atp") == EditConfig(**groups["tracing"])
    assert preset_config("organism", "flu") == EditConfig(**groups["lookup"])
    assert preset_config("organism") == EditConfig(**groups["lookup"])  # a hand-made mask: the lookup group
    assert preset_config("default", "all_mlps") == EditConfig()
    paper = preset_config("paper_sports:gemma-2-9b:forget_16", "atp", steps=5)
    assert (paper.lr, paper.forget_coef, paper.steps, paper.state_bits) == (5e-5, 5.0, 5, 8)
