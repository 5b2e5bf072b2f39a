"""The operator's services: MerchantAdmin (merchants, credentials), Programs (the versioned program
rules) and Clearing (positions, settlement periods, statements, CSV export). proto ⇄ store; the
pipeline is told about merchant and program changes so the fast path applies them from the next call on.
MerchantAdminService, ProgramsService and ClearingService (their buf STANDARD names; the old ones are
deprecated) are thin adapters over the same servicers, at the end of this module."""

from __future__ import annotations

import csv
import datetime as dt
import io
import time

from points.v1 import admin_pb2 as pb
from points.v1 import admin_pb2_grpc
from processor import auth, domain, kinds, member_store, rpc, rules
from processor.config import Settings
from processor.domain import Code, Rejection
from processor.paging import (
    EXPORT_CHUNK,
    EXPORT_PAGE_MAX,
    iso,
    page_size,
    page_token,
    page_token_value,
    timestamp_of,
)
from processor.pipeline import Pipeline
from processor.servicer import Validator, guard, projected_store, timestamp
from processor.store import MERCHANT_SETTABLE, MerchantRow, StoreError, micros

_STATUS = {"active": pb.MERCHANT_STATUS_ACTIVE, "suspended": pb.MERCHANT_STATUS_SUSPENDED}
_STATUS_NAME = {v: k for k, v in _STATUS.items()}
_KIND_NAME = {
    pb.API_KEY_KIND_MERCHANT: "merchant",
    pb.API_KEY_KIND_GATEWAY: "gateway",
    pb.API_KEY_KIND_OPERATOR: "operator",
    pb.API_KEY_KIND_SUPPORT: "support",
}
GATEWAY_MERCHANTS_MAX = 10_000
TEXT_BYTES_MAX = 200


def merchant_message(row: MerchantRow) -> pb.Merchant:
    return pb.Merchant(
        merchant_id=row.merchant_id,
        name=row.name,
        give_back_bps=row.give_back_bps,
        fee_redeemed_bps=row.fee_redeemed_bps,
        fee_issued_bps=row.fee_issued_bps,
        region=row.region,
        status=_STATUS[row.status],
        created_at=timestamp_of(row.created_at),
        updated_at=timestamp_of(row.updated_at),
    )


