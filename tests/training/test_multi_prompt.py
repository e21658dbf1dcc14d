"""Many prompts, one run: prompt i of a K-prompt run equals the single-prompt run with prompt i's settings.

The tolerance: with prompts of one length and one task the mixed batch reproduces the single runs
bit for bit (the K = 2 test passes at 0). With prompts of other lengths and tasks, the rows are padded
to the longest input, target and prompt of all prompts, so the frozen model's matmuls and attention
reductions run over other shapes and float32 sums in another order: each reduction of n terms errs by
up to ~n x 1.2e-7 relative, and the backward pass through 4 layers with cancellation leaves a gradient
error of up to ~1e-4 of the gradient's RMS. Adafactor divides each update by the root of its (factored)
second moment, i.e. by about that RMS, and clips it at RMS 1, so each step moves a prompt vector by at
most lr x 1e-4 more or less: 0.3 x 3 steps x 1e-4 = 9e-5 < ATOL = 1e-4 (observed: 2.0e-5). A wrong
normalisation (a prompt's loss divided by all prompts' tokens), one prompt's gradient leaking into
another or a shared data stream moves a prompt by > 1e-2 (observed 0.8; asserted below).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import save_tiny_t5
from softprompt.errors import ConfigError
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train
from softprompt.training.multi_loop import train_multi
from softprompt.training.prompts import check_run, spec_problems

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL, RTOL = 1e-4, 0.0


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> Path:
    # Saved weights: a single run with another seed must load the very same model.
    return save_tiny_t5(tmp_path_factory.mktemp("tiny-saved"))


def _rows(n: int, seed: int) -> list[dict[str, str]]:
    import random

    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = rng.choice(["pos", "neg"])
        word = rng.choice(["great", "fine"] if label == "pos" else ["awful", "dull"])
        out.append({"id": f"r{seed}-{i}", "text": f"the film was {word} and long", "label": label})
    return out


def _jsonl(path: Path, rows: list[dict[str, str]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _base(tmp_path: Path, model: Path, name: str, **kw) -> TrainConfig:
    values = dict(
        output_dir=str(tmp_path / name),
        model_name_or_path=str(model),
        prompt_tuning=True,
        n_tokens=5,
        max_steps=3,
        global_batch_size=4,
        dropout=0.0,
        eval_steps=0,
        save_steps=0,
        max_source_length=96,
        max_target_length=8,
        max_eval_samples=6,
        eval_batch_size=8,
        report_to=["none"],
    )
    values.update(kw)
    return TrainConfig(**values)


def _prompt(directory: Path) -> torch.Tensor:
    return load_file(str(directory / "prompt.safetensors"))["prompt"]


def _single(cfg: TrainConfig, out: Path) -> torch.Tensor:
    train(dataclasses.replace(cfg, output_dir=str(out), prompts=[], num_prompts=None))
    return _prompt(out / "last")


def _multi_prompts(out: Path, names: list[str]) -> dict[str, torch.Tensor]:
    last = (out / "last").resolve()
    return {n: _prompt(last / "prompts" / n) for n in names}


def test_num_prompts_2_equals_two_single_runs_of_seeds_s_and_s_plus_1(tmp_path, saved_model, squad_small):
    train_file, dev_file = squad_small
    cfg = _base(
        tmp_path,
        saved_model,
        "multi",
        train_file=str(train_file),
        validation_file=str(dev_file),
        num_prompts=2,
    )
    results = train_multi(cfg)
    got = _multi_prompts(tmp_path / "multi", ["prompt0", "prompt1"])
    specs, _ = spec_problems(cfg)
    assert [s.cfg.seed for s in specs] == [42, 43]
    for i, spec in enumerate(specs):
        want = _single(spec.cfg, tmp_path / f"single{i}")
        torch.testing.assert_close(got[f"prompt{i}"], want, atol=ATOL, rtol=RTOL)
        # The single run's evaluation and best/ are the prompt's own: same scores, same best prompt.
        single = json.loads((tmp_path / f"single{i}" / "results.json").read_text())
        mine = results["prompts"][f"prompt{i}"]
        assert mine["f1"] == pytest.approx(single["f1"], abs=1e-9)
        assert mine["best_step"] == single["best_step"]
        torch.testing.assert_close(
            _prompt(tmp_path / "multi" / "best" / f"prompt{i}"),
            _prompt(tmp_path / f"single{i}" / "best"),
            atol=ATOL,
            rtol=RTOL,
        )
    # Two seeds train two different prompts (the test would pass trivially if they were one).
    assert (got["prompt0"] - got["prompt1"]).abs().max() > 1e-2
    records = [json.loads(line) for line in (tmp_path / "multi" / "metrics.jsonl").read_text().splitlines()]
    evals = {r["prompt"] for r in records if r["event"] == "eval"}
    assert evals == {"prompt0", "prompt1"}


def _three(tmp_path: Path, model: Path, squad: tuple[Path, Path], sentiment: str, name: str) -> TrainConfig:
    train_file, dev_file = squad
    prompts = [
        {
            "name": "qa",
            "train_file": str(train_file),
            "validation_file": str(dev_file),
            "n_tokens": 5,
            "seed": 1,
        },
        {
            "name": "sentiment",
            "train_file": sentiment,
            "validation_file": sentiment,
            "input_template": "review: {text}",
            "label_field": "label",
            "labels": ["pos", "neg"],
            "n_tokens": 9,
            "seed": 2,
            "lr": 0.1,
        },
        {
            "name": "qa_long",
            "train_file": str(train_file),
            "n_tokens": 3,
            "seed": 3,
            "prompt_init": "uniform",
        },
    ]
    return _base(tmp_path, model, name, prompts=prompts)


def test_three_prompts_squad_and_a_text_task_of_other_lengths_equal_their_single_runs(
    tmp_path, saved_model, squad_small
):
    sentiment = _jsonl(tmp_path / "sentiment.jsonl", _rows(12, seed=5))
    cfg = _three(tmp_path, saved_model, squad_small, sentiment, "multi3")
    results = train_multi(cfg)
    names = ["qa", "sentiment", "qa_long"]
    got = _multi_prompts(tmp_path / "multi3", names)
    assert [tuple(got[n].shape) for n in names] == [(5, 64), (9, 64), (3, 64)]
    for spec in spec_problems(cfg)[0]:
        want = _single(spec.cfg, tmp_path / f"single-{spec.name}")
        torch.testing.assert_close(got[spec.name], want, atol=ATOL, rtol=RTOL)
    # Each prompt is scored with its own task's metric; a prompt without a dev set has no best/.
    assert "accuracy" in results["prompts"]["sentiment"]
    assert results["prompts"]["qa"]["f1"] is not None
    assert (tmp_path / "multi3" / "best" / "sentiment" / "prompt_config.json").is_file()
    assert not (tmp_path / "multi3" / "best" / "qa_long").exists()
    # Changing one prompt's data leaves the others identical: rows of other prompts do not reach it.
    other = _jsonl(tmp_path / "other.jsonl", _rows(12, seed=99))
    changed = dataclasses.replace(cfg, output_dir=str(tmp_path / "changed"))
    changed.prompts[1] = {**cfg.prompts[1], "train_file": other}
    train_multi(changed)
    got2 = _multi_prompts(tmp_path / "changed", names)
    torch.testing.assert_close(got2["qa"], got["qa"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(got2["qa_long"], got["qa_long"], atol=ATOL, rtol=RTOL)
    assert (got2["sentiment"] - got["sentiment"]).abs().max() > 1e-3


def test_bad_prompt_lists_get_one_line_naming_the_entry(tmp_path, saved_model, squad_small):
    train_file, _ = squad_small
    base = _base(tmp_path, saved_model, "bad")
    ok = {"name": "a", "train_file": str(train_file)}

    def problems(**kw) -> str:
        return "; ".join(check_run(dataclasses.replace(base, **kw))[1])

    assert "prompts[1] 'a': the name is taken by prompts[0]" in problems(prompts=[ok, dict(ok)])
    missing = problems(prompts=[ok, {"name": "b", "train_file": str(tmp_path / "nope.json")}])
    assert missing == f"prompts[1] 'b': --train_file {tmp_path / 'nope.json'} does not exist"
    both = problems(prompts=[ok], num_prompts=2)
    assert "--num_prompts and a prompts: list" in both
    assert "prompts[0] 'a': 'optimizer' cannot differ per prompt" in problems(
        prompts=[{**ok, "optimizer": "adamw"}]
    )
    assert "prompts[0] needs a name" in problems(prompts=[{"train_file": str(train_file)}])
    # A prompt started from another model's prompt of another width.
    wide = tmp_path / "wide"
    from softprompt.io.checkpoint import PromptConfig, save_prompt

    save_prompt(wide, torch.zeros(4, 32), PromptConfig(base_model="x", n_tokens=4, d_model=32))
    other = {
        "name": "w",
        "train_file": str(train_file),
        "prompt_init": "from_file",
        "prompt_init_file": str(wide),
    }
    assert "prompts[1] 'w': its prompt_init_file" in problems(prompts=[ok, other])
    assert "is 32 wide, the model" in problems(prompts=[ok, other])
    with pytest.raises(ConfigError, match="prompts\\[1\\] 'a'"):
        train_multi(dataclasses.replace(base, prompts=[ok, dict(ok)]))
    assert not (tmp_path / "bad").exists()  # refused before anything loaded or was written


class _Crash(Exception):
    pass


def test_a_crash_after_a_checkpoint_resumes_bit_identically_for_every_prompt(
    tmp_path, saved_model, squad_small, monkeypatch
):
    from softprompt.io import rundir
    from softprompt.training import multi_loop

    sentiment = _jsonl(tmp_path / "sentiment.jsonl", _rows(10, seed=5))
    cfg = _three(tmp_path, saved_model, squad_small, sentiment, "whole")
    # Epochs roll over inside the run (10 sentiment rows, batch 4), so each stream's position matters.
    cfg = dataclasses.replace(cfg, max_steps=6, save_steps=2, eval_steps=2, save_total_limit=5)
    train_multi(cfg)
    crashed = dataclasses.replace(cfg, output_dir=str(tmp_path / "crashed"))
    real_step = multi_loop._step

    def dying_step(run, streams):
        if run.state.step == 3:  # step 3 is trained but not saved: the process dies as under kill -9
            raise _Crash
        return real_step(run, streams)

    monkeypatch.setattr(multi_loop, "_step", dying_step)
    with pytest.raises(_Crash):
        train_multi(crashed)
    assert rundir.last_checkpoint(tmp_path / "crashed") == "checkpoint-0000002"
    monkeypatch.setattr(multi_loop, "_step", real_step)
    train_multi(dataclasses.replace(crashed, resume=True))
    for name in ("qa", "sentiment", "qa_long"):
        sub = Path("prompts") / name / "prompt.safetensors"
        a = (tmp_path / "whole" / "checkpoint-0000006" / sub).read_bytes()
        assert a == (tmp_path / "crashed" / "checkpoint-0000006" / sub).read_bytes()
        state = [
            json.loads((tmp_path / d / "last" / "prompts" / name / "trainer_state.json").read_text())
            for d in ("whole", "crashed")
        ]
        for key in ("epoch", "batch_in_epoch", "best_step", "best_scores", "examples_seen"):
            assert state[0][key] == state[1][key]
    opt = [
        torch.load(tmp_path / d / "last" / "optimizer.pt", weights_only=True) for d in ("whole", "crashed")
    ]
    for sa, sb in zip(
        opt[0]["optimizer"]["state"].values(), opt[1]["optimizer"]["state"].values(), strict=True
    ):
        for key, value in sa.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[key])), key
    # `softprompt verify` checks the run like a single one: every checkpoint and every best/<name>/.
    rows = dict(rundir.verify_run(tmp_path / "crashed"))
    assert {"best/qa", "best/sentiment"} <= set(rows) and "best/qa_long" not in rows
    assert all(v.status == "ok" for v in rows.values())
    (tmp_path / "crashed" / "best" / "sentiment" / "prompt.safetensors").write_bytes(b"x")
    assert dict(rundir.verify_run(tmp_path / "crashed"))["best/sentiment"].status == "damaged"


def test_every_prompts_dev_set_is_answered_in_one_mixed_pass_equal_to_its_own_evaluation(
    tmp_path, saved_model, squad_small, monkeypatch
):
    from softprompt.inference import scoring
    from softprompt.inference.options import GenerationOptions
    from softprompt.runtime.distributed import DistEnv
    from softprompt.training import multi_loop
    from softprompt.training.multi_setup import setup_multi

    sentiment = _jsonl(tmp_path / "sentiment.jsonl", _rows(12, seed=5))
    cfg = _three(tmp_path, saved_model, squad_small, sentiment, "mixed-eval")
    prompts = [dict(p) for p in cfg.prompts]
    prompts[1]["max_target_length"] = 3  # another answer length: a pass of its own
    prompts[2]["validation_file"] = str(squad_small[1])  # qa and qa_long share the length-8 pass
    cfg = dataclasses.replace(cfg, prompts=prompts, eval_batch_size=4)
    run = setup_multi(cfg, DistEnv())
    try:
        passes: list[tuple[int, int, set[int]]] = []
        real = scoring.generate_answers

        def spy(model, tokenizer, features, options, *, row_prompts=None):
            owners: set[int] = set()

            def seen(idx):
                prompt, lengths = row_prompts(idx)
                # A batch holding rows of several prompts carries each row's own prompt length.
                owners.add(len({int(n) for n in lengths}) if lengths is not None else 1)
                return prompt, lengths

            passes.append((len(features), options.max_new_tokens, owners))
            wrapped = seen if row_prompts is not None else None  # one prompt's own model: nothing per row
            return real(model, tokenizer, features, options, row_prompts=wrapped)

        monkeypatch.setattr(scoring, "generate_answers", spy)
        multi_loop.evaluate_prompts(run)
        monkeypatch.setattr(scoring, "generate_answers", real)
        n = {name: len(slot.eval_features) for name, slot in zip(run.names, run.slots, strict=True)}
        # One pass per answer length, each over every prompt of that length; some batch mixes prompts.
        assert [(f, t) for f, t, _ in passes] == [(n["sentiment"], 3), (n["qa"] + n["qa_long"], 8)]
        assert max(passes[1][2]) == 2
        # Each prompt's answers are those of its own evaluation, alone on the model.
        for name, slot in zip(run.names, run.slots, strict=True):
            gen = GenerationOptions(batch_size=4, max_new_tokens=slot.cfg.max_target_length)
            alone = scoring.evaluate(
                slot.model, slot.tokenizer, slot.task, slot.eval_examples, slot.eval_features, gen
            )
            mixed = json.loads((run.out / multi_loop.predictions_file(name, 0)).read_text())
            assert mixed == alone.predictions, name
            assert slot.state.best_scores == alone.scores() and slot.state.best_step == 0
        # The prompts answer differently (else equal answers would prove nothing about per-row prompts).
        qa = json.loads((run.out / multi_loop.predictions_file("qa", 0)).read_text())
        qa_long = json.loads((run.out / multi_loop.predictions_file("qa_long", 0)).read_text())
        assert qa != qa_long
    finally:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()


# Wall-clock values, which no two runs share.
TIMINGS = {"time", "examples_per_second", "train_seconds", "train_examples_per_second"}


def _records(run: Path) -> list[dict]:
    """metrics.jsonl without the `start` records (a resume adds one) and the timings."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMINGS} for r in records if r["event"] != "start"]


