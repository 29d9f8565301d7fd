"""Tests for loadtest/lab/route53.py: the pure logic driven directly, then the real simulator
(in a thread, and as a subprocess for signals) against small HTTP servers on 127.0.0.1."""

import asyncio
import io
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

import route53
from route53 import (
    CheckerStatus,
    ConfigError,
    HealthCheckState,
    RecordConfig,
    Zone,
    aggregate_healthy,
    choose_record,
    http_check,
    parse_config,
    weighted_pick,
)

NAME = "static.lab.example."
MODULE = Path(route53.__file__)


# ---------------------------------------------------------------------------------------------
# helpers


def wait_until(pred, timeout=5.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def read_events(path):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def events_of(path, kind, **match):
    return [e for e in read_events(path)
            if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]


class HttpServer:
    """A threaded HTTP server on 127.0.0.1:0 answering `status` (an int, or a function of the
    client's address), recording (time, client ip, status, path, host) before each answer."""

    def __init__(self, status=200):
        self.status = status
        self.requests = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                st = outer.status(self.client_address[0]) if callable(outer.status) else outer.status
                outer.requests.append((time.time(), self.client_address[0], st, self.path,
                                       self.headers.get("Host")))
                body = b"ok\n"
                self.send_response(st)
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(ThreadingHTTPServer):
            request_queue_size = 64  # ten checkers at once must not overflow the backlog

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def served(self, status=None, since=0.0):
        return [r for r in list(self.requests)
                if r[0] >= since and (status is None or r[2] == status)]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


class RawServer:
    """Accepts connections and hands each to `handle(conn)` in a thread."""

    def __init__(self, handle):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.handle = handle
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn):
        with conn:
            try:
                self.handle(conn)
            except OSError:
                pass

    def close(self):
        self.stopping.set()
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def ok_server():
    s = HttpServer(200)
    yield s
    s.close()


@pytest.fixture
def bad_server():
    s = HttpServer(503)
    yield s
    s.close()


@pytest.fixture
def blackhole_port():
    """Listening (the kernel completes handshakes) but never accepting nor answering."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    yield s.getsockname()[1]
    s.close()


@pytest.fixture
def refused_port():
    """Bound but not listening: connects are refused, and nobody else can take the port."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    yield s.getsockname()[1]
    s.close()


def hc(hc_id, port, threshold=1, interval=0.1, connect_timeout=0.2, response_timeout=0.2,
       path="/health"):
    return {"id": hc_id, "ip": "127.0.0.1", "port": port, "path": path, "interval": interval,
            "failure_threshold": threshold, "connect_timeout": connect_timeout,
            "response_timeout": response_timeout}


def rec(set_id, ip, weight=1, health_check=None, ttl=7, name=NAME):
    return {"name": name, "ttl": ttl, "set_id": set_id, "ip": ip, "weight": weight,
            "health_check": health_check}


def make_config(tmp_path, checks, records, checkers=("127.0.0.1",), **extra):
    cfg = {"checkers": list(checkers), "health_checks": checks, "records": records,
           "dns_listen": ["127.0.0.1", 0], "log": str(tmp_path / "route53.jsonl"),
           "healthy_fraction": 0.18, **extra}
    path = tmp_path / "route53.json"
    path.write_text(json.dumps(cfg))
    return path


class SimThread:
    """The real Simulator in its own event loop thread, as route53.py's main runs it."""

    def __init__(self, config_path, seed=1):
        self.config_path = str(config_path)
        self.sim = route53.Simulator(route53.load_config(self.config_path),
                                     config_path=self.config_path, rng=random.Random(seed),
                                     human=io.StringIO())
        self.log = self.sim.config.log
        self.ready = threading.Event()
        self.error = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)
        self.thread.start()
        assert self.ready.wait(5), "simulator did not start"
        assert self.error is None, self.error
        self.addr = self.sim.dns_addr

    async def _main(self):
        self.loop = asyncio.get_running_loop()
        try:
            await self.sim.start()
        except Exception as e:  # reported to the test thread
            self.error = e
            self.ready.set()
            return
        self.ready.set()
        await self.sim.wait_stopped()
        await self.sim.close()

    def healthy(self, hc_id):
        return self.sim.states[hc_id].healthy

    def reload(self):
        self.loop.call_soon_threadsafe(self.sim.request_reload)

    def stop(self):
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.sim.request_stop)
            self.thread.join(5)
        assert not self.thread.is_alive(), "simulator did not stop"


