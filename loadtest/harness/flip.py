"""The blue/green flip: how long after the backend's name starts answering with the new address
each proxy sends its first new connection there, with flips at random phases of the proxy's
own re-resolve schedule, and how many DNS queries a second the proxy asks for it.

A small DNS server of its own (not dnsmasq) answers the one name, so the moment of the flip is
known to the millisecond and every query is counted. Blue and green are two servers on one
port of 127.0.0.1 and 127.0.0.2, each writing its colour to every connection."""

from __future__ import annotations

import random
import socket
import socketserver
import statistics
import struct
import threading
import time
from dataclasses import dataclass

import peers
from procs import HarnessError, free_port

# The paths that follow DNS: haproxy-splice resolves as haproxy does, direct not at all.
PATHS = ("static-ingress", "haproxy", "nginx")
# The answer's TTL in the flip test: short, as a blue/green name would have it. The proxies'
# re-resolve schedules are their own (static-ingress: min(TTL, dns.refresh_interval); HAProxy:
# timeout resolve 1s; nginx: valid=, the bench's DNS_TTL_S).
FLIP_TTL_S = 2
BLUE, GREEN = "127.0.0.1", "127.0.0.2"
# A new connection this often while waiting for the flip to show.
PROBE_INTERVAL_S = 0.01
# A flip has settled once this many new connections in a row reached the new colour.
SETTLED_PROBES = 30
# A flip not settled within this long fails the run.
FLIP_BOUND_S = 15.0


class Dns:
    """Answers A queries for peers.BACKEND_NAME with the current address (TTL FLIP_TTL_S),
    other types of it with no records, other names with NXDOMAIN; counts the queries."""

    def __init__(self):
        self.address = BLUE
        self.queries = 0
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.port = free_port()
        self.sock.bind((peers.LOOPBACK, self.port))
        self.sock.settimeout(0.2)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stopped.is_set():
            try:
                query, client = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            reply = self.answer(query)
            if reply:
                self.queries += 1
                self.sock.sendto(reply, client)

    def answer(self, query: bytes) -> bytes | None:
        if len(query) < 12:
            return None
        ident, flags, qdcount = struct.unpack("!HHH", query[:6])
        if qdcount != 1 or flags & 0x8000:
            return None
        labels, i = [], 12
        while i < len(query) and query[i] != 0:
            length = query[i]
            labels.append(query[i + 1 : i + 1 + length].decode("ascii", "replace").lower())
            i += 1 + length
        if i + 5 > len(query):
            return None
        qtype = struct.unpack("!H", query[i + 1 : i + 3])[0]
        question = query[12 : i + 5]
        rd = flags & 0x0100
        known = ".".join(labels) == peers.BACKEND_NAME
        rcode = 0 if known else 3
        answers = b""
        if known and qtype == 1:
            address = socket.inet_aton(self.address)
            answers = struct.pack("!HHHLH", 0xC00C, 1, 1, FLIP_TTL_S, 4) + address
        header = struct.pack("!HHHHHH", ident, 0x8400 | rd | rcode, 1, 1 if answers else 0, 0, 0)
        return header + question + answers

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()
        self.thread.join(2)


class Colour(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def colour_server(address: str, port: int) -> Colour:
    name = b"blue\n" if address == BLUE else b"green\n"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            try:
                self.request.sendall(name)
            except OSError:
                pass

    server = Colour((address, port), Handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    return server


def colour(port: int) -> str | None:
    """The colour a new connection through the proxy reaches, or None if it failed."""
    try:
        with socket.create_connection((peers.LOOPBACK, port), timeout=2) as s:
            data = b""
            while not data.endswith(b"\n"):
                chunk = s.recv(16)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    text = data.decode("ascii", "replace").strip()
    return text or None


@dataclass
class Backends:
    """What peers' start functions read: every role goes to the colour servers' port."""

    dns: int
    port_all: int

    def port(self, role: str) -> int:
        return self.port_all


def measure(ctx_procs, workdir, binary, paths: list[str], flips: int, seed: int = 1) -> dict:
    """For each path: `flips` flips (alternating blue->green and back), each after a random
    wait of 0.5 to 0.5 + 2 x the proxy's 1 s schedule, so that flips land at every phase of it."""
    dns = Dns()
    port = free_port()
    servers = [colour_server(BLUE, port), colour_server(GREEN, port)]
    rng = random.Random(seed)
    results: dict[str, dict] = {}
    try:
        ctx = peers.Context(ctx_procs, workdir, Backends(dns=dns.port, port_all=port), binary)
        for path in paths:
            dns.address = BLUE
            proxy_port, proc = peers.PATHS[path](ctx, "flip")
            try:
                peers.wait_until(
                    f"{path} in front of the blue server",
                    lambda: None if colour(proxy_port) == "blue" else "not blue yet",
                    peers.READY_TIMEOUT_S,
                    [proc] if proc else [],
                )
                results[path] = flips_through(dns, proxy_port, flips, rng)
            finally:
                if proc:
                    ctx_procs.stop(proc)
    finally:
        dns.stop()
        for s in servers:
            s.shutdown()
            s.server_close()
    return results


def flips_through(dns: Dns, port: int, flips: int, rng: random.Random) -> dict:
    """Per flip: when the first new connection reached the new colour, and when they all did
    (the first of SETTLED_PROBES in a row: a proxy whose processes each keep their own answer,
    as nginx's workers do, sends some connections to the old colour for longer)."""
    first, settled, failures, probes = [], [], 0, 0
    queries_before, started = dns.queries, time.monotonic()
    for number in range(flips):
        time.sleep(0.5 + rng.uniform(0, 2.0))
        new = GREEN if dns.address == BLUE else BLUE
        want = "green" if new == GREEN else "blue"
        dns.address = new
        flipped = time.monotonic()
        seen_first, run_start, run = None, None, 0
        while run < SETTLED_PROBES:
            at = time.monotonic() - flipped
            seen = colour(port)
            probes += 1
            if seen is None:
                failures += 1
            if seen == want:
                seen_first = at if seen_first is None else seen_first
                run_start = at if run == 0 else run_start
                run += 1
            else:
                run = 0
            if at > FLIP_BOUND_S:
                raise HarnessError(f"flip {number + 1} to {want} not settled within {FLIP_BOUND_S:.0f} s")
            time.sleep(PROBE_INTERVAL_S)
        first.append(seen_first)
        settled.append(run_start)
    seconds = time.monotonic() - started
    return {
        "flip_first_s": statistics.median(first),
        "flip_settled_s": statistics.median(settled),
        "flip_settled_max_s": max(settled),
        "flip_first_all_s": [round(d, 3) for d in first],
        "flip_settled_all_s": [round(d, 3) for d in settled],
        "flip_failed_connections": failures,
        "flip_probes": probes,
        "dns_queries_per_s": (dns.queries - queries_before) / seconds,
    }
