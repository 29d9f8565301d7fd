"""The .deb in a booted Debian 13 container (systemd-nspawn, private network): installed with
dpkg, the unit starts at boot under its sandbox, /health answers, the proxy serves port 443 as
an unprivileged user, the watchdog is fed, `systemctl reload` applies a changed drop-in and fails
on an invalid one, every access-log line of 60,000 connections in 30 s reaches the journal, a stop drains, and a bad config never serves but heals by itself once fixed. Needs root; run by `make container-test`.

The backend is the proxy's own admin port (127.0.0.1:9001): the container has no other network,
and an address that accepts TCP is all the health checks need."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import time

import pytest

from conftest import ROOT, tool
from nspawn import container_leader, wait_for

UNIT = "static-ingress.service"
# What the launch template writes (here with a short drain for the test).
DROP_IN = "etc/static-ingress/static-ingress.toml.d/50-launch-template.toml"
SETTINGS = """\
[backend]
address = "127.0.0.1:9001"
[admin]
operator_listen = ["0.0.0.0:9002"]
[lifecycle]
drain_delay = "4s"
grace_period = "2s"
"""
WATCHDOG_S = 3


def run(args, timeout=60, check=False):
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{args} exited {r.returncode}: {r.stdout}{r.stderr}")
    return r


class Container:
    """A booted systemd-nspawn container, stopped by the PID of the nspawn it started."""

    def __init__(self, root, name, log):
        self.root, self.name, self.log_path = root, name, log
        self.proc = None
        self.leader = None

    def boot(self):
        log = open(self.log_path, "wb")
        # --register=no and --keep-unit: this machine's PID 1 is not systemd, so there is no
        # machined to register with and no scope to move into.
        self.proc = subprocess.Popen(
            ["systemd-nspawn", "--quiet", "-D", str(self.root), "-M", self.name, "--register=no",
             "--keep-unit", "--private-network", "--boot", "--console=passive"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        )
        self.leader = wait_for("the container's init", self._leader, 30)
        # systemctl answers once systemd has opened its private socket, a moment after exec.
        wait_for("systemd in the container to answer",
                 lambda: self.sh("systemctl", "is-system-running").stdout.strip(), 30)
        r = self.sh("timeout", "90", "systemctl", "is-system-running", "--wait", timeout=100)
        state = r.stdout.strip() or r.stderr.strip()
        if state != "running":
            failed = self.sh("systemctl", "--failed", "--no-pager").stdout
            raise AssertionError(f"container booted {state!r}; failed units:\n{failed}\n{self.journal()}")

    def _leader(self):
        if self.proc.poll() is not None:
            raise AssertionError(f"systemd-nspawn exited {self.proc.returncode}: "
                                 + pathlib.Path(self.log_path).read_text(errors="replace"))
        return container_leader(self.proc.pid)

    def sh(self, *args, timeout=60):
        """Runs a command inside the container (its mount, PID, network and other namespaces)."""
        return run(["nsenter", "-t", str(self.leader), "-m", "-u", "-i", "-n", "-p", "--", *args], timeout=timeout)

    def net(self, *args, timeout=30):
        """Runs a host command in the container's network namespace only (e.g. the host's curl)."""
        return run(["nsenter", "-t", str(self.leader), "-n", "--", *args], timeout=timeout)

    def show(self, *props):
        out = self.sh("systemctl", "show", UNIT, *[f"--property={p}" for p in props]).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self):
        return self.sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat").stdout

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        # nspawn turns SIGTERM into an orderly shutdown of the booted system.
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def container(deb_path, tmp_path_factory):
    if os.geteuid() != 0:
        pytest.fail("the container test needs root (systemd-nspawn)")
    cached = run([str(ROOT / "scripts/debian-rootfs.sh"), "trixie"], timeout=1000, check=True).stdout.split()[-1]
    work = tmp_path_factory.mktemp("container")
    root = work / "root"
    # A copy, so the cached tree stays pristine.
    run(["cp", "-a", "--reflink=auto", cached, str(root)], timeout=300, check=True)
    # Install as on the AMI: dpkg inside the (not yet booted) root. (Not in /tmp: nspawn mounts
    # a fresh tmpfs there.)
    shutil.copy(deb_path, root / "root/static-ingress.deb")
    r = run(["systemd-nspawn", "--quiet", "-D", str(root), "--register=no", "--keep-unit", "--private-network",
             "dpkg", "-i", "/root/static-ingress.deb"], timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    (root / "root/static-ingress.deb").unlink()
    # The launch template's part: the config drop-in (cloud-init makes the directory; the
    # .deb ships it with a README), and a short watchdog so the test sees it fed.
    assert (root / DROP_IN).parent.joinpath("README").is_file()
    (root / DROP_IN).write_text(SETTINGS)
    dropin = root / f"etc/systemd/system/{UNIT}.d"
    dropin.mkdir(parents=True)
    (dropin / "test-watchdog.conf").write_text(f"[Service]\nWatchdogSec={WATCHDOG_S}s\n")

    c = Container(root, f"si-test-{os.getpid()}", work / "nspawn.log")
    try:
        c.boot()
        yield c
    finally:
        c.stop()
        shutil.rmtree(work, ignore_errors=True)


def health(c):
    """The body and status of /health, e.g. "ok 200" or "draining 503"."""
    r = c.net("curl", "-s", "-m", "3", "-o", "-", "-w", " %{http_code}", "http://127.0.0.1:9001/health")
    return " ".join(r.stdout.split())


# The tests below run in this order on one booted container.

def test_unit_is_enabled_and_running_after_boot(container):
    props = container.show("ActiveState", "SubState", "UnitFileState", "NRestarts", "Type")
    assert props == {"ActiveState": "active", "SubState": "running", "UnitFileState": "enabled",
                     "NRestarts": "0", "Type": "notify"}, container.journal()


def test_health_answers_ok(container):
    wait_for("/health to answer 200", lambda: health(container) == "ok 200", 30)


def test_proxy_serves_443_as_an_unprivileged_sandboxed_user(container):
    # Port 443 passes through to the backend, here the admin port: /live comes back.
    r = container.net("curl", "-s", "-m", "5", "http://127.0.0.1:443/live")
    assert r.stdout.strip() == "live", r.stdout + r.stderr
    pid = container.show("MainPID")["MainPID"]
    status = container.sh("cat", f"/proc/{pid}/status").stdout
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    uid = fields["Uid"].split()[0]
    assert uid != "0", "the proxy runs as root"
    # CAP_NET_BIND_SERVICE (bit 10) and nothing else, no new privileges, a seccomp filter.
    assert fields["CapEff"].strip() == "0000000000000400"
    assert fields["CapBnd"].strip() == "0000000000000400"
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"


def test_process_metrics_see_the_limits_and_start_time(container):
    metrics = container.net("curl", "-s", "-m", "5", "http://127.0.0.1:9002/metrics").stdout
    values = dict(line.rsplit(" ", 1) for line in metrics.splitlines() if line.startswith("process_"))
    # The unit's LimitNOFILE (32768), unless the machine running the container caps every
    # process lower (systemd cannot give more than its own hard limit).
    limits = pathlib.Path(f"/proc/{container.leader}/limits").read_text()
    [hard] = [line.split()[4] for line in limits.splitlines() if line.startswith("Max open files")]
    expected = 32768 if hard == "unlimited" else min(32768, int(hard))
    assert int(values["process_max_fds"]) == expected, values
    # The sandbox leaves /proc/stat readable, which the start time is computed from.
    assert float(values["process_start_time_seconds"]) > 0, values


def test_watchdog_is_fed(container):
    props = container.show("WatchdogUSec", "MainPID", "ActiveEnterTimestampMonotonic")
    assert props["WatchdogUSec"] == f"{WATCHDOG_S}s"
    # Well past the watchdog interval: an unfed watchdog would have killed and restarted it.
    time.sleep(WATCHDOG_S * 2 + 2)
    after = container.show("ActiveState", "MainPID", "NRestarts")
    assert after == {"ActiveState": "active", "MainPID": props["MainPID"], "NRestarts": "0"}, container.journal()


def test_systemd_analyze_verify_in_the_container(container):
    r = container.sh("systemd-analyze", "verify", UNIT)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def status(c):
    r = c.net("curl", "-s", "-m", "3", "http://127.0.0.1:9002/status")
    return json.loads(r.stdout)


def test_the_health_port_serves_health_only_and_the_operator_port_the_rest(container):
    r = container.net("curl", "-s", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}", "http://127.0.0.1:9001/status")
    assert r.stdout == "404", r.stdout + r.stderr
    assert status(container)["health"]["healthy"] is True


def test_systemctl_reload_applies_the_drop_in_and_fails_on_an_invalid_one(container):
    before = container.show("MainPID", "NRestarts")
    drop_in = container.root / DROP_IN
    # A changed drop-in: `systemctl reload` returns once the proxy has applied it.
    drop_in.write_text(SETTINGS + '[proxy]\nidle_timeout = "90s"\n')
    r = container.sh("systemctl", "reload", UNIT)
    assert r.returncode == 0, r.stdout + r.stderr + container.journal()
    reload = status(container)["reload"]
    assert (reload["count"], reload["result"]) == (1, "applied"), reload
    journal = container.journal()
    assert "configuration reloaded" in journal
    # The sandboxed ExecReload could read how the proxy was started (/proc of the same
    # dynamic user), so it checked what the proxy reads.
    assert "cannot read how process" not in journal, journal
    # Invalid: the reload job fails, the journal names the file and line, and the proxy goes on
    # serving what it ran (not signalled, not restarted).
    drop_in.write_text(SETTINGS + "[proxy]\nconnect_timeout = 5\n")
    r = container.sh("systemctl", "reload", UNIT)
    assert r.returncode != 0, r.stdout + r.stderr
    journal = container.journal()
    assert f"/{DROP_IN}:9: proxy.connect_timeout:" in journal, journal
    assert "not reloading: process" in journal, journal
    assert container.show("ActiveState", "MainPID", "NRestarts") == {"ActiveState": "active", **before}
    assert status(container)["reload"]["count"] == 1
    assert health(container) == "ok 200"
    drop_in.write_text(SETTINGS)
    r = container.sh("systemctl", "reload", UNIT)
    assert r.returncode == 0, r.stdout + r.stderr + container.journal()
    assert status(container)["reload"]["count"] == 2


# A connection rate the benchmark reaches (its highest clean rate through the proxy here was
# about 2,400 a second), held for 30 s, journald's rate-limit window: 60,000 access-log lines,
# more than journald's default limit lets through even scaled up for a large free disk (10,000
# per 30 s, times at most about 5).
LOAD_CONNECTIONS = 60_000
LOAD_RATE = 2_000


def access_lines(c, cursor):
    out = c.sh("journalctl", "-u", UNIT, "--no-pager", "-o", "cat", f"--after-cursor={cursor}", timeout=120).stdout
    return [line for line in out.splitlines() if "static_ingress::access" in line]


def test_every_access_log_line_reaches_the_journal_at_the_benchmarks_rate(container):
    props = container.show("LogRateLimitIntervalUSec", "LogRateLimitBurst")
    assert props == {"LogRateLimitIntervalUSec": "30s", "LogRateLimitBurst": "1000000"}, props
    cursor = container.sh("journalctl", "-u", UNIT, "-n", "1", "--show-cursor", "--no-pager", "-o", "cat").stdout
    cursor = cursor.strip().splitlines()[-1].removeprefix("-- cursor: ")
    # A new connection per request, through port 443 to the admin port's /live.
    started = time.monotonic()
    r = container.net(tool("oha", "STATIC_INGRESS_TOOLS_BIN"), "-n", str(LOAD_CONNECTIONS), "-q", str(LOAD_RATE),
                      "-c", "32", "--disable-keepalive", "--no-tui", "--output-format", "json",
                      "http://127.0.0.1:443/live", timeout=180)
    took = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert report["statusCodeDistribution"] == {"200": LOAD_CONNECTIONS}, (report["statusCodeDistribution"],
                                                                           report.get("errorDistribution"))
    # journald may lag behind the proxy a little: wait for the lines to stop coming.
    lines, last = [], -1
    deadline = time.monotonic() + 60
    while len(lines) != last and len(lines) < LOAD_CONNECTIONS and time.monotonic() < deadline:
        last = len(lines)
        time.sleep(2)
        lines = access_lines(container, cursor)
    metrics = container.net("curl", "-s", "-m", "5", "http://127.0.0.1:9002/metrics").stdout
    dropped = [line for line in metrics.splitlines() if line.startswith("static_ingress_access_log_dropped_lines_total")]
    assert dropped == ["static_ingress_access_log_dropped_lines_total 0"], dropped
    completed = [line for line in lines if "reason=completed" in line or '"reason":"completed"' in line]
    assert len(completed) == len(lines) == LOAD_CONNECTIONS, (
        f"{len(lines)} access-log lines ({len(completed)} completed) in the journal for {LOAD_CONNECTIONS} "
        f"connections in {took:.1f} s")
    assert "Suppressed" not in container.sh("journalctl", "--no-pager", "-o", "cat", f"--after-cursor={cursor}",
                                            timeout=120).stdout


def test_stop_drains_then_exits_cleanly(container):
    r = container.sh("systemctl", "stop", "--no-block", UNIT)
    assert r.returncode == 0, r.stderr
    # Route 53's view while draining: 503 with the reason, not a refused connection.
    wait_for("/health to answer 503 draining", lambda: health(container) == "draining 503", 5, 0.1)
    wait_for("the unit to stop", lambda: container.show("ActiveState")["ActiveState"] == "inactive", 30)
    props = container.show("Result", "ExecMainStatus", "ExecMainCode")
    assert props == {"Result": "success", "ExecMainStatus": "0", "ExecMainCode": "1"}, container.journal()
    assert container.net("curl", "-s", "-m", "3", "http://127.0.0.1:9001/health").returncode != 0


def test_bad_config_never_serves_and_heals_once_fixed(container):
    drop_in = container.root / DROP_IN
    drop_in.write_text(SETTINGS + "[proxy]\nconnect_timeout = 5\n")
    r = container.sh("systemctl", "start", UNIT)
    assert r.returncode != 0
    assert container.show("Result")["Result"] == "exit-code"
    # The config check names the bad value in the journal, and nothing listens.
    assert f"/{DROP_IN}:9: proxy.connect_timeout:" in container.journal()
    assert container.net("curl", "-s", "-m", "3", "http://127.0.0.1:9001/health").returncode != 0
    # Restart=always: the check is retried every RestartSec (5s)...
    wait_for("a retry of the config check",
             lambda: int(container.show("NRestarts")["NRestarts"]) >= 1, 15)
    assert container.show("ActiveState")["ActiveState"] != "active"
    # ...so once the file is fixed the proxy comes up by itself, with no one to restart it.
    drop_in.write_text(SETTINGS)
    wait_for("the unit to become active", lambda: container.show("ActiveState")["ActiveState"] == "active", 20)
    wait_for("/health to answer 200 again", lambda: health(container) == "ok 200", 30)