@pytest.fixture
def start_sim():
    sims = []

    def start(config_path, seed=1):
        s = SimThread(config_path, seed)
        sims.append(s)
        return s

    yield start
    for s in sims:
        s.stop()


def query(addr, name=NAME, qtype="A", tcp=False):
    raw = DNSRecord.question(name, qtype).send(addr[0], addr[1], tcp=tcp, timeout=2)
    return DNSRecord.parse(raw)


def answer_ips(addr, n, tcp=False):
    ips = []
    for _ in range(n):
        reply = query(addr, tcp=tcp)
        assert reply.header.rcode == RCODE.NOERROR
        assert len(reply.rr) == 1, "exactly one record per answer"
        ips.append(str(reply.rr[0].rdata))
    return ips


# ---------------------------------------------------------------------------------------------
# pure logic


def test_checker_status_changes_only_after_threshold_consecutive_results():
    c = CheckerStatus(3)
    assert c.healthy, "a new check is healthy until there is data"
    assert [c.observe(False), c.observe(False)] == [False, False] and c.healthy
    assert c.observe(True) is False and c.healthy  # a pass breaks the failure streak
    assert [c.observe(False), c.observe(False)] == [False, False] and c.healthy
    assert c.observe(False) is True and not c.healthy
    # the same threshold to come back
    assert [c.observe(True), c.observe(True)] == [False, False] and not c.healthy
    assert c.observe(True) is True and c.healthy


def test_threshold_one_flips_on_each_disagreeing_result():
    c = CheckerStatus(1)
    assert c.observe(False) and not c.healthy
    assert not c.observe(False)
    assert c.observe(True) and c.healthy


def test_more_than_18_percent_of_checkers_is_healthy():
    assert aggregate_healthy(2, 10, 0.18)
    assert not aggregate_healthy(1, 10, 0.18)
    # exactly 18% is not more than 18%: unhealthy (0.18 * 50 is not 9.0 in floats)
    assert not aggregate_healthy(9, 50, 0.18)
    assert aggregate_healthy(10, 50, 0.18)
    assert aggregate_healthy(1, 3, 0.18) and not aggregate_healthy(0, 3, 0.18)


def test_health_check_state_with_ten_checkers_follows_the_18_percent_rule():
    cfg = route53.HealthCheckConfig("a", "127.0.0.1", 80, "/", 1.0, 1, 1.0, 1.0)
    state = HealthCheckState(cfg, 10, 0.18)
    assert state.healthy and state.healthy_count() == 10
    for i in range(8):
        assert state.observe(i, False) == (True, False)
    assert state.healthy and state.healthy_count() == 2, "2 of 10 (20%) is healthy"
    assert state.observe(8, False) == (True, True)
    assert not state.healthy and state.healthy_count() == 1, "1 of 10 (10%) is not"
    assert state.observe(8, False) == (False, False)
    assert state.observe(3, True) == (True, True) and state.healthy


def test_reconfigure_keeps_checker_state_and_adds_healthy_checkers():
    cfg = route53.HealthCheckConfig("a", "127.0.0.1", 80, "/", 1.0, 3, 1.0, 1.0)
    state = HealthCheckState(cfg, 2, 0.18)
    for _ in range(3):
        state.observe(0, False)
        state.observe(1, False)
    assert not state.healthy
    state.observe(0, True)  # a streak of 1 toward healthy
    changed = state.reconfigure(cfg, 3, 0.18)  # one checker more, healthy from the start
    assert changed and state.healthy and [c.healthy for c in state.checkers] == [False, False, True]
    assert state.checkers[0].streak == 1
    # lowering the threshold to a streak already reached applies it
    lower = route53.HealthCheckConfig("a", "127.0.0.1", 80, "/", 1.0, 1, 1.0, 1.0)
    state.reconfigure(lower, 3, 0.18)
    assert state.checkers[0].healthy


def R(set_id, weight, hc="x"):
    return RecordConfig(NAME, 60, set_id, f"198.18.0.{len(set_id) + weight}", weight, hc)