class MerchantAdminServicer(admin_pb2_grpc.MerchantAdminServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline, authenticator: auth.Authenticator):
        self.settings = settings
        self.pipeline = pipeline
        self.authenticator = authenticator
        self.validate = Validator(settings)

    def _fields(self, merchant: pb.Merchant, names) -> dict:
        """The settable fields named, validated, as store values."""
        changes = {}
        for name in names:
            if name not in MERCHANT_SETTABLE:
                raise domain.invalid_field(
                    "update_fields", f"update_fields: {name!r} cannot be set; settable: {', '.join(MERCHANT_SETTABLE)}"
                )
            value = getattr(merchant, name)
            if name == "give_back_bps" and not 1 <= value <= domain.GIVE_BACK_BPS_CEILING:
                # the program's bounds are checked by _check_give_back (they need a read)
                raise domain.invalid_field(
                    "merchant.give_back_bps", f"give_back_bps must be 1..10000 (0.01%..100%), got {value}"
                )
            if name in ("fee_redeemed_bps", "fee_issued_bps") and not 0 <= value <= 10_000:
                raise domain.invalid_field(f"merchant.{name}", f"{name} must be 0..10000 basis points, got {value}")
            if name in ("name", "region") and len(value.encode()) > TEXT_BYTES_MAX:
                raise domain.invalid_field(f"merchant.{name}", f"{name} must be at most {TEXT_BYTES_MAX} bytes")
            if name == "status":
                if value not in _STATUS_NAME:
                    raise domain.invalid_field("merchant.status", "status must be MERCHANT_STATUS_ACTIVE or _SUSPENDED")
                value = _STATUS_NAME[value]
            changes[name] = value
        return changes

    async def _give_back_bounds(self, fields: dict) -> tuple[int, int]:
        """The program's give-back bounds (issue 16, seed 000); INVALID_ARGUMENT if fields sets a rate
        outside them."""
        low, high = await self.pipeline.ready_store().give_back_bounds(self.settings.program_id)
        value = fields.get("give_back_bps")
        if value is not None and not low <= value <= high:
            # the program's give_back_bps_min/max (300..2000 = 3%..20% unless it sets others)
            raise domain.invalid_field(
                "merchant.give_back_bps",
                f"give_back_bps must be {low}..{high} ({low / 100:g}%..{high / 100:g}%), got {value}",
            )
        return low, high

    async def _update(self, merchant_id: str, fields: dict) -> pb.Merchant:
        """Writes the change, then tells the pipeline: the next call of the merchant sees it."""
        row = await self.pipeline.ready_store().update_merchant(merchant_id, fields)
        if row is None:
            raise Rejection(Code.NOT_FOUND, f"merchant {merchant_id!r} does not exist")
        self.pipeline.merchants.add(row)
        return merchant_message(row)

    async def CreateMerchant(self, request, context):
        async def call():
            m = request.merchant
            merchant_id = self.validate.identifier(m.merchant_id, "merchant.merchant_id")
            fields = self._fields(m, ["name", "give_back_bps", "fee_redeemed_bps", "fee_issued_bps", "region"])
            store = self.pipeline.ready_store()
            bounds = await self._give_back_bounds(fields)
            try:
                row = await store.add_merchant(merchant_id, **fields, give_back_bounds=bounds)
            except StoreError as error:
                code = Code.ALREADY_EXISTS if "exists already" in str(error) else Code.INVALID_ARGUMENT
                raise Rejection(code, str(error)) from None
            self.pipeline.merchants.add(row)
            return merchant_message(row)

        return await guard(context, call)

    async def UpdateMerchant(self, request, context):
        async def call():
            merchant_id = self.validate.identifier(request.merchant.merchant_id, "merchant.merchant_id")
            names = list(request.update_fields) or list(MERCHANT_SETTABLE)
            fields = self._fields(request.merchant, names)
            if "give_back_bps" in fields:
                await self._give_back_bounds(fields)
            return await self._update(merchant_id, fields)

        return await guard(context, call)

    async def SuspendMerchant(self, request, context):
        async def call():
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            return await self._update(merchant_id, {"status": "suspended"})

        return await guard(context, call)

    async def GetMerchant(self, request, context):
        async def call():
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            row = await self.pipeline.ready_store().merchant(merchant_id)
            if row is None:
                raise Rejection(Code.NOT_FOUND, f"merchant {merchant_id!r} does not exist")
            return merchant_message(row)

        return await guard(context, call)

    async def ListMerchants(self, request, context):
        async def call():
            size = page_size(request.page_size)
            after = int(page_token_value(request.page_token, numeric=True)) if request.page_token else -1
            rows = await self.pipeline.ready_store().merchants(after, size + 1)
            more = len(rows) > size
            rows = rows[:size]
            return pb.ListMerchantsResponse(
                merchants=[merchant_message(r) for r in rows],
                next_page_token=page_token(str(rows[-1].merchant_slot)) if more else "",
            )

        return await guard(context, call)

    @staticmethod
    def _key_terms(request) -> dt.datetime | None:
        """The checked description and expiry of an IssueApiKeyRequest: its expires_at, or None."""
        if len(request.description.encode()) > TEXT_BYTES_MAX:
            raise domain.invalid_field("description", f"description must be at most {TEXT_BYTES_MAX} bytes")
        if not request.HasField("expires_at"):
            return None
        try:
            expires_at = request.expires_at.ToDatetime(tzinfo=dt.timezone.utc)
        except (ValueError, OverflowError):
            expires_at = None
        if expires_at is None or expires_at <= dt.datetime.now(dt.timezone.utc):
            raise domain.invalid_field(
                "expires_at", "expires_at must be a time in the future (or unset: the key never expires)"
            )
        return expires_at

    async def _issue_support_key(self, request, limits: tuple[int, int]) -> pb.IssueApiKeyResponse:
        """A support key (issue 15) with its AdjustPoints limits, as `key create --support` makes one."""
        if request.merchant_ids:
            raise domain.invalid_field("merchant_ids", "a support key acts for no merchant; send no merchant_ids")
        for name, value in zip(("support_points_per_call_max", "support_points_per_day_max"), limits):
            if value <= 0:
                raise domain.invalid_field(
                    name, f"a support key needs {name} > 0 (point-units of AdjustPoints it may move), got {value}"
                )
        expires_at = self._key_terms(request)
        key = auth.new_key()
        await member_store.insert_support_key(
            self.pipeline.ready_store().pool, key.key_id, key.secret_sha256, request.description, *limits, expires_at
        )
        return pb.IssueApiKeyResponse(key_id=key.key_id, key=key.key)

    async def IssueApiKey(self, request, context):
        async def call():
            kind = _KIND_NAME.get(request.kind)
            if kind is None:
                raise domain.invalid_field("kind", "kind must be API_KEY_KIND_MERCHANT, _GATEWAY or _SUPPORT")
            if kind == "operator":  # an operator key can make anything: only someone on the host makes one
                raise Rejection(
                    Code.PERMISSION_DENIED,
                    "operator keys are created only on the host: python -m processor key create "
                    "--operator; this call issues merchant and gateway keys",
                )
            limits = (request.support_points_per_call_max, request.support_points_per_day_max)
            if kind == "support":
                return await self._issue_support_key(request, limits)
            if any(limits):
                raise domain.invalid_field(
                    "support_points_per_call_max",
                    "support_points_per_call_max and support_points_per_day_max are for API_KEY_KIND_SUPPORT keys "
                    "only; leave them 0",
                )
            merchant_ids = [self.validate.identifier(m, "merchant_ids") for m in request.merchant_ids]
            expected = {"merchant": "exactly one", "gateway": "one or more"}[kind]
            if (
                (kind == "merchant" and len(merchant_ids) != 1)
                or (kind == "gateway" and not merchant_ids)
                or len(merchant_ids) > GATEWAY_MERCHANTS_MAX
            ):
                raise domain.invalid_field("merchant_ids", f"a {kind} key takes {expected} merchant_ids")
            expires_at = self._key_terms(request)
            key = auth.new_key()
            try:
                await self.pipeline.ready_store().insert_api_key(
                    key.key_id, key.secret_sha256, kind, sorted(set(merchant_ids)), request.description, expires_at
                )
            except StoreError as error:
                raise Rejection(Code.NOT_FOUND, str(error)) from None
            return pb.IssueApiKeyResponse(key_id=key.key_id, key=key.key)

        return await guard(context, call)

    async def RevokeApiKey(self, request, context):
        async def call():
            revoked_at = await self.pipeline.ready_store().revoke_api_key(request.key_id)
            if revoked_at is None:
                raise Rejection(Code.NOT_FOUND, f"no API key {request.key_id!r}")
            self.authenticator.forget(request.key_id)
            return pb.RevokeApiKeyResponse(revoked_at=timestamp_of(revoked_at))

        return await guard(context, call)


