"""Hostile prompt checkpoints (issue 28 items 6 and 7): every field and the tensor checked, one line each.

Each case is a file an attacker (or a bad disk) could hand to `--prompt`: a field of the wrong type or
out of range, deep nesting, a 5,000-digit integer, in softprompt's own `prompt_config.json` and in a
PEFT adapter's two JSON files; a tensor of another shape than its config, NaN/inf, integers.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from softprompt.cli import main
from softprompt.errors import CheckpointError
from softprompt.io.checkpoint import PromptConfig, load_prompt, save_prompt
from softprompt.io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SETTINGS, WEIGHT_KEY

HUGE = "9" * 5000
DEEP = "[" * 100_000 + "]" * 100_000

# (field, raw JSON text of its value, what the one line says)
BAD_FIELDS = [
    ("extra", "[]", "extra must be a JSON object, got list"),
    ("max_source_length", '"abc"', "max_source_length must be an integer from 1 to 1,048,576, got 'abc'"),
    ("max_source_length", "0", "max_source_length must be an integer from 1 to 1,048,576, got 0"),
    ("max_source_length", "-5", "max_source_length must be an integer from 1 to 1,048,576, got -5"),
    ("max_target_length", "true", "max_target_length must be an integer from 1 to 1,048,576, got True"),
    ("punctuation", '"evil"', "punctuation must be one of paper, current, none, got 'evil'"),
    ("task", '"squad"', "task must be a JSON object (a text task's fields) or null, got str"),
    ("task", "[1, 2]", "task must be a JSON object (a text task's fields) or null, got list"),
    ("input_template", "7", "input_template must be a non-empty string, got int"),
    ("extra", DEEP, "(it nests too deeply)"),
    ("max_source_length", HUGE, "(an integer is too long)"),
    ("n_tokens", "1" + "0" * 30, "n_tokens must be an integer from 1 to 1,048,576, got a huge integer"),
]
# An adapter's n_tokens and d_model come from adapter_config.json (test_a_bad_adapter_config_is_one_line).
PEFT_SETTINGS = [case for case in BAD_FIELDS if case[0] != "n_tokens"]


def _prompt(tmp_path: Path, name: str = "p", rows: int = 4) -> Path:
    return save_prompt(
        tmp_path / name,
        torch.randn(rows, 8),
        PromptConfig(base_model="m", n_tokens=rows, d_model=8, max_source_length=64),
    )


def _with_field(path: Path, name: str, raw_value: str) -> None:
    """Rewrite a JSON object file with one field's raw text replaced (raw: deep nesting, huge integers)."""
    data = json.loads(path.read_text())
    data[name] = "@@"
    path.write_text(json.dumps(data).replace('"@@"', raw_value))


def _one_line(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("name", "raw", "message"), BAD_FIELDS, ids=[f"{f}={r[:8]}" for f, r, _ in BAD_FIELDS]
)
def test_every_bad_field_of_a_prompt_config_is_one_line(tmp_path, capsys, name, raw, message) -> None:
    prompt = _prompt(tmp_path)
    _with_field(prompt / "prompt_config.json", name, raw)
    with pytest.raises(CheckpointError) as e:
        load_prompt(prompt)
    assert str(e.value).startswith(str(prompt / "prompt_config.json")) and message in str(e.value)
    err = _one_line(capsys, ["export", str(prompt), str(tmp_path / "out")])
    assert message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "raw", "message"), PEFT_SETTINGS, ids=[f"{f}={r[:8]}" for f, r, _ in PEFT_SETTINGS]
)
def test_every_bad_field_of_a_peft_adapters_settings_is_one_line(tmp_path, name, raw, message) -> None:
    prompt = _prompt(tmp_path)
    assert main(["export", str(prompt), str(tmp_path / "peft")]) == 0
    _with_field(tmp_path / "peft" / SETTINGS, name, raw)
    with pytest.raises(CheckpointError) as e:
        load_prompt(tmp_path / "peft")
    assert str(e.value).startswith(str(tmp_path / "peft" / SETTINGS)) and message in str(e.value)


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("num_virtual_tokens", HUGE, "(an integer is too long)"),
        ("num_virtual_tokens", "1" + "0" * 30, "n_tokens must be an integer from 1 to 1,048,576"),
        ("token_dim", "1" + "0" * 30, "d_model must be an integer from 1 to 1,048,576, got a huge integer"),
        ("base_model_name_or_path", DEEP, "(it nests too deeply)"),
    ],
)
def test_a_bad_adapter_config_is_one_line(tmp_path, name, raw, message) -> None:
    prompt = _prompt(tmp_path)
    assert main(["export", str(prompt), str(tmp_path / "peft")]) == 0
    (tmp_path / "peft" / SETTINGS).unlink()
    _with_field(tmp_path / "peft" / ADAPTER_CONFIG, name, raw)
    with pytest.raises(CheckpointError) as e:
        load_prompt(tmp_path / "peft")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_the_tensor_must_match_its_config_be_finite_and_floating(tmp_path, capsys) -> None:
    prompt = _prompt(tmp_path)
    weights = prompt / "prompt.safetensors"
    cases = {
        # n_tokens 4 next to a 4,096-row table: refused from the header, before the table is read.
        "rows": (
            {"prompt": torch.zeros(4096, 8)},
            "must hold one tensor 'prompt' of shape (4, 8) as its config says",
        ),
        "nan": ({"prompt": torch.full((4, 8), float("nan"))}, "32 values of 'prompt' are NaN or infinite"),
        "inf": ({"prompt": torch.tensor([[float("inf")] + [0.0] * 7] * 4)}, "4 values of 'prompt' are NaN"),
        "int": (
            {"prompt": torch.ones(4, 8, dtype=torch.int64)},
            "the tensor 'prompt' is I64, not floating point",
        ),
        "two": (
            {"prompt": torch.zeros(4, 8), "x": torch.zeros(1)},
            "found 'prompt' (4, 8) F32, 'x' (1,) F32",
        ),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, str(weights))
        with pytest.raises(CheckpointError) as e:
            load_prompt(prompt)
        assert str(e.value).startswith(str(weights)) and message in str(e.value), (name, str(e.value))
        # export refuses it too: no NaN adapter is ever written.
        assert message in _one_line(capsys, ["export", str(prompt), str(tmp_path / f"out-{name}")])
        assert not (tmp_path / f"out-{name}").exists()


