#!/usr/bin/env python3
"""Route 53 simulator for the lab: health checkers plus an authoritative DNS server for the
fleet's weighted records.

What it does as Route 53 does (Developer Guide, "How Amazon Route 53 determines whether a health
check is healthy", "Weighted routing", "How Amazon Route 53 chooses records when health checking
is configured"):
- Several health checkers, each polling every health check's `http://ip:port/path` every
  `interval`, unsynchronised with one another (their phases are spread over the interval), each
  request started on schedule whether or not the previous one has finished.
- A check passes when the TCP connection is made within `connect_timeout` and a 2xx or 3xx status
  line arrives within `response_timeout` after that; anything else fails.
- Each checker changes its view of a check only after `failure_threshold` consecutive results the
  other way (the same threshold both ways). A new check is healthy until there is data.
- A check is healthy when more than `healthy_fraction` (18%) of the checkers report it healthy.
- Each A query for a record name is answered with ONE record chosen by weight among the healthy
  ones (a record without a health check is always healthy); zero-weight records only when no
  nonzero-weight record is healthy (or all weights are 0: equal chances); when no record is
  healthy, all are treated as healthy (fail open) and one is chosen by weight. The answer carries
  the record's TTL.

Where it differs, plainly:
- One process plays every checker region; each checker is only a source address it binds before
  connecting (the lab gives each one an address of its own), not a place on the Internet.
- Timings are whatever the config says: the lab scales Route 53's 10 s / 30 s intervals (and the
  4 s / 2 s timeouts, and the TTLs) down by its time factor. Real Route 53 allows only 10 or 30 s.
- Status changes are seen by DNS at once; real Route 53 takes a little while to propagate them.
- HTTP only (no HTTPS, no string matching); the Host header is the check's IP (and port).
- A checker keeps at most MAX_IN_FLIGHT requests open per check; a tick that finds that many
  still hanging is skipped (counted in the stop event) instead of piling up tasks. The real
  service would send it and see it time out; at lab timings (timeouts shorter than the interval)
  this does not happen.
- It serves only the configured record names (A records) and, for each zone apex (the record
  name minus its first label), a made-up SOA with a short negative TTL and an NS `ns.<apex>`
  whose A is the simulator's listen address; other names in the zone get NXDOMAIN.

Run: `python loadtest/lab/route53.py --config PATH [--seed N] [--check]`. Prints
`ready dns=IP:PORT` on stdout once DNS (UDP and TCP, same port) is listening. SIGHUP re-reads
the config (a bad one is reported and the old one kept); SIGTERM or SIGINT stop it (exit 0).
Events go to the config's `log` as JSON Lines (lab-common.md; `checker_status` also carries a
`detail`: the result that made the change, e.g. "status 503", "connect ... timed out").
Exit codes: 0 stopped by a signal (or `--check` passed), 1 cannot bind (DNS or a checker's
source address), 2 bad config.
"""

from __future__ import annotations

import argparse
import asyncio
import fractions
import ipaddress
import json
import math
import random
import re
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, TextIO

from dnslib import NS, QTYPE, RCODE, RR, SOA, A, DNSHeader, DNSRecord

# A blackholed endpoint holds a request for connect_timeout + response_timeout; a few in flight
# per checker and check is what the real cadence gives at Route 53's own timings (4 s + 2 s
# against a 10 s interval: one), with room for slow moments.
MAX_IN_FLIGHT = 3
# Bounds checked at config time, so no arithmetic on a duration can run away.
MAX_INTERVAL_S = 3600.0
MAX_TIMEOUT_S = 60.0
MAX_TTL_S = 2_147_483_647  # RFC 2181: TTLs are 31-bit
MAX_WEIGHT = 255  # Route 53's weight range is 0-255
MAX_THRESHOLD = 10  # Route 53's failure threshold range is 1-10
MAX_CHECKERS = 256
# How much of a health response is read (and thrown away) after the status line, so the checker
# closes a connection the server has finished with instead of resetting it over unread bytes.
DRAIN_LIMIT_BYTES = 64 * 1024
# DNS over TCP: an idle or slow client is dropped after this; at most this many at once.
TCP_IDLE_S = 10.0
MAX_TCP_CLIENTS = 256
SUMMARY_PERIOD_S = 1.0
DEFAULT_NEGATIVE_TTL_S = 5
INFRA_TTL_S = 60  # the apex's NS and the name server's A: nothing in the lab changes them
USER_AGENT = "Amazon-Route53-Health-Check-Service (static-ingress lab simulator)"


