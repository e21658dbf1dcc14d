"""The command line end to end on a tiny model (issue 14): runs, resumes, cards, eval outputs, score."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import yaml

from conftest import MRQA_RE, need
from softprompt.cli import main
from softprompt.io.checkpoint import PromptConfig, save_prompt

pytestmark = pytest.mark.usefixtures("one_thread")


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def _one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _events(out: Path, kind: str) -> list[dict]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["event"] == kind]


def _card_rows(card: Path) -> dict[str, str]:
    rows = {}
    for line in card.read_text().splitlines():
        m = re.match(r"\| ([^|]+) \| ([^|]+) \|$", line)
        if m:
            rows[m.group(1).strip()] = m.group(2).strip()
    return rows


def _prompt_run(model: Path, train: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", f"--output_dir={out}", "--prompt_tuning", f"--model={model}", "--random_init",
        f"--train_file={train}", "--max_source_length=64", "--n_tokens=4", "--batch_size=4",
        "--logging_steps=1", "--report_to=none", "--seed=3", *extra,
    ]  # fmt: skip


def test_training_without_a_dev_set_checkpoints_on_schedule_and_reports(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    out = tmp_path / "nodev"
    # --eval_steps 2 with no dev set used to crash at step 2, before that step's checkpoint.
    argv = _prompt_run(
        tiny_model_dir, squad_small[0], out, "--max_steps=4", "--eval_steps=2", "--save_steps=2"
    )
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "no dev set (--validation_file / --dataset_name): no evaluation, no best/ checkpoint" in printed
    assert (out / "last").resolve().name == "checkpoint-0000004" and not (out / "best").exists()
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["f1"] is None and results["best_step"] is None
    assert _events(out, "eval") == []
    # `report` takes the finished run although it has no scores.
    assert main(["report", str(out), f"--output_dir={tmp_path / 'rep'}"]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "Trained without a dev set" in md and "nodev" in md


def test_resume_applies_and_records_allowed_changes_and_refuses_the_rest(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    out = tmp_path / "run"
    assert (
        main(
            _prompt_run(
                tiny_model_dir, squad_small[0], out, "--max_steps=4", "--save_steps=2", "--eval_steps=0"
            )
        )
        == 0
    )
    capsys.readouterr()
    before = (out / "config.yaml").read_text()

    # Settings that change what the run computes are refused, in one line naming them all.
    assert (
        _exit(
            [
                "train",
                f"--output_dir={out}",
                "--resume",
                "--lr",
                "0.01",
                "--n_tokens",
                "5",
                "--max_steps",
                "6",
            ]
        )
        == 2
    )
    line = _one_line(capsys.readouterr().err)
    assert "--resume cannot change" in line and "n_tokens (4 -> 5)" in line and "lr (0.3 -> 0.01)" in line
    assert (out / "config.yaml").read_text() == before and json.loads((out / "results.json").read_text())[
        "steps"
    ] == 4

    # max_steps and the schedules may change: applied, and recorded in config.yaml, results.json and `end`.
    assert main(["train", f"--output_dir={out}", "--resume", "--max_steps=6", "--save_steps=3"]) == 0
    assert "resuming with changed settings: max_steps 4 -> 6, save_steps 2 -> 3" in capsys.readouterr().out
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["max_steps"], saved["save_steps"], saved["lr"], saved["n_tokens"]) == (6, 3, 0.3, 4)
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 6 and results["lr"] == 0.3
    end = _events(out, "end")[-1]
    assert end["steps"] == 6 and end["lr"] == 0.3
    assert _events(out, "resume")[-1]["changed"] == {
        "max_steps": {"from": 4, "to": 6},
        "save_steps": {"from": 2, "to": 3},
    }
    assert [e["step"] for e in _events(out, "train")] == [1, 2, 3, 4, 5, 6]


def test_model_card_points_at_the_final_folder_and_states_the_whole_run(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    out = tmp_path / "card"
    argv = _prompt_run(tiny_model_dir, squad_small[0], out, f"--validation_file={squad_small[1]}",
                       "--max_steps=4", "--eval_steps=2", "--save_steps=2", "--max_eval_samples=6")  # fmt: skip
    assert main(argv) == 0
    captured = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    # Each card names its checkpoint's own folder (last/ is a link that moves on).
    for folder, loads_from in (("best", out / "best"), ("last", out / (out / "last").resolve().name)):
        card = (out / folder / "README.md").read_text()
        assert ".tmp" not in card and f"load_prompt({str(loads_from)!r})" in card, folder
        assert f"--prompt {loads_from}" in card
    rows = _card_rows(out / "best" / "README.md")
    assert rows["Training steps"] == "4" == str(results["steps"])
    assert rows["best step"] == str(results["best_step"])
    assert rows["Seed"] == "3"
    assert rows["Epochs"] != "—" and float(rows["Epochs"]) == pytest.approx(
        4 * 4 / 64
    )  # 4 steps of 4 over 64
    # The progress line printed after step 2's evaluation shows that evaluation's F1, not the one before.
    f1_at_2 = _events(out, "eval")[0]["f1"]
    lines = [line for line in captured.err.splitlines() if "step 2/4" in line]
    shown = re.search(r"dev_f1 ([0-9.]+)", lines[-1]) if lines else None
    assert shown is not None and float(shown.group(1)) == pytest.approx(f1_at_2, abs=0.01), lines


def test_default_mode_is_safe_and_says_what_runs(tiny_model_dir, squad_small, tmp_path, capsys):
    out = tmp_path / "ft"
    argv = ["train", "--output_dir", str(out), "--model", str(tiny_model_dir), "--random_init",
            "--train_file", str(squad_small[0]), "--max_steps", "1", "--max_source_length", "64",
            "--batch_size", "4", "--eval_steps", "0", "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert (
        "full fine-tuning of" in printed and "every weight; pass --prompt_tuning to train a prompt" in printed
    )
    assert "adafactor at lr 5e-05" in printed and "; 1 step" in printed and "1 steps" not in printed
    assert json.loads((out / "results.json").read_text())["lr"] == 5e-5
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 5e-5


def test_a_run_that_fails_while_setting_up_leaves_no_directory(tiny_model_dir, tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"version": "1.1", "data": []}))
    out = tmp_path / "never"
    argv = ["train", "--output_dir", str(out), "--model", str(tiny_model_dir), "--random_init",
            "--train_file", str(empty), "--report_to", "none", "--prompt_tuning"]  # fmt: skip
    assert _exit(argv) == 2
    assert "contains no questions" in _one_line(capsys.readouterr().err)
    assert not out.exists()


def test_run_or_prompt_directory_as_model_says_what_to_pass(tiny_model_dir, tmp_path, capsys):
    prompt = save_prompt(tmp_path / "p", torch.zeros(4, 64), PromptConfig("google/t5-small-lm-adapt", 4, 64))
    run = tmp_path / "run"
    (run / "best").mkdir(parents=True)
    (run / "config.yaml").write_text("lr: 0.3\n")
    for model, expected in (
        (prompt, f"{prompt} is a prompt checkpoint, not a model; pass the model it was trained for and the "
                 f"prompt: --model google/t5-small-lm-adapt --prompt {prompt}"),
        (run, f"{run} is a training run directory, not a model; pass its best/ checkpoint"),
    ):  # fmt: skip
        assert _exit(["predict", "--model", str(model), "--question", "Who?", "--context", "Ann."]) == 2
        assert expected in _one_line(capsys.readouterr().err)


def _mrqa_subset(path: Path, n_contexts: int) -> Path:
    lines = need(MRQA_RE).read_text().splitlines()
    path.write_text("\n".join(lines[: 1 + n_contexts]) + "\n")
    return path


def test_eval_writes_every_prompts_predictions_and_score_reads_mrqa(tiny_model_dir, tmp_path, capsys):
    torch.manual_seed(0)
    dirs = []
    for name in ("a", "b"):
        dirs.append(
            save_prompt(
                tmp_path / name / "best",
                torch.randn(4, 64),
                PromptConfig(base_model=str(tiny_model_dir), n_tokens=4, d_model=64, max_source_length=64),
            )
        )
    data = _mrqa_subset(tmp_path / "re.jsonl", 6)
    n_questions = sum(len(json.loads(line)["qas"]) for line in data.read_text().splitlines()[1:])
    base = ["eval", "--model", str(tiny_model_dir), "--random_init", f"--validation_file={data}",
            "--max_new_tokens=4"]  # fmt: skip
    assert (
        main(
            [
                *base,
                "--prompt",
                str(dirs[0]),
                "--prompt",
                str(dirs[1]),
                "--output",
                str(tmp_path / "all.json"),
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    written = json.loads((tmp_path / "all.json").read_text())
    assert set(written) == {"prompts"} and set(written["prompts"]) == {"a/best", "b/best"} == set(
        report["prompts"]
    )
    assert all(len(p) == n_questions for p in written["prompts"].values())
    # One prompt: {id: answer}, which `score` reads back for an MRQA file with eval's own numbers.
    for i, name in enumerate(("a/best", "b/best")):
        pred = tmp_path / f"{i}.json"
        pred.write_text(json.dumps(written["prompts"][name]))
        assert main(["score", str(data), str(pred)]) == 0
        scored = json.loads(capsys.readouterr().out)
        assert scored["f1"] == pytest.approx(report["prompts"][name]["f1"], abs=1e-9)
        assert scored["exact_match"] == pytest.approx(report["prompts"][name]["exact_match"], abs=1e-9)


def test_a_long_tokenizer_error_is_shortened_at_a_word_boundary(monkeypatch, tmp_path):
    import transformers

    from softprompt.errors import CheckpointError
    from softprompt.modeling.model import load_tokenizer

    words = " ".join(f"word{i:03d}" for i in range(60))  # 479 characters on one line

    def refuse(*args, **kwargs):
        raise OSError(words + "\nsecond line")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(tmp_path)
    quoted = re.search(r"\((.*)\)$", str(e.value)).group(1)
    assert quoted.endswith(" ...") and len(quoted) <= 160
    assert all(re.fullmatch(r"word\d{3}", w) for w in quoted.removesuffix(" ...").split()), quoted


def test_prompt_init_from_file_takes_the_files_length_unless_n_tokens_says_otherwise(
    tiny_model_dir, squad_small, tmp_path, capsys
):
    # Issue 27 item 12: an 8-token prompt demanded --n_tokens 8 although the file says so.
    start = save_prompt(
        tmp_path / "p8", torch.randn(8, 64), PromptConfig(str(tiny_model_dir), n_tokens=8, d_model=64)
    )
    argv = [a for a in _prompt_run(tiny_model_dir, squad_small[0], tmp_path / "run") if a != "--n_tokens=4"]
    argv += ["--prompt_init=from_file", f"--prompt_init_file={start}", "--max_steps=1", "--save_steps=1"]
    assert main(argv) == 0
    capsys.readouterr()
    from safetensors.torch import load_file

    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    weight = load_file(tmp_path / "run" / "last" / "prompt.safetensors")
    assert saved["n_tokens"] == 8 and next(iter(weight.values())).shape == (8, 64)
    # An explicit --n_tokens that contradicts the file: one line, before anything is written.
    conflicting = [*argv, "--n_tokens=4", f"--output_dir={tmp_path / 'clash'}"]
    assert main(conflicting) == 2
    err = capsys.readouterr().err
    assert f"--n_tokens 4, but the --prompt_init_file prompt {start} has 8 tokens; drop --n_tokens" in err
    assert "Traceback" not in err and not (tmp_path / "clash").exists()
