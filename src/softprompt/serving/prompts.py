"""Prompts added and removed while `softprompt serve` runs: `POST /v1/prompts`, `DELETE /v1/prompts/{name}`.

`PromptStore` owns which prompts the server knows (those given at start and those loaded since) and
which of them are resident in the bank. Three rules make it safe under load:

* Paths resolve only inside `--prompt_root`: a path outside it, a symlink (the directory or a file in it)
  leading outside it, or a pickle is refused before a byte of the checkpoint is read.
* A request pins the prompts it names from before it is read until it is answered. A pinned prompt is
  never evicted or freed: `DELETE` forgets its name at once, and the bank frees its slot when the last
  request using it is answered. The bank never shifts indices (`PromptBank.remove` leaves an empty slot),
  so rows that hold an index keep meaning their prompt.
* Files are read on a loader thread, never on the event loop or the model thread: a load never blocks
  answering. `--max_resident_prompts` bounds the bank with least-recently-used eviction; an evicted prompt
  stays known and is read again from its path when a request names it. When every resident prompt is in
  use, a needed prompt still loads (the bound is exceeded only until those requests are answered).

All state is touched on the event loop's thread only; the bank's own updates are copy-on-write, so the
prepare and model threads read a consistent bank while it changes.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections import Counter, OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from softprompt.errors import UserError
from softprompt.inference.bank import PromptBank
from softprompt.io.checkpoint import PICKLE_SUFFIXES, PromptConfig, load_prompt
from softprompt.serving.schemas import ApiError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class _Known:
    """A prompt the server answers for: where it is read from, and what `GET /v1/tasks` says of it."""

    path: Path
    info: dict[str, Any]


class PromptStore:
    """The prompts a server knows, which of them are resident, and who uses them (see the module docstring).

    Args:
        bank: the model and the prompts loaded at start (known from then on, read again from `paths`).
        paths: each start prompt's directory, by name.
        root: `--prompt_root`; None turns the load and unload endpoints off (they answer 404).
        max_resident: `--max_resident_prompts`; None keeps every known prompt resident.
    """

    def __init__(
        self,
        bank: PromptBank,
        paths: dict[str, str | Path] | None = None,
        *,
        root: str | Path | None = None,
        max_resident: int | None = None,
    ) -> None:
        if max_resident is not None and max_resident < 1:
            raise UserError(f"--max_resident_prompts must be >= 1, got {max_resident}")
        if root is not None and not Path(root).is_dir():
            raise UserError(f"--prompt_root {root} is not a directory; create it or name another")
        self.bank = bank
        self.root = Path(root).resolve() if root is not None else None
        self.max_resident = max_resident
        paths = paths or {}
        self._known: dict[str, _Known] = {
            n: _Known(Path(paths.get(n, "")), bank.entry(n).describe()) for n in bank.names
        }
        self._resident: OrderedDict[str, None] = OrderedDict((n, None) for n in bank.names)
        self._pins: Counter[str] = Counter()
        self._doomed: set[str] = set()  # unloaded while in use: freed when the last user is answered
        self._loading: dict[str, asyncio.Future[None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        self.loads = 0  # files read (start prompts not counted): reloads after eviction show here
        self.evictions = 0

    # ------------------------------------------------------------------------------------------------
    # What is known

    @property
    def enabled(self) -> bool:
        """Whether prompts may be loaded and unloaded at run time (`--prompt_root` was given)."""
        return self.root is not None

    @property
    def resident(self) -> list[str]:
        """The resident prompts, least recently used first."""
        return list(self._resident)

    def __contains__(self, name: object) -> bool:
        return name in self._known

    def describe(self) -> list[dict[str, Any]]:
        """Every known prompt's metadata (`GET /v1/tasks`), whether resident or not."""
        return [{**k.info, "resident": n in self._resident} for n, k in self._known.items()]

    def names(self) -> list[str]:
        """Every known prompt's name."""
        return list(self._known)

    # ------------------------------------------------------------------------------------------------
    # Requests

    async def acquire(self, names: Sequence[str]) -> list[str]:
        """Pin the prompts a request names, loading the evicted ones, until `release`.

        Returns:
            The distinct names pinned (give them to `release`).

        Raises:
            ApiError: 422 for a name the server does not know; 500 when an evicted prompt cannot be read again.
        """
        wanted = list(dict.fromkeys(names))
        for name in wanted:
            if name not in self._known:
                known = ", ".join(self._known) or "none"
                raise ApiError(422, f"task: unknown task '{name}'; loaded tasks: {known}")
        self._pins.update(wanted)  # first, so that loading one does not evict another
        try:
            for name in wanted:
                if name not in self._resident:
                    await self._reload(name)
                self._resident.move_to_end(name)
        except BaseException:
            self.release(wanted)
            raise
        return wanted

    def release(self, names: Sequence[str]) -> None:
        """Unpin what `acquire` pinned: unloaded prompts are freed now, and the bound is enforced again."""
        for name in names:
            self._pins[name] -= 1
            if self._pins[name] > 0:
                continue
            del self._pins[name]
            if name in self._doomed:
                self._doomed.discard(name)
                self._free(name)
        self._evict(0)

    # ------------------------------------------------------------------------------------------------
    # Loading and unloading

    def resolve(self, path: str) -> Path:
        """The prompt directory `path` names inside the root, checked before anything in it is read.

        Raises:
            ApiError: 403 outside the root or through a symlink leading out of it; 422 for no directory
                or a pickle.
        """
        assert self.root is not None
        lexical = Path(os.path.normpath(self.root / path))
        if not lexical.is_relative_to(self.root):
            raise ApiError(403, f"path {path!r} is outside --prompt_root; name a directory inside it")
        real = lexical.resolve()
        if not real.is_relative_to(self.root):
            raise ApiError(403, f"path {path!r} leads outside --prompt_root through a symlink; refused")
        if real.suffix in PICKLE_SUFFIXES:
            raise ApiError(422, f"path {path!r} is a pickle; softprompt loads safetensors prompts only")
        if not real.is_dir():
            raise ApiError(422, f"path {path!r} is no directory under --prompt_root; name a prompt directory")
        items = list(real.iterdir())
        for item in items:
            if not item.resolve().is_relative_to(self.root):
                raise ApiError(
                    403, f"{path}/{item.name} leads outside --prompt_root through a symlink; refused"
                )
        pickles = sorted(i.name for i in items if i.suffix in PICKLE_SUFFIXES)
        if pickles and not any(i.suffix == ".safetensors" for i in items):
            raise ApiError(
                422,
                f"{path} holds only pickle files ({', '.join(pickles)}); softprompt never unpickles a prompt",
            )
        return real

    async def load(self, name: str, path: str) -> dict[str, Any]:
        """`POST /v1/prompts`: read the prompt at `path` (inside the root) and serve it as `name`.

        Returns:
            Its `GET /v1/tasks` item.

        Raises:
            ApiError: 409 for a name in use, 403/422 for a path refused (`resolve`) or a prompt that does not
                fit the model (one line from `load_prompt` or the bank's checks).
        """
        if not NAME.fullmatch(name):
            raise ApiError(422, f"name {name!r}: use 1-64 letters, digits, '.', '_' or '-', starting alnum")
        if name in self._known or name in self._loading or name in self._doomed:
            raise ApiError(409, f"a prompt named '{name}' is loaded; DELETE /v1/prompts/{name} first")
        directory = self.resolve(path)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._loading[name] = done
        try:
            weight, config = await self._read(directory)
            self._add(name, weight, config)
        finally:
            del self._loading[name]
            done.set_result(None)
        self._known[name] = _Known(directory, self.bank.entry(name).describe())
        self.loads += 1
        return {**self._known[name].info, "resident": True}

    def unload(self, name: str) -> None:
        """`DELETE /v1/prompts/{name}`: forget `name` now; free its slot once no request in flight uses it.

        Raises:
            ApiError: 404 for a name the server does not know.
        """
        if name not in self._known:
            raise ApiError(404, f"no prompt named '{name}' is loaded; GET /v1/tasks lists them")
        del self._known[name]
        if name not in self._resident:
            return
        if self._pins[name] > 0:
            self._doomed.add(name)
        else:
            self._free(name)

    async def close(self) -> None:
        """Stop the loader thread (the server is shutting down)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # ------------------------------------------------------------------------------------------------
    # Inside

    async def _read(self, directory: Path) -> tuple[torch.Tensor, PromptConfig]:
        """Read and check a prompt checkpoint on the loader thread."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="softprompt-load")
        bank = self.bank

        def read() -> tuple[torch.Tensor, PromptConfig]:
            return load_prompt(directory, expect_d_model=bank.d_model, expect_base_model=bank.base_model)

        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, read)
        except UserError as e:
            raise ApiError(422, str(e).splitlines()[0]) from None

    def _add(self, name: str, weight: torch.Tensor, config: PromptConfig) -> None:
        """Make room (`_evict`), then add to the bank as the most recently used."""
        self._evict(1)
        try:
            self.bank.add(name, weight, config)
        except UserError as e:
            raise ApiError(422, str(e).splitlines()[0]) from None
        self._resident[name] = None

    async def _reload(self, name: str) -> None:
        """Read an evicted prompt again (one read however many requests wait for it)."""
        if name in self._loading:
            await asyncio.shield(self._loading[name])
        else:
            known = self._known[name]
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._loading[name] = done
            try:
                weight, config = await self._read(known.path)
                if self._known.get(name) is known and name not in self._resident:
                    self._add(name, weight, config)
                    self.loads += 1
            except ApiError as e:
                raise ApiError(500, f"prompt '{name}' could not be read again: {e.message}") from None
            finally:
                del self._loading[name]
                done.set_result(None)
        if name not in self._resident:
            if name in self._known:  # the read that this request waited for failed
                raise ApiError(500, f"prompt '{name}' could not be read again from its directory")
            raise ApiError(422, f"task: unknown task '{name}'; it was unloaded")

    def _evict(self, extra: int) -> None:
        """Evict the least recently used unpinned prompts until `extra` more fit under the bound."""
        if self.max_resident is None:
            return
        for name in list(self._resident):
            if len(self._resident) + extra <= self.max_resident:
                return
            if self._pins[name] == 0 and name not in self._doomed:
                self._free(name)
                self.evictions += 1

    def _free(self, name: str) -> None:
        self.bank.remove(name)
        del self._resident[name]