class ConfigError(ValueError):
    """The config file is not what route53.py accepts; the message says which field and why."""


# --------------------------------------------------------------------------------------------
# Config: parsed and validated once into frozen types the rest of the code uses.


@dataclass(frozen=True)
class HealthCheckConfig:
    id: str
    ip: str
    port: int
    path: str
    interval: float
    failure_threshold: int
    connect_timeout: float
    response_timeout: float


@dataclass(frozen=True)
class RecordConfig:
    name: str  # lower case, with the trailing dot
    ttl: int
    set_id: str
    ip: str
    weight: int
    health_check: str | None


@dataclass(frozen=True)
class Config:
    checkers: tuple[str, ...]
    health_checks: tuple[HealthCheckConfig, ...]
    records: tuple[RecordConfig, ...]
    dns_listen: tuple[str, int]
    log: str | None
    healthy_fraction: float
    negative_ttl: int


def normalize_name(name: str) -> str:
    """DNS names compare case-insensitively, with or without the trailing dot."""
    name = name.strip().lower()
    return name if name.endswith(".") else name + "."


def zone_apex(name: str) -> str:
    """The record name minus its first label: `static.lab.example.` -> `lab.example.`."""
    return normalize_name(name).split(".", 1)[1]


def _field(obj: dict, key: str, kinds: type | tuple, where: str, default=...):
    if key not in obj:
        if default is ...:
            raise ConfigError(f"{where}: missing {key!r}")
        return default
    value = obj[key]
    # bool is an int in Python; a config saying `"port": true` is a mistake, not port 1.
    if isinstance(value, bool) and bool not in (kinds if isinstance(kinds, tuple) else (kinds,)):
        raise ConfigError(f"{where}: {key!r} must be {kinds}, not a boolean")
    if not isinstance(value, kinds):
        raise ConfigError(f"{where}: {key!r} must be {kinds}, got {value!r}")
    return value


def _no_unknown(obj: dict, known: Iterable[str], where: str) -> None:
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown field(s) {unknown}")


def _ipv4(value: str, where: str) -> str:
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError as e:
        raise ConfigError(f"{where}: {value!r} is not an IPv4 address") from e


def _seconds(obj: dict, key: str, where: str, upper: float) -> float:
    value = float(_field(obj, key, (int, float), where))
    if not (value > 0 and value <= upper and math.isfinite(value)):
        raise ConfigError(f"{where}: {key!r} must be in (0, {upper}] seconds, got {value}")
    return value


