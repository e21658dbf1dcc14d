"""The prompt bank: mixed-prompt batches equal single-prompt ones, and one-pass majority ensembles."""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_t5, tiny_config
from softprompt.commands.predict import predict_answers
from softprompt.errors import CheckpointError, UserError
from softprompt.inference.bank import PromptBank, UnknownTaskError, load_model_and_prompts
from softprompt.inference.engine import generate_answers
from softprompt.inference.ensemble import ensemble_eval, majority_vote, tie_break_order
from softprompt.inference.options import GenerationOptions
from softprompt.io.checkpoint import PromptConfig, save_prompt
from softprompt.modeling.model import PromptedT5
from softprompt.modeling.prompt import SoftPrompt
from softprompt.runtime.distributed import DistEnv
from softprompt.tasks.metrics.squad import normalize_answer, squad_scores
from softprompt.tasks.squad.qa_task import SquadTask
from softprompt.tasks.squad.reader import QAExample, tokenize_examples

D_MODEL = tiny_config().d_model
MAX_NEW = 6

QUESTIONS = [
    "Who wrote the report?",
    "When did the river flood the old town near the bridge?",
    "What colour is the door?",
    "Where was the treaty signed, and by whom, in the end?",
    "How many ships sailed?",
    "Why did the committee reject the proposal after two long meetings?",
    "Which city hosted the games?",
    "What is the capital?",
]
CONTEXTS = [
    "The report was written by Ada in 1843.",
    "In the spring of 1910 the river flooded the old town, reaching the bridge and the market square.",
    "The door is painted a deep shade of green, like the shutters of the house next to it.",
    "The treaty was signed in Paris by the delegates of four nations after months of negotiation.",
    "Twelve ships sailed from the harbour at dawn.",
    "The committee rejected the proposal because it cost too much and helped too few people.",
    "Oslo hosted the winter games in 1952, the first held in a capital city.",
    "Canberra is the capital of Australia.",
]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A saved tiny T5 (safetensors + tokenizer) and prompts of widths 5, 5, 8 (+ a copy of the first)."""
    root = tmp_path_factory.mktemp("bank")
    model_dir = save_tiny_t5(root / "tiny-t5")
    gen = torch.Generator().manual_seed(1)
    weights = {
        "a": torch.randn(5, D_MODEL, generator=gen),
        "b": torch.randn(5, D_MODEL, generator=gen),
        "c": torch.randn(8, D_MODEL, generator=gen),
    }
    weights["a2"] = weights["a"].clone()  # agrees with "a" everywhere: a guaranteed majority
    dirs = {}
    for name, w in weights.items():
        # "c" reads its inputs differently, so the bank must tokenize per prompt.
        config = PromptConfig(
            base_model=str(model_dir),
            n_tokens=w.shape[0],
            d_model=D_MODEL,
            punctuation="paper" if name == "c" else "none",
            max_source_length=24 if name == "c" else 512,
        )
        dirs[name] = save_prompt(root / f"prompt-{name}", w, config)
    loaded = load_model_and_prompts(str(model_dir), [str(d) for d in dirs.values()], names=list(dirs))
    return {"model_dir": model_dir, "dirs": dirs, "weights": weights, "loaded": loaded}


def _single_prompt_model(bank: PromptBank, name: str) -> PromptedT5:
    """The plain single-prompt model: the bank's frozen T5 with prompt `name` as its own."""
    weight = bank.entry(name).weight
    prompt = SoftPrompt(weight.shape[0], weight.shape[1])
    with torch.no_grad():
        prompt.weight.copy_(weight)
    return PromptedT5(bank.model.model, prompt).eval()


def _generate(bank: PromptBank, ids: torch.Tensor, mask: torch.Tensor, tasks: list[str]) -> torch.Tensor:
    """Token ids of a batch whose rows use the prompts `tasks` (the bank's per-row prompts)."""
    prompt, lengths = bank.stack(tasks)
    return bank.model.generate(ids, mask, max_new_tokens=MAX_NEW, prompt=prompt, prompt_lengths=lengths)


def _trim(ids: torch.Tensor) -> list[int]:
    """Generated ids without the trailing padding that depends on when the rest of the batch stopped."""
    out = ids.tolist()
    while len(out) > 1 and out[-1] == 0:
        out.pop()
    return out


