"""softprompt.tasks.text.features: text examples tokenized for T5."""

from __future__ import annotations

from softprompt.tasks.text.features import tokenize_texts
from softprompt.tasks.text.spec import TextExample


def test_tokenize_texts_truncates_the_input_end_and_trains_every_target(tokenizer):
    examples = [
        TextExample("0", "one two three four five six seven eight", ("yes",)),
        TextExample("1", "short", ("first answer", "second")),
    ]
    eos = tokenizer.eos_token_id
    full = tokenizer(examples[0].inputs, add_special_tokens=False)["input_ids"]
    feats = tokenize_texts(examples, tokenizer, max_source_length=5, max_target_length=8)
    assert [f.example_index for f in feats] == [0, 1]
    assert feats[0].input_ids == [*full[:4], eos] and feats[0].truncated
    assert not feats[1].truncated
    assert feats[1].labels == [*tokenizer("first answer", add_special_tokens=False)["input_ids"], eos]
    train = tokenize_texts(examples, tokenizer, max_source_length=5, max_target_length=2, for_training=True)
    assert [f.example_index for f in train] == [0, 1, 1]
    assert all(len(f.labels) == 2 and f.labels[-1] == eos for f in train)
