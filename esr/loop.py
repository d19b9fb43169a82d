"""The one loop every recorder runs in: `esr daemon`, `esr run` without a
daemon, and the benchmark's esr consumer.

It keeps the recorder writing: a batch is taken when the drain holds enough
records to be worth it, and at least every flush_interval_ms while a session
is open, whatever else the loop serves at the same time (the daemon's control
socket, esr run's command, the benchmark's pipe). With no session open it
sleeps until the recorder has something to do (Recorder.next_flush_s). It is
an asyncio loop, so what each caller adds is a coroutine, readers and signal
handlers.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

from esr.recorder import Recorder


class RecordingLoop:
    def __init__(self, recorder: Recorder):
        self.recorder = recorder
        self.loop = asyncio.new_event_loop()
        self._after_flush: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        recorder.on_open.append(self.wake)

    def after_flush(self, callback: Callable[[], None]) -> None:
        """Call back after every flush: sessions may have ended in it."""
        self._after_flush.append(callback)

    def flush(self) -> None:
        self.recorder.flush()
        for callback in self._after_flush:
            callback()

    def _tick(self) -> None:
        self._timer = None  # it fired: nothing to cancel
        self.flush()
        self._schedule(self.recorder.next_flush_s())

    def _schedule(self, delay: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None if delay is None else self.loop.call_later(delay, self._tick)

    def wake(self) -> None:
        """A session opened: flush when the recorder says, if that is sooner."""
        delay = self.recorder.next_flush_s()
        if delay is not None and (
            self._timer is None or self._timer.when() > self.loop.time() + delay
        ):
            self._schedule(delay)

    def run(self, main: Coroutine[Any, Any, Any]) -> Any:
        """Record while main runs; its result."""
        probe = self.recorder.probe
        if probe is not None:
            self.loop.add_reader(probe.fileno(), self.flush)
        self._schedule(self.recorder.next_flush_s())
        try:
            return self.loop.run_until_complete(main)
        finally:
            if self._timer is not None:
                self._timer.cancel()
            if probe is not None:
                self.loop.remove_reader(probe.fileno())

    def close(self) -> None:
        self.loop.close()
