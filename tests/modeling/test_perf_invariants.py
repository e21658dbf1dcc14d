"""The speed levers change nothing that matters: same examples, same losses, same answers.

Bucketing by length must visit exactly the examples plain shuffling visits; bf16 must agree with fp32;
`PromptedT5.freeze_to` must compute what autocast computes; the lean T5 (`softprompt.modeling.lean_t5`, switched
by `PromptedT5.fast_path`) must equal transformers' T5 forward, dropout placement included, its greedy loop
must produce the very tokens `generate` produces, and under an unchecked transformers version it must
step aside for transformers' modules. Nothing here times anything.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import T5ForConditionalGeneration

from conftest import tiny_config
from softprompt.data.batching import BucketBatchSampler, Collator, Features
from softprompt.modeling import lean_greedy, lean_t5
from softprompt.modeling.dropout import dropout_mask
from softprompt.modeling.model import PromptedT5, join_prompt
from softprompt.modeling.prompt import SoftPrompt, initial_prompt

# ---------------------------------------------------------------------------------------- helpers


def _t5(seed: int = 0, attn: str = "sdpa", **overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = tiny_config(**overrides)
    cfg._attn_implementation = attn
    return T5ForConditionalGeneration(cfg).eval()


def _prompted(t5: T5ForConditionalGeneration, p: int = 5, seed: int = 0) -> PromptedT5:
    prompt = SoftPrompt(p, t5.config.d_model)
    with torch.no_grad():
        prompt.weight.copy_(initial_prompt("sampled_vocab", p, t5.shared.weight, seed=seed))
    return PromptedT5(t5, prompt)


def _batch(n: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    """Rows of different source and target lengths, padded like the trainer pads them."""
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        s = int(torch.randint(4, 14, (1,), generator=g))
        t = int(torch.randint(2, 6, (1,), generator=g))
        feats.append(
            Features(
                input_ids=[*torch.randint(3, 2000, (s,), generator=g).tolist(), 1],
                labels=[*torch.randint(3, 2000, (t,), generator=g).tolist(), 1],
                example_index=i,
            )
        )
    return Collator()(feats)


def _loss_and_grad(
    model: PromptedT5, batch: dict[str, torch.Tensor], *, lean: bool | None, bf16: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss and prompt gradient (both on the CPU), on whatever device the model is.

    `lean` switches the model's fast path on or off first (None: leave it as it is).
    """
    if lean is not None:
        model.fast_path = lean
        assert model.fast_path == lean
    device = model.prompt.weight.device
    model.prompt.weight.grad = None
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = model(
            *(batch[k].to(device) for k in ("input_ids", "attention_mask", "labels")), reduction="sum"
        )
    loss.backward()
    grad = model.prompt.weight.grad.detach().float().cpu()
    model.prompt.weight.grad = None
    return loss.detach().float().cpu(), grad


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


# ---------------------------------------------------------------------------------------- bucketing


@pytest.mark.parametrize(
    ("n", "batch", "world"), [(100, 8, 1), (97, 8, 1), (64, 4, 2), (37, 3, 3), (5, 8, 1)]
)
def test_bucketing_visits_the_same_examples_as_plain_shuffling(n: int, batch: int, world: int) -> None:
    lengths = np.random.default_rng(0).integers(5, 500, n)
    for epoch in range(3):
        seen = {}
        for mult in (50, 1):  # 50: bucketed by length (the default); 1: plain shuffled batches
            visited: list[int] = []
            for rank in range(world):
                s = BucketBatchSampler(
                    lengths, batch, seed=7, rank=rank, world_size=world, mega_batch_mult=mult
                )
                s.set_epoch(epoch)
                for b in s:
                    assert len(b) == batch
                    visited += b
            seen[mult] = sorted(visited)
        # A plain permutation of the epoch, completed cyclically to whole global batches.
        perm = np.random.default_rng([7, epoch]).permutation(n)
        total = -(-n // (batch * world)) * batch * world
        assert seen[50] == seen[1] == sorted(np.resize(perm, total).tolist())
        assert set(seen[50]) == set(range(n))


def test_bucketing_reduces_padding() -> None:
    lengths = np.random.default_rng(1).integers(20, 512, 2048)
    padded = {}
    for mult in (50, 1):
        s = BucketBatchSampler(lengths, 32, seed=3, mega_batch_mult=mult)
        padded[mult] = sum(int(lengths[b].max()) * len(b) for b in s)
    assert padded[50] < 0.8 * padded[1]


# ---------------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("lean", [True, False])
def test_bf16_and_fp32_losses_agree_within_one_percent(lean: bool) -> None:
    model = _prompted(_t5())
    batch = _batch()
    fp32, g32 = _loss_and_grad(model, batch, lean=lean)
    bf16, g16 = _loss_and_grad(model, batch, lean=lean, bf16=True)
    assert abs(float(bf16 - fp32)) <= 0.01 * abs(float(fp32))
    assert F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0) > 0.99
    model.freeze_to(torch.bfloat16)
    frozen, _ = _loss_and_grad(model, batch, lean=lean)  # no autocast: freeze_to enters it itself
    assert abs(float(frozen - fp32)) <= 0.01 * abs(float(fp32))


