"""The front's decode threads, shared fairly between clients.

Decoding and resizing uploads is the front's heavy work, and it runs on a few threads beside the event loop. Handed
out first come, first served, those threads belong to whoever sends the most: twelve requests of wide images once
held every other ``/embed`` for a minute. Here each image is one job, and a free thread takes the next job by
start-time fair queueing (Goyal et al., 1996) over clients, with each job's cost its pixel count: the client that
has been served the least work recently goes next, so a client with one small image waits for at most one job per
busy thread, however much another client has queued. Inside one client (a client is an address, so everyone
behind one proxy or on this machine is one client) the requests take turns, one image each.

Jobs over ``heavy_cost`` (large images) may hold all threads but one, so a large upload never leaves small ones
with no thread at all. A job cannot be interrupted once started, which is why the per-image limits
(``serving.settings.Limits``) bound what one job may cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(eq=False)  # identity: two requests with equal jobs are still two requests
class _Job:
    cost: float
    fn: Callable[[], Any]
    future: asyncio.Future
    request: _Request


@dataclass(eq=False)
class _Request:
    client: str
    jobs: deque[_Job] = field(default_factory=deque)


@dataclass(eq=False)
class _Client:
    key: str
    order: int
    finish: float = 0.0
    """Virtual time at which the work handed to this client so far ends (its next job's start tag)."""
    requests: deque[_Request] = field(default_factory=deque)


class FairPool:
    """``threads`` worker threads whose jobs are picked fairly across clients (see the module docstring)."""

    def __init__(self, threads: int, heavy_cost: float, name: str = "mae-decode") -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads
        self.heavy_cost = heavy_cost
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=name)
        self._clients: dict[str, _Client] = {}
        self._order = itertools.count()
        self._vtime = 0.0
        self.running = 0
        self.running_heavy = 0

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread."""
        return sum(len(r.jobs) for c in self._clients.values() for r in c.requests)

    async def run(self, client: str, jobs: Sequence[tuple[float, Callable[[], T]]]) -> list[T]:
        """Run ``(cost, fn)`` jobs for ``client``; their results in order.

        The first job to raise ends the call with its exception, and the request's jobs that have not started
        are dropped (started ones finish on their thread; their results are discarded). So are they when the
        caller is cancelled.
        """
        loop = asyncio.get_running_loop()
        request = _Request(client)
        for cost, fn in jobs:
            request.jobs.append(_Job(float(cost), fn, loop.create_future(), request))
        futures = [job.future for job in request.jobs]
        if not futures:
            return []
        if client not in self._clients:
            self._clients[client] = _Client(client, next(self._order))
        self._clients[client].requests.append(request)
        self._dispatch()
        try:
            return [await f for f in futures]
        finally:
            self._withdraw(request)
            for f in futures:
                if not f.done():
                    f.cancel()
                elif not f.cancelled():
                    f.exception()  # retrieved: asyncio would otherwise log the ones nobody awaited

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ scheduling (event-loop thread only)

    def _dispatch(self) -> None:
        while self.running < self.threads:
            job = self._next_job()
            if job is None:
                return
            self._start(job)

    def _next_job(self) -> _Job | None:
        """The job to start: from the client with the smallest start tag whose next job may run now."""
        heavy_full = self.threads > 1 and self.running_heavy >= self.threads - 1
        for client in sorted(self._clients.values(), key=lambda c: (max(c.finish, self._vtime), c.order)):
            request = client.requests[0]
            job = request.jobs[0]
            if heavy_full and job.cost > self.heavy_cost:
                continue
            request.jobs.popleft()
            if request.jobs:
                client.requests.rotate(-1)  # the client's next request goes next: its requests take turns
            else:
                client.requests.popleft()
            if not client.requests:
                del self._clients[client.key]  # an idle client keeps no credit (nor debt) for later
            start = max(client.finish, self._vtime)
            client.finish = start + job.cost
            self._vtime = start
            return job
        return None

    def _start(self, job: _Job) -> None:
        loop = asyncio.get_running_loop()
        heavy = job.cost > self.heavy_cost
        self.running += 1
        self.running_heavy += heavy

        def finished(done: Future) -> None:  # on the worker thread: hand back to the loop
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody waits for the result
                loop.call_soon_threadsafe(self._finished, job, heavy, done)

        self._executor.submit(job.fn).add_done_callback(finished)

    def _finished(self, job: _Job, heavy: bool, done: Future) -> None:
        self.running -= 1
        self.running_heavy -= heavy
        if not job.future.done():
            if done.cancelled():
                job.future.cancel()
            elif done.exception() is not None:
                job.future.set_exception(done.exception())
                self._withdraw(job.request)  # before the next dispatch: its other images would be wasted work
            else:
                job.future.set_result(done.result())
        self._dispatch()

    def _withdraw(self, request: _Request) -> None:
        """Forget a request's jobs that have not started."""
        request.jobs.clear()
        client = self._clients.get(request.client)
        if client is not None and request in client.requests:
            client.requests.remove(request)
            if not client.requests:
                del self._clients[request.client]
