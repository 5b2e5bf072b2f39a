"""ExportStatement in pages: the pages concatenated are exactly the one-response export."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest
from google.protobuf import timestamp_pb2

from points.v1 import admin_pb2, admin_pb2_grpc, points_pb2, points_pb2_grpc
from tests.harness import add_merchant

pytestmark = pytest.mark.timeout(120)


def _export_pages(clearing, period_id: int, merchant_id: str, page_size: int) -> tuple[bytes, list[int]]:
    csv, sizes, token = b"", [], ""
    while True:
        page = clearing.ExportStatement(
            admin_pb2.ExportStatementRequest(
                period_id=period_id, merchant_id=merchant_id, page_size=page_size, page_token=token
            )
        )
        csv += page.csv
        sizes.append(page.lines)
        token = page.next_page_token
        if not token:
            return csv, sizes


def test_export_pages_concatenate_to_the_whole_export(service):
    merchants = [f"exp-{i}" for i in range(5)]
    for merchant in merchants:
        add_merchant(service.database_url, merchant, 1000)
    with service.channel() as channel:
        points = points_pb2_grpc.PointsServiceStub(channel)
        clearing = admin_pb2_grpc.ClearingStub(channel)
        for i in range(7):
            points.Earn(
                points_pb2.EarnRequest(
                    merchant_id="exp-0",
                    member_id=f"member-{i}",
                    purchase_amount=1_000 * (i + 1),
                    idempotency_key=f"e-{i}",
                )
            )
        for merchant in merchants[1:]:
            points.Earn(
                points_pb2.EarnRequest(
                    merchant_id=merchant, member_id="member-0", purchase_amount=500, idempotency_key=f"e-{merchant}"
                )
            )
        cut_off = timestamp_pb2.Timestamp()
        cut_off.FromDatetime(dt.datetime.now(dt.timezone.utc))
        period = clearing.CloseSettlementPeriod(admin_pb2.CloseSettlementPeriodRequest(cut_off=cut_off))

        for merchant_id, data_lines in (("", 5), ("exp-0", 7)):
            whole = clearing.ExportStatement(
                admin_pb2.ExportStatementRequest(period_id=period.period_id, merchant_id=merchant_id)
            )
            assert whole.lines == data_lines and not whole.next_page_token
            assert len(whole.csv.decode().splitlines()) == data_lines + 1  # the header, then the lines
            paged, sizes = _export_pages(clearing, period.period_id, merchant_id, page_size=2)
            assert paged == whole.csv
            assert sizes == [2] * (data_lines // 2) + ([data_lines % 2] if data_lines % 2 else [])

        with pytest.raises(grpc.RpcError) as raised:
            clearing.ExportStatement(admin_pb2.ExportStatementRequest(period_id=period.period_id, page_size=-1))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as raised:
            clearing.ExportStatement(
                admin_pb2.ExportStatementRequest(
                    period_id=period.period_id, merchant_id="exp-0", page_size=2, page_token="bm9wZQ=="
                )
            )
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
