"""The trainer through the `softprompt train` command: files, flags, normalisation, learning."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SQUAD_DEV, SQUAD_TRAIN, need, squad_subset
from softprompt.cli import main
from softprompt.training.config import TrainConfig
from softprompt.training.loop import train


def _run(argv: list[str]) -> int:
    return main(["train", *argv])


def test_seed_flags_run_end_to_end_and_write_every_file(tmp_path, tiny_model_dir):
    out = tmp_path / "run"
    rc = _run(
        [
            "--output_dir", str(out), "--prompt_tuning", "--epochs", "40", "--optimizer", "adafactor",
            "--lr", "0.3", "--weight_decay", "1e-5",
            "--model_name_or_path", str(tiny_model_dir), "--random_init",
            "--train_file", str(need(SQUAD_TRAIN)), "--validation_file", str(need(SQUAD_DEV)),
            "--max_train_samples", "48", "--max_steps", "4", "--eval_steps", "2", "--save_steps", "2",
            "--max_eval_samples", "12", "--n_tokens", "8", "--batch_size", "8", "--grad_accum_steps", "2",
            "--logging_steps", "1", "--max_source_length", "128",
        ]
    )  # fmt: skip
    assert rc == 0
    for name in (
        "config.yaml",
        "metrics.jsonl",
        "results.json",
        "predictions_step2.json",
        "predictions_best.json",
    ):
        assert (out / name).is_file(), name
    assert (out / "best" / "prompt.safetensors").is_file() and (out / "best" / "README.md").is_file()
    assert (out / "last").resolve().name == "checkpoint-0000004"
    results = json.loads((out / "results.json").read_text())
    for key in ("exact_match", "f1", "best_step", "train_seconds", "train_examples_per_second"):
        assert isinstance(results[key], int | float), key
    assert results["steps"] == 4 and results["global_batch_size"] == 16 and results["mode"] == "prompt"
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_steps = [e["step"] for e in events if e["event"] == "train"]
    assert train_steps == [1, 2, 3, 4]
    assert [e["step"] for e in events if e["event"] == "eval"] == [2, 4]
    assert all(
        e["lr"] == 0.3 for e in events if e["event"] == "train"
    )  # constant: counted in steps, not examples
    preds = json.loads((out / "predictions_step2.json").read_text())
    assert len(preds) == 12 and all(isinstance(v, str) for v in preds.values())
    # the prompt is [P, d_model] float32 and moved away from its init
    p = load_file(str(out / "last" / "prompt.safetensors"))["prompt"]
    assert p.shape == (8, 64) and p.dtype == torch.float32


def test_adam_alias_and_unknown_flag(tmp_path, tiny_model_dir, squad_small, capsys):
    train_file, _ = squad_small
    base = ["--model_name_or_path", str(tiny_model_dir), "--random_init", "--train_file", str(train_file)]
    rc = _run([*base, "--output_dir", str(tmp_path / "a"), "--prompt_tuning", "--optimizer", "adam", "--lr", "1e-3",
               "--max_steps", "2", "--batch_size", "4", "--n_tokens", "5", "--max_source_length", "64",
               "--report_to", "none"])  # fmt: skip
    assert rc == 0
    assert json.loads((tmp_path / "a" / "results.json").read_text())["optimizer"] == "adam"
    with pytest.raises(SystemExit) as e:
        _run([*base, "--output_dir", str(tmp_path / "b"), "--learning_rat", "3"])
    assert e.value.code == 2
    assert "learning_rat" in capsys.readouterr().err


def _prompt_after(tmp_path, tiny_model_dir, train_file, name, **kw) -> torch.Tensor:
    cfg = TrainConfig(
        output_dir=str(tmp_path / name),
        model_name_or_path=str(tiny_model_dir),
        random_init=True,
        train_file=str(train_file),
        prompt_tuning=True,
        n_tokens=6,
        max_steps=3,
        eval_steps=0,
        save_steps=0,
        max_source_length=96,
        report_to=["none"],
        **{"dropout": 0.0, **kw},
    )
    train(cfg)
    return load_file(str(tmp_path / name / "last" / "prompt.safetensors"))["prompt"]


def test_gradient_does_not_depend_on_how_the_global_batch_is_split(tmp_path, tiny_model_dir, squad_small):
    """Loss = target tokens summed over the global batch / the global batch's token count."""
    train_file, _ = squad_small
    whole = _prompt_after(tmp_path, tiny_model_dir, train_file, "whole", global_batch_size=8)
    split = _prompt_after(tmp_path, tiny_model_dir, train_file, "split", batch_size=2, grad_accum_steps=4)
    init = _prompt_after(tmp_path, tiny_model_dir, train_file, "other", global_batch_size=8, seed=7)
    # Different micro-batch shapes round differently in float32; Adafactor's normalised update turns
    # that into differences of ~1e-6, far below what a wrong normalisation (a factor of 4) would give.
    torch.testing.assert_close(whole, split, atol=2e-5, rtol=1e-4)
    assert (whole - init).abs().max() > 1e-2


