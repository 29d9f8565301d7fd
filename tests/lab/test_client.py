"""The lab's load generator (loadtest/lab/client.py), run as the lab runs it, against real servers.

Each test starts its servers on 127.0.0.1 port 0 (Python's asyncio and ssl, in a thread), runs
the real client as a subprocess against https://localhost:PORT/ with a CA made by the openssl
CLI, and checks client.jsonl as the report reads it.
"""

import asyncio
import json
import os
import pathlib
import select
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time

import pytest

import client

CLIENT = pathlib.Path(__file__).resolve().parents[2] / "loadtest" / "lab" / "client.py"
FIELDS = {"t", "start", "lag", "kind", "ip", "outcome", "detail", "latency", "connect", "tls",
          "bytes", "backend", "worker"}
RUN_TIMEOUT = 30  # no client run in this file may take longer
PATTERN = bytes(range(256))


# ---------------------------------------------------------------- certificates


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def make_ca_and_leaf(d: pathlib.Path, prefix: str):
    """A P-256 CA and a leaf for localhost signed by it, as PEM files in d."""
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{prefix}-ca.key", "-out", f"{prefix}-ca.pem", "-days", "2",
            "-subj", f"/CN={prefix} test CA", cwd=d)
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", f"{prefix}-leaf.key", "-out", f"{prefix}-leaf.csr", "-subj", "/CN=localhost", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n")
    openssl("x509", "-req", "-in", f"{prefix}-leaf.csr", "-CA", f"{prefix}-ca.pem", "-CAkey",
            f"{prefix}-ca.key", "-CAcreateserial", "-out", f"{prefix}-leaf.pem", "-days", "2",
            "-extfile", "ext.cnf", cwd=d)
    return d / f"{prefix}-ca.pem", d / f"{prefix}-leaf.pem", d / f"{prefix}-leaf.key"


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca, cert, key = make_ca_and_leaf(d, "lab")
    _, other_cert, other_key = make_ca_and_leaf(d, "other")
    good = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    good.load_cert_chain(cert, key)
    other = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    other.load_cert_chain(other_cert, other_key)
    return {"ca": str(ca), "good": good, "other": other}


# ---------------------------------------------------------------- servers


class Server:
    """An asyncio server on 127.0.0.1:0 in its own thread; handler(reader, writer) per connection."""

    def __init__(self, handler, ssl_ctx=None):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.accepted = 0

        self.tasks = set()

        async def counted(reader, writer):
            self.accepted += 1
            self.tasks.add(asyncio.current_task())
            try:
                await handler(reader, writer)
            except (OSError, asyncio.IncompleteReadError, asyncio.CancelledError):
                pass
            finally:
                writer.close()
                self.tasks.discard(asyncio.current_task())

        async def start():
            extra = {"ssl": ssl_ctx, "ssl_handshake_timeout": 5} if ssl_ctx else {}
            return await asyncio.start_server(counted, "127.0.0.1", 0, **extra)

        self.server = asyncio.run_coroutine_threadsafe(start(), self.loop).result(5)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self):
        async def stop():
            self.server.close()
            for task in self.tasks:
                task.cancel()
            await asyncio.wait_for(asyncio.gather(*self.tasks, return_exceptions=True), 5)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def serve():
    servers = []

    def start(handler, ssl_ctx=None):
        s = Server(handler, ssl_ctx)
        servers.append(s)
        return s

    yield start
    for s in servers:
        s.close()


async def read_request(reader):
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)


def http_response(body: bytes, status="200 OK", length=None) -> bytes:
    n = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n".encode() + body


def answer(body: bytes, status="200 OK"):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(http_response(body, status))
        await writer.drain()
    return handler


# ---------------------------------------------------------------- running the client