def picks(records, healthy_ids, n=400, seed=3):
    rng = random.Random(seed)
    return {choose_record(records, lambda r: r.set_id in healthy_ids, rng)[0].set_id
            for _ in range(n)}


def test_choose_record_follows_route53_table_for_zero_weights():
    r1, r2, r3 = R("1", 1), R("2", 1), R("3", 0)
    records = [r1, r2, r3]
    assert picks(records, {"1", "2", "3"}) == {"1", "2"}, "zero weight only when needed"
    assert picks(records, {"1", "2"}) == {"1", "2"}
    assert picks(records, {"2"}) == {"2"}
    assert picks(records, {"3"}) == {"3"}, "healthy zero-weight beats unhealthy nonzero"
    assert picks(records, set()) == {"1", "2"}, "fail open among nonzero weights"
    zeros = [R("a", 0), R("b", 0)]
    assert picks(zeros, {"a", "b"}) == {"a", "b"}, "all zero: equal chances"
    assert picks(zeros, set()) == {"a", "b"}


def test_choose_record_reports_fail_open_only_when_none_healthy():
    rng = random.Random(0)
    records = [R("1", 1), R("2", 1)]
    assert choose_record(records, lambda r: r.set_id == "1", rng) == (records[0], False)
    assert choose_record(records, lambda r: False, rng)[1] is True


def test_weighted_pick_matches_weights_with_a_seeded_rng():
    records = [R("a", 1), R("b", 3), R("c", 0), R("d", 6)]
    rng = random.Random(42)
    n = 20000
    counts = {"a": 0, "b": 0, "c": 0, "d": 0}
    for _ in range(n):
        counts[weighted_pick(records, rng).set_id] += 1
    assert counts["c"] == 0
    for key, share in (("a", 0.1), ("b", 0.3), ("d", 0.6)):
        assert abs(counts[key] / n - share) < 0.02, counts


def test_weighted_pick_at_the_top_of_the_range_returns_a_weighted_record():
    class Top:
        def random(self):
            return 0.9999999999999999
    assert weighted_pick([R("a", 1), R("b", 2), R("c", 0)], Top()).set_id == "b"


def test_zone_answers_case_insensitively_and_with_nxdomain_and_nodata():
    zone = Zone([R("a", 1, None)], negative_ttl=5)
    always_a = lambda group: (group[0], False)  # noqa: E731
    for name in ("static.lab.example.", "STATIC.Lab.Example", "static.lab.example"):
        reply = DNSRecord.parse(zone.respond(DNSRecord.question(name).pack(), always_a).reply)
        assert reply.header.rcode == RCODE.NOERROR and reply.header.aa
        assert [str(rr.rdata) for rr in reply.rr] == ["198.18.0.2"] and reply.rr[0].ttl == 60
        assert str(reply.rr[0].rname) == str(DNSRecord.question(name).q.qname)
    nx = DNSRecord.parse(zone.respond(DNSRecord.question("other.lab.example").pack(), always_a).reply)
    assert nx.header.rcode == RCODE.NXDOMAIN and nx.auth[0].rtype == QTYPE.SOA
    outside = DNSRecord.parse(zone.respond(DNSRecord.question("example.com").pack(), always_a).reply)
    assert outside.header.rcode == RCODE.NXDOMAIN and not outside.auth
    nodata = DNSRecord.parse(zone.respond(DNSRecord.question(NAME, "AAAA").pack(), always_a).reply)
    assert nodata.header.rcode == RCODE.NOERROR and not nodata.rr
    soa = nodata.auth[0]
    assert soa.rtype == QTYPE.SOA and str(soa.rname) == "lab.example." and soa.ttl == 5