@pytest.mark.slow
def test_full_fine_tuning_overfits_32_real_squad_examples(tmp_path, tiny_model_dir):
    data = squad_subset(SQUAD_TRAIN, tmp_path / "train32.json", 32)
    out = tmp_path / "ft"
    rc = _run(
        [
            "--output_dir", str(out), "--model_name_or_path", str(tiny_model_dir), "--random_init",
            "--train_file", str(data), "--validation_file", str(data), "--optimizer", "adamw", "--lr", "3e-3",
            "--weight_decay", "0", "--max_steps", "60", "--eval_steps", "0", "--save_steps", "0", "--dropout", "0",
            "--max_source_length", "128", "--report_to", "none",
        ]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["mode"] == "finetune"
    assert results["exact_match"] >= 90.0, results
    assert (out / "best" / "model.safetensors").is_file() and (out / "best" / "config.json").is_file()


def test_accumulated_gradient_equals_the_global_token_mean():
    """Micro-batches with different token counts: a per-micro-batch mean would weight them wrongly."""
    from transformers import T5ForConditionalGeneration

    from conftest import tiny_config
    from softprompt.data.batching import Collator, Features
    from softprompt.modeling.model import PromptedT5
    from softprompt.modeling.prompt import SoftPrompt
    from softprompt.runtime.distributed import DistEnv
    from softprompt.training.loop import accumulate_gradients

    torch.manual_seed(0)
    model = PromptedT5(T5ForConditionalGeneration(tiny_config()), SoftPrompt(4, 64)).double()
    torch.nn.init.normal_(model.prompt.weight)
    g = torch.Generator().manual_seed(0)
    feats = [
        Features(
            input_ids=[
                *torch.randint(3, 900, (int(torch.randint(5, 20, (1,), generator=g)),), generator=g).tolist(),
                1,
            ],
            labels=[*torch.randint(3, 900, (n,), generator=g).tolist(), 1],
            example_index=i,
        )
        for i, n in enumerate([1, 9, 2, 14, 3, 1, 7, 5])
    ]
    collate = Collator()
    whole = collate(feats)
    model(whole["input_ids"], whole["attention_mask"], whole["labels"]).backward()  # plain token mean
    expected = model.prompt.weight.grad.clone()
    model.prompt.weight.grad = None
    _, tokens = accumulate_gradients(
        model, [collate(feats[i : i + 2]) for i in range(0, 8, 2)], DistEnv(), False
    )
    assert tokens == sum(len(f.labels) for f in feats)
    torch.testing.assert_close(model.prompt.weight.grad, expected, rtol=1e-10, atol=1e-12)


def _first_loss(out) -> float:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in records if r["event"] == "train")