def run_client(pki, port, out, *args, path="/", name="localhost"):
    """Run the client to its end; (records, stderr)."""
    proc = subprocess.run(
        [sys.executable, str(CLIENT), f"https://{name}:{port}{path}", "--ca", pki["ca"], "--out", str(out), *args],
        capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == "ready", proc.stdout
    return read_records(out), proc.stderr


def read_records(out):
    assert not list(pathlib.Path(out).glob("client-*.jsonl")), "worker files left beside client.jsonl"
    records = [json.loads(line) for line in (pathlib.Path(out) / "client.jsonl").read_text().splitlines()]
    for r in records:
        assert set(r) == FIELDS, r
        assert r["outcome"] in client.OUTCOMES
    assert [r["t"] for r in records] == sorted(r["t"] for r in records), "not sorted by t"
    return records


def outcomes(records):
    return {r["outcome"] for r in records}


# ---------------------------------------------------------------- tests: short requests


def test_good_server_rate_and_records(pki, serve, tmp_path):
    s = serve(answer(b"blue\n"), pki["good"])
    rate, duration = 40, 1.5
    records, stderr = run_client(pki, s.port, tmp_path, "--rate", str(rate), "--duration", str(duration),
                                 "--workers", "2")
    assert len(records) == rate * duration
    assert s.accepted == len(records)
    for r in records:
        assert r["kind"] == "short" and r["outcome"] == "ok" and r["detail"] == "", r
        assert r["backend"] == "blue" and r["ip"] == "127.0.0.1" and r["bytes"] == 5
        assert r["connect"] is not None and r["tls"] is not None
        assert 0 < r["connect"] + r["tls"] <= r["latency"] < 2
        assert abs(r["lag"] - (r["start"] - r["t"])) < 1e-5 and -0.01 < r["lag"] < 0.5
    assert {r["worker"] for r in records} == {0, 1}
    gaps = [b["t"] - a["t"] for a, b in zip(records, records[1:])]
    assert all(abs(g - 1 / rate) < 1e-3 for g in gaps), "requests not scheduled at t0 + i/rate"
    assert stderr.strip().splitlines()[-1] == "client: sent=60 ok=60"


def test_green_backend_and_more_lines(pki, serve, tmp_path):
    s = serve(answer(b"green\nserved by green-2\n"), pki["good"])
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.5", "--workers", "1")
    assert len(records) == 5
    assert all(r["outcome"] == "ok" and r["backend"] == "green" for r in records)


@pytest.mark.parametrize("body,status,detail", [
    (b"purple\n", "200 OK", "body"),
    (b"blue\n", "503 Service Unavailable", "status 503"),
    (b"blue", "200 OK", "body"),  # no end of line: not the whole first line
])
def test_wrong_bytes(pki, serve, tmp_path, body, status, detail):
    s = serve(answer(body, status), pki["good"])
    records, stderr = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1")
    assert len(records) == 3
    for r in records:
        assert r["outcome"] == "wrong_bytes" and r["backend"] is None and detail in r["detail"], r
    assert "wrong_bytes=3" in stderr


def test_close_mid_body_is_eof(pki, serve, tmp_path):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(http_response(b"blue\n", length=100))  # promises 100, sends 5, closes
        await writer.drain()
    s = serve(handler, pki["good"])
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1")
    assert len(records) == 3
    for r in records:
        assert r["outcome"] == "eof" and r["bytes"] == 5 and "5 of 100" in r["detail"], r


def test_close_before_response_is_eof(pki, serve, tmp_path):
    async def handler(reader, writer):
        await read_request(reader)  # then close: no response at all
    s = serve(handler, pki["good"])
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1")
    assert [r["outcome"] for r in records] == ["eof"] * 3
    assert all(r["tls"] is not None for r in records)


def test_reset_after_accept(pki, serve, tmp_path):
    async def handler(reader, writer):
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # close with linger 0: an RST
    s = serve(handler)  # plain TCP: the reset comes during the client's handshake
    records, stderr = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.5", "--workers", "1")
    assert len(records) == 5
    for r in records:
        assert r["outcome"] == "reset" and "ConnectionResetError" in r["detail"], r
        # Usually during the handshake; under gVisor the RST can beat the connect's completion.
        assert r["tls"] is None and r["detail"].split(":")[0] in ("tls", "connect"), r
    assert "reset=5" in stderr


def test_reset_mid_response_is_reset_not_eof(pki, serve, tmp_path):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(http_response(b"blue\n", length=100))
        await writer.drain()
        await asyncio.sleep(0.1)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()
    s = serve(handler, pki["good"])
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1")
    assert len(records) == 3
    for r in records:
        assert r["outcome"] == "reset" and r["detail"].startswith("response: ConnectionResetError"), r
        assert r["tls"] is not None


def test_close_during_handshake_is_eof_not_tls_error(pki, serve, tmp_path):
    async def handler(reader, writer):
        await reader.read(1)  # the ClientHello has arrived; close (FIN) without answering
    s = serve(handler)
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1")
    assert len(records) == 3
    for r in records:
        assert r["outcome"] == "eof" and "SSLEOFError" in r["detail"], r


def test_refused(pki, tmp_path):
    with socket.socket() as held:  # bound, never listening, kept open: nobody else gets the port
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        records, stderr = run_client(pki, port, tmp_path, "--rate", "10", "--duration", "0.5", "--workers", "2")
    assert len(records) == 5
    for r in records:
        assert r["outcome"] == "refused" and r["ip"] == "127.0.0.1" and r["connect"] is None, r
        assert "ConnectionRefusedError" in r["detail"]
    assert "refused=5" in stderr


def test_silent_server_times_out_within_timeout(pki, serve, tmp_path):
    async def handler(reader, writer):
        await asyncio.sleep(10)  # accept, never answer
    s = serve(handler)
    t = time.time()
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1",
                            "--timeout", "0.5")
    assert time.time() - t < 5
    assert len(records) == 3
    for r in records:
        assert r["outcome"] == "timeout" and r["detail"].startswith("tls:"), r
        assert 0.45 < r["latency"] < 1.5


