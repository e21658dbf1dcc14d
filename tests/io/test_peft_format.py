"""Prompts move to and from PEFT (issue 16): `softprompt export --to peft` writes an adapter that PEFT
decodes to softprompt's answers, a prompt trained with PEFT evaluates in softprompt to PEFT's answers,
and adapters softprompt cannot represent are refused in one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import SQUAD_DEV, save_tiny_t5, squad_subset, tiny_config
from softprompt.cli import main
from softprompt.errors import CheckpointError
from softprompt.io.checkpoint import PromptConfig, load_prompt, save_prompt
from softprompt.io.peft_format import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SETTINGS, WEIGHT_KEY
from softprompt.tasks.squad.reader import load_squad_json, tokenize_examples

peft = pytest.importorskip("peft", reason="peft (the dev extra) is needed to check interchange with PEFT")

D_MODEL = tiny_config().d_model
MAX_NEW = 6
N_QUESTIONS = 6

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A saved tiny T5, a few real SQuAD dev questions, and their tokenized inputs."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("peft")
    model_dir = save_tiny_t5(root / "tiny-t5")
    dev = squad_subset(SQUAD_DEV, root / "dev.json", N_QUESTIONS)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    examples = load_squad_json(dev)
    features = tokenize_examples(examples, tokenizer, max_source_length=512, max_target_length=8)
    return {
        "model_dir": model_dir,
        "dev": dev,
        "tokenizer": tokenizer,
        "examples": examples,
        "features": features,
    }


def _base(setup: dict):
    from transformers import T5ForConditionalGeneration

    return T5ForConditionalGeneration.from_pretrained(str(setup["model_dir"])).eval()


def _peft_answers(model, setup: dict) -> dict[str, str]:
    """PEFT's greedy answers, one question at a time (no padding to reason about)."""
    answers = {}
    with torch.no_grad():
        for f in setup["features"]:
            ids = torch.tensor([f.input_ids])
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=MAX_NEW,
                do_sample=False,
                num_beams=1,
            )
            text = setup["tokenizer"].decode(out[0], skip_special_tokens=True).strip()
            answers[setup["examples"][f.example_index].id] = text
    return answers


def _softprompt_answers(setup: dict, prompt: Path, tmp_path: Path, capsys) -> dict[str, str]:
    """`softprompt eval --prompt PROMPT`'s predictions."""
    pred = tmp_path / "pred.json"
    argv = ["eval", "--model", str(setup["model_dir"]), "--prompt", str(prompt)]
    argv += ["--validation_file", str(setup["dev"]), "--max_new_tokens", str(MAX_NEW), "--output", str(pred)]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    return {k: v.strip() for k, v in json.loads(pred.read_text(encoding="utf-8")).items()}