def test_bf16_prompt_tuning_keeps_frozen_weights_in_bf16_and_matches_fp32(
    tmp_path, tiny_model_dir, squad_small
):
    from softprompt.runtime.distributed import DistEnv
    from softprompt.training.setup import setup

    train_file, _ = squad_small
    kw = {"global_batch_size": 8, "logging_steps": 1}
    fp32 = _prompt_after(tmp_path, tiny_model_dir, train_file, "fp32", **kw)
    bf16 = _prompt_after(tmp_path, tiny_model_dir, train_file, "bf16", precision="bf16", **kw)
    # The first step's loss is computed before any update: bf16 and fp32 differ by rounding only.
    first32, first16 = _first_loss(tmp_path / "fp32"), _first_loss(tmp_path / "bf16")
    assert abs(first16 - first32) <= 0.01 * first32
    from softprompt.modeling.model import load_t5
    from softprompt.modeling.prompt import initial_prompt

    init = initial_prompt(
        "sampled_vocab", 6, load_t5(tiny_model_dir, random_init=True, seed=42).shared.weight, seed=42
    )
    moved32, moved16 = fp32 - init, bf16 - init
    assert bf16.dtype == torch.float32 and moved32.abs().max() > 1e-2
    # The same training up to bf16 rounding: both moved the prompt the same way.
    assert torch.nn.functional.cosine_similarity(moved16.flatten(), moved32.flatten(), dim=0) > 0.9

    def dtypes(**over) -> dict[str, set[torch.dtype]]:
        cfg = TrainConfig(
            output_dir=str(tmp_path / "setup"), model_name_or_path=str(tiny_model_dir), random_init=True,
            train_file=str(train_file), n_tokens=4, report_to=["none"], overwrite_output_dir=True, **over,
        )  # fmt: skip
        run = setup(cfg, DistEnv())
        run.logger.close()
        linear = {m.weight.dtype for m in run.model.model.modules() if isinstance(m, torch.nn.Linear)}
        return {"linear": linear, "embedding": {run.model.model.shared.weight.dtype}}

    bf16_prompt = dtypes(prompt_tuning=True, precision="bf16")
    assert bf16_prompt == {"linear": {torch.bfloat16}, "embedding": {torch.float32}}
    assert dtypes(prompt_tuning=True)["linear"] == {torch.float32}  # fp32 runs keep fp32 weights
    assert dtypes(precision="bf16")["linear"] == {torch.float32}  # fine-tuning trains fp32 master weights


def _t5x_run(tmp_path, tiny_model_dir, squad_small, name: str, **kw) -> TrainConfig:
    train_file, dev_file = squad_small
    fields = dict(
        output_dir=str(tmp_path / name),
        model_name_or_path=str(tiny_model_dir),
        random_init=True,
        train_file=str(train_file),
        validation_file=str(dev_file),
        max_eval_samples=6,
        prompt_tuning=True,
        n_tokens=6,
        global_batch_size=8,
        dropout=0.0,
        eval_steps=0,
        save_steps=2,
        max_source_length=96,
        max_target_length=8,
        punctuation="paper",
        report_to=["none"],
    )
    fields.update(kw)
    return TrainConfig(**fields)


def test_adafactor_initial_step_survives_resume(tmp_path, tiny_model_dir, squad_small):
    """Train 2 steps from T5X's step 1,100,000, resume to 4: the same prompt as 4 steps straight, because
    the checkpoint carries the counter (the resumed config even leaves --initial_step unset, whose
    default for a random init would be 0)."""
    whole = _t5x_run(tmp_path, tiny_model_dir, squad_small, "whole", max_steps=4, initial_step=1_100_000)
    results = train(whole)
    assert results["initial_step"] == 1_100_000 and results["punctuation"] == "paper"
    assert isinstance(results["t5_exact_match"], float) and isinstance(results["t5_f1"], float)
    assert json.loads((tmp_path / "whole" / "results.json").read_text())["t5_f1"] == results["t5_f1"]

    train(_t5x_run(tmp_path, tiny_model_dir, squad_small, "split", max_steps=2, initial_step=1_100_000))
    resumed = _t5x_run(tmp_path, tiny_model_dir, squad_small, "split", max_steps=4, resume=True)
    assert train(resumed)["initial_step"] == 1_100_000

    state = torch.load(tmp_path / "split" / "last" / "optimizer.pt", weights_only=True)["optimizer"]
    assert state["param_groups"][0]["initial_step"] == 1_100_000
    assert [s["step"] for s in state["state"].values()] == [4]  # updates taken: T5X's step 1,100,004
    prompt = {
        d: load_file(str(tmp_path / d / "last" / "prompt.safetensors"))["prompt"] for d in ("whole", "split")
    }
    torch.testing.assert_close(prompt["split"], prompt["whole"], rtol=0, atol=0)

    # The counter matters: the same 4 steps counted from 0 train a different prompt.
    train(_t5x_run(tmp_path, tiny_model_dir, squad_small, "zero", max_steps=4, initial_step=0))
    zero = load_file(str(tmp_path / "zero" / "last" / "prompt.safetensors"))["prompt"]
    assert (zero - prompt["whole"]).abs().max() > 1e-3
    card = (tmp_path / "whole" / "last" / "README.md").read_text()
    assert "| Adafactor initial step | 1,100,000 |" in card and "| Input text | paper |" in card


