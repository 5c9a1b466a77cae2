"""The engine in a process of its own, behind the :class:`~dlp.engine.engine.Engine` API.

In a serving replica the engine's loop shares its process, and so its GIL, with the
server's own threads (Ray's RPC and event threads in a Serve replica). Its host work between
decode steps then waits its turn: through HTTP on the H200 the same engine ran 13-15% below
its throughput alone. :class:`EngineProcess` runs the engine and its batching loop in a
child process and offers the same calls - ``generate``, ``generate_stream``, ``stats``,
``running``, ``pool.register`` / ``pool.stats`` - so a server can use either.

The two processes talk over one local socket (``multiprocessing.connection``, with a random
key): requests go down, results and stream chunks come back. Python objects cross as pickles
between these two processes only; no file is ever unpickled. Errors cross as (class name,
message, field) and are raised again as the same ``dlp`` error class, so a caller maps them
to HTTP codes as it does in-process. The child is started with ``python -m`` (not
``multiprocessing``'s spawn, which would re-import the server's ``__main__``).

Without Ray: this module only needs the standard library and the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from multiprocessing.connection import Client, Connection, Listener
from pathlib import Path
from typing import Any

from dlp.engine.config import EngineConfig
from dlp.engine.types import GenerationChunk, GenerationRequest, GenerationResult
from dlp.errors import DlpError
from dlp.routing.mix import AdapterMix

log = logging.getLogger(__name__)

_AUTHKEY_ENV = "DLP_ENGINE_PROCESS_KEY"
# Synchronous calls (stats, adapter registration) wait at most this long for the child.
CALL_TIMEOUT_S = 60.0


def _error_info(exc: BaseException) -> tuple[str, str, str | None]:
    return type(exc).__name__, str(exc), getattr(exc, "field", None)


def _error_classes() -> dict[str, type[Exception]]:
    """The errors that cross the process boundary as themselves (callers branch on them)."""
    from dlp.engine.types import InvalidRequestError
    from dlp.errors import AdapterValidationError, InvalidMixError
    from dlp.lora.pool import (
        AdapterInUseError,
        PoolBusyError,
        PoolCapacityError,
        UnknownAdapterError,
    )

    classes: list[type[Exception]] = [
        DlpError,
        InvalidMixError,
        AdapterValidationError,
        InvalidRequestError,
        AdapterInUseError,
        PoolBusyError,
        PoolCapacityError,
        UnknownAdapterError,
        ValueError,
        FileNotFoundError,
    ]
    return {cls.__name__: cls for cls in classes}


def _rebuild_error(info: tuple[str, str, str | None]) -> Exception:
    name, message, field_name = info
    cls = _error_classes().get(name)
    if cls is None:  # anything else is the engine failing, not the request
        return DlpError(f"engine process: {name}: {message}")
    exc = cls.__new__(cls)
    Exception.__init__(exc, message)
    if field_name is not None:
        exc.field = field_name  # type: ignore[attr-defined]
    return exc


@dataclass
class _Pending:
    """One request of the parent's, answered from the child's messages."""

    loop: asyncio.AbstractEventLoop
    future: asyncio.Future | None = None  # generate
    queue: asyncio.Queue | None = None  # generate_stream: chunks, then an exception or None


@dataclass
class _Calls:
    """Synchronous calls in flight (any thread may wait on one)."""

    ids: itertools.count = field(default_factory=itertools.count)
    waiting: dict[int, concurrent.futures.Future] = field(default_factory=dict)


class _PoolProxy:
    """The child's adapter pool, for the calls a server makes on it (from a thread: they
    block until the child answers)."""

    def __init__(self, owner: EngineProcess) -> None:
        self._owner = owner

    def register(self, name: str, path: str | Path, replace: bool = False) -> Any:
        return self._owner._call("pool.register", name, str(path), replace)

    def stats(self) -> dict[str, Any]:
        return self._owner._call("pool.stats")


class EngineProcess:
    """An :class:`Engine` in a child process; the same async API, same errors."""

    def __init__(
        self,
        config: EngineConfig,
        reroute: Any | None = None,
        torch_threads: int | None = None,
    ) -> None:
        from dlp.engine.engine import load_tokenizer

        config.validate()  # bad config fails here, not in the child
        self.config = config
        self.reroute = reroute
        self.torch_threads = torch_threads
        # The worker counts prompt tokens of oversized prompts itself (HTTP 400s).
        self.tokenizer = load_tokenizer(config)
        self.pool = _PoolProxy(self)
        self._conn: Connection | None = None
        self._proc: subprocess.Popen | None = None
        self._send_lock = threading.Lock()
        self._ids = itertools.count()
        self._pending: dict[int, _Pending] = {}
        self._calls = _Calls()
        self._ready: concurrent.futures.Future = concurrent.futures.Future()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._alive = False
        self._stopping = False

    @classmethod
    def from_config(cls, config: EngineConfig, reroute: Any | None = None) -> EngineProcess:
        return cls(config, reroute=reroute)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self._proc is not None:
            return
        self._loop = asyncio.get_running_loop()
        key = secrets.token_bytes(32)
        sock_dir = tempfile.mkdtemp(prefix="dlp-engine-")
        address = os.path.join(sock_dir, "engine.sock")
        listener = Listener(address, family="AF_UNIX", authkey=key)
        env = dict(os.environ)
        env[_AUTHKEY_ENV] = key.hex()
        # The child imports dlp as this process does (a Serve replica's working dir).
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "dlp.engine.engine_process", address], env=env
        )
        try:
            self._conn = await self._accept(listener, address, key)
        finally:
            listener.close()
            with contextlib.suppress(OSError):
                os.rmdir(sock_dir)
        self._conn.send((self.config, self.reroute is not None, self.torch_threads))
        threading.Thread(target=self._read, name="dlp-engine-process-reader", daemon=True).start()
        # The child builds the model and captures its graphs (minutes with torch.compile on
        # a GPU); it answers "ready", or fails and says why.
        await asyncio.wrap_future(self._ready)
        self._alive = True

    async def _accept(self, listener: Listener, address: str, key: bytes) -> Connection:
        """The child's connection; a child that dies on start-up is noticed, not waited for."""
        accepting = asyncio.ensure_future(asyncio.to_thread(listener.accept))
        while True:
            done, _ = await asyncio.wait({accepting}, timeout=0.5)
            if done:
                return accepting.result()
            assert self._proc is not None
            if self._proc.poll() is not None:
                # Closing the socket does not wake a thread blocked in accept(); a connection
                # of our own does, so no thread is left behind.
                with contextlib.suppress(Exception):
                    Client(address, family="AF_UNIX", authkey=key).close()
                with contextlib.suppress(Exception):
                    (await accepting).close()
                raise DlpError(
                    f"engine process exited with code {self._proc.returncode} on start-up"
                )

    async def stop(self) -> None:
        """Stop the child; requests still running end as they would in-process (error)."""
        if self._proc is None:
            return
        self._stopping = True
        with contextlib.suppress(DlpError):
            self._send(("stop",))
        try:
            await asyncio.to_thread(self._proc.wait, 30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            await asyncio.to_thread(self._proc.wait)
        self._alive = False
        if self._conn is not None:
            self._conn.close()
        self._fail_all(DlpError("engine process stopped"))
        self._proc = None

    @property
    def running(self) -> bool:
        """True while the child is alive and its loop runs (health checks)."""
        return self._alive and self._proc is not None and self._proc.poll() is None

    async def __aenter__(self) -> EngineProcess:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ------------------------------------------------------------------ public API
    async def generate(self, request: GenerationRequest) -> GenerationResult:
        rid, pending = self._open(stream=False)
        try:
            self._send(("submit", rid, request, False))
            return await pending.future
        finally:
            self._close(rid)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Chunks as the child makes them; stopping early cancels the request there."""
        rid, pending = self._open(stream=True)
        try:
            self._send(("submit", rid, request, True))
            while True:
                item = await pending.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason is not None:
                    return
        finally:
            self._close(rid)

    def stats(self) -> dict[str, Any]:
        return self._call("stats")

    # ------------------------------------------------------------------ plumbing
    def _open(self, stream: bool) -> tuple[int, _Pending]:
        if not self.running:
            raise DlpError("engine process is not running")
        loop = asyncio.get_running_loop()
        pending = _Pending(loop=loop)
        if stream:
            pending.queue = asyncio.Queue()
        else:
            pending.future = loop.create_future()
        rid = next(self._ids)
        self._pending[rid] = pending
        return rid, pending

    def _close(self, rid: int) -> None:
        # Still pending here = the caller gave up (cancelled, broke off a stream): tell the
        # child, which cancels the request and frees its row.
        if self._pending.pop(rid, None) is not None and self.running:
            with contextlib.suppress(DlpError):
                self._send(("cancel", rid))

    def _send(self, msg: tuple) -> None:
        if self._conn is None:
            raise DlpError("engine process is not running")
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as exc:  # the child died since the last check: answer as for that
            raise DlpError(f"engine process is not running ({exc})") from None

    def _call(self, method: str, *args: Any) -> Any:
        if not self.running:
            raise DlpError("engine process is not running")
        cid = next(self._calls.ids)
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._calls.waiting[cid] = done
        try:
            self._send(("call", cid, method, args))
            return done.result(timeout=CALL_TIMEOUT_S)
        except concurrent.futures.TimeoutError:
            raise DlpError(f"engine process: no answer to {method} in {CALL_TIMEOUT_S} s") from None
        finally:
            self._calls.waiting.pop(cid, None)

    def _read(self) -> None:
        """Reader thread: every message from the child, to the future or queue it answers."""
        assert self._conn is not None
        try:
            while True:
                msg = self._conn.recv()
                self._dispatch(msg)
        except (EOFError, OSError):
            pass
        except Exception:  # a message that cannot be read: the child is unusable
            log.exception("engine process reader")
        self._alive = False
        if not self._ready.done():
            self._ready.set_exception(DlpError("engine process exited before it was ready"))
        if not self._stopping:
            log.error("engine process exited (code %s)", self._proc and self._proc.poll())
        self._fail_all(DlpError("engine process exited"))

    def _dispatch(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self._ready.set_result(None)
        elif kind == "failed":
            self._ready.set_exception(_rebuild_error(msg[1]))
        elif kind == "reply":
            _, cid, ok, value = msg
            waiter = self._calls.waiting.get(cid)
            if waiter is not None:
                if ok:
                    waiter.set_result(value)
                else:
                    waiter.set_exception(_rebuild_error(value))
        elif kind == "reroute":
            assert self._loop is not None
            asyncio.run_coroutine_threadsafe(self._reroute(msg[1], msg[2]), self._loop)
        else:  # chunk / result / error for one request
            _, rid, payload = msg
            # A request's last message ends it here, so closing it sends no cancel.
            final = kind != "chunk" or payload.finish_reason is not None
            pending = self._pending.pop(rid, None) if final else self._pending.get(rid)
            if pending is not None:
                pending.loop.call_soon_threadsafe(_deliver, pending, kind, payload)

    async def _reroute(self, cid: int, text: str) -> None:
        try:
            mix = await self.reroute(text)
            reply = ("reroute_reply", cid, True, mix.as_dict())
        except Exception as exc:
            reply = ("reroute_reply", cid, False, _error_info(exc))
        with contextlib.suppress(DlpError):
            self._send(reply)

    def _fail_all(self, exc: DlpError) -> None:
        for pending in list(self._pending.values()):
            with contextlib.suppress(RuntimeError):  # a loop already closed
                pending.loop.call_soon_threadsafe(_deliver, pending, "error", exc)
        for waiter in list(self._calls.waiting.values()):
            if not waiter.done():
                waiter.set_exception(exc)


def _deliver(pending: _Pending, kind: str, payload: Any) -> None:
    error = payload if isinstance(payload, BaseException) else None
    if kind == "error" and error is None:
        error = _rebuild_error(payload)
    if pending.future is not None:
        if pending.future.done():
            return
        if error is not None:
            pending.future.set_exception(error)
        else:
            pending.future.set_result(payload)
    elif pending.queue is not None:
        pending.queue.put_nowait(error if error is not None else payload)


# ---------------------------------------------------------------------- the child
class _Child:
    """The child's side: one engine, its requests by the parent's ids."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.engine: Any = None
        self.tasks: dict[int, asyncio.Task] = {}
        self.calls: set[asyncio.Task] = set()
        self.reroutes: dict[int, asyncio.Future] = {}
        self.reroute_ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None

    def send(self, msg: tuple) -> None:
        self.conn.send(msg)

    async def run(self) -> None:
        import torch

        from dlp.engine.engine import Engine

        self.loop = asyncio.get_running_loop()
        config, has_reroute, torch_threads = self.conn.recv()
        if torch_threads:
            torch.set_num_threads(torch_threads)
        try:
            reroute = self.reroute if has_reroute else None
            self.engine = await asyncio.to_thread(Engine.from_config, config, reroute)
            await self.engine.start()
        except Exception as exc:
            log.exception("engine process start-up")
            self.send(("failed", _error_info(exc)))
            return
        inbox: asyncio.Queue = asyncio.Queue()
        threading.Thread(target=self._read, args=(inbox,), daemon=True).start()
        self.send(("ready",))
        try:
            while True:
                msg = await inbox.get()
                if msg is None or msg[0] == "stop":
                    break
                self._handle(msg)
        finally:
            for task in self.tasks.values():
                task.cancel()
            await self.engine.stop()

    def _read(self, inbox: asyncio.Queue) -> None:
        assert self.loop is not None
        try:
            while True:
                msg = self.conn.recv()
                self.loop.call_soon_threadsafe(inbox.put_nowait, msg)
        except (EOFError, OSError):  # the parent is gone: stop
            self.loop.call_soon_threadsafe(inbox.put_nowait, None)

    def _handle(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "submit":
            _, rid, request, stream = msg
            self.tasks[rid] = asyncio.ensure_future(self._serve(rid, request, stream))
        elif kind == "cancel":
            task = self.tasks.pop(msg[1], None)
            if task is not None:
                task.cancel()
        elif kind == "call":
            task = asyncio.ensure_future(self._answer(*msg[1:]))
            self.calls.add(task)  # held until done (the loop keeps only weak references)
            task.add_done_callback(self.calls.discard)
        elif kind == "reroute_reply":
            _, cid, ok, value = msg
            waiter = self.reroutes.pop(cid, None)
            if waiter is not None and not waiter.done():
                if ok:
                    waiter.set_result(AdapterMix.from_weights(value))
                else:
                    waiter.set_exception(_rebuild_error(value))

    async def _serve(self, rid: int, request: GenerationRequest, stream: bool) -> None:
        """One request: its chunks as they come (stream) or its result, or its error."""
        chunks = self.engine.generate_stream(request) if stream else None
        try:
            if chunks is not None:
                async for chunk in chunks:
                    self.send(("chunk", rid, chunk))
            else:
                self.send(("result", rid, await self.engine.generate(request)))
        except asyncio.CancelledError:  # the parent gave up: the engine frees the row
            pass
        except Exception as exc:
            self.send(("error", rid, _error_info(exc)))
        finally:
            if chunks is not None:
                await chunks.aclose()
            self.tasks.pop(rid, None)

    async def _answer(self, cid: int, method: str, args: tuple) -> None:
        try:
            if method == "stats":
                value = self.engine.stats()
            elif method == "pool.stats":
                value = self.engine.pool.stats()
            elif method == "pool.register":
                value = await asyncio.to_thread(self.engine.pool.register, *args)
            else:
                raise DlpError(f"engine process: no call {method!r}")
            self.send(("reply", cid, True, value))
        except Exception as exc:
            self.send(("reply", cid, False, _error_info(exc)))

    async def reroute(self, text: str) -> AdapterMix:
        """The engine's sentence-routing callback: the router is the parent's."""
        assert self.loop is not None
        cid = next(self.reroute_ids)
        waiter = self.loop.create_future()
        self.reroutes[cid] = waiter
        self.send(("reroute", cid, text))
        return await waiter


def _child_main(address: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s engine-process %(message)s")
    key = bytes.fromhex(os.environ.pop(_AUTHKEY_ENV))
    conn = Client(address, family="AF_UNIX", authkey=key)
    asyncio.run(_Child(conn).run())


if __name__ == "__main__":
    _child_main(sys.argv[1])
