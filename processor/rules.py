"""Program rules of the alliance (issue 7): versioned configuration, expiry lots, tiers, promotions,
referrals and acquiring merchants, the dividend pool and vouchers, split tender, conversion of a
merchant's own points, and the refusal of cash-out. Pure arithmetic: no I/O, no SQL, no grpc.

Units: point-units and voucher-units (100 = 1 point or 1 voucher = 1 currency unit, so one unit is one
currency minor unit), purchases in currency minor units, times in microseconds since the Unix epoch
(`*_us`), rates in basis points (`*_bps`, 10,000 = 100%) or an exact numerator/denominator. Integers
only; every rounding is named where it happens and says in whose favour. Each rule returns the
postings it implies as `Posting(account_kind, owner_id, asset, amount)` rows, built by `balanced()`,
which checks that they sum to zero per asset. An entry's amount is added to its account's balance
(members positive, a merchant's issued account negative), as in migrations/0001_ledger.sql.
docs/RULES.md explains each rule, its postings, its roundings and the decisions taken.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Collection, Iterable, Mapping, NamedTuple, NoReturn

from fastpath import records
from processor.domain import (
    ACCOUNT_MEMBER,
    ACCOUNT_MERCHANT_FEES,
    ACCOUNT_MERCHANT_ISSUED,
    ACCOUNT_MERCHANT_REDEEMED,
    ACCOUNT_OPERATOR_BREAKAGE,
    ACCOUNT_OPERATOR_FEE_REVENUE,
    ASSET_POINTS,
    BPS_DENOMINATOR,
    INT64_MAX,
    OPERATOR_ID,
    Code,
    Rejection,
    require,
)

ASSET_VOUCHERS = "VOUCHERS"
POINT_UNITS_PER_POINT = 100
DAY_US = 86_400_000_000
MULTIPLIER_BPS_MAX = 100_000  # 10x: a level or promotion multiplier above this is a typo
STARS_MAX = 10  # star ratings run 0..STARS_MAX; a rebate schedule longer than that is a typo

# New account kinds (accounts.kind). Sign: an entry's amount is added to the balance.
ACCOUNT_MEMBER_VOUCHER_CREDIT = "member_voucher_credit"  # VOUCHERS, <= 0: vouchers spent on credit
ACCOUNT_MERCHANT_VOUCHERS = "merchant_vouchers"  # VOUCHERS, >= 0: vouchers a merchant holds
ACCOUNT_MERCHANT_ACQUIRING = "merchant_acquiring"  # POINTS, >= 0: rewards owed to an acquirer
ACCOUNT_OPERATOR_TIER_REWARDS = "operator_tier_rewards"  # POINTS, <= 0: level bonuses + multipliers
ACCOUNT_OPERATOR_PROMOTIONS = "operator_promotions"  # POINTS, <= 0: operator-funded promotions
ACCOUNT_OPERATOR_REFERRALS = "operator_referrals"  # POINTS, <= 0: referrer bonuses
ACCOUNT_OPERATOR_ACQUIRING = "operator_acquiring"  # POINTS, <= 0: acquiring rewards
ACCOUNT_OPERATOR_DIVIDENDS = "operator_dividends"  # VOUCHERS, <= 0: vouchers issued
# issue 16 (the seed systems): points a merchant holds from the merchant match (not a cash claim: outside
# its net position, a holding for dividend rounds), and the operator accounts funding it and sign-up bonuses
ACCOUNT_MERCHANT_POINTS = "merchant_points"  # POINTS, >= 0
ACCOUNT_OPERATOR_MERCHANT_MATCH = "operator_merchant_match"  # POINTS, <= 0: merchant match points issued
ACCOUNT_OPERATOR_SIGNUP_BONUSES = "operator_signup_bonuses"  # POINTS, <= 0: sign-up bonuses issued
# 众店's fan reward in vouchers, and the vouchers a merchant owes (spent on credit, or a fan reward reversed
# after the merchant spent it), repaid first out of the vouchers it receives next
ACCOUNT_OPERATOR_FAN_REWARDS = "operator_fan_rewards"  # VOUCHERS, <= 0: fan rewards issued
ACCOUNT_MERCHANT_VOUCHER_CREDIT = "merchant_voucher_credit"  # VOUCHERS, <= 0: vouchers a merchant owes
# channel economics (issue 16, docs/RULES.md section 12): payables owed to promoters and regional agents
ACCOUNT_PROMOTER_COMMISSIONS = "promoter_commissions"  # POINTS, >= 0: commissions owed to a promoter
ACCOUNT_REGIONAL_AGENT_SHARES = "regional_agent_shares"  # POINTS, >= 0: shares owed to a regional agent

ACCOUNT_ASSETS: Mapping[str, frozenset[str]] = {
    ACCOUNT_MEMBER: frozenset({ASSET_POINTS, ASSET_VOUCHERS}),
    ACCOUNT_MERCHANT_ISSUED: frozenset({ASSET_POINTS}),
    ACCOUNT_MERCHANT_REDEEMED: frozenset({ASSET_POINTS, ASSET_VOUCHERS}),
    ACCOUNT_MERCHANT_FEES: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_FEE_REVENUE: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_BREAKAGE: frozenset({ASSET_POINTS}),
    ACCOUNT_MEMBER_VOUCHER_CREDIT: frozenset({ASSET_VOUCHERS}),
    ACCOUNT_MERCHANT_VOUCHERS: frozenset({ASSET_VOUCHERS}),
    ACCOUNT_MERCHANT_ACQUIRING: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_TIER_REWARDS: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_PROMOTIONS: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_REFERRALS: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_ACQUIRING: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_DIVIDENDS: frozenset({ASSET_VOUCHERS}),
    ACCOUNT_MERCHANT_POINTS: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_MERCHANT_MATCH: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_SIGNUP_BONUSES: frozenset({ASSET_POINTS}),
    ACCOUNT_OPERATOR_FAN_REWARDS: frozenset({ASSET_VOUCHERS}),
    ACCOUNT_MERCHANT_VOUCHER_CREDIT: frozenset({ASSET_VOUCHERS}),
    ACCOUNT_PROMOTER_COMMISSIONS: frozenset({ASSET_POINTS}),
    ACCOUNT_REGIONAL_AGENT_SHARES: frozenset({ASSET_POINTS}),
    # member administration (processor/member_postings.py): funds adjustments; no sign of its own
    "operator_adjustments": frozenset({ASSET_POINTS}),
    # transfer fees (processor/member_postings.py), >= 0
    "operator_transfer_fees": frozenset({ASSET_POINTS}),
}

# New transaction kinds (transactions.kind; 1..5 are fastpath.KIND_*). Tier multipliers and promotion
# bonuses are entries of the earn (1) and of its refund (5), not transactions of their own.
KIND_EXPIRY = 6  # a lot's points expire to the operator's breakage
KIND_TIER_BONUS = 7  # one-off bonus on reaching a level
KIND_REFERRAL_BONUS = 8  # the referrer's bonus on the referee's first qualifying earn
KIND_ACQUIRING_REWARD = 9  # the acquiring merchant's share of a member's spend elsewhere
KIND_ACQUIRING_REVERSAL = 10  # its reversal when that purchase is refunded
KIND_DIVIDEND = 11  # vouchers of a dividend round to one holder
KIND_SPLIT_REDEEM = 12  # a redeem paid with vouchers and/or points
KIND_SPLIT_REFUND = 13  # a refund of a split redeem, both assets as one unit
KIND_MERCHANT_VOUCHER_SPEND = 14  # a merchant spends its vouchers at the operator's store
KIND_CONVERSION = 15  # a merchant's own points converted into alliance points
# issue 16 (the seed systems; numbers 27..31 are reserved for them)
KIND_MERCHANT_MATCH = 27  # the merchant's match of an earn's give-back points (众店)
KIND_MERCHANT_MATCH_REVERSAL = 28  # its proportional reversal when that purchase is refunded
KIND_SIGNUP_BONUS = 29  # a member's one-off bonus on enrolment (seed 003)
KIND_FAN_REWARD = 30  # 众店: the acquiring merchant's share of its fan's spend, in vouchers
KIND_FAN_REWARD_REVERSAL = 31  # its proportional reversal when that purchase is refunded
# channel economics (issue 16): posted by the committer after a settlement cut, one per payee and period
KIND_PROMOTER_COMMISSION = 23  # operator_fee_revenue -> a promoter's promoter_commissions
KIND_REGIONAL_AGENT_SHARE = 24  # operator_fee_revenue -> a regional agent's regional_agent_shares

CASH_OUT_MESSAGE = (
    "points and vouchers cannot be paid out as cash: they circulate only inside the "
    "alliance; redeem them at any merchant of the network instead"
)


def _is_int(value: object) -> bool:
    return type(value) is int


def _check_int(value: Any, name: str, minimum: int = 0, maximum: int = INT64_MAX) -> None:
    require(
        _is_int(value) and minimum <= value <= maximum, f"{name} must be an int in {minimum}..{maximum}, got {value!r}"
    )


def _floor_bps(amount: int, bps: int) -> int:
    return amount * bps // BPS_DENOMINATOR


def proportional_share(part: int, whole: int, done_before: int, amount: int) -> int:
    """The share of `part` that goes with `amount` more of `whole`, after `done_before` already went:
    floor(part * (done_before + amount) / whole) - floor(part * done_before / whole). Cumulative, so
    the pieces of any sequence of partial refunds add up to exactly `part` once all of `whole` is
    refunded; each piece is rounded down (the unit of rounding waits for a later piece)."""
    for value, name in ((part, "part"), (whole, "whole"), (done_before, "done_before"), (amount, "amount")):
        _check_int(value, name)
    require(done_before + amount <= whole, f"{done_before} + {amount} exceeds the whole {whole}")
    if whole == 0:
        return 0
    return part * (done_before + amount) // whole - part * done_before // whole


# --- Postings ------------------------------------------------------------------------------------


class Posting(NamedTuple):
    account_kind: str
    owner_id: str
    asset: str
    amount: int


def balanced(postings: Iterable[Posting | tuple[Any, ...]]) -> tuple[Posting, ...]:
    """The postings without zero amounts (the journal stores none), after checking that each names a
    known account kind in an asset it may hold, that amounts are int64, and that every asset sums to
    zero. An unbalanced rule is a bug: InvariantViolation."""
    rows = tuple(Posting(*row) for row in postings)
    sums: dict[str, int] = {}
    for row in rows:
        require(row.account_kind in ACCOUNT_ASSETS, f"unknown account kind {row.account_kind!r}")
        require(row.asset in ACCOUNT_ASSETS[row.account_kind], f"account kind {row.account_kind} holds no {row.asset}")
        require(bool(row.owner_id), f"posting to {row.account_kind} has no owner")
        _check_int(row.amount, "posting amount", -INT64_MAX, INT64_MAX)
        sums[row.asset] = sums.get(row.asset, 0) + row.amount
    unbalanced = {asset: total for asset, total in sums.items() if total != 0}
    require(not unbalanced, f"postings do not balance: {unbalanced} in {rows}")
    return tuple(row for row in rows if row.amount != 0)


def negated(postings: Iterable[Posting]) -> tuple[Posting, ...]:
    """The postings that undo `postings` (a refund or reversal of the same shape)."""
    return balanced(row._replace(amount=-row.amount) for row in postings)


# --- Errors --------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """Program configuration that cannot be used; the message lists what to fix."""


def _raise_problems(problems: list[str], what: str) -> None:
    if problems:
        raise ConfigError(f"{what}: " + "; ".join(problems))


def _problem_int(problems: list[str], value: Any, name: str, minimum: int = 0, maximum: int = INT64_MAX) -> bool:
    if not _is_int(value) or not minimum <= value <= maximum:
        problems.append(f"{name} must be an integer in {minimum}..{maximum} (got {value!r})")
        return False
    return True


_UNIT = {ASSET_POINTS: "point-units", ASSET_VOUCHERS: "voucher-units"}


class InsufficientBalance(Rejection):
    """Not enough points (or vouchers) for the request: refused, nothing changes."""

    def __init__(self, asset: str, available: int, requested: int):
        super().__init__(
            Code.FAILED_PRECONDITION,
            f"insufficient {asset.lower()}: {available} {_UNIT[asset]} available, "
            f"{requested} requested; ask for at most {available}",
        )
        self.asset = asset
        self.available = available
        self.requested = requested
        self.reason = "insufficient_points" if asset == ASSET_POINTS else "insufficient_vouchers"


def refuse_cash_out() -> NoReturn:
    """Any request to turn points or vouchers into cash paid out: refused, whatever the state (so
    INVALID_ARGUMENT, not FAILED_PRECONDITION: no retry or other state will make it succeed)."""
    raise Rejection(Code.INVALID_ARGUMENT, CASH_OUT_MESSAGE)


# --- Configuration -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Rate:
    """An exact rate numerator/denominator (no floats)."""

    numerator: int
    denominator: int

    def __post_init__(self) -> None:
        problems: list[str] = []
        _problem_int(problems, self.numerator, "numerator", 1, 10**9)
        _problem_int(problems, self.denominator, "denominator", 1, 10**9)
        _raise_problems(problems, "rate")


@dataclasses.dataclass(frozen=True, slots=True)
class Level:
    """A tier level: reached when qualifying point-units >= threshold_point_units."""

    name: str
    threshold_point_units: int
    bonus_point_units: int = 0  # once per member, on first reaching the level
    multiplier_bps: int = BPS_DENOMINATOR  # earn multiplier; 10,000 = 1x

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.name, str) or not self.name:
            problems.append("name must be a non-empty string")
        _problem_int(problems, self.threshold_point_units, "threshold_point_units")
        _problem_int(problems, self.bonus_point_units, "bonus_point_units")
        _problem_int(
            problems,
            self.multiplier_bps,
            "multiplier_bps (10000 = 1x; a level never earns less than the merchant gives)",
            BPS_DENOMINATOR,
            MULTIPLIER_BPS_MAX,
        )
        _raise_problems(problems, f"level {self.name!r}")


# The plans' levels: 5,000 / 10,000 / 20,000 points = 500,000 / 1,000,000 / 2,000,000 point-units.
# The plans name no bonuses or multipliers; each program version sets its own.
PLAN_LEVELS = (
    Level("registered", 0),
    Level("blue", 5_000 * POINT_UNITS_PER_POINT),
    Level("yellow", 10_000 * POINT_UNITS_PER_POINT),
    Level("red", 20_000 * POINT_UNITS_PER_POINT),
)

SCOPE_NETWORK = "network"
SCOPE_MERCHANT = "merchant"
SCOPE_TIER = "tier"


@dataclasses.dataclass(frozen=True, slots=True)
class Promotion:
    """A time-boxed bonus on earns: [start_us, end_us), in a scope (the whole network, one merchant
    (scope_id = merchant id) or one level (scope_id = level name)), either a multiplier of the base
    points (multiplier_bps > 10,000) or a fixed bonus per qualifying earn, up to budget_point_units in
    all. Paid by sponsor_id: the operator, or the merchant of a merchant-scoped promotion."""

    promotion_id: str
    start_us: int
    end_us: int
    scope: str
    scope_id: str = ""
    multiplier_bps: int = 0
    bonus_point_units: int = 0
    budget_point_units: int = 0
    sponsor_id: str = OPERATOR_ID

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.promotion_id, str) or not self.promotion_id:
            problems.append("promotion_id must be a non-empty string")
        if _problem_int(problems, self.start_us, "start_us") and _problem_int(problems, self.end_us, "end_us"):
            if self.end_us <= self.start_us:
                problems.append(
                    f"end_us ({self.end_us}) must be after start_us ({self.start_us}); the window is [start_us, end_us)"
                )
        if self.scope not in (SCOPE_NETWORK, SCOPE_MERCHANT, SCOPE_TIER):
            problems.append(f"scope must be {SCOPE_NETWORK!r}, {SCOPE_MERCHANT!r} or {SCOPE_TIER!r}")
        elif (self.scope == SCOPE_NETWORK) != (self.scope_id == ""):
            problems.append("scope_id must be empty for a network promotion and name the merchant or level otherwise")
        multiplier = self.multiplier_bps != 0
        bonus = self.bonus_point_units != 0
        if multiplier == bonus:
            problems.append("set exactly one of multiplier_bps (> 10000) and bonus_point_units (> 0)")
        if multiplier:
            _problem_int(problems, self.multiplier_bps, "multiplier_bps", BPS_DENOMINATOR + 1, MULTIPLIER_BPS_MAX)
        if bonus:
            _problem_int(problems, self.bonus_point_units, "bonus_point_units", 1)
        _problem_int(problems, self.budget_point_units, "budget_point_units", 1)
        if self.sponsor_id != OPERATOR_ID and not (self.scope == SCOPE_MERCHANT and self.sponsor_id == self.scope_id):
            problems.append(
                f"sponsor_id must be {OPERATOR_ID!r} or, for a merchant promotion, that merchant "
                f"(a merchant pays only for points earned at itself)"
            )
        _raise_problems(problems, f"promotion {self.promotion_id!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class MerchantTerms:
    """Per-merchant overrides: its acquiring share (as the acquirer) and its agreed conversion rate
    (merchant points -> alliance point-units)."""

    merchant_id: str
    acquiring_share_bps: int | None = None
    conversion_rate: Rate | None = None
    # issue 16 (seed 003): the merchant's star rating, set by the operator from its redemption service;
    # None = not rated (no fee rebate). Its rebate is the version's star_fee_rebate_bps[star - 1].
    star_rating: int | None = None

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.merchant_id, str) or not self.merchant_id:
            problems.append("merchant_id must be a non-empty string")
        if self.acquiring_share_bps is not None:
            _problem_int(problems, self.acquiring_share_bps, "acquiring_share_bps", 0, BPS_DENOMINATOR)
        if self.star_rating is not None:
            _problem_int(problems, self.star_rating, "star_rating (None = not rated)", 0, STARS_MAX)
        if self.conversion_rate is not None and not isinstance(self.conversion_rate, Rate):
            problems.append("conversion_rate must be a Rate(numerator, denominator)")
        _raise_problems(problems, f"merchant terms of {self.merchant_id!r}")


@dataclasses.dataclass(frozen=True, slots=True)
class DividendSettings:
    """The dividend pool: first round when the pool reaches threshold_point_units, then each time it
    grew by growth_bps over the pool at the previous round; round k pays rate_bps_schedule[k-1] (the
    last rate repeats); a member may spend on credit up to credit_limit_bps of its expected next
    dividend (50,000 = 5x)."""

    threshold_point_units: int
    growth_bps: int = 1_500
    rate_bps_schedule: tuple[int, ...] = (50,)
    credit_limit_bps: int = 50_000

    def __post_init__(self) -> None:
        problems: list[str] = []
        _problem_int(problems, self.threshold_point_units, "threshold_point_units", 1)
        _problem_int(problems, self.growth_bps, "growth_bps", 1, 100 * BPS_DENOMINATOR)
        _problem_int(problems, self.credit_limit_bps, "credit_limit_bps", 0, 100 * BPS_DENOMINATOR)
        schedule = self.rate_bps_schedule
        if not isinstance(schedule, tuple) or not schedule:
            problems.append("rate_bps_schedule must be a non-empty tuple (round 1's rate first)")
        else:
            for k, rate in enumerate(schedule, 1):
                _problem_int(problems, rate, f"rate of round {k}", 1, BPS_DENOMINATOR)
            if all(_is_int(rate) for rate in schedule) and list(schedule) != sorted(schedule):
                problems.append(f"rate_bps_schedule must not decrease from round to round: {schedule}")
        _raise_problems(problems, "dividend settings")


LEVEL_POINTS_BASE = "base"  # levels count the merchant's base points of each earn (net of refunds)
LEVEL_POINTS_TOTAL = "total"  # levels count every point of each earn: base, level uplift, promotions
LEVEL_POINTS_MODES = (LEVEL_POINTS_BASE, LEVEL_POINTS_TOTAL)

VERIFICATION_OFF = "off"  # member_id alone spends a member's points
VERIFICATION_SPENDING = "spending"  # Redeem and Authorize must carry proof that the member is present
VERIFICATION_MODES = (VERIFICATION_OFF, VERIFICATION_SPENDING)
TRANSFERS_OFF, TRANSFERS_ON = "off", "on"  # member_transfers
TRANSFER_MODES = (TRANSFERS_OFF, TRANSFERS_ON)
VERIFICATION_FAILURES_MAX = 100
VERIFICATION_LOCKOUT_SECONDS_MAX = 30 * 86_400


# --- Channel economics (issue 16; docs/RULES.md section 12) ----------------------------------------

REGION_LEVELS = ("province", "city", "county")  # the region tree, top first
AGENT_SCOPE_REGION = "region"  # an agent earns on the merchants of its own region only
AGENT_SCOPE_SUBTREE = "subtree"  # ... and on those of every region below it
AGENT_SCOPES = (AGENT_SCOPE_REGION, AGENT_SCOPE_SUBTREE)


@dataclasses.dataclass(frozen=True, slots=True)
class ChannelSettings:
    """What promoters and regional agents earn at each settlement cut: basis points of the operator's fee
    revenue (statements' `fees`) from their merchants in the period. A merchant's fees can feed its
    promoter and, with scope "subtree", the agents of its county, city and province: the sum of those
    rates is at most 10000, so the operator never pays out more than it took from a merchant."""

    promoter_commission_bps: int = 0
    province_agent_share_bps: int = 0
    city_agent_share_bps: int = 0
    county_agent_share_bps: int = 0
    agent_scope: str = AGENT_SCOPE_SUBTREE

    def __post_init__(self) -> None:
        problems: list[str] = []
        rates = (
            self.promoter_commission_bps,
            self.province_agent_share_bps,
            self.city_agent_share_bps,
            self.county_agent_share_bps,
        )
        names = (
            "promoter_commission_bps",
            "province_agent_share_bps",
            "city_agent_share_bps",
            "county_agent_share_bps",
        )
        valid = [_problem_int(problems, rate, name, 0, BPS_DENOMINATOR) for rate, name in zip(rates, names)]
        if all(valid) and sum(rates) > BPS_DENOMINATOR:
            problems.append(
                f"promoter_commission_bps + the three agent shares must be at most {BPS_DENOMINATOR} "
                f"(got {sum(rates)}): a merchant's fees would be paid out more than once"
            )
        if self.agent_scope not in AGENT_SCOPES:
            problems.append(
                f"agent_scope must be one of {', '.join(map(repr, AGENT_SCOPES))} (got {self.agent_scope!r})"
            )
        _raise_problems(problems, "channel settings")

    def agent_share_bps(self, level: str) -> int:
        """The share of the agent of a region at `level` (province, city or county)."""
        return {
            "province": self.province_agent_share_bps,
            "city": self.city_agent_share_bps,
            "county": self.county_agent_share_bps,
        }[level]


@dataclasses.dataclass(frozen=True, slots=True)
class ProgramVersion:
    """The rules of a program from effective_from_us until the next version's. A transaction records
    `version_id` and is refunded, expired and clawed back under that version's rules."""

    program_id: str
    version: int
    effective_from_us: int
    expiry_period_us: int | None = None  # None: points never expire
    restore_grace_us: int = 30 * DAY_US  # life of restored points whose lot already expired
    levels: tuple[Level, ...] = PLAN_LEVELS
    tier_window_us: int | None = None  # None: qualifying points counted in total
    dividends: DividendSettings | None = None  # None: the program has no dividend pool
    acquiring_share_bps: int = 0  # network default; MerchantTerms override it
    referral_bonus_point_units: int = 0
    referral_minimum_purchase: int = 1  # minor units a referee's first earn must reach
    promotions: tuple[Promotion, ...] = ()
    merchant_terms: tuple[MerchantTerms, ...] = ()
    operator_store_merchant_id: str | None = None  # the operator's own store; None: merchants cannot
    # spend their vouchers
    # member presence (docs/RULES.md section 10): "off" or "spending" (Redeem/Authorize need a MemberProof)
    member_verification: str = VERIFICATION_OFF
    verification_failures_max: int = 5  # wrong proofs in a row before the member's spending locks
    verification_lockout_seconds: int = 900  # how long the lock lasts
    member_points_spent_per_hour_max: int = 0  # point-units per rolling hour; 0 = no cap
    member_points_spent_per_day_max: int = 0  # point-units per rolling 24 hours; 0 = no cap
    # --- the seed systems' rules (issue 16; docs/RULES.md section 11) ---
    # 众店: the merchant of an earn receives floor(base * merchant_match_bps / 10000) point-units into its
    # merchant_points account (10,000 = as many points as the member's give-back points), operator-funded
    merchant_match_bps: int = 0
    # seed 003: point-units credited to a member once, when it enrols (its first earn or link) under
    # the program; operator-funded
    signup_bonus_point_units: int = 0
    # seed 003: the referrer also gets floor(referee's first qualifying earn's base * bps / 10000)
    # point-units beside referral_bonus_point_units (8,000 = 80%)
    referral_share_bps: int = 0
    # seed 003: what levels count: "base" (the merchant's give-back points) or "total" (every point of
    # the member's earns: base, level uplift and promotion grants), net of refunds either way
    level_points: str = LEVEL_POINTS_BASE
    # seed 000: the operator's fee on the sale amount of each earn, floor(purchase * bps / 10000)
    # point-units (currency minor units), beside the merchant's fee_issued_bps on points
    fee_sale_bps: int = 0
    # seed 000: the give-back rates merchants may have while this version is in force (bps of the purchase;
    # 10,000 = 100%: "1000 yuan ... 1000 points"); an earn at a merchant outside them is refused
    give_back_bps_min: int = 300
    give_back_bps_max: int = 2_000
    # seed 003: the rebate of the operator's fees by star rating (MerchantTerms.star_rating): entry k-1
    # for k stars, bps of each fee given back by charging less (the rebate rounded down); () = none
    star_fee_rebate_bps: tuple[int, ...] = ()
    # 众店: merchants spend their vouchers at any merchant of the alliance (SpendMerchantVouchers
    # at_merchant_id), not only at operator_store_merchant_id
    merchant_vouchers_anywhere: bool = False
    # 众店's fan reward: the asset the acquiring share (acquiring_share_bps) is paid in, "POINTS" (a
    # receivable of the acquirer, as before) or "VOUCHERS" (into its merchant_vouchers, kind 30); and
    # whether it is paid on earns at the acquirer itself too ("去平台任意消费")
    acquiring_reward_asset: str = ASSET_POINTS
    acquiring_at_acquirer: bool = False
    # 众店: merchants too may spend vouchers on credit, up to credit_limit_bps of the expected next dividend
    # on the points they hold from the merchant match (needs dividends)
    merchant_voucher_credit: bool = False
    # channel economics (issue 16): None = no promoter commissions and no agent shares
    channel: ChannelSettings | None = None
    # member-to-member transfers (MemberAdminService.TransferPoints, issue 15): "off" or "on"; the fee in
    # basis points of the points sent (to operator_transfer_fees); point-units a member may send per UTC
    # day, 0 = no cap
    member_transfers: str = TRANSFERS_OFF
    member_transfer_fee_bps: int = 0
    member_points_transferred_per_day_max: int = 0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.program_id, str) or not self.program_id:
            problems.append("program_id must be a non-empty string")
        _problem_int(problems, self.version, "version", 1)
        _problem_int(problems, self.effective_from_us, "effective_from_us")
        if self.expiry_period_us is not None:
            _problem_int(problems, self.expiry_period_us, "expiry_period_us (None = never expire)", 1)
        _problem_int(problems, self.restore_grace_us, "restore_grace_us")
        if self.tier_window_us is not None:
            _problem_int(problems, self.tier_window_us, "tier_window_us (None = in total)", 1)
        _problem_int(problems, self.acquiring_share_bps, "acquiring_share_bps", 0, BPS_DENOMINATOR)
        _problem_int(problems, self.referral_bonus_point_units, "referral_bonus_point_units")
        _problem_int(problems, self.referral_minimum_purchase, "referral_minimum_purchase", 1)
        problems += _level_problems(self.levels)
        names = {level.name for level in self.levels} if isinstance(self.levels, tuple) else set()
        ids = [promotion.promotion_id for promotion in self.promotions]
        if len(ids) != len(set(ids)):
            problems.append(f"promotion ids must be unique: {sorted(ids)}")
        for promotion in self.promotions:
            if promotion.scope == SCOPE_TIER and promotion.scope_id not in names:
                problems.append(
                    f"promotion {promotion.promotion_id!r} names level {promotion.scope_id!r}, "
                    f"which is not one of {sorted(names)}"
                )
        store = self.operator_store_merchant_id
        if store is not None and (not isinstance(store, str) or not store):
            problems.append("operator_store_merchant_id must be a merchant id (None = no operator store)")
        if self.member_verification not in VERIFICATION_MODES:
            problems.append(
                f"member_verification must be one of {', '.join(map(repr, VERIFICATION_MODES))} "
                f"(got {self.member_verification!r})"
            )
        _problem_int(
            problems, self.verification_failures_max, "verification_failures_max", 1, VERIFICATION_FAILURES_MAX
        )
        _problem_int(
            problems,
            self.verification_lockout_seconds,
            "verification_lockout_seconds",
            1,
            VERIFICATION_LOCKOUT_SECONDS_MAX,
        )
        _problem_int(problems, self.member_points_spent_per_hour_max, "member_points_spent_per_hour_max (0 = no cap)")
        _problem_int(problems, self.member_points_spent_per_day_max, "member_points_spent_per_day_max (0 = no cap)")
        if self.member_transfers not in TRANSFER_MODES:
            problems.append(f"member_transfers must be 'off' or 'on' (got {self.member_transfers!r})")
        _problem_int(problems, self.member_transfer_fee_bps, "member_transfer_fee_bps", 0, BPS_DENOMINATOR)
        _problem_int(
            problems, self.member_points_transferred_per_day_max, "member_points_transferred_per_day_max (0 = no cap)"
        )
        merchants = [terms.merchant_id for terms in self.merchant_terms]
        if len(merchants) != len(set(merchants)):
            problems.append(f"merchant_terms must name each merchant once: {sorted(merchants)}")
        problems += _seed_problems(self)
        _raise_problems(problems, f"program {self.program_id!r} version {self.version!r}")

    @property
    def version_id(self) -> str:
        return f"{self.program_id}@{self.version}"

    def expires_at_us(self, credited_at_us: int) -> int | None:
        return None if self.expiry_period_us is None else credited_at_us + self.expiry_period_us

    def level(self, name: str) -> Level:
        for level in self.levels:
            if level.name == name:
                return level
        raise Rejection(
            Code.INVALID_ARGUMENT,
            f"level {name!r} is not one of program {self.version_id}'s levels {[level.name for level in self.levels]}",
        )

    def terms(self, merchant_id: str) -> MerchantTerms | None:
        for terms in self.merchant_terms:
            if terms.merchant_id == merchant_id:
                return terms
        return None

    def acquiring_share_bps_for(self, acquirer_id: str) -> int:
        terms = self.terms(acquirer_id)
        if terms is not None and terms.acquiring_share_bps is not None:
            return terms.acquiring_share_bps
        return self.acquiring_share_bps

    def conversion_rate_for(self, merchant_id: str) -> Rate:
        terms = self.terms(merchant_id)
        if terms is None or terms.conversion_rate is None:
            raise Rejection(
                Code.FAILED_PRECONDITION,
                f"merchant {merchant_id!r} has no agreed conversion rate in program "
                f"{self.version_id}; the operator must add one before converting its points",
            )
        return terms.conversion_rate


