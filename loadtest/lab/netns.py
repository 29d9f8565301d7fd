"""Network namespaces for the lab: creating them and their links, the check that none of them
can reach beyond the machine, and a teardown that leaves nothing behind.

Every namespace of one lab run is named `<prefix>-<role>` where the prefix is `silab<PID>`,
the PID of the supervising `lab.py` process. A namespace whose supervisor is gone is a
leftover of a run that was killed outright (SIGKILL, power loss): `sweep_stale()` removes
those, and only those, at the next start.

Addresses come from 198.18.0.0/15 (RFC 2544, set aside for benchmark labs) and sit only on veth
links between lab namespaces. No namespace gets a default route: each has a route to
198.18.0.0/15 through the core router and nothing else, so a packet for any other address has
no way out, and `check_isolated()` proves that before any traffic is sent.
"""

import ipaddress
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import tempfile
import time

LAB_NET = ipaddress.ip_network("198.18.0.0/15")
PREFIX_RE = re.compile(r"^silab(\d+)-")
# An address outside the lab (TEST-NET-1): `ip route get` to it must fail in every namespace.
OUTSIDE = "192.0.2.1"
ETC_NETNS = pathlib.Path("/etc/netns")
RUN_NETNS = pathlib.Path("/run/netns")
# The orchestrator's working directory, in the system's temporary directory, named after its PID.
WORK_PREFIX = "static-ingress-lab-"
WORK_RE = re.compile(r"^static-ingress-lab-(\d+)-")


class LabError(RuntimeError):
    pass


def run(*args, check=True, timeout=30, input=None):
    r = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise LabError(f"{' '.join(args)} exited {r.returncode}: {r.stderr.strip() or r.stdout.strip()}")
    return r


def ip(*args, ns=None, check=True):
    cmd = ["ip"] + (["-n", ns] if ns else []) + list(args)
    return run(*cmd, check=check)


def prefix_for(pid):
    return f"silab{pid}"


def existing():
    """Names of every network namespace on the machine."""
    out = run("ip", "-j", "netns", "list").stdout.strip()
    return [n["name"] for n in json.loads(out)] if out else []


def _started(pid):
    """When process `pid` started (epoch seconds), or None if it is gone."""
    try:
        fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        btime = next(int(line.split()[1]) for line in pathlib.Path("/proc/stat").read_text().splitlines()
                     if line.startswith("btime "))
        return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _owner_alive(pid, made_at):
    """Whether the run with PID `pid` that made something at `made_at` is still running: the
    PID must exist and have started before that (a PID reused since is not the owner)."""
    started = _started(pid)
    return started is not None and started <= made_at + 1.0


def _alive(pid):
    return _started(pid) is not None


def namespace_pids(name):
    """The PIDs of the processes in namespace `name` (never this process: the orchestrator
    itself runs in the control namespace)."""
    pids = [int(p) for p in run("ip", "netns", "pids", name, check=False).stdout.split()]
    return [p for p in pids if p != os.getpid()]


def kill_namespace_processes(name, grace_s=5.0, sig=signal.SIGTERM):
    """Stops every process inside namespace `name`, by PID: `sig`, then SIGKILL after
    `grace_s`. Only lab namespaces are passed here, so these are processes the lab started."""
    pids = namespace_pids(name)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _alive(p)]
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def delete(name):
    """Removes one namespace: its processes, then the namespace (which takes its links and
    addresses with it), then its /etc/netns directory."""
    kill_namespace_processes(name)
    ip("netns", "del", name, check=False)
    d = ETC_NETNS / name
    if d.is_dir():
        for f in d.iterdir():
            f.unlink()
        d.rmdir()


def teardown(prefix):
    """Removes every namespace of the run with this prefix; returns those it could not remove
    (each is tried, whatever happened to the others). The core router and the control namespace
    go last, so that the others' processes are stopped while their links still carry their
    goodbyes."""
    names = [n for n in existing() if n.startswith(prefix + "-")]
    names.sort(key=lambda n: (n.endswith("-core"), n.endswith("-ctl")))
    for name in names:
        try:
            delete(name)
        except (OSError, subprocess.SubprocessError, LabError) as e:
            print(f"[lab] teardown of {name}: {e}", flush=True)
    try:
        return [n for n in existing() if n.startswith(prefix + "-")]
    except (OSError, subprocess.SubprocessError, LabError) as e:
        return [f"(cannot list namespaces: {e})"]


def teardown_except(prefix, keep):
    """Removes the run's namespaces other than those in `keep` (between scenarios: the control
    namespace, where the orchestrator runs, stays)."""
    names = [n for n in existing() if n.startswith(prefix + "-") and n not in keep]
    names.sort(key=lambda n: n.endswith("-core"))
    for name in names:
        delete(name)


