"""Command line: python -m processor {serve,project,migrate,merchant,key,program,member,audit,reconcile,report,seed,call,demo} ...

Every command accepts --database-url / --data-dir (same defaults as serve: DATABASE_URL, else the
embedded Postgres under .points-data/).
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

from processor import config, logs

DATABASE_OPTIONS = ("database_url", "data_dir", "database_name", "embedded_postgres_settings")
EPOCH_ORDINAL = 719_163  # datetime.date(1970, 1, 1).toordinal()


def _settings(args: argparse.Namespace) -> config.Settings:
    try:
        settings = config.load(vars(args))
    except ValueError as error:
        sys.exit(f"error: {error}")
    from processor.store import url_secrets

    logs.hide(*url_secrets(settings.database_url))  # from every line this process writes
    return settings


def _run(coroutine):
    import uvloop

    return uvloop.run(coroutine)


async def _with_store(settings: config.Settings, action, audit_as: tuple[str, dict] | None = None):
    """Runs `action(store)`; with `audit_as` (command, arguments), writes its audit record (key id "cli")
    whatever the outcome: a state change made on the host is on the trail like one made through the API."""
    from processor.audit import CLI_KEY_ID, AuditLog
    from processor.server import open_store

    store = await open_store(settings)
    try:
        if audit_as is None:
            return await action(store)
        outcome, message = "OK", ""
        try:
            return await action(store)
        except BaseException as error:
            outcome, message = "FAILED_PRECONDITION", str(error) or type(error).__name__
            raise
        finally:
            await AuditLog(store).record(CLI_KEY_ID, "cli " + audit_as[0], audit_as[1], outcome, message)
    finally:
        await store.close()


def _cli_arguments(args: argparse.Namespace) -> dict:
    """The command's arguments for its audit record, without the database's (its URL may hold a password)."""
    return {
        k: v
        for k, v in vars(args).items()
        if k not in DATABASE_OPTIONS and k not in ("func", "log_level", "log_format")
    }


def cmd_serve(args: argparse.Namespace) -> int:
    import ssl

    import asyncpg
    from processor.server import serve
    from processor.store import StoreError
    from processor.transport import TransportSecurityError

    settings = _settings(args)
    try:
        _run(serve(settings))
    except TransportSecurityError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ssl.SSLCertVerificationError as error:  # before OSError, of which it is one
        print(
            f"error: Postgres' TLS certificate was not accepted ({error.verify_message or error}): check that "
            "sslrootcert= in --database-url names the CA that issued it and, with sslmode=verify-full, that "
            "the URL's host is a name the certificate lists; the service did not start",
            file=sys.stderr,
        )
        return 1
    except asyncpg.InvalidAuthorizationSpecificationError as error:  # a wrong password, an unknown user
        print(
            f"error: Postgres refused the login: {error}; check the user and password of --database-url; "
            "the service did not start",
            file=sys.stderr,
        )
        return 1
    except TimeoutError:  # (an OSError, whose message is empty)
        print(
            "error: Postgres did not answer start-up's reads in time (is it overloaded, or the network "
            "slow?); the service did not start",
            file=sys.stderr,
        )
        return 1
    except (StoreError, OSError) as error:  # a start the operator must fix: say what, no traceback
        print(f"error: {error or type(error).__name__}", file=sys.stderr)
        return 1
    return 0


def cmd_project(args: argparse.Namespace) -> int:
    """The projector process of a service started with --projector process (processor/projector_process.py)."""
    from processor import projector_process
    from processor.store import PROJECTOR_APPLICATION_NAME, Store

    fence = projector_process.fence_from_arguments(args.writer_epoch, args.writer_lock_pid, args.writer_lock_started)
    del args.writer_epoch, args.writer_lock_pid, args.writer_lock_started
    settings = _settings(args)
    if not settings.database_url:
        sys.exit("error: project needs --database-url (DATABASE_URL): the service passes the one it uses")

    async def run() -> int:
        # two connections: the projection's, and a prune's or the mark's read beside it
        # its own application_name: an SRE (and a test) tells the child's sessions from the service's
        store = await Store.open(
            settings.database_url,
            2,
            command_timeout=settings.commit_timeout_seconds,
            application_name=PROJECTOR_APPLICATION_NAME,
        )
        store.use_writer_fence(fence)
        try:
            return await projector_process.run_child(
                store,
                settings.projection_batches_per_transaction_max,
                settings.commit_timeout_seconds,
                settings.batch_log_retention_seconds,
                settings.projection_linger_seconds,
            )
        finally:
            await store.close()

    return _run(run())


def cmd_migrate(args: argparse.Namespace) -> int:
    settings = _settings(args)

    # open_store applies the migrations; report the schema version afterwards
    async def run():
        from processor.server import open_store

        store = await open_store(settings)
        try:
            return await store.pool.fetch("SELECT version, name FROM schema_migrations ORDER BY version")
        finally:
            await store.close()

    rows = _run(run())
    for row in rows:
        print(f"applied {row['version']:04d} {row['name']}")
    return 0


def cmd_merchant_add(args: argparse.Namespace) -> int:
    from processor.store import StoreError

    settings = _settings(args)

    async def action(store):
        return await store.add_merchant(
            args.merchant_id,
            args.give_back_bps,
            name=args.name,
            region=args.region,
            fee_redeemed_bps=args.fee_redeemed_bps,
            fee_issued_bps=args.fee_issued_bps,
            give_back_bounds=await store.give_back_bounds(settings.program_id),
        )

    try:
        row = _run(_with_store(settings, action, ("merchant add", _cli_arguments(args))))
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"merchant {row.merchant_id} added: give-back {row.give_back_bps} bps, slot {row.merchant_slot}")
    return 0


def cmd_key_create(args: argparse.Namespace) -> int:
    """Prints a new API key; the key is the last word on stdout (it is shown once, stored as a hash)."""
    from processor import auth
    from processor.store import StoreError

    settings = _settings(args)
    merchant_ids = args.merchant_id or []
    limits = (args.points_per_call_max, args.points_per_day_max)
    if args.support:
        kind = "support"
        if merchant_ids or args.operator or args.gateway:
            sys.exit("error: a support key takes no --merchant-id, --operator or --gateway")
        if not all(limit is not None and limit > 0 for limit in limits):
            sys.exit("error: a support key needs --points-per-call-max and --points-per-day-max (point-units, > 0)")
    elif any(limit is not None for limit in limits):
        sys.exit("error: --points-per-call-max and --points-per-day-max are for --support keys only")
    elif args.operator:
        kind = "operator"
        if merchant_ids:
            sys.exit("error: an operator key takes no --merchant-id")
    elif args.gateway:
        kind = "gateway"
        if not merchant_ids:
            sys.exit("error: a gateway key needs one or more --merchant-id")
    else:
        kind = "merchant"
        if len(merchant_ids) != 1:
            sys.exit("error: give exactly one --merchant-id (or --gateway with several, or --operator)")
    expires_at = _expires_at(args)
    key = auth.new_key()

    async def action(store):
        if kind == "support":
            from processor import member_store

            await member_store.insert_support_key(
                store.pool, key.key_id, key.secret_sha256, args.description, *limits, expires_at
            )
            return
        await store.insert_api_key(
            key.key_id, key.secret_sha256, kind, sorted(set(merchant_ids)), args.description, expires_at
        )

    try:
        _run(
            _with_store(settings, action, ("key create", {**_cli_arguments(args), "key_id": key.key_id, "kind": kind}))
        )
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    scope = f" for {', '.join(merchant_ids)}" if merchant_ids else ""
    until = f", expires {_iso(expires_at)}" if expires_at else ""
    print(f"{kind} key {key.key_id}{scope}{until} (shown once; send as 'authorization: Bearer <key>'): {key.key}")
    return 0


def _iso(moment) -> str:
    import datetime as dt

    return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z") if moment else "-"


def _expires_at(args: argparse.Namespace):
    """The key's expiry from --expires-in-days or --expires-at (None: never); exits 2 on a bad value."""
    import datetime as dt

    if args.expires_in_days is not None and args.expires_at is not None:
        _refuse("give --expires-in-days or --expires-at, not both")
    now = dt.datetime.now(dt.timezone.utc)
    if args.expires_in_days is not None:
        if not 0 < args.expires_in_days <= 36_500:
            _refuse("--expires-in-days must be 1..36500")
        return now + dt.timedelta(days=args.expires_in_days)
    if args.expires_at is not None:
        try:
            moment = dt.datetime.fromisoformat(args.expires_at)
        except ValueError:
            _refuse(f"--expires-at {args.expires_at!r} is not an ISO 8601 time; write e.g. 2027-01-01T00:00:00Z")
        if moment.tzinfo is None:
            _refuse(f"--expires-at {args.expires_at!r} has no time zone; add one, e.g. Z for UTC")
        if moment <= now:
            _refuse(f"--expires-at {args.expires_at!r} is not in the future")
        return moment
    return None


