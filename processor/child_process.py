"""A child process started from the service without running Python in the forked copy of the service.

Why not `asyncio.create_subprocess_exec`: under uvloop (the service's loop) it forks through libuv and,
in the forked child before exec, takes the GIL and runs `PyOS_AfterFork_Child` and every Python
`os.register_at_fork(after_in_child=…)` hook (uvloop issue #749). The service has gRPC's and asyncpg's
threads: running the interpreter in a fork of a multi-threaded process is undefined, and here it was
not hypothetical — a restarted projector child died of SIGSEGV one millisecond after its start, in CI
(stop 26). `subprocess.Popen` forks through CPython's `_posixsubprocess` (vfork on Linux), which runs
no Python between fork and exec. Its pipes are then handed to the loop, and its exit is awaited on a
pidfd, so nothing blocks the loop and no thread waits for it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
from typing import Sequence


class ChildProcess:
    """A running child: `stdin` a write transport (write / is_closing / close), `stdout` a StreamReader,
    `returncode` None while it runs (negative: the signal that ended it, as subprocess says)."""

    def __init__(self, popen: subprocess.Popen[bytes], stdin: asyncio.WriteTransport, stdout: asyncio.StreamReader):
        self._popen = popen
        self.stdin = stdin
        self.stdout = stdout
        self._exited: asyncio.Future[int] | None = None

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL, unless it was already reaped (its pid may then be another process's)."""
        if self._popen.returncode is None:
            self._popen.kill()

    async def wait(self) -> int:
        """Its exit code, once it exits (several waiters share one pidfd)."""
        if self._popen.returncode is not None:
            return self._popen.returncode
        if self._exited is None:
            self._exited = asyncio.get_running_loop().create_future()
            self._watch_exit(self._exited)
        return await asyncio.shield(self._exited)

    def _watch_exit(self, exited: asyncio.Future[int]) -> None:
        loop = asyncio.get_running_loop()
        # the pidfd becomes readable when the child exits; the child is not reaped until then, so its
        # pid cannot have been reused
        descriptor = os.pidfd_open(self._popen.pid)

        def readable() -> None:
            loop.remove_reader(descriptor)
            os.close(descriptor)
            code = self._popen.wait()  # it has exited: this reaps it without blocking
            self.stdin.close()
            if not exited.done():
                exited.set_result(code)

        loop.add_reader(descriptor, readable)


async def start(command: Sequence[str], environment: dict[str, str]) -> ChildProcess:
    """Starts `command` with its stdin and stdout as pipes to this process (stderr: this process's)."""
    popen = subprocess.Popen(
        list(command), stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=environment, close_fds=True
    )
    assert popen.stdin is not None and popen.stdout is not None
    loop = asyncio.get_running_loop()
    try:
        stdin, _ = await loop.connect_write_pipe(asyncio.Protocol, popen.stdin)
        stdout = asyncio.StreamReader(limit=1 << 16)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdout), popen.stdout)
    except BaseException:
        popen.kill()
        popen.wait()
        raise
    return ChildProcess(popen, stdin, stdout)
