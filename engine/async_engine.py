"""Runs LLMEngine in its own thread; each request gets an asyncio queue of its RequestOutputs.

The HTTP side only enqueues commands (add, abort) and awaits its queue, so it never blocks generation;
the engine thread owns the LLMEngine and is the only one touching it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable

from engine.failures import RequestFailedError
from engine.llm_engine import LLMEngine, RequestOutput
from engine.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class EngineOverloadedError(RuntimeError):
    """Too many requests are waiting; the server answers 503."""


class EngineDeadError(RuntimeError):
    """The engine loop died; every request in flight answers 503 and the process is about to exit."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, *, on_fatal: Callable[[BaseException], None] | None = None):
        """`on_fatal` is called (on the engine thread) once the loop has died; the server exits the process."""
        self.engine = engine
        self.on_fatal = on_fatal
        self._commands: deque = deque()
        self._wakeup = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self.error: BaseException | None = None
        self._fail_lock = threading.Lock()
        workers = getattr(engine, "workers", None)
        if workers is not None:  # a tensor-parallel worker dying breaks the engine even while it is idle
            workers.on_death(self.fail)

    @classmethod
    def on_own_thread(cls, make_engine: Callable[[], LLMEngine], *,
                      on_fatal: Callable[[BaseException], None] | None = None) -> AsyncEngine:
        """Build the engine with `make_engine` on a new thread and run its loop there (started: `start` is
        not needed); what `make_engine` raises is raised here.

        Loading and stepping must happen on one thread: every thread that runs a parallel torch op keeps an
        OpenMP team of its own, and once libgomp manages more threads than there are CPUs it stops spinning
        between parallel regions, so each of a step's ~500 parallel kernels waits on a futex wake-up. A model
        loaded on the main thread and stepped on another decoded at 20-24 tok/s instead of 55 on 2 cores
        (bench/RESULTS.md, ENGINE-CPU)."""
        built: queue.Queue = queue.Queue()

        def run() -> None:
            try:
                async_engine = cls(make_engine(), on_fatal=on_fatal)
            except BaseException as exc:  # noqa: BLE001 - raised on the caller's thread
                built.put(exc)
                return
            async_engine._thread = threading.current_thread()
            built.put(async_engine)
            async_engine._loop()

        threading.Thread(target=run, name="engine-loop", daemon=True).start()
        result = built.get()
        if isinstance(result, BaseException):
            raise result
        return result

    def start(self) -> None:
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wakeup.set()
        self._thread.join(timeout=10)
        close = getattr(self.engine, "close", None)
        if close is not None:
            close()

    @property
    def healthy(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_pending(self) -> int:
        return len(self.engine.scheduler.waiting) + len(self._commands)

    def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, *,
                 cache_salt: str | None = None) -> AsyncIterator[RequestOutput]:
        """Submit a request (validation and overload errors raise here, before any output) and return
        the stream of its outputs; leaving the stream early (client disconnect) aborts the request."""
        return self.generate_many([(request_id, prompt_token_ids)], params, cache_salt=cache_salt)[0]

    def embed(self, request_id: str, inputs: list[list[int]], params) -> AsyncIterator:
        """An EmbeddingEngine's request (every input's token ids, EmbeddingParams): its one output, the
        vectors, comes on the stream as a generation's last output does."""
        return self.generate_many([(request_id, inputs)], params)[0]

    def generate_many(self, requests: list[tuple[str, list[int]]], params: SamplingParams, *,
                      cache_salt: str | None = None) -> list[AsyncIterator[RequestOutput]]:
        """Submit several requests (request id, prompt token ids) together, so the engine admits them in
        the same step: all of them or, when one is invalid or the queue cannot take them all, none."""
        if not self.healthy:
            raise EngineDeadError(f"The engine is not running ({self.error!r}); it is being restarted. Please retry.")
        if self.num_pending + len(requests) > self.engine.config.max_waiting_requests:
            raise EngineOverloadedError("too many requests are waiting; retry later")
        for _, prompt_token_ids in requests:
            self.engine.check_prompt(prompt_token_ids, params)
        loop = asyncio.get_running_loop()
        streams = []
        for request_id, _ in requests:
            queue: asyncio.Queue = asyncio.Queue()
            self._streams[request_id] = (loop, queue)
            streams.append(self._stream(request_id, queue))
        self._commands.append(("add", list(requests), params, cache_salt))  # one command: one step admits all
        self._wakeup.set()
        return streams

    async def _stream(self, request_id: str, queue: asyncio.Queue) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.append(("abort", request_id))
        self._wakeup.set()

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is not None:
            loop, queue = stream
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _apply_commands(self) -> None:
        engine = self.engine
        while self._commands:
            command = self._commands.popleft()
            if command[0] == "abort":
                engine.abort(command[1])
                continue
            _, requests, params, salt = command
            for request_id, token_ids in requests:
                if request_id not in self._streams:
                    continue  # the client left before the engine saw it
                try:
                    engine.add_request(request_id, token_ids, params, cache_salt=salt)
                except Exception as exc:  # noqa: BLE001 - handed to the waiting client
                    self._deliver(request_id, exc)

    def _loop(self) -> None:
        engine = self.engine
        try:
            while not self._stop:
                self._apply_commands()
                if not engine.has_unfinished():
                    self._wakeup.wait()
                    self._wakeup.clear()
                    continue
                for out in engine.step():
                    if out.error is not None:
                        self._deliver(out.request_id, RequestFailedError(
                            f"The engine failed while generating this response ({out.error}). Please retry."))
                    else:
                        self._deliver(out.request_id, out)
        except BaseException as exc:
            log.exception("engine loop crashed: the engine is unhealthy")
            self.fail(exc)

    def fail(self, exc: BaseException) -> None:
        """The engine is broken (its loop crashed, or a tensor-parallel worker died, maybe while the loop
        waits in a collective that never returns): every request in flight and every new one answers 503,
        and `on_fatal` runs, once."""
        with self._fail_lock:
            if self.error is not None:
                return
            self.error = exc
        for request_id in list(self._streams):
            self._deliver(request_id, EngineDeadError(f"The engine failed ({exc!r}) and is restarting. Please retry."))
        if self.on_fatal is not None:
            self.on_fatal(exc)