def test_a_library_resume_keeps_the_runs_own_lr_and_prompt_length(tmp_path, tiny_model_dir, squad_small):
    """TrainConfig(resume=True) without lr or n_tokens means the run's own values, as `train --resume`
    reads them, not the mode's defaults (0.3 and 100), which a resume would have to refuse."""
    fields = dict(lr=0.5, n_tokens=5, initial_step=1_100_000)
    train(_t5x_run(tmp_path, tiny_model_dir, squad_small, "split", max_steps=2, **fields))
    resumed = _t5x_run(tmp_path, tiny_model_dir, squad_small, "split", max_steps=4, resume=True)
    resumed = dataclasses.replace(resumed, n_tokens=None)  # as a caller who never said
    assert resumed.lr is None
    train(resumed)
    train(_t5x_run(tmp_path, tiny_model_dir, squad_small, "whole", max_steps=4, **fields))
    prompt = {
        d: load_file(str(tmp_path / d / "last" / "prompt.safetensors"))["prompt"] for d in ("whole", "split")
    }
    assert prompt["split"].shape == (5, 64)
    torch.testing.assert_close(prompt["split"], prompt["whole"], rtol=0, atol=0)


def test_eval_of_a_padded_prompt_reports_both_scorings(tmp_path, tiny_model_dir, squad_small, capsys):
    train(_t5x_run(tmp_path, tiny_model_dir, squad_small, "pt", max_steps=2, initial_step=1_100_000))
    _, dev_file = squad_small
    capsys.readouterr()  # the training run's own output
    rc = main([
        "eval", "--model", str(tiny_model_dir), "--random_init", "--prompt", str(tmp_path / "pt" / "best"),
        "--validation_file", str(dev_file), "--max_eval_samples", "6", "--max_new_tokens", "4",
    ])  # fmt: skip
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["punctuation"] == "paper"  # read from the prompt's own config
    assert {"exact_match", "f1", "t5_exact_match", "t5_f1"} <= set(report)
    assert all(0.0 <= report[k] <= 100.0 for k in ("exact_match", "f1", "t5_exact_match", "t5_f1"))


def test_initial_step_default_follows_the_checkpoint_and_is_refused_for_adamw(tmp_path):
    from softprompt.training.config import check_config, resolve_initial_step

    assert resolve_initial_step(TrainConfig()) == 1_100_000  # google/t5-base-lm-adapt
    assert resolve_initial_step(TrainConfig(model_name_or_path="/models/t5-xxl-lm-adapt/")) == 1_100_000
    assert resolve_initial_step(TrainConfig(model_name_or_path="google/t5-v1_1-base")) == 1_000_000
    assert resolve_initial_step(TrainConfig(model_name_or_path="runs/ft/best")) == 0
    assert resolve_initial_step(TrainConfig(random_init=True)) == 0
    assert resolve_initial_step(TrainConfig(initial_step=7)) == 7
    assert resolve_initial_step(TrainConfig(optimizer="adamw")) == 0
    _, problems = check_config(
        TrainConfig(output_dir=str(tmp_path / "x"), dataset_name="squad", optimizer="adamw", initial_step=5)
    )
    assert problems == ["--initial_step only applies to --optimizer adafactor, not adamw"]


