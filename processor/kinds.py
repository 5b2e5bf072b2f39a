"""Transaction kinds: the one table of them. Each kind's number (transactions.kind), name (CSV exports,
metric labels, logs), TransactionKind enum value in points.proto, the sign of its effect on the
member's points as the member sees it, and, for the program rules' kinds, the shape reconcile checks
its entries against. Checked complete at import against the proto enum and the fast path's constants,
as errors.py checks its table of codes: a kind added in one place and not the others fails at start.
"""

from __future__ import annotations

import dataclasses

import fastpath
from points.v1 import points_pb2 as pb
from processor import rules
from processor.domain import require


@dataclasses.dataclass(frozen=True, slots=True)
class Shape:
    """What reconcile requires of a transaction's entries (reconcile._SHAPE_SUMS names the sums)."""

    description: str
    # the account kind/asset pairs its entries may touch
    accounts: tuple[str, ...]
    # an SQL condition over the sums, where amount = transactions.amount and fee = transactions.fee
    condition: str


@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    code: int
    name: str
    proto: int
    # +1: credits the member's points; -1: debits them; 0: moves none of the member's points.
    # Reconcile checks that no transaction of the kind moves the member's points the other way.
    member_sign: int
    shape: Shape | None = None
    # points_refunded_total's `kind` label, for the two refunds of kinds 1..5
    refund_label: str = ""


_POINTS_FEES = ("merchant_fees/POINTS", "operator_fee_revenue/POINTS")
_SPLIT = (
    "member/POINTS",
    "member/VOUCHERS",
    "member_voucher_credit/VOUCHERS",
    "merchant_redeemed/POINTS",
    "merchant_redeemed/VOUCHERS",
    *_POINTS_FEES,
)

_FAN_REWARD = ("operator_fan_rewards/VOUCHERS", "merchant_vouchers/VOUCHERS", "merchant_voucher_credit/VOUCHERS")

