"""The change feed published to NATS JetStream (--events-nats-url): every event WatchEvents gives, in
feed order, to one stream (--events-nats-stream), on subject `points.events.<merchant_id>` (a
transaction) or `points.members.<event type>` (a member event), with the event's id as `Nats-Msg-Id`.

Exactly once: the publisher reads the feed after its cursor (events_publish_cursor, in Postgres),
publishes each event and waits for the broker's ack before the next (so the stream holds them in feed
order), and stores the cursor only after every event up to it was acknowledged. A crash or a broker
restart therefore republishes from the stored cursor at most the events published since, and the
broker drops those as duplicates of their Nats-Msg-Id within the stream's duplicate window
(--events-nats-duplicate-window-seconds; a service down longer than that with an unstored cursor could
duplicate: the window is set well above a restart's time). Nothing is lost: the cursor never passes an
event the broker did not acknowledge.

The payload is the protobuf points.v1.Event (Content-Type application/protobuf), as WatchEvents sends it.
"""

from __future__ import annotations

import asyncio
import logging

import asyncpg
import nats
from nats.js import api as jetstream_api
from nats.js.errors import NotFoundError

from processor import events, metrics
from processor.config import Settings
from processor.events_servicer import event_message

log = logging.getLogger("points.events.nats")

PUBLISHER = "nats"  # events_publish_cursor.publisher
SUBJECTS = ("points.events.>", "points.members.>")
LAG_EVENTS_COUNTED_MAX = 1_000_000  # the lag count stops here: a count past it costs more than it tells
LAG_REFRESH_SECONDS = 2.0
RETRY_SECONDS_MAX = 5.0


def subject(event: events.FeedEvent) -> str:
    if event.type == events.TRANSACTION:
        return f"points.events.{event.merchant_id}"
    return f"points.members.{event.type}"


async def stored_cursor(pool: asyncpg.Pool) -> events.Position:
    """The position of the last event the broker acknowledged (the start if none)."""
    async with pool.acquire() as connection:
        await connection.execute(
            "INSERT INTO events_publish_cursor (publisher) VALUES ($1) ON CONFLICT DO NOTHING", PUBLISHER
        )
        row = await connection.fetchrow(
            "SELECT transaction_id, member_event_id FROM events_publish_cursor WHERE publisher = $1", PUBLISHER
        )
    return events.Position(row["transaction_id"], row["member_event_id"])


async def store_cursor(pool: asyncpg.Pool, position: events.Position) -> None:
    """Advances the stored cursor (never back: a position the broker acknowledged stays acknowledged)."""
    await pool.execute(
        """UPDATE events_publish_cursor SET transaction_id = $2, member_event_id = $3, published_at = now()
           WHERE publisher = $1 AND (transaction_id, member_event_id) <= ($2, $3)""",
        PUBLISHER,
        position.transaction_id,
        position.member_event_id,
    )


async def lag(pool: asyncpg.Pool, position: events.Position) -> tuple[int, float]:
    """(events after `position`, counted up to LAG_EVENTS_COUNTED_MAX; seconds since the oldest of them
    committed, 0 if none)."""
    row = await pool.fetchrow(
        """SELECT (SELECT count(*) FROM (SELECT 1 FROM transactions WHERE transaction_id > $1 LIMIT $3) t)
                + (SELECT count(*) FROM (SELECT 1 FROM member_events
                                         WHERE (after_transaction_id, member_event_id) > ($1, $2) LIMIT $3) m)
                  AS events,
                  least((SELECT created_at FROM transactions WHERE transaction_id > $1
                         ORDER BY transaction_id LIMIT 1),
                        (SELECT committed_at FROM member_events WHERE (after_transaction_id, member_event_id) > ($1, $2)
                         ORDER BY after_transaction_id, member_event_id LIMIT 1)) AS oldest,
                  now() AS now""",
        position.transaction_id,
        position.member_event_id,
        LAG_EVENTS_COUNTED_MAX,
    )
    oldest = row["oldest"]
    seconds = max(0.0, (row["now"] - oldest).total_seconds()) if oldest is not None else 0.0
    return min(row["events"], LAG_EVENTS_COUNTED_MAX), seconds


async def _connection_error(error: Exception) -> None:
    log.warning("NATS connection error", extra={"error": repr(error)})


