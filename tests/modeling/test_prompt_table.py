"""A table of prompts drives `PromptedT5.forward` row by row, as one prompt per model would."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

from conftest import tiny_config
from softprompt.data.batching import Collator, Features
from softprompt.modeling.model import PromptedT5
from softprompt.modeling.prompt import SoftPrompt
from softprompt.modeling.prompt_table import PromptTable, select_prompts


def _t5() -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    return T5ForConditionalGeneration(tiny_config()).eval()


def _batch() -> dict[str, torch.Tensor]:
    """Three rows of different source and target lengths, padded as the trainer pads them."""
    g = torch.Generator().manual_seed(1)
    feats = [
        Features(
            input_ids=[*torch.randint(3, 2000, (s,), generator=g).tolist(), 1],
            labels=[*torch.randint(3, 2000, (t,), generator=g).tolist(), 1],
            example_index=i,
        )
        for i, (s, t) in enumerate([(7, 3), (4, 5), (11, 2)])
    ]
    return Collator()(feats)


def _prompts(t5: T5ForConditionalGeneration) -> tuple[SoftPrompt, SoftPrompt]:
    torch.manual_seed(3)
    a, b = SoftPrompt(3, t5.config.d_model), SoftPrompt(5, t5.config.d_model)
    with torch.no_grad():
        a.weight.normal_()
        b.weight.normal_()
    return a, b


def _token_losses(model: PromptedT5, batch: dict[str, torch.Tensor], **prompt) -> torch.Tensor:
    """[B, T] per-token losses (0 where the labels are padding)."""
    ids, mask, labels = (batch[k] for k in ("input_ids", "attention_mask", "labels"))
    return model(ids, mask, labels, reduction="none", **prompt).view(labels.shape)


def _row(batch: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    return {k: v[i : i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("kind", ["table", "tensor"])
def test_a_two_prompt_table_equals_each_prompts_forward_row_by_row(fast_path: bool, kind: str) -> None:
    t5 = _t5()
    a, b = _prompts(t5)
    rows = torch.tensor([0, 1, 0])
    if kind == "table":
        table = PromptTable(t5.config.d_model, torch.device("cpu"))
        table.append(a.weight)
        table.append(b.weight)
        prompt = {"prompt": table, "prompt_rows": rows}
    else:  # [K, P, H] leaf with per-prompt lengths
        stacked = torch.zeros(2, 5, t5.config.d_model)
        stacked[0, :3], stacked[1] = a.weight.detach(), b.weight.detach()
        stacked.requires_grad_(True)
        prompt = {"prompt": stacked, "prompt_rows": rows, "prompt_lengths": torch.tensor([3, 5])}
    batch = _batch()
    mixed = PromptedT5(t5, fast_path=fast_path)
    losses = _token_losses(mixed, batch, **prompt)
    for i, k in enumerate(rows.tolist()):
        alone = PromptedT5(t5, (a, b)[k], fast_path=fast_path)
        width = batch["labels"].shape[1]
        torch.testing.assert_close(
            losses[i], _token_losses(alone, _row(batch, i))[0, :width], rtol=1e-5, atol=1e-5
        )
    a.weight.grad = b.weight.grad = None
    losses.sum().backward()
    if kind == "table":  # rows 0 and 2 use prompt a, row 1 prompt b: both receive gradients
        assert a.weight.grad is not None and a.weight.grad.abs().sum() > 0
        assert b.weight.grad is not None and b.weight.grad.abs().sum() > 0
    else:
        grad = prompt["prompt"].grad
        assert grad[0, :3].abs().sum() > 0 and grad[1].abs().sum() > 0
        assert not grad[0, 3:].any()  # past prompt a's length: padding, never read


def test_gradients_reach_only_the_selected_prompts() -> None:
    t5 = _t5()
    table = torch.randn(3, 4, t5.config.d_model, requires_grad=True)
    batch = _batch()
    loss = PromptedT5(t5)(
        batch["input_ids"],
        batch["attention_mask"],
        batch["labels"],
        prompt=table,
        prompt_rows=torch.tensor([2, 0, 2]),
    )
    loss.backward()
    assert table.grad[0].abs().sum() > 0 and table.grad[2].abs().sum() > 0
    assert not table.grad[1].any()


def test_one_prompt_as_a_table_is_bit_identical_to_the_models_own_prompt() -> None:
    t5 = _t5()
    a, _ = _prompts(t5)
    batch = _batch()
    ids, mask, labels = (batch[k] for k in ("input_ids", "attention_mask", "labels"))
    own = PromptedT5(t5, a)(ids, mask, labels)
    table = PromptTable(t5.config.d_model, torch.device("cpu"))
    # Not detached: a trained prompt requires grad, and the lean path runs its autograd kernels for an
    # input that does (a detached copy takes the inference kernels, equal only to float rounding).
    table.append(a.weight)
    assert torch.equal(
        PromptedT5(t5)(ids, mask, labels, prompt=table, prompt_rows=torch.zeros(3, dtype=torch.long)), own
    )
    ref = F.cross_entropy(
        t5(
            inputs_embeds=torch.cat([a(3), t5.shared(ids)], dim=1),
            attention_mask=torch.cat([torch.ones(3, 3, dtype=mask.dtype), mask], dim=1),
            labels=labels,
        ).logits.flatten(0, 1),
        labels.flatten(),
        ignore_index=-100,
    )
    torch.testing.assert_close(own, ref, rtol=1e-5, atol=1e-5)


def test_select_prompts_needs_rows_for_a_table() -> None:
    table = PromptTable(4, torch.device("cpu"))
    table.append(torch.ones(2, 4))
    with pytest.raises(ValueError, match="row indices"):
        select_prompts(table, None)
    prompt, lengths = select_prompts(torch.ones(2, 3, 4), torch.tensor([1, 1, 0]), torch.tensor([3, 2]))
    assert prompt.shape == (3, 3, 4) and lengths.tolist() == [2, 2, 3]
