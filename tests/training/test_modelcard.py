"""write_model_card: front matter, facts, and a runnable "how to load" section."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

import softprompt
from softprompt.errors import CheckpointError
from softprompt.training.modelcard import write_model_card

INFO: dict[str, Any] = {
    # The resolved config ...
    "model_name_or_path": "google/t5-base-lm-adapt",
    "prompt_tuning": True,
    "train_file": "../shared/data/squad/train-v1.1.json",
    "validation_file": "../shared/data/squad/dev-v1.1.json",
    "optimizer": "adafactor",
    "lr": 0.3,
    "weight_decay": 1e-5,
    "n_tokens": 100,
    "prompt_init": "sampled_vocab",
    "global_batch_size": 32,
    "batch_size": 8,
    "max_steps": 30000,
    "epochs": None,
    "precision": "bf16",
    "seed": 42,
    # ... merged with results.json.
    "exact_match": 78.61,
    "f1": 86.04,
    "best_step": 27000,
    "steps": 30000,
    "mode": "prompt",
}


def split_card(text: str) -> tuple[dict[str, Any], str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, re.DOTALL)
    assert match, "card must start with YAML front matter"
    return yaml.safe_load(match.group(1)), match.group(2)


def table(body: str) -> dict[str, str]:
    """All two-column table rows of the card as {first cell: second cell}."""
    rows = {}
    for line in body.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 2 and cells[0] != "---":
            rows[cells[0]] = cells[1]
    return rows


def code_blocks(body: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", body, re.DOTALL)


def test_card_contents(tmp_path: Path) -> None:
    ckpt = tmp_path / "best"
    ckpt.mkdir()
    path = write_model_card(ckpt, INFO)
    assert path == ckpt / "README.md"
    front, body = split_card(path.read_text(encoding="utf-8"))
    assert front == {
        "library_name": "softprompt",
        "base_model": "google/t5-base-lm-adapt",
        "tags": ["prompt-tuning", "t5", "squad"],
    }
    rows = table(body)
    assert rows["train"] == "../shared/data/squad/train-v1.1.json"
    assert rows["validation"] == "../shared/data/squad/dev-v1.1.json"
    assert rows["Prompt length P"] == "100"
    assert rows["Prompt init"] == "sampled_vocab"
    assert rows["Optimizer"] == "adafactor"
    assert rows["Learning rate"] == "0.3"
    assert rows["Weight decay"] == "1e-05"
    assert rows["Batch size (global)"] == "32"
    assert rows["Batch size per device"] == "8"
    assert rows["Training steps"] == "30000"
    assert rows["Epochs"] == "—"
    assert rows["Precision"] == "bf16"
    assert rows["Seed"] == "42"
    assert rows["exact match"] == "78.61"
    assert rows["F1"] == "86.04"
    assert rows["best step"] == "27000"
    assert f"softprompt {softprompt.__version__}" in body
    assert "## How to load" in body


def test_how_to_load_is_runnable_text(tmp_path: Path) -> None:
    ckpt = tmp_path / "my prompt"  # a space, so the command line must quote it
    ckpt.mkdir()
    _, body = split_card(write_model_card(ckpt, INFO).read_text(encoding="utf-8"))
    (python,) = code_blocks(body, "python")
    tree = ast.parse(python)
    assert "from softprompt.io.checkpoint import load_prompt" in python
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call))
    assert call.func.id == "load_prompt" and ast.literal_eval(call.args[0]) == str(ckpt)
    (bash,) = code_blocks(body, "bash")
    argv = shlex.split(bash)
    assert argv[:2] == ["softprompt", "predict"]
    args = dict(zip(argv[2::2], argv[3::2], strict=True))
    assert args["--model"] == "google/t5-base-lm-adapt"
    assert args["--prompt"] == str(ckpt)
    assert args["--question"] and args["--context"]


def test_rewrite_replaces_atomically(tmp_path: Path) -> None:
    (tmp_path / "README.md").write_text("old card", encoding="utf-8")
    write_model_card(tmp_path, {**INFO, "f1": 91.25, "model_name_or_path": "google/t5-large-lm-adapt"})
    front, body = split_card((tmp_path / "README.md").read_text(encoding="utf-8"))
    assert front["base_model"] == "google/t5-large-lm-adapt"
    assert table(body)["F1"] == "91.25"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]


def test_optional_rows_and_missing_facts(tmp_path: Path) -> None:
    info = {
        "model_name_or_path": "/models/t5: xl",  # needs quoting in YAML
        "prompt_init": "text",
        "prompt_init_text": "question answering",
        "trainable_parameters": 204800,
        "batch_size": 32,
    }
    front, body = split_card(write_model_card(tmp_path, info).read_text(encoding="utf-8"))
    assert front["base_model"] == "/models/t5: xl"
    rows = table(body)
    assert rows["Trainable parameters"] == "204,800"
    assert rows["Prompt init text"] == "'question answering'"
    # Without a global size, batch_size is the global batch (nothing per device to report).
    assert rows["Batch size (global)"] == "32" and "Batch size per device" not in rows
    assert rows["exact match"] == "—" and rows["Optimizer"] == "—"


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="absent is not a checkpoint folder"):
        write_model_card(tmp_path / "absent", INFO)
    with pytest.raises(ValueError, match="base model"):
        write_model_card(tmp_path, {"f1": 1.0})
    assert not (tmp_path / "README.md").exists()


def test_fine_tuned_checkpoint_card(tmp_path: Path) -> None:
    info = {**INFO, "prompt_tuning": False, "mode": "finetune", "lr": 5e-5, "f1": 90.63}
    front, body = split_card(write_model_card(tmp_path, info).read_text(encoding="utf-8"))
    assert front["base_model"] == "google/t5-base-lm-adapt"
    rows = table(body)
    assert rows["Method"] == "full fine-tuning" and rows["Learning rate"] == "5e-05" and rows["F1"] == "90.63"
    assert "load_prompt" not in body and "from_pretrained" in body
    argv = shlex.split(code_blocks(body, "bash")[0])
    # The fine-tuned checkpoint is itself the model; there is no prompt to pass.
    assert argv[2:4] == ["--model", str(tmp_path)] and "--prompt" not in argv


def test_card_records_initial_step_text_format_and_t5_scores(tmp_path: Path) -> None:
    info = {**INFO, "initial_step": 1_100_000, "punctuation": "paper", "t5_exact_match": 80.5, "t5_f1": 87.25}
    _, body = split_card(write_model_card(tmp_path, info).read_text(encoding="utf-8"))
    rows = table(body)
    assert rows["Adafactor initial step"] == "1,100,000"
    assert rows["Input text"] == "paper"
    assert rows["exact match"] == "78.61" and rows["F1"] == "86.04"
    assert rows["exact match, T5's scoring"] == "80.50" and rows["F1, T5's scoring"] == "87.25"
    # Without them (AdamW, raw text): no initial-step row and no T5 rows.
    _, body = split_card(
        write_model_card(tmp_path, {**INFO, "punctuation": "none"}).read_text(encoding="utf-8")
    )
    rows = table(body)
    assert "Adafactor initial step" not in rows and "F1, T5's scoring" not in rows
    assert rows["Input text"] == "none"


def test_a_text_task_card_names_the_task_its_scores_and_a_fields_command(tmp_path):
    from softprompt.training.modelcard import render_model_card

    info = {
        "model_name_or_path": "google/t5-base-lm-adapt",
        "task": "rte",
        "task_description": "RTE (SuperGLUE): does the premise entail the hypothesis.",
        "input_template": "hypothesis: {hypothesis} premise: {premise}",
        "metric": "accuracy",
        "scores": {"accuracy": 71.5, "invalid_predictions": 2.0},
        "best_step": 3000,
    }
    card = render_model_card(tmp_path / "best", info)
    assert "tags: [prompt-tuning, t5, rte]" in card and "on `rte`" in card
    assert "| accuracy | 71.50 |" in card and "| invalid_predictions | 2 |" in card
    assert "| exact match |" not in card
    assert '--fields \'{"hypothesis": "...", "premise": "..."}\'' in card
