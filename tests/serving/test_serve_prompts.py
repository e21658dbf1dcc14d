"""Prompts loaded and unloaded while `serve` runs (`POST/DELETE /v1/prompts`), and `GET /metrics`."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from conftest import save_tiny_t5, tiny_config
from softprompt.commands.flags import ServeArgs, serve_checks
from softprompt.inference.bank import load_model_and_prompts
from softprompt.io.checkpoint import PromptConfig, save_prompt
from softprompt.serving.prompts import PromptStore
from softprompt.serving.server import create_app

MAX_NEW = 5
PROMPTS = {"alpha": 4, "beta": 6, "gamma": 3, "delta": 5}  # name -> prompt length

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(names: list[str], n: int) -> list[dict[str, str]]:
    rows = []
    for j in range(n):
        context = f"In {1900 + 3 * j}, ship {j} reached the harbour. " + "The sea was calm. " * (j % 4)
        rows.append(
            {"task": names[j % len(names)], "question": f"When did ship {j} arrive?", "context": context}
        )
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny T5, four prompts under a prompt root, one prompt outside it, and the answers of a server
    started with all of them (`--prompt` at start)."""
    base = tmp_path_factory.mktemp("prompts")
    model_dir = save_tiny_t5(base / "tiny-t5")
    root, outside = base / "root", base / "outside"
    gen = torch.Generator().manual_seed(3)
    dirs = {}
    for name, p in PROMPTS.items():
        config = PromptConfig(base_model=str(model_dir), n_tokens=p, d_model=tiny_config().d_model)
        where = outside if name == "delta" else root
        dirs[name] = save_prompt(where / name, torch.randn(p, config.d_model, generator=gen), config)
    started = load_model_and_prompts(str(model_dir), [str(d) for d in dirs.values()], names=list(dirs))
    rows = _rows(["alpha", "beta", "gamma"], 18)
    with TestClient(create_app(started, max_new_tokens=MAX_NEW)) as client:
        expected = [client.post("/v1/answer", json=r).json()["answer"] for r in rows]
    assert len(set(expected)) > 9, "the tiny model should give input-specific answers"
    return {"model_dir": model_dir, "root": root, "outside": outside, "dirs": dirs, "rows": rows,
            "expected": expected}  # fmt: skip


def _dynamic(world: dict, **store: object) -> tuple:
    """A server started with no prompt, loading from the root."""
    bank = load_model_and_prompts(str(world["model_dir"]))
    prompts = PromptStore(bank, root=world["root"], **store)
    return bank, prompts, create_app(bank, store=prompts, max_new_tokens=MAX_NEW)