def parse_config(raw: object) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("config: must be a JSON object")
    _no_unknown(
        raw,
        ("checkers", "health_checks", "records", "dns_listen", "log", "healthy_fraction",
         "negative_ttl"),
        "config",
    )
    checkers_raw = _field(raw, "checkers", list, "config")
    if not 1 <= len(checkers_raw) <= MAX_CHECKERS:
        raise ConfigError(f"config: 'checkers' must list 1 to {MAX_CHECKERS} source addresses")
    checkers = []
    for i, src in enumerate(checkers_raw):
        if not isinstance(src, str):
            raise ConfigError(f"checkers[{i}]: must be a string (an IPv4 address or \"\")")
        checkers.append(_ipv4(src, f"checkers[{i}]") if src else "")

    checks = []
    for i, hc in enumerate(_field(raw, "health_checks", list, "config")):
        where = f"health_checks[{i}]"
        if not isinstance(hc, dict):
            raise ConfigError(f"{where}: must be an object")
        _no_unknown(hc, HealthCheckConfig.__dataclass_fields__, where)
        hc_id = _field(hc, "id", str, where)
        port = _field(hc, "port", int, where)
        if not 1 <= port <= 65535:
            raise ConfigError(f"{where}: 'port' must be 1-65535, got {port}")
        path = _field(hc, "path", str, where)
        # The path goes into the request line as is: no room for spaces or header injection.
        if not re.fullmatch(r"/[\x21-\x7e]*", path):
            raise ConfigError(f"{where}: 'path' must start with / and be printable ASCII, no spaces")
        threshold = _field(hc, "failure_threshold", int, where)
        if not 1 <= threshold <= MAX_THRESHOLD:
            raise ConfigError(f"{where}: 'failure_threshold' must be 1-{MAX_THRESHOLD}")
        checks.append(HealthCheckConfig(
            id=hc_id,
            ip=_ipv4(_field(hc, "ip", str, where), where),
            port=port,
            path=path,
            interval=_seconds(hc, "interval", where, MAX_INTERVAL_S),
            failure_threshold=threshold,
            connect_timeout=_seconds(hc, "connect_timeout", where, MAX_TIMEOUT_S),
            response_timeout=_seconds(hc, "response_timeout", where, MAX_TIMEOUT_S),
        ))
    ids = [hc.id for hc in checks]
    if len(set(ids)) != len(ids):
        raise ConfigError("health_checks: ids must be unique")

    records = []
    for i, rec in enumerate(_field(raw, "records", list, "config")):
        where = f"records[{i}]"
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}: must be an object")
        _no_unknown(rec, RecordConfig.__dataclass_fields__, where)
        name = normalize_name(_field(rec, "name", str, where))
        labels = name.rstrip(".").split(".")
        if len(labels) < 2 or any(not 1 <= len(label) <= 63 for label in labels):
            raise ConfigError(f"{where}: 'name' {name!r} needs at least two non-empty labels")
        ttl = _field(rec, "ttl", int, where)
        if not 0 <= ttl <= MAX_TTL_S:
            raise ConfigError(f"{where}: 'ttl' must be 0-{MAX_TTL_S}")
        weight = _field(rec, "weight", int, where)
        if not 0 <= weight <= MAX_WEIGHT:
            raise ConfigError(f"{where}: 'weight' must be 0-{MAX_WEIGHT}")
        hc_ref = _field(rec, "health_check", (str, type(None)), where, None)
        if hc_ref is not None and hc_ref not in ids:
            raise ConfigError(f"{where}: 'health_check' {hc_ref!r} is not a health check id")
        records.append(RecordConfig(
            name=name, ttl=ttl, set_id=_field(rec, "set_id", str, where),
            ip=_ipv4(_field(rec, "ip", str, where), where), weight=weight, health_check=hc_ref,
        ))
    keys = [(r.name, r.set_id) for r in records]
    if len(set(keys)) != len(keys):
        raise ConfigError("records: set_id must be unique per name")

    listen = _field(raw, "dns_listen", list, "config")
    if len(listen) != 2 or not isinstance(listen[0], str) or isinstance(listen[1], bool) \
            or not isinstance(listen[1], int) or not 0 <= listen[1] <= 65535:
        raise ConfigError("config: 'dns_listen' must be [IPv4 address, port 0-65535]")
    fraction = float(_field(raw, "healthy_fraction", (int, float), "config", 0.18))
    if not 0 <= fraction < 1:
        raise ConfigError("config: 'healthy_fraction' must be in [0, 1)")
    negative_ttl = _field(raw, "negative_ttl", int, "config", DEFAULT_NEGATIVE_TTL_S)
    if not 0 <= negative_ttl <= MAX_TTL_S:
        raise ConfigError(f"config: 'negative_ttl' must be 0-{MAX_TTL_S}")
    return Config(
        checkers=tuple(checkers), health_checks=tuple(checks), records=tuple(records),
        dns_listen=(_ipv4(listen[0], "dns_listen"), listen[1]),
        log=_field(raw, "log", (str, type(None)), "config", None),
        healthy_fraction=fraction, negative_ttl=negative_ttl,
    )