def _seed_problems(version: ProgramVersion) -> list[str]:
    """The checks of the seed systems' settings (issue 16), each naming its field."""
    problems: list[str] = []
    _problem_int(
        problems, version.merchant_match_bps, "merchant_match_bps (10000 = as many as the member)", 0, BPS_DENOMINATOR
    )
    _problem_int(problems, version.signup_bonus_point_units, "signup_bonus_point_units")
    _problem_int(problems, version.referral_share_bps, "referral_share_bps", 0, BPS_DENOMINATOR)
    if version.level_points not in LEVEL_POINTS_MODES:
        problems.append(
            f"level_points must be one of {', '.join(map(repr, LEVEL_POINTS_MODES))} (got {version.level_points!r})"
        )
    _problem_int(problems, version.fee_sale_bps, "fee_sale_bps", 0, BPS_DENOMINATOR)
    low = _problem_int(problems, version.give_back_bps_min, "give_back_bps_min", 1, BPS_DENOMINATOR)
    high = _problem_int(problems, version.give_back_bps_max, "give_back_bps_max (10000 = 100%)", 1, BPS_DENOMINATOR)
    if low and high and version.give_back_bps_min > version.give_back_bps_max:
        problems.append(
            f"give_back_bps_min ({version.give_back_bps_min}) must not be above give_back_bps_max "
            f"({version.give_back_bps_max})"
        )
    for flag in ("merchant_vouchers_anywhere", "acquiring_at_acquirer", "merchant_voucher_credit"):
        if not isinstance(getattr(version, flag), bool):
            problems.append(f"{flag} must be true or false")
    if version.acquiring_reward_asset not in (ASSET_POINTS, ASSET_VOUCHERS):
        problems.append(
            f"acquiring_reward_asset must be {ASSET_POINTS!r} or {ASSET_VOUCHERS!r} (got {version.acquiring_reward_asset!r})"
        )
    if version.merchant_voucher_credit is True and version.dividends is None:
        problems.append("merchant_voucher_credit needs dividends: the credit is a multiple of the expected dividend")
    schedule = version.star_fee_rebate_bps
    if not isinstance(schedule, tuple) or len(schedule) > STARS_MAX:
        problems.append(f"star_fee_rebate_bps must be a list of at most {STARS_MAX} rebates (1 star first)")
    else:
        for stars, rebate in enumerate(schedule, 1):
            _problem_int(problems, rebate, f"star_fee_rebate_bps: rebate of {stars} star(s)", 0, BPS_DENOMINATOR)
        if all(_is_int(rebate) for rebate in schedule) and list(schedule) != sorted(schedule):
            problems.append(f"star_fee_rebate_bps must not decrease with the stars: {list(schedule)}")
        for terms in version.merchant_terms:
            if terms.star_rating is not None and terms.star_rating > len(schedule):
                problems.append(
                    f"merchant_terms of {terms.merchant_id!r}: star_rating {terms.star_rating} has no rebate in "
                    f"star_fee_rebate_bps ({len(schedule)} entries)"
                )
    return problems