# --- Programs: versioned rules ---------------------------------------------------------------------
# ProgramRules ⇄ the configuration dict of processor/rules.py (version_to_config / version_from_config):
# the same names; an unset optional field is a missing key (the rules' default), 0 stands for None where
# the proto says so. Every check of the rules is rules.version_from_config's, so the API, the CLI and
# stored versions are held to the same ones.

_SCOPE = {
    pb.PROMOTION_SCOPE_NETWORK: rules.SCOPE_NETWORK,
    pb.PROMOTION_SCOPE_MERCHANT: rules.SCOPE_MERCHANT,
    pb.PROMOTION_SCOPE_TIER: rules.SCOPE_TIER,
}
_SCOPE_ENUM = {name: value for value, name in _SCOPE.items()}
_OPTIONAL_RULES = (
    "restore_grace_us",
    "acquiring_share_bps",
    "referral_bonus_point_units",
    "referral_minimum_purchase",
    "member_verification",
    "verification_failures_max",
    "verification_lockout_seconds",
    "member_points_spent_per_hour_max",
    "member_points_spent_per_day_max",
    "member_transfers",
    "member_transfer_fee_bps",
    "member_points_transferred_per_day_max",
)
_NONE_IF_ZERO = ("expiry_period_us", "tier_window_us")
# the seed systems' options (issue 16; docs/RULES.md section 11): optional scalars like the above, and the
# star rebates, a list (empty = none, the default)
_SEED_OPTIONAL_RULES = (
    "merchant_match_bps",
    "signup_bonus_point_units",
    "referral_share_bps",
    "level_points",
    "fee_sale_bps",
    "give_back_bps_min",
    "give_back_bps_max",
    "merchant_vouchers_anywhere",
    "acquiring_reward_asset",
    "acquiring_at_acquirer",
    "merchant_voucher_credit",
)
_CHANNEL_RATES = (
    "promoter_commission_bps",
    "province_agent_share_bps",
    "city_agent_share_bps",
    "county_agent_share_bps",
)


def _rate(message: pb.ProgramRate) -> dict:
    return {"numerator": message.numerator, "denominator": message.denominator}