def test_exported_prompt_decodes_in_peft_to_softprompt_answers(setup: dict, tmp_path: Path, capsys) -> None:
    from peft import PeftModel

    weight = torch.randn(5, D_MODEL, generator=torch.Generator().manual_seed(3))
    config = PromptConfig(
        base_model=str(setup["model_dir"]), n_tokens=5, d_model=D_MODEL, max_target_length=7
    )
    prompt_dir = save_prompt(tmp_path / "prompt", weight, config)
    out = tmp_path / "adapter"
    assert main(["export", str(prompt_dir), "--to", "peft", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted([ADAPTER_CONFIG, ADAPTER_WEIGHTS, SETTINGS])
    adapter = json.loads((out / ADAPTER_CONFIG).read_text())
    assert (adapter["peft_type"], adapter["task_type"]) == ("PROMPT_TUNING", "SEQ_2_SEQ_LM")
    assert (adapter["num_virtual_tokens"], adapter["token_dim"], adapter["num_transformer_submodules"]) == (
        5,
        D_MODEL,
        1,
    )
    # Exporting again needs --overwrite (never a silent replacement).
    assert main(["export", str(prompt_dir), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err

    model = PeftModel.from_pretrained(_base(setup), str(out)).eval()
    assert torch.equal(model.get_prompt_embedding_to_save("default"), weight)
    peft_answers = _peft_answers(model, setup)
    ours = _softprompt_answers(setup, prompt_dir, tmp_path, capsys)
    assert len(ours) == N_QUESTIONS and ours == peft_answers
    # The prompt matters to both: without it the same model answers differently.
    assert _peft_answers(_base(setup), setup) != peft_answers
    # The exported adapter reads back in softprompt as the same prompt with the same settings.
    back, back_config = load_prompt(out, expect_d_model=D_MODEL, expect_base_model=str(setup["model_dir"]))
    assert (
        torch.equal(back, weight) and back_config.max_target_length == 7 and back_config.init == config.init
    )
    # predict and inspect take the adapter where they take the prompt, with the same results.
    model_flag = ["--model", str(setup["model_dir"])]
    ask = ["predict", *model_flag, "--question", "Who wrote it?", "--context", "Ada wrote it in 1843."]
    seen = {}
    for name, directory in (("prompt", prompt_dir), ("adapter", out)):
        assert main([*ask, "--prompt", str(directory), "--max_new_tokens", str(MAX_NEW)]) == 0
        answer = capsys.readouterr().out
        assert main(["inspect", str(directory), *model_flag, "--output", str(tmp_path / f"{name}.json")]) == 0
        capsys.readouterr()
        seen[name] = (answer, json.loads((tmp_path / f"{name}.json").read_text())["positions"])
    assert seen["prompt"] == seen["adapter"] and seen["prompt"][0].strip() and len(seen["prompt"][1]) == 5


@pytest.mark.parametrize("submodules", [None, 1], ids=["peft_default", "encoder_only"])
def test_prompt_trained_with_peft_evaluates_in_softprompt_to_peft_answers(
    setup: dict, submodules: int | None, tmp_path: Path, capsys
) -> None:
    from peft import PromptTuningConfig, TaskType, get_peft_model

    torch.manual_seed(0)
    config = PromptTuningConfig(
        task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=4, num_transformer_submodules=submodules
    )
    model = get_peft_model(_base(setup), config)
    initial = model.get_prompt_embedding_to_save("default").clone()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.5)
    f = setup["features"][0]
    ids, labels = torch.tensor([f.input_ids]), torch.tensor([f.labels])
    model.train()
    for _ in range(2):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    trained = model.get_prompt_embedding_to_save("default")
    assert not torch.equal(trained[:4], initial[:4])  # the encoder prompt learned something
    out = tmp_path / "peft-adapter"
    model.save_pretrained(str(out))
    from safetensors.torch import load_file

    rows = load_file(str(out / ADAPTER_WEIGHTS))[WEIGHT_KEY].shape[0]
    assert rows == 4 * (submodules or 2)  # PEFT's seq2seq default keeps a second block that it never uses
    ours = _softprompt_answers(setup, out, tmp_path, capsys)
    assert ours == _peft_answers(model, setup)
    weight, prompt_config = load_prompt(out)
    assert torch.equal(weight, trained[:4]) and prompt_config.base_model == str(setup["model_dir"])


def _adapter(tmp_path: Path, name: str, **config) -> Path:
    d = tmp_path / name
    d.mkdir()
    fields = {"peft_type": "PROMPT_TUNING", "task_type": "SEQ_2_SEQ_LM", "base_model_name_or_path": "m"}
    fields |= {"num_virtual_tokens": 3, "token_dim": D_MODEL, "num_transformer_submodules": 1, **config}
    (d / ADAPTER_CONFIG).write_text(json.dumps(fields))
    from safetensors.torch import save_file

    rows = fields["num_virtual_tokens"] * (fields["num_transformer_submodules"] or 2)
    save_file({WEIGHT_KEY: torch.zeros(rows, D_MODEL)}, str(d / ADAPTER_WEIGHTS))
    return d


def test_adapters_softprompt_cannot_represent_are_refused(setup: dict, tmp_path: Path, capsys) -> None:
    from peft import LoraConfig, PrefixTuningConfig, TaskType, get_peft_model

    lora = tmp_path / "lora"
    get_peft_model(
        _base(setup), LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, r=2, target_modules=["q", "v"])
    ).save_pretrained(str(lora))
    # Prefix tuning puts vectors into the decoder's attention as well: no encoder prompt represents it.
    prefix = tmp_path / "prefix"
    get_peft_model(
        _base(setup), PrefixTuningConfig(task_type=TaskType.SEQ_2_SEQ_LM, num_virtual_tokens=3)
    ).save_pretrained(str(prefix))
    cases = {
        lora: "it is a LORA adapter",
        prefix: "it is a PREFIX_TUNING adapter (prefix tuning puts key/value prefixes into every layer, encoder and decoder)",
        _adapter(
            tmp_path, "mtpt", peft_type="MULTITASK_PROMPT_TUNING"
        ): "multitask prompt tuning also prompts the decoder",
        _adapter(tmp_path, "causal", task_type="CAUSAL_LM"): "its task_type is CAUSAL_LM",
        _adapter(tmp_path, "extra", modules_to_save=["lm_head"]): "it also trains modules_to_save",
        _adapter(
            tmp_path, "three", num_transformer_submodules=3
        ): "num_transformer_submodules must be 1 or 2",
    }
    for directory, message in cases.items():
        with pytest.raises(
            CheckpointError, match=r"softprompt reads only PEFT prompt-tuning adapters|must be 1 or 2"
        ) as e:
            load_prompt(directory)
        assert message in str(e.value), str(e.value)
    # Through the command line: one line, non-zero exit, no traceback.
    argv = [
        "eval",
        "--model",
        str(setup["model_dir"]),
        "--prompt",
        str(lora),
        "--validation_file",
        str(setup["dev"]),
    ]
    assert main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "it is a LORA adapter" in err and "Traceback" not in err
    # An adapter for another base model is refused like any prompt for another model.
    other = _adapter(tmp_path, "other", base_model_name_or_path="google/t5-v1_1-xxl")
    with pytest.raises(CheckpointError, match="was trained for google/t5-v1_1-xxl"):
        load_prompt(other, expect_base_model=str(setup["model_dir"]))
    # A pickled adapter is never unpickled, and an adapter passed as the model says what to pass instead.
    pickled = _adapter(tmp_path, "pickled")
    (pickled / ADAPTER_WEIGHTS).rename(pickled / "adapter_model.bin")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_prompt(pickled)
    assert main(["eval", "--model", str(pickled), "--validation_file", str(setup["dev"])]) != 0
    assert "is a PEFT adapter, not a model" in capsys.readouterr().err