def test_zone_apex_exists_with_soa_and_ns():
    zone = Zone([R("a", 1, None)], negative_ttl=5, ns_ip="198.18.2.2")
    choose = lambda group: (group[0], False)  # noqa: E731

    def ask(name, qtype):
        return DNSRecord.parse(zone.respond(DNSRecord.question(name, qtype).pack(), choose).reply)

    soa = ask("LAB.example.", "SOA")
    assert soa.header.rcode == RCODE.NOERROR and soa.rr[0].rtype == QTYPE.SOA
    assert str(soa.rr[0].rname) == "LAB.example."
    ns = ask("lab.example", "NS")
    assert [str(rr.rdata) for rr in ns.rr] == ["ns.lab.example."]
    assert [str(rr.rdata) for rr in ns.ar] == ["198.18.2.2"]
    assert [str(rr.rdata) for rr in ask("ns.lab.example", "A").rr] == ["198.18.2.2"]
    for name, qtype in (("lab.example", "A"), ("lab.example", "AAAA"), ("ns.lab.example", "MX")):
        nodata = ask(name, qtype)
        assert nodata.header.rcode == RCODE.NOERROR and not nodata.rr, (name, qtype)
        assert nodata.auth[0].rtype == QTYPE.SOA
    assert ask("x.lab.example", "A").header.rcode == RCODE.NXDOMAIN
    assert ask("example", "SOA").header.rcode == RCODE.NXDOMAIN
    assert not Zone([R("a", 1, None)], 5, ns_ip="0.0.0.0").ns_ip, "no A for a wildcard bind"


