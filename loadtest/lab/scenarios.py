"""The 2016 design's tests, replayed against a lab deployment. Each scenario builds a fresh
deployment (so one scenario's damage never leaks into the next), starts the clients, records a
quiet "before" phase, does its thing ("during"), lets the fleet settle ("after"), and writes
scenario.json beside the clients', Route 53's and the orchestrator's records.

Client load: new TLS connections with one request each at a constant rate, spread over
several client namespaces, each with its own caching stub resolver (many clients behind many
resolvers, as on the Internet: with one resolver every client would follow one cached answer),
plus a few long-lived streams.
"""

import json
import pathlib
import shutil
import signal
import sys
import time

from deploy import ADMIN_PORT, ELBS, RECORD, SUBNETS, Deployment, Events, http_get
from netns import LabError, ip
from services import STREAM_BYTES, Proc, wait_until

LAB_DIR = pathlib.Path(__file__).resolve().parent
SUBNET_A = SUBNETS["us-east-1a"][0]
# A stream (1 MiB at the ELB's 128 KiB/s) takes 8 s; one stuck on a lost instance is given up
# (outcome timeout) after this.
STREAM_TIMEOUT_S = 15


class Clients:
    """One client.py per client namespace, sharing the rate."""

    def __init__(self, dep, out_dir, rate, streams):
        self.dep = dep
        self.out = pathlib.Path(out_dir)
        self.procs = []
        self.dirs = []
        self.rate_log = [(time.time(), rate)]
        n = len(dep.client_ns)
        for i, (ns, _) in enumerate(dep.client_ns):
            d = self.out / f"client{i}"
            d.mkdir(parents=True, exist_ok=True)
            control = d / "control.json"
            control.write_text(json.dumps({"rate": rate / n}))
            # Each stream lasts STREAM_BYTES / stream_rate seconds.
            argv = [sys.executable, LAB_DIR / "client.py", f"https://{RECORD}/",
                    "--ca", dep.ca, "--rate", str(rate / n), "--duration", "0",
                    "--out", d, "--workers", "1", "--control", control,
                    "--streams", str(streams // n + (1 if i < streams % n else 0)),
                    "--stream-bytes", str(STREAM_BYTES), "--timeout", "10",
                    "--stream-timeout", str(STREAM_TIMEOUT_S)]
            self.procs.append(Proc(f"client{i}", ns, argv, d / "client.log", ready="ready", timeout_s=30))
            self.dirs.append(d)

    def check_alive(self):
        """Every client must still be running: a dead one would leave a "zero" with nothing
        behind it."""
        dead = [f"client{i} (exit {p.proc.poll()})" for i, p in enumerate(self.procs) if not p.alive()]
        if dead:
            raise LabError(f"clients stopped before the end: {', '.join(dead)}; see their logs")

    def expected_short(self):
        """How many short requests the schedule called for, from the start of the load to now
        (the rate as set, phase by phase)."""
        total, t = 0.0, None
        for (t0, rate) in self.rate_log:
            if t is not None:
                total += prev_rate * (t0 - t)
            t, prev_rate = t0, rate
        if t is not None:
            total += prev_rate * (time.time() - t)
        return total

    def set_rate(self, rate):
        self.rate_log.append((time.time(), rate))
        for d in self.dirs:
            (d / "control.json.new").write_text(json.dumps({"rate": rate / len(self.dirs)}))
            (d / "control.json.new").rename(d / "control.json")

    def stop(self, timeout_s=STREAM_TIMEOUT_S + 15):
        for p in self.procs:
            p.signal(signal.SIGTERM)
        bad = []
        deadline = time.monotonic() + timeout_s
        for i, p in enumerate(self.procs):
            code = p.wait(max(deadline - time.monotonic(), 0.1))
            if code is None:
                bad.append(f"client{i} did not stop within {timeout_s}s (killed)")
                p.stop(grace_s=1)
            else:
                p.stop()
                if code != 0:
                    bad.append(f"client{i} exited {code}")
        self.problems = bad
        records = []
        for i, d in enumerate(self.dirs):
            # The merged file, or the workers' own (flushed every second) if the client was
            # killed before merging.
            paths = [d / "client.jsonl"] if (d / "client.jsonl").exists() else sorted(d.glob("client-*.jsonl"))
            lines = [line for path in paths for line in path.read_text().splitlines()]
            for line in lines:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                rec["client"] = i
                records.append(rec)
        records.sort(key=lambda r: r.get("t", 0))
        with open(self.out / "client.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        # One copy of the records is enough; each client's log joins the others.
        logs = self.out / "logs"
        logs.mkdir(exist_ok=True)
        for i, d in enumerate(self.dirs):
            if (d / "client.log").exists():
                (d / "client.log").rename(logs / f"client{i}.log")
            shutil.rmtree(d, ignore_errors=True)
        if bad:
            raise LabError("; ".join(bad))
        return records


class Scenario:
    name = ""
    title = ""
    goal = "zero"
    goal_text = ""
    rate = 8  # new connections per second at 1x, over all clients
    # The drain and replacement scenarios boot the .deb under systemd (when lab.py has one):
    # the unit's stop, sandbox and timeouts are part of what they test.
    boots_deb = False
    # Whether the report fails the scenario when the load generator fell behind its schedule:
    # for a zero goal, a pass on load that was sent late (after the risky moment) proves nothing.
    schedule_required = True
    streams = 4
    before_s = 10

    def __init__(self, lab, out_dir, work_dir, timings, binary, options, root=None):
        self.lab = lab
        self.root = root if self.boots_deb else None
        self.out = pathlib.Path(out_dir) / self.name
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = pathlib.Path(work_dir) / self.name
        self.timings = timings
        self.binary = binary
        self.options = options
        self.events = Events(self.out / "events.jsonl")
        self.dep = None
        self.phases = {}
        self.metrics_before = {}
        self.samples = []
        self.bounds = {"failures": None}

    def phase(self, name):
        if name != "end" and getattr(self, "clients", None):
            self.clients.check_alive()
        now = time.time()
        for p in self.phases.values():
            if p[1] is None:
                p[1] = now
        self.phases[name] = [now, None]
        self.events("phase", name, name=name)

    def snapshot(self):
        return {i: inst.metrics() for i, inst in self.dep.instances.items() if not inst.dead}

    def sample(self):
        for inst in self.dep.instances.values():
            s = inst.sample()
            if s:
                self.samples.append(s)

    def sleep(self, seconds):
        """Waits, sampling the proxies once a second."""
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            self.sample()
            time.sleep(min(1.0, left))

    def run(self):
        self.started_at = time.time()
        self.dep = Deployment(self.lab, self.work, self.timings, self.binary, self.events, root=self.root)
        self.clients = None
        try:
            self.dep.start()
            self.metrics_before = self.snapshot()
            self.clients = Clients(self.dep, self.out, self.rate * self.options.load, self.streams)
            self.phase("before")
            self.sleep(self.before_s)
            self.phase("during")
            self.during()
            self.phase("after")
            self.after()
        finally:
            # Each step on its own: one failing (or interrupted) must not skip the others.
            steps = [self._stop_clients, self._write, self.dep.stop, self.events.close, self._copy_route53]
            errors = []
            for step in steps:
                try:
                    step()
                except Exception as e:  # noqa: BLE001 (reported after the other steps ran)
                    errors.append(f"{step.__name__}: {e}")
            if errors:
                raise LabError("cleaning up: " + "; ".join(errors))

    def _stop_clients(self):
        if self.clients:
            self.expected_short = self.clients.expected_short()
            self.clients.stop()

    def _write(self):
        self.phase("end")
        after = self.snapshot() if self.dep else {}
        self.write(self.started_at, after)

    def _copy_route53(self):
        r53 = self.work / "route53.jsonl"
        (self.out / "route53.jsonl").write_bytes(r53.read_bytes() if r53.exists() else b"")

    def after(self):
        self.sleep(10)

    def announced(self):
        """Addresses Route 53 counts healthy whose holder answers /health 200 on them."""
        dep = self.dep
        r53 = dep.route53_health()
        n = 0
        for alloc, eip in dep.eip_of.items():
            inst = dep.instances.get(dep.holder.get(alloc) or "")
            if inst and not inst.dead and r53.get(eip) is True and http_get(eip, ADMIN_PORT, "/health", 1.0)[0] == 200:
                n += 1
        return n

    def track_announced(self, at_least):
        """Starts the capacity record: the lowest count of announced addresses, sampled by
        each call of the returned function (which returns it)."""
        self.bounds.update({"announced_at_least": at_least, "addresses_total": len(self.dep.eip_of)})
        lowest = [self.announced()]

        def sample():
            lowest.append(self.announced())
            self.bounds["announced_min"] = min(lowest)
            return self.bounds["announced_min"]
        sample()
        return sample

    def write(self, started, after):
        t = self.timings
        phases = {k: v for k, v in self.phases.items() if k != "end"}
        proxies = {}
        for i in set(self.metrics_before) | set(after):
            proxies[i] = {"before": self.metrics_before.get(i, {}), "after": after.get(i, {})}
        (self.out / "scenario.json").write_text(json.dumps({
            "name": self.name, "title": self.title, "goal": self.goal, "goal_text": self.goal_text,
            "scale": t.scale, "rate": self.rate * self.options.load, "streams": self.streams,
            "started": started, "ended": time.time(), "phases": phases,
            "route53": {"interval": t.r53_interval, "failure_threshold": t.r53_threshold,
                        "ttl": t.record_ttl, "checkers": 8},
            "timings": t.as_dict(), "proxies": proxies, "samples": self.samples, "bounds": self.bounds,
            "schedule_required": self.schedule_required,
            "expected_short": getattr(self, "expected_short", None),
        }, indent=1))


class Flip(Scenario):
    name = "flip"
    title = "Blue/green flip of the backend under load"
    goal_text = ("Zero client-visible failures: new connections follow the backend name to the "
                 "green ELB within its TTL, connections open to blue finish there, and blue is "
                 "taken away only after the proxies' backend.removed_grace.")

    def during(self):
        t = self.timings
        self.dep.point_backend("green")
        # The proxies follow the name within its TTL; then every new connection goes to green.
        wait_until("every proxy to follow the flip", self.all_on_green, t.elb_ttl * 3 + 10, 0.5)
        self.events("note", "every proxy resolves the backend name to the green ELB")
        # Blue stays until the proxies have retired its addresses (removed_grace), as an
        # operator deleting the old ELB after the grace would.
        self.sleep(t.removed_grace + t.elb_ttl + 2)
        self.dep.take_away("blue")

    def all_on_green(self):
        """Every proxy's backend addresses (not the retiring ones) are the green ELB's."""
        green = {f"{a}:443" for a in ELBS["green"]}
        for inst in self.dep.instances.values():
            st = inst.status()
            try:
                current = {a["address"] for a in st["backend"]["addresses"]}
            except (TypeError, KeyError):
                return False
            if current != green:
                return False
        return True


class InstanceDeath(Scenario):
    name = "instance-death"
    title = "A proxy instance dies and its Auto Scaling group replaces it"
    goal = "bounded"
    goal_text = ("Failures only on connections open to the lost instance and on new connections "
                 "sent to its address while Route 53 detects the loss and cached answers expire; "
                 "the replacement claims the same Elastic IP and turns healthy.")

    def during(self):
        t = self.timings
        dep = self.dep
        alloc = dep.allocations[0]
        victim = dep.instances[dep.holder[alloc]]
        # The bound: every stream open to it, plus every new connection in the window where a
        # client can still be sent to it: Route 53's detection (threshold x interval, plus a
        # check's connect timeout and an interval of phase) and the record's TTL, counted as if
        # every client had it cached (the worst case), plus two seconds of margin.
        window = t.r53_threshold * t.r53_interval + t.r53_connect_timeout + t.r53_interval + t.record_ttl + 2
        self.bounds = {"failures": int(self.streams + self.rate * self.options.load * window),
                       "window_s": window, "addresses": [dep.eip_of[alloc]]}
        victim.kill()
        self.sleep(t.asg_replace_after)
        new = dep.replace_dead(victim)
        wait_until(f"{new.id} to hold {dep.eip_of[alloc]}", lambda: dep.holder.get(alloc) == new.id,
                   t.eip_check_interval * 2 + 60, 0.25)
        wait_until("Route 53 to count the address healthy again", dep.serving,
                   t.r53_interval * (t.r53_threshold + 2) + 30, 0.25)
        self.events("instance_ready", f"{new.id} holds {dep.eip_of[alloc]} and is healthy", instance=new.id)


class GracefulStop(Scenario):
    boots_deb = True
    name = "graceful-stop"
    title = "Graceful stop of one instance (systemctl stop): the drain"
    goal_text = ("Zero client-visible failures: /health turns 503, Route 53 stops announcing the "
                 "address, cached answers expire within the drain delay, open connections finish "
                 "within the grace period.")

    def during(self):
        t = self.timings
        victim = self.dep.instances[self.dep.holder[self.dep.allocations[0]]]
        how = "systemctl stop static-ingress" if self.dep.root else "SIGTERM to static-ingress"
        self.events("fault", f"{how} on {victim.id}", instance=victim.id)
        eip = self.dep.eip_of[self.dep.allocations[0]]
        signalled = time.monotonic()
        victim.graceful_stop()
        # The drain, seen from outside: /health turns 503 at once (Route 53's view)...
        wait_until(f"{eip}/health to answer 503", lambda: http_get(eip, ADMIN_PORT, "/health", 1.0)[0] == 503, 5, 0.1)
        deadline = signalled + t.drain_delay + t.grace_period + 30
        while victim.proxy_pid() is not None and time.monotonic() < deadline:
            self.sample()
            time.sleep(0.2)
        took = time.monotonic() - signalled
        if victim.proxy_pid() is not None:
            raise LabError(f"static-ingress on {victim.id} still runs {took:.0f}s after the stop")
        # ...and the process stayed for the drain delay (else it did not drain at all).
        if took < t.drain_delay:
            raise LabError(f"static-ingress on {victim.id} exited {took:.1f}s after the stop, before its drain delay")
        self.events("instance_stop", f"static-ingress on {victim.id} exited {took:.1f}s after the stop",
                    instance=victim.id)
        if self.dep.route53_health().get(eip) is not False:
            raise LabError(f"Route 53 still counts {eip} healthy after the drain")


class AzPartition(Scenario):
    name = "az-partition"
    title = "One Availability Zone partitioned, then healed"
    goal = "bounded"
    goal_text = ("Failures only on connections open to the partitioned instances and on new "
                 "connections sent to their addresses while Route 53 detects the loss and cached "
                 "answers expire; after the heal, the addresses are announced again.")

    def during(self):
        t = self.timings
        dep = self.dep
        zone, bridge = "us-east-1a", "az-a"
        cut = [dep.eip_of[a] for a, i in dep.holder.items() if i and dep.instances[i].az == zone]
        window = t.r53_threshold * t.r53_interval + t.r53_connect_timeout + t.r53_interval + t.record_ttl + 2
        self.bounds = {"failures": int(self.streams + self.rate * self.options.load * window), "window_s": window,
                       "addresses": cut}
        # Policy rules in the core router: everything from the zone's subnet, and to it or to an
        # address its instances hold, is dropped without a word (as a partition does; an
        # unreachable route would answer with ICMP and fail clients faster than the real thing).
        rules = [["iif", bridge], ["to", SUBNET_A]] + [["to", f"{e}/32"] for e in cut]
        for r in rules:
            ip("rule", "add", *r, "blackhole", ns=dep.core)
        self.events("fault", f"{zone} partitioned: {', '.join(cut)} unreachable", zone=zone, addresses=cut)
        # A minute at real timings, and at least long enough for Route 53 to act.
        self.sleep(max(60 / t.scale, window * 2))
        for r in rules:
            ip("rule", "del", *r, "blackhole", ns=dep.core, check=False)
        self.events("heal", f"{zone} reachable again", zone=zone)
        wait_until("Route 53 to count every address healthy again", dep.serving,
                   t.r53_interval * (t.r53_threshold + 2) + 30, 0.25)
        self.events("note", "every address announced and served again")


class TenX(Scenario):
    schedule_required = True
    name = "10x-load"
    title = "Ten times the base load for a minute"
    goal_text = ("Zero client-visible failures at 10x the base rate, with the load generator "
                 "keeping its schedule (its lag is in the report).")

    def during(self):
        base = self.rate * self.options.load
        self.clients.set_rate(base * 10)
        self.events("note", f"rate {base:g}/s -> {base * 10:g}/s", rate=base * 10)
        self.sleep(self.options.tenx_seconds)
        self.clients.set_rate(base)
        self.events("note", f"rate back to {base:g}/s", rate=base)


class Soak(Scenario):
    name = "soak"
    title = "Soak: steady load, proxies sampled"
    goal_text = ("Zero client-visible failures, and each proxy's memory, descriptors and CPU flat "
                 "over the run (the report's flatness rule).")

    def during(self):
        self.sleep(self.options.soak_minutes * 60)


class FleetReplacement(Scenario):
    boots_deb = True
    name = "fleet-replacement"
    title = "Fleet replacement: a new stack takes the Elastic IPs by handoff, the old one is deleted"
    goal = "zero"
    goal_text = ("No client-visible failure for connections shorter than the grace period while "
                 "a new fleet stack takes over every Elastic IP by handoff (the old instances "
                 "drain, then move their address), with at least N - K addresses announced by "
                 "Route 53 and served by a healthy instance throughout (K = "
                 "eip.handoffs_at_once, 1)")
    # eip.handoffs_at_once: the fleet template's default.
    at_once = 1

    def during(self):
        t = self.timings
        dep = self.dep
        old = set(dep.instances)
        total = len(dep.eip_of)
        sample = self.track_announced(total - self.at_once)
        started = time.monotonic()
        new = dep.deploy_fleet("static-fleet-2", generation=2)
        self.events("note", f"fleet stack static-fleet-2 deployed: {len(new)} new instances",
                    instances=[i.id for i in new])
        newer = {i.id for i in new}

        def moved():
            sample()
            return set(dep.holder.values()) <= newer

        # One address at a time: each takes the holder's check, the turn's settle, the drain
        # delay, at most the grace, and the move; the first also the new instances' boot.
        per_address = t.eip_check_interval + 2 + t.drain_delay + t.grace_period + 5
        wait_until("the new fleet to hold every address", moved, 60 + total * per_address, 0.25)
        self.events("note", "the new fleet holds every address")
        wait_until("Route 53 to count every address healthy", lambda: (moved(), dep.serving())[1],
                   t.r53_interval * (t.r53_threshold + 2) + 30, 0.25)
        self.bounds["took_s"] = time.monotonic() - started
        # CloudFormation deletes the old stack: its groups terminate their instances, which
        # shut down (SIGTERM to the proxy, as systemd does at shutdown).
        dep.delete_fleet("static-fleet-1", [dep.instances[i] for i in old if i in dep.instances])


class AsgTermination(Scenario):
    boots_deb = True
    name = "asg-termination"
    title = "Auto Scaling replaces an instance: launch first, handoff, then terminate"
    goal = "zero"
    goal_text = ("No client-visible failure for connections shorter than the grace period while "
                 "an instance's Auto Scaling group replaces it as the fleet template sets it up "
                 "(instance maintenance policy: launch before terminating; termination lifecycle "
                 "hook): the new instance asks for the address, the old one drains and hands it "
                 "over, then is terminated; at least N - 1 addresses announced throughout")

    def during(self):
        t = self.timings
        dep = self.dep
        sample = self.track_announced(len(dep.eip_of) - 1)
        started = time.monotonic()
        alloc = sorted(dep.eip_of)[0]
        old = dep.instances[dep.holder[alloc]]
        new = dep.retire(old)
        wait_until("the new instance to hold the address", lambda: (sample(), dep.holder.get(alloc) == new.id)[1],
                   60 + t.eip_check_interval + 2 + t.drain_delay + t.grace_period + 10, 0.25)
        self.events("note", f"{new.id} holds {dep.eip_of[alloc]}")
        dep.terminate_retiring(old)
        wait_until("Route 53 to count every address healthy", lambda: (sample(), dep.serving())[1],
                   t.r53_interval * (t.r53_threshold + 2) + 30, 0.25)
        self.bounds["took_s"] = time.monotonic() - started
        # The hook holds it in Terminating:Wait; the lab does not wait out the whole heartbeat
        # timeout: the proxy has drained (a handed-over address needs no drain delay).
        self.sleep(3)
        dep.finish_retire(old)


SCENARIOS = {s.name: s for s in (InstanceDeath, Flip, AzPartition, TenX, Soak, FleetReplacement, AsgTermination,
                                  GracefulStop)}
# The order: 1 instance death, 2 flip, 3 partition, 4 10x, 5 soak, 6 replacement, 7 stop;
# then issue 12's Auto Scaling replacement.
ORDER = ["instance-death", "flip", "az-partition", "10x-load", "soak", "fleet-replacement", "asg-termination",
         "graceful-stop"]
SHORT = ["flip", "instance-death", "asg-termination"]