KINDS: tuple[Kind, ...] = (
    Kind(fastpath.KIND_EARN, "earn", pb.TRANSACTION_KIND_EARN, +1),
    Kind(fastpath.KIND_CAPTURE, "capture", pb.TRANSACTION_KIND_CAPTURE, -1),
    Kind(fastpath.KIND_REDEEM, "redeem", pb.TRANSACTION_KIND_REDEEM, -1),
    Kind(
        fastpath.KIND_REFUND_REDEMPTION,
        "refund_of_redemption",
        pb.TRANSACTION_KIND_REFUND_OF_REDEMPTION,
        +1,
        refund_label="redemption",
    ),
    Kind(fastpath.KIND_REFUND_EARN, "refund_of_earn", pb.TRANSACTION_KIND_REFUND_OF_EARN, -1, refund_label="earn"),
    Kind(
        rules.KIND_EXPIRY,
        "expiry",
        pb.TRANSACTION_KIND_EXPIRY,
        -1,
        Shape(
            "the transaction's member -amount, operator_breakage +amount",
            ("member/POINTS", "operator_breakage/POINTS"),
            "member_own = -amount AND member_any = member_own AND breakage = amount",
        ),
    ),
    Kind(
        rules.KIND_TIER_BONUS,
        "tier_bonus",
        pb.TRANSACTION_KIND_TIER_BONUS,
        +1,
        Shape(
            "operator_tier_rewards -amount, the transaction's member +amount",
            ("member/POINTS", "operator_tier_rewards/POINTS"),
            "tier_rewards = -amount AND member_own = amount AND member_any = member_own",
        ),
    ),
    # the member credited is the referrer; transactions.member_id may name either side of the referral
    Kind(
        rules.KIND_REFERRAL_BONUS,
        "referral_bonus",
        pb.TRANSACTION_KIND_REFERRAL_BONUS,
        +1,
        Shape(
            "operator_referrals -amount, one member (the referrer) +amount",
            ("member/POINTS", "operator_referrals/POINTS"),
            "referrals = -amount AND member_any = amount AND members <= 1",
        ),
    ),
    Kind(
        rules.KIND_ACQUIRING_REWARD,
        "acquiring_reward",
        pb.TRANSACTION_KIND_ACQUIRING_REWARD,
        0,
        Shape(
            "operator_acquiring -amount, one merchant_acquiring (the acquirer) +amount",
            ("operator_acquiring/POINTS", "merchant_acquiring/POINTS"),
            "operator_acquiring = -amount AND merchant_acquiring = amount AND acquirers <= 1",
        ),
    ),
    Kind(
        rules.KIND_ACQUIRING_REVERSAL,
        "acquiring_reversal",
        pb.TRANSACTION_KIND_ACQUIRING_REVERSAL,
        0,
        Shape(
            "operator_acquiring +amount, one merchant_acquiring (the acquirer) -amount",
            ("operator_acquiring/POINTS", "merchant_acquiring/POINTS"),
            "operator_acquiring = amount AND merchant_acquiring = -amount AND acquirers <= 1",
        ),
    ),
    # vouchers only: a dividend moves none of the member's points
    Kind(
        rules.KIND_DIVIDEND,
        "dividend",
        pb.TRANSACTION_KIND_DIVIDEND,
        0,
        Shape(
            "operator_dividends -, member_voucher_credit / member / the transaction's merchant_vouchers + "
            "(VOUCHERS only)",
            (
                "operator_dividends/VOUCHERS",
                "member_voucher_credit/VOUCHERS",
                "member/VOUCHERS",
                "merchant_vouchers/VOUCHERS",
                "merchant_voucher_credit/VOUCHERS",  # a merchant's owed vouchers repaid first (issue 16)
            ),
            # a merchant's dividend names it (statement_lines finds a merchant's dividends by merchant_id)
            "dividends <= 0 AND held_any = held_own AND merchant_credit_any = merchant_credit_own",
        ),
    ),
    # the fee is on both tenders (a voucher-unit is worth a point-unit), posted in POINTS; refunds keep it
    Kind(
        rules.KIND_SPLIT_REDEEM,
        "split_redeem",
        pb.TRANSACTION_KIND_SPLIT_REDEEM,
        -1,
        Shape(
            "member (both assets) and voucher credit to merchant_redeemed, fee entries = fee",
            _SPLIT,
            "fees = -fee AND revenue = fee",
        ),
    ),
    Kind(
        rules.KIND_SPLIT_REFUND,
        "split_refund",
        pb.TRANSACTION_KIND_SPLIT_REFUND,
        +1,
        Shape(
            "merchant_redeemed (both assets) back to the member and its voucher credit, no fee",
            _SPLIT,
            "fees = 0 AND revenue = 0",
        ),
    ),
    # a merchant's transaction: no member
    Kind(
        rules.KIND_MERCHANT_VOUCHER_SPEND,
        "merchant_voucher_spend",
        pb.TRANSACTION_KIND_MERCHANT_VOUCHER_SPEND,
        0,
        Shape(
            "the transaction's merchant_vouchers -amount, one other merchant's merchant_redeemed (the operator's "
            "store, or the merchant named when the program allows any) +amount, in VOUCHERS",
            # issue 16: part of it may be spent on the merchant's voucher credit (merchant_voucher_credit)
            ("merchant_vouchers/VOUCHERS", "merchant_redeemed/VOUCHERS", "merchant_voucher_credit/VOUCHERS"),
            "held_own + merchant_credit_own = -amount AND held_any = held_own AND merchant_credit_any = "
            "merchant_credit_own AND store_vouchers = amount AND store_vouchers_own = 0 AND stores = 1",
        ),
    ),
    Kind(
        rules.KIND_CONVERSION,
        "conversion",
        pb.TRANSACTION_KIND_CONVERSION,
        +1,
        Shape(
            "the transaction's merchant_issued -amount, its member +amount, fee entries = fee",
            ("merchant_issued/POINTS", "member/POINTS", *_POINTS_FEES),
            "issued_own = -amount AND issued_any = issued_own AND member_own = amount AND member_any = member_own "
            "AND fees = -fee AND revenue = fee",
        ),
    ),
)