def test_certificate_from_another_ca_is_tls_error(pki, serve, tmp_path):
    s = serve(answer(b"blue\n"), pki["other"])
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1")
    assert len(records) == 3
    for r in records:
        assert r["outcome"] == "tls_error" and "certificate verify failed" in r["detail"], r
        assert r["tls"] is None


def test_unresolvable_name_is_dns_error(pki, tmp_path):
    records, _ = run_client(pki, 443, tmp_path, "--rate", "10", "--duration", "0.3", "--workers", "1",
                            "--timeout", "3", name="no-such-host.invalid")
    assert len(records) == 3
    assert all(r["outcome"] == "dns_error" and r["ip"] is None for r in records)


def test_in_flight_bound_records_overload(pki, serve, tmp_path):
    async def handler(reader, writer):
        await asyncio.sleep(10)
    s = serve(handler)
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "20", "--duration", "0.5", "--workers", "1",
                            "--max-in-flight", "1", "--timeout", "1")
    assert len(records) == 10, "a request refused by the bound must still be recorded"
    assert [r["outcome"] for r in records].count("timeout") == 1
    over = [r for r in records if r["detail"] == "client overloaded"]
    assert len(over) == 9 and all(r["outcome"] == "error" for r in over)


# ---------------------------------------------------------------- schedule and control


def test_schedule_steps(pki, serve, tmp_path):
    s = serve(answer(b"blue\n"), pki["good"])
    sched = tmp_path / "schedule.json"
    sched.write_text("[[0, 10], [1, 50]]")
    records, _ = run_client(pki, s.port, tmp_path / "out", "--schedule", str(sched), "--duration", "1.6",
                            "--workers", "2")
    t0 = records[0]["t"]
    first = [r for r in records if r["t"] - t0 < 1 - 1e-6]
    assert len(first) == 10 and len(records) == 10 + 30
    assert all(r["outcome"] == "ok" for r in records)


def test_schedule_arithmetic():
    s = client.Schedule(100.0, [(0, 10), (1, 0), (2, 100)])
    assert [round(s.time_of(i), 6) for i in (0, 1, 9)] == [100.0, 100.1, 100.9]
    assert round(s.time_of(10), 6) == 102.0  # nothing due while the rate is 0
    assert round(s.time_of(11), 6) == 102.01
    s.set_rate(102.5, 0)
    assert s.time_of(60) == float("inf")
    s.set_rate(103.0, 20)
    assert round(s.time_of(60), 6) == 103.0
    with pytest.raises(ValueError):
        client.parse_schedule("[[0, 10], [0, 20]]")
    assert client.parse_schedule("[[5, 10]]") == [(0.0, 0.0), (5.0, 10.0)]


def start_client(pki, port, out, *args):
    proc = subprocess.Popen(
        [sys.executable, str(CLIENT), f"https://localhost:{port}/", "--ca", pki["ca"], "--out", str(out), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], RUN_TIMEOUT)
    line = proc.stdout.readline() if ready else ""
    if line != "ready\n":
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"client not ready: {line!r} {err}")
    return proc


def finish(proc, timeout):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def write_atomically(path, obj):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def test_control_rate_change_and_stop(pki, serve, tmp_path):
    s = serve(answer(b"blue\n"), pki["good"])
    control = tmp_path / "control.json"
    proc = start_client(pki, s.port, tmp_path / "out", "--rate", "10", "--duration", "60",
                        "--control", str(control))
    started = time.time()
    time.sleep(1.2)
    write_atomically(control, {"rate": 100})
    changed = time.time()
    time.sleep(2.0)
    write_atomically(control, {"stop": True})
    stopped = time.time()
    rc, err = finish(proc, 10)
    assert rc == 0, err
    assert time.time() - stopped < 4, "stop not honoured promptly"
    records = read_records(tmp_path / "out")
    assert all(r["outcome"] == "ok" for r in records)
    slow = [r for r in records if r["t"] < changed]
    fast = [r for r in records if changed + 1.5 <= r["t"] < stopped]
    assert 9 <= len(slow) <= 15  # 10/s for ~1.2 s
    gaps = [b["t"] - a["t"] for a, b in zip(fast, fast[1:])]
    assert gaps and all(abs(g - 0.01) < 1e-3 for g in gaps), "rate 100 not applied"
    assert max(r["t"] for r in records) < stopped + client.CONTROL_POLL + 0.1
    assert started < records[0]["t"]


