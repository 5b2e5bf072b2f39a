"""The servicer's SubmitBatch build path with no await (issue 14 stage 3): earns and redeems built by
_earn_now/_redeem_now, ids checked against a bounded set of ids already found valid, keys checked by str
methods instead of a regex. Checked here against what the path before it built and refused: the same
Operation (as the keyword constructor made it), the same refusal (code and message) in the same order,
a merchant not in memory read from Postgres first. No database, no network: a stand-in pipeline."""

from __future__ import annotations

import asyncio
import string

import grpc
import pytest
from hypothesis import given, settings, strategies as st

from points.v1 import points_pb2 as pb
from processor import auth, domain, rpc, servicer as servicer_module
from processor.config import Settings
from processor.domain import Code, Method, Operation, Outcome, Rejection
from processor.servicer import _ID_PATTERN, _KEY_PATTERN, PointsServicer, Validator
from processor.state_machine import Merchants
from processor.store import MerchantRow


class _Program:
    program = None  # no program in force: no version requires member presence

    def version(self, now_us: int) -> None:
        return None


class _Call:
    def __init__(self, ops: list[Operation]) -> None:
        self.future = asyncio.get_running_loop().create_future()
        for op in ops:
            fields = {"transaction_id": 1, "points": op.points, "balance": 5, "available": 5}
            fields |= {"give_back_bps": 1_000, "created_at_us": 1_800_000_000_000_000, "released": 0}
            op.outcome = Outcome(Code.OK, fields)
        self.future.set_result(None)


class _Pipeline:
    """The pipeline as the servicer's write path reads it; `stored` are merchants only Postgres has."""

    def __init__(self, known: list[MerchantRow], stored: list[MerchantRow] = ()) -> None:
        self.merchants = Merchants(list(known))
        self.stored = {row.merchant_id: row for row in stored}
        self.program = _Program()
        self.ready = True
        self.reads: list[str] = []
        self.queued: list[Operation] = []

    def ready_store(self) -> object:
        if not self.ready:
            raise Rejection(Code.UNAVAILABLE, "the service is starting or recovering; retry shortly")
        return self

    async def merchant(self, merchant_id: str) -> MerchantRow | None:
        self.ready_store()
        self.reads.append(merchant_id)
        row = self.merchants.by_id.get(merchant_id) or self.stored.get(merchant_id)
        if row is not None:
            self.merchants.add(row)
        return row

    def enqueue_many(self, ops: list[Operation], answer: object = None) -> _Call:
        self.queued += ops
        return _Call(ops)


SHOP = MerchantRow("shop", 3, 1_000, "active")
LATER = MerchantRow("later", 4, 500, "active")


def _servicer(pipeline: _Pipeline, **options: object) -> PointsServicer:
    return PointsServicer(Settings(**options), pipeline)  # type: ignore[arg-type]


def _run(coroutine, merchants=("shop", "later")):
    async def main():
        rpc.principal.set(auth.Principal("key", "gateway", frozenset(merchants)))
        return await asyncio.wait_for(coroutine(), 10)

    return asyncio.run(main())


def _earn(**fields) -> pb.EarnRequest:
    values = {"merchant_id": "shop", "member_id": "m-1", "purchase_amount": 1_234, "idempotency_key": "k-1"}
    return pb.EarnRequest(**(values | fields))


def _redeem(**fields) -> pb.RedeemRequest:
    values = {"merchant_id": "shop", "member_id": "m-1", "points": 77, "idempotency_key": "k-2"}
    return pb.RedeemRequest(**(values | fields))


