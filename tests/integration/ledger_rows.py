"""Journal rows written directly with SQL, as the program rules will post them (docs/RULES.md), for the
reconcile and clearing tests of rules the pipeline does not post yet. No fixtures here.

`Ledger` writes into a migrated database while no service runs: merchants (with their accounts, as
`merchant add` makes them), members, transactions with their entries, holds, lots and the rules' records.
`rules_ledger()` builds one small, sound ledger with every kind of rule row; the corruption tests start
from it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import asyncpg

from processor.store import Store

OPERATOR = "operator"
POINTS, VOUCHERS = "POINTS", "VOUCHERS"
# a leg appended to its transaction's row (migration 0022: the legs are arrays in the row, leg_assets
# NULL while every leg is POINTS): $1 transaction id, $2 account id, $3 asset, $4 amount. In SET every
# expression sees the row before the update, so cardinality(leg_amounts) is the legs before this one.
APPEND_LEG = """UPDATE transactions SET leg_accounts = leg_accounts || $2::bigint, leg_amounts = leg_amounts || $4::bigint,
        leg_assets = CASE WHEN leg_assets IS NULL AND $3::text = 'POINTS' THEN NULL
                          ELSE coalesce(leg_assets, array_fill('POINTS'::text, ARRAY[cardinality(leg_amounts)]))
                               || $3::text END
    WHERE transaction_id = $1"""
# the same before migration 0022: an entries row
UNPACKED_LEG = "INSERT INTO entries (transaction_id, account_id, asset_code, amount) VALUES ($1, $2, $3, $4)"


def move_legs(kind: str) -> str:
    """SQL moving a transaction's legs on accounts of `kind` to another account (migration 0022: in its
    row's leg_accounts, the legs' order kept): $1 transaction id, $2 the account id they move to."""
    return f"""WITH moved AS (
                   UPDATE transactions t SET leg_accounts = (
                       SELECT array_agg(CASE WHEN a.kind = '{kind}' THEN $2::bigint ELSE l.account_id END ORDER BY l.leg)
                       FROM unnest(t.leg_accounts) WITH ORDINALITY AS l(account_id, leg)
                       JOIN accounts a ON a.account_id = l.account_id)
                   WHERE t.transaction_id = $1 RETURNING 1)
               SELECT count(*) FROM moved"""


def add_to_legs(kind: str) -> str:
    """SQL adding $2 to the amount of a transaction's legs on accounts of `kind`: $1 transaction id."""
    return f"""UPDATE transactions t SET leg_amounts = (
                   SELECT array_agg(CASE WHEN a.kind = '{kind}' THEN l.amount + $2::bigint ELSE l.amount END
                                    ORDER BY l.leg)
                   FROM unnest(t.leg_accounts, t.leg_amounts) WITH ORDINALITY AS l(account_id, amount, leg)
                   JOIN accounts a ON a.account_id = l.account_id)
               WHERE t.transaction_id = $1"""


# a leg removed by its ordinal: $1 transaction id, $2 the leg
REMOVE_LEG = """UPDATE transactions SET
        leg_accounts = leg_accounts[:$2 - 1] || leg_accounts[$2 + 1:],
        leg_amounts = leg_amounts[:$2 - 1] || leg_amounts[$2 + 1:],
        leg_assets = CASE WHEN leg_assets IS NULL THEN NULL ELSE leg_assets[:$2 - 1] || leg_assets[$2 + 1:] END
    WHERE transaction_id = $1"""
EARN, CAPTURE, REDEEM, REFUND_OF_REDEMPTION, REFUND_OF_EARN = 1, 2, 3, 4, 5
EXPIRY, TIER_BONUS, REFERRAL_BONUS, ACQUIRING_REWARD, ACQUIRING_REVERSAL = 6, 7, 8, 9, 10
MERCHANT_VOUCHER_SPEND, CONVERSION = 14, 15