def _level_problems(levels: Any) -> list[str]:
    if not isinstance(levels, tuple) or not levels or not all(isinstance(level, Level) for level in levels):
        return ["levels must be a non-empty tuple of Level, lowest first"]
    problems = []
    if levels[0].threshold_point_units != 0:
        problems.append(f"the first level ({levels[0].name!r}) must have threshold 0: every member has a level")
    if levels[0].bonus_point_units != 0:
        problems.append(f"the first level ({levels[0].name!r}) cannot carry a bonus: members start there")
    for lower, higher in zip(levels, levels[1:]):
        if higher.threshold_point_units <= lower.threshold_point_units:
            problems.append(
                f"thresholds must increase: {higher.name!r} ({higher.threshold_point_units}) is "
                f"not above {lower.name!r} ({lower.threshold_point_units})"
            )
        if higher.multiplier_bps < lower.multiplier_bps:
            problems.append(
                f"multipliers must not decrease: {higher.name!r} ({higher.multiplier_bps}) is "
                f"below {lower.name!r} ({lower.multiplier_bps})"
            )
    names = [level.name for level in levels]
    if len(names) != len(set(names)):
        problems.append(f"level names must be unique: {names}")
    return problems


@dataclasses.dataclass(frozen=True, slots=True)
class Program:
    """A program's versions, oldest first; a version applies from its effective_from_us onward."""

    program_id: str
    versions: tuple[ProgramVersion, ...]

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.versions, tuple) or not self.versions:
            problems.append("versions must be a non-empty tuple, oldest first")
        else:
            for number, version in enumerate(self.versions, 1):
                if version.program_id != self.program_id:
                    problems.append(f"version {version.version} belongs to program {version.program_id!r}")
                if version.version != number:
                    problems.append(
                        f"versions must be numbered 1, 2, 3 ... in order: position {number} "
                        f"holds version {version.version}"
                    )
            for earlier, later in zip(self.versions, self.versions[1:]):
                if later.effective_from_us <= earlier.effective_from_us:
                    problems.append(
                        f"effective_from_us must increase: version {later.version} "
                        f"({later.effective_from_us}) does not start after version "
                        f"{earlier.version} ({earlier.effective_from_us})"
                    )
        _raise_problems(problems, f"program {self.program_id!r}")

    def at(self, when_us: int) -> ProgramVersion:
        for version in reversed(self.versions):
            if version.effective_from_us <= when_us:
                return version
        raise Rejection(
            Code.FAILED_PRECONDITION,
            f"program {self.program_id!r} has no version in force at {when_us} us; its first "
            f"version starts at {self.versions[0].effective_from_us} us",
        )

    def with_version(self, version: ProgramVersion, now_us: int) -> Program:
        """The program with `version` added. A version may not start before now: that would change the
        rules of transactions already made under the version in force."""
        _not_in_the_past(version, now_us)
        return Program(self.program_id, self.versions + (version,))