def test_a_peft_tensor_is_checked_the_same_way(tmp_path) -> None:
    prompt = _prompt(tmp_path)
    assert main(["export", str(prompt), str(tmp_path / "peft")]) == 0
    weights = tmp_path / "peft" / ADAPTER_WEIGHTS
    save_file({WEIGHT_KEY: torch.full((4, 8), float("nan"))}, str(weights))
    with pytest.raises(CheckpointError, match="32 values of 'prompt_embeddings' are NaN or infinite"):
        load_prompt(tmp_path / "peft")
    save_file({WEIGHT_KEY: torch.zeros(4096, 8)}, str(weights))
    with pytest.raises(CheckpointError, match=r"must hold one tensor 'prompt_embeddings' of shape \(4, 8\)"):
        load_prompt(tmp_path / "peft")


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_overwrite_never_replaces_a_directory_holding_the_input(tmp_path, capsys) -> None:
    run = tmp_path / "runs" / "x"
    prompt = _prompt(run, "best")
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _tree(tmp_path)
    for out in (run, tmp_path / "runs", prompt, prompt / "peft"):
        err = _one_line(capsys, ["export", str(prompt), str(out), "--overwrite"])
        assert str(out) in err and str(prompt) in err and "OUTPUT_DIR" in err
        assert _tree(tmp_path) == before
    # convert: OUT_DIR a parent of the model's folder (the model would be deleted), or inside it.
    model = tmp_path / "parent" / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    for out in (tmp_path / "parent", model / "copy"):
        err = _one_line(capsys, ["convert", str(model), str(out), "--overwrite"])
        assert "OUT_DIR" in err and str(model) in err
    assert (model / "config.json").read_text() == "{}"
    assert not (model / "copy").exists()


def test_export_overwrite_onto_a_file_leaves_no_old_copy(tmp_path) -> None:
    prompt = _prompt(tmp_path)
    target = tmp_path / "adapter"
    target.write_text("a file in the way")
    assert main(["export", str(prompt), str(target), "--overwrite"]) == 0
    assert target.is_dir() and (target / ADAPTER_WEIGHTS).is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "p"]


def test_convert_with_broken_safetensors_beside_a_good_bin_is_one_line(tmp_path, capsys) -> None:
    from transformers import T5ForConditionalGeneration

    from conftest import tiny_config

    model = tmp_path / "m"
    T5ForConditionalGeneration(tiny_config()).save_pretrained(model, safe_serialization=False)
    (model / "model.safetensors").write_bytes(b"garbage" * 10)
    capsys.readouterr()  # save_pretrained's progress bar
    err = _one_line(capsys, ["convert", str(model), str(tmp_path / "out")])
    assert (
        f"could not load a T5 model from {model}: its safetensors weights (model.safetensors) are damaged"
        in err
    )
    assert "delete them to use a pytorch_model.bin beside them" in err
    assert not (tmp_path / "out").exists()
