"""The servers under test and around them: a local DNS server, the backends (nginx over HTTPS,
iperf3, an echo server) and the paths to them (direct, static-ingress with and without its
access log, HAProxy, HAProxy with splicing forced, nginx stream), each started from a
configuration written into the work directory. Every proxy logs a line per connection, as each
is run in the field (static-ingress's `log.access`, HAProxy's `option tcplog`, nginx's stream
`access_log`), each into a file in the work directory; `static-ingress-nolog` measures what the
line costs."""

from __future__ import annotations

import socket
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path

from procs import LOOPBACK, HarnessError, Proc, Processes, free_port, run, tree, wait_until

BACKEND_NAME = "backend.test"
# Every proxy may hold this many client connections: above the 5,000 idle ones, and low enough
# that two descriptors per connection stay under the 20,000 open files a process may have here.
MAX_CONNECTIONS = 9000
# The DNS answer's TTL. nginx keeps an answer this long (valid=), HAProxy asks every second
# (timeout resolve), static-ingress every half second (dns.refresh_interval).
DNS_TTL_S = 10
READY_TIMEOUT_S = 20.0
HARNESS_DIR = Path(__file__).resolve().parent

# What each proxy instance forwards to: "tls" to the HTTPS backend (latency and connection
# rate), "bulk" to iperf3 (throughput and CPU), "idle" to the echo server (memory), "api" to
# the HTTPS backend's keep-alive port (many connections, a small request now and then).
ROLES = ("tls", "bulk", "idle", "api")
# static-ingress only: a fourth instance in front of the HTTPS backend with SNI routing on, for
# what reading the ClientHello costs a new connection.
SNI_ROLE = "tls-sni"


@dataclass
class Backends:
    dns: int
    tls: int
    bulk: int
    idle: int
    api: int

    def port(self, role: str) -> int:
        return getattr(self, role)


def start_backends(procs: Processes, workdir: Path) -> Backends:
    """dnsmasq answering backend.test with 127.0.0.1, and the three backends."""
    backends = Backends(dns=free_port(), tls=free_port(), bulk=free_port(), idle=free_port(), api=free_port())
    dns = procs.start(
        "dnsmasq",
        [
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--listen-address={LOOPBACK}",
            "--bind-interfaces",
            f"--port={backends.dns}",
            f"--host-record={BACKEND_NAME},{LOOPBACK}",
            f"--local-ttl={DNS_TTL_S}",
            "--pid-file=",
            "--log-facility=-",
        ],
    )
    tls = start_nginx(procs, workdir, "backend-https", https_backend_conf(workdir, backends.tls, backends.api))
    bulk = procs.start("iperf3-server", ["iperf3", "--server", "--bind", LOOPBACK, "--port", str(backends.bulk)])
    idle = procs.start("echo-server", [sys.executable, str(HARNESS_DIR / "echo.py"), str(backends.idle)])
    wait_until("dnsmasq", lambda: dns_probe(backends.dns), READY_TIMEOUT_S, [dns])
    wait_until("nginx HTTPS backend", lambda: https_probe(backends.tls), READY_TIMEOUT_S, [tls])
    wait_until("nginx HTTPS keep-alive backend", lambda: https_probe(backends.api), READY_TIMEOUT_S, [tls])
    wait_until("iperf3 server", lambda: connect_probe(backends.bulk), READY_TIMEOUT_S, [bulk])
    wait_until("echo server", lambda: echo_probe(backends.idle), READY_TIMEOUT_S, [idle])
    return backends


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for backend.test (P-256, like most ELB listeners
    negotiate, keeps the backend's handshake cost low so that it is not the bottleneck)."""
    cert, key = workdir / "backend.crt", workdir / "backend.key"
    result = run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "30", "-subj", f"/CN={BACKEND_NAME}",
            "-addext", f"subjectAltName=DNS:{BACKEND_NAME}", "-keyout", str(key), "-out", str(cert),
        ],
        30,
        "certificate",
    )  # fmt: skip
    if result.returncode != 0:
        raise HarnessError(f"openssl could not make the backend certificate: {result.stderr.strip()}")
    return cert, key


