#!/usr/bin/env python3
"""The lab's load generator: new TLS connections at a scheduled rate, plus long-lived streams.

What it does
------------
Open-loop, as Vegeta with ``-keepalive=false``: request ``i`` is scheduled at the time the
schedule's cumulative count reaches ``i`` (at a constant rate R, ``t0 + i/R``) whatever happened
to earlier requests. Each request resolves NAME with the system resolver (``getaddrinfo`` in a
thread, every time: the lab's stub resolver caches and honours TTLs, so the client must not),
connects to the first IPv4 address, does a full TLS handshake (SNI = NAME, verified against
``--ca``, no session resumption), sends ``GET PATH HTTP/1.1`` with ``Host`` and
``Connection: close``, reads the status line, headers and ``Content-Length`` body, then reads on
to the server's close (at most ``CLOSE_WAIT``, 1 s, not counted in ``latency``; so the client
never resets a connection by closing with unread data) and closes. One record per request goes
to ``client.jsonl`` in the format of lab-common.md. IPv4 only (the lab's addresses are); a
chunked response is not decoded (it is ``wrong_bytes``): the lab's backends send
``Content-Length``.

Schedule
--------
``--rate R`` from the start, or ``--schedule FILE``: a JSON list of ``[seconds_from_start, rate]``
steps (``[[0, 20], [30, 200], [90, 20]]``); the rate is constant between steps and the count is
continuous across them. ``--duration S`` ends the run (0: until SIGTERM/SIGINT or a control stop).
``--control FILE`` is polled once a second by the main process; when its content changes it is
read as ``{"rate": R}`` (R replaces the schedule from then on: later steps of ``--schedule`` are
dropped) or ``{"stop": true}``. A rate change takes effect ``RATE_CHANGE_LEAD`` (0.5 s) after it
is seen, at the same instant in every worker, so the workers' shares stay one schedule.

Workers
-------
``--workers N`` processes (so handshakes use every core); worker k takes the requests with
``i % N == k`` and stream slots with ``j % N == k``, writes ``client-<k>.jsonl`` (flushed every
half second), and the main process merges them, sorted by ``t``, into ``client.jsonl`` at exit and
deletes them. Each worker holds at most ``--max-in-flight`` requests; a request due while the
bound is reached is recorded as ``error`` / ``client overloaded`` (never skipped), so a
blackholed address cannot exhaust the 20,000 descriptors a process may hold.

Streams
-------
``--streams K`` slots, each running one GET of ``--stream-path`` at a time: the body must be
exactly ``--stream-bytes`` bytes of the repeating pattern ``bytes(range(256))`` and every byte is
checked. When one ends (``kind: "stream"`` record) the slot starts the next, but at most one per
slot per ``STREAM_MIN_GAP`` (1 s), so a refused backend does not become a busy loop. A stream
still running at the end is read to its end, bounded by ``--stream-timeout``.

Outcomes
--------
``ok``; ``refused`` (ConnectionRefusedError); ``reset`` (ConnectionResetError, BrokenPipeError,
ConnectionAbortedError, at any stage); ``timeout`` (``--timeout`` covers the whole request, DNS
included; the detail names the stage); ``dns_error`` (socket.gaierror); ``tls_error`` (an
``ssl.SSLError`` from the TLS engine: bad certificate, alert, protocol error); ``eof`` (the peer
closed before the whole response, including during the handshake); ``wrong_bytes`` (a complete
response that is not what the backend serves: status other than 200, a first body line other than
``blue``/``green``, a stream byte off the pattern); ``error`` (anything else, with the exception
class in ``detail``, e.g. EHOSTUNREACH, and ``client overloaded``). TLS runs over
``ssl.MemoryBIO`` on a plain non-blocking socket, so socket failures always surface as the
socket's own OSError (reset, refused) and never as an ``SSLError`` wrapping them; the ssl module
reports a close during the handshake as ``SSLEOFError``, which is ``eof``. ``detail`` is
``"<stage>: <exception class>: <message>"`` (stages: dns, connect, tls, request, response, body),
or the reason for a short request's ``wrong_bytes`` (``status 503``, ``body b'purple\\n'``); a
stream's reads ``body: BadResponse: byte N is X, expected Y``.

Outputs
-------
``ready`` on stdout once the workers are running; on exit one summary line on stderr
(``client: sent=N ok=M reset=...``); exit 0 after SIGTERM/SIGINT too (1 if a worker failed to
start, 2 for bad arguments). While the run goes on the records are in ``client-<k>.jsonl``;
``client.jsonl`` appears at exit (the merge holds one worker's records in memory at a time). A
worker that has not finished ``--timeout``/``--stream-timeout`` + 10 s after the end is killed
and what it wrote is merged.

Capacity (measured on this 2-core machine, 2026-12-01)
------------------------------------------------------
Against nginx 1.22 on 127.0.0.1 (one worker process, ECDSA P-256 certificate, TLS 1.3 -- nginx
1.22 offers only up to TLS 1.2 unless ``ssl_protocols`` names TLSv1.3 --, ``return 200
"blue\\n"``), client and nginx sharing the two cores, 15 s runs. "Held" means every request ok
and the 99th percentile of ``lag`` under 50 ms. Runs at the same rate varied with the load of
the host, so these are ranges over repeated runs:

    workers  rate/s  result
    1        200-300 held in every run (lag p99 6-42 ms, latency p50 3-8 ms)
    1        350     held in 2 runs of 3 (lag p99 5-26 ms); once lag p99 0.8 s
    1        400-550 not held (lag p99 0.1-6 s)
    2        250-400 held in every run (lag p99 3-17 ms)
    2        450-550 held in 4 runs of 5 (lag p99 6-19 ms); once lag p99 0.3 s at 450
    2        600     held in 1 run of 2 (lag p99 25 ms; the other 0.7 s)
    2        700-800 not held (lag p50 0.4-1.6 s)

Every request was still ok past capacity: the generator falls behind (``lag`` grows) rather
than failing requests, which is why the report must check ``lag``. The client spends 2.7-3.4 ms
of CPU per request (about 1 ms of it OpenSSL 3.0's client handshake, 0.3 ms the resolver
thread hand-off), nginx 0.7-0.9 ms. In the lab the proxies and backends share the same two
cores, so plan a 10x rate well under 300/s.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import concurrent.futures
import heapq
import json
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import ssl
import sys
import time

OUTCOMES = ("ok", "refused", "reset", "timeout", "wrong_bytes", "dns_error", "tls_error", "eof", "error")
BACKENDS = ("blue", "green")
# A rate change is applied this long after the main process sees it, at the same instant in
# every worker: long enough for the message to reach a busy worker before that instant.
RATE_CHANGE_LEAD = 0.5
# How often the main process re-reads --control (the brief: once a second).
CONTROL_POLL = 1.0
# The longest sleep of a worker's scheduler, so a control message or a stop is seen promptly.
SCHEDULER_MAX_SLEEP = 0.25
# After this many requests fired back to back (the worker is behind) the scheduler yields, so
# the requests it started can run.
SCHEDULER_BURST = 64
# A stream slot starts at most one stream per this many seconds.
STREAM_MIN_GAP = 1.0
# Records are flushed to disk at least this often (lab-common.md: at least once a second).
FLUSH_INTERVAL = 0.5
# getaddrinfo blocks, so it runs in threads; enough that a slow resolver does not queue
# every request behind a few lookups.
RESOLVER_THREADS = 32
RECV_SIZE = 65536
MAX_HEAD_BYTES = 64 * 1024
MAX_SHORT_BODY = 1024 * 1024
# After the response, how long to wait for the server's close before closing ourselves.
CLOSE_WAIT = 1.0
# The main process kills a worker that has not finished this long after its last duty
# (end of run + the longest request or stream timeout).
SHUTDOWN_SLACK = 10.0
STARTUP_TIMEOUT = 30.0
PATTERN = bytes(range(256))
# Long enough to compare any chunk read (<= RECV_SIZE) at any offset in one slice.
PATTERN_BIG = PATTERN * (RECV_SIZE // 256 + 2)


# ---------------------------------------------------------------- schedule


class Schedule:
    """A piecewise-constant rate from t0, and the time each request index is due.

    Segments are (start_time, rate, count_at_start); the count is continuous, so request i is
    due when the cumulative count reaches i.
    """

    def __init__(self, t0: float, steps: list[tuple[float, float]]):
        self.segs: list[tuple[float, float, float]] = []
        count = 0.0
        prev = None
        for offset, rate in steps:
            start = t0 + offset
            if prev is not None:
                count += (start - prev[0]) * prev[1]
            prev = (start, rate)
            self.segs.append((start, rate, count))

    def count_at(self, t: float) -> float:
        count = 0.0
        for start, rate, c in self.segs:
            if start <= t:
                count = c + (t - start) * rate
            else:
                break
        return count

    def set_rate(self, at: float, rate: float) -> None:
        """From `at` on the rate is `rate`: later segments are dropped."""
        count = self.count_at(at)
        self.segs = [s for s in self.segs if s[0] < at]
        self.segs.append((at, rate, count))

    def time_of(self, i: int) -> float:
        """When request i is due; math.inf if never under this schedule."""
        # The last segment whose count at start is <= i holds i (a rate-0 segment adds no
        # count, so the one after it, with the same count, wins).
        n = bisect.bisect_right([c for _, _, c in self.segs], i) - 1
        start, rate, c = self.segs[max(n, 0)]
        if rate <= 0:
            return math.inf
        return start + (i - c) / rate


def parse_schedule(text: str) -> list[tuple[float, float]]:
    steps = json.loads(text)
    if not isinstance(steps, list) or not steps:
        raise ValueError("a schedule is a non-empty JSON list of [seconds_from_start, rate]")
    out = []
    for step in steps:
        if not (isinstance(step, list) and len(step) == 2 and all(isinstance(v, (int, float)) for v in step)):
            raise ValueError(f"bad schedule step {step!r}: want [seconds_from_start, rate]")
        offset, rate = float(step[0]), float(step[1])
        if offset < 0 or rate < 0 or (out and offset <= out[-1][0]):
            raise ValueError(f"bad schedule step {step!r}: offsets increase from 0, rates >= 0")
        out.append((offset, rate))
    if out[0][0] != 0:
        out.insert(0, (0.0, 0.0))
    return out


# ---------------------------------------------------------------- one connection


class PeerClosed(Exception):
    """The peer closed before the whole response (outcome eof)."""


class BadResponse(Exception):
    """A complete response that is not what the backend serves (outcome wrong_bytes)."""


class TlsConn:
    """TLS over ssl.MemoryBIO on a non-blocking socket driven by the event loop."""

    def __init__(self, loop, sock, ctx: ssl.SSLContext, name: str):
        self.loop = loop
        self.sock = sock
        self.inc = ssl.MemoryBIO()
        self.out = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname=name)
        self.closed = False

    async def _flush(self):
        data = self.out.read()
        if data:
            await self.loop.sock_sendall(self.sock, data)

    async def _fill(self):
        data = await self.loop.sock_recv(self.sock, RECV_SIZE)
        if data:
            self.inc.write(data)
        else:
            self.inc.write_eof()
            self.closed = True

    async def handshake(self):
        """The handshake, up to the client's Finished, which stays in the buffer: the first
        write sends it with the request in one segment (a send costs ~0.2 ms here)."""
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                await self._flush()
                await self._fill()

    async def write(self, data: bytes):
        self.obj.write(data)
        await self._flush()

    async def read(self) -> bytes:
        """Some plaintext; b"" at the end (close_notify, or a close without one)."""
        while True:
            try:
                return self.obj.read(RECV_SIZE)
            except ssl.SSLWantReadError:
                if self.closed:
                    return b""
                await self._flush()  # TLS 1.3 may need to answer (key update)
                await self._fill()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""


def classify(exc: BaseException) -> str:
    """The outcome kind for an exception raised by a request or stream."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, socket.gaierror):
        return "dns_error"
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, PeerClosed)):
        return "eof"
    if isinstance(exc, ssl.SSLError):
        return "tls_error"
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
        return "reset"
    if isinstance(exc, BadResponse):
        return "wrong_bytes"
    return "error"


