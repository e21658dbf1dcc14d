"""Continuous batching in `softprompt serve`: requests that join and leave a running batch, at gated steps
(no timing), get exactly `predict`'s answers."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Collection, Hashable, Sequence
from typing import Any

import pytest
import torch

from conftest import save_tiny_t5, tiny_config
from softprompt.commands.predict import predict_answers
from softprompt.inference.bank import load_model_and_prompts
from softprompt.inference.continuous import ContinuousDecoder
from softprompt.io.checkpoint import PromptConfig, save_prompt
from softprompt.serving.continuous import ContinuousBatcher
from softprompt.serving.server import create_app

MAX_NEW = 8
TASKS = {"squad": 5, "trivia": 3, "news": 8}  # name -> prompt length
EOS = 1

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(n: int) -> list[dict[str, str]]:
    names = list(TASKS)
    rows = []
    for j in range(n):
        context = f"In {1800 + 7 * j}, item {j} was seen in the records. " + "It rained that day. " * (j % 5)
        rows.append({"task": names[j % 3], "question": f"When was item {j} seen?", "context": context})
    return rows


@pytest.fixture(scope="module")
def steered(tmp_path_factory) -> dict:
    """A tiny T5 whose EOS logit is steered up (answers end after 1 to 8 tokens), three prompts, and
    `predict`'s answers."""
    root = tmp_path_factory.mktemp("continuous")
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
        )
        dirs[name] = save_prompt(root / name, torch.randn(p, config.d_model, generator=gen), config)
    bank = load_model_and_prompts(str(model_dir), [str(d) for d in dirs.values()], names=list(dirs))
    with torch.no_grad():
        bank.model.model.lm_head.weight[EOS] *= 3.0
    rows = _rows(24)
    expected: list[str] = [""] * len(rows)
    for name in TASKS:
        mine = [i for i, r in enumerate(rows) if r["task"] == name]
        answers = predict_answers(bank, name, [rows[i] for i in mine], max_new_tokens=MAX_NEW)
        for i, a in zip(mine, answers, strict=True):
            expected[i] = a
    return {"bank": bank, "rows": rows, "expected": expected}


class _Gated:
    """A `ContinuousDecoder` whose every step waits for the test's go, and which logs what each step saw."""

    def __init__(self, inner: ContinuousDecoder) -> None:
        self.inner = inner
        self.go = threading.Semaphore(0)
        self.entered = 0
        self.log: list[tuple[int, int, int, int]] = []  # (rows before, joining, finished, rows after)

    @property
    def rows(self) -> int:
        return self.inner.rows

    def tokens_with(self, joining: Sequence[Any]) -> int:
        return self.inner.tokens_with(joining)

    def clear(self) -> None:
        self.inner.clear()

    def drop(self, leaving: Collection[Hashable]) -> None:
        self.inner.drop(leaving)

    def advance(
        self, joining: Sequence[tuple[Hashable, Any]] = (), leaving: Collection[Hashable] = ()
    ) -> list[tuple[Hashable, str]]:
        self.entered += 1
        assert self.go.acquire(timeout=60), "the test never let this step run"
        before = self.inner.rows
        out = self.inner.advance(joining, leaving)
        self.log.append((before, len(joining), len(out), self.inner.rows))
        return out