def https_backend_conf(workdir: Path, port: int, api_port: int) -> str:
    cert, key = make_certificate(workdir)
    temp = workdir / "backend-https"
    # No TLS session resumption: every connection is a full handshake, as a client without a
    # session cache (Vegeta, most HTTP clients across processes) makes.
    return f"""
worker_processes auto;
worker_rlimit_nofile 20000;
events {{ worker_connections 10000; }}
http {{
    access_log off;
    client_body_temp_path {temp}/body;
    proxy_temp_path {temp}/proxy;
    fastcgi_temp_path {temp}/fastcgi;
    uwsgi_temp_path {temp}/uwsgi;
    scgi_temp_path {temp}/scgi;
    server {{
        listen {LOOPBACK}:{port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        keepalive_timeout 0;
        location / {{ return 200 "ok\\n"; }}
    }}
    # The API-like load: connections kept open, as an API client's pool keeps them.
    server {{
        listen {LOOPBACK}:{api_port} ssl backlog=4096;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        ssl_session_cache off;
        ssl_session_tickets off;
        keepalive_timeout 300s;
        keepalive_requests 1000000;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def start_nginx(procs: Processes, workdir: Path, name: str, body: str) -> Proc:
    prefix = workdir / name
    prefix.mkdir(exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(f"pid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n{body.replace('PREFIX', str(prefix))}")
    checked = run(["nginx", "-t", "-q", "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log")], 30,
                  "checking the nginx configuration")
    if checked.returncode != 0:
        raise HarnessError(f"nginx -t refused {conf}: {(checked.stdout + checked.stderr).strip()}")
    return procs.start(
        name, ["nginx", "-p", f"{prefix}/", "-c", str(conf), "-e", str(prefix / "error.log"), "-g", "daemon off;"]
    )


# The four paths. Each starts one instance per role and returns (port clients use, process).


def start_direct(ctx: Context, role: str) -> tuple[int, Proc | None]:
    return ctx.backends.port(role), None


# The server name of the SNI-routing instance's one route, which the client sends
# (measure.oha_argv with server_name).
SNI_NAME = "api.example.com"


def start_static_ingress(ctx: Context, role: str, log_access: bool = True) -> tuple[int, Proc | None]:
    """static-ingress at its defaults, its access log on (stdout, into the process's log file),
    but for the DNS server, the connection cap, a quick exit, and warnings only for the rest."""
    port = free_port()
    if role == SNI_ROLE:
        # SNI routing on: one [[route]] by server name to the HTTPS backend and every other
        # connection refused, so a request that succeeds was routed by its ClientHello.
        config = ctx.workdir / "static-ingress-sni.toml"
        config.write_text(
            "# connections are routed by the ClientHello's server name; the rest come from the flags\n"
            '[proxy]\nunmatched = "refuse"\nnon_tls = "refuse"\n\n'
            f'[[route]]\nname = "api"\nserver_names = ["{SNI_NAME}"]\nbackend = "{BACKEND_NAME}:{ctx.backends.tls}"\n'
        )
        target = []
    else:
        # An empty config file, so that neither /etc/static-ingress/static-ingress.toml nor
        # STATIC_INGRESS_* variables of this machine (dropped in Processes.start) change the run.
        config = ctx.workdir / "static-ingress.toml"
        config.write_text("# every setting comes from the flags below\n")
        target = ["--backend-address", f"{BACKEND_NAME}:{ctx.backends.port(role)}"]
    argv = [
        str(ctx.binary), "run", "--config", str(config),
        *target,
        "--dns-nameservers", f"{LOOPBACK}:{ctx.backends.dns}",
        "--proxy-listen", f"{LOOPBACK}:{port}",
        "--admin-listen", f"{LOOPBACK}:{free_port()}",
        "--proxy-max-connections", str(MAX_CONNECTIONS),
        "--lifecycle-drain-delay", "0s",
        "--lifecycle-grace-period", "1s",
        "--log-level", "warn",
        "--log-access", "true" if log_access else "false",
    ]  # fmt: skip
    name = "static-ingress" if log_access else "static-ingress-nolog"
    return port, ctx.procs.start(f"{name}-{role}", argv)


def start_static_ingress_nolog(ctx: Context, role: str) -> tuple[int, Proc | None]:
    """static-ingress with `log.access = false`: the access log's cost, against the path above."""
    return start_static_ingress(ctx, role, log_access=False)


HAPROXY_SERVER_OPTIONS = "check inter 1s fall 3 rise 2 resolvers localdns resolve-prefer ipv4 init-addr none"


def start_haproxy(
    ctx: Context, role: str, splice: str = "option splice-auto", name: str = "haproxy"
) -> tuple[int, Proc | None]:
    """The 2016 design: TCP mode, a resolvers section, one server by hostname with health
    checks, plus splice-auto. Check timings as static-ingress's defaults (1s, fall 3, rise 2)."""
    port = free_port()
    conf = ctx.workdir / f"{name}-{role}.cfg"
    # maxpipes bounds splice's pipes (two descriptors each) so that the whole stays under the
    # 20,000 open files allowed: 2 x 9000 + 2 x 500 + a few.
    conf.write_text(f"""
global
    maxconn {MAX_CONNECTIONS}
    maxpipes 500
    log stdout format raw local0 info

defaults
    mode tcp
    log global
    option tcplog
    maxconn {MAX_CONNECTIONS}
    timeout connect 3s
    timeout client 360s
    timeout server 360s
    {splice}

resolvers localdns
    nameserver dns1 {LOOPBACK}:{ctx.backends.dns}
    accepted_payload_size 1232
    resolve_retries 3
    timeout resolve 1s
    timeout retry 1s
    hold valid {DNS_TTL_S}s

frontend static
    bind {LOOPBACK}:{port}
    default_backend backend_elb

backend backend_elb
    server elb {BACKEND_NAME}:{ctx.backends.port(role)} {HAPROXY_SERVER_OPTIONS}
""")
    checked = run(["haproxy", "-c", "-q", "-f", str(conf)], 30, "checking the HAProxy configuration")
    if checked.returncode != 0:
        raise HarnessError(f"haproxy -c refused {conf}: {(checked.stdout + checked.stderr).strip()}")
    return port, ctx.procs.start(f"{name}-{role}", ["haproxy", "-db", "-f", str(conf)])


def start_haproxy_spliced(ctx: Context, role: str) -> tuple[int, Proc | None]:
    """The same HAProxy with splicing forced both ways. On loopback splice-auto's heuristic
    seldom splices; this shows what zero-copy forwarding buys, which static-ingress lacks."""
    return start_haproxy(ctx, role, "option splice-request\n    option splice-response", "haproxy-splice")


def start_nginx_stream(ctx: Context, role: str) -> tuple[int, Proc | None]:
    """nginx's stream module. proxy_pass through a variable makes nginx resolve the name at run
    time with its resolver (re-asked after valid=); open-source nginx has no active checks."""
    port = free_port()
    body = f"""
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes auto;
worker_rlimit_nofile 20000;
events {{ worker_connections 10240; }}
stream {{
    resolver {LOOPBACK}:{ctx.backends.dns} valid={DNS_TTL_S}s ipv6=off;
    log_format tcplog '$remote_addr:$remote_port [$time_local] $server_addr:$server_port '
                      '$upstream_addr $bytes_received $bytes_sent $session_time $status';
    access_log PREFIX/access.log tcplog;
    server {{
        listen {LOOPBACK}:{port};
        set $backend {BACKEND_NAME}:{ctx.backends.port(role)};
        proxy_pass $backend;
        proxy_connect_timeout 3s;
        proxy_timeout 360s;
    }}
}}
"""
    return port, start_nginx(ctx.procs, ctx.workdir, f"nginx-stream-{role}", body)


PATHS = {
    "direct": start_direct,
    "static-ingress": start_static_ingress,
    "static-ingress-nolog": start_static_ingress_nolog,
    "haproxy": start_haproxy,
    "nginx": start_nginx_stream,
    "haproxy-splice": start_haproxy_spliced,
}


@dataclass
class Context:
    procs: Processes
    workdir: Path
    backends: Backends
    binary: Path


@dataclass
class Instance:
    port: int
    proc: Proc | None
    # Where this instance's access-log lines begin in their file: a path's files are appended
    # to by every round's instance.
    access_log_from: int = 0

    def pids(self) -> list[int]:
        """The proxy's processes (nginx: master and workers); none for the direct path."""
        return tree(self.proc.pid) if self.proc else []


def start_path(ctx: Context, path: str) -> dict[str, Instance]:
    """Starts one instance of the path per role and waits until each passes traffic end to end."""
    instances = {}
    for role in ROLES + ((SNI_ROLE,) if path == "static-ingress" else ()):
        port, proc = PATHS[path](ctx, role)
        instances[role] = Instance(port, proc)
        log = access_log_file(path, instances[role])
        instances[role].access_log_from = log.stat().st_size if log and log.exists() else 0
    procs = [i.proc for i in instances.values() if i.proc]
    wait_until(f"{path} to the HTTPS backend", lambda: https_probe(instances["tls"].port), READY_TIMEOUT_S, procs)
    if SNI_ROLE in instances:
        wait_until(f"{path} routing by SNI to the HTTPS backend",
                   lambda: https_probe(instances[SNI_ROLE].port, SNI_NAME), READY_TIMEOUT_S, procs)
    wait_until(f"{path} to iperf3", lambda: iperf_probe(instances["bulk"].port), READY_TIMEOUT_S, procs)
    wait_until(f"{path} to the echo server", lambda: echo_probe(instances["idle"].port), READY_TIMEOUT_S, procs)
    wait_until(f"{path} to the HTTPS keep-alive backend", lambda: https_probe(instances["api"].port),
               READY_TIMEOUT_S, procs)
    return instances


def stop_path(ctx: Context, instances: dict[str, Instance]) -> None:
    for instance in instances.values():
        if instance.proc:
            ctx.procs.stop(instance.proc)


# Probes: each returns None when the peer works, else why not.

PROBE_TIMEOUT_S = 2.0


def connect_probe(port: int) -> str | None:
    try:
        socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return f"connect to {LOOPBACK}:{port}: {err}"
    return None


def https_probe(port: int, server_name: str = BACKEND_NAME) -> str | None:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT_S) as raw,
            context.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(f"GET / HTTP/1.1\r\nHost: {BACKEND_NAME}\r\nConnection: close\r\n\r\n".encode())
            head = tls.recv(64)
    except (OSError, ssl.SSLError) as err:
        return f"HTTPS request via {LOOPBACK}:{port}: {err}"
    return None if head.startswith(b"HTTP/1.1 200") else f"HTTPS request via {LOOPBACK}:{port}: got {head[:20]!r}"


