"""Rank classification (softprompt.inference.rank): every label's summed log-likelihood, checked against a hand
computation made of single-example transformers forward calls, with and without prompts (one for the
model, or one per row), under the lean fast path and transformers' modules, in feature order whatever the
batching, and across two ranks (plain sharding and FSDP in lockstep)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import T5ForConditionalGeneration

from conftest import REPO, TOKENIZER_DIR, cpu_env, tiny_config
from softprompt.data.batching import Features
from softprompt.inference.options import GenerationOptions
from softprompt.inference.rank import label_log_likelihoods, label_targets, rank_labels
from softprompt.modeling.model import PromptedT5
from softprompt.modeling.prompt import SoftPrompt, initial_prompt
from softprompt.modeling.prompt_table import PromptTable

pytestmark = pytest.mark.usefixtures("one_thread")

LABELS = ["yes", "no", "maybe so"]  # 1, 1 and 2 tokens, each + EOS
TEXTS = [
    "rte sentence1: The cat sat on the mat. sentence2: A cat is sitting.",
    "boolq question: is the sky green?",
    "cb hypothesis: it rains premise: the streets are wet and people carry umbrellas through the town",
    "wic word: bank",
    "copa premise: the man broke his toe. what was the cause?",
]


def _t5(seed: int = 0, dtype: torch.dtype = torch.float64) -> T5ForConditionalGeneration:
    """A tiny random T5 whose answers depend on its input (weights between the embeddings and the head x3,
    as conftest.save_tiny_t5 does), so different inputs prefer different labels.

    fp64 by default: its summed log-likelihoods are around -50 to -130, where fp32 rounding alone
    (batched and padded vs one example, lean vs transformers kernels) differs by up to ~1e-4, so the
    comparisons with the hand computation run in fp64 and hold to 1e-4 with room to spare; fp32 is
    compared with a relative tolerance.
    """
    torch.manual_seed(seed)
    cfg = tiny_config()
    cfg._attn_implementation = "sdpa"
    t5 = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in t5.named_parameters():
            if p.dim() == 2 and not name.startswith(("shared", "lm_head", "encoder.embed", "decoder.embed")):
                p.mul_(3.0)
    return t5.to(dtype)


def _prompt(t5: T5ForConditionalGeneration, p: int, seed: int) -> SoftPrompt:
    prompt = SoftPrompt(p, t5.config.d_model)
    with torch.no_grad():
        prompt.weight.copy_(initial_prompt("sampled_vocab", p, t5.shared.weight, seed=seed))
    return prompt


def _features(tokenizer, texts: list[str]) -> list[Features]:
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    return [Features(input_ids=[*x, eos], labels=[eos], example_index=i) for i, x in enumerate(ids)]


def _hand_scores(
    t5: T5ForConditionalGeneration,
    tokenizer,
    features: list[Features],
    labels: list[str],
    prompts: list[torch.Tensor | None],
) -> torch.Tensor:
    """[N, L] summed log p(label | input), one unpadded example and one label per transformers call.

    Teacher forcing written out: the decoder reads [start, y_0, ..., y_{T-2}] and is scored on
    [y_0, ..., y_{T-1}] = the label's tokens + EOS. Row n's prompt (if any) goes in front of its
    embedded input.
    """
    out = torch.zeros(len(features), len(labels), dtype=t5.dtype)
    start = t5.config.decoder_start_token_id
    with torch.no_grad():
        for n, (feature, prompt) in enumerate(zip(features, prompts, strict=True)):
            x = torch.tensor([feature.input_ids])
            embeds = t5.shared(x)
            if prompt is not None:
                embeds = torch.cat([prompt.to(embeds.dtype).unsqueeze(0), embeds], dim=1)
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
            for j, text in enumerate(labels):
                y = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
                decoder_input_ids = torch.tensor([[start, *y[:-1]]])
                logits = t5(
                    inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=decoder_input_ids
                ).logits
                logp = torch.log_softmax(logits[0].float(), dim=-1)  # [T, V]
                out[n, j] = sum(logp[t, y[t]] for t in range(len(y)))
                # transformers' own loss with labels= (it shifts them itself) is the mean of the same terms
                loss = t5(inputs_embeds=embeds, attention_mask=mask, labels=torch.tensor([y])).loss
                torch.testing.assert_close(-loss * len(y), out[n, j], atol=1e-4, rtol=0)
    return out


def test_label_targets_are_the_label_tokens_then_eos_padded_with_minus_100(tokenizer):
    targets = label_targets(tokenizer, LABELS)
    expected = [[*tokenizer(t, add_special_tokens=False)["input_ids"], 1] for t in LABELS]
    assert [len(e) for e in expected] == [2, 2, 3]
    assert targets.tolist() == [e + [-100] * (3 - len(e)) for e in expected]
    with pytest.raises(ValueError, match="at least one label"):
        label_targets(tokenizer, [])


@pytest.mark.parametrize("fast_path", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_scores_equal_a_hand_computation_without_a_prompt(tokenizer, fast_path, dtype):
    t5 = _t5(dtype=dtype)
    model = PromptedT5(t5, fast_path=fast_path)
    assert model.fast_path == fast_path
    features = _features(tokenizer, TEXTS[:3])  # different lengths: one padded batch
    hand = _hand_scores(t5, tokenizer, features, LABELS, [None] * 3)
    scores = label_log_likelihoods(model, tokenizer, features, LABELS)
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and scores.shape == (3, 3)
    rtol = 0 if dtype == torch.float64 else 1e-5  # fp32: ~1e-6 relative rounding on sums near -100
    torch.testing.assert_close(scores, hand.float(), atol=1e-4, rtol=rtol)
    picks = rank_labels(model, tokenizer, features, LABELS)
    assert picks == hand.argmax(dim=1).tolist()
    assert all((hand[n, picks[n]] > hand[n, [j for j in range(3) if j != picks[n]]]).all() for n in range(3))


@pytest.mark.parametrize("fast_path", [True, False])
def test_scores_equal_a_hand_computation_with_the_models_prompt(tokenizer, fast_path):
    t5 = _t5()
    prompt = _prompt(t5, 5, seed=1)
    model = PromptedT5(t5, prompt, fast_path=fast_path)
    features = _features(tokenizer, TEXTS[:3])
    hand = _hand_scores(t5, tokenizer, features, LABELS, [prompt.weight.detach()] * 3)
    scores = label_log_likelihoods(model, tokenizer, features, LABELS)
    torch.testing.assert_close(scores, hand.float(), atol=1e-4, rtol=0)
    assert rank_labels(model, tokenizer, features, LABELS) == hand.argmax(dim=1).tolist()
    # the prompt matters: the bare model scores differently
    bare = label_log_likelihoods(PromptedT5(t5, fast_path=fast_path), tokenizer, features, LABELS)
    assert (bare - scores).abs().max() > 1e-2


@pytest.mark.parametrize("fast_path", [True, False])
def test_per_row_prompts_score_each_row_as_alone_with_its_prompt(tokenizer, fast_path):
    t5 = _t5()
    a, b = _prompt(t5, 3, seed=1), _prompt(t5, 6, seed=2)  # different lengths: padded, left-aligned rows
    table = PromptTable(t5.config.d_model, torch.device("cpu"))
    table.append(a.weight.detach())
    table.append(b.weight.detach())
    row_task = torch.tensor([0, 1, 1, 0, 1])
    model = PromptedT5(t5, fast_path=fast_path)
    features = _features(tokenizer, TEXTS)
    row_prompts = lambda idx: table.stack(row_task[idx])  # noqa: E731
    scores = label_log_likelihoods(model, tokenizer, features, LABELS, row_prompts=row_prompts)
    weights = [(a, b)[int(k)].weight.detach() for k in row_task]
    hand = _hand_scores(t5, tokenizer, features, LABELS, weights)
    torch.testing.assert_close(scores, hand.float(), atol=1e-4, rtol=0)
    picks = rank_labels(
        model, tokenizer, features, LABELS, GenerationOptions(batch_size=2), row_prompts=row_prompts
    )
    assert picks == hand.argmax(dim=1).tolist()
    # each row equals its own prompt's model run on that row alone
    for n, k in enumerate(row_task.tolist()):
        alone = label_log_likelihoods(
            PromptedT5(t5, (a, b)[k], fast_path=fast_path), tokenizer, [features[n]], LABELS
        )
        torch.testing.assert_close(scores[n : n + 1], alone, atol=1e-4, rtol=0)


def test_ties_go_to_the_lower_label_index(tokenizer):
    model = PromptedT5(_t5())
    features = _features(tokenizer, TEXTS)
    labels = ["no", "maybe so", "no", "maybe so"]  # each label twice: the later copy never wins
    scores = label_log_likelihoods(model, tokenizer, features, labels)
    assert torch.equal(scores[:, 0], scores[:, 2]) and torch.equal(scores[:, 1], scores[:, 3])
    picks = rank_labels(model, tokenizer, features, labels)
    assert picks == scores[:, :2].argmax(dim=1).tolist()
    assert set(picks) <= {0, 1}
    assert rank_labels(model, tokenizer, features, ["yes", "yes"]) == [0] * len(features)


def test_small_batches_in_length_order_still_return_feature_order(tokenizer):
    t5 = _t5()
    model = PromptedT5(t5, _prompt(t5, 4, seed=3))
    features = _features(tokenizer, TEXTS)
    lengths = [len(f.input_ids) for f in features]
    assert lengths != sorted(lengths, reverse=True)  # the length-sorted batches reorder the features
    hand = _hand_scores(t5, tokenizer, features, LABELS, [model.prompt.weight.detach()] * len(features))
    for batch_size in (1, 2, 64):
        scores = label_log_likelihoods(
            model, tokenizer, features, LABELS, GenerationOptions(batch_size=batch_size)
        )
        torch.testing.assert_close(scores, hand.float(), atol=1e-4, rtol=0)
        assert (
            rank_labels(model, tokenizer, features, LABELS, GenerationOptions(batch_size=batch_size))
            == hand.argmax(1).tolist()
        )
    assert len(set(hand.argmax(1).tolist())) > 1  # the inputs do not all pick the same label
    assert label_log_likelihoods(model, tokenizer, [], LABELS).shape == (0, 3)
    assert rank_labels(model, tokenizer, [], LABELS) == []


def test_fast_path_and_transformers_modules_give_equal_logits_and_scores(tokenizer):
    t5 = _t5(dtype=torch.float32)
    prompt = _prompt(t5, 5, seed=4)
    lean, plain = PromptedT5(t5, prompt), PromptedT5(t5, prompt, fast_path=False)
    assert lean.fast_path and not plain.fast_path
    x = torch.tensor([[37, 2, 8, 1, 0, 0], [99, 14, 5, 6, 7, 1]])
    mask = (x != 0).long()
    labels = label_targets(tokenizer, LABELS).repeat(2, 1)[:2]  # [2, T] with -100 padding
    states_lean, mask_lean = lean.encode(x, mask)
    states_plain, mask_plain = plain.encode(x, mask)
    assert torch.equal(mask_lean, mask_plain) and states_lean.shape == (2, 5 + 6, t5.config.d_model)
    torch.testing.assert_close(states_lean, states_plain, atol=1e-5, rtol=1e-5)
    logits_lean = lean.label_logits(states_lean, mask_lean, labels)
    logits_plain = plain.label_logits(states_plain, mask_plain, labels)
    assert logits_lean.shape == (2, labels.shape[1], t5.config.vocab_size)
    torch.testing.assert_close(logits_lean, logits_plain, atol=1e-4, rtol=1e-4)
    # and they are forward()'s logits: the same loss without re-running the encoder
    loss = torch.nn.functional.cross_entropy(logits_lean.flatten(0, 1), labels.flatten(), ignore_index=-100)
    torch.testing.assert_close(loss, plain(x, mask, labels), atol=1e-5, rtol=1e-5)
    features = _features(tokenizer, TEXTS)
    torch.testing.assert_close(
        label_log_likelihoods(lean, tokenizer, features, LABELS),
        label_log_likelihoods(plain, tokenizer, features, LABELS),
        atol=1e-4,
        rtol=1e-5,
    )


def test_bf16_scores_stay_close_to_fp32(tokenizer):
    model = PromptedT5(_t5(dtype=torch.float32), fast_path=False)
    features = _features(tokenizer, TEXTS)
    fp32 = label_log_likelihoods(model, tokenizer, features, LABELS)
    bf16 = label_log_likelihoods(model, tokenizer, features, LABELS, GenerationOptions(bf16=True))
    assert bf16.dtype == torch.float32
    assert not torch.equal(bf16, fp32)  # it really ran in bf16
    torch.testing.assert_close(bf16, fp32, atol=0.5, rtol=0.05)


_WORKER = """
import json, sys
import torch
sys.path[:0] = [{tests!r}, {tests!r} + "/inference"]  # conftest, test_rank
from test_rank import LABELS, TEXTS, _features, _prompt, _t5
from transformers import AutoTokenizer
from softprompt.runtime.distributed import gloo_threads, cleanup, init_distributed, shard_fsdp
from softprompt.modeling.model import PromptedT5
from softprompt.inference.options import GenerationOptions
from softprompt.inference.rank import label_log_likelihoods