def describe(exc: BaseException, stage: str) -> str:
    text = str(exc)
    name = type(exc).__name__
    out = f"{stage}: {name}: {text}" if text else f"{stage}: {name}"
    return out[:200]


async def read_head(conn: TlsConn) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and the body bytes read with them."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await conn.read()
        if not chunk:
            raise PeerClosed(f"closed after {len(buf)} bytes of response head")
        buf += chunk
        if len(buf) > MAX_HEAD_BYTES and b"\r\n\r\n" not in buf:
            raise BadResponse("response head too long")
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():
        raise BadResponse(f"bad status line {lines[0][:60]!r}")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), headers, rest


def content_length(headers: dict[str, str]) -> int | None:
    if "transfer-encoding" in headers:
        raise BadResponse(f"transfer-encoding {headers['transfer-encoding']} not supported")
    if "content-length" not in headers:
        return None
    value = headers["content-length"]
    if not value.isdigit():
        raise BadResponse(f"bad content-length {value[:40]!r}")
    return int(value)


class Job:
    """One request's or stream's record, filled in as it goes."""

    __slots__ = ("rec", "stage", "t_start")

    def __init__(self, kind: str, t: float, worker: int):
        start = time.time()
        self.t_start = start
        self.stage = "dns"
        self.rec = {
            "t": t, "start": start, "lag": start - t, "kind": kind, "ip": None, "outcome": None,
            "detail": "", "latency": None, "connect": None, "tls": None, "bytes": 0,
            "backend": None, "worker": worker,
        }

    def finish(self, outcome: str, detail: str = "") -> dict:
        self.rec["outcome"] = outcome
        self.rec["detail"] = detail
        if self.rec["latency"] is None:
            self.rec["latency"] = time.time() - self.t_start
        return self.rec