# --- member administration (MemberAdminService, issue 15; posted by processor/member_postings.py) ---
KIND_ADJUSTMENT_CREDIT = 16
KIND_ADJUSTMENT_DEBIT = 17
KIND_REVERSAL_CREDIT = 18
KIND_REVERSAL_DEBIT = 19
KIND_MEMBER_CLOSURE = 20
KIND_TRANSFER = 21
KIND_MERGE = 22
_ADJUSTMENTS = ("member/POINTS", "operator_adjustments/POINTS")
# a reversal mirrors one transaction's entries, whichever accounts they touched (a transfer's two members
# too); reconcile checks the mirror itself (reconcile._member_admin_discrepancies), the shape only the side
# of the transaction's member
_ANY_POINTS = (
    "member/POINTS",
    "merchant_issued/POINTS",
    "merchant_redeemed/POINTS",
    "merchant_acquiring/POINTS",
    "operator_tier_rewards/POINTS",
    "operator_promotions/POINTS",
    "operator_referrals/POINTS",
    "operator_acquiring/POINTS",
    "operator_breakage/POINTS",
    "operator_adjustments/POINTS",
    "operator_transfer_fees/POINTS",
    *_POINTS_FEES,
    # an earn's merchant match and a sign-up bonus are reversed too (issue 15)
    "operator_merchant_match/POINTS",
    "merchant_points/POINTS",
    "operator_signup_bonuses/POINTS",
)
KINDS += (
    Kind(
        KIND_ADJUSTMENT_CREDIT,
        "adjustment_credit",
        pb.TRANSACTION_KIND_ADJUSTMENT_CREDIT,
        +1,
        Shape(
            "operator_adjustments -amount, the transaction's member +amount",
            _ADJUSTMENTS,
            "adjustments = -amount AND member_own = amount AND member_any = member_own",
        ),
    ),
    Kind(
        KIND_ADJUSTMENT_DEBIT,
        "adjustment_debit",
        pb.TRANSACTION_KIND_ADJUSTMENT_DEBIT,
        -1,
        Shape(
            "the transaction's member -amount, operator_adjustments +amount",
            _ADJUSTMENTS,
            "adjustments = amount AND member_own = -amount AND member_any = member_own",
        ),
    ),
    Kind(
        KIND_REVERSAL_CREDIT,
        "reversal_credit",
        pb.TRANSACTION_KIND_REVERSAL_CREDIT,
        +1,
        Shape(
            "the mirror of its original transaction, crediting the transaction's member +amount",
            _ANY_POINTS,
            "member_own = amount",
        ),
    ),
    Kind(
        KIND_REVERSAL_DEBIT,
        "reversal_debit",
        pb.TRANSACTION_KIND_REVERSAL_DEBIT,
        -1,
        Shape(
            "the mirror of its original transaction, debiting the transaction's member -amount",
            _ANY_POINTS,
            "member_own = -amount",
        ),
    ),
    Kind(
        KIND_MEMBER_CLOSURE,
        "member_closure",
        pb.TRANSACTION_KIND_MEMBER_CLOSURE,
        -1,
        Shape(
            "the closed member -amount (all its points), operator_breakage +amount",
            ("member/POINTS", "operator_breakage/POINTS"),
            "member_own = -amount AND member_any = member_own AND breakage = amount",
        ),
    ),
    Kind(
        KIND_TRANSFER,
        "transfer",
        pb.TRANSACTION_KIND_TRANSFER,
        -1,
        Shape(
            "the transaction's member (the sender) -amount, one other member +(amount - fee), "
            "operator_transfer_fees +fee",
            ("member/POINTS", "operator_transfer_fees/POINTS"),
            "member_own = -amount AND member_any = -fee AND members <= 2 AND transfer_fees = fee",
        ),
    ),
    Kind(
        KIND_MERGE,
        "merge",
        pb.TRANSACTION_KIND_MERGE,
        -1,
        Shape(
            "the transaction's member (the source) -amount, one other member (the target) +amount; the source's "
            "vouchers and voucher credit to the target's",
            ("member/POINTS", "member/VOUCHERS", "member_voucher_credit/VOUCHERS"),
            "member_own = -amount AND member_any = 0 AND members <= 2",
        ),
    ),
)
# member debits that take the member's soonest-expiring points first (lot_consumptions), as a redeem (a
# reversal of a transfer credits its sender and debits its receiver: either reversal kind may)
MEMBER_DEBITS = (
    KIND_ADJUSTMENT_DEBIT,
    KIND_REVERSAL_CREDIT,
    KIND_REVERSAL_DEBIT,
    KIND_MEMBER_CLOSURE,
    KIND_TRANSFER,
)
# a merge moves the source's lots whole (program.merge_members), consuming none
# transactions of these kinds name no merchant: transactions.merchant_id is 'operator'
OPERATOR_KINDS = frozenset(range(KIND_ADJUSTMENT_CREDIT, KIND_MERGE + 1))

