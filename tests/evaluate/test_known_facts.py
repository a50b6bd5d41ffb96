"""The "does the model know these facts?" check: unknown tokens and accuracy at chance are caught before an edit."""

import warnings

import pytest

from mu_fast.evaluate.known_facts import (
    UnknownFactsError,
    UnknownFactsWarning,
    chance_accuracy,
    check_known_facts,
)
from tests._tiny_task import NAMES, tiny_task, word_tokenizer


def tokenizer(missing: str | None = None):
    """The tiny word tokenizer knowing every word of the tiny task ("Fact:" included), less ``missing``."""
    tok = word_tokenizer(extra_words=("Fact:",))
    if missing is not None:
        vocab = {w: i for w, i in tok.get_vocab().items() if w != missing}
        tok.backend_tokenizer.model = type(tok.backend_tokenizer.model)(vocab, unk_token="<unk>")
    return tok


def baseline_with(task, argmax: dict[str, float]):
    """An evaluate_task-shaped result with the given argmax accuracy per "format/split" (others 1.0)."""
    from mu_fast.evaluate.formats import task_prompt_sets

    out = {}
    for (fmt, split), ps in task_prompt_sets(task).items():
        out.setdefault(fmt, {})[split] = {"argmax_acc": argmax.get(f"{fmt}/{split}", 1.0), "n": len(ps)}
    return out


def with_qa(task):
    task.formats["qa"] = {"forget": task.forget_test, "maintain": task.maintain_test}
    return task


@pytest.mark.parametrize("accuracy, ok", [(1.0, True), (0.63, True), (0.61, False), (0.25, False)])
def test_training_format_at_chance_is_a_problem(accuracy, ok):
    task = tiny_task()
    assert chance_accuracy(task.forget_test) == 0.25  # four sport choices
    report = check_known_facts(None, tokenizer(), task, baseline=baseline_with(task, {"normal/forget": accuracy}))
    assert report.ok is ok, report.problems
    assert report.sets["normal/forget"]["threshold"] == pytest.approx(0.625)
    if not ok:
        assert "normal/forget argmax accuracy" in report.problems[0]
        with pytest.raises(UnknownFactsError, match="pass --allow-unknown-facts"):
            report.require(override="--allow-unknown-facts")


def test_other_formats_below_threshold_are_notes_not_problems():
    task = with_qa(tiny_task())
    report = check_known_facts(None, tokenizer(), task, baseline=baseline_with(task, {"qa/forget": 0.3}))
    assert report.ok and len(report.notes) == 1 and report.notes[0].startswith("qa/forget")
    with pytest.warns(UnknownFactsWarning, match="qa/forget"):
        report.require()


def test_unknown_tokens_are_a_problem_even_when_accuracy_is_high():
    task = tiny_task()
    report = check_known_facts(None, tokenizer(), task, baseline=baseline_with(task, {}))
    assert report.ok and report.sets["normal/maintain"]["unknown_token_prompts"] == 0
    # A tokenizer that lacks one name part: every prompt with it is flagged, with the subject as the example.
    missing = NAMES[0].split()[1]
    report = check_known_facts(None, tokenizer(missing), tiny_task(), baseline=baseline_with(task, {}))
    assert not report.ok and "'<unk>'" in report.problems[0] and repr(NAMES[0]) in report.problems[0]
    expected = sum(1 for n in NAMES[:4] if missing in n.split())
    assert report.sets["normal/forget"]["unknown_token_prompts"] == expected > 0
    with pytest.raises(UnknownFactsError) as err:
        report.require()
    assert err.value.report is report and "allow_unknown_facts=True" in str(err.value)
    with pytest.warns(UnknownFactsWarning, match="RUNNING ANYWAY"):
        report.require(allow=True)


def test_a_random_model_does_not_know_the_facts():
    from mu_fast.models.tiny import make_tiny_model

    tok = tokenizer()
    model = make_tiny_model("llama", vocab_size=len(tok), num_hidden_layers=2)
    report = check_known_facts(model, tok, tiny_task())
    assert not report.ok and any("normal/forget argmax accuracy" in p for p in report.problems)


def test_organism_with_the_real_sports_data_is_flagged(ci_organism, data_dir):
    """The issue's case: the organism's made-up-syllable vocabulary turns real athletes into unknown tokens."""
    from mu_fast.data import load_sports_task
    from mu_fast.organism import organism_task

    sports = load_sports_task("first_16_unsplit", data_dir=data_dir)
    report = check_known_facts(ci_organism.model, ci_organism.tokenizer, sports)
    assert not report.ok and "'<unk>'" in report.problems[0]
    assert report.sets["normal/forget"]["unknown_token_prompts"] == 16
    own = organism_task(ci_organism.facts, "first_16_unsplit", tokenizer=ci_organism.tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_known_facts(ci_organism.model, ci_organism.tokenizer, own).require()  # knows its own facts