async def open_tls(job: Job, cfg, ctx: ssl.SSLContext) -> TlsConn:
    """Resolve, connect and handshake, recording the times; the caller closes conn.sock."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(cfg.name, cfg.port, family=socket.AF_INET, type=socket.SOCK_STREAM)
    ip, port = infos[0][4][:2]
    job.rec["ip"] = ip
    job.stage = "connect"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    conn = TlsConn(loop, sock, ctx, cfg.name)
    try:
        sock.setblocking(False)
        c0 = time.time()
        await loop.sock_connect(sock, (ip, port))
        c1 = time.time()
        job.rec["connect"] = c1 - c0
        job.stage = "tls"
        await conn.handshake()
        job.rec["tls"] = time.time() - c1
    except BaseException:
        sock.close()
        raise
    return conn


async def drain_close(conn: TlsConn):
    """Wait briefly for the server's close, so we never close with unread data (a reset)."""
    try:
        async with asyncio.timeout(CLOSE_WAIT):
            while await conn.read():
                pass
    except (TimeoutError, OSError):
        pass


def request_bytes(cfg, path: str) -> bytes:
    host = cfg.name if cfg.port == 443 else f"{cfg.name}:{cfg.port}"
    return (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: static-ingress-lab-client\r\n"
            f"Accept: */*\r\nConnection: close\r\n\r\n").encode("ascii")