# issue 16: channel economics (23..24; 25..26 kept for it) and the seed systems (27..31)
KINDS += (
    # channel economics (issue 16; numbers 16..22 are issue 15's, 25..26 kept for this block, 27..31 for
    # the seed programs): posted by the committer after a settlement cut, one per payee and period, from
    # the operator's fee revenue; merchant_id 'operator', no member
    Kind(
        rules.KIND_PROMOTER_COMMISSION,
        "promoter_commission",
        pb.TRANSACTION_KIND_PROMOTER_COMMISSION,
        0,
        Shape(
            "operator_fee_revenue -amount, one promoter_commissions (the promoter) +amount",
            ("operator_fee_revenue/POINTS", "promoter_commissions/POINTS"),
            "revenue = -amount AND commissions = amount AND promoters = 1",
        ),
    ),
    Kind(
        rules.KIND_REGIONAL_AGENT_SHARE,
        "regional_agent_share",
        pb.TRANSACTION_KIND_REGIONAL_AGENT_SHARE,
        0,
        Shape(
            "operator_fee_revenue -amount, one regional_agent_shares (the agent) +amount",
            ("operator_fee_revenue/POINTS", "regional_agent_shares/POINTS"),
            "revenue = -amount AND agent_shares = amount AND agents = 1",
        ),
    ),
    # --- issue 16, the seed systems (numbers 27..31 are theirs; 16..26 belong to other issues) ---
    # a merchant's transaction: the match goes to the earn's merchant; member_id names the member whose
    # earn set it off, whose points it does not move
    Kind(
        rules.KIND_MERCHANT_MATCH,
        "merchant_match",
        pb.TRANSACTION_KIND_MERCHANT_MATCH,
        0,
        Shape(
            "operator_merchant_match -amount, the transaction's merchant_points +amount",
            ("operator_merchant_match/POINTS", "merchant_points/POINTS"),
            "merchant_match = -amount AND merchant_points_own = amount AND merchant_points_any = merchant_points_own",
        ),
    ),
    Kind(
        rules.KIND_MERCHANT_MATCH_REVERSAL,
        "merchant_match_reversal",
        pb.TRANSACTION_KIND_MERCHANT_MATCH_REVERSAL,
        0,
        Shape(
            "operator_merchant_match +amount, the transaction's merchant_points -amount",
            ("operator_merchant_match/POINTS", "merchant_points/POINTS"),
            "merchant_match = amount AND merchant_points_own = -amount AND merchant_points_any = merchant_points_own",
        ),
    ),
    Kind(
        rules.KIND_SIGNUP_BONUS,
        "signup_bonus",
        pb.TRANSACTION_KIND_SIGNUP_BONUS,
        +1,
        Shape(
            "operator_signup_bonuses -amount, the transaction's member +amount",
            ("member/POINTS", "operator_signup_bonuses/POINTS"),
            "signup_bonuses = -amount AND member_own = amount AND member_any = member_own",
        ),
    ),
    # a merchant's transaction (the acquirer); member_id names the fan whose earn set it off
    Kind(
        rules.KIND_FAN_REWARD,
        "fan_reward",
        pb.TRANSACTION_KIND_FAN_REWARD,
        0,
        Shape(
            "operator_fan_rewards -amount, the transaction's merchant_vouchers and merchant_voucher_credit +amount "
            "(VOUCHERS)",
            _FAN_REWARD,
            "fan_rewards = -amount AND held_own + merchant_credit_own = amount AND held_any = held_own "
            "AND merchant_credit_any = merchant_credit_own",
        ),
    ),
    Kind(
        rules.KIND_FAN_REWARD_REVERSAL,
        "fan_reward_reversal",
        pb.TRANSACTION_KIND_FAN_REWARD_REVERSAL,
        0,
        Shape(
            "operator_fan_rewards +amount, the transaction's merchant_vouchers and merchant_voucher_credit -amount "
            "(VOUCHERS)",
            _FAN_REWARD,
            "fan_rewards = amount AND held_own + merchant_credit_own = -amount AND held_any = held_own "
            "AND merchant_credit_any = merchant_credit_own",
        ),
    ),
)

