"""The soft prompt module and its initialisations."""

from __future__ import annotations

import pytest
import torch

from softprompt.errors import ConfigError
from softprompt.prompt import SAMPLED_VOCAB_ROWS, PromptInit, SoftPrompt, initial_prompt


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
