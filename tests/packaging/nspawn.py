"""Shared by the container test and the lab (loadtest/lab): waiting for a condition, and finding
the systemd that a systemd-nspawn booted."""

import pathlib
import time


def wait_for(what, predicate, timeout_s, interval_s=0.25):
    """Polls `predicate` until it returns a true value, at most `timeout_s`; returns that value.
    Readiness is a condition waited for, never a sleep."""
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def container_leader(nspawn_pid):
    """The PID of the container's PID 1 once it has exec'd systemd (a child of systemd-nspawn;
    before that the child is still a copy of nspawn, setting the namespaces up), or None."""
    try:
        children = pathlib.Path(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "systemd":
                return int(pid)
        except OSError:
            pass
    return None
