"""The measurements: bulk throughput and CPU per GB (iperf3), HTTPS requests on new connections
at a constant rate (oha), the highest clean connection rate, and memory held by idle
connections. Each returns plain numbers for the JSON results; a missing number is an error."""

from __future__ import annotations

import json
import math
import os
import selectors
import socket
import sqlite3
import tempfile
import time
from contextlib import closing
from pathlib import Path

from procs import LOOPBACK, HarnessError, cpu_seconds, kernel_socket_bytes, mem_available_bytes, rss_bytes, run


BUSY_RETRIES = 20  # iperf3's server takes a moment to finish the last test before the next
BUSY_WAIT_S = 0.25
# iperf3's server runs one test at a time and takes any new connection for the next test's
# control connection: a proxy's health check connecting just then (static-ingress and HAProxy
# check every second) makes the server drop the real client's, which fails with one of these.
# Nothing was measured; the run is tried again.
IPERF_RETRYABLE = ("busy", "control message", "Connection reset by peer", "unable to connect", "Bad file descriptor")


def bulk(port: int, streams: int, seconds: int) -> dict:
    """iperf3 from client to server through the path: received bits per second and bytes."""
    argv = ["iperf3", "--client", LOOPBACK, "--port", str(port), "--time", str(seconds),
            "--parallel", str(streams), "--connect-timeout", "3000", "--json"]  # fmt: skip
    retried = 0
    for _ in range(BUSY_RETRIES):
        result = run(argv, seconds + 30, f"iperf3 with {streams} streams")
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError as err:
            raise HarnessError(f"iperf3 with {streams} streams gave no JSON: {result.stderr.strip()[:200]}") from err
        if not any(text in report.get("error", "") for text in IPERF_RETRYABLE):
            break
        retried += 1
        time.sleep(BUSY_WAIT_S)
    if "error" in report:
        raise HarnessError(f"iperf3 with {streams} streams failed: {report['error']}")
    received = report["end"]["sum_received"]
    if result.returncode != 0 or received["bytes"] <= 0:
        raise HarnessError(f"iperf3 with {streams} streams moved no data (exit status {result.returncode})")
    return {"gbit_s": received["bits_per_second"] / 1e9, "bytes": received["bytes"], "retried": retried}


def bulk_with_cpu(port: int, pids: list[int], seconds: int) -> dict:
    """One stream, then eight; the proxy's CPU time around both, per GB moved."""
    before = cpu_seconds(pids) if pids else 0.0
    one = bulk(port, 1, seconds)
    eight = bulk(port, 8, seconds)
    used = (cpu_seconds(pids) - before) if pids else None
    gigabytes = (one["bytes"] + eight["bytes"]) / 1e9
    return {
        "bulk_1_gbit_s": one["gbit_s"],
        "bulk_8_gbit_s": eight["gbit_s"],
        "bulk_retries": one["retried"] + eight["retried"],
        "cpu_s_per_gb": used / gigabytes if used is not None else None,
    }


# oha: HTTPS GETs at a fixed rate, each on a new TCP and TLS connection.

OHA_WORKERS = 500  # in-flight requests allowed; far above rate x latency, so the rate holds
OHA_TIMEOUT = "2s"  # a request slower than this counts as an error


def oha_argv(oha: Path, port: int, rate: int, seconds: float, server_name: str | None = None) -> list[str]:
    """oha's command line; with `server_name`, the URL names it (so the ClientHello carries it
    as SNI) and --connect-to still sends every connection to loopback."""
    host = server_name or LOOPBACK
    connect_to = ["--connect-to", f"{server_name}:{port}:{LOOPBACK}:{port}"] if server_name else []
    return [
        str(oha), f"https://{host}:{port}/", *connect_to,
        "-z", f"{seconds}s",
        "-q", str(rate),
        "-c", str(OHA_WORKERS),
        "-t", OHA_TIMEOUT,
        "--disable-keepalive",
        "--latency-correction",
        "--wait-ongoing-requests-after-deadline",
        "--insecure",
        "--no-tui",
        "--output-format", "json",
    ]  # fmt: skip


# oha's first requests wait for its own start-up (runtime, TLS set-up: tens of milliseconds),
# which would otherwise be most of the p99.9. Latency counts only requests due after this.
WARMUP_S = 1.0