def cmd_key_list(args: argparse.Namespace) -> int:
    """One line per key: id, kind, merchants, created, expires, revoked, last used, description."""
    settings = _settings(args)

    async def action(store):
        return await store.api_keys()

    rows = _run(_with_store(settings, action))
    print("key_id\tkind\tmerchants\tcreated_at\texpires_at\trevoked_at\tlast_used_at\tdescription")
    for r in rows:
        print(
            "\t".join(
                (
                    r["key_id"],
                    r["kind"],
                    ",".join(r["merchant_ids"]) or "-",
                    _iso(r["created_at"]),
                    _iso(r["expires_at"]),
                    _iso(r["revoked_at"]),
                    _iso(r["last_used_at"]),
                    r["description"] or "-",
                )
            )
        )
    return 0


def cmd_audit_list(args: argparse.Namespace) -> int:
    """The audit trail, newest first, one JSON object a line."""
    import json
    from processor.audit import AuditLog

    settings = _settings(args)
    if not 1 <= args.limit <= 100_000:
        _refuse("--limit must be 1..100000")

    async def action(store):
        return await AuditLog(store).records(args.key_id or "", args.method or "", None, args.limit)

    for r in _run(_with_store(settings, action)):
        print(
            json.dumps(
                {
                    "audit_id": r["audit_id"],
                    "at": _iso(r["at"]),
                    "key_id": r["key_id"],
                    "method": r["method"],
                    "request": json.loads(r["request"]),
                    "outcome": r["outcome"],
                    "message": r["message"],
                    "request_id": r["request_id"],
                },
                sort_keys=True,
            )
        )
    return 0