def rules_config(message: pb.ProgramRules) -> dict:
    """The configuration a ProgramRules describes, for rules.version_from_config."""
    config: dict = {}
    for name in _NONE_IF_ZERO:
        if message.HasField(name):
            config[name] = getattr(message, name) or None
    for name in _OPTIONAL_RULES + _SEED_OPTIONAL_RULES:
        if message.HasField(name):
            config[name] = getattr(message, name)
    if message.star_fee_rebate_bps:
        config["star_fee_rebate_bps"] = list(message.star_fee_rebate_bps)
    if message.HasField("operator_store_merchant_id"):
        config["operator_store_merchant_id"] = message.operator_store_merchant_id or None
    if message.levels:
        config["levels"] = [
            {
                "name": level.name,
                "threshold_point_units": level.threshold_point_units,
                "bonus_point_units": level.bonus_point_units,
                "multiplier_bps": level.multiplier_bps or domain.BPS_DENOMINATOR,
            }
            for level in message.levels
        ]
    if message.HasField("dividends"):
        d = message.dividends
        dividends = {"threshold_point_units": d.threshold_point_units}
        for name in ("growth_bps", "credit_limit_bps"):
            if d.HasField(name):
                dividends[name] = getattr(d, name)
        if d.rate_bps_schedule:
            dividends["rate_bps_schedule"] = list(d.rate_bps_schedule)
        config["dividends"] = dividends
    scopes_unknown = [f"promotions[{i}]" for i, p in enumerate(message.promotions) if p.scope not in _SCOPE]
    if scopes_unknown:
        raise Rejection(
            Code.INVALID_ARGUMENT,
            f"{', '.join(scopes_unknown)}: scope must be PROMOTION_SCOPE_NETWORK, "
            "PROMOTION_SCOPE_MERCHANT or PROMOTION_SCOPE_TIER",
        )
    if message.promotions:
        config["promotions"] = [
            {
                "promotion_id": p.promotion_id,
                "start_us": p.start_us,
                "end_us": p.end_us,
                "scope": _SCOPE[p.scope],
                "scope_id": p.scope_id,
                "multiplier_bps": p.multiplier_bps,
                "bonus_point_units": p.bonus_point_units,
                "budget_point_units": p.budget_point_units,
                "sponsor_id": p.sponsor_id or domain.OPERATOR_ID,
            }
            for p in message.promotions
        ]
    if message.HasField("channel"):  # issue 16 (docs/RULES.md section 12)
        config["channel"] = {
            name: getattr(message.channel, name) for name in _CHANNEL_RATES if getattr(message.channel, name)
        }
        if message.channel.agent_scope:
            config["channel"]["agent_scope"] = message.channel.agent_scope
    if message.merchant_terms:
        config["merchant_terms"] = [
            {
                "merchant_id": t.merchant_id,
                "acquiring_share_bps": t.acquiring_share_bps if t.HasField("acquiring_share_bps") else None,
                "conversion_rate": _rate(t.conversion_rate) if t.HasField("conversion_rate") else None,
                "star_rating": t.star_rating if t.HasField("star_rating") else None,
            }
            for t in message.merchant_terms
        ]
    return config


def rules_message(config: dict) -> pb.ProgramRules:
    """The ProgramRules of a full configuration (rules.version_to_config), every field set."""
    message = pb.ProgramRules(
        expiry_period_us=config["expiry_period_us"] or 0,
        tier_window_us=config["tier_window_us"] or 0,
        **{name: config[name] for name in _OPTIONAL_RULES + _SEED_OPTIONAL_RULES},
        star_fee_rebate_bps=config["star_fee_rebate_bps"],
        operator_store_merchant_id=config["operator_store_merchant_id"] or "",
        levels=[pb.ProgramLevel(**level) for level in config["levels"]],
        promotions=[pb.ProgramPromotion(**{**p, "scope": _SCOPE_ENUM[p["scope"]]}) for p in config["promotions"]],
    )
    if config["dividends"] is not None:
        message.dividends.CopyFrom(pb.ProgramDividends(**config["dividends"]))
    if config.get("channel") is not None:
        message.channel.CopyFrom(pb.ProgramChannel(**config["channel"]))
    for terms in config["merchant_terms"]:
        item = message.merchant_terms.add(merchant_id=terms["merchant_id"])
        if terms["acquiring_share_bps"] is not None:
            item.acquiring_share_bps = terms["acquiring_share_bps"]
        if terms["conversion_rate"] is not None:
            item.conversion_rate.CopyFrom(pb.ProgramRate(**terms["conversion_rate"]))
        if terms["star_rating"] is not None:
            item.star_rating = terms["star_rating"]
    return message