async def _until(condition, what: str) -> None:
    for _ in range(12000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never happened: {what}")


def test_requests_joining_and_leaving_at_gated_steps_get_predicts_answers(steered: dict) -> None:
    bank, rows, expected = steered["bank"], steered["rows"], steered["expected"]
    gated = _Gated(ContinuousDecoder(bank, max_new_tokens=MAX_NEW))
    assert gated.inner.supported
    # Six rows at most, and a token budget of about four long rows: a request of 7 rows joins over several
    # steps, and admission stops at the budget as well as at the row cap.
    longest = max(p.length for p in bank.prepare([(r["task"], r) for r in rows]))
    batcher = ContinuousBatcher(
        gated, prepare=bank.prepare, max_batch_size=6, max_batch_tokens=4 * longest, max_new_tokens=MAX_NEW
    )
    # Requests (row index lists) arriving before the given step; none waits on timing.
    arrivals = {
        0: [[0]],
        1: [[1, 2, 3]],
        2: [[4], [5]],
        4: [[6, 7, 8, 9, 10, 11, 12]],
        6: [[13], [14, 15]],
        9: [[16], [17], [18]],
        11: [[19, 20, 21, 22, 23]],
    }

    async def scenario() -> list[tuple[list[int], list[str]]]:
        submitted: list[tuple[list[int], asyncio.Future]] = []
        try:
            for k in range(200):
                for idx in arrivals.get(k, []):
                    fut = asyncio.ensure_future(batcher.submit([(rows[i]["task"], rows[i]) for i in idx]))
                    submitted.append((idx, fut))
                    await _until(lambda: batcher.queue_depth == 0 or len(batcher._waiting) > 0, "queued")
                    await _until(lambda: batcher._preparing == 0, "prepared")
                if k == 0:
                    await _until(lambda: gated.entered == 1, "the first step")
                if all(f.done() for _, f in submitted) and k > max(arrivals):
                    break
                gated.go.release()  # step k runs
                await _until(
                    lambda k=k: (
                        len(gated.log) == k + 1
                        and (gated.entered == k + 2 or (not batcher._running and not batcher._waiting))
                    ),
                    f"step {k}",
                )
            return [(idx, await f) for idx, f in submitted]
        finally:
            await batcher.stop()

    answered = asyncio.run(scenario())
    for idx, answers in answered:
        assert answers == [expected[i] for i in idx], idx
    assert sorted(i for idx, _ in answered for i in idx) == list(range(len(rows)))
    # Rows joined a batch that was already decoding, and rows left one that went on decoding.
    assert any(before > 0 and joining > 0 for before, joining, _, _ in gated.log)
    assert any(done > 0 and after > 0 for _, _, done, after in gated.log)
    assert max(before + joining for before, joining, _, _ in gated.log) <= 6
    assert batcher.stats.requests_answered == len(answered)
    assert batcher.stats.rows_answered == len(rows)


def test_answers_end_at_eos_at_many_lengths(steered: dict) -> None:
    """The steered model is a fair test: its answers end after very different numbers of tokens."""
    bank, rows = steered["bank"], steered["rows"]
    decoder = ContinuousDecoder(bank, max_new_tokens=MAX_NEW)
    decoder.advance(list(enumerate(bank.prepare([(r["task"], r) for r in rows]))))
    ended_at: list[int] = []
    step = 1
    while decoder.rows:
        step += 1
        ended_at += [step] * len(decoder.advance())
    assert len(set(ended_at)) >= 4 and min(ended_at) < MAX_NEW


def test_the_app_serves_continuous_by_default_and_static_on_request(steered: dict) -> None:
    bank = steered["bank"]
    assert isinstance(create_app(bank).state.batcher, ContinuousBatcher)
    assert not isinstance(create_app(bank, batching="static").state.batcher, ContinuousBatcher)
    assert not isinstance(
        create_app(bank, answer=lambda rows: [""] * len(rows)).state.batcher, ContinuousBatcher
    )


def test_rows_of_a_client_that_left_are_dropped_from_the_running_batch(steered: dict) -> None:
    bank, rows, expected = steered["bank"], steered["rows"], steered["expected"]
    gated = _Gated(ContinuousDecoder(bank, max_new_tokens=MAX_NEW))
    batcher = ContinuousBatcher(gated, prepare=bank.prepare, max_batch_size=8, max_new_tokens=MAX_NEW)

    async def scenario() -> list[str]:
        try:
            big = asyncio.ensure_future(batcher.submit([(rows[i]["task"], rows[i]) for i in range(1, 7)]))
            await _until(lambda: gated.entered == 1, "the first step")
            small = asyncio.ensure_future(batcher.submit([(rows[0]["task"], rows[0])]))
            await _until(lambda: len(batcher._waiting) == 1 and batcher._preparing == 0, "queued")
            gated.go.release()
            await _until(lambda: gated.entered == 2, "the second step")
            assert gated.log[-1][3] == 6 - gated.log[-1][2]  # none of the big request's rows left yet
            big.cancel()  # its client leaves while its rows decode
            with contextlib.suppress(asyncio.CancelledError):
                await big
            for _ in range(MAX_NEW + 2):
                gated.go.release()
            return await asyncio.wait_for(small, 60)
        finally:
            await batcher.stop()

    assert asyncio.run(scenario()) == [expected[0]]
    # The second step admitted the small request beside the big one; the step after it ran without the
    # big request's rows.
    assert gated.log[1][0] > 0 and gated.log[1][1] == 1
    assert gated.log[2][0] == 1
    assert batcher.stats.requests_abandoned == 1 and batcher.stats.rows_dropped == gated.log[1][3] - 1


class _Counting:
    """A decoder without a model: a row `n` answers `"n"` after n steps. It counts its steps, can be told to
    fail at one, says (`all_done`) when every row it was given has ended, and with `pause` waits for
    `resume` in the step that admits the last of them (`paused` then)."""

    def __init__(self, expected_rows: int, fail_at: int | None = None, pause: bool = False) -> None:
        self.left: dict[Hashable, int] = {}
        self.length: dict[Hashable, int] = {}
        self.steps = 0
        self.admitted = 0
        self.expected_rows = expected_rows
        self.fail_at = fail_at
        self.all_done = threading.Event()
        self.resume = threading.Event()
        if not pause:
            self.resume.set()
        self.paused = False

    @property
    def rows(self) -> int:
        return len(self.left)

    def tokens_with(self, joining: Sequence[Any]) -> int:
        return len(self.left) + len(joining)

    def clear(self) -> None:
        self.left.clear()

    def drop(self, leaving: Collection[Hashable]) -> None:
        for key in leaving:
            self.left.pop(key, None)

    def advance(
        self, joining: Sequence[tuple[Hashable, Any]] = (), leaving: Collection[Hashable] = ()
    ) -> list[tuple[Hashable, str]]:
        self.drop(leaving)
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("the model broke")
        for key, n in joining:
            self.left[key] = self.length[key] = n
            self.admitted += 1
        if joining and self.admitted == self.expected_rows:
            self.paused = True
            assert self.resume.wait(timeout=60), "the test never resumed the decoder"
        for key in self.left:
            self.left[key] -= 1
        finished = [(key, str(self.length[key])) for key, n in self.left.items() if n == 0]
        for key, _ in finished:
            del self.left[key]
        if self.admitted == self.expected_rows and not self.left:
            self.all_done.set()
        return finished


def _model_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("softprompt-model")]