def sweep_stale():
    """Removes the namespaces and working directories of earlier lab runs whose orchestrator is
    no longer running (killed outright: SIGKILL, a CI timeout). A run's PID in a name is trusted
    only if that process started before the namespace was made, so a PID reused since never
    protects a leftover."""
    removed = []
    for name in existing():
        m = PREFIX_RE.match(name)
        if not m:
            continue
        try:
            made_at = (RUN_NETNS / name).stat().st_mtime
        except OSError:
            made_at = time.time()
        if not _owner_alive(int(m.group(1)), made_at):
            delete(name)
            removed.append(name)
    tmp = pathlib.Path(tempfile.gettempdir())
    for d in tmp.glob(WORK_PREFIX + "*"):
        m = WORK_RE.match(d.name)
        if m and d.is_dir() and not _owner_alive(int(m.group(1)), d.stat().st_mtime):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(str(d))
    return removed


class Lab:
    """The namespaces of one run. `add(role)` creates `<prefix>-<role>`, with loopback up."""

    def __init__(self, prefix):
        self.prefix = prefix
        self.names = []
        self._links = 0

    def name(self, role):
        return f"{self.prefix}-{role}"

    def add(self, role, resolver=None):
        name = self.name(role)
        ip("netns", "add", name)
        self.names.append(name)
        ip("link", "set", "lo", "up", ns=name)
        if resolver:
            # `ip netns exec` bind-mounts this over /etc/resolv.conf for what it runs.
            d = ETC_NETNS / name
            d.mkdir(parents=True, exist_ok=True)
            (d / "resolv.conf").write_text(f"nameserver {resolver}\noptions timeout:1 attempts:2\n")
            # Names through files and DNS only: a host whose nsswitch asks systemd-resolved or
            # nscd (over Unix sockets, which namespaces do not separate) would answer from outside.
            (d / "nsswitch.conf").write_text("hosts: files dns\n")
        return name

    def sysctl(self, ns, key, value):
        run("ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}")

    def veth(self, a, a_if, b, b_if):
        """A veth pair between namespaces a and b, both ends up."""
        tmp_a, tmp_b = f"sil{os.getpid() % 100000}a{self._links}", f"sil{os.getpid() % 100000}b{self._links}"
        self._links += 1
        ip("link", "add", tmp_a, "netns", a, "type", "veth", "peer", "name", tmp_b, "netns", b)
        ip("link", "set", tmp_a, "name", a_if, ns=a)
        ip("link", "set", tmp_b, "name", b_if, ns=b)
        ip("link", "set", a_if, "up", ns=a)
        ip("link", "set", b_if, "up", ns=b)

    def check_isolated(self, names=None):
        """Refuses to go on unless every lab namespace (or those in `names`) is closed to the
        world: only loopback, bridges and veth links whose other end is in another lab namespace
        (never the host's); every IPv4 route inside 198.18.0.0/15 (or the instance metadata
        address, or loopback); no IPv6 route but loopback's; no policy rule but the defaults and
        the lab's blackholes; and no route to an outside address."""
        for ns in names or self.names:
            peers = {e["nsid"]: e.get("name", "") for e in json.loads(ip("-j", "netns", "list-id", ns=ns).stdout or "[]")}
            for link in json.loads(ip("-j", "-d", "link", "show", ns=ns).stdout):
                kind = link.get("linkinfo", {}).get("info_kind")
                if link["ifname"] != "lo" and kind not in ("veth", "bridge"):
                    raise LabError(f"{ns}: link {link['ifname']} ({kind}) is not a lab link")
                if kind == "veth" and not peers.get(link.get("link_netnsid"), "").startswith(self.prefix + "-"):
                    raise LabError(f"{ns}: veth {link['ifname']} ends outside the lab's namespaces")
            for rule in json.loads(ip("-j", "rule", "show", ns=ns).stdout):
                if rule.get("table") not in ("local", "main", "default") and rule.get("action") != "blackhole":
                    raise LabError(f"{ns}: policy rule {rule} is not the lab's")
            for route in json.loads(ip("-j", "-6", "route", "show", "table", "all", ns=ns).stdout):
                if route.get("dev") not in (None, "lo") and route.get("type") not in ("local", "multicast", "anycast") \
                        and not str(route.get("dst", "")).startswith(("fe80:", "ff00:", "multicast")):
                    raise LabError(f"{ns}: IPv6 route {route} leaves the lab")
            for table in ("main", "local"):
                for route in json.loads(ip("-j", "route", "show", "table", table, ns=ns).stdout):
                    dst = route.get("dst", "")
                    if dst == "default":
                        raise LabError(f"{ns}: has a default route {route}")
                    if route.get("type") in ("local", "broadcast") or dst in ("", "blackhole"):
                        continue
                    net = ipaddress.ip_network(dst, strict=False)
                    if not (net.subnet_of(LAB_NET) or str(net) == "169.254.169.254/32"
                            or net.subnet_of(ipaddress.ip_network("127.0.0.0/8"))):
                        raise LabError(f"{ns}: route to {dst} leaves the lab's range")
            r = ip("route", "get", OUTSIDE, ns=ns, check=False)
            if r.returncode == 0 and "unreachable" not in r.stdout and "blackhole" not in r.stdout:
                raise LabError(f"{ns}: {OUTSIDE} is routable ({r.stdout.strip()})")