def test_mixed_batch_rows_equal_single_prompt_batches(setup: dict) -> None:
    loaded = bank = setup["loaded"]
    tok = loaded.tokenizer
    examples = [
        QAExample(id=str(i), question=q, context=c, answers=("x",))
        for i, (q, c) in enumerate(zip(QUESTIONS[:6], CONTEXTS[:6], strict=True))
    ]
    features = tokenize_examples(examples, tok)
    tasks = ["a", "b", "c", "c", "a", "b"]  # P = 5, 5, 8, 8, 5, 5: two lengths in one batch

    def collate(rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(features[i].input_ids) for i in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        for r, i in enumerate(rows):
            ids[r, : len(features[i].input_ids)] = torch.tensor(features[i].input_ids)
        return ids, (ids != 0).long()

    everyone = list(range(6))
    ids, mask = collate(everyone)
    prompt, lengths = bank.stack(tasks)
    assert prompt.shape == (6, 8, D_MODEL)
    assert lengths is not None and lengths.tolist() == [5, 5, 8, 8, 5, 5]
    # Short prompts are padded with zeros, never with another prompt's vectors.
    assert torch.equal(prompt[0, :5], setup["weights"]["a"]) and bool((prompt[0, 5:] == 0).all())
    mixed = _generate(bank, ids, mask, tasks)
    assert len({tuple(_trim(row)) for row in mixed}) == 6  # every row says something different

    model = loaded.model
    embeds, full_mask = model.encoder_inputs(ids, mask, prompt, lengths)
    mixed_states = model.model.encoder(inputs_embeds=embeds, attention_mask=full_mask).last_hidden_state

    for name in ("a", "b", "c"):
        rows = [i for i in everyone if tasks[i] == name]
        # (1) A batch of only this prompt, through the bank (all rows the same length: no lengths).
        sub_ids, sub_mask = collate(rows)
        same_prompt, same_lengths = bank.stack([name] * len(rows))
        assert same_lengths is None and same_prompt.shape[1] == setup["weights"][name].shape[0]
        alone = _generate(bank, sub_ids, sub_mask, [name] * len(rows))
        # (2) The plain single-prompt model (the prompt is its own), one row at a time.
        single = _single_prompt_model(loaded, name)
        for r, i in enumerate(rows):
            assert _trim(mixed[i]) == _trim(alone[r]), f"row {i} ({name}) differs from its own-prompt batch"
            n = len(features[i].input_ids)
            solo = single.generate(ids[i : i + 1, :n], mask[i : i + 1, :n], max_new_tokens=MAX_NEW)
            assert _trim(mixed[i]) == _trim(solo[0])
            e, m = single.encoder_inputs(ids[i : i + 1, :n], mask[i : i + 1, :n])
            solo_states = single.model.encoder(inputs_embeds=e, attention_mask=m).last_hidden_state[0]
            real = setup["weights"][name].shape[0] + n
            assert int(full_mask[i].sum()) == real
            torch.testing.assert_close(mixed_states[i, :real], solo_states, atol=1e-5, rtol=1e-4)


def test_answer_equals_predict_for_each_prompt(setup: dict) -> None:
    loaded = bank = setup["loaded"]
    assert bank.base_model == str(setup["model_dir"])
    rows = [
        (t, {"question": q, "context": c})
        for t in ("a", "b", "c")
        for q, c in zip(QUESTIONS, CONTEXTS, strict=True)
    ]
    rows = rows[::2] + rows[1::2]  # interleave tasks so batches mix them
    answers = bank.answer(rows, batch_size=5, max_new_tokens=MAX_NEW)
    for name in ("a", "b", "c"):
        mine = [(r, a) for r, a in zip(rows, answers, strict=True) if r[0] == name]
        expected = predict_answers(loaded, name, [fields for (_, fields), _ in mine], max_new_tokens=MAX_NEW)
        assert [a for _, a in mine] == expected
    # "c" truncates its inputs to 24 tokens, so its features differ from the others'.
    pair = {"question": QUESTIONS[1], "context": CONTEXTS[1]}
    features, tasks = bank.tokenize([("c", pair), ("a", pair)])
    assert len(features[0].input_ids) == 24 < len(features[1].input_ids)
    assert tasks == [bank.index("c"), bank.index("a")]
    with pytest.raises(UnknownTaskError, match=r"unknown task 'nope'; loaded tasks: a, b, c, a2"):
        bank.answer([("nope", {"question": "q", "context": "c"})])


def test_bank_refuses_prompt_of_wrong_width_or_model(setup: dict, tmp_path: Path) -> None:
    loaded = setup["loaded"]
    bank = PromptBank(loaded.model, loaded.tokenizer, base_model=str(setup["model_dir"]))
    narrow = PromptConfig(base_model=str(setup["model_dir"]), n_tokens=5, d_model=32)
    with pytest.raises(CheckpointError, match=r"32 wide but the model's d_model is 64"):
        bank.add("narrow", torch.zeros(5, 32), narrow)
    save_prompt(tmp_path / "narrow", torch.zeros(5, 32), narrow)
    with pytest.raises(CheckpointError, match=r"is 32 wide but the model's d_model is 64"):
        bank.add_dir("narrow", str(tmp_path / "narrow"))
    other = PromptConfig(base_model="google/t5-xxl-lm-adapt", n_tokens=5, d_model=D_MODEL)
    with pytest.raises(CheckpointError, match=r"trained for google/t5-xxl-lm-adapt.*tiny-t5"):
        bank.add("other", torch.zeros(5, D_MODEL), other)
    assert len(bank) == 0
    bank.add_dir("ok", str(setup["dirs"]["c"]))
    assert bank.names == ["ok"] and bank.describe()[0]["n_tokens"] == 8


def test_majority_vote_rules() -> None:
    # Normalised agreement counts as one vote: "The Cat." and "cat" beat "dog".
    assert majority_vote(["dog", "The Cat.", "cat"], priority=[0, 1, 2]) == "The Cat."
    assert majority_vote(["dog", "The Cat.", "cat"], priority=[2, 0, 1]) == "cat"
    # A three-way tie goes to the most trusted prompt.
    assert majority_vote(["x", "y", "z"], priority=[1, 2, 0]) == "y"
    # 2-2 tie: the group holding the best-ranked prompt wins.
    assert majority_vote(["p", "q", "p", "q"], priority=[3, 0, 1, 2]) == "q"
    assert tie_break_order([10.0, 30.0, 30.0, 5.0]) == [1, 2, 0, 3]
    with pytest.raises(ValueError):
        majority_vote(["a", "b"], priority=[0])


def _expected_majority(answers: dict[str, list[str]], f1: dict[str, float]) -> list[str]:
    """The vote, written independently: walk prompts from best F1; the first in a top group wins."""
    names = list(answers)
    ranked = sorted(names, key=lambda m: (-f1[m], names.index(m)))
    out = []
    for i in range(len(next(iter(answers.values())))):
        votes = Counter(normalize_answer(answers[m][i]) for m in names)
        top = max(votes.values())
        out.append(next(answers[m][i] for m in ranked if votes[normalize_answer(answers[m][i])] == top))
    return out


@pytest.mark.parametrize("names", [("a", "b", "c"), ("a", "a2", "c")])
def test_ensemble_one_pass_equals_majority_of_separate_runs(
    setup: dict, names: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = setup["loaded"]
    loaded = PromptBank(base.model, base.tokenizer)
    for n in names:
        loaded.add(n, base.entry(n).weight, base.entry(n).config)
    blank = [
        QAExample(id=f"q{i}", question=q, context=c, answers=("unused",))
        for i, (q, c) in enumerate(zip(QUESTIONS, CONTEXTS, strict=True))
    ]
    features = tokenize_examples(blank, loaded.tokenizer)
    gen = GenerationOptions(
        batch_size=4, max_new_tokens=MAX_NEW, env=DistEnv(device=loaded.device), bf16=False
    )
    separate = {
        n: generate_answers(_single_prompt_model(loaded, n), loaded.tokenizer, features, gen) for n in names
    }
    # Gold answers that make the last prompt the most accurate, so ties have a clear winner.
    last, first = names[-1], names[0]
    examples = [
        QAExample(
            id=ex.id,
            question=ex.question,
            context=ex.context,
            answers=(separate[last if i % 3 else first][i],),
        )
        for i, ex in enumerate(blank)
    ]
    references = {ex.id: list(ex.answers) for ex in examples}
    scores = {n: squad_scores(dict(zip(references, separate[n], strict=True)), references) for n in names}
    expected = _expected_majority(separate, {n: s["f1"] for n, s in scores.items()})
    distinct = [len({normalize_answer(separate[n][i]) for n in names}) for i in range(len(blank))]
    # The fixture's prompts disagree, so the vote is decided by a tie-break (a, b, c) or by a and its copy.
    assert set(distinct) == ({3} if names[1] == "b" else {2})

    calls: list[torch.Tensor | None] = []
    real_generate = loaded.model.generate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("prompt_lengths"))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(loaded.model, "generate", spy)
    report = ensemble_eval(loaded, SquadTask(), examples, features, replace(gen, show_progress=False))

    # One pass: K * N rows in ceil(K * N / batch) batches, with prompts of both lengths mixed in a batch.
    assert len(calls) == math.ceil(len(names) * len(examples) / 4)
    assert any(lengths is not None and {5, 8} <= set(lengths.tolist()) for lengths in calls)
    assert report["predictions"] == dict(zip(references, expected, strict=True))
    assert report["prompts"] == scores
    for key in ("exact_match", "f1"):
        assert report["prompt_mean"][key] == pytest.approx(sum(s[key] for s in scores.values()) / len(names))
    ensemble = squad_scores(report["predictions"], references)
    assert report["ensemble"]["f1"] == report["f1"] == ensemble["f1"]
    assert report["ensemble"]["exact_match"] == report["exact_match"] == ensemble["exact_match"]
    if names[1] == "a2":
        # "a" and its copy outvote the most accurate prompt on every question.
        assert list(report["predictions"].values()) == separate["a"]
        assert report["f1"] < scores["c"]["f1"]
    ranked = sorted(names, key=lambda n: (-scores[n]["f1"], names.index(n)))
    assert report["ensemble"]["tie_break"] == ranked
    if names[1] != "a2":
        assert ranked[0] == last  # the gold answers were chosen to make it so


def test_eval_cli_ensemble(setup: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from softprompt.cli import main

    data = {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": c,
                        "qas": [
                            {
                                "id": f"q{i}",
                                "question": q,
                                "answers": [{"text": c.split()[1], "answer_start": c.index(c.split()[1])}],
                            }
                        ],
                    }
                    for i, (q, c) in enumerate(zip(QUESTIONS[:4], CONTEXTS[:4], strict=True))
                ],
            }
        ],
    }
    (tmp_path / "dev.json").write_text(json.dumps(data), encoding="utf-8")
    dirs = setup["dirs"]
    argv = [
        "eval",
        "--model_name_or_path",
        str(setup["model_dir"]),
        "--validation_file",
        str(tmp_path / "dev.json"),
    ]
    for n in ("a", "b", "c"):
        argv += ["--prompt", str(dirs[n])]
    argv += ["--ensemble", "majority", "--eval_batch_size", "6", "--max_new_tokens", str(MAX_NEW)]
    argv += ["--output", str(tmp_path / "pred.json")]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["prompts"]) == {"prompt-a", "prompt-b", "prompt-c"}
    assert report["n_examples"] == 4 and report["ensemble"]["method"] == "majority"
    written = json.loads((tmp_path / "pred.json").read_text(encoding="utf-8"))
    # Several prompts: each prompt's predictions, and the ensemble's vote (issue 14).
    assert set(written) == {"prompts", "ensemble"}
    assert set(written["prompts"]) == {"prompt-a", "prompt-b", "prompt-c"}
    assert all(set(p) == {"q0", "q1", "q2", "q3"} for p in written["prompts"].values())
    predictions = written["ensemble"]
    assert set(predictions) == {"q0", "q1", "q2", "q3"}
    assert (
        squad_scores(predictions, {f"q{i}": [CONTEXTS[i].split()[1]] for i in range(4)})["f1"] == report["f1"]
    )