def test_zone_survives_malformed_messages():
    zone = Zone([R("a", 1, None)], negative_ttl=5)
    choose = lambda group: (group[0], False)  # noqa: E731
    assert zone.respond(b"", choose).reply is None
    assert zone.respond(b"\x12\x34\x01", choose).reply is None
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff\xff\xff"
    formerr = DNSRecord.parse(zone.respond(garbage, choose).reply)
    assert formerr.header.id == 0xABCD and formerr.header.rcode == RCODE.FORMERR
    assert formerr.header.qr
    response = DNSRecord.question(NAME).reply().pack()
    assert zone.respond(response, choose).reply is None, "never answer a response"
    notify = DNSRecord.question(NAME)
    notify.header.opcode = 4
    assert DNSRecord.parse(zone.respond(notify.pack(), choose).reply).header.rcode == RCODE.NOTIMP
    rng = random.Random(7)
    for _ in range(300):  # random bytes, and valid queries with random corruption
        blob = bytearray(DNSRecord.question(NAME).pack())
        for _ in range(rng.randint(1, 6)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        zone.respond(bytes(blob[: rng.randint(0, len(blob))]), choose)
        zone.respond(rng.randbytes(rng.randint(0, 64)), choose)


@pytest.mark.parametrize("mutate, message", [
    (lambda c: c.update(extra=1), "unknown field"),
    (lambda c: c["health_checks"][0].update(port=True), "boolean"),
    (lambda c: c["health_checks"][0].update(ip="not-an-ip"), "IPv4"),
    (lambda c: c["health_checks"][0].update(path="/a b"), "path"),
    (lambda c: c["health_checks"][0].update(path="/a\r\nX: y"), "path"),
    (lambda c: c["health_checks"][0].update(failure_threshold=0), "failure_threshold"),
    (lambda c: c["health_checks"][0].update(interval=0), "interval"),
    (lambda c: c["health_checks"][0].update(connect_timeout=1e9), "connect_timeout"),
    (lambda c: c["health_checks"].append(dict(c["health_checks"][0])), "unique"),
    (lambda c: c["records"][0].update(health_check="nope"), "health_check"),
    (lambda c: c["records"][0].update(weight=256), "weight"),
    (lambda c: c["records"][0].update(name="com."), "labels"),
    (lambda c: c.update(checkers=[]), "checkers"),
    (lambda c: c.update(dns_listen=["127.0.0.1"]), "dns_listen"),
    (lambda c: c.update(healthy_fraction=1.5), "healthy_fraction"),
])
def test_parse_config_rejects_bad_values(mutate, message):
    cfg = {"checkers": ["127.0.0.1"], "health_checks": [hc("a", 80)],
           "records": [rec("a", "198.18.0.1", health_check="a")], "dns_listen": ["127.0.0.1", 0]}
    parse_config(json.loads(json.dumps(cfg)))  # the base is valid
    mutate(cfg)
    with pytest.raises(ConfigError, match=message):
        parse_config(cfg)


def test_main_exits_2_on_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert route53.main(["--config", str(bad)]) == 2
    assert "bad config" in capsys.readouterr().err
    good = make_config(tmp_path, [], [rec("a", "198.18.1.1")])
    assert route53.main(["--config", str(good), "--check"]) == 0
    assert capsys.readouterr().out == "config ok\n"


def test_start_fails_on_a_checker_source_address_not_on_this_host(tmp_path):
    # 198.18.255.254 is in the lab range, never on a test machine's interfaces
    path = make_config(tmp_path, [], [rec("a", "198.18.1.1")], checkers=["198.18.255.254"])
    proc = subprocess.run([sys.executable, str(MODULE), "--config", str(path)],
                          capture_output=True, text=True, timeout=10)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "198.18.255.254 cannot be bound" in proc.stderr


# ---------------------------------------------------------------------------------------------
# the health checker's HTTP client


def check(port, **kw):
    args = dict(source="127.0.0.1", connect_timeout=0.3, response_timeout=0.3)
    args.update(kw)
    # bounded here too, so a client that ignores its own timeouts fails the test, not hangs it
    return asyncio.run(asyncio.wait_for(http_check("127.0.0.1", port, "/health", **args), 5))


def test_http_check_passes_2xx_and_3xx_and_sends_host_and_path(ok_server):
    assert check(ok_server.port) == (True, "status 200")
    _, client, _, path, host = ok_server.requests[-1]
    assert (client, path, host) == ("127.0.0.1", "/health", f"127.0.0.1:{ok_server.port}")
    ok_server.status = 302
    assert check(ok_server.port)[0]
    ok_server.status = 404
    assert not check(ok_server.port)[0]


def test_http_check_fails_5xx_refused_and_blackhole(bad_server, refused_port, blackhole_port):
    assert check(bad_server.port) == (False, "status 503")
    ok, why = check(refused_port)
    assert not ok and "ConnectionRefused" in why
    started = time.monotonic()
    ok, why = check(blackhole_port, response_timeout=0.3)
    assert not ok and "no status line" in why
    assert time.monotonic() - started < 2.0


def test_http_check_binds_the_checker_source_address(ok_server):
    assert check(ok_server.port, source="127.0.0.3")[0]
    assert ok_server.requests[-1][1] == "127.0.0.3"


def test_http_check_fails_garbage_reset_and_slow_answers():
    def garbage(conn):
        conn.recv(1024)
        conn.sendall(b"SSH-2.0-OpenSSH\r\n")

    def reset(conn):
        conn.recv(1024)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    def slow(conn):
        conn.recv(1024)
        time.sleep(0.6)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")

    def no_newline(conn):
        conn.recv(1024)
        conn.sendall(b"HTTP/1.1 200 OK")

    servers = {name: RawServer(fn) for name, fn in
               (("garbage", garbage), ("reset", reset), ("slow", slow), ("eof", no_newline))}
    try:
        for name, server in servers.items():
            ok, why = check(server.port)
            assert not ok, (name, why)
        # the same slow server passes when the response timeout allows it
        assert check(servers["slow"].port, response_timeout=2.0)[0]
    finally:
        for server in servers.values():
            server.close()


# ---------------------------------------------------------------------------------------------
# the real simulator


def test_only_healthy_records_are_answered(tmp_path, start_sim, ok_server, bad_server,
                                           blackhole_port, refused_port):
    path = make_config(
        tmp_path,
        [hc("ok", ok_server.port), hc("bad", bad_server.port), hc("hole", blackhole_port),
         hc("refused", refused_port)],
        [rec("ok", "198.18.1.1", health_check="ok"), rec("bad", "198.18.1.2", health_check="bad"),
         rec("hole", "198.18.1.3", health_check="hole"),
         rec("refused", "198.18.1.4", health_check="refused")],
    )
    sim = start_sim(path)
    wait_until(lambda: not any(sim.healthy(h) for h in ("bad", "hole", "refused")), 5,
               "the three failing checks to turn unhealthy")
    assert sim.healthy("ok")
    assert set(answer_ips(sim.addr, 100)) == {"198.18.1.1"}
    assert set(answer_ips(sim.addr, 20, tcp=True)) == {"198.18.1.1"}
    reply = query(sim.addr)
    assert reply.rr[0].ttl == 7
    health = events_of(sim.log, "health", healthy=False)
    assert {e["health_check"] for e in health} == {"bad", "hole", "refused"}
    assert all(e["healthy_checkers"] == 0 and e["checkers"] == 1 for e in health)
    assert "UNHEALTHY" in sim.sim.human.getvalue()


def test_fail_open_when_no_record_is_healthy(tmp_path, start_sim, bad_server, refused_port):
    path = make_config(
        tmp_path, [hc("bad", bad_server.port), hc("refused", refused_port)],
        [rec("a", "198.18.1.1", health_check="bad"), rec("b", "198.18.1.2", health_check="refused"),
         rec("z", "198.18.1.9", weight=0, health_check="bad")],
    )
    sim = start_sim(path)
    wait_until(lambda: not sim.healthy("bad") and not sim.healthy("refused"), 5, "both unhealthy")
    ips = answer_ips(sim.addr, 300)
    assert set(ips) == {"198.18.1.1", "198.18.1.2"}, "fail open by weight (never the zero)"
    summary = wait_until(lambda: [e for e in events_of(sim.log, "answers") if e["fail_open"]],
                         4, "a fail-open answers summary")
    assert set(summary[0]["counts"]) <= {"198.18.1.1", "198.18.1.2"}


def test_weights_are_respected_over_udp(tmp_path, start_sim):
    path = make_config(tmp_path, [], [rec("light", "198.18.1.1", weight=1),
                                      rec("heavy", "198.18.1.2", weight=3),
                                      rec("zero", "198.18.1.3", weight=0)])
    sim = start_sim(path, seed=11)
    n = 800
    ips = answer_ips(sim.addr, n)
    light, heavy = ips.count("198.18.1.1"), ips.count("198.18.1.2")
    assert light + heavy == n, "a zero-weight record is never chosen while others are healthy"
    # expected 200 +- 12 (one standard deviation); 5 sd of room, and the seed is fixed
    assert 140 < light < 260, (light, heavy)
    summaries = wait_until(lambda: events_of(sim.log, "answers"), 4, "an answers summary")
    assert not summaries[0]["fail_open"] and summaries[0]["interval"] > 0


def test_unhealthy_only_after_threshold_failures_then_back(tmp_path, start_sim, ok_server):
    threshold, interval = 3, 0.1
    path = make_config(tmp_path, [hc("a", ok_server.port, threshold=threshold, interval=interval)],
                       [rec("a", "198.18.1.1", health_check="a"), rec("b", "198.18.1.2")])
    sim = start_sim(path)
    wait_until(lambda: len(ok_server.served(200)) >= 2, 3, "the checker to poll")
    flipped = time.time()
    ok_server.status = 503
    wait_until(lambda: not sim.healthy("a"), 3, "the check to turn unhealthy")
    [down] = events_of(sim.log, "checker_status", healthy=False)
    assert down["detail"] == "status 503"
    fails_before = ok_server.served(503, since=flipped)
    fails_before = [r for r in fails_before if r[0] < down["t"]]
    assert len(fails_before) >= threshold, "not unhealthy before `threshold` failures"
    assert down["t"] - flipped >= (threshold - 1) * interval * 0.9
    assert set(answer_ips(sim.addr, 30)) == {"198.18.1.2"}

    recovered = time.time()
    ok_server.status = 200
    wait_until(lambda: sim.healthy("a"), 3, "the check to turn healthy again")
    [up] = events_of(sim.log, "checker_status", healthy=True)
    passes = [r for r in ok_server.served(200, since=recovered) if r[0] < up["t"]]
    assert len(passes) >= threshold, "the same threshold to become healthy"
    assert [e["healthy"] for e in events_of(sim.log, "health")] == [False, True]


def test_18_percent_rule_with_ten_checkers_by_source_address(tmp_path, start_sim, ok_server):
    sources = [f"127.0.0.{i}" for i in range(1, 11)]
    answering = {"127.0.0.1", "127.0.0.2"}
    ok_server.status = lambda client: 200 if client in answering else 503
    path = make_config(tmp_path, [hc("a", ok_server.port, interval=0.2)],
                       [rec("a", "198.18.1.1", health_check="a")], checkers=sources)
    sim = start_sim(path)
    wait_until(lambda: len(events_of(sim.log, "checker_status", healthy=False)) == 8, 5,
               "eight checkers to see the check fail")
    assert {r[1] for r in ok_server.requests} == set(sources), "each checker binds its address"
    state = sim.sim.states["a"]
    assert state.healthy_count() == 2 and sim.healthy("a"), "2 of 10 is more than 18%"
    assert not events_of(sim.log, "health")
    answering.discard("127.0.0.2")
    [event] = wait_until(lambda: events_of(sim.log, "health"), 3, "the check to turn unhealthy")
    assert (event["healthy"], event["healthy_checkers"], event["checkers"]) == (False, 1, 10)
    assert event["ip"] == "127.0.0.1"


def test_checkers_phases_are_spread_over_the_interval(tmp_path, start_sim, ok_server):
    interval = 0.8
    sources = [f"127.0.0.{i}" for i in range(1, 5)]
    path = make_config(tmp_path, [hc("a", ok_server.port, interval=interval)],
                       [rec("a", "198.18.1.1", health_check="a")], checkers=sources)
    start_sim(path)
    wait_until(lambda: len(ok_server.requests) >= 4, 3, "one request from each checker")
    first = {}
    for t, client, *_ in ok_server.requests:
        first.setdefault(client, t)
    times = sorted(first.values())
    assert len(times) == 4
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert all(gap > interval / 4 * 0.5 for gap in gaps), gaps


def test_a_hanging_endpoint_does_not_delay_the_schedule(tmp_path, start_sim, blackhole_port):
    # response timeout 1 s against a 0.1 s interval: requests must overlap, capped per checker.
    path = make_config(tmp_path, [hc("a", blackhole_port, interval=0.1, response_timeout=1.0)],
                       [rec("a", "198.18.1.1", health_check="a")])
    sim = start_sim(path)
    wait_until(lambda: not sim.healthy("a"), 3, "unhealthy")
    down = events_of(sim.log, "checker_status", healthy=False)[0]
    start = events_of(sim.log, "start")[0]
    assert down["t"] - start["t"] < 1.5, "the first timeout arrives about 1 s after the start"
    wait_until(lambda: sim.sim.counters["skipped_ticks"] > 0, 3, "the in-flight cap to apply")


def test_dns_over_tcp_and_malformed_queries(tmp_path, start_sim):
    path = make_config(tmp_path, [], [rec("a", "198.18.1.1")])
    sim = start_sim(path)
    host, port = sim.addr
    assert answer_ips(sim.addr, 1, tcp=True) == ["198.18.1.1"]
    assert query(sim.addr, "nothing.lab.example", tcp=True).header.rcode == RCODE.NXDOMAIN
    assert query(sim.addr, NAME, "MX").header.rcode == RCODE.NOERROR

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.settimeout(2)
        u.sendto(b"\x00", (host, port))
        u.sendto(b"\x55\x66" + b"\x01\x00\x00\x01" + b"\x00" * 6 + b"\xc0\xff", (host, port))
        formerr = DNSRecord.parse(u.recv(512))
        assert formerr.header.id == 0x5566 and formerr.header.rcode == RCODE.FORMERR

    with socket.create_connection((host, port), timeout=2) as t:
        # two queries pipelined on one connection, then garbage
        msgs = [DNSRecord.question(NAME).pack(), DNSRecord.question("x.lab.example").pack(),
                b"\x77\x88\x01\x00\x00\x01" + b"\x00" * 6 + b"\x3f"]
        t.sendall(b"".join(len(m).to_bytes(2, "big") + m for m in msgs))
        replies = []
        buf = b""
        deadline = time.monotonic() + 3
        while len(replies) < 3 and time.monotonic() < deadline:
            chunk = t.recv(4096)
            if not chunk:
                break
            buf += chunk
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                size = int.from_bytes(buf[:2], "big")
                replies.append(DNSRecord.parse(buf[2:2 + size]))
                buf = buf[2 + size:]
        assert [r.header.rcode for r in replies] == [RCODE.NOERROR, RCODE.NXDOMAIN, RCODE.FORMERR]
    with socket.create_connection((host, port), timeout=2) as t:
        t.sendall(b"\xff\xff\x00")  # promises 65535 bytes, then goes away
    assert answer_ips(sim.addr, 1) == ["198.18.1.1"], "still serving"
    assert answer_ips(sim.addr, 1, tcp=True) == ["198.18.1.1"]


def test_reload_in_process_replaces_records_and_keeps_state(tmp_path, start_sim, bad_server,
                                                            ok_server):
    path = make_config(tmp_path, [hc("a", bad_server.port)],
                       [rec("a", "198.18.1.1", health_check="a"), rec("b", "198.18.1.2")])
    sim = start_sim(path)
    wait_until(lambda: not sim.healthy("a"), 3, "unhealthy")
    make_config(tmp_path, [hc("a", ok_server.port, threshold=5, interval=0.1)],
                [rec("a", "198.18.1.1", health_check="a"), rec("c", "198.18.1.3")])
    sim.reload()
    [reload] = wait_until(lambda: events_of(sim.log, "reload"), 3, "the reload event")
    assert reload["ok"] and reload["health_checks"]["a"]["healthy"] is False, "state kept"
    assert set(answer_ips(sim.addr, 30)) == {"198.18.1.3"}
    wait_until(lambda: sim.healthy("a"), 3, "healthy after five passes")
    assert len(ok_server.requests) >= 5


# ---------------------------------------------------------------------------------------------
# the real program, with signals


def read_line(stream, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stream], [], [], max(0.0, deadline - time.monotonic()))
        if ready:
            return stream.readline()
    raise AssertionError(f"no line within {timeout}s")