def load_config(path: str) -> Config:
    with open(path, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not JSON: {e}") from e
    return parse_config(raw)


# --------------------------------------------------------------------------------------------
# Pure logic: the per-checker threshold, the aggregate, the weighted choice.


class CheckerStatus:
    """One checker's view of one health check.

    Starts healthy: the Developer Guide says "Route 53 considers a new health check to be healthy
    until there's enough data to determine the actual status", so a new check (and a checker
    added by a reload) is healthy until `threshold` consecutive failures say otherwise. That is
    also what keeps a freshly started lab from answering fail-open before the first polls.
    """

    def __init__(self, threshold: int, healthy: bool = True):
        self.threshold = threshold
        self.healthy = healthy
        self.streak = 0  # consecutive results disagreeing with `healthy`

    def observe(self, ok: bool) -> bool:
        """Feed one check result; True when the status changed."""
        if ok == self.healthy:
            self.streak = 0
            return False
        self.streak += 1
        if self.streak >= self.threshold:
            self.healthy = ok
            self.streak = 0
            return True
        return False


def aggregate_healthy(healthy_checkers: int, checkers: int, fraction: float) -> bool:
    """Healthy when MORE than `fraction` of the checkers say so (18% or fewer: unhealthy).

    Exact arithmetic: 0.18 * 50 in floats is not 9, and 9 of 50 is exactly 18%: unhealthy.
    """
    return healthy_checkers > fractions.Fraction(repr(fraction)) * checkers


class HealthCheckState:
    """Every checker's view of one health check, and the aggregate Route 53 acts on."""

    def __init__(self, cfg: HealthCheckConfig, checkers: int, fraction: float):
        self.cfg = cfg
        self.fraction = fraction
        self.checkers = [CheckerStatus(cfg.failure_threshold) for _ in range(checkers)]
        self.healthy = self._aggregate()

    def healthy_count(self) -> int:
        return sum(c.healthy for c in self.checkers)

    def _aggregate(self) -> bool:
        return aggregate_healthy(self.healthy_count(), len(self.checkers), self.fraction)

    def observe(self, checker: int, ok: bool) -> tuple[bool, bool]:
        """Feed one result from one checker: (that checker's status changed, aggregate changed)."""
        if not self.checkers[checker].observe(ok):
            return False, False
        before, self.healthy = self.healthy, self._aggregate()
        return True, before != self.healthy

    def reconfigure(self, cfg: HealthCheckConfig, checkers: int, fraction: float) -> bool:
        """Apply a reloaded config, keeping each remaining checker's status and streak; new
        checkers start healthy. Returns True when the aggregate changed."""
        self.cfg = cfg
        self.fraction = fraction
        self.checkers = self.checkers[:checkers] + [
            CheckerStatus(cfg.failure_threshold) for _ in range(checkers - len(self.checkers))
        ]
        for c in self.checkers:
            c.threshold = cfg.failure_threshold
            if c.streak >= c.threshold:  # a lowered threshold already reached
                c.observe(not c.healthy)
        before, self.healthy = self.healthy, self._aggregate()
        return before != self.healthy


def weighted_pick(records: list[RecordConfig], rng: random.Random) -> RecordConfig:
    """One record at random in proportion to its weight; all weights 0: equal chances."""
    total = sum(r.weight for r in records)
    if total == 0:
        return records[min(int(rng.random() * len(records)), len(records) - 1)]
    x = rng.random() * total
    acc = 0
    for r in records:
        acc += r.weight
        if x < acc:
            return r
    return next(r for r in reversed(records) if r.weight > 0)  # float rounding at the top end


def choose_record(
    records: list[RecordConfig], is_healthy: Callable[[RecordConfig], bool], rng: random.Random
) -> tuple[RecordConfig, bool]:
    """Route 53's weighted choice with health checks: (record, fail_open).

    Healthy nonzero-weight records by weight; else healthy zero-weight ones (equal chances);
    else none is healthy and all count as healthy: nonzero-weight ones by weight (all zero:
    equal chances). This is the table in the Developer Guide's "Weighted routing" page.
    """
    healthy = [r for r in records if is_healthy(r)]
    weighted = [r for r in healthy if r.weight > 0]
    if weighted:
        return weighted_pick(weighted, rng), False
    if healthy:
        return weighted_pick(healthy, rng), False
    weighted = [r for r in records if r.weight > 0]
    return weighted_pick(weighted or records, rng), True


# --------------------------------------------------------------------------------------------
# DNS: one function from query bytes to reply bytes, so the servers stay trivial.


@dataclass
class Answer:
    reply: bytes | None  # None: send nothing (not a query at all)
    record: RecordConfig | None = None
    fail_open: bool = False


def _formerr(data: bytes) -> bytes | None:
    """FORMERR for a message dnslib cannot parse, if at least its header is there."""
    if len(data) < 12:
        return None
    qid, flags = struct.unpack("!HH", data[:4])
    if flags & 0x8000:  # a response: answering it could start a loop
        return None
    return struct.pack("!HHHHHH", qid, 0x8000 | (flags & 0x7900) | RCODE.FORMERR, 0, 0, 0, 0)


def _soa(apex: str, negative_ttl: int) -> RR:
    # Route 53's own SOA has serial 1 and these refresh/retry/expire values; the minimum (the
    # negative-caching TTL) is the lab's short one so NXDOMAIN/NODATA do not stick in caches.
    return RR(apex, QTYPE.SOA, ttl=negative_ttl, rdata=SOA(
        f"ns.{apex}", f"hostmaster.{apex}", (1, 7200, 900, 1209600, negative_ttl)))


class Zone:
    """The records by name, and the zone apexes they live in.

    Each apex exists (SOA, and NS naming `ns.<apex>`, whose A is the simulator's own address
    when it listens on one): a resolver that asks about the apex must not get NXDOMAIN, since
    an NXDOMAIN there means, to a hardened cache (unbound's harden-below-nxdomain), that
    nothing below it exists either.
    """

    def __init__(self, records: Iterable[RecordConfig], negative_ttl: int,
                 ns_ip: str | None = None):
        self.by_name: dict[str, list[RecordConfig]] = {}
        for r in records:
            self.by_name.setdefault(r.name, []).append(r)
        self.apexes = {zone_apex(name) for name in self.by_name}
        self.ns_hosts = {f"ns.{apex}" for apex in self.apexes}
        self.negative_ttl = negative_ttl
        self.ns_ip = ns_ip if ns_ip and ns_ip != "0.0.0.0" else None

    def apex_of(self, name: str) -> str | None:
        matches = [a for a in self.apexes if name == a or name.endswith("." + a)]
        return max(matches, key=len) if matches else None

    def respond(
        self, data: bytes,
        choose: Callable[[list[RecordConfig]], tuple[RecordConfig, bool]],
    ) -> Answer:
        try:
            req = DNSRecord.parse(data)
        except Exception:  # dnslib raises several kinds on garbage; none may end the server
            return Answer(_formerr(data))
        if req.header.qr:
            return Answer(None)
        reply = DNSRecord(DNSHeader(id=req.header.id, qr=1, aa=1, ra=0, rd=req.header.rd,
                                    opcode=req.header.opcode))
        if req.header.opcode != 0:
            reply.header.rcode = RCODE.NOTIMP
            return Answer(reply.pack())
        if len(req.questions) != 1:
            reply.header.rcode = RCODE.FORMERR
            return Answer(reply.pack())
        q = req.questions[0]
        reply.add_question(q)
        if q.qclass not in (1, 255):  # IN or ANY
            reply.header.rcode = RCODE.REFUSED
            return Answer(reply.pack())
        name = normalize_name(str(q.qname))
        group = self.by_name.get(name)
        apex = self.apex_of(name)
        # Answers carry the owner name as asked: resolvers using 0x20 case randomisation check.
        if group is not None and q.qtype in (QTYPE.A, QTYPE.ANY):
            record, fail_open = choose(group)
            reply.add_answer(RR(q.qname, QTYPE.A, ttl=record.ttl, rdata=A(record.ip)))
            return Answer(reply.pack(), record, fail_open)
        if name in self.apexes and q.qtype == QTYPE.SOA:
            soa = _soa(name, self.negative_ttl)
            soa.rname = q.qname
            reply.add_answer(soa)
            return Answer(reply.pack())
        if name in self.apexes and q.qtype == QTYPE.NS:
            reply.add_answer(RR(q.qname, QTYPE.NS, ttl=INFRA_TTL_S, rdata=NS(f"ns.{name}")))
            if self.ns_ip:
                reply.add_ar(RR(f"ns.{name}", QTYPE.A, ttl=INFRA_TTL_S, rdata=A(self.ns_ip)))
            return Answer(reply.pack())
        if name in self.ns_hosts and self.ns_ip and q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(q.qname, QTYPE.A, ttl=INFRA_TTL_S, rdata=A(self.ns_ip)))
            return Answer(reply.pack())
        if group is None and name not in self.apexes and name not in self.ns_hosts:
            reply.header.rcode = RCODE.NXDOMAIN
        if apex is not None:
            reply.add_auth(_soa(apex, self.negative_ttl))  # NXDOMAIN or NODATA: with the SOA
        return Answer(reply.pack())