def program_version_message(version: rules.ProgramVersion) -> pb.ProgramVersion:
    return pb.ProgramVersion(
        program_id=version.program_id,
        version=version.version,
        effective_from=timestamp(version.effective_from_us),
        rules=rules_message(rules.version_to_config(version)),
    )


class ProgramsServicer(admin_pb2_grpc.ProgramsServicer):
    """The versions of the service's program (settings.program_id): stored through the store, then
    loaded by the pipeline before this call answers."""

    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline

    def _program_id(self, value: str) -> str:
        if value and value != self.settings.program_id:
            raise domain.invalid_field(
                "program_id",
                f"program_id {value[:TEXT_BYTES_MAX]!r} is not this service's program "
                f"{self.settings.program_id!r}; leave it empty or send that one",
            )
        return self.settings.program_id

    async def SetProgramVersion(self, request, context):
        async def call():
            program_id = self._program_id(request.program_id)
            effective_from_us = None
            if request.HasField("effective_from"):
                effective_from_us = request.effective_from.seconds * 1_000_000 + request.effective_from.nanos // 1000
            config = rules_config(request.rules)
            caller = rpc.principal.get()
            created_by = f"api key {caller.key_id}" if caller is not None else "api"
            try:
                version = await self.pipeline.ready_store().add_program_version(
                    program_id, effective_from_us, config, created_by
                )
            except rules.ConfigError as error:
                raise Rejection(Code.INVALID_ARGUMENT, str(error)) from None
            except StoreError as error:
                raise Rejection(Code.FAILED_PRECONDITION, str(error)) from None
            try:
                await self.pipeline.reload_program()
            except Rejection as rejection:  # stored, but not loaded yet: say so, so the caller does not add it again
                raise Rejection(
                    rejection.code,
                    f"version {version.version} of program {program_id!r} is stored but the service "
                    f"has not loaded it yet ({rejection.message}); do not set it again: GetProgram "
                    f"shows it, and the service loads it when it is ready",
                ) from None
            return program_version_message(version)

        return await guard(context, call)

    async def GetProgram(self, request, context):
        async def call():
            program_id = self._program_id(request.program_id)
            program = await self.pipeline.ready_store().program(program_id)
            if program is None:
                raise Rejection(
                    Code.NOT_FOUND,
                    f"program {program_id!r} has no version yet: the service applies the plain ledger "
                    f"rules; add one with SetProgramVersion or `python -m processor program set`",
                )
            try:
                in_force = program.at(time.time_ns() // 1000).version
            except Rejection:  # the first version has not started yet
                in_force = 0
            return pb.Program(
                program_id=program_id,
                versions=[program_version_message(v) for v in program.versions],
                version_in_force=in_force,
            )

        return await guard(context, call)


# acquiring, then voucher columns last: a reader of the columns it knew by position keeps working. The
# voucher columns are voucher-units (migration 0006), the others point-units.
VOUCHER_STATEMENT_COLUMNS = (
    "vouchers_redeemed",
    "voucher_redemption_refunds",
    "voucher_net",
    "voucher_opening_position",
    "voucher_closing_position",
    "vouchers_held_opening",
    "vouchers_received",
    "vouchers_spent",
    "vouchers_held_closing",
)
STATEMENT_CSV_COLUMNS = (
    "period_id",
    "merchant_id",
    "opened_at",
    "cut_off",
    "opening_position",
    "issued",
    "earn_refunds",
    "redeemed",
    "redemption_refunds",
    "fees",
    "net",
    "closing_position",
    "transactions",
    "acquiring",
    "acquiring_reversals",
    *VOUCHER_STATEMENT_COLUMNS,
)
LINE_CSV_COLUMNS = (
    "period_id",
    "merchant_id",
    "transaction_id",
    "created_at",
    "kind",
    "member_id",
    "amount",
    "fee",
    "net",
    "voucher_net",
    "vouchers_held_change",
)


def statement_message(r) -> pb.Statement:
    return pb.Statement(
        merchant_id=r["merchant_id"],
        period_id=r["period_id"],
        opened_at=timestamp_of(r["opened_at"]),
        cut_off=timestamp_of(r["cut_off"]),
        opening_position=r["opening_position"],
        issued=r["issued"],
        earn_refunds=r["earn_refunds"],
        redeemed=r["redeemed"],
        redemption_refunds=r["redemption_refunds"],
        fees=r["fees"],
        net=r["net"],
        closing_position=r["closing_position"],
        transactions=r["transactions"],
        acquiring=r["acquiring"],
        acquiring_reversals=r["acquiring_reversals"],
        **{name: r[name] for name in VOUCHER_STATEMENT_COLUMNS},
    )


def _may_read(merchant_id: str) -> None:
    """Operator keys read every merchant's clearing; a merchant key its own merchant's, a gateway key its
    merchants' (issue 15), naming it in merchant_id; anything else PERMISSION_DENIED."""
    caller = rpc.principal.get()
    if caller is None or caller.kind == "operator":
        return
    if not merchant_id:
        raise Rejection(
            Code.PERMISSION_DENIED,
            "a merchant or gateway key reads its own merchants' positions and statements: give merchant_id "
            "(an operator key reads every merchant's)",
            reason="KEY_NOT_PERMITTED",
            field="merchant_id",
        )
    if not caller.may_act_for(merchant_id):
        raise Rejection(
            Code.PERMISSION_DENIED,
            f"this API key may not read merchant {merchant_id!r}'s position or statements; use that merchant's key, "
            "a gateway key that lists it, or an operator key",
            reason="KEY_NOT_PERMITTED",
            field="merchant_id",
        )


class ClearingServicer(admin_pb2_grpc.ClearingServicer):
    def __init__(self, settings: Settings, pipeline: Pipeline):
        self.settings = settings
        self.pipeline = pipeline
        self.validate = Validator(settings)

    async def GetMerchantPosition(self, request, context):
        async def call():
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            _may_read(merchant_id)
            store = self.pipeline.ready_store()
            await self.pipeline.committed_view()
            await self.pipeline.projected()  # the balances read below include every answered operation
            as_of = dt.datetime.now(dt.timezone.utc)
            position = await store.merchant_position(merchant_id, vouchers=True)
            if position is None:
                raise Rejection(Code.NOT_FOUND, f"merchant {merchant_id!r} does not exist")
            return pb.MerchantPosition(merchant_id=merchant_id, as_of=timestamp_of(as_of), **position)

        return await guard(context, call)

    async def CloseSettlementPeriod(self, request, context):
        async def call():
            caller = rpc.principal.get()
            if caller is not None and caller.kind != "operator":
                raise Rejection(
                    Code.PERMISSION_DENIED,
                    "only an operator key closes a settlement period",
                    reason="KEY_NOT_PERMITTED",
                )
            if not request.HasField("cut_off"):
                raise domain.invalid_field("cut_off", "cut_off is required (a time at or before now)")
            cut_off = request.cut_off.ToDatetime(tzinfo=dt.timezone.utc)
            store = self.pipeline.ready_store()
            await self.pipeline.settle_before(micros(cut_off))
            # every operation dated before the cut is answered now; its rows must be in the tables the
            # statements are computed from before they are
            await self.pipeline.projected()
            # the program's channel settings in force at the cut decide the promoters' and agents' pay
            version = self.pipeline.program.version(micros(cut_off) - 1)
            try:
                period, created = await store.close_period(cut_off, version.channel if version is not None else None)
            except StoreError as error:
                raise Rejection(Code.FAILED_PRECONDITION, str(error)) from None
            if created:
                self.pipeline.channel_posting_due()
            summary = await store.period_summary(period["period_id"])
            return pb.SettlementPeriod(
                period_id=summary["period_id"],
                opened_at=timestamp_of(summary["opened_at"]),
                cut_off=timestamp_of(summary["cut_off"]),
                merchants=summary["merchants"],
                net_total=summary["net_total"],
                fees_total=summary["fees_total"],
                voucher_net_total=summary["voucher_net_total"],
            )

        return await guard(context, call)

    async def GetStatement(self, request, context):
        async def call():
            merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
            _may_read(merchant_id)
            if request.period_id <= 0:
                raise domain.invalid_field("period_id", "period_id must be > 0")
            rows = await (await projected_store(self.pipeline)).statements(
                period_id=request.period_id, merchant_id=merchant_id, limit=1
            )
            if not rows:
                raise Rejection(
                    Code.NOT_FOUND,
                    f"no statement of {merchant_id!r} for period {request.period_id} "
                    "(no movement, or the period is not closed)",
                )
            return statement_message(rows[0])

        return await guard(context, call)

    async def ListStatements(self, request, context):
        async def call():
            _may_read(request.merchant_id)
            size = page_size(request.page_size)
            store = await projected_store(self.pipeline)
            if request.merchant_id:
                after = page_token_value(request.page_token, numeric=True) if request.page_token else ""
                merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
                rows = await store.statements(
                    merchant_id=merchant_id, period_id=request.period_id, after=after, limit=size + 1
                )
                key = "period_id"
            else:
                after = page_token_value(request.page_token) if request.page_token else ""
                if request.period_id <= 0:
                    raise Rejection(Code.INVALID_ARGUMENT, "give merchant_id, or period_id > 0")
                rows = await store.statements(period_id=request.period_id, after=after, limit=size + 1)
                key = "merchant_id"
            more = len(rows) > size
            rows = rows[:size]
            return pb.ListStatementsResponse(
                statements=[statement_message(r) for r in rows],
                next_page_token=page_token(str(rows[-1][key])) if more else "",
            )

        return await guard(context, call)

    async def ExportStatement(self, request, context):
        async def call():
            _may_read(request.merchant_id)
            if request.period_id <= 0:
                raise domain.invalid_field("period_id", "period_id must be > 0")
            store = await projected_store(self.pipeline)
            if await store.period_summary(request.period_id) is None:
                raise Rejection(Code.NOT_FOUND, f"period {request.period_id} is not closed")
            if not 0 <= request.page_size <= EXPORT_PAGE_MAX:
                raise domain.invalid_field("page_size", f"page_size must be 0 (everything)..{EXPORT_PAGE_MAX} lines")
            # one page, or everything in chunks (so a 50,000-merchant period never needs one huge result set)
            wanted = request.page_size or None
            after = page_token_value(request.page_token) if request.page_token else ""
            out = io.StringIO()
            writer = csv.writer(out, lineterminator="\n")
            lines, more = 0, False
            if request.merchant_id:
                merchant_id = self.validate.identifier(request.merchant_id, "merchant_id")
                if after and not after.isdigit():
                    raise domain.invalid_field("page_token", "page_token is not one this service issued")
                if not after:
                    writer.writerow(LINE_CSV_COLUMNS)
                last = int(after or 0)
            else:
                if not after:
                    writer.writerow(STATEMENT_CSV_COLUMNS)
                last = after
            while wanted is None or lines < wanted:
                chunk = min(EXPORT_CHUNK, wanted - lines) if wanted else EXPORT_CHUNK
                if request.merchant_id:
                    rows = await store.statement_lines(request.period_id, merchant_id, last, chunk + 1)
                    for r in rows[:chunk]:
                        writer.writerow(
                            (
                                request.period_id,
                                merchant_id,
                                domain.format_transaction_id(r["transaction_id"]),
                                iso(r["created_at"]),
                                kinds.kind(r["kind"]).name,
                                r["member_id"],
                                r["amount"],
                                r["fee"],
                                r["net"],
                                r["voucher_net"],
                                r["vouchers_held_change"],
                            )
                        )
                    key = "transaction_id"
                else:
                    rows = await store.statements(period_id=request.period_id, after=last, limit=chunk + 1)
                    for r in rows[:chunk]:
                        writer.writerow(
                            (
                                r["period_id"],
                                r["merchant_id"],
                                iso(r["opened_at"]),
                                iso(r["cut_off"]),
                                r["opening_position"],
                                r["issued"],
                                r["earn_refunds"],
                                r["redeemed"],
                                r["redemption_refunds"],
                                r["fees"],
                                r["net"],
                                r["closing_position"],
                                r["transactions"],
                                r["acquiring"],
                                r["acquiring_reversals"],
                                *(r[name] for name in VOUCHER_STATEMENT_COLUMNS),
                            )
                        )
                    key = "merchant_id"
                lines += min(len(rows), chunk)
                more = len(rows) > chunk
                if rows[:chunk]:
                    last = rows[:chunk][-1][key]
                if not more:
                    break
            return pb.ExportStatementResponse(
                csv=out.getvalue().encode(),
                lines=lines,
                next_page_token=page_token(str(last)) if more and wanted else "",
            )

        return await guard(context, call)


# --- The same services by their STANDARD names ------------------------------------------------------
# MerchantAdminService, ClearingService and ProgramsService (admin.proto) serve what MerchantAdmin,
# Clearing and Programs serve, through the same servicer objects: each method converts its request to
# the old method's (the same field names and numbers, so the same bytes), calls the old method and wraps
# or converts what it returned. tests/unit/test_contract.py checks that every twin request and copied
# response has the same fields, so the conversion cannot drop one.


def _as(message_type, message):
    """`message` as `message_type`, a message with the same fields (names, numbers, types)."""
    return message_type.FromString(message.SerializeToString())


def _adapter(legacy_name: str, request_type, wrap):
    async def method(self, request, context):
        answer = await getattr(self.legacy, legacy_name)(_as(request_type, request), context)
        return wrap(answer)

    method.__name__ = legacy_name
    return method


def _copy(message_type):
    return lambda answer: _as(message_type, answer)


class MerchantAdminServiceServicer(admin_pb2_grpc.MerchantAdminServiceServicer):
    """MerchantAdminService: MerchantAdminServicer's methods under buf STANDARD names and messages."""

    def __init__(self, legacy: MerchantAdminServicer):
        self.legacy = legacy

    CreateMerchant = _adapter(
        "CreateMerchant", pb.CreateMerchantRequest, lambda m: pb.MerchantAdminServiceCreateMerchantResponse(merchant=m)
    )
    UpdateMerchant = _adapter(
        "UpdateMerchant", pb.UpdateMerchantRequest, lambda m: pb.MerchantAdminServiceUpdateMerchantResponse(merchant=m)
    )
    SuspendMerchant = _adapter(
        "SuspendMerchant",
        pb.SuspendMerchantRequest,
        lambda m: pb.MerchantAdminServiceSuspendMerchantResponse(merchant=m),
    )
    GetMerchant = _adapter(
        "GetMerchant", pb.GetMerchantRequest, lambda m: pb.MerchantAdminServiceGetMerchantResponse(merchant=m)
    )
    ListMerchants = _adapter(
        "ListMerchants", pb.ListMerchantsRequest, _copy(pb.MerchantAdminServiceListMerchantsResponse)
    )
    IssueApiKey = _adapter("IssueApiKey", pb.IssueApiKeyRequest, _copy(pb.MerchantAdminServiceIssueApiKeyResponse))
    RevokeApiKey = _adapter("RevokeApiKey", pb.RevokeApiKeyRequest, _copy(pb.MerchantAdminServiceRevokeApiKeyResponse))


class ClearingServiceServicer(admin_pb2_grpc.ClearingServiceServicer):
    """ClearingService: ClearingServicer's methods under buf STANDARD names and messages."""

    def __init__(self, legacy: ClearingServicer):
        self.legacy = legacy

    GetMerchantPosition = _adapter(
        "GetMerchantPosition",
        pb.GetMerchantPositionRequest,
        lambda p: pb.ClearingServiceGetMerchantPositionResponse(position=p),
    )
    CloseSettlementPeriod = _adapter(
        "CloseSettlementPeriod",
        pb.CloseSettlementPeriodRequest,
        lambda p: pb.ClearingServiceCloseSettlementPeriodResponse(period=p),
    )
    GetStatement = _adapter(
        "GetStatement", pb.GetStatementRequest, lambda s: pb.ClearingServiceGetStatementResponse(statement=s)
    )
    ListStatements = _adapter(
        "ListStatements", pb.ListStatementsRequest, _copy(pb.ClearingServiceListStatementsResponse)
    )
    ExportStatement = _adapter(
        "ExportStatement", pb.ExportStatementRequest, _copy(pb.ClearingServiceExportStatementResponse)
    )


class ProgramsServiceServicer(admin_pb2_grpc.ProgramsServiceServicer):
    """ProgramsService: ProgramsServicer's methods under buf STANDARD names and messages."""

    def __init__(self, legacy: ProgramsServicer):
        self.legacy = legacy

    SetProgramVersion = _adapter(
        "SetProgramVersion",
        pb.SetProgramVersionRequest,
        lambda v: pb.ProgramsServiceSetProgramVersionResponse(version=v),
    )
    GetProgram = _adapter("GetProgram", pb.GetProgramRequest, lambda p: pb.ProgramsServiceGetProgramResponse(program=p))


# The STANDARD-named twin of each deprecated operator service (full names), for tests and docs.
TWIN_SERVICES = {
    "points.v1.MerchantAdmin": "points.v1.MerchantAdminService",
    "points.v1.Clearing": "points.v1.ClearingService",
    "points.v1.Programs": "points.v1.ProgramsService",
}