def _not_in_the_past(version: ProgramVersion, now_us: int) -> None:
    if version.effective_from_us < now_us:
        raise ConfigError(
            f"version {version.version} of {version.program_id!r} starts at "
            f"{version.effective_from_us} us, before now ({now_us} us); a change applies "
            f"from now or later, never to the past"
        )


class RuleBook:
    """Every program, versioned: `at(program_id, when_us)` is the version in force at that time."""

    def __init__(self, programs: Iterable[Program] = ()):
        self._programs: dict[str, Program] = {}
        for program in programs:
            if program.program_id in self._programs:
                raise ConfigError(f"program {program.program_id!r} is given twice; give each program once")
            self._programs[program.program_id] = program

    def program(self, program_id: str) -> Program:
        program = self._programs.get(program_id)
        if program is None:
            raise Rejection(
                Code.NOT_FOUND, f"program {program_id!r} does not exist; known programs: {sorted(self._programs)[:20]}"
            )
        return program

    def at(self, program_id: str, when_us: int) -> ProgramVersion:
        return self.program(program_id).at(when_us)

    def with_version(self, version: ProgramVersion, now_us: int) -> RuleBook:
        """The rule book with `version` added (version 1 starts a new program); see Program.with_version."""
        programs = dict(self._programs)
        existing = programs.get(version.program_id)
        if existing is None:
            _not_in_the_past(version, now_us)
            programs[version.program_id] = Program(version.program_id, (version,))
        else:
            programs[version.program_id] = existing.with_version(version, now_us)
        return RuleBook(programs.values())


# --- Configuration as JSON -----------------------------------------------------------------------
# A version's settings as program_versions.config stores them and the CLI and the admin API take them:
# a JSON object with one key per ProgramVersion field except program_id, version and effective_from_us
# (columns of their own). Rates are {"numerator": n, "denominator": d}; a None field is null. A key
# missing from an input takes the field's default; version_to_config writes every key, and that is what
# is stored, so a stored version never depends on a default a later release may change.

LEVELS_MAX = 63  # member_programs.levels_reached is a bigint bitmask: bit i = level i
PROMOTIONS_MAX = 10_000
MERCHANT_TERMS_MAX = 100_000
RATE_SCHEDULE_MAX = 1_000
CONFIG_TEXT_CHARS_MAX = 200  # names and ids
_COLUMNS = ("program_id", "version", "effective_from_us")
_BAD = object()  # a value that did not decode; its problem is listed already
# decodes one configuration value: (problems to append to, the value, where it is) -> the value or _BAD
Decoder = Callable[[list[str], Any, str], Any]