class Ledger:
    """Writes rows into one database over one connection (use `async with Ledger.open(url)`)."""

    def __init__(self, store: Store, connection: asyncpg.Connection):
        self.store = store
        self.c = connection
        self.next_transaction_id = 1

    @classmethod
    async def open(cls, url: str) -> "Ledger":
        store = await Store.open(url, 2)
        await store.migrate()
        ledger = cls(store, await asyncpg.connect(url))
        ledger.next_transaction_id = await ledger.c.fetchval(
            "SELECT coalesce(max(transaction_id), 0) + 1 FROM transactions"
        )
        return ledger

    async def close(self) -> None:
        await self.c.close()
        await self.store.close()

    async def __aenter__(self) -> "Ledger":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def merchant(self, merchant_id: str, give_back_bps: int = 1000) -> str:
        await self.store.add_merchant(merchant_id, give_back_bps)
        return merchant_id

    async def member(self, member_id: str) -> str:
        await self.c.execute("INSERT INTO members VALUES ($1, now()) ON CONFLICT DO NOTHING", member_id)
        await self.account("member", member_id, POINTS)
        return member_id

    async def account(self, kind: str, owner_id: str, asset: str = POINTS) -> int:
        """The account's id, created (balance 0) if it does not exist."""
        await self.c.execute(
            "INSERT INTO accounts (kind, owner_id, asset_code) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING",
            kind,
            owner_id,
            asset,
        )
        return await self.c.fetchval(
            "SELECT account_id FROM accounts WHERE kind = $1 AND owner_id = $2 AND asset_code = $3",
            kind,
            owner_id,
            asset,
        )

    async def post(
        self,
        kind: int,
        merchant_id: str,
        member_id: str,
        amount: int,
        entries: list[tuple[str, str, int] | tuple[str, str, int, str]],
        *,
        fee: int = 0,
        purchase_amount: int | None = None,
        created_at: dt.datetime | None = None,
        program_version: int | None = 1,
    ) -> int:
        """One transaction and its entries, (account kind, owner, amount[, asset]) each; returns its id."""
        transaction_id = self.next_transaction_id
        self.next_transaction_id += 1
        await self.c.execute(
            """INSERT INTO transactions (transaction_id, kind, merchant_id, member_id, asset_code, amount,
                                         purchase_amount, idempotency_key, created_at, fee, program_version)
               VALUES ($1, $2, $3, $4, 'POINTS', $5, $6, $7, $8, $9, $10)""",
            transaction_id,
            kind,
            merchant_id,
            member_id,
            amount,
            purchase_amount,
            f"rows-{transaction_id}",
            created_at or dt.datetime.now(dt.timezone.utc),
            fee,
            program_version,
        )
        await self._handed_out("last_transaction_id", transaction_id)
        # a database migrated to before 0022 (tests of older migrations) has an entries table
        packed = await self.c.fetchval(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'transactions'::regclass AND attname = 'leg_accounts')"
        )
        for entry in entries:
            account_kind, owner_id, entry_amount = entry[:3]
            asset = entry[3] if len(entry) > 3 else POINTS
            await self.c.execute(
                APPEND_LEG if packed else UNPACKED_LEG,
                transaction_id,
                await self.account(account_kind, owner_id, asset),
                asset,
                entry_amount,
            )
        return transaction_id

    async def earn(
        self,
        merchant_id: str,
        member_id: str,
        *,
        base: int,
        uplift: int = 0,
        grants: tuple[tuple[str, str, int], ...] = (),
        fee: int = 0,
        program_id: str = "alliance",
        acquirer_id: str | None = None,
        acquiring: int = 0,
        created_at: dt.datetime | None = None,
    ) -> int:
        """An earn under a program: the member gets base + uplift + grants; the merchant pays the base and
        the grants it sponsors, the operator the uplift and its grants; fee entries on the base; the
        earn_rules row, and the promotions' budgets grow by their grants."""
        total = base + uplift + sum(amount for _, _, amount in grants)
        entries = [
            ("member", member_id, total),
            ("merchant_issued", merchant_id, -(base + sum(a for _, sponsor, a in grants if sponsor != OPERATOR))),
        ]
        if uplift:
            entries.append(("operator_tier_rewards", OPERATOR, -uplift))
        operator_grants = sum(a for _, sponsor, a in grants if sponsor == OPERATOR)
        if operator_grants:
            entries.append(("operator_promotions", OPERATOR, -operator_grants))
        if fee:
            entries += [("merchant_fees", merchant_id, -fee), ("operator_fee_revenue", OPERATOR, fee)]
        transaction_id = await self.post(
            EARN, merchant_id, member_id, total, entries, fee=fee, purchase_amount=base * 10, created_at=created_at
        )
        await self.c.execute(
            """INSERT INTO earn_rules (transaction_id, base_point_units, uplift_point_units, acquirer_id,
                                       acquiring_point_units, grants)
               VALUES ($1, $2, $3, $4, $5, $6::jsonb)""",
            transaction_id,
            base,
            uplift,
            acquirer_id,
            acquiring,
            json.dumps([list(g) for g in grants]),
        )
        for promotion_id, _, amount in grants:
            await self.c.execute(
                """INSERT INTO promotion_budgets (program_id, promotion_id, granted) VALUES ($1, $2, $3)
                   ON CONFLICT (program_id, promotion_id) DO UPDATE SET granted = promotion_budgets.granted + $3""",
                program_id,
                promotion_id,
                amount,
            )
        return transaction_id

    async def acquiring_reward(
        self, merchant_id: str, member_id: str, acquirer_id: str, amount: int, created_at: dt.datetime | None = None
    ) -> int:
        """Kind 9: the operator pays the acquirer for its member's spend at merchant_id."""
        return await self.post(
            ACQUIRING_REWARD,
            merchant_id,
            member_id,
            amount,
            [("operator_acquiring", OPERATOR, -amount), ("merchant_acquiring", acquirer_id, amount)],
            created_at=created_at,
        )

    async def acquiring_reversal(
        self, merchant_id: str, member_id: str, acquirer_id: str, amount: int, created_at: dt.datetime | None = None
    ) -> int:
        """Kind 10: part of a reward taken back when the purchase is refunded."""
        return await self.post(
            ACQUIRING_REVERSAL,
            merchant_id,
            member_id,
            amount,
            [("operator_acquiring", OPERATOR, amount), ("merchant_acquiring", acquirer_id, -amount)],
            created_at=created_at,
        )

    async def hold(self, authorization_id: int, merchant_id: str, member_id: str, amount: int, status: int = 1) -> int:
        await self.c.execute(
            """INSERT INTO holds (authorization_id, merchant_id, member_id, asset_code, amount, status, expires_at,
                                  created_at, idempotency_key)
               VALUES ($1, $2, $3, 'POINTS', $4, $5, now() + interval '1 hour', now(), $6)""",
            authorization_id,
            merchant_id,
            member_id,
            amount,
            status,
            f"hold-{authorization_id}",
        )
        await self._handed_out("last_authorization_id", authorization_id)
        return authorization_id

    async def _handed_out(self, mark: str, value: int) -> None:
        """As a well-behaved tool does: an id is handed out, so ledger_writer's high-water mark moves with
        it (on a database migrated before 0008 there is none: 0008 starts the marks from the tables)."""
        if await self.c.fetchval("SELECT to_regclass('ledger_writer') IS NOT NULL"):
            await self.c.execute(f"UPDATE ledger_writer SET {mark} = greatest({mark}, $1)", value)

    async def lot(
        self, member_id: str, lot_id: int, amount: int, issuer_id: str, expires_at_us: int = 4_000_000_000_000_000
    ) -> None:
        await self.c.execute(
            "INSERT INTO lots VALUES ($1, $2, $3, $4, $5)", member_id, lot_id, expires_at_us, issuer_id, amount
        )

    async def piece(
        self,
        owner_kind: int,
        owner_id: int,
        lot_id: int,
        amount: int,
        issuer_id: str,
        expires_at_us: int = 4_000_000_000_000_000,
    ) -> None:
        await self.c.execute(
            "INSERT INTO lot_consumptions VALUES ($1, $2, $3, $4, $5, $6)",
            owner_kind,
            owner_id,
            lot_id,
            expires_at_us,
            issuer_id,
            amount,
        )

    async def execute(self, sql: str, *args) -> str:
        return await self.c.execute(sql, *args)

    async def fold_checkpoint(self) -> None:
        """accounts.balance = the entries (what a service would fold), so the service can start on it."""
        async with self.store.pool.acquire() as connection, connection.transaction():
            await self.store.fold_checkpoint(connection)