def test_compile_trains_the_prompt_the_eager_step_trains(tmp_path, tiny_model_dir, squad_small, monkeypatch):
    """--compile runs the lean training forward under torch.compile: the same prompt after 3 steps with
    dropout (its masks drawn as the eager run draws them), and a step that really went through it."""
    from softprompt.modeling.model import PromptedT5

    train_file, _ = squad_small
    calls = []
    compile_training_forward = PromptedT5.compile_training_forward

    def counted(self, device):
        on = compile_training_forward(self, device)
        inner = self.compiled_logits
        self.compiled_logits = lambda *a, **k: calls.append(1) or inner(*a, **k)
        return on

    eager = _prompt_after(tmp_path, tiny_model_dir, train_file, "eager", global_batch_size=4, dropout=0.1)
    monkeypatch.setattr(PromptedT5, "compile_training_forward", counted)
    comp = _prompt_after(
        tmp_path, tiny_model_dir, train_file, "compiled", global_batch_size=4, dropout=0.1, compile=True
    )
    other = _prompt_after(
        tmp_path, tiny_model_dir, train_file, "other", global_batch_size=4, dropout=0.1, seed=7
    )
    assert len(calls) == 3
    torch.testing.assert_close(comp, eager, atol=2e-5, rtol=1e-4)
    assert (other - eager).abs().max() > 1e-2


def test_fast_path_and_bf16_weights_switches_reach_the_model(tmp_path, tiny_model_dir, squad_small):
    from softprompt.runtime.distributed import DistEnv
    from softprompt.training.setup import setup

    def model(**over):
        cfg = TrainConfig(
            output_dir=str(tmp_path / "setup"), model_name_or_path=str(tiny_model_dir), random_init=True,
            train_file=str(squad_small[0]), n_tokens=4, report_to=["none"], overwrite_output_dir=True,
            prompt_tuning=True, precision="bf16", **over,
        )  # fmt: skip
        run = setup(cfg, DistEnv())
        run.logger.close()
        return run.model

    cpu = torch.device("cpu")
    default = model()
    assert default.fast_path and default.fast_path_dtype(cpu) == torch.bfloat16
    assert default.model.lm_head.weight.dtype == torch.bfloat16
    off = model(fast_path=False, bf16_weights=False)  # --no_fast_path --no_bf16_weights
    assert not off.fast_path and off.fast_path_dtype(cpu) is None
    assert {m.weight.dtype for m in off.model.modules() if isinstance(m, torch.nn.Linear)} == {torch.float32}


def test_a_preset_trains_offline_on_the_data_files_given_as_flags(
    tmp_path, tiny_model_dir, squad_small, capsys
):
    """The seed's headline preset names the Hub's squad; --train_file/--validation_file replace it, so
    the run trains on those files without the network (HF_DATASETS_OFFLINE would refuse the Hub)."""
    from pathlib import Path

    train_file, dev_file = squad_small
    preset = Path(__file__).resolve().parents[2] / "configs" / "prompt_base_adafactor_lr0.3.yaml"
    out = tmp_path / "run"
    rc = _run(
        [
            "--config", str(preset), "--train_file", str(train_file), "--validation_file", str(dev_file),
            "--model", str(tiny_model_dir), "--random_init", "--output_dir", str(out), "--max_steps", "2",
            "--global_batch_size", "4", "--n_tokens", "4", "--max_eval_samples", "4", "--eval_steps", "2",
            "--max_source_length", "64", "--precision", "fp32", "--report_to", "none",
        ]
    )  # fmt: skip
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 2 and results["lr"] == 0.3 and results["initial_step"] == 1100000
    # The start line names Adafactor's initial step, which sets its decay.
    start = next(
        line for line in capsys.readouterr().out.splitlines() if line.startswith("softprompt: prompt tuning")
    )
    assert "with adafactor at lr 0.3, weight decay 1e-05, initial step 1,100,000;" in start
    assert len(json.loads((out / "predictions_best.json").read_text())) == 4
