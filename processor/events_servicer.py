"""points.v1.EventsService: the change feed over gRPC (proto ⇄ processor/events.py, nothing else).

A stream is a producer and the caller: the producer reads pages of the feed from Postgres into a
buffer of at most --events-stream-buffer-events-max events and, once at the head, waits for the
committer's wake-up (or --events-poll-seconds); the handler hands the buffered events to gRPC, which
sends them as the caller's flow-control window allows. A caller that takes nothing while the buffer
stays full for --events-stream-stall-seconds-max is cut off: the stream ends RESOURCE_EXHAUSTED with
the cursor of the last event handed to gRPC (the caller receives every event before the status, so it
resumes from that cursor and loses and repeats nothing)."""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import AsyncIterator

from google.protobuf import timestamp_pb2

from points.v1 import events_pb2, events_pb2_grpc
from processor import events, kinds, metrics, rpc
from processor.config import Settings
from processor.domain import Code, Rejection, format_authorization_id, format_transaction_id
from processor.errors import rejection_status, status

log = logging.getLogger("points.events")

EVENT_TYPES = {
    events.TRANSACTION: events_pb2.EVENT_TYPE_TRANSACTION,
    events.LEVEL_CHANGED: events_pb2.EVENT_TYPE_LEVEL_CHANGED,
    events.POINTS_EXPIRING: events_pb2.EVENT_TYPE_POINTS_EXPIRING,
    events.FROZEN: events_pb2.EVENT_TYPE_MEMBER_FROZEN,
    events.UNFROZEN: events_pb2.EVENT_TYPE_MEMBER_UNFROZEN,
    events.MERGED: events_pb2.EVENT_TYPE_MEMBER_MERGED,
    events.CLOSED: events_pb2.EVENT_TYPE_MEMBER_CLOSED,
}
TYPE_NAMES = {proto: name for name, proto in EVENT_TYPES.items()}
if set(EVENT_TYPES) != set(events.EVENT_TYPES) or set(TYPE_NAMES) != set(events_pb2.EventType.values()) - {
    events_pb2.EVENT_TYPE_UNSPECIFIED
}:  # checked at import: a type added in one place and not the other fails at start
    raise ImportError("events_servicer.EVENT_TYPES must map every feed event type to its EventType")
FILTER_IDS_MAX = 1000  # merchant_ids / member_ids one filter may name


def _timestamp(moment) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(moment)
    return stamp


def event_message(event: events.FeedEvent) -> events_pb2.Event:
    """The proto of one feed event (WatchEvents and the NATS publisher send the same)."""
    message = events_pb2.Event(
        event_id=event.event_id,
        cursor=event.cursor,
        type=EVENT_TYPES[event.type],
        committed_at=_timestamp(event.committed_at),
        member_id=event.member_id,
    )
    row = event.transaction
    detail = event.detail
    if row is not None:
        transaction = message.transaction
        transaction.transaction_id = format_transaction_id(row.transaction_id)
        transaction.kind = kinds.kind(row.kind).proto  # type: ignore[assignment]
        transaction.merchant_id = row.merchant_id
        transaction.amount_point_units = row.amount
        transaction.member_points_delta_point_units = row.member_points_delta
        transaction.member_vouchers_delta_voucher_units = row.member_vouchers_delta
        transaction.purchase_amount = row.purchase_amount
        transaction.fee_point_units = row.fee
        if row.member_balance_after is not None:
            transaction.member_balance_after_point_units = row.member_balance_after
        if row.authorization_id is not None:
            transaction.authorization_id = format_authorization_id(row.authorization_id)
        if row.original_transaction_id is not None:
            transaction.original_transaction_id = format_transaction_id(row.original_transaction_id)
    elif event.type == events.LEVEL_CHANGED:
        message.level_changed.from_level = str(detail.get("from_level", ""))
        message.level_changed.to_level = str(detail.get("to_level", ""))
        if detail.get("transaction_id") is not None:
            message.level_changed.transaction_id = format_transaction_id(int(detail["transaction_id"]))
    elif event.type == events.POINTS_EXPIRING:
        message.points_expiring.amount_point_units = int(detail.get("amount_point_units", 0))
        expires_at_us = int(detail.get("expires_at_us", 0))
        message.points_expiring.expires_at.seconds = expires_at_us // 1_000_000
        message.points_expiring.expires_at.nanos = (expires_at_us % 1_000_000) * 1000
        message.points_expiring.notice_days = int(detail.get("notice_days", 0))
    elif event.type in (events.FROZEN, events.UNFROZEN):
        message.member_frozen.frozen = event.type == events.FROZEN
        message.member_frozen.reason = str(detail.get("reason", ""))
    elif event.type == events.MERGED:
        message.member_merged.source_member_id = event.member_id
        message.member_merged.target_member_id = str(detail.get("target_member_id", ""))
    elif event.type == events.CLOSED:
        message.member_closed.reason = str(detail.get("reason", ""))
    return message