def cmd_key_revoke(args: argparse.Namespace) -> int:
    settings = _settings(args)

    async def action(store):
        return await store.revoke_api_key(args.key_id)

    revoked_at = _run(_with_store(settings, action, ("key revoke", _cli_arguments(args))))
    if revoked_at is None:
        print(f"error: no API key {args.key_id!r}", file=sys.stderr)
        return 1
    print(f"key {args.key_id} revoked at {revoked_at.isoformat()}")
    return 0


def _member_json(member_id: str, credentials) -> dict:
    from processor.pipeline import now_micros

    if credentials is None:
        return {"member_id": member_id, "totp_enrolled": False, "pin_set": False, "failures": 0, "locked_until": None}
    locked = credentials.locked_until if credentials.locked_until_us() > now_micros() else None
    return {
        "member_id": member_id,
        "totp_enrolled": credentials.totp_secret is not None,
        "pin_set": credentials.pin_hash is not None,
        "failures": credentials.failures,
        "locked_until": locked.isoformat().replace("+00:00", "Z") if locked is not None else None,
    }


def cmd_member(args: argparse.Namespace) -> int:
    """member enroll-totp | set-pin | reset | show: what MemberAdminService does, straight on the database.
    enroll-totp prints the secret once; set-pin reads the PIN from stdin (never from the command line,
    which shell history and ps would keep)."""
    import json

    from processor import presence
    from processor.domain import Rejection
    from processor.pipeline import now_micros
    from processor.presence_store import PresenceStore

    settings = _settings(args)
    member_id = args.member_id
    pin = ""
    if args.action == "set-pin":
        if sys.stdin.isatty():
            import getpass

            pin = getpass.getpass("PIN (4..12 digits): ")
        else:
            pin = sys.stdin.readline().strip()
        try:
            pin_hash, salt, params = presence.hash_pin(pin)
        except Rejection as rejection:
            print(f"error: {rejection.message}", file=sys.stderr)
            return 2

    async def action(store):
        members = PresenceStore(store)
        now_us = now_micros()
        if args.action == "enroll-totp":
            secret = presence.new_totp_secret()
            stored = presence.seal_secret(secret, member_id, config.member_secret_key(settings))
            if not await members.enroll_totp(member_id, stored, args.replace, now_us):
                return None, f"member {member_id!r} has a one-time code app enrolled already; add --replace"
            return {
                "member_id": member_id,
                "secret_base32": secret,
                "provisioning_uri": presence.provisioning_uri(secret, member_id),
            }, ""
        if args.action == "set-pin":
            return _member_json(member_id, await members.set_pin(member_id, pin_hash, salt, params, now_us)), ""
        if args.action == "reset":
            credentials = await members.reset(member_id, args.remove_totp, args.remove_pin)
        else:
            credentials = await members.credentials(member_id)
        if credentials is None:
            return None, f"member {member_id!r} has nothing enrolled and no failures"
        return _member_json(member_id, credentials), ""

    # a change made on the host is on the audit trail like one made through MemberAdminService (never
    # the PIN, the secret or the key that seals it)
    audit_as = (
        None
        if args.action == "show"
        else ("member " + args.action, {k: v for k, v in _cli_arguments(args).items() if k != "member_secret_key"})
    )
    shown, problem = _run(_with_store(settings, action, audit_as))
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    print(json.dumps(shown, indent=2))
    return 0


