"""Unit tests of the lean T5's own functions (`softprompt.modeling.lean_t5`, `softprompt.modeling.lean_greedy`).

tests/modeling/test_perf_invariants.py checks the lean path through `PromptedT5`; here its functions are
called directly: the dropout mask's statistics and reproducibility, and `logits`, `encode` + `decode` and
`greedy` against transformers' T5 on the same weights.
"""

from __future__ import annotations

import torch
from transformers import T5ForConditionalGeneration

from conftest import tiny_config
from softprompt.modeling import lean_greedy, lean_t5
from softprompt.modeling.dropout import dropout_mask


def _t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    return T5ForConditionalGeneration(tiny_config()).eval()


def _inputs(t5: T5ForConditionalGeneration) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings [3, 9, d] with padded rows, their mask [3, 9] and decoder inputs [3, 4]."""
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 2000, (3, 9), generator=g)
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    decoder_input_ids = torch.randint(3, 2000, (3, 4), generator=g)
    decoder_input_ids[:, 0] = t5.config.decoder_start_token_id
    return t5.shared(ids).detach(), mask, decoder_input_ids


def test_dropout_mask_drops_with_probability_p_and_follows_the_torch_seed() -> None:
    torch.manual_seed(0)
    a = dropout_mask((1000, 1000), 0.1, torch.device("cpu"))
    b = dropout_mask((1000, 1000), 0.1, torch.device("cpu"))
    torch.manual_seed(0)
    a2 = dropout_mask((1000, 1000), 0.1, torch.device("cpu"))
    assert a.dtype == torch.bool and a.shape == (1000, 1000)
    assert abs(a.float().mean().item() - 0.1) < 0.002  # 1e6 draws: sd 3e-4
    assert torch.equal(a, a2) and not torch.equal(a, b)
    assert not dropout_mask((7, 9), 0.0, torch.device("cpu")).any()
    assert dropout_mask((7, 9), 1.0, torch.device("cpu")).all()


def test_the_keep_mask_is_the_complement_of_the_same_draw() -> None:
    # Dropout multiplies by the kept mask; a run's masks (and so its resume) must not change with that.
    for shape in ((7, 9), (3, 1_500_000)):  # one RNG chunk, several
        torch.manual_seed(5)
        drop = dropout_mask(shape, 0.1, torch.device("cpu"))
        torch.manual_seed(5)
        keep = dropout_mask(shape, 0.1, torch.device("cpu"), keep=True)
        assert keep.dtype == torch.bool and torch.equal(keep, ~drop)
    assert dropout_mask((4, 5), 1.0, torch.device("cpu"), keep=True).sum() == 0
    assert dropout_mask((4, 5), 0.0, torch.device("cpu"), keep=True).all()


def test_dropout_mask_does_not_depend_on_the_thread_count() -> None:
    threads = torch.get_num_threads()
    masks = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            torch.manual_seed(1)
            masks.append(dropout_mask((5, 1_000_000), 0.25, torch.device("cpu")))  # several RNG chunks
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(masks[0], masks[1])
    assert abs(masks[0].float().mean().item() - 0.25) < 0.002


def test_logits_equals_transformers_t5_in_fp32() -> None:
    t5 = _t5()
    assert lean_t5.supported(t5)
    embeds, mask, dec_ids = _inputs(t5)
    with torch.no_grad():
        ref = t5(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=dec_ids).logits
        out = lean_t5.logits(t5, embeds, mask, dec_ids, torch.float32, training=False)
        states = lean_t5.encode(t5, embeds, mask, torch.float32)
        split = lean_t5.decode(t5, dec_ids, states, mask, torch.float32)
        ref_states = t5.encoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
    assert out.shape == ref.shape == (3, 4, t5.config.vocab_size)
    # The two stacks sum in different orders (transformers' SDPA, the lean path's bmm), so fp32 rounding
    # differs by a few ulp of the logits' scale (max |logit| ~ 39 here: 1.7e-5 seen on an AVX-512/AMX
    # CPU). The bound is 1e-6 of that scale, about 8 ulp of the largest logit.
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6 * ref.abs().max().item())
    torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split, out, rtol=1e-6, atol=1e-6)


def test_greedy_equals_transformers_generate() -> None:
    t5 = _t5(seed=1)
    assert lean_greedy.plain_greedy(t5.generation_config)
    embeds, mask, _ = _inputs(t5)
    with torch.no_grad():
        ref = t5.generate(
            inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7, do_sample=False, num_beams=1
        )
    out = lean_greedy.greedy(t5, embeds, mask, 7, torch.float32)
    assert torch.equal(out, ref)
