"""The `softprompt` command: subcommands, help, version, score, eval and predict end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import METRIC_VECTORS, MRQA_RE, SQUAD_DEV, need
from softprompt import __version__
from softprompt.cli import COMMANDS, main
from softprompt.io.checkpoint import PromptConfig, save_prompt


def test_version_and_usage(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"softprompt {__version__}"
    assert main([]) == 2
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_subcommand_documents_its_flags(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "usage: softprompt" in out and command in out


def test_python_dash_m_is_the_same_command():
    proc = subprocess.run([sys.executable, "-m", "softprompt", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == f"softprompt {__version__}"


def test_score_prints_the_official_numbers(tmp_path, capsys):
    rows = [json.loads(line) for line in need(METRIC_VECTORS).read_text().splitlines()]
    preds = {r["id"]: r["prediction"] for r in rows}
    (tmp_path / "p.json").write_text(json.dumps(preds))
    assert main(["score", str(need(SQUAD_DEV)), str(tmp_path / "p.json")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"exact_match", "f1"}
    assert out["exact_match"] == pytest.approx(
        100 * sum(r["exact_match"] for r in rows) / len(rows), abs=1e-9
    )
    assert out["f1"] == pytest.approx(100 * sum(r["f1"] for r in rows) / len(rows), abs=1e-9)


def test_eval_and_predict_with_a_prompt_offline(tmp_path, tiny_model_dir, capsys):
    torch.manual_seed(0)
    save_prompt(
        tmp_path / "p",
        torch.randn(4, 64),
        PromptConfig(base_model=str(tiny_model_dir), n_tokens=4, d_model=64, max_source_length=64),
    )
    base = ["--model", str(tiny_model_dir), "--random_init", "--prompt", str(tmp_path / "p")]
    assert main(["eval", *base, "--validation_file", str(need(MRQA_RE)), "--max_eval_samples", "7",
                 "--output", str(tmp_path / "pred.json")]) == 0  # fmt: skip
    report = json.loads(capsys.readouterr().out)
    assert report["n_examples"] == 7 and 0 <= report["f1"] <= 100
    preds = json.loads((tmp_path / "pred.json").read_text())
    assert len(preds) == 7
    lines = tmp_path / "q.jsonl"
    lines.write_text(
        "\n".join(
            json.dumps({"id": f"q{i}", "question": "Who?", "context": f"Ann met Bob {i} times."})
            for i in range(3)
        )
    )
    assert main(["predict", *base, "--input_file", str(lines)]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["id"] for a in answers] == ["q0", "q1", "q2"] and all(
        isinstance(a["answer"], str) for a in answers
    )
    # the same question through --question/--context gives the same answer as the file path
    assert main(["predict", *base, "--question", "Who?", "--context", "Ann met Bob 0 times."]) == 0
    assert capsys.readouterr().out.strip() == answers[0]["answer"]


def test_output_dash_is_stdout_and_one_example_is_singular(tmp_path, monkeypatch, capsys):
    """`--output -` writes to stdout (no file named `-`), the tally to stderr, in the singular for one."""
    import json

    squad = {
        "version": "1.1",
        "data": [
            {
                "title": "t",
                "paragraphs": [
                    {
                        "context": "Paris is in France.",
                        "qas": [
                            {
                                "id": "q1",
                                "question": "Where is Paris?",
                                "answers": [{"text": "France", "answer_start": 12}],
                            }
                        ],
                    }
                ],
            }
        ],
    }
    data = tmp_path / "one.json"
    data.write_text(json.dumps(squad))
    monkeypatch.chdir(tmp_path)
    assert main(["format", str(data), "--output", "-", "--punctuation", "none"]) == 0
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in rows] == ["q1"] and rows[0]["targets"] == "France"
    assert err.strip() == "wrote 1 question to stdout"
    assert not (tmp_path / "-").exists()


def test_train_help_names_the_config_file(capsys):
    """`softprompt train --help` says that --config FILE exists and how it meets the flags."""
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "--config FILE (YAML or JSON" in out and "the flags given override it" in out


@pytest.mark.parametrize("native", ["0", "1"])
def test_precision_auto_is_resolved_announced_and_recorded(
    tmp_path, tiny_model_dir, monkeypatch, capsys, native
):
    """`--precision auto` (the default) becomes bf16 where bf16 is native, else fp32: said on stderr at the
    start of train and eval, recorded in the run's config.yaml and prompt, and in eval's report."""
    from softprompt.runtime import precision as prec

    monkeypatch.setenv(prec.NATIVE_BF16_ENV, native)
    monkeypatch.setattr(prec, "_warned", set())  # the slow-bf16 warning is once per process
    want = "bf16" if native == "1" else "fp32"
    data = need(MRQA_RE)
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_model_dir), "--random_init", "--prompt_tuning", "--n_tokens", "4",
                 "--train_file", str(data), "--max_train_samples", "4", "--global_batch_size", "2",
                 "--max_steps", "1", "--eval_steps", "0", "--max_source_length", "48",
                 "--output_dir", str(run), "--report_to", "none"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    reason = "computes bf16 natively (SOFTPROMPT_NATIVE_BF16=1)" if native == "1" else "emulates bf16"
    assert f"softprompt: precision {want} (auto: this CPU {reason}" in err
    assert f"precision: {want}\n" in (run / "config.yaml").read_text()
    prompt_dir = run / "last"
    assert main(["eval", "--model", str(tiny_model_dir), "--random_init", "--prompt", str(prompt_dir),
                 "--validation_file", str(data), "--max_eval_samples", "2"]) == 0  # fmt: skip
    out = capsys.readouterr()
    assert json.loads(out.out)["precision"] == want
    assert out.err.count(f"softprompt: precision {want} (auto:") == 1
    # An explicit choice is kept and says so; bf16 where it is emulated warns that it is slow.
    assert main(["eval", "--model", str(tiny_model_dir), "--random_init", "--prompt", str(prompt_dir),
                 "--validation_file", str(data), "--max_eval_samples", "2", "--precision", "bf16"]) == 0  # fmt: skip
    err = capsys.readouterr().err
    assert "softprompt: precision bf16 (as asked" in err
    assert ("emulated and runs slower than fp32" in err) is (native == "0")