@pytest.mark.parametrize("lean", [True, False])
def test_freeze_to_bf16_computes_exactly_what_autocast_computes(lean: bool) -> None:
    model = _prompted(_t5())
    batch = _batch()
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=lean, bf16=True)
    embedding = model.model.shared.weight.detach().clone()
    model.freeze_to(torch.bfloat16)
    loss, grad = _loss_and_grad(model, batch, lean=lean, bf16=True)
    assert torch.equal(loss, ref_loss)
    assert torch.equal(grad, ref_grad)
    # matmul weights are bf16; the embedding, norms and position biases (and the prompt) stay fp32
    assert model.model.lm_head.weight.dtype == torch.bfloat16
    assert model.model.encoder.block[0].layer[0].SelfAttention.q.weight.dtype == torch.bfloat16
    assert torch.equal(model.model.shared.weight, embedding)
    assert model.model.encoder.final_layer_norm.weight.dtype == torch.float32
    assert model.prompt.weight.dtype == torch.float32
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt.weight"]


# ---------------------------------------------------------------------------------------- lean path


@pytest.mark.parametrize(
    "overrides",
    [{}, {"feed_forward_proj": "relu"}, {"num_decoder_layers": 3, "num_heads": 2, "d_kv": 32}],
    ids=["gated-gelu", "relu", "asymmetric"],
)
def test_lean_forward_equals_transformers_in_fp32(overrides: dict) -> None:
    model = _prompted(_t5(**overrides))
    assert lean_t5.supported(model.model)
    batch = _batch()
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=False)
    loss, grad = _loss_and_grad(model, batch, lean=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert _rel(grad, ref_grad) < 1e-4


def test_lean_forward_is_close_to_transformers_in_bf16() -> None:
    model = _prompted(_t5())
    batch = _batch()
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=False, bf16=True)
    loss, grad = _loss_and_grad(model, batch, lean=True, bf16=True)
    assert abs(float(loss - ref_loss)) <= 0.005 * abs(float(ref_loss))
    assert F.cosine_similarity(grad.flatten(), ref_grad.flatten(), dim=0) > 0.99


def test_lean_dropout_sits_where_transformers_puts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """With both paths drawing their dropout masks from the same stream, train-mode losses match.

    transformers' eager attention calls `F.dropout` on the attention probabilities, and every
    `nn.Dropout` calls it too; routing it through `dropout_mask` makes the two paths draw identical
    masks in identical order, so any misplaced, missing or extra dropout would change the loss.
    """

    def same_masks(
        x: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False
    ) -> torch.Tensor:
        if not training or p == 0.0:
            return x
        return x.masked_fill(dropout_mask(x.shape, p, x.device), 0.0) * (1.0 / (1.0 - p))

    monkeypatch.setattr(torch.nn.functional, "dropout", same_masks)
    model = _prompted(_t5(attn="eager", dropout_rate=0.3))
    model.train()
    batch = _batch()
    torch.manual_seed(123)
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=False)
    torch.manual_seed(123)
    loss, grad = _loss_and_grad(model, batch, lean=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-4)
    assert _rel(grad, ref_grad) < 1e-4
    torch.manual_seed(124)  # and the masks really matter
    other, _ = _loss_and_grad(model, batch, lean=True)
    assert not torch.isclose(other, loss)


# ---------------------------------------------------------------------------------------- greedy loop


def _hf_generate(model: PromptedT5, ids, mask, n: int, prompt=None, lengths=None, bf16: bool = False):
    embeds, full_mask = model.encoder_inputs(ids, mask, prompt, lengths)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.model.generate(
            inputs_embeds=embeds, attention_mask=full_mask, max_new_tokens=n, do_sample=False, num_beams=1
        )


def _lean_generate(model: PromptedT5, ids, mask, n: int, prompt=None, lengths=None, bf16: bool = False):
    assert model.fast_path_dtype(ids.device, for_training=False) is not None
    assert lean_greedy.plain_greedy(model.model.generation_config)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        return model.generate(ids, mask, max_new_tokens=n, prompt=prompt, prompt_lengths=lengths)