@pytest.fixture(scope="module")
def logged_reference(tmp_path_factory, saved_model) -> tuple[TrainConfig, Path]:
    """An uninterrupted 2-prompt run whose loss windows (3 steps) straddle its checkpoints (every 2)."""
    from conftest import SQUAD_DEV, SQUAD_TRAIN, squad_subset

    root = tmp_path_factory.mktemp("multi-log")
    train_file = squad_subset(SQUAD_TRAIN, root / "train.json", 12)
    dev_file = squad_subset(SQUAD_DEV, root / "dev.json", 3)
    cfg = _base(
        root,
        saved_model,
        "reference",
        train_file=str(train_file),
        validation_file=str(dev_file),
        num_prompts=2,
        max_steps=8,
        save_steps=2,
        eval_steps=4,
        logging_steps=3,
        save_total_limit=10,
        dropout=0.1,
    )
    train_multi(cfg)
    return cfg, root / "reference"


@pytest.mark.parametrize(
    ("step", "before_eval"),
    [(4, False), (4, True), (8, False)],
    ids=["mid-window", "between-eval-and-last", "finished"],
)
def test_the_multi_prompt_log_after_resume_is_the_uninterrupted_runs(
    logged_reference, tmp_path, step, before_eval
):
    import shutil

    from softprompt.io import rundir

    cfg, reference = logged_reference
    out = tmp_path / "run"
    # What a kill right after checkpoint `step` leaves (with `before_eval`: after the evaluation at `step`
    # was logged, before the checkpoint learned of it): the log runs on past the checkpoint.
    shutil.copytree(reference, out, symlinks=True)
    for d in rundir.checkpoints(out):
        if int(d.name.removeprefix("checkpoint-")) > step:
            shutil.rmtree(d)
    (out / "results.json").unlink()
    (out / "last").unlink()
    (out / "last").symlink_to(rundir.checkpoint_name(step))
    if before_eval:
        checkpoint = out / rundir.checkpoint_name(step)
        state = json.loads((checkpoint / rundir.TRAINER_STATE).read_text())
        assert state["last_eval_step"] == step
        state["last_eval_step"] = 0
        (checkpoint / rundir.TRAINER_STATE).write_text(json.dumps(state))
        (checkpoint / rundir.MANIFEST).unlink()
        rundir.write_manifest(checkpoint)
    train_multi(dataclasses.replace(cfg, output_dir=str(out), resume=True))
    got, want = _records(out), _records(reference)
    # Step 6's loss window began before checkpoint 4: the resumed run continues the saved one.
    assert [(r["step"], r["prompt"]) for r in got if r["event"] == "train"] == [
        (s, p) for s in (3, 6, 8) for p in ("prompt0", "prompt1")
    ]
    assert got == want
    events = [json.loads(line)["event"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert events.count("start") == 2 and events.count("end") == 2  # one `end` per prompt


def test_the_progress_line_shows_each_prompts_own_dev_score(tmp_path, saved_model, squad_small, capfd):
    """Prompts of different tasks have different metrics, so the line names each prompt's score rather
    than averaging them under one metric's name."""
    train_file, dev_file = squad_small
    cfg = _base(
        tmp_path,
        saved_model,
        "progress",
        train_file=str(train_file),
        validation_file=str(dev_file),
        num_prompts=2,
        max_steps=2,
        eval_steps=1,
    )
    results = train_multi(cfg)
    err = capfd.readouterr().err
    step1 = next(line for line in err.splitlines() if "step 1/2" in line)
    assert "dev_prompt0 " in step1 and "dev_prompt1 " in step1 and "_mean" not in err
    assert set(results["prompts"]) == {"prompt0", "prompt1"}