def _program_json(version) -> dict:
    from processor import rules
    from processor.store import from_micros

    return {
        "program_id": version.program_id,
        "version": version.version,
        "effective_from_us": version.effective_from_us,
        "effective_from": from_micros(version.effective_from_us).isoformat().replace("+00:00", "Z"),
        "config": rules.version_to_config(version),
    }


def _refuse(message: str):
    """A program command that cannot be done: the reason on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _effective_from_us(text: str) -> int:
    import datetime as dt

    try:
        moment = dt.datetime.fromisoformat(text)
    except ValueError:
        _refuse(f"--effective-from {text!r} is not an ISO 8601 time; write e.g. 2026-01-01T00:00:00Z")
    if moment.tzinfo is None:
        _refuse(f"--effective-from {text!r} has no time zone; add one, e.g. Z for UTC or +01:00")
    try:
        moment = moment.astimezone(dt.timezone.utc)
    except OverflowError:
        _refuse(f"--effective-from {text!r} is out of range")
    return (
        (moment.toordinal() - EPOCH_ORDINAL) * 86_400 + moment.hour * 3600 + moment.minute * 60 + moment.second
    ) * 1_000_000 + moment.microsecond


def cmd_program_set(args: argparse.Namespace) -> int:
    """Stores the next version of the program from a JSON file; prints the stored version as JSON."""
    import getpass
    import json
    from processor import rules
    from processor.store import StoreError

    settings = _settings(args)
    try:
        with open(args.file, encoding="utf-8") as file:
            config = json.load(file)
    except OSError as error:
        _refuse(f"cannot read {args.file}: {error.strerror or error}")
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        _refuse(f"{args.file} is not JSON: {error}")
    if isinstance(config, dict) and "config" in config:
        _refuse(f'{args.file} looks like `program show` output; pass one version\'s "config" object alone')
    effective_from_us = _effective_from_us(args.effective_from) if args.effective_from else None
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        user = "unknown"

    async def action(store):
        return await store.add_program_version(settings.program_id, effective_from_us, config, f"cli {user}")

    try:
        version = _run(_with_store(settings, action, ("program set", {**_cli_arguments(args), "config": config})))
    except (rules.ConfigError, StoreError) as error:
        _refuse(str(error))
    stored = _program_json(version)
    print(json.dumps(stored, indent=2))
    print(
        f"stored version {version.version} of program {version.program_id!r}, in force from "
        f"{stored['effective_from']}; the running service loads it at once",
        file=sys.stderr,
    )
    return 0


def cmd_program_show(args: argparse.Namespace) -> int:
    """Prints every version of the program as JSON, oldest first, and the one in force now."""
    import json
    import time
    from processor.domain import Rejection

    settings = _settings(args)

    async def action(store):
        return await store.program(settings.program_id)

    program = _run(_with_store(settings, action))
    in_force = None
    if program is not None:
        try:
            in_force = program.at(time.time_ns() // 1000).version
        except Rejection:  # the first version has not started yet
            pass
    print(
        json.dumps(
            {
                "program_id": settings.program_id,
                "version_in_force": in_force,
                "versions": [_program_json(v) for v in program.versions] if program else [],
            },
            indent=2,
        )
    )
    return 0


def cmd_reconcile(args: argparse.Namespace) -> int:
    """Checks the ledger's invariants; prints each check, exits 1 with the first discrepancy."""
    settings = _settings(args)

    async def action(store):
        from processor import reconcile

        behind = await reconcile.unprojected(store.pool, reconcile.PROJECTION_WAIT_SECONDS)
        if behind:
            print(f"not yet projected: {behind} batches of the batch log (checked: the projected ones)", flush=True)
        return await store.ledger_discrepancies(report=lambda check: print(f"checking: {check}", flush=True))

    problems = _run(_with_store(settings, action))
    if problems:
        print(f"DISCREPANCY: {problems[0]}")
        if len(problems) > 1:
            print(f"({len(problems) - 1} more)")
        return 1
    print("reconciled: every check holds")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Prints the alliance report of a closed settlement period as CSV (processor/reports.py)."""
    from processor import reports

    settings = _settings(args)
    if not 1 <= args.top <= 100:
        print("--top must be 1..100", file=sys.stderr)
        return 2

    async def action(store):
        return await reports.alliance_report(store.pool, args.period_id, args.top)

    report = _run(_with_store(settings, action))
    if report is None:
        print(
            f"period {args.period_id} is not closed (close it with ClearingService.CloseSettlementPeriod)",
            file=sys.stderr,
        )
        return 2
    sys.stdout.write(reports.report_csv(report))
    return 0


def cmd_seed(args: argparse.Namespace) -> int:
    """Creates a network of merchants (varied rates) and members with points, through the journal."""
    import time as _time

    settings = _settings(args)

    async def action(store):
        started = _time.monotonic()
        await store.seed_network(
            args.merchants, args.members, args.points_per_member, progress=lambda text: print(text, flush=True)
        )
        return _time.monotonic() - started

    seconds = _run(_with_store(settings, action))
    print(f"seeded {args.merchants} merchants and {args.members} members in {seconds:.1f} s")
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    """One PointsService call: the request as JSON (the .proto field names), the response printed as
    JSON; a refusal printed as its status code and message (exit 1)."""
    import json

    import grpc
    from google.protobuf import json_format

    from points.v1 import points_pb2 as pb
    from points.v1 import points_pb2_grpc

    service = pb.DESCRIPTOR.services_by_name["PointsService"]
    method = service.methods_by_name.get(args.method)
    if method is None or method.client_streaming or method.server_streaming:
        unary = sorted(m.name for m in service.methods if not (m.client_streaming or m.server_streaming))
        print(f"error: {args.method!r} is not a unary PointsService method; one of {', '.join(unary)}", file=sys.stderr)
        return 2
    try:
        request = json_format.Parse(args.request, getattr(pb, method.input_type.name)())
    except (json_format.ParseError, json.JSONDecodeError) as error:
        print(f"error: the request is not a {method.input_type.name} in JSON: {error}", file=sys.stderr)
        return 2
    if args.tls_ca_file:
        from processor.transport import channel_credentials

        channel = grpc.secure_channel(args.target, channel_credentials(args.tls_ca_file, "", ""))
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        stub = points_pb2_grpc.PointsServiceStub(channel)
        try:
            response = getattr(stub, args.method)(
                request, timeout=args.timeout_seconds, metadata=(("authorization", f"Bearer {args.key}"),)
            )
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    print(json_format.MessageToJson(response, preserving_proto_field_name=True, indent=2))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import grpc
    from points.v1 import points_pb2 as pb
    from points.v1 import points_pb2_grpc
    from processor.store import StoreError

    settings = _settings(args)
    merchant, member = args.merchant_id, args.member_id
    if args.serve:
        return _demo_with_service(args)

    async def ensure_merchant(store) -> str:
        """The demo merchant, and a key of its own for this run (the service authenticates every call)."""
        from processor import auth

        if await store.merchant(merchant) is None:
            try:
                await store.add_merchant(merchant, 1000)
            except StoreError:
                pass  # added concurrently
        key = auth.new_key()
        await store.insert_api_key(key.key_id, key.secret_sha256, "merchant", [merchant], "demo run")
        return key.key

    metadata = (("authorization", "Bearer " + _run(_with_store(settings, ensure_merchant))),)

    run_id = uuid.uuid4().hex[:12]
    if args.client_tls_ca_file or args.client_tls_cert_file:
        from processor.transport import TransportSecurityError, channel_credentials

        if bool(args.client_tls_cert_file) != bool(args.client_tls_key_file):
            sys.exit("error: --tls-cert-file and --tls-key-file go together (the client's certificate for mutual TLS)")
        try:
            credentials = channel_credentials(
                args.client_tls_ca_file, args.client_tls_cert_file, args.client_tls_key_file
            )
        except TransportSecurityError as error:
            sys.exit(f"error: {error}")
        options = [("grpc.ssl_target_name_override", args.tls_server_name)] if args.tls_server_name else []
        channel = grpc.secure_channel(args.target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(args.target)
    with channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            print(
                f"error: no points service answers on {args.target}; start it with "
                "`python -m processor serve` (or `make run`); a service with TLS needs --tls-ca-file",
                file=sys.stderr,
            )
            return 1
        stub = points_pb2_grpc.PointsServiceStub(channel)
        try:
            earn = stub.Earn(
                pb.EarnRequest(
                    merchant_id=merchant,
                    member_id=member,
                    purchase_amount=10_000,
                    idempotency_key=f"demo-earn-{run_id}",
                ),
                metadata=metadata,
            )
            print(
                f"earn: purchase 100.00 at {merchant} ({earn.give_back_bps} bps) -> +{earn.points} point-units, "
                f"balance {earn.balance} ({earn.transaction_id})"
            )
            auth = stub.Authorize(
                pb.AuthorizeRequest(
                    merchant_id=merchant, member_id=member, points=500, idempotency_key=f"demo-auth-{run_id}"
                ),
                metadata=metadata,
            )
            print(f"authorize: hold 500 point-units ({auth.authorization_id}), available {auth.available}")
            capture = stub.Capture(
                pb.CaptureRequest(
                    merchant_id=merchant,
                    authorization_id=auth.authorization_id,
                    points=300,
                    idempotency_key=f"demo-capture-{run_id}",
                ),
                metadata=metadata,
            )
            print(f"capture: 300 captured, {capture.released} released ({capture.transaction_id})")
            balance = stub.GetBalance(pb.GetBalanceRequest(member_id=member), metadata=metadata)
            print(
                f"balance of {member}: posted {balance.posted}, held {balance.held}, "
                f"available {balance.available} point-units"
            )
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    return 0


def _demo_with_service(args: argparse.Namespace) -> int:
    """Starts `serve` in a subprocess on a free port, runs the demo against it, then stops it."""
    import re
    import subprocess

    database_args = []
    for name in DATABASE_OPTIONS:
        if getattr(args, name) is not None:
            database_args += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    command = [
        sys.executable,
        "-m",
        "processor",
        "serve",
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        *database_args,
    ]
    service = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert service.stdout is not None
        for line in service.stdout:
            print(line, end="")
            match = re.search(r"SERVING on (\S+)", line)
            if match:
                break
        else:
            print("error: the service did not start; see its log above", file=sys.stderr)
            return 1
        demo = [
            sys.executable,
            "-m",
            "processor",
            "demo",
            "--target",
            match.group(1),
            "--merchant-id",
            args.merchant_id,
            "--member-id",
            args.member_id,
            *database_args,
        ]
        return subprocess.call(demo)
    finally:
        service.terminate()
        service.wait(timeout=30)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m processor", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    top.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR [default INFO]")
    top.add_argument(
        "--log-format",
        choices=logs.FORMATS,
        default=os.environ.get("POINTS_LOG_FORMAT", "auto"),
        help="json (one object a line), text, or auto: text on a terminal, JSON otherwise "
        "[env POINTS_LOG_FORMAT, default auto]",
    )
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC service")
    config.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    project = commands.add_parser(
        "project",
        help="the projector process a service with --projector process starts (stdin: its pipe; EOF stops it)",
    )
    project.add_argument("--writer-epoch", type=int, required=True, help="the service's ledger_writer epoch")
    project.add_argument("--writer-lock-pid", type=int, required=True, help="the service's writer-lock session pid")
    project.add_argument(
        "--writer-lock-started", required=True, help="that session's backend_start (ISO 8601): the fence checks it"
    )
    config.add_arguments(
        project,
        (
            *DATABASE_OPTIONS,
            "commit_timeout_seconds",
            "projection_batches_per_transaction_max",
            "batch_log_retention_seconds",
            "projection_linger_seconds",
        ),
    )
    project.set_defaults(func=cmd_project)

    migrate = commands.add_parser("migrate", help="apply the schema migrations and exit")
    config.add_arguments(migrate, DATABASE_OPTIONS)
    migrate.set_defaults(func=cmd_migrate)

    merchant = commands.add_parser("merchant", help="manage merchants").add_subparsers(dest="action", required=True)
    add = merchant.add_parser("add", help="add a merchant with its give-back rate")
    add.add_argument("--merchant-id", required=True)
    add.add_argument(
        "--give-back-bps",
        type=int,
        required=True,
        help="within the program's give_back_bps_min..max (300..2000 = 3%%..20%% unless it sets them)",
    )
    add.add_argument(
        "--fee-redeemed-bps",
        type=int,
        default=0,
        help="operator fee on points redeemed at the merchant, 0..10000 bps [default 0]",
    )
    add.add_argument(
        "--fee-issued-bps",
        type=int,
        default=0,
        help="operator fee on points the merchant issues, 0..10000 bps [default 0]",
    )
    add.add_argument("--name", default="")
    add.add_argument("--region", default="")
    config.add_arguments(add, DATABASE_OPTIONS + ("program_id",))
    add.set_defaults(func=cmd_merchant_add)

    key = commands.add_parser("key", help="manage API keys").add_subparsers(dest="action", required=True)
    create = key.add_parser("create", help="create a merchant, gateway, operator or support key; prints it once")
    create.add_argument(
        "--merchant-id", action="append", help="the merchant the key acts for (repeat with --gateway for several)"
    )
    create.add_argument("--gateway", action="store_true", help="a gateway key for the listed merchants")
    create.add_argument(
        "--operator",
        action="store_true",
        help="an operator key (MerchantAdminService, ProgramsService, ClearingService, ...)",
    )
    create.add_argument(
        "--support",
        action="store_true",
        help="a support key: MemberAdminService's reads and AdjustPoints within the two limits below",
    )
    create.add_argument(
        "--points-per-call-max", type=int, help="support keys: largest |points| of one AdjustPoints, point-units"
    )
    create.add_argument(
        "--points-per-day-max", type=int, help="support keys: sum of |points| adjusted per UTC day, point-units"
    )
    create.add_argument("--description", default="")
    create.add_argument("--expires-in-days", type=int, help="the key stops working this many days from now")
    create.add_argument("--expires-at", help="ISO 8601 time with a zone when the key stops working")
    config.add_arguments(create, DATABASE_OPTIONS)
    create.set_defaults(func=cmd_key_create)
    key_list = key.add_parser("list", help="list the keys: kind, merchants, expiry, revocation, last use")
    config.add_arguments(key_list, DATABASE_OPTIONS)
    key_list.set_defaults(func=cmd_key_list)
    revoke = key.add_parser("revoke", help="revoke a key (effective within the auth cache time)")
    revoke.add_argument("--key-id", required=True)
    config.add_arguments(revoke, DATABASE_OPTIONS)
    revoke.set_defaults(func=cmd_key_revoke)

    program = commands.add_parser(
        "program", help="the program's versioned rules (tiers, expiry, promotions, ...)"
    ).add_subparsers(dest="action", required=True)
    program_set = program.add_parser(
        "set",
        help="store the next version of the rules from a JSON file (see ops/program.example.json); prints it as JSON",
    )
    program_set.add_argument("--file", required=True, help="the version's settings, a JSON object")
    program_set.add_argument(
        "--effective-from",
        help="ISO 8601 time with a zone from which the version applies, at least 1 s ahead [default: 1 s from now]",
    )
    config.add_arguments(program_set, DATABASE_OPTIONS + ("program_id",))
    program_set.set_defaults(func=cmd_program_set)
    program_show = program.add_parser("show", help="print every version of the rules as JSON, oldest first")
    config.add_arguments(program_show, DATABASE_OPTIONS + ("program_id",))
    program_show.set_defaults(func=cmd_program_show)

    member = commands.add_parser(
        "member", help="members' means of proving presence at a till (as MemberAdminService)"
    ).add_subparsers(dest="action", required=True)
    for name, help_text in (
        ("enroll-totp", "a new one-time code secret for the member's app; prints it once"),
        ("set-pin", "set the member's PIN, read from stdin (4..12 digits)"),
        ("reset", "clear the member's failures and lock (optionally remove its TOTP or PIN)"),
        ("show", "what the member has enrolled, its failures and lock (never the secret)"),
    ):
        command = member.add_parser(name, help=help_text)
        command.add_argument("--member-id", required=True)
        if name == "enroll-totp":
            command.add_argument("--replace", action="store_true", help="replace an enrolled secret")
        if name == "reset":
            command.add_argument("--remove-totp", action="store_true")
            command.add_argument("--remove-pin", action="store_true")
        config.add_arguments(command, DATABASE_OPTIONS + (("member_secret_key",) if name == "enroll-totp" else ()))
        command.set_defaults(func=cmd_member)
    audit_parser = commands.add_parser("audit", help="the audit trail of operator changes").add_subparsers(
        dest="action", required=True
    )
    audit_list = audit_parser.add_parser("list", help="print audit records, newest first, one JSON object a line")
    audit_list.add_argument("--key-id", help="only this API key's records ('cli': the CLI's)")
    audit_list.add_argument("--method", help="only this method, e.g. /points.v1.MerchantAdmin/IssueApiKey")
    audit_list.add_argument("--limit", type=int, default=100, help="records, at most [default 100]")
    config.add_arguments(audit_list, DATABASE_OPTIONS)
    audit_list.set_defaults(func=cmd_audit_list)

    reconcile = commands.add_parser("reconcile", help="check the ledger's invariants; exit 1 on a discrepancy")
    config.add_arguments(reconcile, DATABASE_OPTIONS)
    reconcile.set_defaults(func=cmd_reconcile)

    report = commands.add_parser(
        "report",
        help="the alliance report of a closed settlement period as CSV (flows, members, top merchants, regions)",
    )
    report.add_argument("--period-id", type=int, required=True, help="a closed settlement period")
    report.add_argument("--top", type=int, default=10, help="merchants in each top list, 1..100 (default 10)")
    config.add_arguments(report, DATABASE_OPTIONS)
    report.set_defaults(func=cmd_report)

    seed = commands.add_parser("seed", help="create a network of merchants and members (scale tests)")
    seed.add_argument("--merchants", type=int, default=50_000)
    seed.add_argument("--members", type=int, default=1_000_000)
    seed.add_argument("--points-per-member", type=int, default=10_000, help="point-units earned by each member")
    config.add_arguments(seed, DATABASE_OPTIONS)
    seed.set_defaults(func=cmd_seed)

    call = commands.add_parser("call", help="one PointsService call with a JSON request, the response as JSON")
    call.add_argument("method", help="Earn, Authorize, Capture, Void, Redeem, Refund, GetBalance, ...")
    call.add_argument("request", help="the request as JSON, with the .proto field names")
    call.add_argument("--key", required=True, help="the API key (pk_...) to send as 'authorization: Bearer'")
    call.add_argument("--target", default="127.0.0.1:50051", help="service address [default 127.0.0.1:50051]")
    call.add_argument("--tls-ca-file", default="", help="the CA of a TLS service's certificate (PEM)")
    call.add_argument("--timeout-seconds", type=float, default=30.0, help="deadline of the call [default 30]")
    call.set_defaults(func=cmd_call)

    demo = commands.add_parser("demo", help="one earn and one authorize+capture against a running service")
    demo.add_argument("--target", default="127.0.0.1:50051", help="service address [default 127.0.0.1:50051]")
    demo.add_argument(
        "--serve", action="store_true", help="start the service in the background for the demo, and stop it afterwards"
    )
    demo.add_argument("--merchant-id", default="demo-cafe")
    demo.add_argument("--member-id", default="demo-member")
    demo.add_argument(
        "--tls-ca-file",
        dest="client_tls_ca_file",
        default="",
        help="connect with TLS, trusting the CA certificates in this PEM file (the service's "
        "--tls-cert-file issuer) [default: plaintext]",
    )
    demo.add_argument(
        "--tls-cert-file",
        dest="client_tls_cert_file",
        default="",
        help="PEM certificate the demo presents, for a service with --tls-client-ca-file (mutual TLS)",
    )
    demo.add_argument(
        "--tls-key-file", dest="client_tls_key_file", default="", help="PEM private key of --tls-cert-file"
    )
    demo.add_argument(
        "--tls-server-name",
        default="",
        help="name to check the service's certificate against, when --target is an address it "
        "does not name [default: the host of --target]",
    )
    config.add_arguments(demo, DATABASE_OPTIONS)
    demo.set_defaults(func=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    # gRPC's C core logs each failed TLS handshake (a plaintext client, a port scanner) as a non-JSON
    # INFO line on stderr: one per connection attempt. Its errors still show; GRPC_VERBOSITY set by the
    # operator wins. Set before grpc is first imported (the commands import it lazily).
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    args = parser().parse_args(argv)
    logs.configure(args.log_level.upper(), args.log_format)
    func = args.func
    del args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