def test_decoder_steps_run_on_the_model_thread_while_the_event_loop_is_held() -> None:
    """The step loop's property, without timing: once its rows are admitted, a batch decodes to the end
    while the event loop is blocked, and the loop sees a bounded number of thread callbacks per request
    (prepare and answer), not one per decoder step."""
    requests = [[40], [25, 40], [12]]
    decoder = _Counting(expected_rows=4, pause=True)
    batcher = ContinuousBatcher(decoder, prepare=list, max_batch_size=8, max_new_tokens=40)

    async def scenario() -> tuple[tuple[bool, int], list[list[str]], int]:
        loop = asyncio.get_running_loop()
        calls = 0
        threadsafe = loop.call_soon_threadsafe

        def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal calls
            calls += 1
            return threadsafe(*args, **kwargs)

        loop.call_soon_threadsafe = counted  # every hand-over from a thread to the loop passes here
        try:
            futures = [asyncio.ensure_future(batcher.submit(rows)) for rows in requests]
            await _until(lambda: decoder.paused, "every row admitted")
            # Hold the event loop (a blocking wait on its own thread) from the moment the decoder resumes:
            # the remaining steps must run without it.
            decoder.resume.set()
            held = decoder.all_done.wait(timeout=20), decoder.steps
            answers = list(await asyncio.gather(*futures))
        finally:
            await batcher.stop()
            del loop.call_soon_threadsafe
        return held, answers, calls

    (held, steps), answers, calls = asyncio.run(scenario())
    assert held, f"only {steps} decoder steps ran while the event loop was held"
    assert answers == [["40"], ["25", "40"], ["12"]]
    assert decoder.steps >= 40
    # One prepare and at most one answer per request, and the step loop's end: O(requests), not O(steps).
    assert calls <= 2 * len(requests) + 1, (calls, decoder.steps)
    assert batcher.stats.requests_answered == 3 and batcher.stats.rows_answered == 4
    assert not _model_threads()


def test_a_model_failure_fails_the_running_requests_and_the_batch_starts_over() -> None:
    decoder = _Counting(expected_rows=3, fail_at=3)
    batcher = ContinuousBatcher(decoder, prepare=list, max_batch_size=8, max_new_tokens=10)

    async def scenario() -> tuple[list[BaseException | list[str]], list[str]]:
        try:
            running = [asyncio.ensure_future(batcher.submit(rows)) for rows in ([5], [6, 7])]
            failed = await asyncio.gather(*running, return_exceptions=True)
            assert decoder.rows == 0  # the batch was cleared
            return failed, await batcher.submit([2])
        finally:
            await batcher.stop()

    failed, after = asyncio.run(scenario())
    assert [str(e) for e in failed] == ["the model broke", "the model broke"]
    assert after == ["2"]
    assert batcher.stats.requests_answered == 1 and batcher.stats.rows_answered == 1