async def short_request(job: Job, cfg, ctx) -> dict:
    conn = None
    try:
        async with asyncio.timeout(cfg.timeout):
            conn = await open_tls(job, cfg, ctx)
            job.stage = "request"
            await conn.write(request_bytes(cfg, cfg.path))
            job.stage = "response"
            status, headers, body = await read_head(conn)
            length = content_length(headers)
            limit = length if length is not None else MAX_SHORT_BODY
            if limit > MAX_SHORT_BODY:
                raise BadResponse(f"content-length {limit} too long for a short request")
            while len(body) < limit:
                chunk = await conn.read()
                if not chunk:
                    if length is None:
                        break
                    job.rec["bytes"] = len(body)
                    raise PeerClosed(f"closed after {len(body)} of {length} body bytes")
                body += chunk
            body = body[:limit]
            job.rec["bytes"] = len(body)
            job.rec["latency"] = time.time() - job.t_start
            if status != 200:
                return job.finish("wrong_bytes", f"status {status}")
            first = body.split(b"\n", 1)[0].decode("latin-1")
            if first not in BACKENDS or b"\n" not in body:
                return job.finish("wrong_bytes", f"body {body[:40]!r}")
            job.rec["backend"] = first
        await drain_close(conn)
        return job.finish("ok")
    except Exception as exc:
        return job.finish(classify(exc), describe(exc, job.stage))
    finally:
        if conn is not None:
            conn.sock.close()