def test_sigterm_gives_complete_merged_file(pki, serve, tmp_path):
    s = serve(answer(b"blue\n"), pki["good"])
    proc = start_client(pki, s.port, tmp_path, "--rate", "50", "--duration", "60", "--workers", "2")
    time.sleep(1.5)
    proc.send_signal(signal.SIGTERM)
    rc, err = finish(proc, 10)
    assert rc == 0, err
    records = read_records(tmp_path)
    assert 50 <= len(records) <= 100
    assert all(r["outcome"] == "ok" for r in records)
    assert s.accepted == len(records), "a request was started but not recorded"
    assert {r["worker"] for r in records} == {0, 1}
    assert err.strip().splitlines()[-1] == f"client: sent={len(records)} ok={len(records)}"


# ---------------------------------------------------------------- streams


def stream_handler(size, corrupt_at=None, cut_at=None):
    body = (PATTERN * (size // 256 + 1))[:size]
    if corrupt_at is not None:
        body = body[:corrupt_at] + bytes([body[corrupt_at] ^ 0xFF]) + body[corrupt_at + 1:]

    async def handler(reader, writer):
        await read_request(reader)
        writer.write(http_response(b"", length=size))
        data = body if cut_at is None else body[:cut_at]
        for i in range(0, len(data), 16384):  # in pieces, as a slow backend sends it
            writer.write(data[i:i + 16384])
            await writer.drain()
    return handler


@pytest.mark.parametrize("kw,outcome,detail", [
    ({}, "ok", ""),
    ({"corrupt_at": 70001}, "wrong_bytes", "byte 70001 is"),
    ({"cut_at": 50000}, "eof", "50000 of 100000"),
])
def test_stream_checks_every_byte(pki, serve, tmp_path, kw, outcome, detail):
    s = serve(stream_handler(100000, **kw), pki["good"])
    records, stderr = run_client(pki, s.port, tmp_path, "--rate", "0", "--duration", "1.2", "--workers", "2",
                                 "--streams", "2", "--stream-bytes", "100000", path="/")
    assert records and all(r["kind"] == "stream" for r in records)
    # two slots, one stream per slot per second: 2 at the start, 2 more at 1 s
    assert len(records) == 4 and {r["worker"] for r in records} == {0, 1}
    for r in records:
        assert r["outcome"] == outcome and detail in r["detail"], r
    if outcome == "ok":
        assert all(r["bytes"] == 100000 for r in records)
    if outcome == "wrong_bytes":
        assert all(r["bytes"] == 70001 for r in records)
    assert "streams=4" in stderr


def test_stream_running_at_end_is_read_to_its_end(pki, serve, tmp_path):
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(http_response(b"", length=1024))
        for i in range(4):  # 1 KiB over ~1.2 s: still running when the 0.5 s run ends
            writer.write(PATTERN)
            await writer.drain()
            await asyncio.sleep(0.3)
    s = serve(handler, pki["good"])
    records, _ = run_client(pki, s.port, tmp_path, "--rate", "0", "--duration", "0.5", "--workers", "1",
                            "--streams", "1", "--stream-bytes", "1024")
    assert len(records) == 1 and records[0]["outcome"] == "ok" and records[0]["bytes"] == 1024
    assert records[0]["latency"] > 0.8


# ---------------------------------------------------------------- classification


def test_classify():
    assert client.classify(ssl.SSLCertVerificationError("x")) == "tls_error"
    assert client.classify(ssl.SSLError(1, "[SSL: WRONG_VERSION_NUMBER]")) == "tls_error"
    assert client.classify(ssl.SSLEOFError(8, "EOF")) == "eof"
    assert client.classify(ConnectionResetError(104, "reset")) == "reset"
    assert client.classify(BrokenPipeError(32, "pipe")) == "reset"
    assert client.classify(ConnectionRefusedError(111, "refused")) == "refused"
    assert client.classify(TimeoutError()) == "timeout"
    assert client.classify(socket.gaierror(-2, "unknown")) == "dns_error"
    assert client.classify(OSError(113, "No route to host")) == "error"
    assert client.classify(client.PeerClosed("x")) == "eof"
    assert client.classify(client.BadResponse("x")) == "wrong_bytes"


def test_unreadable_ca_is_a_usage_error(tmp_path):
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate\n")
    proc = subprocess.run([sys.executable, str(CLIENT), "https://localhost:1/", "--ca", str(bad), "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=RUN_TIMEOUT)
    assert proc.returncode == 2 and "--ca" in proc.stderr and proc.stdout == ""
