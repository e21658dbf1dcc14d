"""`softprompt serve`: a real server answers concurrent mixed-task requests exactly like `predict`."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from conftest import cpu_env, save_tiny_t5, tiny_config
from softprompt.commands.predict import predict_answers
from softprompt.errors import UserError
from softprompt.inference.bank import load_model_and_prompts
from softprompt.io.checkpoint import PromptConfig, save_prompt
from softprompt.serving.batching import MicroBatcher
from softprompt.serving.server import create_app, parse_prompt_specs

MAX_NEW = 6
TASKS = {"squad": 5, "trivia": 5, "news": 8}  # name -> prompt length
SUBJECTS = ["Ada", "the river", "a green door", "the treaty", "twelve ships", "the committee", "Oslo"]
VERBS = ["was mentioned", "changed", "appeared", "was discussed", "was seen"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int) -> list[dict[str, str]]:
    """n requests spread over the three tasks, with questions and contexts of many lengths."""
    names = list(TASKS)
    rows = []
    for j in range(n):
        subject, verb = SUBJECTS[j % len(SUBJECTS)], VERBS[j % len(VERBS)]
        context = f"In {1800 + 7 * j}, {subject} {verb} in the records. " + "It rained that day. " * (j % 6)
        rows.append(
            {"task": names[j % 3], "question": f"When {verb} {subject}, case {j}?", "context": context}
        )
    return rows


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> dict:
    """A saved tiny T5 whose answers depend on the input, three prompts for it, and `predict`'s answers."""
    root = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny_t5(root / "tiny-t5")
    gen = torch.Generator().manual_seed(7)
    dirs = {}
    for name, p in TASKS.items():
        config = PromptConfig(
            base_model=str(model_dir),
            n_tokens=p,
            d_model=tiny_config().d_model,
            punctuation="paper" if name == "trivia" else "none",
            max_source_length=32 if name == "news" else 512,
            extra={"dev_f1": 81.5, "dev_exact_match": 70.25, "step": 300} if name == "squad" else {},
        )
        dirs[name] = save_prompt(root / name, torch.randn(p, config.d_model, generator=gen), config)
    loaded = load_model_and_prompts(str(model_dir), [str(d) for d in dirs.values()], names=list(dirs))
    rows = _rows(50)
    expected: list[str | None] = [None] * len(rows)
    for name in TASKS:
        mine = [i for i, r in enumerate(rows) if r["task"] == name]
        answers = predict_answers(loaded, name, [rows[i] for i in mine], max_new_tokens=MAX_NEW)
        for i, a in zip(mine, answers, strict=True):
            expected[i] = a
    assert len(set(expected)) > 25, "the tiny model should give input-specific answers"
    return {"model_dir": model_dir, "dirs": dirs, "loaded": loaded, "rows": rows, "expected": expected}


def _start_server(served: dict, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "softprompt", "serve", "--model", str(served["model_dir"])]
    for name, directory in served["dirs"].items():
        cmd += ["--prompt", f"{name}={directory}"]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--max_batch_size", "16", "--max_wait_ms", "30"]
    cmd += ["--max_context_chars", "2000", "--max_new_tokens", str(MAX_NEW), "--log_level", "warning"]
    env = cpu_env()
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", log.read_text(errors="replace"))
        if found:
            base = found.group(1)
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            raise AssertionError(
                f"the server exited with {proc.returncode}:\n{log.read_text(errors='replace')}"
            )
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"the server did not come up in 120 s:\n{log.read_text(errors='replace')}")


async def _post_all(base: str, bodies: list[dict]) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=base, timeout=httpx.Timeout(60.0)) as client:
        return await asyncio.gather(*(client.post("/v1/answer", json=b) for b in bodies))