def feed_filter(request_filter: events_pb2.EventFilter, caller) -> events.FeedFilter:
    """What the caller may and asked to see. A merchant or gateway key: its merchants' transactions only."""
    if len(request_filter.merchant_ids) > FILTER_IDS_MAX or len(request_filter.member_ids) > FILTER_IDS_MAX:
        raise Rejection(
            Code.INVALID_ARGUMENT,
            f"a filter names at most {FILTER_IDS_MAX} merchants and {FILTER_IDS_MAX} members; open several streams",
            reason="INVALID_FIELD",
            field="filter",
        )
    merchants = frozenset(request_filter.merchant_ids) or None
    if caller is not None and caller.kind != "operator":
        own = caller.merchant_ids
        if merchants is None:
            merchants = own
        elif not merchants <= own:
            other = sorted(merchants - own)[0]
            raise Rejection(
                Code.PERMISSION_DENIED,
                f"this key may not read merchant {other}'s events; filter on its own merchants or leave "
                "merchant_ids empty",
                reason="KEY_NOT_PERMITTED",
                field="filter.merchant_ids",
            )
    types = None
    if request_filter.types:
        unknown = [t for t in request_filter.types if t not in TYPE_NAMES]
        if unknown:
            raise Rejection(
                Code.INVALID_ARGUMENT,
                f"filter.types has {unknown[0]}, not an EventType this feed sends",
                reason="INVALID_FIELD",
                field="filter.types",
            )
        types = frozenset(TYPE_NAMES[t] for t in request_filter.types)
    if caller is not None and caller.kind != "operator":
        types = frozenset({events.TRANSACTION})  # member events are the operator's
    return events.FeedFilter(merchants, frozenset(request_filter.member_ids) or None, types)