def test_fast_path_switch_reaches_the_model_and_changes_no_answer(setup: dict) -> None:
    fast = setup["loaded"]
    slow = load_model_and_prompts(
        str(setup["model_dir"]),
        [str(d) for d in setup["dirs"].values()],
        names=list(setup["dirs"]),
        fast_path=False,
    )
    assert fast.model.fast_path and not slow.model.fast_path  # the lean T5 covers this CPU model
    rows = [
        (t, {"question": q, "context": c})
        for t in ("a", "c")
        for q, c in zip(QUESTIONS[:4], CONTEXTS[:4], strict=True)
    ]
    assert slow.answer(rows, max_new_tokens=MAX_NEW) == fast.answer(rows, max_new_tokens=MAX_NEW)


@pytest.mark.parametrize("command", ["eval", "predict", "serve"])
def test_no_fast_path_flag_is_passed_to_the_loader(
    setup: dict, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import softprompt.commands.loading
    import softprompt.commands.serve
    from softprompt.cli import main

    seen: list[bool] = []

    def loader(*args, **kwargs):
        seen.append(kwargs["fast_path"])
        raise UserError("stop after loading")  # the flag is what this test is about

    monkeypatch.setattr(softprompt.commands.loading, "load_model_and_prompts", loader)
    monkeypatch.setattr(softprompt.commands.serve, "load_model_and_prompts", loader)
    qa = {
        "id": "q0",
        "question": QUESTIONS[0],
        "answers": [{"text": "Ada", "answer_start": CONTEXTS[0].index("Ada")}],
    }
    dev = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": CONTEXTS[0], "qas": [qa]}]}]}
    (tmp_path / "dev.json").write_text(json.dumps(dev), encoding="utf-8")
    model, prompt = str(setup["model_dir"]), str(setup["dirs"]["a"])
    argv = {
        "eval": ["--model", model, "--validation_file", str(tmp_path / "dev.json")],
        "predict": ["--model", model, "--question", "q?", "--context", "c."],
        "serve": ["--model", model, "--prompt", f"a={prompt}", "--port", "0"],
    }[command]
    assert main([command, *argv]) == 2
    assert main([command, *argv, "--no_fast_path"]) == 2
    assert seen == [True, False]