async def stream_request(job: Job, cfg, ctx) -> dict:
    conn = None
    try:
        async with asyncio.timeout(cfg.stream_timeout):
            conn = await open_tls(job, cfg, ctx)
            job.stage = "request"
            await conn.write(request_bytes(cfg, cfg.stream_path))
            job.stage = "response"
            status, headers, chunk = await read_head(conn)
            if status != 200:
                raise BadResponse(f"status {status}")
            length = content_length(headers)
            want = cfg.stream_bytes
            if length is not None and length != want:
                raise BadResponse(f"content-length {length}, expected {want}")
            job.stage = "body"
            got = 0
            while True:
                chunk = chunk[: want - got]
                if chunk:
                    off = got % 256
                    if chunk != PATTERN_BIG[off: off + len(chunk)]:
                        bad = next(n for n, b in enumerate(chunk) if b != PATTERN_BIG[off + n])
                        job.rec["bytes"] = got + bad
                        raise BadResponse(f"byte {got + bad} is {chunk[bad]}, expected {(got + bad) % 256}")
                    got += len(chunk)
                    job.rec["bytes"] = got
                if got >= want:
                    break
                chunk = await conn.read()
                if not chunk:
                    raise PeerClosed(f"closed after {got} of {want} body bytes")
            job.rec["latency"] = time.time() - job.t_start
        await drain_close(conn)
        return job.finish("ok")
    except Exception as exc:
        return job.finish(classify(exc), describe(exc, job.stage))
    finally:
        if conn is not None:
            conn.sock.close()


# ---------------------------------------------------------------- worker process


