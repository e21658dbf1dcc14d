"""`softprompt inspect`: nearest vocabulary tokens and norms of prompt vectors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from softprompt.cli import main as cli_main
from softprompt.commands.inspect import inspect_report, load_input_embedding, main, nearest_token_ids
from softprompt.io.checkpoint import PromptConfig, save_prompt
from softprompt.modeling.model import load_t5
from softprompt.modeling.prompt import initial_prompt

SEED = 42
P = 5


pytestmark = pytest.mark.usefixtures("one_thread")


def nearest_tokens(prompt: torch.Tensor, embedding: torch.Tensor, tokenizer, k: int) -> list[list[tuple]]:
    """Per position, `inspect`'s (token, cosine) pairs, most similar first."""
    config = PromptConfig(base_model="m", n_tokens=prompt.shape[0], d_model=prompt.shape[1])
    report = inspect_report(prompt, config, embedding, tokenizer, k)
    return [[(n["token"], n["cosine"]) for n in pos["nearest"]] for pos in report["positions"]]


@pytest.fixture
def text_prompt(tiny_model_dir: Path, tokenizer, tmp_path: Path) -> dict:
    """A prompt initialised from "question answer" on the tiny random model, saved to disk."""
    embedding = load_input_embedding(tiny_model_dir, random_init=True, seed=SEED)
    weight = initial_prompt("text", P, embedding, text="question answer", tokenizer=tokenizer)
    config = PromptConfig(
        base_model=str(tiny_model_dir), n_tokens=P, d_model=tiny_config().d_model, init="text"
    )
    return {"dir": save_prompt(tmp_path / "prompt", weight, config), "weight": weight, "embedding": embedding}


def test_text_init_prompt_is_nearest_to_its_own_tokens(text_prompt: dict, tokenizer) -> None:
    table = nearest_tokens(text_prompt["weight"], text_prompt["embedding"], tokenizer, k=4)
    assert len(table) == P and all(len(row) == 4 for row in table)
    for position, row in enumerate(table):
        token, score = row[0]
        assert token == ("▁question", "▁answer")[position % 2]
        assert score == pytest.approx(1.0, abs=1e-5)
        scores = [s for _, s in row]
        assert scores == sorted(scores, reverse=True) and scores[1] < 0.999


def test_chunked_search_equals_brute_force() -> None:
    gen = torch.Generator().manual_seed(0)
    embedding = torch.randn(10_000, 16, generator=gen)  # spans several 4096-row chunks
    prompt = torch.randn(6, 16, generator=gen)
    scores, ids = nearest_token_ids(prompt, embedding, k=7)
    full = F.cosine_similarity(prompt[:, None, :], embedding[None, :, :], dim=-1)  # [6, 10000]
    top = full.topk(7, dim=1)
    torch.testing.assert_close(scores, top.values, atol=1e-5, rtol=0)
    assert torch.equal(ids, top.indices)
    with pytest.raises(Exception, match=r"16 wide .* 8 wide"):
        nearest_token_ids(prompt, torch.zeros(3, 8))


def test_padding_rows_of_the_table_are_never_returned(tokenizer) -> None:
    # T5's table has 28 rows past the tokenizer's last piece; a prompt sitting on one must not name it.
    embedding = torch.randn(32128, 8, generator=torch.Generator().manual_seed(1))
    prompt = embedding[[32127, 5]].clone()
    table = nearest_tokens(prompt, embedding, tokenizer, k=3)
    assert all(tok is not None for row in table for tok, _ in row)
    assert table[1][0] == (tokenizer.convert_ids_to_tokens(5), pytest.approx(1.0, abs=1e-5))
    assert table[0][0][1] < 0.999


def test_embedding_is_read_from_safetensors_alone(tmp_path: Path) -> None:
    from transformers import T5ForConditionalGeneration

    model = T5ForConditionalGeneration(tiny_config())
    model.save_pretrained(tmp_path / "m")
    expected = model.get_input_embeddings().weight.detach()
    assert torch.equal(load_input_embedding(tmp_path / "m"), expected)


def test_cli_prints_table_and_writes_json(
    text_prompt: dict, tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "inspect.json"
    argv = [str(text_prompt["dir"]), "--model", str(tiny_model_dir), "--random_init", "--seed", str(SEED)]
    assert main([*argv, "--top_k", "3", "--json", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["pos", "norm"])
    assert "top-3 (cosine)" in lines[header] and "top-4" not in lines[header]
    rows = lines[header + 1 :]
    assert len(rows) == P
    norms = text_prompt["weight"].norm(dim=-1)
    for position, line in enumerate(rows):
        cells = line.split()
        assert cells[0] == str(position)
        assert float(cells[1]) == pytest.approx(float(norms[position]), abs=1e-3)
        assert cells[2:4] == [("▁question", "▁answer")[position % 2], "(1.000)"]

    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["n_tokens"] == P and report["top_k"] == 3 and report["init"] == "text"
    assert [p["position"] for p in report["positions"]] == list(range(P))
    first = report["positions"][0]
    assert first["nearest"][0] == {"token": "▁question", "id": 822, "cosine": pytest.approx(1.0, abs=1e-5)}
    assert report["positions"][1]["nearest"][0]["id"] == 1525
    assert first["norm"] == pytest.approx(float(norms[0]), rel=1e-6)

    # Through the `softprompt` entry point too.
    assert cli_main(["inspect", *argv]) == 0
    assert "▁answer (1.000)" in capsys.readouterr().out


def test_cli_refuses_prompt_of_another_width(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = PromptConfig(base_model=str(tiny_model_dir), n_tokens=3, d_model=32)
    save_prompt(tmp_path / "narrow", torch.zeros(3, 32), config)
    argv = ["inspect", str(tmp_path / "narrow"), "--model", str(tiny_model_dir), "--random_init"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert "is 32 wide but" in err and "d_model is 64" in err


def test_random_init_embedding_matches_load_t5(tiny_model_dir: Path) -> None:
    model = load_t5(tiny_model_dir, random_init=True, seed=SEED)
    assert torch.equal(load_input_embedding(tiny_model_dir, random_init=True, seed=SEED), model.shared.weight)