class EventsServicer(events_pb2_grpc.EventsServiceServicer):
    def __init__(self, settings: Settings, pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.streams_open = 0
        self.pool = None  # the feed's own asyncpg pool (--events-pool-connections-max), set once the database is up

    async def WatchEvents(self, request, context) -> AsyncIterator[events_pb2.WatchEventsResponse]:
        settings = self.settings
        try:
            position = events.decode_cursor(request.cursor)
            wanted = feed_filter(request.filter, rpc.principal.get())
            self.pipeline.ready_store()  # UNAVAILABLE while starting or recovering
            pool = self.pool
            if pool is None:
                raise Rejection(Code.UNAVAILABLE, "the service is starting; retry shortly")
            await events.check_cursor(pool, position)
            if self.streams_open >= settings.events_streams_max:
                raise Rejection(
                    Code.RESOURCE_EXHAUSTED,
                    f"the service has {self.streams_open} change-feed streams open, its limit; retry later",
                    reason="EVENTS_STREAMS_AT_CAPACITY",
                    retry_after_seconds=5.0,
                )
        except Rejection as rejection:
            await context.abort_with_status(rejection_status(rejection))
        self.streams_open += 1
        metrics.events_streams.inc()
        try:
            async for ready in self._follow(pool, position, wanted, context):
                yield events_pb2.WatchEventsResponse(events=[event_message(event) for event in ready])
        finally:
            self.streams_open -= 1
            metrics.events_streams.dec()

    async def _follow(self, pool, position: events.Position, wanted: events.FeedFilter, context):
        """Lists of the events after `position`, then of live ones, through a bounded buffer (see the
        module's docstring)."""
        settings = self.settings
        buffer: collections.deque[events.FeedEvent] = collections.deque()
        room = asyncio.Event()
        filled = asyncio.Event()
        ended: list[Rejection] = []  # why the producer stopped, if it did

        async def produce() -> None:
            at = position
            while True:
                free = settings.events_stream_buffer_events_max - len(buffer)
                if free <= 0:
                    room.clear()
                    try:
                        await asyncio.wait_for(room.wait(), settings.events_stream_stall_seconds_max)
                    except asyncio.TimeoutError:
                        # cut off here, whether or not the handler is blocked in a write (a caller that
                        # reads nothing holds it there): what is buffered is dropped, and the handler ends
                        # the stream once its write completes (the caller read again) or the call ends
                        metrics.events_streams_cut.inc()
                        buffer.clear()
                        ended.append(
                            Rejection(
                                Code.RESOURCE_EXHAUSTED,
                                "",
                                reason="EVENTS_READER_TOO_SLOW",
                                retry_after_seconds=0.0,
                            )
                        )
                        filled.set()
                        return
                    continue
                try:
                    page = await events.read_page(
                        pool,
                        at,
                        wanted,
                        min(settings.events_page_events_max, free),
                        settings.events_scan_transactions_max,
                    )
                except Exception as error:  # Postgres away: the caller resumes from its last cursor
                    log.warning("change feed read failed", extra={"error": repr(error)})
                    ended.append(Rejection(Code.UNAVAILABLE, "", retry_after_seconds=1.0))
                    filled.set()
                    return
                metrics.events_read.inc(len(page.events))
                at = page.position
                if page.events:
                    buffer.extend(page.events)
                    filled.set()
                if page.at_head:
                    await self.pipeline.feed_signal.wait(settings.events_poll_seconds)
                if self.pipeline.draining:  # shutting down: the caller resumes after the restart
                    ended.append(Rejection(Code.UNAVAILABLE, "", reason="SERVICE_UNAVAILABLE", retry_after_seconds=1.0))
                    filled.set()
                    return

        producer = asyncio.get_running_loop().create_task(produce(), name="events-stream")
        producer.add_done_callback(lambda _: filled.set())  # a producer that raised (a bug) ends the stream
        last_cursor = events.encode_cursor(position)
        try:
            while True:
                if ended:
                    why = ended[0]
                    if why.code is Code.RESOURCE_EXHAUSTED:
                        why.message = (
                            f"this stream's reader fell behind: {settings.events_stream_buffer_events_max} events "
                            f"waited {settings.events_stream_stall_seconds_max:g} s; resume with cursor "
                            f"{last_cursor} (the last event sent)"
                        )
                    elif why.reason == "SERVICE_UNAVAILABLE":
                        why.message = (
                            f"the service is shutting down; resume with cursor {last_cursor} (the last event sent)"
                        )
                    else:
                        why.message = f"the ledger database did not answer; resume with cursor {last_cursor} (the last event sent)"
                    await context.abort_with_status(
                        status(
                            why.code,
                            why.message,
                            reason=why.reason,
                            retry_after_seconds=why.retry_after_seconds,
                            metadata={"cursor": last_cursor},
                        )
                    )
                if not buffer:
                    if producer.done():
                        producer.result()  # raises the producer's error (answered INTERNAL)
                        raise RuntimeError("the change feed's producer stopped without saying why")
                    filled.clear()
                    await filled.wait()
                    continue
                # what is ready, in one message (a message per event costs gRPC more than the event)
                ready = [buffer.popleft() for _ in range(min(len(buffer), settings.events_page_events_max))]
                room.set()
                yield ready
                last_cursor = ready[-1].cursor
        finally:
            producer.cancel()