def test_an_earn_and_a_redeem_are_the_operations_the_keyword_constructor_made():
    service = _servicer(_Pipeline([SHOP]))

    async def build():
        return (
            await service._earn(_earn()),
            await service._redeem(_redeem()),
            await service._redeem(_redeem(vouchers=5)),
        )

    earn, redeem, split = _run(build)
    assert earn == Operation(
        Method.EARN,
        "shop",
        3,
        "k-1",
        {"member_id": "m-1", "purchase_amount": 1_234},
        member_id="m-1",
        purchase_amount=1_234,
        points=domain.earn_point_units(1_234, 1_000),
    )
    assert redeem == Operation(
        Method.REDEEM, "shop", 3, "k-2", {"member_id": "m-1", "points": 77}, member_id="m-1", points=77
    )
    assert split == Operation(
        Method.REDEEM,
        "shop",
        3,
        "k-2",
        {"member_id": "m-1", "points": 77, "vouchers": 5},
        member_id="m-1",
        points=77,
        vouchers=5,
    )


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        # the first field at fault answers, in the order the builders always checked them
        (_earn(member_id="", merchant_id="bad shop"), "member_id is required"),
        (_earn(member_id="a b", purchase_amount=0), "member_id must be 1..64 characters"),
        (_earn(purchase_amount=0, merchant_id="bad shop"), "purchase_amount must be 1.."),
        (_earn(merchant_id="bad shop", idempotency_key=""), "merchant_id must be 1..64 characters"),
        (_earn(idempotency_key="a key"), "idempotency_key must be 1..128 printable ASCII characters"),
        (_earn(idempotency_key=""), "idempotency_key is required"),
        (_earn(merchant_id="nowhere"), "merchant 'nowhere' is not in the alliance"),
        (_earn(merchant_id="elsewhere"), "this API key may not act for merchant 'elsewhere'"),
        (_redeem(points=0), "points must be 1.."),
        (_redeem(vouchers=-1), "vouchers must be 0.."),
        (_redeem(points=-1, vouchers=3), "points must be 0.."),
    ],
)
def test_a_bad_request_is_refused_with_the_message_of_its_first_bad_field(request_, message):
    elsewhere = MerchantRow("elsewhere", 9, 1_000, "active")
    service = _servicer(_Pipeline([SHOP, elsewhere]), id_bytes_max=64, idempotency_key_bytes_max=128)
    kind = "earn" if isinstance(request_, pb.EarnRequest) else "redeem"

    async def build():
        await service._kinds[kind][0](request_)

    with pytest.raises(Rejection) as refused:
        _run(build)
    assert message in refused.value.message


def test_a_merchant_not_in_memory_is_read_from_postgres_then_built_in_submit_batch():
    pipeline = _Pipeline([SHOP], stored=[LATER])
    service = _servicer(pipeline)
    operations = [
        pb.Operation(earn=_earn(merchant_id="later", idempotency_key="a")),
        pb.Operation(earn=_earn(merchant_id="nowhere", idempotency_key="b")),
        pb.Operation(),
        pb.Operation(redeem=_redeem(merchant_id="later", idempotency_key="c")),
        pb.Operation(void=pb.VoidRequest(merchant_id="shop", authorization_id="auth_7", idempotency_key="d")),
        pb.Operation(earn=_earn(purchase_amount=0, idempotency_key="e")),
    ]

    async def submit():
        return await service.SubmitBatch(pb.SubmitBatchRequest(operations=operations), None)

    response = _run(submit, merchants=("shop", "later", "nowhere"))
    assert pipeline.reads == ["later", "nowhere"]  # read once; then in memory
    assert [op.idempotency_key for op in pipeline.queued] == ["a", "c", "d"]
    assert pipeline.queued[0].merchant_slot == 4 and pipeline.queued[0].points == domain.earn_point_units(1_234, 500)
    results = response.results
    assert results[1].status_code == grpc.StatusCode.NOT_FOUND.value[0]
    assert [r.outcome for i, r in enumerate(results) if i != 1] == [
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_INVALID,
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_APPLIED,
        pb.OPERATION_OUTCOME_INVALID,
    ]
    assert "not in the alliance" in results[1].message and results[2].message.startswith("empty operation")
    assert results[0].earn.points == domain.earn_point_units(1_234, 500) and results[3].redeem.points == 77
    assert "purchase_amount must be" in results[5].message


def test_while_recovering_an_unknown_merchant_is_unavailable_as_before():
    pipeline = _Pipeline([SHOP], stored=[LATER])
    pipeline.ready = False
    service = _servicer(pipeline)
    for request_ in (_earn(), _earn(merchant_id="later")):
        with pytest.raises(Rejection) as refused:
            _run(lambda: service._earn(request_))
        assert refused.value.code is Code.UNAVAILABLE