def test_stop_fails_running_requests_ends_the_model_thread_and_a_restart_serves() -> None:
    decoder = _Counting(expected_rows=2)
    first = threading.Semaphore(0)
    advance = decoder.advance

    def held_first(*args: Any, **kwargs: Any) -> list[tuple[Hashable, str]]:
        if decoder.steps == 0:  # the test sees the row running, then lets the steps run freely
            assert first.acquire(timeout=60)
        return advance(*args, **kwargs)

    decoder.advance = held_first  # type: ignore[method-assign]
    batcher = ContinuousBatcher(decoder, prepare=list, max_batch_size=8, max_new_tokens=10)

    async def scenario() -> tuple[BaseException | list[str], list[str]]:
        endless = asyncio.ensure_future(batcher.submit([10**9]))
        await _until(lambda: len(_model_threads()) == 1 and not batcher._waiting, "the first step")
        first.release()
        await _until(lambda: decoder.steps > 5, "steps running")
        await asyncio.wait_for(batcher.stop(), 30)  # the thread ends after the step it is in
        assert not _model_threads()
        (stopped,) = await asyncio.gather(endless, return_exceptions=True)
        try:
            return stopped, await asyncio.wait_for(batcher.submit([3]), 30)
        finally:
            await batcher.stop()

    stopped, after = asyncio.run(scenario())
    assert str(stopped) == "the server is shutting down"
    assert after == ["3"]
    assert decoder.rows == 0  # the restart cleared the endless row the stopped batcher left
    assert not _model_threads()


def test_a_one_row_request_is_not_held_back_until_a_big_one_has_joined() -> None:
    """Admission is round robin over waiting requests: a 12-row request, 4 rows at a time, does not keep a
    one-row request that came after it waiting until all 12 have joined."""
    joined: list[tuple[int, int]] = []  # (step, row's length) of every row as it joins
    first_step = threading.Event()
    go_on = threading.Event()

    class Gated(_Counting):
        def advance(self, joining=(), leaving=()):
            joined.extend((self.steps + 1, n) for _, n in joining)
            if self.steps == 0:
                first_step.set()
                assert go_on.wait(timeout=60), "the test never let the first step go on"
            return super().advance(joining, leaving)

    decoder = Gated(expected_rows=13)
    batcher = ContinuousBatcher(decoder, prepare=list, max_batch_size=4, max_new_tokens=10)

    async def scenario() -> list[list[str]]:
        try:
            big = asyncio.ensure_future(batcher.submit([5] * 12))
            await _until(first_step.is_set, "the big request's first rows in a step")
            small = asyncio.ensure_future(batcher.submit([1]))
            await _until(lambda: batcher.queue_depth == 2, "the one-row request queued")
            go_on.set()
            return list(await asyncio.gather(big, small))
        finally:
            await batcher.stop()

    answers = asyncio.run(scenario())
    assert answers == [["5"] * 12, ["1"]]
    small_step = next(step for step, n in joined if n == 1)
    big_steps = [step for step, n in joined if n == 5]
    assert big_steps[:4] == [1, 1, 1, 1] and len(big_steps) == 12
    # It joins as the first rows leave (step 6), not after the big request's last rows (step 11).
    assert small_step < max(big_steps), (small_step, big_steps)


def test_a_stop_that_times_out_raises_instead_of_returning_while_a_step_runs() -> None:
    """`stop` waits for the step in progress; a caller that gives it a deadline (a shutdown timeout) must
    see the timeout, not a normal return while the model thread still runs."""
    in_step, release = threading.Event(), threading.Event()
    decoder = _Counting(expected_rows=1)
    advance = decoder.advance

    def stuck(*args: Any, **kwargs: Any) -> list[tuple[Hashable, str]]:
        in_step.set()
        assert release.wait(timeout=60), "the test never released the step"
        return advance(*args, **kwargs)

    decoder.advance = stuck  # type: ignore[method-assign]
    batcher = ContinuousBatcher(decoder, prepare=list, max_batch_size=8, max_new_tokens=10)

    async def scenario() -> bool:
        request = asyncio.ensure_future(batcher.submit([3]))
        await _until(in_step.is_set, "the step")
        try:
            await asyncio.wait_for(batcher.stop(), 0.3)
            timed_out = False
        except asyncio.TimeoutError:
            timed_out = True
        release.set()
        await batcher.stop()
        await asyncio.gather(request, return_exceptions=True)
        await _until(lambda: not _model_threads(), "the model thread's end")
        return timed_out

    assert asyncio.run(scenario()), "stop returned while the model thread was still in a step"
