"""processor.child_process: the projector's child is started without Python running in the fork."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import uvloop

from processor import child_process

ECHO = [sys.executable, "-c", "import sys; sys.stdout.write(sys.stdin.readline()); sys.stdout.flush()"]


def run(coroutine):
    return uvloop.run(coroutine)  # the service's loop: the one whose own fork runs Python in the child


def test_no_python_at_fork_hook_runs_in_the_forked_child_and_the_pipes_work():
    hook_read, hook_write = os.pipe()
    os.set_blocking(hook_read, False)
    # a hook that writes to the pipe if the interpreter runs in the fork (uvloop's own spawn does run it)
    os.register_at_fork(after_in_child=lambda: os.write(hook_write, b"ran"))

    async def scenario():
        child = await child_process.start(ECHO, dict(os.environ))
        child.stdin.write(b"hello 42\n")
        line = await asyncio.wait_for(child.stdout.readline(), 30)
        code = await asyncio.wait_for(child.wait(), 30)
        return line, code, child.returncode

    try:
        line, code, returncode = run(scenario())
        assert (line, code, returncode) == (b"hello 42\n", 0, 0)
        try:
            ran = os.read(hook_read, 16)
        except BlockingIOError:
            ran = b""
        assert ran == b"", "an at-fork hook ran in the child: Python ran between fork and exec"
    finally:
        os.close(hook_read)
        os.close(hook_write)


def test_the_exit_code_of_a_killed_child_is_the_negative_signal_and_every_waiter_gets_it():
    async def scenario():
        child = await child_process.start([sys.executable, "-c", "import time; time.sleep(60)"], dict(os.environ))
        assert child.returncode is None
        waiters = [asyncio.ensure_future(child.wait()) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert not any(w.done() for w in waiters)
        child.kill()
        codes = await asyncio.wait_for(asyncio.gather(*waiters), 30)
        child.kill()  # reaped already: does nothing (its pid may be another process's by now)
        return codes, await child.wait(), child.stdin.is_closing(), await child.stdout.read()

    codes, again, closing, rest = run(scenario())
    assert codes == [-signal.SIGKILL] * 3 and again == -signal.SIGKILL
    assert closing and rest == b""


def test_a_child_that_dies_of_a_signal_reports_it_and_a_cancelled_waiter_leaves_the_others():
    crash = [sys.executable, "-c", "import os, signal, sys; sys.stdin.readline(); os.kill(os.getpid(), signal.SIGSEGV)"]

    async def scenario():
        child = await child_process.start(crash, dict(os.environ))
        cancelled = asyncio.ensure_future(child.wait())
        kept = asyncio.ensure_future(child.wait())
        await asyncio.sleep(0)
        cancelled.cancel()
        child.stdin.write(b"go\n")
        return await asyncio.wait_for(kept, 30), cancelled.cancelled()

    assert run(scenario()) == (-signal.SIGSEGV, True)