def _json_value(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {field.name: _json_value(getattr(value, field.name)) for field in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_json_value(item) for item in value]
    return value


def version_to_config(version: ProgramVersion) -> dict[str, Any]:
    """Every setting of `version` (not program_id, version, effective_from_us) as JSON-safe values;
    version_from_config(..., version_to_config(v)) == v."""
    config: dict[str, Any] = _json_value(version)
    for column in _COLUMNS:
        del config[column]
    return config


def _shown(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _path(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _integer(problems: list[str], value: Any, where: str) -> Any:
    if _is_int(value):
        return value
    problems.append(f"{where} must be an integer (got {_shown(value)})")
    return _BAD


def _text(problems: list[str], value: Any, where: str) -> Any:
    if isinstance(value, str) and len(value) <= CONFIG_TEXT_CHARS_MAX:
        return value
    problems.append(f"{where} must be a string of at most {CONFIG_TEXT_CHARS_MAX} characters (got {_shown(value)})")
    return _BAD


def _boolean(problems: list[str], value: Any, where: str) -> Any:
    if isinstance(value, bool):
        return value
    problems.append(f"{where} must be true or false (got {_shown(value)})")
    return _BAD


def _nullable(decode: Decoder, meaning: str) -> Decoder:
    def decode_nullable(problems: list[str], value: Any, where: str) -> Any:
        if value is None:
            return None
        found: list[str] = []
        decoded = decode(found, value, where)
        if decoded is _BAD and not isinstance(value, dict):  # the wrong type: say null is allowed
            found[-1] += f", or null for {meaning}"
        problems.extend(found)
        return decoded

    return decode_nullable


def _list(decode: Decoder, limit: int, what: str) -> Decoder:
    def decode_list(problems: list[str], value: Any, where: str) -> Any:
        if not isinstance(value, list):
            problems.append(f"{where} must be a list of {what} (got {_shown(value)})")
            return _BAD
        if len(value) > limit:
            problems.append(f"{where} has {len(value)} entries; at most {limit}")
            return _BAD
        items = [decode(problems, item, f"{where}[{index}]") for index, item in enumerate(value)]
        return _BAD if any(item is _BAD for item in items) else tuple(items)

    return decode_list


def _fields(
    problems: list[str], value: Any, where: str, cls: type, kinds: Mapping[str, Decoder]
) -> tuple[dict[str, Any], bool, bool]:
    """(fields, complete, clean): the fields of `cls` a JSON object gives, decoded. Every unknown key,
    missing required key and wrong type is listed in problems; complete says every required field is
    there and every given one decoded (so the object can be built and range-checked), clean that
    there was no problem at all."""
    what = f"{where} " if where else "the configuration "
    if not isinstance(value, dict):
        problems.append(f"{what}must be an object with keys {', '.join(kinds)} (got {_shown(value)})")
        return {}, False, False
    unknown = [key for key in value if key not in kinds]
    if unknown:
        problems.append(
            f"{what}has unknown key{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the keys are {', '.join(kinds)}"
        )
    required = [
        field.name
        for field in dataclasses.fields(cls)
        if field.name in kinds and field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
    ]
    missing = [key for key in required if key not in value]
    if missing:
        problems.append(f"{what}needs {', '.join(missing)} (required: {', '.join(required)})")
    fields = {}
    for key, decode in kinds.items():
        if key in value:
            decoded = decode(problems, value[key], _path(where, key))
            if decoded is not _BAD:
                fields[key] = decoded
    complete = not missing and len(fields) == len(value) - len(unknown)
    return fields, complete, complete and not unknown


def _construct(problems: list[str], where: str, cls: type, fields: dict[str, Any]) -> Any:
    try:
        return cls(**fields)
    except ConfigError as error:
        problems.append(f"{where}: {error}")
        return _BAD


def _object(cls: type, kinds: Mapping[str, Decoder]) -> Decoder:
    def decode_object(problems: list[str], value: Any, where: str) -> Any:
        fields, complete, clean = _fields(problems, value, where, cls, kinds)
        built = _construct(problems, where, cls, fields) if complete else _BAD
        return built if clean else _BAD

    return decode_object


_RATE = _object(Rate, {"numerator": _integer, "denominator": _integer})
_LEVEL = _object(
    Level, {"name": _text, "threshold_point_units": _integer, "bonus_point_units": _integer, "multiplier_bps": _integer}
)
_PROMOTION = _object(
    Promotion,
    {
        "promotion_id": _text,
        "start_us": _integer,
        "end_us": _integer,
        "scope": _text,
        "scope_id": _text,
        "multiplier_bps": _integer,
        "bonus_point_units": _integer,
        "budget_point_units": _integer,
        "sponsor_id": _text,
    },
)
_MERCHANT_TERMS = _object(
    MerchantTerms,
    {
        "merchant_id": _text,
        "acquiring_share_bps": _nullable(_integer, "the network's acquiring_share_bps"),
        "conversion_rate": _nullable(_RATE, "no agreed rate: the merchant cannot convert"),
        "star_rating": _nullable(_integer, "not rated"),
    },
)
_DIVIDENDS = _object(
    DividendSettings,
    {
        "threshold_point_units": _integer,
        "growth_bps": _integer,
        "rate_bps_schedule": _list(_integer, RATE_SCHEDULE_MAX, "integers (basis points, round 1 first)"),
        "credit_limit_bps": _integer,
    },
)
_CHANNEL = _object(
    ChannelSettings,
    {
        "promoter_commission_bps": _integer,
        "province_agent_share_bps": _integer,
        "city_agent_share_bps": _integer,
        "county_agent_share_bps": _integer,
        "agent_scope": _text,
    },
)
_VERSION_KINDS = {
    "expiry_period_us": _nullable(_integer, "never expire"),
    "restore_grace_us": _integer,
    "levels": _list(_LEVEL, LEVELS_MAX, "level objects, lowest first"),
    "tier_window_us": _nullable(_integer, "in total"),
    "dividends": _nullable(_DIVIDENDS, "no dividend pool"),
    "acquiring_share_bps": _integer,
    "referral_bonus_point_units": _integer,
    "referral_minimum_purchase": _integer,
    "promotions": _list(_PROMOTION, PROMOTIONS_MAX, "promotion objects"),
    "merchant_terms": _list(_MERCHANT_TERMS, MERCHANT_TERMS_MAX, "merchant terms objects"),
    "operator_store_merchant_id": _nullable(_text, "no operator store"),
    "member_verification": _text,
    "verification_failures_max": _integer,
    "verification_lockout_seconds": _integer,
    "member_points_spent_per_hour_max": _integer,
    "member_points_spent_per_day_max": _integer,
    # issue 16: the seed systems' rules
    "merchant_match_bps": _integer,
    "signup_bonus_point_units": _integer,
    "referral_share_bps": _integer,
    "level_points": _text,
    "fee_sale_bps": _integer,
    "give_back_bps_min": _integer,
    "give_back_bps_max": _integer,
    "star_fee_rebate_bps": _list(_integer, STARS_MAX, "integers (basis points, 1 star first)"),
    "merchant_vouchers_anywhere": _boolean,
    "acquiring_reward_asset": _text,
    "acquiring_at_acquirer": _boolean,
    "merchant_voucher_credit": _boolean,
    "channel": _nullable(_CHANNEL, "no channel commissions"),
    "member_transfers": _text,
    "member_transfer_fee_bps": _integer,
    "member_points_transferred_per_day_max": _integer,
}
CONFIG_KEYS = tuple(_VERSION_KINDS)
require(
    set(CONFIG_KEYS) | set(_COLUMNS) == {field.name for field in dataclasses.fields(ProgramVersion)},
    "the configuration codec must know every ProgramVersion field",
)


def version_from_config(
    program_id: str, version: int, effective_from_us: int, config: dict[str, Any]
) -> ProgramVersion:
    """The ProgramVersion a configuration describes. ConfigError lists every problem found (unknown
    keys, wrong types, each nested object's problems, then the checks across fields), each with the
    key it is about and what is allowed."""
    problems: list[str] = []
    prefix = f"program {program_id!r} version {version!r}: "
    fields, _, clean = _fields(problems, config, "", ProgramVersion, _VERSION_KINDS)
    if not clean and isinstance(config, dict) and "levels" in config and "levels" not in fields:
        fields.pop("promotions", None)  # a tier promotion names a level: not checkable without them
    try:
        built = ProgramVersion(program_id, version, effective_from_us, **fields)
    except ConfigError as error:
        problems.append(str(error).removeprefix(prefix))
    if problems:
        raise ConfigError(prefix + "; ".join(problems) + "; correct these and send the whole configuration again")
    return built


def program_from_rows(program_id: str, rows: Iterable[Mapping[str, Any]]) -> Program | None:
    """The Program stored as program_versions rows (version, effective_from_us, config as a dict or JSON
    text), or None if there is none."""
    versions = []
    for row in sorted(rows, key=lambda row: row["version"]):
        config = row["config"]
        if isinstance(config, (str, bytes)):
            config = json.loads(config)
        versions.append(version_from_config(program_id, row["version"], row["effective_from_us"], config))
    return Program(program_id, tuple(versions)) if versions else None


# --- Expiry lots ---------------------------------------------------------------------------------


# Lot: points credited by one transaction, `amount` of them left, expiring at expires_at_us (None: never),
# keyed by (lot_id, expires_at_us); a consumption is a tuple of Lot pieces. A compiled immutable value the
# cyclic garbage collector does not track (fastpath/records.pyx: why, and its docstring).
Lot = records.Lot


class LotsAfter(NamedTuple):
    lots: tuple[Lot, ...]  # the member's lots afterwards, soonest-expiring first
    pieces: tuple[Lot, ...]  # what was taken, restored or expired, in that order
    left: tuple[Lot, ...] = ()  # restore only: the consumption not restored yet


def _order(lot: Lot) -> tuple[bool, int, int]:
    """Soonest-expiring first, never-expiring last, ties by lot id."""
    return (lot.expires_at_us is None, lot.expires_at_us or 0, lot.lot_id)


def _checked(lots: Iterable[Lot]) -> list[Lot]:
    # Runs on every spend over every lot of the member: the messages are built only when a check fails
    # (an f-string per lot per call was most of the program's cost: docs/DESIGN.md).
    lots = list(lots)
    keys = set()
    for lot in lots:
        if not isinstance(lot, Lot):
            require(False, f"not a Lot: {lot!r}")
        amount = lot.amount
        if not (type(amount) is int and 0 <= amount <= INT64_MAX):
            _check_int(amount, f"lot {lot.lot_id} amount")
        key = lot.key
        if key in keys:
            require(False, f"lot {key} appears twice")
        keys.add(key)
    return lots


def new_lot(version: ProgramVersion, transaction_id: int, amount: int, credited_at_us: int, issuer_id: str) -> Lot:
    """The lot of points credited by a transaction, expiring under the version it was made under."""
    _check_int(amount, "amount", 1)
    return Lot(transaction_id, amount, version.expires_at_us(credited_at_us), issuer_id)


def _take(lots: list[Lot], order: list[Lot], amount: int) -> LotsAfter:
    taken: dict[tuple[int, int | None], int] = {}
    pieces = []
    left = amount
    for lot in order:
        if left == 0:
            break
        piece = min(lot.amount, left)
        if piece:
            pieces.append(lot.replace(amount=piece))
            taken[lot.key] = piece
            left -= piece
    require(left == 0, "lots ran out after the availability check")
    # only the lots taken from change (a lot is immutable: the others are kept as they are)
    after = (lot if lot.key not in taken else lot.replace(amount=lot.amount - taken[lot.key]) for lot in lots)
    return LotsAfter(tuple(sorted((lot for lot in after if lot.amount > 0), key=_order)), tuple(pieces))


def consume(lots: Iterable[Lot], amount: int, now_us: int) -> LotsAfter:
    """Take `amount` from the lots spendable at now_us, soonest-expiring first (never-expiring last,
    ties by lot id). InsufficientBalance, with nothing taken, if they hold less."""
    lots = _checked(lots)
    _check_int(amount, "amount")
    live = sorted((lot for lot in lots if lot.live(now_us)), key=_order)
    available = sum(lot.amount for lot in live)
    if amount > available:
        raise InsufficientBalance(ASSET_POINTS, available, amount)
    return _take(lots, live, amount)


def restore(
    lots: Iterable[Lot], consumption: Iterable[Lot], now_us: int, grace_us: int, amount: int | None = None
) -> LotsAfter:
    """Put back `amount` (default: all) of a consumption, last piece first, so that a partial refund
    returns the latest-expiring points and refunds in parts add up to the whole. A piece whose lot is
    still live goes back to that lot with its own expiry; a piece whose lot expired meanwhile comes back
    as points expiring at now_us + grace_us (same lot id and issuer). `left` is what a later refund may
    still restore."""
    after = {lot.key: lot for lot in _checked(lots)}
    left = list(_checked(consumption))
    total = sum(piece.amount for piece in left)
    amount = total if amount is None else amount
    _check_int(amount, "amount", 0, total)
    _check_int(grace_us, "grace_us")
    restored = []
    remaining = amount
    while remaining:
        piece = left.pop()
        back = min(piece.amount, remaining)
        if back < piece.amount:
            left.append(piece.replace(amount=piece.amount - back))
        expires = piece.expires_at_us if piece.live(now_us) else now_us + grace_us
        returned = piece.replace(amount=back, expires_at_us=expires)
        existing = after.get(returned.key)
        if existing is not None:
            require(existing.issuer_id == returned.issuer_id, f"lot {returned.lot_id} has two issuers")
            returned = existing.replace(amount=existing.amount + back)
        after[returned.key] = returned
        restored.append(returned.replace(amount=back))
        remaining -= back
    return LotsAfter(tuple(sorted(after.values(), key=_order)), tuple(restored), tuple(left))


def take_back_earn(lots: Iterable[Lot], earn_lot_id: int, amount: int, now_us: int) -> LotsAfter:
    """The lots a refund of an earn takes back: the earn's own lot first (even if it expired and the
    expiry job has not collected it yet: those are the very points being reversed), then, for the part
    the member already spent, the member's other spendable lots soonest-expiring first.
    InsufficientBalance if the member holds too few points (the balance never goes negative)."""
    lots = _checked(lots)
    _check_int(amount, "amount")
    own = sorted((lot for lot in lots if lot.lot_id == earn_lot_id), key=_order)
    others = sorted((lot for lot in lots if lot.lot_id != earn_lot_id and lot.live(now_us)), key=_order)
    available = sum(lot.amount for lot in own + others)
    if amount > available:
        raise InsufficientBalance(ASSET_POINTS, available, amount)
    return _take(lots, own + others, amount)


def expire_due(lots: Iterable[Lot], now_us: int) -> LotsAfter:
    """Split the lots into those still live at now_us (`lots`) and the pieces that expire (`pieces`,
    soonest first, each a whole lot). Run again on the result, it finds nothing: the job is idempotent
    as long as each expiry is posted with the lot it removes."""
    lots = _checked(lots)
    expired = tuple(sorted((lot for lot in lots if not lot.live(now_us) and lot.amount > 0), key=_order))
    live = tuple(sorted((lot for lot in lots if lot.live(now_us) and lot.amount > 0), key=_order))
    return LotsAfter(live, expired)


def expiring_within(lots: Iterable[Lot], now_us: int, window_us: int) -> list[tuple[int, int]]:
    """[(expires_at_us, amount)] of points that are live now and expire at or before now + window,
    soonest first, one row per instant (for GetBalance)."""
    _check_int(window_us, "window_us")
    totals: dict[int, int] = {}
    for lot in _checked(lots):
        if lot.expires_at_us is not None and now_us < lot.expires_at_us <= now_us + window_us and lot.amount:
            totals[lot.expires_at_us] = totals.get(lot.expires_at_us, 0) + lot.amount
    return sorted(totals.items())


def expiry_postings(member_id: str, piece: Lot) -> tuple[Posting, ...]:
    """One lot's expiry (transaction kind EXPIRY, attributed to piece.issuer_id)."""
    return balanced(
        [
            (ACCOUNT_MEMBER, member_id, ASSET_POINTS, -piece.amount),
            (ACCOUNT_OPERATOR_BREAKAGE, OPERATOR_ID, ASSET_POINTS, piece.amount),
        ]
    )


# --- Tiers ---------------------------------------------------------------------------------------


def qualifying_point_units(earns: Iterable[tuple[int, int]], now_us: int, window_us: int | None) -> int:
    """Points that count towards a level: base earn points net of their refunds, each dated at its
    earn, over (now - window, now] (or all up to now when window_us is None). Bonuses, dividends and
    conversions never qualify."""
    total = 0
    for at_us, point_units in earns:
        if at_us <= now_us and (window_us is None or at_us > now_us - window_us):
            total += point_units
    return total


def level_for(earned_point_units: int, levels: tuple[Level, ...] = PLAN_LEVELS) -> Level:
    """The highest level whose threshold the qualifying points reach (>=)."""
    reached = levels[0]
    for level in levels:
        if earned_point_units >= level.threshold_point_units:
            reached = level
    return reached


def tier_bonuses(
    levels: tuple[Level, ...], earned_point_units: int, reached_before: Collection[str]
) -> list[tuple[str, int]]:
    """[(level name, bonus)] for every level the qualifying points reach that this member never
    reached before, lowest first (a jump over a level pays that level's bonus too; a member who drops
    and re-reaches a level is not paid again). The caller records the names as reached."""
    return [
        (level.name, level.bonus_point_units)
        for level in levels[1:]
        if earned_point_units >= level.threshold_point_units and level.name not in reached_before
    ]


def tier_bonus_postings(member_id: str, bonus_point_units: int) -> tuple[Posting, ...]:
    return balanced(
        [
            (ACCOUNT_OPERATOR_TIER_REWARDS, OPERATOR_ID, ASSET_POINTS, -bonus_point_units),
            (ACCOUNT_MEMBER, member_id, ASSET_POINTS, bonus_point_units),
        ]
    )


# --- Promotions and the earn ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class EarnContext:
    merchant_id: str
    level: str  # the member's level before this earn
    at_us: int


def promotion_applies(promotion: Promotion, context: EarnContext) -> bool:
    if not promotion.start_us <= context.at_us < promotion.end_us:
        return False
    if promotion.scope == SCOPE_MERCHANT:
        return promotion.scope_id == context.merchant_id
    if promotion.scope == SCOPE_TIER:
        return promotion.scope_id == context.level
    return True


def promotion_bonus(
    promotions: Iterable[Promotion], context: EarnContext, base_points: int, budget_left: Mapping[str, int]
) -> list[tuple[str, int]]:
    """[(promotion_id, bonus)] for every promotion in force for this earn, by promotion id. Promotions
    stack additively, each computed on the base points alone (never on another's bonus): multiplier
    bonus = floor(base * (multiplier_bps - 10000) / 10000) (rounded down, in the sponsor's favour), or
    the fixed bonus. Each is cut to its budget left (partial grant at the cap; nothing once spent; a
    promotion missing from budget_left has its whole budget). No bonus on an earn of 0 points."""
    _check_int(base_points, "base_points")
    grants: list[tuple[str, int]] = []
    if base_points == 0:
        return grants
    for promotion in sorted(promotions, key=lambda p: p.promotion_id):
        if not promotion_applies(promotion, context):
            continue
        if promotion.multiplier_bps:
            bonus = _floor_bps(base_points, promotion.multiplier_bps - BPS_DENOMINATOR)
        else:
            bonus = promotion.bonus_point_units
        left = budget_left.get(promotion.promotion_id, promotion.budget_point_units)
        _check_int(left, f"budget left of {promotion.promotion_id}")
        granted = min(bonus, left)
        if granted > 0:
            grants.append((promotion.promotion_id, granted))
    return grants


# Grant (promotion_id, sponsor_id, amount) and Earn (base, uplift=0, grants=(); .total): the points of one
# earn transaction, all in the earn's lot: the merchant's base points, the operator-funded uplift of the
# member's level, and promotion grants. Compiled values, as Lot.
Grant = records.Grant
Earn = records.Earn


def earn_with_rules(
    version: ProgramVersion, context: EarnContext, base_point_units: int, budget_left: Mapping[str, int]
) -> Earn:
    """An earn under `version`: base = domain.earn_point_units(purchase, give_back_bps); uplift =
    floor(base * multiplier_bps / 10000) - base at the member's level before this earn (rounded down,
    in the operator's favour); promotions as promotion_bonus()."""
    _check_int(base_point_units, "base_point_units")
    multiplier_bps = version.level(context.level).multiplier_bps
    uplift = _floor_bps(base_point_units, multiplier_bps) - base_point_units
    sponsors = {promotion.promotion_id: promotion.sponsor_id for promotion in version.promotions}
    grants = tuple(
        Grant(promotion_id, sponsors[promotion_id], amount)
        for promotion_id, amount in promotion_bonus(version.promotions, context, base_point_units, budget_left)
    )
    return Earn(base_point_units, uplift, grants)


def _sponsor_account(sponsor_id: str) -> tuple[str, str]:
    if sponsor_id == OPERATOR_ID:
        return (ACCOUNT_OPERATOR_PROMOTIONS, OPERATOR_ID)
    return (ACCOUNT_MERCHANT_ISSUED, sponsor_id)


def earn_postings(member_id: str, merchant_id: str, earn: Earn) -> tuple[Posting, ...]:
    rows = [
        (ACCOUNT_MERCHANT_ISSUED, merchant_id, ASSET_POINTS, -earn.base),
        (ACCOUNT_OPERATOR_TIER_REWARDS, OPERATOR_ID, ASSET_POINTS, -earn.uplift),
    ]
    rows += [(*_sponsor_account(grant.sponsor_id), ASSET_POINTS, -grant.amount) for grant in earn.grants]
    rows.append((ACCOUNT_MEMBER, member_id, ASSET_POINTS, earn.total))
    return balanced(rows)


def earn_refund(earn: Earn, refunded_before: int, amount: int) -> Earn:
    """What a refund of `amount` base points of `earn` takes back (after `refunded_before` base
    points): the base itself, and of the uplift and each grant their proportional_share (rounded
    down, in the member's favour; the last refund takes back exactly what is left)."""
    return Earn(
        amount,
        proportional_share(earn.uplift, earn.base, refunded_before, amount),
        tuple(
            grant.replace(amount=proportional_share(grant.amount, earn.base, refunded_before, amount))
            for grant in earn.grants
        ),
    )


def refund_earn_postings(member_id: str, merchant_id: str, portion: Earn) -> tuple[Posting, ...]:
    """Transaction kind 5: the earn's postings reversed for `portion` (from earn_refund)."""
    return negated(earn_postings(member_id, merchant_id, portion))


# --- Referrals and acquiring merchants -----------------------------------------------------------


def referral_bonus(
    version: ProgramVersion, referrer_id: str | None, already_paid: bool, purchase_amount: int, base_point_units: int
) -> int:
    """The referrer's bonus on this earn of the referee: the program's bonus on the referee's first
    qualifying earn (purchase >= referral_minimum_purchase, and some points earned), plus
    referral_share_bps of that earn's base points (rounded down, in the operator's favour), else 0."""
    _check_int(purchase_amount, "purchase_amount")
    if not referrer_id or already_paid or purchase_amount < version.referral_minimum_purchase or base_point_units <= 0:
        return 0
    return version.referral_bonus_point_units + _floor_bps(base_point_units, version.referral_share_bps)


def referral_postings(referrer_id: str, bonus_point_units: int) -> tuple[Posting, ...]:
    return balanced(
        [
            (ACCOUNT_OPERATOR_REFERRALS, OPERATOR_ID, ASSET_POINTS, -bonus_point_units),
            (ACCOUNT_MEMBER, referrer_id, ASSET_POINTS, bonus_point_units),
        ]
    )


def acquiring_reward(
    version: ProgramVersion, acquirer_id: str | None, merchant_id: str, purchase_amount: int, base_point_units: int
) -> int:
    """floor(purchase * share_bps / 10000) point-units (rounded down, in the operator's favour) for the
    merchant that signed the member up, when the member earns at another merchant (or at any merchant,
    the acquirer included, under acquiring_at_acquirer); 0 without an acquirer or on an earn of 0 points.
    Paid in the version's acquiring_reward_asset."""
    _check_int(purchase_amount, "purchase_amount")
    own_store_left_out = acquirer_id == merchant_id and not version.acquiring_at_acquirer
    if not acquirer_id or own_store_left_out or base_point_units <= 0:
        return 0
    return _floor_bps(purchase_amount, version.acquiring_share_bps_for(acquirer_id))


def acquiring_postings(acquirer_id: str, reward_point_units: int) -> tuple[Posting, ...]:
    """Kind ACQUIRING_REWARD; negated() of it with acquiring_reversal()'s amount is the reversal."""
    return balanced(
        [
            (ACCOUNT_OPERATOR_ACQUIRING, OPERATOR_ID, ASSET_POINTS, -reward_point_units),
            (ACCOUNT_MERCHANT_ACQUIRING, acquirer_id, ASSET_POINTS, reward_point_units),
        ]
    )


def acquiring_reversal(reward_point_units: int, earned_base: int, refunded_before: int, amount: int) -> int:
    """The part of a reward reversed when `amount` base points of its earn are refunded: its
    proportional_share (rounded down, in the acquirer's favour; exact once all is refunded)."""
    return proportional_share(reward_point_units, earned_base, refunded_before, amount)


# --- Merchant points conversion ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Conversion:
    merchant_points_converted: int
    point_units: int
    merchant_points_remainder: int  # stays in the merchant's own programme


def convert_merchant_points(merchant_points: int, rate: Rate) -> Conversion:
    """Convert in whole blocks: the largest quantity <= merchant_points that the rate turns into a
    whole number of point-units (a multiple of denominator / gcd(numerator, denominator)), so the
    conversion itself never rounds; the rest is reported and stays with the merchant's programme. The
    pipeline makes each conversion request idempotent (per merchant and idempotency key)."""
    _check_int(merchant_points, "merchant_points")
    block = rate.denominator // math.gcd(rate.numerator, rate.denominator)
    converted = merchant_points // block * block
    point_units = converted * rate.numerator // rate.denominator
    require(point_units * rate.denominator == converted * rate.numerator, "conversion is not exact")
    _check_int(point_units, "converted point_units")
    return Conversion(converted, point_units, merchant_points - converted)


def conversion_postings(merchant_id: str, member_id: str, point_units: int) -> tuple[Posting, ...]:
    """Kind CONVERSION: the merchant's issued account pays for the alliance points (like an earn)."""
    return balanced(
        [
            (ACCOUNT_MERCHANT_ISSUED, merchant_id, ASSET_POINTS, -point_units),
            (ACCOUNT_MEMBER, member_id, ASSET_POINTS, point_units),
        ]
    )


# --- Dividend pool and vouchers ------------------------------------------------------------------

HOLDER_MEMBER = "member"
HOLDER_MERCHANT = "merchant"


class Holder(NamedTuple):
    kind: str  # HOLDER_MEMBER or HOLDER_MERCHANT
    owner_id: str


def dividend_rate_bps(settings: DividendSettings, round_number: int) -> int:
    _check_int(round_number, "round_number", 1)
    schedule = settings.rate_bps_schedule
    return schedule[min(round_number, len(schedule)) - 1]


def dividend_trigger_point_units(settings: DividendSettings, previous_round_pool: int | None) -> int:
    """The pool size at which the next round is due: the threshold for the first round, then
    ceil(previous * (10000 + growth_bps) / 10000) (rounded up: a round never comes early)."""
    if previous_round_pool is None:
        return settings.threshold_point_units
    _check_int(previous_round_pool, "previous_round_pool")
    return -(-previous_round_pool * (BPS_DENOMINATOR + settings.growth_bps) // BPS_DENOMINATOR)


def dividend_due(settings: DividendSettings, pool_point_units: int, previous_round_pool: int | None) -> bool:
    """One round at most per check: a pool that grew by 40% since the last round is due one round,
    and the next one is measured from the pool at that round."""
    return pool_point_units >= dividend_trigger_point_units(settings, previous_round_pool)


def apply_dividend(credit_used: int, allocation: int) -> tuple[int, int]:
    """(repaid, paid_out): vouchers coming to a member repay its credit first, the rest is paid out."""
    _check_int(credit_used, "credit_used")
    _check_int(allocation, "allocation")
    repaid = min(credit_used, allocation)
    return repaid, allocation - repaid


@dataclasses.dataclass(frozen=True, slots=True)
class DividendAllocation:
    holder: Holder
    holding_point_units: int
    amount: int  # voucher-units allocated
    repaid: int  # of which repaid the holder's voucher credit
    paid_out: int  # of which credited to the holder's voucher balance


@dataclasses.dataclass(frozen=True, slots=True)
class DividendRound:
    """The audit record of a round: which round, which pool, which rate, what was issued to whom."""

    round_number: int
    pool_point_units: int
    rate_bps: int
    holdings_point_units: int
    total_issued: int
    allocations: tuple[DividendAllocation, ...]


def dividend_round(
    round_number: int,
    pool_point_units: int,
    rate_bps: int,
    holdings: Mapping[Holder, int],
    credit_used: Mapping[Holder, int] | None = None,
) -> DividendRound:
    """Vouchers for every holder of points: floor(holding * rate_bps / 10000) voucher-units each
    (rounded down per holder, in the operator's favour: the remainder is never issued, so nothing is
    left unbalanced), holders with no positive holding or a 0 allocation omitted, ordered by holder.
    total_issued is the sum of the allocations. A pure function of its inputs: recomputing a round
    gives the same record."""
    _check_int(round_number, "round_number", 1)
    _check_int(pool_point_units, "pool_point_units")
    _check_int(rate_bps, "rate_bps", 1, BPS_DENOMINATOR)
    credit_used = {Holder(*holder): used for holder, used in (credit_used or {}).items()}
    for holder, used in credit_used.items():
        require(holder.kind == HOLDER_MEMBER or used == 0, f"only members borrow vouchers: {holder}")
    holdings = {Holder(*holder): holding for holder, holding in holdings.items()}
    allocations = []
    holdings_total = 0
    for holder in sorted(holdings):
        require(holder.kind in (HOLDER_MEMBER, HOLDER_MERCHANT) and bool(holder.owner_id), f"bad holder {holder}")
        holding = holdings[holder]
        _check_int(holding, f"holding of {holder}", -INT64_MAX)
        if holding <= 0:
            continue
        holdings_total += holding
        amount = _floor_bps(holding, rate_bps)
        if amount == 0:
            continue
        repaid, paid_out = apply_dividend(credit_used.get(holder, 0), amount)
        allocations.append(DividendAllocation(holder, holding, amount, repaid, paid_out))
    total = sum(allocation.amount for allocation in allocations)
    _check_int(total, "total issued")
    return DividendRound(round_number, pool_point_units, rate_bps, holdings_total, total, tuple(allocations))


def dividend_postings(allocation: DividendAllocation) -> tuple[Posting, ...]:
    """Kind DIVIDEND, one holder: balanced on its own, so a round may be posted in chunks."""
    holder = allocation.holder
    account = ACCOUNT_MEMBER if holder.kind == HOLDER_MEMBER else ACCOUNT_MERCHANT_VOUCHERS
    return balanced(
        [
            (ACCOUNT_OPERATOR_DIVIDENDS, OPERATOR_ID, ASSET_VOUCHERS, -allocation.amount),
            (ACCOUNT_MEMBER_VOUCHER_CREDIT, holder.owner_id, ASSET_VOUCHERS, allocation.repaid),
            (account, holder.owner_id, ASSET_VOUCHERS, allocation.paid_out),
        ]
    )


def expected_dividend(holding_point_units: int, next_rate_bps: int) -> int:
    """floor(holding * next round's rate / 10000) voucher-units (rounded down, operator's favour)."""
    return _floor_bps(max(holding_point_units, 0), next_rate_bps)


def voucher_credit_limit(holding_point_units: int, next_rate_bps: int, credit_limit_bps: int) -> int:
    """floor(expected_dividend * credit_limit_bps / 10000) (rounded down, operator's favour)."""
    return _floor_bps(expected_dividend(holding_point_units, next_rate_bps), credit_limit_bps)


# --- Split tender --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class Tender:
    vouchers: int
    points: int

    @property
    def total(self) -> int:
        return self.vouchers + self.points


def split_tender(amount: int, vouchers_available: int, points_available: int, vouchers: int | None = None) -> Tender:
    """How a redeem of `amount` units (1 unit = 1 minor currency unit in either asset) is paid: with
    `vouchers` voucher-units and the rest in points as the caller says, or (vouchers=None) vouchers
    first. vouchers_available includes the member's unused credit. InsufficientBalance names the asset
    that falls short."""
    _check_int(amount, "amount")
    _check_int(vouchers_available, "vouchers_available")
    _check_int(points_available, "points_available")
    if vouchers is None:
        vouchers = min(amount, vouchers_available)
    elif not _is_int(vouchers) or not 0 <= vouchers <= amount:
        raise Rejection(Code.INVALID_ARGUMENT, f"vouchers must be 0..{amount} (the redeem's amount), got {vouchers!r}")
    points = amount - vouchers
    if vouchers > vouchers_available:
        raise InsufficientBalance(ASSET_VOUCHERS, vouchers_available, vouchers)
    if points > points_available:
        raise InsufficientBalance(ASSET_POINTS, points_available, points)
    return Tender(vouchers, points)


def voucher_sources(balance: int, credit_headroom: int, vouchers: int) -> tuple[int, int]:
    """(from_balance, from_credit): the member's own vouchers first, credit only for the rest."""
    _check_int(balance, "balance")
    _check_int(credit_headroom, "credit_headroom")
    _check_int(vouchers, "vouchers")
    if vouchers > balance + credit_headroom:
        raise InsufficientBalance(ASSET_VOUCHERS, balance + credit_headroom, vouchers)
    from_balance = min(balance, vouchers)
    return from_balance, vouchers - from_balance


def refund_tender(tender: Tender, refunded_before: int, amount: int) -> Tender:
    """The split of a refund of `amount` of a split redeem, after `refunded_before`: vouchers get
    their proportional_share (rounded down), points the rest, so every refund sums exactly to its
    amount and a full refund returns exactly the vouchers and points paid. No value is lost either
    way (both units are worth one minor unit); the unit of rounding goes to points."""
    vouchers = proportional_share(tender.vouchers, tender.total, refunded_before, amount)
    return Tender(vouchers, amount - vouchers)


def split_redeem_postings(member_id: str, merchant_id: str, tender: Tender, from_credit: int) -> tuple[Posting, ...]:
    """Kind SPLIT_REDEEM: each asset cleared on its own (the merchant's redeemed account per asset)."""
    _check_int(from_credit, "from_credit", 0, tender.vouchers)
    return balanced(
        [
            (ACCOUNT_MEMBER, member_id, ASSET_POINTS, -tender.points),
            (ACCOUNT_MERCHANT_REDEEMED, merchant_id, ASSET_POINTS, tender.points),
            (ACCOUNT_MEMBER, member_id, ASSET_VOUCHERS, -(tender.vouchers - from_credit)),
            (ACCOUNT_MEMBER_VOUCHER_CREDIT, member_id, ASSET_VOUCHERS, -from_credit),
            (ACCOUNT_MERCHANT_REDEEMED, merchant_id, ASSET_VOUCHERS, tender.vouchers),
        ]
    )


def split_refund_postings(member_id: str, merchant_id: str, portion: Tender, credit_repaid: int) -> tuple[Posting, ...]:
    """Kind SPLIT_REFUND: `portion` from refund_tender; its vouchers repay credit first
    (credit_repaid = apply_dividend(credit_used, portion.vouchers)[0])."""
    return negated(split_redeem_postings(member_id, merchant_id, portion, credit_repaid))


def merchant_voucher_spend_postings(merchant_id: str, store_merchant_id: str, vouchers: int) -> tuple[Posting, ...]:
    """Kind MERCHANT_VOUCHER_SPEND: a merchant spends its vouchers at the operator's own store."""
    return balanced(
        [
            (ACCOUNT_MERCHANT_VOUCHERS, merchant_id, ASSET_VOUCHERS, -vouchers),
            (ACCOUNT_MERCHANT_REDEEMED, store_merchant_id, ASSET_VOUCHERS, vouchers),
        ]
    )


# --- The seed systems' rules (issue 16; docs/RULES.md section 11) --------------------------------


def merchant_match(version: ProgramVersion, base_point_units: int) -> int:
    """众店: the point-units the merchant of an earn receives beside the member's base points:
    floor(base * merchant_match_bps / 10000) (rounded down, in the operator's favour, which funds it)."""
    _check_int(base_point_units, "base_point_units")
    return _floor_bps(base_point_units, version.merchant_match_bps)


def merchant_match_postings(merchant_id: str, match_point_units: int) -> tuple[Posting, ...]:
    """Kind MERCHANT_MATCH; negated() of it with merchant_match_reversal()'s amount is the reversal."""
    return balanced(
        [
            (ACCOUNT_OPERATOR_MERCHANT_MATCH, OPERATOR_ID, ASSET_POINTS, -match_point_units),
            (ACCOUNT_MERCHANT_POINTS, merchant_id, ASSET_POINTS, match_point_units),
        ]
    )


def merchant_match_reversal(match_point_units: int, earned_base: int, refunded_before: int, amount: int) -> int:
    """The part of a match reversed when `amount` base points of its earn are refunded: its
    proportional_share (rounded down, in the merchant's favour; exact once all is refunded)."""
    return proportional_share(match_point_units, earned_base, refunded_before, amount)


def signup_bonus_postings(member_id: str, bonus_point_units: int) -> tuple[Posting, ...]:
    """Kind SIGNUP_BONUS: the operator's one-off bonus to a member that enrols under the program."""
    return balanced(
        [
            (ACCOUNT_OPERATOR_SIGNUP_BONUSES, OPERATOR_ID, ASSET_POINTS, -bonus_point_units),
            (ACCOUNT_MEMBER, member_id, ASSET_POINTS, bonus_point_units),
        ]
    )


def level_point_units(version: ProgramVersion, earn: Earn) -> int:
    """What an earn adds to the member's qualifying points: its base points, or (level_points "total")
    every point it credited: base, level uplift and promotion grants. Sign-up, referral and level
    bonuses never count (a level bonus must not push the member to the next level)."""
    return earn.base if version.level_points == LEVEL_POINTS_BASE else earn.total


def sale_fee(version: ProgramVersion | None, purchase_amount: int) -> int:
    """Seed 000: the operator's fee on the sale, floor(purchase * fee_sale_bps / 10000) point-units
    (rounded down, in the merchant's favour, as every fee). Not returned when the earn is refunded."""
    _check_int(purchase_amount, "purchase_amount")
    return 0 if version is None else _floor_bps(purchase_amount, version.fee_sale_bps)


def star_fee_rebate(version: ProgramVersion | None, merchant_id: str, fee_point_units: int) -> int:
    """Seed 003: the part of a fee the merchant's star rating gives back (by charging less):
    floor(fee * star_fee_rebate_bps[stars - 1] / 10000), rounded down in the operator's favour; 0 for
    a merchant not rated, rated 0 stars, or without a program."""
    _check_int(fee_point_units, "fee_point_units")
    if version is None or not version.star_fee_rebate_bps:
        return 0
    terms = version.terms(merchant_id)
    if terms is None or not terms.star_rating:
        return 0
    return _floor_bps(fee_point_units, version.star_fee_rebate_bps[terms.star_rating - 1])


def check_give_back(version: ProgramVersion, merchant_id: str, give_back_bps: int) -> None:
    """Seed 000: a merchant earns under a version only with a give-back rate within its bounds
    (FAILED_PRECONDITION otherwise: the operator must set the merchant's rate within them)."""
    if not version.give_back_bps_min <= give_back_bps <= version.give_back_bps_max:
        raise Rejection(
            Code.FAILED_PRECONDITION,
            f"merchant {merchant_id!r} gives back {give_back_bps} bps, outside the "
            f"{version.give_back_bps_min}..{version.give_back_bps_max} bps program {version.version_id} allows; "
            "the operator must set its give-back within those bounds before it earns again",
        )


def fan_reward_postings(acquirer_id: str, reward: int, credit_used: int) -> tuple[Posting, ...]:
    """Kind FAN_REWARD: the acquirer's share of its fan's spend in vouchers, from the operator; the part
    that the merchant owes (credit_used) is repaid first, the rest credited to its vouchers."""
    repaid, paid_out = apply_dividend(credit_used, reward)
    return balanced(
        [
            (ACCOUNT_OPERATOR_FAN_REWARDS, OPERATOR_ID, ASSET_VOUCHERS, -reward),
            (ACCOUNT_MERCHANT_VOUCHER_CREDIT, acquirer_id, ASSET_VOUCHERS, repaid),
            (ACCOUNT_MERCHANT_VOUCHERS, acquirer_id, ASSET_VOUCHERS, paid_out),
        ]
    )


def fan_reward_reversal_postings(acquirer_id: str, reversal: int, held: int) -> tuple[Posting, ...]:
    """Kind FAN_REWARD_REVERSAL: the proportional reversal of a fan reward (acquiring_reversal's amount)
    taken from the vouchers the merchant holds; what it already spent it owes (merchant_voucher_credit,
    repaid first out of its next vouchers), so a buy-and-refund never leaves it vouchers for nothing."""
    _check_int(held, "held")
    from_held = min(reversal, held)
    return balanced(
        [
            (ACCOUNT_OPERATOR_FAN_REWARDS, OPERATOR_ID, ASSET_VOUCHERS, reversal),
            (ACCOUNT_MERCHANT_VOUCHERS, acquirer_id, ASSET_VOUCHERS, -from_held),
            (ACCOUNT_MERCHANT_VOUCHER_CREDIT, acquirer_id, ASSET_VOUCHERS, -(reversal - from_held)),
        ]
    )