class _UdpDns(asyncio.DatagramProtocol):
    def __init__(self, sim: "Simulator"):
        self.sim = sim
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        reply = self.sim.respond(data)
        if reply is not None and self.transport is not None:
            self.transport.sendto(reply, addr)

    def error_received(self, exc):
        # ICMP errors for earlier replies (a client that went away): nothing to do.
        self.sim.counters["udp_errors"] += 1


def bind_dns_sockets(host: str, port: int, attempts: int = 20) -> tuple[socket.socket, socket.socket]:
    """A TCP listener and a UDP socket on the same port. With port 0 the TCP socket picks a free
    port and UDP binds that same number while TCP still holds it; if UDP's is taken, try again."""
    last: OSError | None = None
    for _ in range(attempts if port == 0 else 1):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            tcp.bind((host, port))
            tcp.listen(128)
            udp.bind((host, tcp.getsockname()[1]))
            return tcp, udp
        except OSError as e:
            tcp.close()
            udp.close()
            last = e
    raise OSError(f"cannot bind DNS on {host}:{port} (UDP and TCP): {last}")


def check_sources(sources: Iterable[str]) -> None:
    """Fail at start if a checker's source address is not on this host (namespace): otherwise
    every one of its checks would fail and look like an outage of the fleet."""
    for src in sorted(set(s for s in sources if s)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((src, 0))
            except OSError as e:
                raise OSError(f"checker source address {src} cannot be bound here: {e}") from e


# --------------------------------------------------------------------------------------------
# The health checker's HTTP client.

_STATUS_LINE = re.compile(rb"HTTP/\d\.\d (\d{3})(?: [^\r\n]*)?\r?\n")


def parse_status_line(line: bytes) -> int | None:
    m = _STATUS_LINE.fullmatch(line)
    return int(m.group(1)) if m else None


async def http_check(
    ip: str, port: int, path: str, source: str, connect_timeout: float, response_timeout: float
) -> tuple[bool, str]:
    """One health check request: (passed, why). Passes on a 2xx/3xx status line received within
    `response_timeout` of a connection made within `connect_timeout`."""
    host = ip if port == 80 else f"{ip}:{port}"
    writer = None
    try:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(ip, port, local_addr=(source, 0) if source else None),
                connect_timeout,
            )
        except TimeoutError:
            return False, f"connect to {ip}:{port} timed out after {connect_timeout}s"
        except OSError as e:
            return False, f"connect to {ip}:{port}: {type(e).__name__}: {e}"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + response_timeout
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
            f"Accept: */*\r\nConnection: close\r\n\r\n".encode("ascii")
        )
        try:
            line = await asyncio.wait_for(reader.readline(), response_timeout)
        except TimeoutError:
            return False, f"no status line from {ip}:{port} within {response_timeout}s"
        except (OSError, ValueError) as e:  # reset; ValueError: a line over the reader's limit
            return False, f"reading {ip}:{port}: {type(e).__name__}: {e}"
        status = parse_status_line(line)
        if status is None:
            return False, f"not an HTTP status line from {ip}:{port}: {line[:40]!r}"
        await _drain(reader, deadline)
        return 200 <= status < 400, f"status {status}"
    finally:
        if writer is not None:
            writer.close()
            try:
                await asyncio.wait_for(writer.wait_closed(), 1.0)
            except (OSError, TimeoutError):
                pass


