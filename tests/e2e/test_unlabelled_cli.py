"""Unlabelled test files through the command line (issue 25 item 3): predict and eval --output, no score."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

_ROWS = [{"premise": f"P {i}.", "hypothesis": f"H {i}.", "idx": i} for i in range(3)]


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _exit(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return int(e.code)


def test_eval_output_predicts_an_unlabelled_file_and_reports_no_score(tiny_model_dir, tmp_path, capsys):
    test = _write(tmp_path / "test.jsonl", _ROWS)
    base = ["--model", str(tiny_model_dir), "--random_init", "--task", "rte", "--max_new_tokens=3"]
    out = tmp_path / "pred.json"
    assert main(["eval", *base, f"--validation_file={test}", "--output", str(out)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["scores"] is None and "no score" in report["no_score"] and "accuracy" not in report
    assert report["n_examples"] == 3 and set(json.loads(out.read_text())) == {"0", "1", "2"}
    # predict reads the same file and answers each row, in order, with its id.
    assert main(["predict", *base, "--input_file", str(test)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["id"] for line in lines] == ["0", "1", "2"]
    # Without --output there is nothing to report: one line, exit 2.
    assert _exit(["eval", *base, f"--validation_file={test}"]) == 2
    err = capsys.readouterr().err
    assert "give --output FILE" in err and "Traceback" not in err
    # An ensemble breaks ties by each prompt's score: with no labels it is one line, before any work.
    import torch

    from conftest import tiny_config
    from softprompt.io.checkpoint import PromptConfig, save_prompt

    d_model = tiny_config().d_model
    config = PromptConfig(base_model=str(tiny_model_dir), n_tokens=2, d_model=d_model)
    dirs = [save_prompt(tmp_path / name, torch.zeros(2, d_model), config) for name in ("a", "b")]
    prompts = ["--prompt", str(dirs[0]), "--prompt", str(dirs[1]), "--ensemble", "majority"]
    assert _exit(["eval", *base, f"--validation_file={test}", "--output", str(out), *prompts]) == 2
    err = capsys.readouterr().err
    assert "--ensemble majority breaks ties" in err and "Traceback" not in err


def test_eval_refuses_a_file_mixing_labelled_and_unlabelled_rows(tiny_model_dir, tmp_path, capsys):
    mixed = _write(tmp_path / "mixed.jsonl", [{**_ROWS[0], "label": 0}, *_ROWS[1:]])
    argv = ["eval", "--model", str(tiny_model_dir), "--random_init", "--task", "rte",
            f"--validation_file={mixed}", "--output", str(tmp_path / "p.json")]  # fmt: skip
    assert _exit(argv) == 2
    err = capsys.readouterr().err
    assert "example '1' has no 'label'" in err and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_train_refuses_an_unlabelled_dev_set_and_unlabelled_training_rows(tiny_model_dir, tmp_path, capsys):
    test = _write(tmp_path / "test.jsonl", _ROWS)
    train = _write(tmp_path / "train.jsonl", [{**r, "label": r["idx"] % 2} for r in _ROWS])
    base = ["train", "--task", "rte", f"--model={tiny_model_dir}", "--random_init", "--prompt_tuning",
            "--n_tokens=4", "--max_steps=1", "--report_to=none"]  # fmt: skip
    for files, clause in (
        (
            [f"--train_file={train}", f"--validation_file={test}"],
            "the dev set (--validation_file) needs labels",
        ),
        ([f"--train_file={test}"], "training needs labelled rows"),
    ):
        out = tmp_path / f"run{len(files)}"
        assert _exit([*base, f"--output_dir={out}", *files]) == 2
        err = capsys.readouterr().err
        assert clause in err and "Traceback" not in err
        assert not out.exists()


@pytest.mark.parametrize("name", ["rte", "boolq", "multirc"])
def test_predict_submission_superglue_writes_the_leaderboards_file(name, tiny_model_dir, tmp_path, capsys):
    from superglue_records import TEST_RECORDS  # the official test files' record shapes

    record = TEST_RECORDS[name]
    others = [{**record, "idx": i} for i in (3, 1)]  # idx as the file has it, not the line number
    test = _write(tmp_path / "test.jsonl", [record, *others])
    base = ["predict", "--model", str(tiny_model_dir), "--random_init", "--task", name]
    base += ["--input_file", str(test), "--classify", "rank"]
    assert main(base) == 0
    ranked = [json.loads(line)["answer"] for line in capsys.readouterr().out.splitlines()]
    out = tmp_path / "submission"
    out.mkdir()
    assert main([*base, "--submission", "superglue", "--output", str(out)]) == 0
    file_name = {"rte": "RTE.jsonl", "boolq": "BoolQ.jsonl", "multirc": "MultiRC.jsonl"}[name]
    assert f"wrote {out / file_name} (3 test records)" in capsys.readouterr().err
    lines = [json.loads(line) for line in (out / file_name).read_text().splitlines()]
    # The same rank answers, each under its record's idx, spelt as the leaderboard reads them.
    spelt = {
        "rte": lambda a: a,
        "boolq": lambda a: {"True": "true", "False": "false"}[a],
        "multirc": lambda a: {"True": 1, "False": 0}[a],
    }[name]
    if name == "multirc":
        assert lines == [
            {"idx": i, "passage": {"questions": [{"idx": 0, "answers": [{"idx": 0, "label": spelt(a)}]}]}}
            for i, a in zip((0, 3, 1), ranked, strict=True)
        ]
    else:
        assert lines == [{"idx": i, "label": spelt(a)} for i, a in zip((0, 3, 1), ranked, strict=True)]


def test_predict_submission_refuses_a_record_without_idx_and_greedy_labels_in_one_line(
    tiny_model_dir, tmp_path, capsys
):
    test = _write(tmp_path / "test.jsonl", [_ROWS[0], {"premise": "P", "hypothesis": "H"}])
    base = ["predict", "--model", str(tiny_model_dir), "--random_init", "--task", "rte"]
    base += ["--input_file", str(test), "--submission", "superglue", "--output", str(tmp_path / "RTE.jsonl")]
    for extra, clause in (
        (["--classify", "rank"], f"{test}: line 2: has no 'idx', an integer, which a SuperGLUE submission"),
        ([], "add --classify rank"),
    ):
        assert _exit([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert clause in err and "Traceback" not in err
    assert not (tmp_path / "RTE.jsonl").exists()
    # Without a test file there is nothing to submit: one line from the parser.
    assert _exit(["predict", "--model", str(tiny_model_dir), "--task", "rte", "--fields", "{}",
                  "--submission", "superglue"]) == 2  # fmt: skip
    assert "give --input_file" in capsys.readouterr().err
