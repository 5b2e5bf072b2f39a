"""Soak run of the crash and Postgres-fault scenarios: `python -m tests.soak --seconds 300`.

Starts a Postgres of its own (pgserver's binaries, 127.0.0.1, a free port), a fresh database on it,
the TCP proxy in front of it and the service behind the proxy; then, until the time is up, runs rounds
under traffic, each one fault picked at random — SIGKILL of the service (the crash harness), Postgres
unreachable, a stalled connection, a Postgres restart, terminated backends — and after each round every
check of tests/integration/test_faults.py on every operation since the start. Rounds of the bank
check (tests/integration/bank.py: clients moving points among members and merchants, with vouchers,
while the service is SIGKILLed or SIGSTOPped or Postgres restarted; conservation, no negative balance,
every acknowledged operation once, no repeated id, open holds capturable, GetBalance = journal,
reconcile; the service's wall clock stepped forward or back under libfaketime; the disk of a fresh
small Postgres filled) run on a database of their own; a fault whose tool is missing (libfaketime,
mounting a tmpfs) is left out, saying so. Prints what it checked
after each round and a summary at the end; exits 1 at the first discrepancy (printing it, the seed
and the service's log), 0 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import sys
import time
import warnings

FAULTS = (
    "sigkill",
    "unreachable",
    "stall",
    "restart",
    "terminate",
    "bank-sigkill",
    "bank-sigstop",
    "bank-restart",
    "bank-clock-step",
    "bank-disk-full",
)
BANK_FAULTS = {
    "bank-sigkill": "sigkill",
    "bank-sigstop": "sigstop",
    "bank-restart": "postgres-restart",
    "bank-clock-step": "clock-step",
}
REPLAYS_PER_ROUND_MAX = 500


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300, help="how long to run rounds (default 300)")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: a new one, printed)")
    parser.add_argument(
        "--faults", default=",".join(FAULTS), help=f"comma-separated faults to pick from (default {','.join(FAULTS)})"
    )
    parser.add_argument(
        "--bank",
        choices=("vouchers", "plain"),
        default="vouchers",
        help="the bank rounds' ledger: under a program with dividends, so that members spend "
        "vouchers in split-tender and vouchers-only holds (default), or the plain ledger",
    )
    args = parser.parse_args(argv)
    faults = [name.strip() for name in args.faults.split(",") if name.strip()]
    unknown = set(faults) - set(FAULTS)
    if unknown or not faults:
        parser.error(f"unknown faults {sorted(unknown)}; choose from {','.join(FAULTS)}")
    seed = random.randrange(2**32) if args.seed is None else args.seed
    # SIGTERM (timeout, CI) unwinds like Ctrl-C, so the services and the Postgres started here are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pgserver's platformdirs warns about XDG_RUNTIME_DIR on servers
        from tests.harness import ServiceProcess
        from tests.integration import bank as banking
        from tests.integration import faketime
        from tests.integration import test_disk_full as disks
        from tests.integration import test_faults as scenarios

    def say(text: str) -> None:
        print(text, flush=True)

    library = faketime.faketime_library()
    if "bank-clock-step" in faults and library is None:
        faults.remove("bank-clock-step")
        say(f"soak: leaving out bank-clock-step: {faketime.SKIP_REASON}")
    if "bank-disk-full" in faults:
        try:
            disks.SmallDiskPostgres().release()  # can a tmpfs be mounted here?
        except OSError as error:
            faults.remove("bank-disk-full")
            say(f"soak: leaving out bank-disk-full: {error.strerror}")
    if not faults:
        parser.error("no fault left to run")
    say(f"soak: {args.seconds:g} s of rounds, faults {','.join(faults)}, seed {seed}")
    rng = random.Random(seed)
    fault_rng = random.Random(seed)  # the order of faults replays with --seed, whatever the traffic did
    services: list[ServiceProcess] = []

    def start_service(url: str, *extra: str, env: dict | None = None) -> ServiceProcess:
        service = ServiceProcess(url, *extra, env=env).start()
        services.append(service)
        return service

    postgres = scenarios.DedicatedPostgres().start()
    harness = None
    bank = None
    rounds: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    try:
        database_url = postgres.create_database()
        say(f"postgres on {postgres.host}:{postgres.port}, database {database_url.rsplit('/', 1)[1]}")
        harness = scenarios.Harness(database_url, (postgres.host, postgres.port), start_service, rng, say).start()
        say(f"service on {harness.service.target}, through the proxy on {harness.proxy.address}")
        if any(fault in BANK_FAULTS for fault in faults):
            clock = faketime.Clock(postgres.directory, library) if library else None
            bank = banking.Bank(
                postgres,
                start_service,
                random.Random(rng.random()),
                program=args.bank == "vouchers",
                say=say,
                clock=clock,
            ).start()
            say(f"bank: service on {bank.service.target}, database {bank.url.rsplit('/', 1)[1]} ({args.bank})")

        def bank_round(fault: str):
            problems = banking.run_round(bank, BANK_FAULTS[fault])
            return problems, bank.summary()

        def disk_full_round():
            """A fresh Postgres on a small tmpfs (its data grows with every round), a bank on it, one fill."""
            small = disks.SmallDiskPostgres().start()
            full = None
            try:
                full = banking.Bank(small, start_service, random.Random(rng.random()), say=say).start()
                problems = banking.run_round(full, "disk-full")
                if full.disk_full_health != "SERVING":
                    problems.append(f"health said {full.disk_full_health} while the disk was full")
                return problems, f"while the disk was full: {full.disk_full_answers}; {full.summary()}"
            finally:
                if full is not None:
                    full.service.kill()
                    full.close()
                small.stop()

        run = {
            "sigkill": lambda: scenarios.run_round(
                harness, scenarios.fault_sigkill, killed=True, replays_max=REPLAYS_PER_ROUND_MAX
            ),
            "unreachable": lambda: scenarios.run_round(
                harness, scenarios.fault_unreachable, replays_max=REPLAYS_PER_ROUND_MAX
            ),
            "stall": lambda: scenarios.run_round(harness, scenarios.fault_stall, replays_max=REPLAYS_PER_ROUND_MAX),
            "restart": lambda: scenarios.run_round(
                harness, scenarios.fault_restart, postgres, replays_max=REPLAYS_PER_ROUND_MAX
            ),
            "terminate": lambda: scenarios.run_round(
                harness, scenarios.fault_terminate, replays_max=REPLAYS_PER_ROUND_MAX
            ),
            **{fault: (lambda fault=fault: bank_round(fault)) for fault in BANK_FAULTS},
            "bank-disk-full": disk_full_round,
        }
        number = 0
        while time.monotonic() - started < args.seconds:
            number += 1
            fault = fault_rng.choice(faults)
            round_started = time.monotonic()
            try:
                problems, report = run[fault]()
            except AssertionError as error:  # a fault's own expectation (NOT_SERVING, recovery...) failed
                problems, report = [f"{fault}: {error}"], None
            rounds[fault] += 1
            if problems:
                say(f"round {number} ({fault}): {len(problems)} DISCREPANCIES")
                for problem in problems[:50]:
                    say(f"  - {problem}")
                _show_logs(bank if fault in BANK_FAULTS else None if fault == "bank-disk-full" else harness, say)
                say(f"FAILED after {time.monotonic() - started:.0f} s, {number} rounds; replay with --seed {seed}")
                return 1
            say(f"round {number} ({fault}, {time.monotonic() - round_started:.1f} s): OK — since the start: {report}")
            if rounds[fault] == 1:
                say(f"  checked after each {fault} round: {_checked(fault)}")
        assert harness is not None
        say(
            f"PASSED: {number} rounds in {time.monotonic() - started:.0f} s "
            f"({', '.join(f'{count} {name}' for name, count in sorted(rounds.items()))}); "
            f"{len(harness.ops)} operations, {sum(op.interrupted for op in harness.ops)} interrupted, "
            f"{sum(op.abandoned for op in harness.ops)} abandoned; seed {seed}"
        )
        return 0
    finally:
        if harness is not None:
            harness.close()
        if bank is not None:
            bank.close()
        for service in services:
            service.kill()
        postgres.stop()


def _checked(fault: str) -> str:
    if fault in BANK_FAULTS or fault == "bank-disk-full":
        return (
            "(disk full: only UNAVAILABLE, OK or FAILED_PRECONDITION answered while full, the service "
            "running, health SERVING, balances answered; then) "
            if fault == "bank-disk-full"
            else ""
        ) + (
            "every open hold captured by its own merchant; the journal sums to 0 per asset and per "
            "transaction; no member balance negative; balances = entries; every acknowledged operation in "
            "the journal exactly once under the id it was answered; no transaction or authorization id "
            "answered twice or naming two holds; no batch dated before an earlier one; GetBalance = journal; "
            "reconcile passes"
        )
    checks = [
        "every acknowledged operation in the journal exactly once (by idempotency key), with its "
        "balanced entries, hold and hold resolution",
        "no unanswered operation half-applied; none refused as 'not applied' was committed",
        "no journal rows of calls nobody made",
        "GetBalance == Postgres balance == sum of entries == what the answers imply, per member",
        "ledger_discrepancies() == []",
        "answered calls replay identically (sample)",
        "the service holds the writer lock",
    ]
    if fault in ("unreachable", "stall"):
        checks.insert(
            0,
            "health NOT_SERVING during the outage, only UNAVAILABLE answered in it, "
            "SERVING again by itself, calls succeed again",
        )
    elif fault in ("restart", "terminate"):
        checks.insert(0, "SERVING again by itself, calls succeed again, a second service is refused")
    else:
        checks.insert(0, "the restarted service serves again")
    return "; ".join(checks)


def _show_logs(harness, say) -> None:
    if harness is None or harness.service is None:
        return
    lines = [line for line in harness.service.log_lines if '"level": "info"' not in line]
    say("--- service log (warnings and errors, last 40) ---\n" + "".join(lines[-40:]))


if __name__ == "__main__":
    sys.exit(main())