def _answers(client: TestClient, rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        response = client.post("/v1/answer", json=r)
        assert response.status_code == 200, response.text
        out.append(response.json()["answer"])
    return out


def test_load_answer_unload_reload_match_a_server_started_with_them(world: dict) -> None:
    bank, _, app = _dynamic(world)
    rows, expected = world["rows"], world["expected"]
    with TestClient(app) as client:
        assert client.get("/v1/tasks").json() == {"tasks": []}
        for name in ("alpha", "beta", "gamma"):
            r = client.post("/v1/prompts", json={"name": name, "path": name})
            assert r.status_code == 201, r.text
            assert r.json()["name"] == name and r.json()["n_tokens"] == PROMPTS[name]
        tasks = client.get("/v1/tasks").json()["tasks"]
        assert [t["name"] for t in tasks] == ["alpha", "beta", "gamma"]
        assert all(t["resident"] for t in tasks)
        assert _answers(client, rows) == expected
        slots = {n: bank.index(n) for n in ("alpha", "beta", "gamma")}

        assert client.delete("/v1/prompts/beta").json() == {"unloaded": "beta"}
        assert [t["name"] for t in client.get("/v1/tasks").json()["tasks"]] == ["alpha", "gamma"]
        gone = client.post("/v1/answer", json=rows[1])
        assert gone.status_code == 422 and "unknown task 'beta'" in gone.json()["error"]
        # The others keep their indices: rows holding them never see another prompt.
        assert bank.index("alpha") == slots["alpha"] and bank.index("gamma") == slots["gamma"]
        assert client.get("/health").json()["n_tasks"] == 2

        # Loaded again, into the slot it left (the table does not grow), answering as before.
        assert client.post("/v1/prompts", json={"name": "beta", "path": "./beta/"}).status_code == 201
        assert bank.index("beta") == slots["beta"] and len(bank._entries) == 3
        assert _answers(client, rows) == expected


def test_lru_eviction_under_concurrent_load_answers_equal_and_stays_bounded(world: dict) -> None:
    bank, store, app = _dynamic(world, max_resident=2)
    rows, expected = world["rows"], world["expected"]

    async def scenario() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            for name in ("alpha", "beta", "gamma"):
                assert (
                    await client.post("/v1/prompts", json={"name": name, "path": name})
                ).status_code == 201
            # alpha, the least recently used, made room for gamma.
            assert store.resident == ["beta", "gamma"] and store.evictions == 1
            tasks = (await client.get("/v1/tasks")).json()["tasks"]
            assert {t["name"]: t["resident"] for t in tasks} == {"alpha": False, "beta": True, "gamma": True}
            answered = await asyncio.gather(*(client.post("/v1/answer", json=r) for r in rows))
            # Sequential rounds over the three prompts make every request a reload of an evicted one.
            for r in rows[:6]:
                answered.append(await client.post("/v1/answer", json=r))
            await app.state.batcher.stop()
            return answered

    answered = asyncio.run(scenario())
    assert [r.status_code for r in answered] == [200] * 24
    assert [r.json()["answer"] for r in answered] == expected + expected[:6]
    assert len(store.resident) == 2 and len(bank) == 2
    assert store.loads >= 3 + 4 and store.evictions == store.loads - 2
    # Slots are reused: however many loads, the bank never held more than the three prompts at once.
    assert len(bank._entries) <= 3


def test_a_prompt_in_use_is_never_freed_and_loading_does_not_wait_for_the_model(world: dict) -> None:
    """While a request for alpha is on the (blocked) model: alpha is unloaded and beta loaded with
    room for one prompt; the request is still answered with alpha, whose slot is freed only then."""
    bank = load_model_and_prompts(str(world["model_dir"]))
    store = PromptStore(bank, root=world["root"], max_resident=1)
    entered, gate = threading.Event(), threading.Event()

    def gated(batch: list) -> list[str]:
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        return bank.answer(batch, max_new_tokens=MAX_NEW)

    app = create_app(bank, store=store, answer=gated, max_wait_ms=0)
    rows, expected = world["rows"], world["expected"]

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            assert (
                await client.post("/v1/prompts", json={"name": "alpha", "path": "alpha"})
            ).status_code == 201
            slot = bank.index("alpha")
            first = asyncio.ensure_future(client.post("/v1/answer", json=rows[0]))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            # In use: not evicted to make room for beta (the bound waits for it), not freed by DELETE.
            assert (
                await client.post("/v1/prompts", json={"name": "beta", "path": "beta"})
            ).status_code == 201
            assert store.resident == ["alpha", "beta"] and store.evictions == 0
            assert (await client.delete("/v1/prompts/alpha")).status_code == 200
            refused = await client.post("/v1/answer", json=rows[3])  # alpha, asked for after DELETE
            assert refused.status_code == 422 and "unknown task 'alpha'" in refused.json()["error"]
            assert bank.entry(slot).name == "alpha" and not first.done()
            assert [t["name"] for t in (await client.get("/v1/tasks")).json()["tasks"]] == ["beta"]
            gate.set()
            answer = await first
            assert answer.status_code == 200 and answer.json()["answer"] == expected[0]
            # Answered: alpha's slot is free now, and the bound holds again.
            assert "alpha" not in bank and store.resident == ["beta"] and bank._free == [slot]
            ok = await client.post("/v1/answer", json=rows[1])
            assert ok.status_code == 200 and ok.json()["answer"] == expected[1]
        await app.state.batcher.stop()

    asyncio.run(scenario())


def _refused(client: TestClient, body: dict, status: int, words: str) -> None:
    r = client.post("/v1/prompts", json=body)
    assert r.status_code == status, r.text
    assert set(r.json()) == {"error"} and words in r.json()["error"] and "\n" not in r.json()["error"]


def test_refusals_outside_root_symlinks_pickles_and_names(world: dict, monkeypatch, tmp_path) -> None:
    root: Path = world["root"]
    (root / "escape").unlink(missing_ok=True)
    os.symlink(world["outside"] / "delta", root / "escape")  # a directory leading out
    sneaky = root / "sneaky"
    sneaky.mkdir(exist_ok=True)
    for item in (world["outside"] / "delta").iterdir():  # files leading out, in a directory inside
        if not (sneaky / item.name).exists():
            os.symlink(item, sneaky / item.name)
    pickled = root / "pickled"
    pickled.mkdir(exist_ok=True)
    (pickled / "prompt_config.json").write_text((world["dirs"]["alpha"] / "prompt_config.json").read_text())
    torch.save(torch.zeros(4, tiny_config().d_model), pickled / "prompt.bin")

    def no_unpickling(*args: object, **kwargs: object) -> None:
        raise AssertionError("a pickle was read")

    monkeypatch.setattr(torch, "load", no_unpickling)
    bank, store, app = _dynamic(world)
    with TestClient(app) as client:
        _refused(client, {"name": "d", "path": "../outside/delta"}, 403, "outside --prompt_root")
        _refused(client, {"name": "d", "path": str(world["outside"] / "delta")}, 403, "outside --prompt_root")
        _refused(client, {"name": "d", "path": "escape"}, 403, "symlink")
        _refused(client, {"name": "d", "path": "sneaky"}, 403, "symlink")
        _refused(client, {"name": "p", "path": "pickled"}, 422, "pickle")
        _refused(client, {"name": "p", "path": "pickled/prompt.bin"}, 422, "pickle")
        _refused(client, {"name": "p", "path": "nothing-here"}, 422, "no directory")
        _refused(client, {"name": "a b", "path": "alpha"}, 422, "letters, digits")
        assert client.post("/v1/prompts", json={"name": "alpha", "path": "alpha"}).status_code == 201
        _refused(client, {"name": "alpha", "path": "beta"}, 409, "is loaded")
        gone = client.delete("/v1/prompts/nobody")
        assert gone.status_code == 404 and "no prompt named 'nobody'" in gone.json()["error"]
        unknown = client.post("/v1/answer", json={**world["rows"][0], "task": "nobody"})
        assert unknown.status_code == 422 and "unknown task 'nobody'" in unknown.json()["error"]
        # Nothing refused was loaded.
        assert bank.names == ["alpha"] and store.loads == 1


def test_without_prompt_root_the_endpoints_answer_404(world: dict) -> None:
    bank = load_model_and_prompts(str(world["model_dir"]), [str(world["dirs"]["alpha"])], names=["alpha"])
    with TestClient(create_app(bank, max_new_tokens=MAX_NEW)) as client:
        for r in (
            client.post("/v1/prompts", json={"name": "beta", "path": str(world["dirs"]["beta"])}),
            client.delete("/v1/prompts/alpha"),
        ):
            assert r.status_code == 404 and "--prompt_root" in r.json()["error"], r.text
        assert bank.names == ["alpha"]
        assert client.post("/v1/answer", json=world["rows"][0]).json()["answer"] == world["expected"][0]
    assert serve_checks(ServeArgs(model="m", prompt_root=str(world["root"] / "none"))) == [
        f"--prompt_root {world['root'] / 'none'} is not a directory; create it or name another"
    ]


def _metrics(client: TestClient) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{label=value,...}`."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return out


def test_metrics_parse_and_count_the_requests_sent(world: dict) -> None:
    bank, store, app = _dynamic(world)
    rows, expected = world["rows"], world["expected"]
    with TestClient(app) as client:
        for name in ("alpha", "beta", "gamma"):
            client.post("/v1/prompts", json={"name": name, "path": name})
        assert _answers(client, rows[:7]) == expected[:7]
        batch = client.post("/v1/answer", json={"inputs": rows[7:12]})
        assert batch.json() == {"answers": expected[7:12]}
        for _ in range(3):
            assert client.post("/v1/answer", json={**rows[0], "task": "nobody"}).status_code == 422
        assert client.post("/v1/answer", json={"inputs": [rows[0]] * 257}).status_code == 413
        m = _metrics(client)
    assert m["softprompt_answer_requests_total{status=200}"] == 8
    assert m["softprompt_answer_requests_total{status=422}"] == 3
    assert m["softprompt_answer_requests_total{status=413}"] == 1
    assert m["softprompt_rejections_total{reason=invalid}"] == 3
    assert m["softprompt_rejections_total{reason=too_large}"] == 1
    assert m["softprompt_request_seconds_count{}"] == 8 and m["softprompt_request_seconds_sum{}"] > 0
    assert m["softprompt_queue_wait_seconds_count{}"] == 8
    assert m["softprompt_time_to_first_answer_seconds_count{}"] == 8
    # Rows answered: 7 single requests and one of 5 inputs, each batch one model call here.
    assert m["softprompt_batch_size_rows_sum{}"] == 12 and m["softprompt_batch_size_rows_count{}"] == 8
    assert m["softprompt_batch_size_rows_bucket{le=4.0}"] == 7
    assert m["softprompt_prompts_resident{}"] == 3
    assert m["softprompt_queue_depth{}"] == 0 and m["softprompt_running_rows{}"] == 0
    # A second app in the same process counts apart (a registry of its own).
    other = create_app(bank, store=store, max_new_tokens=MAX_NEW)
    with TestClient(other) as client:
        assert "softprompt_answer_requests_total{status=200}" not in _metrics(client)


def test_metrics_count_queue_full_rejections(world: dict) -> None:
    bank = load_model_and_prompts(str(world["model_dir"]), [str(world["dirs"]["alpha"])], names=["alpha"])
    entered, gate = threading.Event(), threading.Event()

    def gated(batch: list) -> list[str]:
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        return bank.answer(batch, max_new_tokens=MAX_NEW)

    app = create_app(bank, answer=gated, max_batch_size=1, max_wait_ms=0, max_queue=1)
    row = world["rows"][0]

    async def scenario() -> tuple[str, str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            first = asyncio.ensure_future(client.post("/v1/answer", json=row))
            while not entered.is_set():
                await asyncio.sleep(0.01)
            queued = asyncio.ensure_future(client.post("/v1/answer", json=row))
            while app.state.batcher.queue_depth < 1:
                await asyncio.sleep(0.01)
            for _ in range(4):
                assert (await client.post("/v1/answer", json=row)).status_code == 503
            during = (await client.get("/metrics")).text
            gate.set()
            assert [r.status_code for r in await asyncio.gather(first, queued)] == [200, 200]
            text = (await client.get("/metrics")).text
        await app.state.batcher.stop()
        return during, text

    during, text = asyncio.run(scenario())
    families = {f.name: f for f in text_string_to_metric_families(during)}
    assert families["softprompt_queue_depth"].samples[0].value == 1
    assert families["softprompt_running_rows"].samples[0].value == 1
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}  # fmt: skip
    assert samples[("softprompt_answer_requests_total", (("status", "503"),))] == 4
    assert samples[("softprompt_answer_requests_total", (("status", "200"),))] == 2
    assert samples[("softprompt_rejections_total", (("reason", "queue_full"),))] == 4
    assert samples[("softprompt_running_rows", ())] == 0