async def _disconnected() -> None:
    log.warning("NATS disconnected; reconnecting (the change feed is published from the stored cursor)")


async def _reconnected() -> None:
    log.info("NATS reconnected")


class EventsPublisher:
    """Publishes the feed to JetStream until stopped; reconnects and resumes from the stored cursor."""

    def __init__(self, settings: Settings, pool: asyncpg.Pool, signal: events.FeedSignal):
        self.settings = settings
        self.pool = pool
        self.signal = signal
        self.published = events.START  # the stored cursor, as this publisher last wrote or read it
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name="events-nats-publisher"),
            loop.create_task(self._measure_lag(), name="events-nats-lag"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _run(self) -> None:
        delay = 0.1
        while True:
            connection = None
            try:
                connection = await nats.connect(
                    servers=[url.strip() for url in self.settings.events_nats_url.split(",")],
                    name="points-processor-events",
                    connect_timeout=self.settings.events_nats_ack_timeout_seconds,
                    allow_reconnect=True,
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    # one line each, not nats-py's tracebacks: a broker restart is an expected event
                    error_cb=_connection_error,
                    disconnected_cb=_disconnected,
                    reconnected_cb=_reconnected,
                )
                jetstream = connection.jetstream(timeout=self.settings.events_nats_ack_timeout_seconds)
                await self._ensure_stream(jetstream)
                log.info(
                    "publishing the change feed to NATS JetStream", extra={"stream": self.settings.events_nats_stream}
                )
                delay = 0.1
                await self._publish(jetstream)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # the broker away or restarting, or Postgres: resume from the stored cursor
                metrics.events_publish_failures.inc()
                log.warning("change feed publish to NATS failed; retrying", extra={"error": repr(error)})
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_SECONDS_MAX)
            finally:
                if connection is not None:
                    try:
                        await connection.close()
                    except Exception:  # noqa: BLE001 - a connection already broken; nothing to close
                        pass

    async def _ensure_stream(self, jetstream) -> None:
        """Creates the stream if missing (an operator may have made it, with their own limits: kept)."""
        try:
            await jetstream.stream_info(self.settings.events_nats_stream)
        except NotFoundError:
            await jetstream.add_stream(
                jetstream_api.StreamConfig(
                    name=self.settings.events_nats_stream,
                    subjects=list(SUBJECTS),
                    storage=jetstream_api.StorageType.FILE,
                    duplicate_window=self.settings.events_nats_duplicate_window_seconds,
                )
            )

    async def _publish(self, jetstream) -> None:
        settings = self.settings
        position = self.published = await stored_cursor(self.pool)
        everything = events.FeedFilter()
        while True:
            page = await events.read_page(
                self.pool,
                position,
                everything,
                settings.events_nats_batch_events_max,
                settings.events_scan_transactions_max,
            )
            for event in page.events:
                # one at a time, each acknowledged before the next: the stream holds them in feed order
                ack = await jetstream.publish(
                    subject(event),
                    event_message(event).SerializeToString(),
                    timeout=settings.events_nats_ack_timeout_seconds,
                    stream=settings.events_nats_stream,
                    headers={
                        "Nats-Msg-Id": event.event_id,
                        "Points-Cursor": event.cursor,
                        "Content-Type": "application/protobuf; proto=points.v1.Event",
                    },
                )
                if ack.duplicate:  # published before a crash, its cursor not stored: the broker dropped it
                    metrics.events_publish_duplicates.inc()
                else:
                    metrics.events_published.inc()
            if page.position != position:
                await store_cursor(self.pool, page.position)  # every event up to it is acknowledged
                position = self.published = page.position
            if page.at_head:
                metrics.events_publish_lag_events.set(0)
                metrics.events_publish_lag_seconds.set(0)
                await self.signal.wait(settings.events_poll_seconds)

    async def _measure_lag(self) -> None:
        """The lag gauges from Postgres, also while the broker is away (when they grow)."""
        while True:
            try:
                count, seconds = await lag(self.pool, self.published)
                metrics.events_publish_lag_events.set(count)
                metrics.events_publish_lag_seconds.set(seconds)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # Postgres away: the service's own health says so
                log.debug("publish lag not measured", extra={"error": repr(error)})
            await asyncio.sleep(LAG_REFRESH_SECONDS)
