"""Service.stop's drain: refuses calls for shutdown_drain_seconds, longer while calls keep arriving
(each refusal restarts the quiet period), never past half the grace."""

from __future__ import annotations

import asyncio
import time
import types

from processor.server import Service


def _service(drain_seconds: float) -> types.SimpleNamespace:
    return types.SimpleNamespace(
        settings=types.SimpleNamespace(shutdown_drain_seconds=drain_seconds),
        pipeline=types.SimpleNamespace(last_drain_refusal=0.0),
    )


async def _drained_after(service, grace: float, refusals_for: float) -> float:
    """Seconds the drain took while a call was refused every 20 ms for `refusals_for` seconds."""

    async def arrivals() -> None:
        end = time.monotonic() + refusals_for
        while time.monotonic() < end:
            service.pipeline.last_drain_refusal = time.monotonic()
            await asyncio.sleep(0.02)

    feeder = asyncio.ensure_future(arrivals())
    started = time.monotonic()
    await Service._drain(service, grace)
    took = time.monotonic() - started
    feeder.cancel()
    return took


def test_a_quiet_drain_lasts_the_drain_seconds():
    took = asyncio.run(_drained_after(_service(0.2), grace=20, refusals_for=0))
    assert 0.2 <= took < 1.5


def test_the_drain_lasts_while_calls_keep_arriving():
    took = asyncio.run(_drained_after(_service(0.2), grace=20, refusals_for=0.6))
    assert took >= 0.7  # the last refusal at ~0.58 s, then 0.2 s quiet (a fixed drain: 0.2 s)


def test_the_drain_stops_at_half_the_grace_however_busy():
    took = asyncio.run(_drained_after(_service(0.2), grace=1.0, refusals_for=10))
    assert 0.5 <= took < 2.5


def test_no_grace_no_drain():
    took = asyncio.run(_drained_after(_service(0.5), grace=0, refusals_for=0))
    assert took < 0.4
