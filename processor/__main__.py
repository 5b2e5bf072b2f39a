"""Command line: python -m processor {serve,migrate,merchant,demo} ...

Every command accepts --database-url / --data-dir (same defaults as serve: DATABASE_URL, else the
embedded Postgres under .points-data/).
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import uuid

from processor import config, logs

DATABASE_OPTIONS = ("database_url", "data_dir", "database_name")


def _settings(args: argparse.Namespace) -> config.Settings:
    try:
        return config.load(vars(args))
    except ValueError as error:
        sys.exit(f"error: {error}")


def _run(coroutine):
    import uvloop
    return uvloop.run(coroutine)


async def _with_store(settings: config.Settings, action):
    from processor.server import open_store
    store = await open_store(settings)
    try:
        return await action(store)
    finally:
        await store.close()


def cmd_serve(args: argparse.Namespace) -> int:
    from processor.server import serve
    settings = _settings(args)
    _run(serve(settings))
    return 0


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
        return await store.add_merchant(args.merchant_id, args.give_back_bps)
    try:
        row = _run(_with_store(settings, action))
    except StoreError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"merchant {row.merchant_id} added: give-back {row.give_back_bps} bps, slot {row.merchant_slot}")
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

    async def ensure_merchant(store):
        if await store.merchant(merchant) is None:
            try:
                await store.add_merchant(merchant, 1000)
            except StoreError:
                pass  # added concurrently
    _run(_with_store(settings, ensure_merchant))

    run_id = uuid.uuid4().hex[:12]
    with grpc.insecure_channel(args.target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=10)
        except grpc.FutureTimeoutError:
            print(f"error: no points service answers on {args.target}; start it with "
                  "`python -m processor serve` (or `make run`)", file=sys.stderr)
            return 1
        stub = points_pb2_grpc.PointsServiceStub(channel)
        try:
            earn = stub.Earn(pb.EarnRequest(merchant_id=merchant, member_id=member, purchase_amount=10_000,
                                            idempotency_key=f"demo-earn-{run_id}"))
            print(f"earn: purchase 100.00 at {merchant} ({earn.give_back_bps} bps) -> +{earn.points} point-units, "
                  f"balance {earn.balance} ({earn.transaction_id})")
            auth = stub.Authorize(pb.AuthorizeRequest(merchant_id=merchant, member_id=member, points=500,
                                                      idempotency_key=f"demo-auth-{run_id}"))
            print(f"authorize: hold 500 point-units ({auth.authorization_id}), available {auth.available}")
            capture = stub.Capture(pb.CaptureRequest(merchant_id=merchant, authorization_id=auth.authorization_id,
                                                     points=300, idempotency_key=f"demo-capture-{run_id}"))
            print(f"capture: 300 captured, {capture.released} released ({capture.transaction_id})")
            balance = stub.GetBalance(pb.GetBalanceRequest(member_id=member))
            print(f"balance of {member}: posted {balance.posted}, held {balance.held}, "
                  f"available {balance.available} point-units")
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
    command = [sys.executable, "-m", "processor", "serve", "--listen", "127.0.0.1:0",
               "--metrics-listen", "127.0.0.1:0", *database_args]
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
        demo = [sys.executable, "-m", "processor", "demo", "--target", match.group(1),
                "--merchant-id", args.merchant_id, "--member-id", args.member_id, *database_args]
        return subprocess.call(demo)
    finally:
        service.terminate()
        service.wait(timeout=30)


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m processor", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    top.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR [default INFO]")
    commands = top.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC service")
    config.add_arguments(serve)
    serve.set_defaults(func=cmd_serve)

    migrate = commands.add_parser("migrate", help="apply the schema migrations and exit")
    config.add_arguments(migrate, DATABASE_OPTIONS)
    migrate.set_defaults(func=cmd_migrate)

    merchant = commands.add_parser("merchant", help="manage merchants").add_subparsers(dest="action", required=True)
    add = merchant.add_parser("add", help="add a merchant with its give-back rate")
    add.add_argument("--merchant-id", required=True)
    add.add_argument("--give-back-bps", type=int, required=True, help="300..2000 (3%%..20%%)")
    config.add_arguments(add, DATABASE_OPTIONS)
    add.set_defaults(func=cmd_merchant_add)

    demo = commands.add_parser("demo", help="one earn and one authorize+capture against a running service")
    demo.add_argument("--target", default="127.0.0.1:50051", help="service address [default 127.0.0.1:50051]")
    demo.add_argument("--serve", action="store_true",
                      help="start the service in the background for the demo, and stop it afterwards")
    demo.add_argument("--merchant-id", default="demo-cafe")
    demo.add_argument("--member-id", default="demo-member")
    config.add_arguments(demo, DATABASE_OPTIONS)
    demo.set_defaults(func=cmd_demo)
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logs.configure(args.log_level.upper())
    func = args.func
    del args.func
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
