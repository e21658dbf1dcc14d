"""PromptedT5: prompt placement, freezing, generation through inputs_embeds, and weight loading."""

from __future__ import annotations

import pytest
import torch
from transformers import T5ForConditionalGeneration

from conftest import tiny_config
from softprompt.errors import CheckpointError
from softprompt.modeling.model import PromptedT5, join_prompt, load_t5
from softprompt.modeling.optim import build_optimizer
from softprompt.modeling.prompt import SoftPrompt, initial_prompt


def _tiny(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg._attn_implementation = "sdpa"
    return T5ForConditionalGeneration(cfg)


def _prompted(p: int = 6, seed: int = 0) -> PromptedT5:
    t5 = _tiny(seed)
    prompt = SoftPrompt(p, t5.config.d_model)
    with torch.no_grad():
        prompt.weight.copy_(initial_prompt("sampled_vocab", p, t5.shared.weight, seed=seed))
    return PromptedT5(t5, prompt)


def _batch():
    torch.manual_seed(1)
    ids = torch.randint(3, 500, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    ids[0, 6:] = 0
    labels = torch.randint(3, 500, (3, 4))
    labels[1, 2:] = -100
    return ids, mask, labels


def test_prompt_mode_freezes_every_model_weight():
    m = _prompted()
    assert [n for n, p in m.named_parameters() if p.requires_grad] == ["prompt.weight"]
    full = PromptedT5(_tiny())
    assert all(p.requires_grad for p in full.parameters())


def test_only_the_prompt_changes_after_optimizer_steps():
    m = _prompted()
    before = {k: v.clone() for k, v in m.model.state_dict().items()}
    prompt_before = m.prompt.weight.detach().clone()
    opt, sched = build_optimizer("adafactor", m.trainable_parameters(), lr=0.3, weight_decay=1e-5)
    ids, mask, labels = _batch()
    m.train()
    for _ in range(3):
        m(ids, mask, labels).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    after = m.model.state_dict()
    for k, v in before.items():
        assert torch.equal(v, after[k]), f"frozen weight {k} changed"
    assert not torch.equal(prompt_before, m.prompt.weight)
    assert (m.prompt.weight - prompt_before).abs().max() > 1e-3


def test_encoder_sees_p_extra_positions_and_mask_covers_them():
    m = _prompted(p=6)
    ids, mask, _ = _batch()
    embeds, full_mask = m.encoder_inputs(ids, mask)
    assert embeds.shape == (3, 6 + 9, 64)
    assert torch.equal(full_mask[:, :6], torch.ones(3, 6, dtype=torch.long))
    assert torch.equal(full_mask[:, 6:], mask)
    assert torch.equal(embeds[:, :6], m.prompt.weight.expand(3, -1, -1))
    assert torch.equal(embeds[:, 6:], m.model.shared(ids))
    enc = m.model.encoder(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state
    assert enc.shape[1] == 15


def test_the_prompt_changes_the_loss_and_gets_gradient():
    m = _prompted()
    ids, mask, labels = _batch()
    loss = m(ids, mask, labels)
    loss.backward()
    assert m.prompt.weight.grad is not None and m.prompt.weight.grad.abs().sum() > 0
    bare = PromptedT5(m.model)(ids, mask, labels)
    assert not torch.isclose(loss, bare)


def test_sum_reduction_equals_mean_times_tokens():
    m = _prompted()
    ids, mask, labels = _batch()
    n = int((labels != -100).sum())
    torch.testing.assert_close(m(ids, mask, labels, reduction="sum"), m(ids, mask, labels) * n)


def test_greedy_generation_equals_hand_built_inputs_embeds_call():
    m = _prompted(p=4).eval()
    ids, mask, _ = _batch()
    ours = m.generate(ids, mask, max_new_tokens=8)
    embeds = torch.cat([m.prompt.weight.unsqueeze(0).expand(3, -1, -1), m.model.shared(ids)], dim=1)
    hand_mask = torch.cat([torch.ones(3, 4, dtype=torch.long), mask], dim=1)
    ref = m.model.generate(
        inputs_embeds=embeds, attention_mask=hand_mask, max_new_tokens=8, do_sample=False, num_beams=1
    )
    assert torch.equal(ours, ref)
    # and the prompt matters: without it the tokens differ
    assert not torch.equal(ours, PromptedT5(m.model).generate(ids, mask, max_new_tokens=8))


def test_join_prompt_left_aligns_rows_of_different_prompt_lengths():
    prompt = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2) + 100
    embeds = torch.arange(2 * 4 * 2, dtype=torch.float32).view(2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out, out_mask = join_prompt(prompt, torch.tensor([1, 3]), embeds, mask)
    assert out.shape == (2, 7, 2)
    # row 0: 1 prompt vector, then its 3 real tokens, then masked zeros
    assert torch.equal(out[0, 0], prompt[0, 0])
    assert torch.equal(out[0, 1:4], embeds[0, :3])
    assert out_mask[0].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert torch.equal(out[0, 4:], torch.zeros(3, 2))
    assert torch.equal(out[1, :3], prompt[1]) and torch.equal(out[1, 3:], embeds[1])
    assert out_mask[1].tolist() == [1] * 7


def test_frozen_weights_really_are_loaded_from_safetensors(tmp_path, tiny_model_dir):
    src = _tiny(seed=7)
    src.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "model.safetensors").exists()
    loaded = load_t5(tmp_path / "m")
    for k, v in src.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    # random_init from a config-only directory is seeded, and differs from the saved weights
    a = load_t5(tiny_model_dir, random_init=True, seed=1)
    b = load_t5(tiny_model_dir, random_init=True, seed=1)
    assert torch.equal(a.shared.weight, b.shared.weight)
    assert not torch.equal(a.shared.weight, loaded.shared.weight)


def test_config_only_directory_without_random_init_gives_clear_error(tiny_model_dir):
    with pytest.raises(CheckpointError, match="--random_init"):
        load_t5(tiny_model_dir)


def test_prompt_of_wrong_width_is_refused():
    with pytest.raises(CheckpointError, match="32 wide but the model's d_model is 64"):
        PromptedT5(_tiny(), SoftPrompt(4, 32))