def constant_rate(oha: Path, port: int, rate: int, seconds: float, server_name: str | None = None) -> dict:
    """Success ratio (all requests) and latency percentiles in ms (requests due after the
    warm-up) at `rate` new connections per second. oha's per-request records (--db-url) give
    the percentiles, so that the warm-up can be left out."""
    warmup = min(WARMUP_S, seconds / 4)
    with tempfile.TemporaryDirectory(prefix="oha-") as tmp:
        db = Path(tmp) / "requests.db"
        result = run(
            [*oha_argv(oha, port, rate, seconds, server_name), "--db-url", str(db)], seconds + 30, f"oha at {rate}/s"
        )
        if result.returncode != 0:
            raise HarnessError(
                f"oha at {rate}/s failed (exit status {result.returncode}): {result.stderr.strip()[:200]}"
            )
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError as err:
            raise HarnessError(f"oha at {rate}/s gave no JSON: {result.stderr.strip()[:200]}") from err
        latencies = request_latencies(db, warmup) if db.exists() else []
    statuses = report.get("statusCodeDistribution", {})
    errors = report.get("errorDistribution", {})
    ok = statuses.get("200", 0)
    total = sum(statuses.values()) + sum(errors.values())
    if total == 0:
        raise HarnessError(f"oha at {rate}/s sent no request")
    return {
        "rate": rate,
        "requests": total,
        "success_ratio": ok / total,
        "achieved_rps": ok / seconds,
        "p50_ms": percentile(latencies, 0.50),
        "p99_ms": percentile(latencies, 0.99),
        "p999_ms": percentile(latencies, 0.999),
        "latency_samples": len(latencies),
        "errors": errors,
    }


def request_latencies(db: Path, warmup_s: float) -> list[float]:
    """Each request's latency in ms, from when it was due (latency correction), leaving out
    those due in the warm-up."""
    with closing(sqlite3.connect(db)) as con:
        rows = con.execute(
            "SELECT duration FROM oha WHERE COALESCE(start_latency_correction, start) >= ?", (warmup_s,)
        ).fetchall()
    return sorted(row[0] * 1000 for row in rows)


