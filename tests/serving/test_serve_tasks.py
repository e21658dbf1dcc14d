"""serve with a QA prompt and a classification prompt: `fields` requests, mixed batches, offline equality."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch

from conftest import save_tiny_t5, tiny_config
from softprompt.commands.predict import predict_answers
from softprompt.inference.bank import load_model_and_prompts
from softprompt.io.checkpoint import PromptConfig, save_prompt
from softprompt.serving.server import create_app
from softprompt.tasks.text.spec import TaskSpec

pytestmark = pytest.mark.usefixtures("one_thread")

MAX_NEW = 6
SENTIMENT = {
    "name": "sentiment",
    "input_template": "sentiment review: {text} ({stars} stars)",
    "label_field": "label",
    "labels": ["negative", "positive"],
    "metric": "accuracy",
}
REVIEWS = ["a dull film", "wonderful acting", "the plot made no sense", "I laughed a lot", "too long"]


@pytest.fixture(scope="module")
def bank_and_expected(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("serve-tasks")
    model_dir = save_tiny_t5(root / "tiny-t5")
    gen = torch.Generator().manual_seed(3)
    d_model = tiny_config().d_model
    qa = PromptConfig(base_model=str(model_dir), n_tokens=4, d_model=d_model)
    cls = PromptConfig(base_model=str(model_dir), n_tokens=6, d_model=d_model, task=dict(SENTIMENT))
    dirs = {
        "squad": save_prompt(root / "squad", torch.randn(4, d_model, generator=gen), qa),
        "sentiment": save_prompt(root / "sentiment", torch.randn(6, d_model, generator=gen), cls),
    }
    bank = load_model_and_prompts(str(model_dir), [str(d) for d in dirs.values()], names=list(dirs))
    questions = [
        {
            "question": f"When did case {j} happen?",
            "context": f"Case {j} happened in {1850 + 3 * j}. " * (1 + j % 3),
        }
        for j in range(5)
    ]
    fields = [{"text": text, "stars": str(1 + j % 5)} for j, text in enumerate(REVIEWS)]
    spec = TaskSpec.from_dict(SENTIMENT)
    texts = [spec.input_texts(f)[0][1] for f in fields]
    return {
        "bank": bank,
        "questions": questions,
        "fields": fields,
        "qa_expected": predict_answers(bank, "squad", questions, max_new_tokens=MAX_NEW),
        "cls_expected": predict_answers(bank, "sentiment", fields, max_new_tokens=MAX_NEW),
        "texts": texts,
    }


def test_fields_fill_the_prompts_own_template(bank_and_expected: dict) -> None:
    assert bank_and_expected["texts"][1] == "sentiment review: wonderful acting (2 stars)"
    described = {t["name"]: t for t in bank_and_expected["bank"].describe()}
    assert described["sentiment"]["input_template"] == SENTIMENT["input_template"]
    assert described["sentiment"]["labels"] == ["negative", "positive"]
    assert described["squad"]["input_template"] is None and described["squad"]["labels"] is None


def test_mixed_qa_and_classification_requests_equal_offline_predictions(bank_and_expected: dict) -> None:
    from fastapi.testclient import TestClient

    b = bank_and_expected
    qa = [{"task": "squad", **q} for q in b["questions"]]
    cls = [{"task": "sentiment", "fields": f} for f in b["fields"]]
    mixed = [x for pair in zip(qa, cls, strict=True) for x in pair]
    expected = [x for pair in zip(b["qa_expected"], b["cls_expected"], strict=True) for x in pair]
    app = create_app(b["bank"], max_batch_size=16, max_wait_ms=200, max_new_tokens=MAX_NEW)
    with TestClient(app) as client:
        # One request mixing both tasks: one batch, answers in input order.
        r = client.post("/v1/answer", json={"inputs": mixed})
        assert r.status_code == 200, r.text
        assert r.json() == {"answers": expected}
        assert client.get("/health").json()["max_batch_seen"] == len(mixed)
        # Single requests of either shape, one at a time.
        assert client.post("/v1/answer", json=cls[2]).json() == {"answer": b["cls_expected"][2]}
        assert client.post("/v1/answer", json=qa[3]).json() == {"answer": b["qa_expected"][3]}
        tasks = {t["name"]: t for t in client.get("/v1/tasks").json()["tasks"]}
        assert tasks["sentiment"]["labels"] == ["negative", "positive"]
        bad = [
            ({"task": "sentiment", "question": "q", "context": "c"}, "reads its fields: send fields"),
            ({"task": "sentiment", "fields": {"text": "ok"}}, "fields: has no field 'stars'"),
            ({"task": "sentiment", "fields": {"text": ["a"], "stars": "1"}}, "field 'text' is a list"),
            ({"task": "squad", "fields": {"text": "ok"}}, "question: Field required"),
        ]
        for body, message in bad:
            r = client.post("/v1/answer", json=body)
            assert r.status_code == 422 and message in r.json()["error"], (body, r.text)
        r = client.post("/v1/answer", json={"inputs": [qa[0], {"task": "sentiment", "fields": {}}]})
        assert r.status_code == 422 and r.json()["error"].startswith("inputs[1].fields: has no field 'text'")


def test_concurrent_mixed_clients_are_batched_together(bank_and_expected: dict) -> None:
    """Separate concurrent requests of the two tasks share batches and each gets its own answer."""
    b = bank_and_expected
    app = create_app(b["bank"], max_batch_size=16, max_wait_ms=300, max_new_tokens=MAX_NEW)
    bodies = [{"task": "squad", **q} for q in b["questions"]] + [
        {"task": "sentiment", "fields": f} for f in b["fields"]
    ]
    expected = [*b["qa_expected"], *b["cls_expected"]]

    async def go() -> tuple[list[httpx.Response], dict]:
        transport = httpx.ASGITransport(app=app)
        client = httpx.AsyncClient(transport=transport, base_url="http://test")
        async with app.router.lifespan_context(app), client:
            responses = await asyncio.gather(*(client.post("/v1/answer", json=x) for x in bodies))
            health = (await client.get("/health")).json()
        return responses, health

    responses, health = asyncio.run(go())
    assert [r.json()["answer"] for r in responses] == expected
    assert health["requests_answered"] == len(bodies) and health["batches_run"] < len(bodies)


def test_prompt_config_round_trips_the_task(tmp_path: Path) -> None:
    from softprompt.io.checkpoint import load_prompt_config

    config = PromptConfig(base_model="m", n_tokens=2, d_model=4, task=dict(SENTIMENT))
    save_prompt(tmp_path / "p", torch.zeros(2, 4), config)
    assert TaskSpec.from_dict(load_prompt_config(tmp_path / "p").task) == TaskSpec.from_dict(SENTIMENT)


def test_bare_prompt_dirs_are_named_after_their_task_or_run(tmp_path: Path) -> None:
    """`serve --prompt runs/x/best --prompt runs/y/best`: no two prompts called `best`; each is named
    after the task it recorded, QA prompts (both `squad`) after their runs."""
    from softprompt.serving.server import parse_prompt_specs

    d_model = tiny_config().d_model
    weight = torch.zeros(2, d_model)
    qa = PromptConfig(base_model="m", n_tokens=2, d_model=d_model)
    cls = PromptConfig(base_model="m", n_tokens=2, d_model=d_model, task=dict(SENTIMENT))
    dirs = {
        "sent": save_prompt(tmp_path / "runs" / "sent_run" / "best", weight, cls),
        "qa1": save_prompt(tmp_path / "runs" / "qa_one" / "best", weight, qa),
        "qa2": save_prompt(tmp_path / "runs" / "qa_two" / "best", weight, qa),
    }
    names = [n for n, _ in parse_prompt_specs([str(d) for d in dirs.values()])]
    assert names == ["sent_run", "qa_one", "qa_two"]  # the QA prompts share "squad": runs for all
    assert [n for n, _ in parse_prompt_specs([str(dirs["sent"]), str(dirs["qa1"])])] == ["sentiment", "squad"]
    # A name given explicitly keeps its place; a bare prompt that would take it is named after its run.
    specs = parse_prompt_specs([f"sentiment={dirs['qa2']}", str(dirs["sent"])])
    assert specs == [("sentiment", str(dirs["qa2"])), ("sent_run", str(dirs["sent"]))]


def test_serve_classify_rank_answers_classifiers_with_their_likeliest_label(bank_and_expected: dict) -> None:
    """`serve --classify rank`: the classification prompt's rows get the label of highest log-likelihood
    (as `inference.rank` computes it for that prompt alone), the QA prompt's rows in the same batch are
    still generated, equal to their offline answers."""
    from fastapi.testclient import TestClient

    from softprompt.inference.rank import label_log_likelihoods

    b = bank_and_expected
    bank = b["bank"]
    labels = SENTIMENT["labels"]
    features, _ = bank.tokenize([("sentiment", f) for f in b["fields"]])
    scores = label_log_likelihoods(
        bank.model,
        bank.tokenizer,
        features,
        labels,
        row_prompts=bank.row_prompts(["sentiment"] * len(features)),
    )
    ranked = [labels[int(k)] for k in scores.argmax(dim=1)]
    qa = [{"task": "squad", **q} for q in b["questions"]]
    cls = [{"task": "sentiment", "fields": f} for f in b["fields"]]
    mixed = [x for pair in zip(qa, cls, strict=True) for x in pair]
    expected = [x for pair in zip(b["qa_expected"], ranked, strict=True) for x in pair]
    app = create_app(bank, max_batch_size=16, max_wait_ms=200, max_new_tokens=MAX_NEW, classify="rank")
    with TestClient(app) as client:
        r = client.post("/v1/answer", json={"inputs": mixed})
        assert r.status_code == 200, r.text
        assert r.json() == {"answers": expected}
    assert predict_answers(bank, "sentiment", b["fields"], classify="rank") == ranked