# transactions_kind_check (migration 0014) allows up to this number
KIND_NUMBER_MAX = 31

BY_CODE: dict[int, Kind] = {kind.code: kind for kind in KINDS}
BY_NAME: dict[str, Kind] = {kind.name: kind for kind in KINDS}
# the program rules' kinds, whose entries reconcile checks against their shapes
SHAPED: dict[int, Shape] = {kind.code: kind.shape for kind in KINDS if kind.shape is not None}
REFUNDS: dict[int, str] = {kind.code: kind.refund_label for kind in KINDS if kind.refund_label}


def kind(code: int) -> Kind:
    """The kind of a stored transaction; a number outside the table is a bug (or a corrupt row)."""
    found = BY_CODE.get(code)
    require(found is not None, f"transaction kind {code} is not in processor/kinds.py")
    return found  # type: ignore[return-value]


def _check_complete() -> None:
    codes = [k.code for k in KINDS]
    require(len(set(codes)) == len(codes) and len(BY_NAME) == len(KINDS), "a kind number or name is repeated")
    # increasing from 1; issues work on the table at once with reserved blocks of numbers (issue 16: 27..31),
    # so a branch may hold a later block before an earlier one is merged
    require(codes[:15] == list(range(1, 16)), f"kinds 1..15 are numbered with no gap: {codes}")
    require(codes == sorted(codes) and codes[-1] <= KIND_NUMBER_MAX, f"kinds increase up to {KIND_NUMBER_MAX}: {codes}")
    enum = {value.number: value.name for value in pb.TransactionKind.DESCRIPTOR.values if value.number}
    table = {k.proto: k for k in KINDS}
    require(set(enum) == set(table), f"points.proto TransactionKind {sorted(enum)} != kinds.py {sorted(table)}")
    for k in KINDS:
        require(k.proto == k.code, f"kind {k.name}: TransactionKind {k.proto} != its number {k.code}")
        require(
            enum[k.proto] == "TRANSACTION_KIND_" + k.name.upper(), f"kind {k.name}: TransactionKind is {enum[k.proto]}"
        )
        require(k.member_sign in (-1, 0, 1), f"kind {k.name}: member_sign must be -1, 0 or 1")
        require(
            k.code <= fastpath.KIND_REFUND_EARN or k.shape is not None,
            f"kind {k.name}: a program kind needs a shape for reconcile",
        )


_check_complete()