def percentile(ordered: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list; None when it is empty."""
    if not ordered:
        return None
    return ordered[max(math.ceil(q * len(ordered)) - 1, 0)]


# The highest clean rate: a step passes with no error, at least 95% of the asked rate done, and
# a p99 under 1 s (past that the queue, not the path, sets the latency).
PASS_SHARE = 0.95
PASS_P99_MS = 1000.0


def passes(step: dict) -> bool:
    return (
        step["success_ratio"] == 1.0
        and step["achieved_rps"] >= PASS_SHARE * step["rate"]
        and step["p99_ms"] is not None
        and step["p99_ms"] < PASS_P99_MS
    )


# The search stops once the last pass and the first failure are this close (a share of the
# pass): 2.5 %, finer than the 10 % differences it must tell apart.
SEARCH_RESOLUTION = 0.025


def highest_clean_rate(oha: Path, port: int, start: int, ceiling: int, steps: int, seconds: float) -> dict:
    """Doubles the rate from `start` until a step fails (or `ceiling`), then bisects between the
    last pass and the first failure until they are SEARCH_RESOLUTION apart; `steps` runs at
    most. Returns the highest passing rate."""
    best, worst = 0, None
    rate = start
    tried = []
    for _ in range(steps):
        step = constant_rate(oha, port, rate, seconds)
        tried.append({k: step[k] for k in ("rate", "requests", "success_ratio", "achieved_rps", "p99_ms")})
        if passes(step):
            best = rate
        else:
            worst = rate
        if worst is None:
            if rate >= ceiling:
                break
            rate = min(rate * 2, ceiling)
        else:
            if worst - best <= max(int(best * SEARCH_RESOLUTION), 1):
                break
            rate = (best + worst) // 2 if best else max(worst // 2, 1)
    return {"max_clean_rate": best, "max_rate_steps": tried}


# The API-like load: many keep-alive connections, each sending a small request now and then.
# oha opens all its connections at the start: thousands of full TLS handshakes at once, which
# take 1 to 1.5 s on the benchmark's two cores and hold up the first requests behind them on
# every path. Latency counts the requests due after this, on connections already open, as an
# API client's pool keeps them.
API_WARMUP_S = 2.5


def api_load(oha: Path, port: int, connections: int, rate: int, seconds: float) -> dict:
    """`connections` keep-alive HTTPS connections opened once, `rate` requests a second shared
    among them (each connection asks about every connections/rate seconds): the success
    ratio, p50/p99 in ms after the warm-up, and the request count, for CPU per request."""
    warmup = min(API_WARMUP_S, seconds / 3)
    argv = [
        str(oha), f"https://{LOOPBACK}:{port}/",
        "-z", f"{seconds}s",
        "-q", str(rate),
        "-c", str(connections),
        "-t", OHA_TIMEOUT,
        "--latency-correction",
        "--wait-ongoing-requests-after-deadline",
        "--insecure",
        "--no-tui",
        "--output-format", "json",
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="oha-") as tmp:
        db = Path(tmp) / "requests.db"
        result = run([*argv, "--db-url", str(db)], seconds + 60, f"oha keep-alive at {rate}/s")
        if result.returncode != 0:
            raise HarnessError(f"oha keep-alive failed (exit status {result.returncode}): {result.stderr.strip()[:200]}")
        try:
            report = json.loads(result.stdout)
        except json.JSONDecodeError as err:
            raise HarnessError(f"oha keep-alive gave no JSON: {result.stderr.strip()[:200]}") from err
        latencies = request_latencies(db, warmup) if db.exists() else []
    statuses = report.get("statusCodeDistribution", {})
    errors = report.get("errorDistribution", {})
    ok = statuses.get("200", 0)
    total = sum(statuses.values()) + sum(errors.values())
    if total == 0:
        raise HarnessError("oha keep-alive sent no request")
    return {
        "api_requests": total,
        "api_success_ratio": ok / total,
        "api_p50_ms": percentile(latencies, 0.50),
        "api_p99_ms": percentile(latencies, 0.99),
    }


# Idle connections: many connections, one byte each way, then nothing.

IDLE_BATCH = 250  # connects in flight at once, well under the listen backlogs
IDLE_STEP_TIMEOUT_S = 10.0
SETTLE_S = 1.0


def idle_memory(port: int, pids: list[int], count: int) -> dict:
    """Opens `count` connections through the path, each echoing one byte (so buffers have been
    used once, as on a real connection), and reads the proxy's RSS, the machine's MemAvailable
    and the kernel's socket memory before and while they are open. Closes them all at the end."""
    rss_before = rss_bytes(pids) if pids else 0
    avail_before = steady_mem_available()
    kernel_before = kernel_socket_bytes()
    conns: list[socket.socket] = []
    try:
        while len(conns) < count:
            conns.extend(open_echoed(port, min(IDLE_BATCH, count - len(conns)), len(conns), count))
        time.sleep(SETTLE_S)
        rss_during = rss_bytes(pids) if pids else 0
        avail_during = steady_mem_available()
        kernel_during = kernel_socket_bytes()
        # Every connection must still be there: a proxy that dropped some saved no memory.
        dropped = sum(1 for conn in conns if peer_closed(conn))
        if dropped:
            raise HarnessError(f"{dropped} of {count} idle connections via port {port} were closed by the far side")
    finally:
        for conn in conns:
            conn.close()
    return {
        "idle_connections": count,
        "rss_mib": rss_during / 2**20 if pids else None,
        "rss_kib_per_conn": (rss_during - rss_before) / 1024 / count if pids else None,
        "machine_kib_per_conn": (avail_before - avail_during) / 1024 / count,
        "kernel_kib_per_conn": (kernel_during - kernel_before) / 1024 / count,
    }


def open_echoed(port: int, n: int, already: int, count: int) -> list[socket.socket]:
    """n connections, each with one byte sent and echoed back, or an error naming the step."""
    sel = selectors.DefaultSelector()
    pending: dict[socket.socket, str] = {}
    done: list[socket.socket] = []
    try:
        for _ in range(n):
            conn = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            conn.setblocking(False)
            conn.connect_ex((LOOPBACK, port))
            pending[conn] = "connect"
            sel.register(conn, selectors.EVENT_WRITE)
        deadline = time.monotonic() + IDLE_STEP_TIMEOUT_S
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                conn = key.fileobj
                where = f"idle connection {already + len(done) + 1} of {count} via port {port}"
                try:
                    if pending[conn] == "connect":
                        err = conn.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise HarnessError(f"{where}: connect failed: {os.strerror(err)}")
                        conn.send(b"x")
                        pending[conn] = "echo"
                        sel.modify(conn, selectors.EVENT_READ)
                    elif conn.recv(1) == b"x":
                        del pending[conn]
                        sel.unregister(conn)
                        done.append(conn)
                    else:
                        raise HarnessError(f"{where}: closed before the echo")
                except OSError as err:
                    raise HarnessError(f"{where}: {err.strerror or err}") from err
        if pending:
            steps = sorted(set(pending.values()))
            raise HarnessError(
                f"idle connections via port {port}: {len(pending)} of a batch of {n} stuck at {'/'.join(steps)} "
                f"after {IDLE_STEP_TIMEOUT_S:.0f}s ({already + len(done)} of {count} open)"
            )
    except BaseException:
        for conn in [*pending, *done]:
            conn.close()
        raise
    finally:
        sel.close()
    return done


def peer_closed(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def steady_mem_available() -> int:
    """The median of three MemAvailable reads 100 ms apart, to damp other processes' churn."""
    reads = []
    for _ in range(3):
        reads.append(mem_available_bytes())
        time.sleep(0.1)
    return sorted(reads)[1]
