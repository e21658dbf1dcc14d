"""`--compile`'s training forward (`softprompt.modeling.compiled`): the lean path under torch.compile equals it.

On CUDA the same function runs as CUDA graphs (tests/modeling/test_cuda.py checks it there); here inductor
compiles it for the CPU, which checks the part CUDA graphs do not change: dynamo traces the lean path
(its custom autograd functions, the dropout masks drawn outside the graph) into a function with the
eager path's loss, prompt gradient and dropout masks, and the model still decodes as before.
"""

from __future__ import annotations

import torch
from test_perf_invariants import _batch, _prompted, _t5

from softprompt.data.batching import Collator, Features
from softprompt.modeling import compiled

CPU = torch.device("cpu")


def _loss_and_grad(model, batch: dict[str, torch.Tensor], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)  # the dropout masks' stream
    model.prompt.weight.grad = None
    loss = model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    loss.backward()
    return loss.detach(), model.prompt.weight.grad.clone()


def test_the_compiled_training_forward_equals_the_eager_one() -> None:
    # With dropout: its masks are drawn outside the graph (CPU) or by PyTorch's own random ops (CUDA,
    # `fallback_random`), so they must be the eager run's for the losses to agree. (One compile is
    # ~30 s on two cores: the no-dropout variant, SDPA instead of `_Attention`, is left to the GPU test.)
    model = _prompted(_t5(dropout_rate=0.1)).train()
    batch = _batch(n=4, seed=3)
    eager = [_loss_and_grad(model, batch, seed) for seed in (7, 8)]
    greedy = model.eval().generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6)
    model.train()

    calls = []
    assert model.compile_training_forward(CPU)
    inner = model.compiled_logits
    model.compiled_logits = lambda *a, **k: calls.append(1) or inner(*a, **k)
    for seed, (loss, grad) in zip((7, 8), eager, strict=True):
        got_loss, got_grad = _loss_and_grad(model, batch, seed)
        torch.testing.assert_close(got_loss, loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_grad, grad, rtol=1e-4, atol=1e-6)
    assert len(calls) == 2  # the compiled function ran, not the eager one
    # Other masks give another loss: the equality above is not that of a dropout doing nothing.
    other, _ = _loss_and_grad(model, batch, seed=9)
    assert abs(float(other - eager[0][0])) > 1e-4
    with torch.no_grad():  # evaluation stays eager
        model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    assert len(calls) == 3
    assert torch.equal(
        model.eval().generate(batch["input_ids"], batch["attention_mask"], max_new_tokens=6), greedy
    )


def test_only_the_lean_path_is_compiled() -> None:
    model = _prompted(_t5())
    model.fast_path = False  # e.g. --no_fast_path: the caller compiles the whole model instead
    assert not model.compile_training_forward(CPU)
    assert model.compiled_logits is None
    from softprompt.modeling.model import PromptedT5

    tuned = PromptedT5(_t5())  # fine-tuning: every weight trains, transformers' modules run
    assert not tuned.compile_training_forward(CPU)


def test_compiled_batches_are_padded_to_a_few_shapes() -> None:
    feats = [
        Features(input_ids=list(range(3, 3 + s)), labels=list(range(3, 3 + t)), example_index=i)
        for i, (s, t) in enumerate([(70, 3), (5, 9)])
    ]
    collate = Collator(
        pad_token_id=0,
        pad_to_multiple_of=compiled.SOURCE_MULTIPLE,
        target_multiple_of=compiled.TARGET_MULTIPLE,
    )
    batch = collate(feats)
    assert batch["input_ids"].shape == (2, 128) and batch["labels"].shape == (2, 16)
    assert int(batch["attention_mask"].sum()) == 75  # padding is masked
    assert int((batch["labels"] != -100).sum()) == 12  # and ignored by the loss
    assert Collator(pad_token_id=0, pad_to_multiple_of=8)(feats)["labels"].shape == (2, 16)