def test_the_rate_limit_takes_one_token_an_operation_and_none_for_a_refused_one():
    service = _servicer(_Pipeline([SHOP]), merchant_operations_per_second=0.001, merchant_burst_operations=3)
    operations = [pb.Operation(earn=_earn(idempotency_key=f"k{i}")) for i in range(2)]
    operations.append(pb.Operation(earn=_earn(idempotency_key="bad key")))  # refused before the bucket
    operations += [pb.Operation(redeem=_redeem(idempotency_key=f"r{i}")) for i in range(2)]

    async def submit():
        return await service.SubmitBatch(pb.SubmitBatchRequest(operations=operations), None)

    results = _run(submit).results
    assert [r.outcome for r in results][:4] == [pb.OPERATION_OUTCOME_APPLIED] * 2 + [
        pb.OPERATION_OUTCOME_INVALID,
        pb.OPERATION_OUTCOME_APPLIED,
    ]
    assert results[4].outcome != pb.OPERATION_OUTCOME_APPLIED and "exceeds its limit" in results[4].message


@settings(max_examples=400, deadline=None)
@given(st.text(alphabet=st.characters(max_codepoint=0x2FF), max_size=12) | st.text(max_size=6))
def test_key_and_identifier_checks_accept_exactly_what_the_patterns_accept(value):
    validate = Validator(Settings())
    for check, pattern, limit in (
        (lambda v: validate.idempotency_key(v), _KEY_PATTERN, Settings().idempotency_key_bytes_max),
        (lambda v: validate.identifier(v, "member_id"), _ID_PATTERN, Settings().id_bytes_max),
    ):
        expected = bool(value) and len(value) <= limit and pattern.fullmatch(value) is not None
        for _ in range(2):  # a second time: an identifier found valid is then answered from the set
            try:
                check(value)
                accepted = True
            except Rejection:
                accepted = False
            assert accepted == expected


def test_the_set_of_valid_identifiers_is_bounded(monkeypatch):
    monkeypatch.setattr(servicer_module, "VALID_IDENTIFIERS_MAX", 10)
    validate = Validator(Settings())
    for i in range(25):
        validate.identifier(f"member-{i}", "member_id")
        assert len(validate._valid) <= 10
    with pytest.raises(Rejection, match="member_id must be 1.."):
        validate.identifier("member 1", "member_id")
    assert "member 1" not in validate._valid and set(string.whitespace).isdisjoint("".join(validate._valid))


def _earn_by_keywords(f: dict) -> pb.EarnResponse:  # as the servicer built it before _fill_earn_response
    return pb.EarnResponse(
        transaction_id=domain.format_transaction_id(f["transaction_id"]),
        points=f["points"],
        balance=f["balance"],
        give_back_bps=f["give_back_bps"],
        created_at=servicer_module.timestamp(f["created_at_us"]),
        bonus_points=f.get("bonus_points", 0),
        level=f.get("level", ""),
    )


def _redeem_by_keywords(f: dict) -> pb.RedeemResponse:  # as the servicer built it before _fill_redeem_response
    return pb.RedeemResponse(
        transaction_id=domain.format_transaction_id(f["transaction_id"]),
        points=f["points"],
        balance=f["balance"],
        available=f["available"],
        vouchers=f.get("vouchers", 0),
        voucher_balance=f.get("voucher_balance", 0),
        voucher_credit_used=f.get("voucher_credit_used", 0),
    )


_COUNT = st.integers(min_value=0, max_value=2**40)


@settings(max_examples=300, deadline=None)
@given(
    st.fixed_dictionaries(
        {"transaction_id": _COUNT, "points": _COUNT, "balance": st.integers(-(2**40), 2**40), "created_at_us": _COUNT},
        optional={"bonus_points": _COUNT, "level": st.sampled_from(["", "gold"]), "vouchers": _COUNT},
    ),
    st.integers(min_value=0, max_value=10_000),
    st.booleans(),
)
def test_an_earn_or_redeem_result_is_the_message_built_by_keywords_byte_for_byte(fields, bps, replayed):
    fields |= {"give_back_bps": bps, "available": fields["balance"] // 2, "voucher_balance": bps}
    service = _servicer(_Pipeline([SHOP]))
    outcome_kind = pb.OPERATION_OUTCOME_REPLAYED if replayed else pb.OPERATION_OUTCOME_APPLIED
    for kind, by_keywords in (("earn", _earn_by_keywords), ("redeem", _redeem_by_keywords)):
        result = service._to_result(kind, Outcome(Code.OK, dict(fields), replayed=replayed))
        expected = pb.OperationResult(outcome=outcome_kind, **{kind: by_keywords(fields)})
        assert result == expected
        assert result.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
        unary = service._kinds[kind][1](dict(fields))
        assert unary.SerializeToString(deterministic=True) == by_keywords(fields).SerializeToString(deterministic=True)