def test_real_server_concurrent_mixed_tasks_match_predict(served: dict, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    proc, base = _start_server(served, log)
    try:
        rows, expected = served["rows"], served["expected"]
        responses = asyncio.run(_post_all(base, rows))
        assert [r.status_code for r in responses] == [200] * len(rows)
        assert [r.json()["answer"] for r in responses] == expected

        health = httpx.get(f"{base}/health", timeout=10).json()
        assert health["status"] == "ok" and health["n_tasks"] == 3
        assert health["requests_answered"] == health["rows_answered"] == 50
        # Concurrent requests for different tasks were merged into shared batches.
        assert health["max_batch_seen"] > 1 and health["batches_run"] < 50
        assert health["max_batch_seen"] <= 16

        # One request holding several tasks: answers come back in input order.
        picked = [7, 0, 20, 13]
        batch = httpx.post(f"{base}/v1/answer", json={"inputs": [rows[i] for i in picked]}, timeout=60)
        assert batch.status_code == 200 and batch.json() == {"answers": [expected[i] for i in picked]}

        tasks = httpx.get(f"{base}/v1/tasks", timeout=10).json()["tasks"]
        assert [t["name"] for t in tasks] == list(TASKS)
        assert [t["n_tokens"] for t in tasks] == list(TASKS.values())
        assert {t["d_model"] for t in tasks} == {tiny_config().d_model}
        # Issue 28: a local base model is shown by its folder name, never the server's absolute path.
        assert tasks[0]["base_model"] == served["model_dir"].name and tasks[0]["init"] == "sampled_vocab"
        assert tasks[0]["dev_f1"] == 81.5 and tasks[0]["dev_exact_match"] == 70.25
        assert tasks[0]["extra"]["step"] == 300 and tasks[1]["dev_f1"] is None

        schema = httpx.get(f"{base}/openapi.json", timeout=10).json()
        assert "/v1/answer" in schema["paths"] and "AnswerInput" in schema["components"]["schemas"]

        good = rows[4]
        bad: list[tuple[dict, int, str]] = [
            (
                {"json": {**good, "task": "nope"}},
                422,
                "unknown task 'nope'; loaded tasks: squad, trivia, news",
            ),
            ({"json": {"task": "squad", "question": "q?"}}, 422, "context: Field required"),
            (
                {"json": {**good, "context": "x" * 2001}},
                413,
                "2001 characters long; this server accepts at most 2000",
            ),
            ({"json": {**good, "question": ""}}, 422, "question"),
            ({"json": {"inputs": []}}, 422, "inputs"),
            (
                {"json": {"inputs": [good, {**good, "task": "zzz"}]}},
                422,
                "inputs[1].task: unknown task 'zzz'",
            ),
            ({"json": [1, 2]}, 422, "must be a JSON object"),
            (
                {"content": b'{"task": "squad",', "headers": {"content-type": "application/json"}},
                422,  # one status for every unusable body (issue 14; was 400)
                "not valid JSON",
            ),
            ({"content": b""}, 422, "no body"),
        ]
        for kwargs, status, message in bad:
            r = httpx.post(f"{base}/v1/answer", timeout=10, **kwargs)
            assert r.status_code == status, (kwargs, r.text)
            assert message in r.json()["error"], (kwargs, r.text)
        # The server is still answering, and correctly.
        r = httpx.post(f"{base}/v1/answer", json=good, timeout=60)
        assert r.status_code == 200 and r.json() == {"answer": expected[4]}
        assert proc.poll() is None
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    assert "Traceback" not in log.read_text(errors="replace")


def test_micro_batcher_merges_without_splitting_requests() -> None:
    seen: list[list[tuple[str, str, str]]] = []
    threads: set[str] = set()

    def answer(rows: list[tuple[str, str, str]]) -> list[str]:
        seen.append(rows)
        threads.add(threading.current_thread().name)
        time.sleep(0.03)  # a model call: requests keep arriving meanwhile
        return [f"{t}|{q}" for t, q, _ in rows]

    async def scenario() -> list[list[str]]:
        batcher = MicroBatcher(answer, max_batch_size=8, max_wait_ms=10)
        requests = [[("t", f"{i}.{j}", "c") for j in range(1 + i % 3)] for i in range(20)]
        requests.append([("t", f"big.{j}", "c") for j in range(11)])  # bigger than the cap: runs alone
        try:
            return await asyncio.gather(*(batcher.submit(r) for r in requests))
        finally:
            assert batcher.stats.requests_answered == 21
            await batcher.stop()

    results = asyncio.run(scenario())
    for i, answers in enumerate(results[:20]):
        assert answers == [f"t|{i}.{j}" for j in range(1 + i % 3)]
    assert results[20] == [f"t|big.{j}" for j in range(11)]
    sizes = [len(b) for b in seen]
    assert sum(sizes) == sum(1 + i % 3 for i in range(20)) + 11
    # The big request runs alone, in parts of at most the cap (issue 28: between parts, an abandoned
    # request's remaining rows are dropped), its parts one after the other.
    assert max(sizes) <= 8
    big = [k for k, b in enumerate(seen) if any(q.startswith("big.") for _, q, _ in b)]
    assert [len(seen[k]) for k in big] == [8, 3] and big[1] == big[0] + 1
    assert all(q.startswith("big.") for k in big for _, q, _ in seen[k])
    assert len(seen) < 21 and max(sizes) > 1  # merged
    for i in range(20):  # each request's rows went to the model together
        assert sum(any(q.startswith(f"{i}.") for _, q, _ in b) for b in seen) == 1
    assert len(threads) == 1 and next(iter(threads)).startswith("softprompt-model")


def test_length_bucketed_batches_group_similar_lengths_and_answer_like_predict(served: dict) -> None:
    """With more waiting than one batch holds, each batch takes the oldest request plus the closest
    lengths (less padding than batches in arrival order), and every answer is still `predict`'s."""
    bank, rows, expected = served["loaded"], served["rows"], served["expected"]
    entered, gate = threading.Event(), threading.Event()
    batches: list[list] = []

    def gated(prepared: list) -> list[str]:
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        batches.append(prepared)
        return bank.answer_prepared(prepared, max_new_tokens=MAX_NEW)

    cap, n = 8, 33
    batcher = MicroBatcher(gated, prepare=bank.prepare, length=lambda r: r.length, max_batch_size=cap)

    async def scenario() -> list[list[str]]:
        first = asyncio.ensure_future(batcher.submit([(rows[0]["task"], rows[0])]))
        while not entered.is_set():  # the first request is on the (blocked) model
            await asyncio.sleep(0.01)
        rest = [asyncio.ensure_future(batcher.submit([(rows[i]["task"], rows[i])])) for i in range(1, n)]
        while len(batcher._waiting) < n - 1:
            await asyncio.sleep(0.01)
        gate.set()
        try:
            return await asyncio.wait_for(asyncio.gather(first, *rest), 120)
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert [a[0] for a in answers] == expected[:n]
    prepared = bank.prepare([(r["task"], r) for r in rows[:n]])
    # Each row keeps its example, whose context maps a padded-text prompt's answers back (`trivia`).
    assert [p.example.context for p in prepared] == [r["context"] for r in rows[:n]]
    assert [bank.entry(p.task).task.punctuation != "none" for p in prepared] == [
        r["task"] == "trivia" for r in rows[:n]
    ]
    length_of = {id(p.features.input_ids): p.length for p in prepared}
    assert len({p.length for p in prepared}) > 8, "the rows should have many different lengths"
    # Which request each batch row came from, by its tokens (rows of this set are all distinct).
    index = {tuple(p.features.input_ids): i for i, p in enumerate(prepared)}
    order = [[index[tuple(r.features.input_ids)] for r in b] for b in batches]
    assert sorted(i for b in order for i in b) == list(range(n))
    assert order[0] == [0] and all(len(b) <= cap for b in order)
    done: set[int] = set()
    for b in order:  # the oldest request still waiting is always in the next batch
        assert min(set(range(n)) - done) in b
        done |= set(b)

    def padding(groups: list[list[int]]) -> int:
        widths = [[prepared[i].length for i in g] for g in groups]
        return sum(len(w) * max(w) - sum(w) for w in widths)

    waiting = list(range(1, n))
    in_arrival_order = [waiting[i : i + cap] for i in range(0, len(waiting), cap)]
    assert padding(order[1:]) < padding(in_arrival_order) / 2
    del length_of


def test_a_lone_request_does_not_wait_for_company() -> None:
    """The window only opens when company is on its way: requests still being prepared, or fewer rows
    waiting than the last batch held. Counted, not timed: the window here is a minute long."""
    seen: list[int] = []
    release = threading.Event()

    def prepare(rows: list[tuple[str, str, str]]) -> list[tuple[str, str, str]]:
        if rows[0][1] == "slow":
            assert release.wait(60)
        return rows

    def answer(rows: list[tuple[str, str, str]]) -> list[str]:
        seen.append(len(rows))
        return [q for _, q, _ in rows]

    async def scenario() -> None:
        batcher = MicroBatcher(answer, prepare=prepare, max_batch_size=8, max_wait_ms=60_000)
        try:
            for i in range(3):  # one client, one request at a time: never a wait
                assert await asyncio.wait_for(batcher.submit([("t", f"q{i}", "c")]), 10) == [f"q{i}"]
            assert batcher.stats.window_waits == 0 and seen == [1, 1, 1]
            # A request being prepared is company: the first waits for it and they share a batch.
            first = asyncio.ensure_future(batcher.submit([("t", "fast", "c")]))
            second = asyncio.ensure_future(batcher.submit([("t", "slow", "c")]))
            while not (len(batcher._waiting) == 1 and batcher._preparing == 1):
                await asyncio.sleep(0.01)
            release.set()
            assert await asyncio.wait_for(asyncio.gather(first, second), 10) == [["fast"], ["slow"]]
            assert batcher.stats.window_waits == 1 and seen[-1] == 2
        finally:
            await batcher.stop()

    asyncio.run(scenario())

    async def after_a_batch() -> None:
        # After a batch of 3 rows, a lone request waits (briefly here) for the other two clients.
        batcher = MicroBatcher(answer, max_batch_size=8, max_wait_ms=20)
        try:
            await asyncio.gather(*(batcher.submit([("t", f"b{i}", "c")]) for i in range(3)))
            waits = batcher.stats.window_waits
            assert await asyncio.wait_for(batcher.submit([("t", "alone", "c")]), 10) == ["alone"]
            assert batcher.stats.window_waits == waits + 1
        finally:
            await batcher.stop()

    asyncio.run(after_a_batch())


def test_micro_batcher_stop_fails_waiting_requests() -> None:
    def slow(rows: list[tuple[str, str, str]]) -> list[str]:
        time.sleep(0.2)
        return ["x"] * len(rows)

    async def scenario() -> list[BaseException | list[str]]:
        batcher = MicroBatcher(slow, max_batch_size=1, max_wait_ms=0)
        pending = [asyncio.ensure_future(batcher.submit([("t", str(i), "c")])) for i in range(3)]
        await asyncio.sleep(0.05)  # the first is on the model, the others wait
        await batcher.stop()
        return await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)

    results = asyncio.run(scenario())
    assert all(isinstance(r, RuntimeError) and "shutting down" in str(r) for r in results)