async def _drain(reader: asyncio.StreamReader, deadline: float) -> None:
    loop = asyncio.get_running_loop()
    left = DRAIN_LIMIT_BYTES
    try:
        while left > 0:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            chunk = await asyncio.wait_for(reader.read(min(left, 16384)), remaining)
            if not chunk:
                return
            left -= len(chunk)
    except (OSError, TimeoutError):
        return


# --------------------------------------------------------------------------------------------
# The simulator: checkers, states, DNS servers, log.


class EventLog:
    """route53.jsonl: one JSON object per line, flushed per line (events are few)."""

    def __init__(self, path: str | None):
        self._f = open(path, "a", encoding="utf-8") if path else None

    def write(self, event: str, **fields) -> dict:
        obj = {"t": time.time(), "event": event, **fields}
        if self._f is not None:
            self._f.write(json.dumps(obj, separators=(",", ":")) + "\n")
            self._f.flush()
        return obj

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


class Simulator:
    """Route 53 in one asyncio loop. `start()` binds DNS and starts the checkers; `request_stop()`
    and `request_reload()` are safe to call from signal handlers (or via call_soon_threadsafe)."""

    def __init__(self, config: Config, config_path: str | None = None,
                 rng: random.Random | None = None, human: TextIO = sys.stderr):
        self.config = config
        self.config_path = config_path
        self.rng = rng if rng is not None else random.Random()
        self.human = human
        self.log = EventLog(config.log)
        self.states: dict[str, HealthCheckState] = {
            hc.id: HealthCheckState(hc, len(config.checkers), config.healthy_fraction)
            for hc in config.health_checks
        }
        self.zone = Zone(config.records, config.negative_ttl, config.dns_listen[0])
        self.counters = {"queries": 0, "malformed": 0, "skipped_ticks": 0, "udp_errors": 0,
                         "tcp_refused": 0, "reloads": 0, "reload_errors": 0}
        self.dns_addr: tuple[str, int] | None = None
        self._pollers: list[asyncio.Task] = []
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()
        self._counts: dict[str, int] = {}
        self._fail_open = False
        self._summary_t = time.time()
        self._tcp_clients = 0
        self._udp_transport = None
        self._tcp_server = None

    # ---- lifecycle

    async def start(self) -> tuple[str, int]:
        check_sources(self.config.checkers)
        tcp, udp = bind_dns_sockets(*self.config.dns_listen)
        loop = asyncio.get_running_loop()
        self._tcp_server = await asyncio.start_server(self._tcp_client, sock=tcp)
        self._udp_transport, _ = await loop.create_datagram_endpoint(
            lambda: _UdpDns(self), sock=udp)
        self.dns_addr = tcp.getsockname()[:2]
        self._summary_t = time.time()
        self.log.write("start", dns=f"{self.dns_addr[0]}:{self.dns_addr[1]}",
                       checkers=len(self.config.checkers), health_checks=self._health_summary(),
                       records=len(self.config.records))
        self._start_pollers()
        self._tasks.append(asyncio.create_task(self._summaries()))
        return self.dns_addr

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self.reload()

    async def wait_stopped(self) -> None:
        await self._stop.wait()

    async def close(self) -> None:
        for t in self._pollers + self._tasks:
            t.cancel()
        await asyncio.gather(*self._pollers, *self._tasks, return_exceptions=True)
        if self._udp_transport is not None:
            self._udp_transport.close()
        if self._tcp_server is not None:
            self._tcp_server.close()
        self._summary()
        self.log.write("stop", counters=dict(self.counters), health_checks=self._health_summary())
        self.log.close()

    # ---- config reload

    def reload(self) -> None:
        """Re-read the config file. Health checks whose id stays keep every checker's status
        and streak; new ones start healthy; records and thresholds take the new values. The
        DNS address and the log path are fixed at start (a change is reported, not applied)."""
        if self.config_path is None:
            return
        try:
            new = load_config(self.config_path)
            check_sources(new.checkers)
        except (OSError, ConfigError) as e:
            self.counters["reload_errors"] += 1
            self.log.write("reload", ok=False, error=str(e))
            print(f"route53: reload failed, keeping the old config: {e}", file=self.human,
                  flush=True)
            return
        ignored = [k for k, old, cur in (("dns_listen", self.config.dns_listen, new.dns_listen),
                                         ("log", self.config.log, new.log)) if old != cur]
        n = len(new.checkers)
        states = {}
        for hc in new.health_checks:
            state = self.states.get(hc.id)
            if state is None:
                states[hc.id] = HealthCheckState(hc, n, new.healthy_fraction)
            else:
                if state.reconfigure(hc, n, new.healthy_fraction):
                    self._log_health(state)
                states[hc.id] = state
        for t in self._pollers:
            t.cancel()  # their in-flight requests go with them; new pollers start at once
        self.config = new
        self.states = states
        self.zone = Zone(new.records, new.negative_ttl, self.config.dns_listen[0])
        self.counters["reloads"] += 1
        self.log.write("reload", ok=True, checkers=n, health_checks=self._health_summary(),
                       records=len(new.records), not_applied=ignored)
        self._start_pollers()

    # ---- checkers

    def _start_pollers(self) -> None:
        self._pollers = [
            asyncio.create_task(self._poll(i, hc))
            for hc in self.config.health_checks
            for i in range(len(self.config.checkers))
        ]

    async def _poll(self, checker: int, hc: HealthCheckConfig) -> None:
        """Start one request every interval on a fixed schedule, whatever earlier ones do."""
        loop = asyncio.get_running_loop()
        source = self.config.checkers[checker]
        # Real checkers are not synchronised: spread their phases evenly over the interval.
        start = loop.time() + hc.interval * checker / len(self.config.checkers)
        in_flight: set[asyncio.Task] = set()
        k = 0
        try:
            while True:
                delay = start + k * hc.interval - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                # After a stall, carry on from the next tick instead of firing a burst.
                k = max(k + 1, math.floor((loop.time() - start) / hc.interval) + 1)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    self.counters["skipped_ticks"] += 1
                    continue
                task = asyncio.create_task(self._probe(checker, hc, source))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()

    async def _probe(self, checker: int, hc: HealthCheckConfig, source: str) -> None:
        ok, why = await http_check(hc.ip, hc.port, hc.path, source, hc.connect_timeout,
                                    hc.response_timeout)
        state = self.states.get(hc.id)
        if state is None or checker >= len(state.checkers):
            return
        checker_changed, health_changed = state.observe(checker, ok)
        if checker_changed:
            self.log.write("checker_status", checker=checker, health_check=hc.id, healthy=ok,
                           detail=why)
        if health_changed:
            self._log_health(state)

    def _log_health(self, state: HealthCheckState) -> None:
        ev = self.log.write("health", health_check=state.cfg.id, ip=state.cfg.ip,
                            healthy=state.healthy, healthy_checkers=state.healthy_count(),
                            checkers=len(state.checkers))
        stamp = time.strftime("%H:%M:%S", time.gmtime(ev["t"])) + f".{int(ev['t'] % 1 * 1000):03d}"
        print(f"{stamp} route53: health check {state.cfg.id} ({state.cfg.ip}) is now "
              f"{'HEALTHY' if state.healthy else 'UNHEALTHY'}: {ev['healthy_checkers']} of "
              f"{ev['checkers']} checkers report healthy", file=self.human, flush=True)

    def _health_summary(self) -> dict:
        return {hid: {"ip": s.cfg.ip, "healthy": s.healthy, "healthy_checkers": s.healthy_count()}
                for hid, s in self.states.items()}

    def is_healthy(self, record: RecordConfig) -> bool:
        if record.health_check is None:
            return True
        state = self.states.get(record.health_check)
        return True if state is None else state.healthy

    # ---- DNS

    def respond(self, data: bytes) -> bytes | None:
        self.counters["queries"] += 1
        try:
            ans = self.zone.respond(data, lambda group: choose_record(group, self.is_healthy,
                                                                      self.rng))
        except Exception:  # never let one query end the server; count it
            self.counters["malformed"] += 1
            return _formerr(data)
        if ans.record is not None:
            self._counts[ans.record.ip] = self._counts.get(ans.record.ip, 0) + 1
            self._fail_open = self._fail_open or ans.fail_open
        return ans.reply

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        if self._tcp_clients >= MAX_TCP_CLIENTS:
            self.counters["tcp_refused"] += 1
            writer.close()
            return
        self._tcp_clients += 1
        try:
            while True:
                size = int.from_bytes(await asyncio.wait_for(reader.readexactly(2), TCP_IDLE_S),
                                      "big")
                data = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_S)
                reply = self.respond(data)
                if reply is None:
                    return
                writer.write(len(reply).to_bytes(2, "big") + reply)
                await asyncio.wait_for(writer.drain(), TCP_IDLE_S)
        except (asyncio.IncompleteReadError, TimeoutError, OSError):
            pass
        finally:
            self._tcp_clients -= 1
            writer.close()

    # ---- answers summary

    def _summary(self) -> None:
        now = time.time()
        if self._counts:
            self.log.write("answers", interval=round(now - self._summary_t, 3),
                           counts=self._counts, fail_open=self._fail_open)
        self._counts, self._fail_open, self._summary_t = {}, False, now

    async def _summaries(self) -> None:
        while True:
            await asyncio.sleep(SUMMARY_PERIOD_S)
            self._summary()


# --------------------------------------------------------------------------------------------


async def _amain(config: Config, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed) if args.seed is not None else random.Random()
    sim = Simulator(config, config_path=args.config, rng=rng)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sim.request_stop)
    loop.add_signal_handler(signal.SIGHUP, sim.request_reload)
    try:
        host, port = await sim.start()
    except OSError as e:
        print(f"route53: {e}", file=sys.stderr, flush=True)
        sim.log.close()
        return 1
    print(f"ready dns={host}:{port}", flush=True)
    await sim.wait_stopped()
    await sim.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="JSON config file (re-read on SIGHUP)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for the weighted choice (default: random)")
    parser.add_argument("--check", action="store_true",
                        help="only validate the config, print `config ok` and exit 0")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (OSError, ConfigError) as e:
        print(f"route53: bad config: {e}", file=sys.stderr)
        return 2
    if args.check:
        print("config ok", flush=True)
        return 0
    return asyncio.run(_amain(config, args))


if __name__ == "__main__":
    sys.exit(main())