def echo_probe(port: int) -> str | None:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=PROBE_TIMEOUT_S) as conn:
            conn.sendall(b"x")
            got = conn.recv(1)
    except OSError as err:
        return f"echo via {LOOPBACK}:{port}: {err}"
    return None if got == b"x" else f"echo via {LOOPBACK}:{port}: got {got!r}"


def iperf_probe(port: int) -> str | None:
    result = run(["iperf3", "--client", LOOPBACK, "--port", str(port), "--bytes", "64K", "--connect-timeout", "2000"],
                 15, "iperf3 probe")  # fmt: skip
    if result.returncode != 0:
        lines = (result.stdout + result.stderr).strip().splitlines()
        return f"iperf3 via {LOOPBACK}:{port}: {lines[-1] if lines else 'failed'}"
    return None


def dns_probe(port: int) -> str | None:
    """One A query for backend.test over UDP; ready when it answers 127.0.0.1."""
    labels = b"".join(bytes([len(p)]) + p.encode() for p in BACKEND_NAME.split("."))
    query = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00" + labels + b"\x00\x00\x01\x00\x01"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.settimeout(PROBE_TIMEOUT_S)
            udp.sendto(query, (LOOPBACK, port))
            answer = udp.recv(512)
    except OSError as err:
        return f"DNS query to {LOOPBACK}:{port}: {err}"
    return None if answer.endswith(socket.inet_aton(LOOPBACK)) else "DNS answer without 127.0.0.1"