def test_app_in_process_model_failure_is_500_and_server_recovers(served: dict) -> None:
    from fastapi.testclient import TestClient

    bank = served["loaded"]
    calls = {"n": 0}

    def flaky(rows: list[tuple[str, str, str]]) -> list[str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("out of memory")
        return bank.answer(rows, max_new_tokens=MAX_NEW)

    row = served["rows"][2]
    with TestClient(create_app(bank, answer=flaky)) as client:
        r = client.post("/v1/answer", json=row)
        assert r.status_code == 500 and "out of memory" in r.json()["error"]
        r = client.post("/v1/answer", json=row)
        assert r.status_code == 200 and r.json() == {"answer": served["expected"][2]}
        health = client.get("/health").json()
        assert health["batches_run"] == 1 and health["precision"] == "fp32"
        too_many = client.post("/v1/answer", json={"inputs": [row] * 257})
        assert too_many.status_code == 413 and "at most 256" in too_many.json()["error"]


def test_every_error_has_one_shape_and_status_scheme(served: dict) -> None:
    from fastapi.testclient import TestClient

    bank = served["loaded"]
    with TestClient(create_app(bank, answer=lambda rows: ["x"] * len(rows))) as client:
        cases = [
            (client.get("/v1/nowhere"), 404, "no endpoint at /v1/nowhere"),
            (client.get("/v1/answer"), 405, "GET is not allowed on /v1/answer"),
            (client.post("/v1/answer", content=b"{", headers={"content-type": "application/json"}), 422, "JSON"),
            (client.post("/v1/answer", json={"task": "squad"}), 422, "Field required"),
            (client.post("/v1/answer", json={"inputs": [{"task": "nope", "question": "q", "context": "c"}]}),
             422, "unknown task 'nope'"),
        ]  # fmt: skip
        for r, status, message in cases:
            assert r.status_code == status, r.text
            assert set(r.json()) <= {"error", "errors"} and message in r.json()["error"], r.text
        # The batch shape documented in the README answers in input order.
        rows = [{"task": "squad", "question": "q?", "context": "c"}] * 2
        assert client.post("/v1/answer", json={"inputs": rows}).json() == {"answers": ["x", "x"]}


def test_prompt_specs() -> None:
    # A bare DIR that is a run's best/ is named after the run (no prompt config to name a task here).
    assert parse_prompt_specs(["qa=runs/a/best", "runs/b/best/"]) == [
        ("qa", "runs/a/best"),
        ("b", "runs/b/best/"),
    ]
    with pytest.raises(UserError, match="NAME=DIR"):
        parse_prompt_specs(["=runs/a"])
    with pytest.raises(UserError, match="two prompts are named 'qa'"):
        parse_prompt_specs(["qa=a", "qa=b"])


def test_overload_answers_503_with_retry_after_and_holds_no_memory(served: dict) -> None:
    """A full queue refuses at once (while the model is still busy), holds nothing per refusal, and
    every accepted request is answered exactly as `predict` answers it."""
    import gc
    import tracemalloc

    bank, rows, expected = served["loaded"], served["rows"], served["expected"]
    entered, gate = threading.Event(), threading.Event()

    def gated(batch: list[tuple[str, str, str]]) -> list[str]:
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        return bank.answer(batch, max_new_tokens=MAX_NEW)

    app = create_app(bank, max_batch_size=1, max_wait_ms=0, max_queue=2, answer=gated)
    batcher = app.state.batcher

    async def scenario() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            first = asyncio.ensure_future(client.post("/v1/answer", json=rows[0]))
            while not entered.is_set():  # the first request is on the (blocked) model
                await asyncio.sleep(0.01)
            queued = [asyncio.ensure_future(client.post("/v1/answer", json=rows[i])) for i in (1, 2)]
            while batcher.queue_depth < 2:
                await asyncio.sleep(0.01)

            async def reject(n: int) -> None:
                for j in range(n):
                    r = await client.post("/v1/answer", json=rows[3 + j % 40])
                    assert r.status_code == 503, r.text
                    assert set(r.json()) == {"error"} and "overloaded" in r.json()["error"]
                    assert "--max_queue 2" in r.json()["error"]
                    assert int(r.headers["Retry-After"]) >= 1

            await reject(50)  # warm-up: first-call caches of httpx, pydantic and FastAPI
            tracemalloc.start()
            await reject(100)  # ... and the caches that fill once tracing is on
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            await reject(400)
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
            tracemalloc.stop()
            # Rejections were answered while the model was still blocked: nothing waited on it.
            assert not gate.is_set() and not first.done() and not any(q.done() for q in queued)
            assert batcher.queue_depth == 2 and len(batcher._waiting) <= 2
            assert batcher.stats.requests_rejected == 550
            # Keeping anything of a refused request (its parsed question and context: ~1 kB here) would
            # hold ~400 kB; what remains is the constant cost of caches filled once (15-25 kB seen).
            assert grown < 64_000, f"memory grew by {grown} bytes over 400 rejected requests"

            health = (await client.get("/health")).json()
            assert health["max_queue"] == 2 and health["requests_rejected"] == 550
            gate.set()
            answered = await asyncio.gather(first, *queued)
            assert [r.status_code for r in answered] == [200] * 3
            assert [r.json()["answer"] for r in answered] == expected[:3]
            # Once drained, the server accepts again.
            again = await client.post("/v1/answer", json=rows[5])
            assert again.status_code == 200 and again.json() == {"answer": expected[5]}
        await batcher.stop()

    asyncio.run(scenario())


def test_max_queue_flag_is_checked() -> None:
    with pytest.raises(UserError, match="--max_queue must be >= 1"):
        MicroBatcher(lambda rows: [], max_queue=0)
    from softprompt.commands.flags import ServeArgs, serve_checks

    args = ServeArgs(model="m", max_queue=0)
    assert serve_checks(args) == ["--max_queue must be >= 1, got 0"]
