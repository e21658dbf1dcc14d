"""The soft prompt module and its initialisations."""

from __future__ import annotations

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.modeling.prompt import SAMPLED_VOCAB_ROWS, PromptInit, SoftPrompt, initial_prompt


def test_prompt_is_float32_and_broadcasts_without_copy():
    p = SoftPrompt(7, 16)
    assert p.weight.dtype == torch.float32 and p.weight.shape == (7, 16)
    out = p(3)
    assert out.shape == (3, 7, 16)
    assert out.data_ptr() == p.weight.data_ptr()  # a view


def test_sampled_vocab_takes_distinct_rows_from_first_5000_only():
    vocab = torch.arange(32128, dtype=torch.float32).unsqueeze(1).repeat(1, 4)  # row i holds value i
    out = initial_prompt(PromptInit.SAMPLED_VOCAB, 100, vocab, seed=3)
    ids = out[:, 0].long()
    assert len(set(ids.tolist())) == 100  # without replacement
    assert int(ids.max()) < SAMPLED_VOCAB_ROWS
    assert ids.tolist() != list(range(100))  # not simply the first 100 rows (the earlier replication's bug)
    assert torch.equal(out, initial_prompt("sampled_vocab", 100, vocab, seed=3))  # reproducible
    assert not torch.equal(out, initial_prompt("sampled_vocab", 100, vocab, seed=4))


def test_sampled_vocab_spreads_over_the_5000_rows():
    vocab = torch.arange(32128, dtype=torch.float32).unsqueeze(1)
    ids = initial_prompt("sampled_vocab", 1000, vocab, seed=0)[:, 0]
    # uniform over [0, 5000): mean ~2500, and plenty beyond row 4000
    assert 2200 < float(ids.mean()) < 2800
    assert int((ids >= 4000).sum()) > 100


def test_uniform_is_flax_uniform_half_open_zero_to_half():
    """flax.linen.initializers.uniform(scale=0.5) (the official gin default) draws U[0, 0.5)."""
    emb = torch.zeros(50, 64)
    out = initial_prompt("uniform", 100, emb, seed=1)
    assert out.shape == (100, 64) and out.dtype == torch.float32
    assert float(out.min()) >= 0.0 and float(out.max()) < 0.5
    # Spread over the whole range, not a sliver of it: 6,400 draws reach both ends.
    assert float(out.min()) < 0.05 and float(out.max()) > 0.45
    assert float(out.mean()) == pytest.approx(0.25, abs=0.01)
    assert float(out.std()) == pytest.approx(0.5 / 12**0.5, rel=0.05)
    assert torch.equal(out, initial_prompt("uniform", 100, emb, seed=1))
    assert not torch.equal(out, initial_prompt("uniform", 100, emb, seed=2))


def test_text_init_repeats_token_embeddings(tokenizer):
    emb = torch.randn(32128, 8)
    out = initial_prompt("text", 5, emb, text="question answer", tokenizer=tokenizer)
    ids = tokenizer("question answer", add_special_tokens=False).input_ids
    assert len(ids) == 2
    expected = emb[torch.tensor([ids[0], ids[1], ids[0], ids[1], ids[0]])]
    assert torch.equal(out, expected)


def test_bad_inits_raise_config_errors():
    emb = torch.zeros(10, 4)
    with pytest.raises(ConfigError, match="n_tokens must be <= 10"):
        initial_prompt("sampled_vocab", 11, emb)
    with pytest.raises(ConfigError, match="prompt_init_text"):
        initial_prompt("text", 3, emb)
    with pytest.raises(ValueError):
        initial_prompt("nonsense", 3, emb)


def test_class_label_init_places_label_means_first_then_sampled_vocab(tokenizer):
    """Paper section 3.2: vector i starts as class label i's embedding (the mean over its tokens); the
    rest are the rows sampled_vocab draws with the same seed, from the first 5,000 rows."""
    emb = torch.randn(32128, 8, generator=torch.Generator().manual_seed(0))
    labels = ["yes", "no", "entailment"]
    out = initial_prompt("class_label", 10, emb, seed=5, labels=labels, tokenizer=tokenizer)
    assert out.shape == (10, 8) and out.dtype == torch.float32
    pieces = [tokenizer(label, add_special_tokens=False).input_ids for label in labels]
    assert len(pieces[2]) > 1  # "entailment" is several pieces: its vector is their mean
    for i, ids in enumerate(pieces):
        torch.testing.assert_close(out[i], emb[torch.tensor(ids)].mean(dim=0), rtol=0, atol=1e-6)
    assert not torch.equal(out[2], emb[pieces[2][0]])
    sampled = initial_prompt("sampled_vocab", 10, emb, seed=5)
    assert torch.equal(out[3:], sampled[3:])
    # Those rows are rows of the table's first 5,000 (row i of `index` holds i).
    index = torch.arange(32128, dtype=torch.float32).unsqueeze(1)
    rows = initial_prompt("class_label", 10, index, seed=5, labels=labels, tokenizer=tokenizer)[3:, 0]
    assert int(rows.max()) < SAMPLED_VOCAB_ROWS and len(set(rows.tolist())) == 7
    with pytest.raises(ConfigError, match="--prompt_init_labels"):
        initial_prompt("class_label", 10, emb, tokenizer=tokenizer)
    with pytest.raises(ConfigError, match="3 class labels do not fit in n_tokens=2"):
        initial_prompt("class_label", 2, emb, labels=labels, tokenizer=tokenizer)


def test_class_label_init_through_train_is_checked_and_recorded(
    tmp_path, tiny_model_dir, squad_small, capsys
):
    import json

    from softprompt.cli import main

    train_file, _ = squad_small
    base = ["train", "--model_name_or_path", str(tiny_model_dir), "--random_init", "--train_file", str(train_file),
            "--prompt_tuning", "--n_tokens", "4", "--max_source_length", "48", "--report_to", "none"]  # fmt: skip
    # Labels are required with class_label, meaningless without it, and must fit in the prompt.
    for extra, message in (
        (["--prompt_init", "class_label"], "--prompt_init class_label needs --prompt_init_labels"),
        (
            ["--prompt_init_labels", "yes", "no"],
            "--prompt_init_labels only applies to --prompt_init class_label",
        ),
        (
            ["--prompt_init", "class_label", "--prompt_init_labels", *"abcde"],
            "5 --prompt_init_labels do not fit",
        ),
    ):
        assert main([*base, "--output_dir", str(tmp_path / "bad"), *extra]) == 2
        assert message in capsys.readouterr().err
    out = tmp_path / "run"
    argv = [*base, "--output_dir", str(out), "--max_steps", "1", "--batch_size", "4", "--eval_steps", "0"]
    assert main([*argv, "--prompt_init", "class_label", "--prompt_init_labels", "yes", "no"]) == 0
    saved = json.loads((out / "last" / "prompt_config.json").read_text())
    assert saved["init"] == "class_label" and saved["extra"]["prompt_init_labels"] == ["yes", "no"]
