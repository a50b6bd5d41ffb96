"""A tiny offline word-level tokenizer and hand-made fact task for pipeline tests (no organism, no data files)."""

from __future__ import annotations

from mu_fast.data.base import FactTask, PromptSet

SPORTS = [" football", " baseball", " basketball", " golf"]
NAMES = [f"{a} {b}" for a in ("Ka", "Lo", "Mi", "Ne", "Po", "Ru") for b in ("Zan", "Vel", "Tor", "Quin")]


def word_tokenizer(extra_words=()):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["Fact", ":", "plays", "the", "sport", "of", "Tiger", "Woods", "golf", "football", "baseball", "basketball"]
    words += [w for n in NAMES for w in n.split()] + list(extra_words) + ["some", "filler", "text", "here", "and", "more"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for w in words:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers.processors import TemplateProcessing

    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")


def tiny_task(n_forget: int = 4, unlearn: bool = False) -> FactTask:
    sports = [SPORTS[i % 3] for i in range(len(NAMES))]
    prompts = [f"Fact: Tiger Woods plays the sport of golf Fact: {n} plays the sport of" for n in NAMES]
    edits = [SPORTS[(i + 1) % 3] for i in range(len(NAMES))]

    def ps(idx, name):
        return PromptSet(
            [prompts[i] for i in idx], [sports[i] for i in idx], None if unlearn else [edits[i] for i in idx],
            choices=SPORTS, subjects=[NAMES[i] for i in idx], label_token="last", name=name,
        )

    forget = ps(range(n_forget), "forget")
    rest = list(range(n_forget, len(NAMES)))
    cut = int(0.8 * len(rest))
    return FactTask(
        "tiny", forget, forget, ps(rest[:cut], "maintain"), ps(rest[cut:], "maintain_test"),
        formats={"normal": {"forget": forget, "maintain": ps(rest[cut:], "maintain_test")}},
        lm_texts=["some filler text here and more filler text"] * 8, unlearn=unlearn, classes=SPORTS[:3],
    )


def word_checkpoint(folder, tasks, layers: int):
    """A save_pretrained folder: a tiny random Llama of ``layers`` layers with a word-level tokenizer of every word
    in ``tasks``' prompts, answers, edit answers and choices (all sets and formats). Returns ``folder``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from mu_fast.models.tiny import make_tiny_model

    sets = [s for t in tasks for s in (t.forget_train, t.forget_test, t.maintain_train, t.maintain_test,
                                       *(x for f in t.formats.values() for x in f.values()))]
    words = sorted({w for s in sets for text in [*s.prompts, *s.answers, *(s.edit_answers or []), *(s.choices or [])]
                    for w in str(text).split()})
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: i + 4 for i, w in enumerate(words)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>")
    make_tiny_model("llama", vocab_size=len(vocab), num_hidden_layers=layers).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