def access_log_file(path: str, instance: Instance) -> Path | None:
    """Where the instance writes its access log: nginx's access.log, the others' output."""
    if not instance.proc:
        return None
    if path.startswith("nginx"):
        return instance.proc.log.parent / instance.proc.name / "access.log"
    return instance.proc.log


def access_log_lines(path: str, instance: Instance) -> int | None:
    """How many access-log lines the instance has written so far; None for the direct path."""
    log = access_log_file(path, instance)
    if log is None:
        return None
    # static-ingress's target, or HAProxy's tcplog "frontend backend/server" fields; nginx's
    # file has nothing else.
    if path.startswith("static-ingress"):
        marker = "static_ingress::access"
    elif path.startswith("haproxy"):
        marker = " static backend_elb/"
    else:
        marker = None
    try:
        with open(log, "rb") as f:
            f.seek(instance.access_log_from)
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return 0
    return sum(1 for line in text.splitlines() if marker is None or marker in line)


def describe(proc: Proc) -> dict:
    """A process's exact command line and configuration file, for the report."""
    entry: dict = {"argv": proc.argv}
    for flag in ("-f", "-c", "--config"):  # haproxy -f FILE, nginx -c FILE, static-ingress --config FILE
        if flag in proc.argv:
            entry["config"] = Path(proc.argv[proc.argv.index(flag) + 1]).read_text()
    return entry


def describe_path(instances: dict[str, Instance]) -> dict[str, dict]:
    return {
        role: describe(instance.proc) if instance.proc else {"connect_to": f"{LOOPBACK}:{instance.port}"}
        for role, instance in instances.items()
    }