def test_cli_ready_sighup_reload_and_sigterm(tmp_path, bad_server, ok_server, refused_port):
    path = make_config(tmp_path, [hc("a", bad_server.port)],
                       [rec("a", "198.18.1.1", health_check="a"), rec("b", "198.18.1.2")])
    log = str(tmp_path / "route53.jsonl")
    proc = subprocess.Popen([sys.executable, str(MODULE), "--config", str(path), "--seed", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = read_line(proc.stdout, 10)
        assert line.startswith("ready dns=127.0.0.1:"), line
        port = int(line.strip().rsplit(":", 1)[1])
        addr = ("127.0.0.1", port)
        assert port != 0 and events_of(log, "start")[0]["dns"] == f"127.0.0.1:{port}"
        wait_until(lambda: events_of(log, "health", healthy=False), 5, "a unhealthy")
        assert set(answer_ips(addr, 30)) == {"198.18.1.2"}

        # 'a' keeps its id (and its unhealthy state) but now needs 3 passes; 'new' starts healthy
        make_config(tmp_path, [hc("a", ok_server.port, threshold=3), hc("new", refused_port,
                                                                      interval=60)],
                    [rec("a", "198.18.1.1", health_check="a"), rec("c", "198.18.1.3")])
        proc.send_signal(signal.SIGHUP)
        [reload] = wait_until(lambda: events_of(log, "reload"), 5, "the reload event")
        assert reload["ok"]
        assert reload["health_checks"]["a"]["healthy"] is False
        assert reload["health_checks"]["new"]["healthy"] is True
        wait_until(lambda: events_of(log, "health", health_check="a", healthy=True), 5,
                   "a healthy against the new endpoint")
        assert set(answer_ips(addr, 50)) == {"198.18.1.1", "198.18.1.3"}

        Path(path).write_text("{broken")
        proc.send_signal(signal.SIGHUP)
        wait_until(lambda: len(events_of(log, "reload")) == 2, 5, "the failed reload event")
        assert events_of(log, "reload")[1]["ok"] is False
        assert answer_ips(addr, 1)[0] in {"198.18.1.1", "198.18.1.3"}, "old config kept"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        events = read_events(log)
        assert events[-1]["event"] == "stop" and events[0]["event"] == "start"
        assert events_of(log, "answers"), "the last answers summary is flushed at stop"
        err = proc.stderr.read()
        assert "health check a (127.0.0.1) is now UNHEALTHY" in err
        assert "is now HEALTHY" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()


def test_cli_sigint_exits_zero(tmp_path):
    path = make_config(tmp_path, [], [rec("a", "198.18.1.1")])
    proc = subprocess.Popen([sys.executable, str(MODULE), "--config", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert read_line(proc.stdout, 10).startswith("ready dns=")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(5) == 0
        assert read_events(tmp_path / "route53.jsonl")[-1]["event"] == "stop"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
        proc.stderr.close()
