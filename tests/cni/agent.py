"""A real :class:`cni.server.CniServer` on its own event loop thread, with a recording handler, for
tests that drive the plugin as the container runtime does (blocking subprocesses).

The handler stands in for the node agent's enrollment (wired later): it records every event and
answers per pod name from ``script`` (default: ADD/CHECK enrolled, DEL not-enrolled). A ``gate`` makes
ADD wait until the test releases it, to show that the plugin returns only after the agent did."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cni.protocol import EnrollResult, PodEvent
from cni.server import CniServer

T = TypeVar("T")


@dataclass
class RecordingHandler:
    script: dict[str, EnrollResult] = field(default_factory=dict)
    delay_s: dict[str, float] = field(default_factory=dict)
    events: list[PodEvent] = field(default_factory=list)
    gate: asyncio.Event | None = None
    entered: threading.Event = field(default_factory=threading.Event)
    enrolled: set[tuple[str, str]] = field(default_factory=set)

    async def _answer(self, pod: PodEvent, default: EnrollResult) -> EnrollResult:
        self.events.append(pod)
        self.entered.set()
        name = pod.pod.name or ""
        if name in self.delay_s:
            await asyncio.sleep(self.delay_s[name])
        return self.script.get(name, default)

    async def add(self, pod: PodEvent) -> EnrollResult:
        if self.gate is not None:
            self.entered.set()
            await self.gate.wait()
        res = await self._answer(pod, EnrollResult.enrolled("captured"))
        if res.status == "enrolled":
            self.enrolled.add(pod.key)
        return res

    async def del_(self, pod: PodEvent) -> EnrollResult:
        res = await self._answer(pod, EnrollResult.not_enrolled("removed"))
        if res.status != "error":
            self.enrolled.discard(pod.key)
        return res

    async def check(self, pod: PodEvent) -> EnrollResult:
        default = (EnrollResult.enrolled() if pod.key in self.enrolled
                   else EnrollResult.error(f"container {pod.container_id} is not in capture"))
        return await self._answer(pod, default)

    def ops(self) -> list[tuple[str, str]]:
        return [(e.op, e.container_id) for e in self.events]


class AgentThread:
    """Runs a CniServer until stopped; ``call`` runs a coroutine on its loop from the test thread."""

    def __init__(self, handler: RecordingHandler, path: str, **kw: object) -> None:
        self.handler = handler
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = CniServer(handler, path, **kw)  # type: ignore[arg-type]
        self._thread = threading.Thread(target=self.loop.run_forever, name="cni-agent", daemon=True)

    def start(self) -> AgentThread:
        self._thread.start()
        self.call(self.server.start())
        return self

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def open_gate(self) -> None:
        async def mk() -> None:
            self.handler.gate = asyncio.Event()
        self.call(mk())

    def release_gate(self) -> None:
        gate = self.handler.gate
        assert gate is not None
        self.loop.call_soon_threadsafe(gate.set)

    def stop(self) -> None:
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@contextmanager
def running_agent(path: str, handler: RecordingHandler | None = None, **kw: object) -> Iterator[AgentThread]:
    agent = AgentThread(handler or RecordingHandler(), path, **kw).start()
    try:
        yield agent
    finally:
        agent.stop()
