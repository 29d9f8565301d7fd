"""The lab's real servers and how they are started: processes inside a namespace (started and
stopped by PID), the lab's certificate authority, the blue and green "ELBs" (nginx serving
HTTPS), the VPC resolver and the clients' caching stub resolver (both dnsmasq)."""

import os
import pathlib
import select
import signal
import subprocess
import sys
import time

from netns import LabError, run

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests" / "packaging"))
from nspawn import wait_for  # noqa: E402  (shared with the container test)

# The body of every short request: the first line says which ELB answered.
STREAM_BYTES = 1 << 20


class Proc:
    """A process in a namespace, its output in a log file. Stopped by its PID only."""

    def __init__(self, name, ns, argv, log_path, env=None, ready=None, timeout_s=30):
        self.name = name
        self.ns = ns
        self.log_path = pathlib.Path(log_path)
        cmd = ["ip", "netns", "exec", ns] + [str(a) for a in argv] if ns else [str(a) for a in argv]
        self.log = open(self.log_path, "ab")
        # A ready line on stdout is read here; everything else goes to the log.
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if ready else self.log, stderr=self.log,
            env=env if env is not None else os.environ.copy(),
            start_new_session=True,
        )
        self.ready_line = None
        if ready:
            self.ready_line = self._wait_line(ready, timeout_s)

    @property
    def pid(self):
        return self.proc.pid

    def _wait_line(self, prefix, timeout_s):
        deadline = time.monotonic() + timeout_s
        buf = b""
        fd = self.proc.stdout.fileno()
        while time.monotonic() < deadline:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                for line in buf.decode(errors="replace").splitlines():
                    if line.startswith(prefix):
                        return line
            elif self.proc.poll() is not None:
                break
        self.stop()
        raise LabError(f"{self.name} did not print {prefix!r} within {timeout_s}s "
                       f"(exit {self.proc.poll()}); log {self.log_path}: {self.tail()}")

    def tail(self, n=2000):
        try:
            return self.log_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def alive(self):
        return self.proc.poll() is None

    def signal(self, sig):
        if self.alive():
            self.proc.send_signal(sig)

    def wait(self, timeout_s):
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace_s=10.0):
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            if self.wait(grace_s) is None:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self.log.close()


def wait_until(what, predicate, timeout_s, interval_s=0.1):
    """Polls `predicate` until it returns a true value, for at most `timeout_s` (the container
    test's wait, failing as the lab fails)."""
    try:
        return wait_for(what, predicate, timeout_s, interval_s)
    except AssertionError as e:
        raise LabError(str(e)) from None


def make_ca(directory, names):
    """A CA and one ECDSA P-256 certificate for `names` (cheap handshakes, as ELBs offer).
    Returns (ca_cert, cert, key) paths."""
    d = pathlib.Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    ca_key, ca_crt = d / "ca.key", d / "ca.crt"
    key, csr, crt = d / "elb.key", d / "elb.csr", d / "elb.crt"
    ext = d / "san.ext"
    ext.write_text("subjectAltName=" + ",".join(f"DNS:{n}" for n in names) + "\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run("openssl", "req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca_crt), "-days", "2",
        "-subj", "/CN=static-ingress lab CA")
    run("openssl", "req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={names[0]}")
    run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_crt), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(ext))
    return ca_crt, crt, key


def stream_file(directory):
    """The body of /stream: STREAM_BYTES of the repeating pattern 0..255 the client checks."""
    path = pathlib.Path(directory) / "stream.bin"
    if not path.exists():
        path.write_bytes(bytes(range(256)) * (STREAM_BYTES // 256))
    return path


def nginx_elb(name, ns, addresses, directory, cert, key, stream_rate):
    """One ELB: nginx on port 443 of each of `addresses`, answering `<name>\\n` to every
    request and the stream file at `stream_rate` bytes/s on /stream."""
    d = pathlib.Path(directory) / f"nginx-{name}"
    d.mkdir(parents=True, exist_ok=True)
    body = stream_file(directory)
    listens = "\n".join(f"    listen {a}:443 ssl reuseport backlog=4096;" for a in addresses)
    conf = d / "nginx.conf"
    conf.write_text(f"""
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 8192; }}
worker_rlimit_nofile 16384;
http {{
  access_log off;
  server {{
{listens}
    # ELBs offer TLS 1.3 (nginx 1.22 would offer only 1.2 without this line).
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    keepalive_timeout 0;
    location = /stream {{
      limit_rate {stream_rate};
      default_type application/octet-stream;
      alias {body};
    }}
    location / {{
      default_type text/plain;
      return 200 "{name}\\n";
    }}
  }}
}}
""")
    p = Proc(f"nginx-{name}", ns, ["nginx", "-c", conf, "-p", d, "-e", d / "error.log"], d / "stdout.log")
    wait_until(f"nginx {name} to listen", lambda: _listening(ns, addresses[0], 443) or _dead(p), 15)
    if not p.alive():
        raise LabError(f"nginx {name} exited: {(d / 'error.log').read_text(errors='replace')}")
    return p


def _dead(p):
    return not p.alive()


def _listening(ns, addr, port):
    out = run("ip", "netns", "exec", ns, "ss", "-Hltn", f"src {addr}:{port}", check=False).stdout
    return bool(out.strip())


def dnsmasq_vpc_resolver(ns, listen, hosts_file, ttl, directory):
    """The VPC resolver: dnsmasq answering the backend name from `hosts_file` with `ttl`, as
    Route 53 answers an ELB's alias (60 s) scaled. SIGHUP re-reads the file (the flip)."""
    d = pathlib.Path(directory)
    return Proc("vpc-resolver", ns, [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
        f"--addn-hosts={hosts_file}", f"--local-ttl={ttl}", f"--listen-address={listen}",
        "--bind-interfaces", "--cache-size=0", "--pid-file=", "--log-facility=-",
        "--user=root", "--group=root",
    ], d / "vpc-resolver.log", ready=None)


def dnsmasq_stub(ns, listen, upstream, log_path):
    """The clients' caching stub resolver on `listen`:53: forwards to the Route 53 simulator
    and caches each answer for its TTL, as a client's OS or ISP resolver does."""
    return Proc(f"stub-{ns}", ns, [
        "dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts", "--no-poll",
        f"--server={upstream}", f"--listen-address={listen}", "--bind-interfaces",
        "--cache-size=10000", "--pid-file=", "--log-facility=-", "--user=root", "--group=root",
    ], log_path, ready=None)


def dns_answers(server, name, timeout_s=1.0):
    """The A records `server`:53 gives for `name` (the orchestrator's namespace reaches every
    lab address through the core router); [] when it does not answer."""
    import socket

    import dnslib  # in the lab's virtualenv
    q = dnslib.DNSRecord.question(name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(timeout_s)
        try:
            s.sendto(q.pack(), (server, 53))
            reply = dnslib.DNSRecord.parse(s.recv(4096))
        except (OSError, dnslib.DNSError):
            return []
    return [str(rr.rdata) for rr in reply.rr if rr.rtype == dnslib.QTYPE.A]