@pytest.fixture(params=["whole batch, cached keys", "one row per chunk, folded keys"])
def greedy_layout(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways the greedy loop lays out its work: the batch encoded at once with a cross-attention
    key/value cache (small batches), and the encoder run row by row, cut to each row's length, with
    the key/value projections folded into the query (what large CPU batches get)."""
    if request.param.startswith("one row"):
        monkeypatch.setattr(lean_greedy, "ENCODE_CHUNK_TOKENS", {"cpu": 1})
        monkeypatch.setattr(lean_greedy, "CROSS_KV_CACHE_BYTES", {"cpu": 0})
    else:
        monkeypatch.setattr(lean_greedy, "ENCODE_CHUNK_TOKENS", {})
        monkeypatch.setattr(lean_greedy, "CROSS_KV_CACHE_BYTES", {})
    return request.param


@pytest.mark.usefixtures("greedy_layout")
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_lean_greedy_equals_generate_token_for_token(attn: str) -> None:
    model = _prompted(_t5(attn=attn)).eval()
    batch = _batch(n=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = _hf_generate(model, ids, mask, 12)
    out = _lean_generate(model, ids, mask, 12)
    assert torch.equal(out, ref)
    # Make a token the model emits at different steps in different rows the EOS, so rows finish
    # early, get padded, and decoding stops before max_new_tokens.
    firsts = {}
    for row in ref[:, 1:].tolist():
        for step, tok in enumerate(row):
            firsts.setdefault(tok, set()).add(step)
    eos = max(firsts, key=lambda t: (len(firsts[t]), -t))
    model.model.generation_config.eos_token_id = [eos, 1]
    ref = _hf_generate(model, ids, mask, 12)
    out = _lean_generate(model, ids, mask, 12)
    assert torch.equal(out, ref)
    assert (ref == model.model.generation_config.pad_token_id).any() or ref.shape[1] < 13


@pytest.mark.usefixtures("greedy_layout")
def test_lean_greedy_equals_generate_with_per_row_prompts() -> None:
    t5 = _t5()
    model = PromptedT5(t5).eval()
    batch = _batch(n=4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    torch.manual_seed(5)
    prompts = torch.randn(4, 6, t5.config.d_model)
    lengths = torch.tensor([6, 2, 4, 6])
    ref = _hf_generate(model, ids, mask, 10, prompts, lengths)
    assert torch.equal(_lean_generate(model, ids, mask, 10, prompts, lengths), ref)
    embeds, full = join_prompt(prompts, lengths, t5.shared(ids), mask)
    assert embeds.shape[1] == full.shape[1]


@pytest.mark.usefixtures("greedy_layout")
def test_lean_greedy_equals_generate_in_bf16() -> None:
    model = _prompted(_t5(seed=3)).eval()
    batch = _batch(n=6, seed=4)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref = _hf_generate(model, ids, mask, 10, bf16=True)
    assert torch.equal(_lean_generate(model, ids, mask, 10, bf16=True), ref)
    model.freeze_to(torch.bfloat16)
    assert torch.equal(_lean_generate(model, ids, mask, 10), ref)  # frozen to bf16: no autocast needed


def test_generation_settings_the_lean_loop_does_not_cover_go_through_transformers() -> None:
    model = _prompted(_t5()).eval()
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    model.model.generation_config.repetition_penalty = 1.5
    assert not lean_greedy.plain_greedy(model.model.generation_config)
    assert torch.equal(model.generate(ids, mask, max_new_tokens=8), _hf_generate(model, ids, mask, 8))


def test_fine_tuning_keeps_transformers_forward() -> None:
    model = PromptedT5(_t5())  # no prompt: every weight trains
    assert model.fast_path_dtype(torch.device("cpu")) is None
    assert model.fast_path_dtype(torch.device("cpu"), for_training=False) == torch.float32  # generate
    prompted = _prompted(_t5())
    assert prompted.fast_path_dtype(torch.device("cpu")) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert prompted.fast_path_dtype(torch.device("cpu")) == torch.bfloat16


# ---------------------------------------------------------------------------------------- the switch


def test_fast_path_false_runs_transformers_modules() -> None:
    t5 = _t5()
    model = PromptedT5(t5, _prompted(t5).prompt, fast_path=False)
    assert not model.fast_path
    assert model.fast_path_dtype(torch.device("cpu")) is None
    assert model.fast_path_dtype(torch.device("cpu"), for_training=False) is None
    assert PromptedT5(t5).fast_path  # on by default where supported


def _installed_transformers(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    """Make `transformers.__version__` say `version` (on the module object loaded now: transformers swaps its
    lazy module in sys.modules while models load, so a reference taken at import time may be stale)."""
    monkeypatch.setattr(importlib.import_module("transformers"), "__version__", version)
    assert lean_t5.transformers_version() == version


def test_unchecked_transformers_version_falls_back_with_one_warning_and_the_same_results(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _prompted(_t5()).eval()
    batch = _batch()
    ids, mask = batch["input_ids"], batch["attention_mask"]
    ref_loss, ref_grad = _loss_and_grad(model, batch, lean=False)  # transformers' modules
    ref_tokens = model.generate(ids, mask, max_new_tokens=10)
    capsys.readouterr()

    _installed_transformers(monkeypatch, "5.24.7")  # a patch release of a checked version
    assert PromptedT5(model.model, model.prompt).fast_path
    assert capsys.readouterr().err == ""

    _installed_transformers(monkeypatch, "99.1.0")
    fallback = PromptedT5(model.model, model.prompt)  # fast_path=True asked for, not granted
    assert not fallback.fast_path and not lean_t5.supported(model.model)
    assert fallback.fast_path_dtype(torch.device("cpu"), for_training=False) is None
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "99.1.0" in err and "transformers" in err  # one line, once
    fallback.fast_path = True  # asking again changes nothing
    assert not fallback.fast_path
    loss, grad = _loss_and_grad(fallback, batch, lean=None)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)
    assert torch.equal(fallback.generate(ids, mask, max_new_tokens=10), ref_tokens)
    assert capsys.readouterr().err == ""  # not repeated
