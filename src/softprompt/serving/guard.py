"""What keeps `softprompt serve` up under hostile or broken clients: bounded bodies, read deadlines, a
connection limit, abandoned requests dropped, and error logs that cannot flood the disk.

* `BodyLimit` (ASGI middleware) counts a body's bytes as they arrive, chunked or not, and answers 413 the
  moment they pass the limit, so no body larger than `Limits.max_body_bytes` is ever held in memory.
* `timed_protocol` is uvicorn's h11 protocol with two guards: a request must arrive whole (headers and
  body) within `read_timeout` seconds of its first byte, or the connection is closed (slowloris clients
  hold no socket for long); and past `max_connections` open connections a new one is closed at once,
  before it costs more than its accept (so the process never runs out of file descriptors).
* `until_disconnected` runs a request's work and cancels it when the client goes away, so the rows of
  an abandoned request leave the batcher's queue instead of being decoded for nobody.
* `OncePerInterval` (a logging filter) lets a repeated log message through once per interval, with the
  count of the copies it held back, so an error in a loop (EMFILE on accept) logs a line, not 70 MB.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import h11
from fastapi import HTTPException, Request
from uvicorn.protocols.http.h11_impl import H11Protocol

T = TypeVar("T")
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

log = logging.getLogger("softprompt.serve")


class BodyLimit:
    """ASGI middleware: refuse a request body over `max_body_bytes` with 413, counting it as it streams.

    A `Content-Length` over the limit is refused before any of the body is read; a chunked body (no
    length) is counted chunk by chunk, and the 413 comes as soon as the count passes the limit. POST
    bodies are read as JSON whatever content type the client named (`curl -d` sends a form type).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    def too_large(self, size: str) -> str:
        """The 413 message for a body of `size` bytes."""
        return f"the request body is {size} bytes; this server accepts at most {self.max_body_bytes}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_body_bytes:
            from softprompt.serving.schemas import error_response

            await error_response(413, self.too_large(length))(scope, receive, send)
            return
        if scope["method"] == "POST" and b"json" not in headers.get(b"content-type", b""):
            rest = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": [*rest, (b"content-type", b"application/json")]}
        seen = 0

        async def counted() -> dict[str, Any]:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body_bytes:
                    # An HTTPException passes FastAPI's body reading untouched to the 413 handler.
                    raise HTTPException(413, self.too_large(f"more than {self.max_body_bytes:,}"))
            return message

        await self.app(scope, counted, send)


class ClientGone(Exception):
    """The client disconnected before its answer was ready; the work for it was cancelled."""


async def until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`await work`, cancelled when the client disconnects first.

    Cancelling the work cancels the batcher's future for it, so its rows are dropped from the queue
    (`MicroBatcher.submit`) or skipped when a batch forms.

    Raises:
        ClientGone: the client went away (nobody reads the answer).
    """
    job = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({job, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if not job.done():
        job.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await job
        raise ClientGone("the client disconnected")
    return job.result()


async def _disconnect(request: Request) -> None:
    # The body is read by now, so the next message the server has for this request is its disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


def timed_protocol(read_timeout: float, max_connections: int) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a whole-request read deadline and a connection limit (see the module)."""

    class TimedH11Protocol(H11Protocol):
        _read_deadline: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning(
                    "closed a connection: %d are open, --max_connections is %d",
                    len(self.connections) - 1,
                    max_connections,
                )
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            if self._read_deadline is None:
                self._read_deadline = self.loop.call_later(read_timeout, self._timed_out)

        def _disarm(self) -> None:
            if self._read_deadline is not None:
                self._read_deadline.cancel()
                self._read_deadline = None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            # The clock runs from a request's first byte until its last: trickling bytes does not reset it.
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                self._arm()
            else:
                self._disarm()

        def on_response_complete(self) -> None:
            self._disarm()  # the keep-alive timeout takes over until the next request's first byte
            super().on_response_complete()

        def _timed_out(self) -> None:
            self._read_deadline = None
            if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
                log.warning(
                    "closed a connection that sent no whole request in %g s (--read_timeout)", read_timeout
                )
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return TimedH11Protocol


class OncePerInterval(logging.Filter):
    """Let each message (by its format string) through once per `interval` seconds; a later one that gets
    through says how many copies were held back."""

    def __init__(self, interval: float = 10.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        key = str(record.msg).split("\n", 1)[0][:200]  # asyncio puts varying details below line one
        now = time.monotonic()
        last, held = self._last.get(key, (-self.interval - 1.0, 0))
        if now - last < self.interval:
            self._last[key] = (last, held + 1)
            return False
        self._last[key] = (now, 0)
        if held:
            record.msg = f"{record.msg} ({held} more like it in the last {self.interval:g} s not logged)"
        return True


def quiet_repeats(
    interval: float = 10.0, names: tuple[str, ...] = ("asyncio", "uvicorn.error", "softprompt.serve")
) -> None:
    """Install `OncePerInterval` on the loggers a server under attack would flood."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, OncePerInterval) for f in logger.filters):
            logger.addFilter(OncePerInterval(interval))