@dataclasses.dataclass
class RulesLedger:
    """The ids of rules_ledger()'s rows."""

    issuer: str  # M1: earns under the program, sponsors a promotion
    converter: str  # M2: converts its own points, is redeemed at
    acquirer: str  # A: signed the member up
    member: str  # U: earns, gets a tier bonus, has lots and an open hold
    referrer: str  # R: gets the referral bonus
    earn: int
    reward: int
    referral: int
    tier_bonus: int
    expiry: int
    conversion: int
    reversal: int
    redeem: int
    hold: int


async def rules_ledger(ledger: Ledger) -> RulesLedger:
    """A sound ledger with one row of every rule the pipeline will post (hand-computed):

    U earns at M1 under the program: base 1,000 + uplift 500 + operator promotion 200 + M1's promotion
    100 = 1,800 (fee 10 on the base); A, U's acquirer, gets 30 (kind 9), later 10 of it reversed (10);
    R gets a referral bonus of 250 (8); U a tier bonus of 400 (7); 50 of U's points expire (6); M2
    converts 600 of its points for U (15); U redeems 300 at M2 (3) and holds 200 there (open hold).
    U's posted POINTS: 1,800 + 400 - 50 + 600 - 300 = 2,450; lots 1,000 + 400 (+ 200 held) <= 2,450.
    U also has a VOUCHERS account (0): the hold check must look at POINTS only."""
    m1 = await ledger.merchant("m1")
    m2 = await ledger.merchant("m2")
    acquirer = await ledger.merchant("acq")
    member = await ledger.member("u")
    referrer = await ledger.member("r")
    await ledger.account("member", member, VOUCHERS)
    earn = await ledger.earn(
        m1,
        member,
        base=1_000,
        uplift=500,
        grants=(("promo-op", OPERATOR, 200), ("promo-m1", m1, 100)),
        fee=10,
        acquirer_id=acquirer,
        acquiring=30,
    )
    reward = await ledger.acquiring_reward(m1, member, acquirer, 30)
    referral = await ledger.post(
        REFERRAL_BONUS, m1, referrer, 250, [("operator_referrals", OPERATOR, -250), ("member", referrer, 250)]
    )
    tier_bonus = await ledger.post(
        TIER_BONUS, m1, member, 400, [("operator_tier_rewards", OPERATOR, -400), ("member", member, 400)]
    )
    await ledger.execute("INSERT INTO tier_events VALUES ($1, $2, 'registered', 'blue', now())", tier_bonus, member)
    expiry = await ledger.post(EXPIRY, m1, member, 50, [("member", member, -50), ("operator_breakage", OPERATOR, 50)])
    conversion = await ledger.post(
        CONVERSION, m2, member, 600, [("merchant_issued", m2, -600), ("member", member, 600)]
    )
    reversal = await ledger.acquiring_reversal(m1, member, acquirer, 10)
    redeem = await ledger.post(REDEEM, m2, member, 300, [("member", member, -300), ("merchant_redeemed", m2, 300)])
    hold = await ledger.hold(1, m2, member, 200)
    await ledger.lot(member, earn, 1_000, m1)
    await ledger.lot(member, tier_bonus, 400, OPERATOR)
    await ledger.lot(referrer, referral, 250, OPERATOR)
    await ledger.piece(1, hold, earn, 200, m1)
    await ledger.piece(2, redeem, conversion, 300, m2)
    return RulesLedger(
        m1,
        m2,
        acquirer,
        member,
        referrer,
        earn,
        reward,
        referral,
        tier_bonus,
        expiry,
        conversion,
        reversal,
        redeem,
        hold,
    )