def make_context(ca: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    # No dummy ChangeCipherSpec in TLS 1.3 (it is for middleboxes; the lab has none): it would
    # cost a send of its own per connection.
    ctx.options &= ~ssl.OP_ENABLE_MIDDLEBOX_COMPAT
    return ctx


class Worker:
    def __init__(self, k: int, cfg, conn):
        self.k = k
        self.cfg = cfg
        self.pipe = conn
        self.ctx = make_context(cfg.ca)
        self.file = open(os.path.join(cfg.out, f"client-{k}.jsonl"), "w", encoding="utf-8")
        self.stopping = False
        self.in_flight: set[asyncio.Task] = set()
        self.streams: set[asyncio.Task] = set()
        self.schedule: Schedule | None = None
        self.end = math.inf

    def record(self, rec: dict):
        for key in ("lag", "latency", "connect", "tls"):
            if rec[key] is not None:
                rec[key] = round(rec[key], 6)
        self.file.write(json.dumps(rec, separators=(",", ":")) + "\n")

    def on_message(self):
        while self.pipe.poll():
            try:
                msg = self.pipe.recv()
            except EOFError:  # the main process is gone: stop
                asyncio.get_running_loop().remove_reader(self.pipe.fileno())
                self.stopping = True
                return
            if msg[0] == "rate":
                self.schedule.set_rate(msg[1], msg[2])
            elif msg[0] == "stop":
                self.stopping = True

    async def flusher(self):
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            self.file.flush()

    async def run_short(self, job: Job):
        try:
            self.record(await short_request(job, self.cfg, self.ctx))
        finally:
            self.in_flight.discard(asyncio.current_task())

    async def scheduler(self):
        n = self.cfg.workers
        i = self.k
        burst = 0
        while not self.stopping:
            t = self.schedule.time_of(i)  # math.inf while the rate is 0
            now = time.time()
            if t >= self.end:
                # nothing more due before the end, unless a control message changes the rate
                if now >= self.end:
                    break
                await asyncio.sleep(min(self.end - now, SCHEDULER_MAX_SLEEP))
                continue
            if t > now:
                burst = 0
                await asyncio.sleep(min(t - now, SCHEDULER_MAX_SLEEP))
                continue
            i += n
            if len(self.in_flight) >= self.cfg.max_in_flight:
                job = Job("short", t, self.k)
                self.record(job.finish("error", "client overloaded"))
            else:
                self.in_flight.add(asyncio.create_task(self._start(t)))
            burst += 1
            if burst >= SCHEDULER_BURST:
                burst = 0
                await asyncio.sleep(0)

    async def _start(self, t: float):
        # The Job is made here, when the task first runs, so `start` and `lag` show when the
        # request really began (a busy loop delays it).
        await self.run_short(Job("short", t, self.k))

    async def stream_slot(self):
        while not self.stopping and time.time() < self.end:
            job = Job("stream", time.time(), self.k)
            self.record(await stream_request(job, self.cfg, self.ctx))
            gap = job.t_start + STREAM_MIN_GAP - time.time()
            if gap > 0 and not self.stopping:
                await asyncio.sleep(gap)

    async def main(self, t0: float):
        loop = asyncio.get_running_loop()
        loop.set_default_executor(concurrent.futures.ThreadPoolExecutor(RESOLVER_THREADS))
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_reader(self.pipe.fileno(), self.on_message)
        self.schedule = Schedule(t0, self.cfg.steps)
        if self.cfg.duration > 0:
            self.end = t0 + self.cfg.duration
        flusher = asyncio.create_task(self.flusher())
        delay = t0 - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        for j in range(self.k, self.cfg.streams, self.cfg.workers):
            self.streams.add(asyncio.create_task(self.stream_slot()))
        await self.scheduler()
        self.stopping = True
        pending = self.in_flight | self.streams
        if pending:
            await asyncio.wait(pending)
        flusher.cancel()
        self.file.flush()

    def stop(self):
        self.stopping = True


def worker_entry(k: int, cfg, conn):
    # SIGINT/SIGTERM are handled by the event loop once it runs; until then, ignore them so a
    # signal during start-up does not kill the worker before it can write anything.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = Worker(k, cfg, conn)
    conn.send(("up",))
    t0 = None
    if conn.poll(STARTUP_TIMEOUT):
        msg = conn.recv()
        if msg[0] == "start":
            t0 = msg[1]
    if t0 is not None:
        asyncio.run(worker.main(t0))
    # asyncio.run put the default handlers back: a late signal must not cut the last write
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker.file.close()
    conn.send(("done",))


# ---------------------------------------------------------------- main process


def read_control(path: str, last: bytes | None):
    """(content, message) if the control file changed since `last`, else (last, None)."""
    try:
        with open(path, "rb") as f:
            data = f.read(65536)
    except FileNotFoundError:
        return last, None
    if data == last:
        return last, None
    try:
        msg = json.loads(data)
        if not isinstance(msg, dict):
            raise ValueError("not an object")
        if msg.get("stop") is True:
            return data, ("stop",)
        rate = msg.get("rate")
        if isinstance(rate, (int, float)) and not isinstance(rate, bool) and rate >= 0:
            return data, ("rate", float(rate))
        raise ValueError('want {"rate": R} or {"stop": true}')
    except ValueError as exc:
        print(f"client: ignoring control file {path}: {exc}", file=sys.stderr, flush=True)
        return data, None


def merge(out: str, workers: int) -> tuple[dict, int]:
    """Merge client-<k>.jsonl into client.jsonl sorted by t; (outcome counts, bad lines)."""
    runs = []
    bad = 0
    counts: dict = {}
    for k in range(workers):
        path = os.path.join(out, f"client-{k}.jsonl")
        rows = []
        try:
            with open(path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        rows.append((rec["t"], line if line.endswith("\n") else line + "\n"))
                        key = (rec["kind"], rec["outcome"])
                        counts[key] = counts.get(key, 0) + 1
                    except (ValueError, KeyError, TypeError):
                        bad += 1  # a half-written last line of a killed worker
        except FileNotFoundError:
            continue
        rows.sort(key=lambda r: r[0])
        runs.append(rows)
    final = os.path.join(out, "client.jsonl")
    tmp = final + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for _, line in heapq.merge(*runs, key=lambda r: r[0]):
            f.write(line)
    os.replace(tmp, final)
    for k in range(workers):
        try:
            os.remove(os.path.join(out, f"client-{k}.jsonl"))
        except FileNotFoundError:
            pass
    return counts, bad


def summary(counts: dict) -> str:
    parts = []
    for kind, word in (("short", "sent"), ("stream", "streams")):
        by = {o: n for (k, o), n in counts.items() if k == kind}
        total = sum(by.values())
        if kind == "stream" and not total:
            continue
        parts.append(f"{word}={total}")
        parts.extend(f"{o}={by[o]}" for o in OUTCOMES if by.get(o))
    return "client: " + " ".join(parts)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("url", help="https://NAME:PORT/PATH")
    p.add_argument("--ca", required=True, help="CA certificate file (PEM) to verify the server")
    p.add_argument("--rate", type=float, default=10.0, help="requests/s from the start (default 10)")
    p.add_argument("--schedule", help='JSON file: [[seconds_from_start, rate], ...] (replaces --rate)')
    p.add_argument("--duration", type=float, default=60.0, help="seconds; 0 = until stopped (default 60)")
    p.add_argument("--control", help='file polled each second: {"rate": R} or {"stop": true}')
    p.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    p.add_argument("--max-in-flight", type=int, default=2000, help="per worker (default 2000)")
    p.add_argument("--timeout", type=float, default=10.0, help="per request, everything (default 10 s)")
    p.add_argument("--streams", type=int, default=0, help="long-lived stream slots (default 0)")
    p.add_argument("--stream-path", default="/stream", help="default /stream")
    p.add_argument("--stream-bytes", type=int, default=1 << 20, help="stream body size (default 1 MiB)")
    p.add_argument("--stream-timeout", type=float, default=120.0, help="per stream (default 120 s)")
    p.add_argument("--out", default=".", help="directory for client.jsonl (default .)")
    a = p.parse_args(argv)
    from urllib.parse import urlsplit
    u = urlsplit(a.url)
    if u.scheme != "https" or not u.hostname:
        p.error("the URL must be https://NAME[:PORT]/PATH")
    a.name = u.hostname
    a.port = u.port or 443
    a.path = (u.path or "/") + (f"?{u.query}" if u.query else "")
    for flag in ("rate", "duration", "timeout", "stream_timeout"):
        v = getattr(a, flag)
        if not (0 <= v < 1e7):
            p.error(f"--{flag.replace('_', '-')} must be between 0 and 1e7")
    if a.timeout <= 0 or a.stream_timeout <= 0:
        p.error("timeouts must be positive")
    if not 1 <= a.workers <= 64:
        p.error("--workers must be 1..64")
    if not 1 <= a.max_in_flight <= 9000:
        p.error("--max-in-flight must be 1..9000 (a process may hold 20,000 descriptors)")
    if a.streams < 0 or a.stream_bytes < 0:
        p.error("--streams and --stream-bytes must be >= 0")
    try:
        make_context(a.ca)
    except (OSError, ssl.SSLError) as exc:
        p.error(f"--ca {a.ca}: {exc}")
    if a.schedule:
        try:
            with open(a.schedule, encoding="utf-8") as f:
                a.steps = parse_schedule(f.read())
        except (OSError, ValueError) as exc:
            p.error(f"--schedule {a.schedule}: {exc}")
    else:
        a.steps = [(0.0, a.rate)]
    return a


def main(argv=None) -> int:
    cfg = parse_args(argv)
    os.makedirs(cfg.out, exist_ok=True)
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    for k in range(cfg.workers):
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=worker_entry, args=(k, cfg, child), name=f"client-worker-{k}", daemon=True)
        proc.start()
        child.close()
        pipes.append(parent)
        procs.append(proc)

    stop = {"flag": False}
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

    def on_signal(signum, frame):
        stop["flag"] = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    deadline = time.time() + STARTUP_TIMEOUT
    up = 0
    for pipe in pipes:
        if pipe.poll(max(0.0, deadline - time.time())):
            try:
                if pipe.recv()[0] == "up":
                    up += 1
            except EOFError:
                pass
    t0 = time.time() + 0.1
    for pipe in pipes:
        try:
            pipe.send(("start", t0))
        except OSError:
            pass
    if up == cfg.workers:
        print("ready", flush=True)
    else:
        print(f"client: only {up} of {cfg.workers} workers started; stopping", file=sys.stderr, flush=True)
        stop["flag"] = True

    live = set(range(cfg.workers))
    stopped_at = None
    run_end = t0 + cfg.duration if cfg.duration > 0 else math.inf
    grace = max(cfg.timeout, cfg.stream_timeout if cfg.streams else 0) + SHUTDOWN_SLACK
    last_control, next_poll = None, time.time()
    if cfg.control:
        last_control, _ = read_control(cfg.control, None)  # what is there at start is not news

    def broadcast(msg):
        for k in live:
            try:
                pipes[k].send(msg)
            except OSError:
                pass

    while live:
        now = time.time()
        if stop["flag"] and stopped_at is None:
            stopped_at = now
            broadcast(("stop",))
        if cfg.control and now >= next_poll and stopped_at is None:
            next_poll = now + CONTROL_POLL
            last_control, msg = read_control(cfg.control, last_control)
            if msg == ("stop",):
                stopped_at = now
                broadcast(msg)
            elif msg is not None:
                broadcast(("rate", now + RATE_CHANGE_LEAD, msg[1]))
        if now > min(run_end, stopped_at or math.inf) + grace:
            print("client: workers did not finish in time; killing them", file=sys.stderr, flush=True)
            for k in live:
                procs[k].kill()
            break
        ready = multiprocessing.connection.wait([pipes[k] for k in live] + [wake_r], timeout=CONTROL_POLL / 2)
        for obj in ready:
            if obj is wake_r:
                try:
                    wake_r.recv(4096)
                except BlockingIOError:
                    pass
                continue
            k = pipes.index(obj)
            try:
                msg = obj.recv()
            except EOFError:
                live.discard(k)
                continue
            if msg[0] == "done":
                live.discard(k)
    for proc in procs:
        proc.join(5)
    counts, bad = merge(cfg.out, cfg.workers)
    line = summary(counts)
    if bad:
        line += f" (dropped {bad} unreadable lines)"
    print(line, file=sys.stderr, flush=True)
    return 0 if up == cfg.workers else 1


if __name__ == "__main__":
    sys.exit(main())