env = init_distributed()
tokenizer = AutoTokenizer.from_pretrained({tokenizer!r})
features = _features(tokenizer, TEXTS)  # 5 rows: rank 0 scores 3 (2 batches of 2), rank 1 scores 2 (1 batch)
t5 = _t5()
model = PromptedT5(t5, _prompt(t5, 4, seed=3))
out = {{"sharded": label_log_likelihoods(model, tokenizer, features, LABELS, GenerationOptions(batch_size=2, env=env)).tolist()}}
fsdp = shard_fsdp(model, env, bf16=False)
out["fsdp"] = label_log_likelihoods(fsdp, tokenizer, features, LABELS, GenerationOptions(batch_size=2, env=env, lockstep=True)).tolist()
# The models hold the process group: dropped first, so that cleanup stops its threads before the interpreter
# exits (a gloo worker still freeing a collective's tensors then aborts the process: see cleanup).
del model, fsdp, t5
cleanup()
out["threads_left"] = gloo_threads()
with open({out!r} + f".rank{{env.rank}}", "w") as f:
    json.dump(out, f)
"""


def test_two_ranks_and_fsdp_in_lockstep_equal_one_process(tokenizer, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        _WORKER.format(tests=str(REPO / "tests"), tokenizer=str(TOKENIZER_DIR), out=str(tmp_path / "scores"))
    )
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
        "--nproc_per_node", "2", str(script),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=cpu_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    t5 = _t5()
    model = PromptedT5(t5, _prompt(t5, 4, seed=3))
    one = label_log_likelihoods(model, tokenizer, _features(tokenizer, TEXTS), LABELS)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"scores.rank{rank}").read_text())
        torch.testing.assert_close(torch.tensor(got["sharded"]), one, atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.tensor(got["fsdp"]), one, atol=1e-4, rtol=0)
        assert got["threads_left"] == [], got["threads_left"]  # the group's threads ended before exit


def test_labels_that_tokenize_identically_are_warned_about_once(tokenizer, capsys):
    """Two label strings that both become `<unk>` score alike: rank accuracy would mean nothing."""
    from softprompt.inference.rank import same_token_labels, warn_same_token_labels

    labels = ["\u4e00", "\u4e8c", "yes"]  # two CJK characters outside T5's vocabulary, and a real word
    assert same_token_labels(tokenizer, labels) == [("\u4e00", "\u4e8c")]
    assert same_token_labels(tokenizer, ["yes", "no", "yes"]) == []  # a label given twice is no clash
    warn_same_token_labels(tokenizer, labels)
    warn_same_token_labels(tokenizer, labels)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "the labels '\u4e00', '\u4e8c' tokenize identically" in err[0], err
