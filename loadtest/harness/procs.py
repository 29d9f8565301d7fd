"""Processes the harness starts, free loopback ports, and what /proc says about them."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
from pathlib import Path

LOOPBACK = "127.0.0.1"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# Ports below the kernel's ephemeral range (32768 and up here), so an outgoing connection of
# this run or anyone else's cannot take a port between our check and the server's bind.
PORT_RANGE = (20000, 32000)
STOP_GRACE_S = 5.0


class HarnessError(Exception):
    """A failure with a one-line reason that the harness prints before exiting non-zero."""


_taken: set[int] = set()


def free_port() -> int:
    """A loopback TCP and UDP port nobody holds now (and not handed out before in this run)."""
    for _ in range(200):
        port = random.randrange(*PORT_RANGE)
        if port in _taken:
            continue
        try:
            with (
                socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp,
                socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp,
            ):
                tcp.bind((LOOPBACK, port))
                udp.bind((LOOPBACK, port))
        except OSError:
            continue
        _taken.add(port)
        return port
    raise HarnessError(f"no free loopback port found in {PORT_RANGE[0]}-{PORT_RANGE[1]} after 200 tries")


def clean_env() -> dict[str, str]:
    """This environment without STATIC_INGRESS_* settings, which would override the proxy's
    defaults behind the harness's back."""
    return {k: v for k, v in os.environ.items() if not k.startswith("STATIC_INGRESS_")}


class Proc:
    """One process the harness started; its output goes to a log file in the work directory."""

    def __init__(self, name: str, argv: list[str], log: Path, cwd: Path | None = None):
        self.name = name
        self.argv = argv
        self.log = log
        with open(log, "ab") as out:
            try:
                self.popen = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, env=clean_env()
                )
            except OSError as err:
                raise HarnessError(f"cannot start {name} ({argv[0]}): {err.strerror}") from err

    @property
    def pid(self) -> int:
        return self.popen.pid

    def check_running(self) -> None:
        code = self.popen.poll()
        if code is not None:
            raise HarnessError(f"{self.name} exited with status {code}: {self.last_log_line()} (log: {self.log})")

    def last_log_line(self) -> str:
        try:
            lines = [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return "no log"
        return lines[-1].strip() if lines else "no output"

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace; children it forked (nginx workers) go too."""
        if self.popen.poll() is not None:
            return
        children = descendants(self.pid)
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(timeout=STOP_GRACE_S)
        # Workers normally leave with their master; one left behind is ours to end.
        for child in children:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)


class Processes:
    """Every process of a run, stopped in reverse order of start however the run ends."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.procs: list[Proc] = []

    def start(self, name: str, argv: list[str], cwd: Path | None = None) -> Proc:
        proc = Proc(name, argv, self.workdir / f"{name}.log", cwd)
        self.procs.append(proc)
        return proc

    def stop(self, proc: Proc) -> None:
        proc.stop()
        self.procs.remove(proc)

    def stop_all(self) -> None:
        while self.procs:
            self.procs.pop().stop()


def descendants(pid: int) -> list[int]:
    """Every process below pid (nginx workers below their master), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def tree(pid: int) -> list[int]:
    return [pid, *descendants(pid)]


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time used so far by these processes (all their threads)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError as err:
            raise HarnessError(f"cannot read CPU time of process {pid}: {err.strerror}") from err
        # utime and stime are fields 14 and 15 of stat; fields[0] here is field 3 (state).
        total += int(fields[11]) + int(fields[12])
    return total / CLOCK_TICKS


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes, from VmRSS."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError as err:
            raise HarnessError(f"cannot read memory of process {pid}: {err.strerror}") from err
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
    return total


def kernel_socket_bytes() -> int:
    """Kernel memory that sockets and their buffers take: unreclaimable slab (where socket
    structures live; the reclaimable part is file caches that a compile on the same machine
    churns) plus the pages TCP buffers hold now (/proc/net/sockstat)."""
    unreclaimable = next(
        int(line.split()[1]) * 1024
        for line in Path("/proc/meminfo").read_text().splitlines()
        if line.startswith("SUnreclaim:")
    )
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return unreclaimable + int(fields[fields.index("mem") + 1]) * os.sysconf("SC_PAGE_SIZE")
    raise HarnessError("no TCP line in /proc/net/sockstat")


def mem_available_bytes() -> int:
    """The machine's MemAvailable: what it could still hand out, kernel buffers counted."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise HarnessError("no MemAvailable line in /proc/meminfo")


def run(argv: list[str], timeout_s: float, what: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Runs a tool to completion under a time bound; a failure to start or a hang is an error."""
    try:
        return subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout_s, stdin=subprocess.DEVNULL, cwd=cwd
        )
    except FileNotFoundError as err:
        raise HarnessError(f"{what}: {argv[0]} not found (run loadtest/install.sh)") from err
    except subprocess.TimeoutExpired as err:
        raise HarnessError(f"{what}: {argv[0]} did not finish within {timeout_s:.0f}s") from err


def wait_until(what: str, attempt, timeout_s: float, procs: list[Proc] = ()) -> None:
    """Calls attempt() until it returns None (success) or timeout_s passes; attempt returns a
    reason string while not ready yet. A process that dies meanwhile ends the wait at once."""
    deadline = time.monotonic() + timeout_s
    reason = "not tried"
    while time.monotonic() < deadline:
        for proc in procs:
            proc.check_running()
        reason = attempt()
        if reason is None:
            return
        time.sleep(0.1)
    raise HarnessError(f"{what} not ready after {timeout_s:.0f}s: {reason}")
