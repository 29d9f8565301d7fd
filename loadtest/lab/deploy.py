"""One lab deployment: the network, moto with the real CloudFormation templates deployed into
it, the instances of the fleet's Auto Scaling groups (each a namespace running the real
binary), the Elastic IP and Auto Scaling stand-ins, the blue and green ELBs, the VPC resolver,
the Route 53 simulator and the client namespaces.

Addresses (all in 198.18.0.0/15, see netns.py):
    198.18.1.0/24    ctl: the orchestrator (this process) and moto (198.18.1.2:5000)
    198.18.2.0/24    r53: the Route 53 simulator's DNS (.2) and its checkers (.10 ...)
    198.18.3.0/24    dns: the VPC resolver (.2), dnsmasq serving the backend name
    198.18.4.0/24    blue ELB (.2 .3 .4), 198.18.5.0/24 green ELB (.2 .3 .4)
    198.18.8.0/24 .. client namespaces (.2), one caching stub resolver each
    198.18.64.0/24   subnet A (us-east-1a), 198.18.65.0/24 subnet B (us-east-1b): the VPC's
                     subnets in moto, so moto's private IPs are the instances' addresses
    198.19.0.1 ..    the Elastic IPs as clients see them (moto hands out 127.x addresses of its
                     own; ADDRESS_MAP below maps them, in the addresses stack's order)
The core namespace routes between all of them; an Elastic IP is a /32 route in core to the
instance holding it (and the address on that instance's interface), moved by the controller
when moto's association changes, as the VPC moves it.
"""

import base64
import http.client
import json
import pathlib
import re
import shutil
import signal
import sys
import threading
import time

import yaml

import netns
from netns import LabError, ip
from services import Proc, dns_answers, dnsmasq_stub, dnsmasq_vpc_resolver, make_ca, nginx_elb, wait_until

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "packaging"))
import fleet  # noqa: E402  (the packaging tests' moto helpers: one deploy path for both)
import nspawn  # noqa: E402  (and their container helpers)

LAB_DIR = pathlib.Path(__file__).resolve().parent
ZONE = "lab.example."
RECORD = "static.lab.example"
BACKEND_NAME = "api.lab.example"
MOTO = ("198.18.1.2", 5000)
R53_DNS = "198.18.2.2"
VPC_RESOLVER = "198.18.3.2"
ELBS = {"blue": ["198.18.4.2", "198.18.4.3", "198.18.4.4"], "green": ["198.18.5.2", "198.18.5.3", "198.18.5.4"]}
SUBNETS = {"us-east-1a": ("198.18.64.0/24", "198.18.64.1", "az-a"), "us-east-1b": ("198.18.65.0/24", "198.18.65.1", "az-b")}
ADMIN_PORT = 9001  # the template's HealthPort: /health and /live only
OPERATOR_PORT = 9002  # its OperatorPort (admin.operator_listen): /status and /metrics
# The config drop-in the launch template's user data writes (cloudformation/fleet.yaml).
DROP_IN = pathlib.PurePosixPath("/etc/static-ingress/static-ingress.toml.d/50-launch-template.toml")


def eip_lab_address(n):
    """The lab address of the addresses stack's n-th Elastic IP (1-based)."""
    return f"198.19.0.{n}"


def prepare_root(work, deb):
    """The root file system the .deb scenarios' instances boot: the container test's Debian 13
    (debootstrap, cached per machine: run this before leaving the host's network), with the .deb
    installed by dpkg as on the AMI. Made once per run; each instance boots it read-only under a
    tmpfs overlay of its own."""
    cached = netns.run(str(ROOT / "scripts/debian-rootfs.sh"), "trixie", timeout=1000).stdout.split()[-1]
    root = pathlib.Path(work) / "rootfs"
    netns.run("cp", "-a", "--reflink=auto", cached, str(root), timeout=300)
    shutil.copy(deb, root / "root/static-ingress.deb")
    netns.run("systemd-nspawn", "--quiet", "-D", str(root), "--register=no", "--keep-unit",
              "--private-network", "dpkg", "-i", "/root/static-ingress.deb", timeout=300)
    (root / "root/static-ingress.deb").unlink()
    return root


class Events:
    """events.jsonl: what the orchestrator did and saw, flushed at every line."""

    def __init__(self, path):
        self._f = open(path, "a")
        self._lock = threading.Lock()

    def __call__(self, event, detail="", **fields):
        rec = {"t": time.time(), "event": event, "detail": detail, **fields}
        with self._lock:
            self._f.write(json.dumps(rec) + "\n")
            self._f.flush()
        print(f"[lab] {event}: {detail}", file=sys.stderr, flush=True)

    def close(self):
        self._f.close()


class Timings:
    """Every timing derived from Route 53's and the TTLs, divided by `scale` (1 = real)."""

    def __init__(self, scale):
        self.scale = scale
        self.r53_interval = 10 / scale  # the template's RequestInterval
        self.r53_threshold = 3  # FailureThreshold (a count, not scaled)
        self.r53_connect_timeout = max(10 / scale, 0.5)
        self.r53_response_timeout = max(2 / scale, 0.5)
        self.record_ttl = max(round(60 / scale), 1)  # the template's RecordTtl
        self.elb_ttl = max(round(60 / scale), 1)  # an ELB's alias record
        self.drain_delay = 120 / scale
        self.grace_period = 120 / scale
        self.eip_check_interval = 10 / scale
        self.handoff_announce_delay = 40 / scale
        self.removed_grace = 300 / scale
        # The Auto Scaling stand-in replaces an instance that stopped answering EC2's status
        # checks after this long (AWS: about a minute for the status check to fail, then the
        # group's next health check).
        self.asg_replace_after = 60 / scale

    def proxy_env(self):
        ms = lambda s: f"{max(int(s * 1000), 1)}ms"  # noqa: E731
        return {
            "STATIC_INGRESS_LIFECYCLE_DRAIN_DELAY": ms(self.drain_delay),
            "STATIC_INGRESS_LIFECYCLE_GRACE_PERIOD": ms(self.grace_period),
            "STATIC_INGRESS_EIP_CHECK_INTERVAL": ms(self.eip_check_interval),
            "STATIC_INGRESS_EIP_HANDOFF_ANNOUNCE_DELAY": ms(self.handoff_announce_delay),
            "STATIC_INGRESS_BACKEND_REMOVED_GRACE": ms(self.removed_grace),
        }

    def as_dict(self):
        return {k: v for k, v in vars(self).items()}


def http_get(host, port, path, timeout_s=2.0):
    """(status, body) of a plain HTTP GET, or (None, error text)."""
    try:
        c = http.client.HTTPConnection(host, port, timeout=timeout_s)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode(errors="replace")
        c.close()
        return r.status, body
    except (OSError, http.client.HTTPException) as e:
        return None, f"{type(e).__name__}: {e}"


def parse_metrics(text):
    """Prometheus text -> {sample name with labels: value} for the static_ingress_ and
    process_ families."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        if not (line.startswith("static_ingress_") or line.startswith("process_")):
            continue
        try:
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
        except ValueError:
            continue
    return out


class Instance:
    """One EC2 instance of the fleet: a namespace with its private address, its instance
    metadata stand-in and the static-ingress process."""

    def __init__(self, dep, desc):
        self.dep = dep
        self.id = desc["InstanceId"]
        self.private_ip = desc["PrivateIpAddress"]
        self.az = desc["Placement"]["AvailabilityZone"]
        self.tags = {t["Key"]: t["Value"] for t in desc.get("Tags", [])}
        self.group = self.tags.get("aws:autoscaling:groupName")
        self.launch_template = (self.tags.get("aws:ec2launchtemplate:id"), self.tags.get("aws:ec2launchtemplate:version"))
        self.ns = None
        self.core_if = "v" + self.id[-12:]
        self.dir = dep.dir / "instances" / self.id
        self.imds = None
        self.proxy = None
        self.dead = False
        self.booted = False  # its namespace and link exist

    def set_lifecycle_state(self, state):
        """What instance metadata says Auto Scaling decided for the instance (moto has no
        lifecycle hooks: the lab plays the group's part)."""
        path = self.dir / "lifecycle-state"
        path.with_suffix(".new").write_text(state + "\n")
        path.with_suffix(".new").rename(path)

    def boot(self):
        dep = self.dep
        self.dir.mkdir(parents=True, exist_ok=True)
        cidr, gateway, bridge = SUBNETS[self.az]
        prefix_len = cidr.split("/")[1]
        self.ns = dep.lab.add(f"i{self.id[2:]}", resolver=VPC_RESOLVER)
        dep.lab.veth(dep.core, self.core_if, self.ns, "eth0")
        ip("link", "set", self.core_if, "master", bridge, ns=dep.core)
        ip("addr", "add", f"{self.private_ip}/{prefix_len}", "dev", "eth0", ns=self.ns)
        ip("route", "add", str(netns.LAB_NET), "via", gateway, ns=self.ns)
        # The VPC has no ARP broadcast: it knows where every instance is. A static neighbour
        # entry does the same here, so packets to a dead instance vanish as they do on AWS
        # (no "host unreachable" from a failed ARP).
        mac = json.loads(ip("-j", "link", "show", "eth0", ns=self.ns).stdout)[0]["address"]
        ip("neigh", "replace", self.private_ip, "lladdr", mac, "dev", bridge, "nud", "permanent", ns=dep.core)
        ip("addr", "add", "169.254.169.254/32", "dev", "lo", ns=self.ns)
        dep.lab.check_isolated([self.ns])
        self.booted = True
        self.set_lifecycle_state("InService")
        self.imds = Proc(f"imds-{self.id}", self.ns, [
            sys.executable, ROOT / "tests/packaging/imds.py", "--instance-id", self.id,
            "--tags-json", json.dumps(self.tags), "--zone", self.az,
            "--host", "169.254.169.254", "--port", "80",
            "--lifecycle-state-file", self.dir / "lifecycle-state",
        ], self.dir / "imds.log", ready="ready")
        drop_in = self.dir / "static-ingress.toml.d"
        drop_in.mkdir(exist_ok=True)
        (drop_in / DROP_IN.name).write_text(self.user_data_drop_in())
        moto = f"http://{MOTO[0]}:{MOTO[1]}"
        lab = {"STATIC_INGRESS_EIP_EC2_ENDPOINT": moto, "STATIC_INGRESS_EIP_AUTOSCALING_ENDPOINT": moto,
               **dep.timings.proxy_env()}
        if dep.root:
            self.boot_container(drop_in, lab)
        else:
            # The .deb's config file beside the drop-in directory, as on the instance.
            config = self.dir / "static-ingress.toml"
            config.write_text((ROOT / "deb/static-ingress.toml").read_text())
            env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(self.dir), **lab}
            (self.dir / "env").write_text("".join(f"{k}={v}\n" for k, v in sorted(env.items())))
            self.proxy = Proc(f"static-ingress-{self.id}", self.ns, [
                dep.binary, "run", "--config", config,
            ], self.dir / "static-ingress.log", env=env)
        dep.events("instance_start", f"{self.id} in {self.az} ({self.group})"
                   + (" booting the .deb" if dep.root else ""), instance=self.id, az=self.az)

    def boot_container(self, drop_in, lab):
        """The instance as shipped: the .deb's root file system booted with systemd-nspawn in
        the instance's namespace, the unit started by systemd with its sandbox, the launch
        template's config drop-in in place and the lab's settings (the EC2 endpoint, the
        scaled timings) in a unit drop-in."""
        dropin = self.dir / "dropin"
        dropin.mkdir(exist_ok=True)
        (dropin / "lab.conf").write_text("# The lab's settings (loadtest/lab/deploy.py)\n[Service]\n"
                                         + "".join(f"Environment={k}={v}\n" for k, v in sorted(lab.items())))
        self.proxy = Proc(f"nspawn-{self.id}", None, [
            "systemd-nspawn", "--quiet", "-D", self.dep.root, "-M", f"si-{self.id[-12:]}",
            "--register=no", "--keep-unit", "--volatile=overlay",
            f"--network-namespace-path=/run/netns/{self.ns}", "--boot", "--console=passive",
            f"--bind-ro={drop_in}:{DROP_IN.parent}",
            f"--bind-ro={dropin}:/etc/systemd/system/static-ingress.service.d",
            f"--bind-ro={netns.ETC_NETNS / self.ns / 'resolv.conf'}:/etc/resolv.conf",
        ], self.dir / "nspawn.log")
        self.container = True

    def proxy_pid(self):
        """The static-ingress process: the one the lab started, or the unit's main process
        inside the container."""
        if not self.proxy or not self.proxy.alive():
            return None
        if not getattr(self, "container", False):
            return self.proxy.pid
        for pid in netns.namespace_pids(self.ns):
            try:
                if pathlib.Path(f"/proc/{pid}/comm").read_text().strip() == "static-ingress":
                    return pid
            except OSError:
                pass
        return None

    def graceful_stop(self):
        """`systemctl stop static-ingress` inside the container, or SIGTERM to the process the
        lab started (what systemd sends)."""
        if getattr(self, "container", False):
            pid = self.proxy_pid()
            leader = self.leader()
            if leader is None:
                raise LabError(f"{self.id}: the container has no systemd")
            netns.run("nsenter", "-t", str(leader), "-m", "-u", "-i", "-n", "-p", "--",
                      "systemctl", "stop", "--no-block", "static-ingress.service")
            return pid
        self.proxy.signal(signal.SIGTERM)
        return self.proxy.pid

    def leader(self):
        """The container's PID 1 (systemd), a child of systemd-nspawn."""
        return nspawn.container_leader(self.proxy.pid)

    def user_data_drop_in(self):
        """What cloud-init would write from the launch template's user data (moto has no
        cloud-init): the config drop-in's text."""
        lt_id, version = self.launch_template
        ec2 = self.dep.aws["ec2"]
        versions = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=[version])
        data = versions["LaunchTemplateVersions"][0]["LaunchTemplateData"]
        doc = yaml.safe_load(base64.b64decode(data["UserData"]).decode())
        for f in doc.get("write_files", []):
            if f["path"] == str(DROP_IN):
                return f["content"]
        raise LabError(f"{self.id}: the launch template's user data writes no {DROP_IN}")

    def admin(self, path, timeout_s=2.0):
        """A GET on the operator's listener (everything); /health is also on the health port."""
        return http_get(self.private_ip, OPERATOR_PORT, path, timeout_s)

    def metrics(self):
        status, body = self.admin("/metrics")
        return parse_metrics(body) if status == 200 else {}

    def status(self):
        status, body = self.admin("/status")
        try:
            return json.loads(body) if status == 200 else None
        except ValueError:
            return None

    def healthy(self):
        """What Route 53 asks: /health on the health port."""
        return http_get(self.private_ip, ADMIN_PORT, "/health", 1.0)[0] == 200

    def kill(self):
        """The instance dies: every process in it killed at once (SIGKILL: nothing drains),
        its network link down."""
        self.dead = True
        # The link first: a dead machine sends nothing, not even the FINs and resets the
        # kernel would send for the killed process's sockets.
        ip("link", "set", "eth0", "down", ns=self.ns, check=False)
        netns.kill_namespace_processes(self.ns, grace_s=0, sig=signal.SIGKILL)
        self.dep.events("fault", f"{self.id} killed, its link down", instance=self.id)

    def sample(self):
        """RSS, descriptors and CPU seconds of the proxy process (the machine's /proc: the lab
        shares its PID namespace), or None once it is gone."""
        pid = self.proxy_pid()
        if pid is None:
            return None
        try:
            status = pathlib.Path(f"/proc/{pid}/status").read_text()
            rss = int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) * 1024
            fds = len(list(pathlib.Path(f"/proc/{pid}/fd").iterdir()))
            stat = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu = (int(stat[11]) + int(stat[12])) / 100.0
        except (OSError, AttributeError, IndexError, ValueError):
            return None
        return {"t": time.time(), "instance": self.id, "rss_bytes": rss, "fds": fds, "cpu_seconds": cpu}

    def stop(self):
        for p in (self.proxy, self.imds):
            if p:
                p.stop(grace_s=self.dep.timings.drain_delay + self.dep.timings.grace_period + 10)


class Deployment:
    def __init__(self, lab, directory, timings, binary, events, clients=4, root=None):
        self.lab = lab
        self.root = root
        self.dir = pathlib.Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.timings = timings
        self.binary = str(binary)
        self.events = events
        self.n_clients = clients
        self.core = None
        self.procs = []
        self.instances = {}  # instance id -> Instance
        self.moto = None
        self.aws = None
        self.allocations = []  # allocation ids in the addresses stack's order
        self.address_map = {}  # moto's public IP -> lab address
        self.eip_of = {}  # allocation id -> lab address
        self.holder = {}  # allocation id -> instance id the lab routes it to (None: nobody)
        self.fleets = []
        self.route53 = None
        self.stop_watch = threading.Event()
        self.watch_thread = None
        self.ca = None
        self.stream_rate = 128 * 1024
        self.active_elb = "blue"
        self.elb_procs = {}
        self.client_ns = []

    # ---- network ----
    def build_network(self):
        lab = self.lab
        self.core = lab.add("core")
        lab.sysctl(self.core, "net.ipv4.ip_forward", 1)
        lab.sysctl(self.core, "net.ipv4.conf.all.rp_filter", 0)
        lab.sysctl(self.core, "net.ipv4.conf.default.rp_filter", 0)
        for cidr, gateway, bridge in SUBNETS.values():
            ip("link", "add", bridge, "type", "bridge", ns=self.core)
            ip("addr", "add", f"{gateway}/{cidr.split('/')[1]}", "dev", bridge, ns=self.core)
            ip("link", "set", bridge, "up", ns=self.core)
        roles = [("ctl", 1, ["198.18.1.2"]), ("r53", 2, [R53_DNS] + [f"198.18.2.{10 + i}" for i in range(8)]),
                 ("dns", 3, [VPC_RESOLVER]), ("blue", 4, ELBS["blue"]), ("green", 5, ELBS["green"])]
        roles += [(f"client{i}", 8 + i, [f"198.18.{8 + i}.2"]) for i in range(self.n_clients)]
        for role, n, addrs in roles:
            if role == "ctl":
                ns = self.lab.name("ctl")  # made by lab.py, which runs in it
                # The previous scenario's link goes with its core namespace, but the kernel
                # cleans a deleted namespace up asynchronously: do not wait for it.
                ip("link", "del", "eth0", ns=ns, check=False)
                wait_until("the previous link to go", lambda: ip("link", "show", "eth0", ns=ns, check=False).returncode != 0, 10)
            else:
                resolver = f"198.18.{n}.2" if role.startswith("client") else None
                ns = lab.add(role, resolver=resolver)
            lab.veth(self.core, f"c-{role}", ns, "eth0")
            ip("addr", "add", f"198.18.{n}.1/24", "dev", f"c-{role}", ns=self.core)
            for a in addrs:
                ip("addr", "add", f"{a}/24", "dev", "eth0", ns=ns)
            ip("route", "add", str(netns.LAB_NET), "via", f"198.18.{n}.1", ns=ns)
            if role.startswith("client"):
                self.client_ns.append((ns, addrs[0]))
        for n in range(1, 5):
            ip("route", "add", "blackhole", f"{eip_lab_address(n)}/32", ns=self.core)
        lab.check_isolated()
        self.events("note", "network built and checked: no lab namespace routes outside 198.18.0.0/15")

    # ---- AWS ----
    def start_aws(self):
        self.moto = fleet.MotoServer(moto_server=str(pathlib.Path(sys.executable).parent / "moto_server"),
                                     log_path=self.dir / "moto.log", host=MOTO[0], port=MOTO[1])
        self.moto.__enter__()
        self.aws = self.moto.clients()
        ec2 = self.aws["ec2"]
        vpc = ec2.create_vpc(CidrBlock="198.18.64.0/18")["Vpc"]["VpcId"]
        self.subnets = {}
        for az, (cidr, _, _) in SUBNETS.items():
            self.subnets[az] = ec2.create_subnet(VpcId=vpc, CidrBlock=cidr, AvailabilityZone=az)["Subnet"]["SubnetId"]
        self.vpc = vpc
        zone = fleet.hosted_zone(self.aws, ZONE)
        out = fleet.deploy_addresses(self.aws, "static-addresses", HostedZoneId=zone, RecordName=RECORD,
                                     RecordTtl=60)
        self.allocations = [out[f"AllocationId{n}"] for n in range(1, 5)]
        for n in range(1, 5):
            self.address_map[out[f"PublicIp{n}"]] = eip_lab_address(n)
            self.eip_of[self.allocations[n - 1]] = eip_lab_address(n)
        self.holder = {a: None for a in self.allocations}
        self.zone = zone
        self.events("note", f"addresses stack deployed into moto: {self.address_map}")

    def deploy_fleet(self, stack, generation):
        fleet.deploy_fleet(self.aws, stack, "static-addresses", backend=f"{BACKEND_NAME}:443",
                           generation=generation, VpcId=self.vpc,
                           SubnetIdA=self.subnets["us-east-1a"], SubnetIdB=self.subnets["us-east-1b"])
        self.fleets.append(stack)
        self.events("note", f"fleet stack {stack} (generation {generation}) deployed into moto")
        return self.boot_new_instances()

    def running_fleet_instances(self):
        """Every running instance of every Auto Scaling group of the lab's fleet stacks."""
        found = []
        for stack in self.fleets:
            for inst in fleet.instances(self.aws, stack):
                if inst["state"] == "running":
                    found.append(inst["id"])
        if not found:
            return []
        descs = []
        for res in self.aws["ec2"].describe_instances(InstanceIds=found)["Reservations"]:
            descs.extend(res["Instances"])
        return descs

    def boot_new_instances(self):
        """Boots a namespace for every running instance moto has that the lab does not."""
        booted = []
        for desc in self.running_fleet_instances():
            if desc["InstanceId"] not in self.instances:
                inst = Instance(self, desc)
                self.instances[inst.id] = inst
                inst.boot()
                booted.append(inst)
        return booted

    # ---- the Elastic IPs, as the VPC moves them ----
    def watch_addresses(self):
        """Moves each Elastic IP to the namespace of the instance moto says holds it."""
        self.watch_thread = threading.Thread(target=self._watch, name="eip-watch", daemon=True)
        self.watch_thread.start()

    def _watch(self):
        while not self.stop_watch.wait(0.25):
            try:
                found = fleet.addresses(self.aws, self.allocations)
                for alloc, rec in found.items():
                    self.route_address(alloc, rec.get("InstanceId") or None)
            except Exception as e:  # noqa: BLE001 (moto busy, an instance going away): next tick
                print(f"[lab] address watch: {e}", file=sys.stderr)

    def watching(self):
        return self.watch_thread is not None and self.watch_thread.is_alive()

    def route_address(self, alloc, instance_id):
        if self.holder.get(alloc) == instance_id:
            return
        eip = self.eip_of[alloc]
        old = self.instances.get(self.holder.get(alloc) or "")
        new = self.instances.get(instance_id or "")
        if new and not new.booted:
            return  # its namespace is not there yet: the next tick moves the address
        if old and old.booted and old.ns in netns.existing():
            ip("addr", "del", f"{eip}/32", "dev", "eth0", ns=old.ns, check=False)
        if new and not new.dead:
            # `replace`: the address may be there already from a move that failed half-way.
            ip("addr", "replace", f"{eip}/32", "dev", "eth0", ns=new.ns)
            bridge = SUBNETS[new.az][2]
            ip("route", "replace", f"{eip}/32", "via", new.private_ip, "dev", bridge, ns=self.core)
        else:
            # Associated with an instance that is gone (or with nobody): packets are dropped.
            ip("route", "replace", "blackhole", f"{eip}/32", ns=self.core)
        self.holder[alloc] = instance_id
        self.events("eip_move", f"{eip} ({alloc}) -> {instance_id or 'nobody'}", address=eip,
                    allocation=alloc, instance=instance_id,
                    previous=old.id if old else None)

    # ---- the Auto Scaling controller's part moto does not play ----
    def replace_dead(self, inst):
        """What the Auto Scaling group does once EC2 reports the instance impaired: terminate
        it (moto then launches a replacement), and what EC2 does on termination: drop its
        Elastic IP association (moto keeps it). Boots the replacement; returns it."""
        asg = self.aws["autoscaling"]
        asg.terminate_instance_in_auto_scaling_group(InstanceId=inst.id, ShouldDecrementDesiredCapacity=False)
        for a in self.aws["ec2"].describe_addresses(Filters=[{"Name": "instance-id", "Values": [inst.id]}])["Addresses"]:
            self.aws["ec2"].disassociate_address(AssociationId=a["AssociationId"])
        self.events("note", f"Auto Scaling stand-in: {inst.id} terminated (address association dropped)",
                    instance=inst.id)
        self.lab_remove_instance(inst)
        new = wait_until("the group's replacement instance", self.boot_new_instances, 30, 0.5)
        return new[0]

    def retire(self, inst):
        """An Auto Scaling replacement with the fleet template's instance maintenance policy
        (launch before terminating) and termination lifecycle hook: the group launches a new
        instance (booted here), waits for it to be in service, then sets the old one's target
        lifecycle state to Terminated and holds it in Terminating:Wait until the hook's
        heartbeat timeout. Returns the new instance; the caller waits, then calls
        `finish_retire`."""
        asg = self.aws["autoscaling"]
        asg.update_auto_scaling_group(AutoScalingGroupName=inst.group, MaxSize=2, DesiredCapacity=2)
        new = wait_until("the group's new instance", self.boot_new_instances, 30, 0.5)[0]
        self.events("note", f"Auto Scaling stand-in: {new.id} launched to replace {inst.id}", instance=new.id)
        return new

    def terminate_retiring(self, inst):
        """The new instance is in service: Auto Scaling marks the old one Terminated."""
        inst.set_lifecycle_state("Terminated")
        self.events("note", f"Auto Scaling stand-in: {inst.id} Terminating:Wait (target lifecycle state Terminated)",
                    instance=inst.id)

    def finish_retire(self, inst):
        """The hook's heartbeat timeout passed (CONTINUE): the instance terminates."""
        asg = self.aws["autoscaling"]
        asg.terminate_instance_in_auto_scaling_group(InstanceId=inst.id, ShouldDecrementDesiredCapacity=True)
        asg.update_auto_scaling_group(AutoScalingGroupName=inst.group, MaxSize=1, DesiredCapacity=1)
        for a in self.aws["ec2"].describe_addresses(Filters=[{"Name": "instance-id", "Values": [inst.id]}])["Addresses"]:
            self.aws["ec2"].disassociate_address(AssociationId=a["AssociationId"])
        self.lab_remove_instance(inst)
        self.events("note", f"Auto Scaling stand-in: {inst.id} terminated", instance=inst.id)

    def delete_fleet(self, stack, instances):
        """Deletes a fleet stack in moto and shuts its instances down: SIGTERM to each proxy
        (systemd's stop at shutdown, so the drain runs), all at once, as the groups terminate
        them together; moto's lingering associations are dropped as EC2 drops them."""
        for inst in instances:
            if inst.proxy:
                inst.proxy.signal(signal.SIGTERM)
        self.events("instance_stop", f"SIGTERM to the {len(instances)} instances of {stack}",
                    instances=[i.id for i in instances])
        fleet.delete_stack(self.aws, stack)
        self.fleets.remove(stack)
        for a in self.aws["ec2"].describe_addresses()["Addresses"]:
            if a.get("InstanceId") in {i.id for i in instances} and a.get("AssociationId"):
                self.aws["ec2"].disassociate_address(AssociationId=a["AssociationId"])
        # The drain runs to its end (a second SIGTERM would cut it short).
        bound = time.monotonic() + self.timings.drain_delay + self.timings.grace_period + 10
        for inst in instances:
            if inst.proxy:
                inst.proxy.wait(max(bound - time.monotonic(), 0.1))
        for inst in instances:
            self.lab_remove_instance(inst)
        self.events("note", f"fleet stack {stack} deleted; its instances terminated")

    def lab_remove_instance(self, inst):
        inst.stop()
        if inst.ns:
            netns.delete(inst.ns)
            self.lab.names.remove(inst.ns)
        ip("neigh", "del", inst.private_ip, "dev", SUBNETS[inst.az][2], ns=self.core, check=False)
        del self.instances[inst.id]

    # ---- backends ----
    def start_backends(self):
        self.ca, cert, key = make_ca(self.dir / "pki", [RECORD, BACKEND_NAME])
        for name, addrs in ELBS.items():
            self.elb_procs[name] = nginx_elb(name, self.lab.name(name), addrs, self.dir, cert, key, self.stream_rate)
        self.hosts_file = self.dir / "vpc-hosts"
        self.point_backend("blue", event=False)
        p = dnsmasq_vpc_resolver(self.lab.name("dns"), VPC_RESOLVER, self.hosts_file, self.timings.elb_ttl, self.dir)
        self.procs.append(p)
        self.vpc_resolver = p
        wait_until("the VPC resolver to answer", lambda: dns_answers(VPC_RESOLVER, BACKEND_NAME), 15)

    def point_backend(self, elb, event=True):
        """Points the backend name at one ELB's addresses (the blue/green flip)."""
        self.hosts_file.write_text("".join(f"{a} {BACKEND_NAME}\n" for a in ELBS[elb]))
        self.active_elb = elb
        if event:
            self.vpc_resolver.signal(signal.SIGHUP)
            self.events("flip", f"{BACKEND_NAME} -> {elb} ELB ({', '.join(ELBS[elb])})", elb=elb)

    def take_away(self, elb):
        """The ELB is deleted: its nginx stopped and its addresses gone."""
        p = self.elb_procs.pop(elb)
        p.stop(grace_s=2)
        ip("link", "set", "eth0", "down", ns=self.lab.name(elb), check=False)
        self.events("note", f"{elb} ELB taken away", elb=elb)

    # ---- Route 53 ----
    def route53_config(self):
        r53 = self.aws["route53"]
        t = self.timings
        checks = []
        for hc in r53.list_health_checks()["HealthChecks"]:
            cfg = hc["HealthCheckConfig"]
            checks.append({
                "id": hc["Id"], "ip": self.address_map[cfg["IPAddress"]], "port": cfg["Port"],
                "path": cfg["ResourcePath"],
                "interval": cfg["RequestInterval"] / t.scale, "failure_threshold": cfg["FailureThreshold"],
                "connect_timeout": t.r53_connect_timeout, "response_timeout": t.r53_response_timeout,
            })
        records = []
        for rr in r53.list_resource_record_sets(HostedZoneId=self.zone)["ResourceRecordSets"]:
            if rr["Type"] != "A" or "SetIdentifier" not in rr:
                continue
            records.append({
                "name": rr["Name"].rstrip(".") + ".", "ttl": max(round(rr["TTL"] / t.scale), 1),
                "set_id": rr["SetIdentifier"], "ip": self.address_map[rr["ResourceRecords"][0]["Value"]],
                "weight": rr["Weight"], "health_check": rr.get("HealthCheckId"),
            })
        return {
            "checkers": [f"198.18.2.{10 + i}" for i in range(8)], "health_checks": checks, "records": records,
            "dns_listen": [R53_DNS, 53], "log": str(self.dir / "route53.jsonl"), "healthy_fraction": 0.18,
        }

    def start_route53(self):
        cfg = self.dir / "route53.json"
        cfg.write_text(json.dumps(self.route53_config(), indent=1))
        self.route53 = Proc("route53", self.lab.name("r53"), [sys.executable, LAB_DIR / "route53.py", "--config", cfg],
                            self.dir / "route53.log", ready="ready")
        self.procs.append(self.route53)
        for ns, addr in self.client_ns:
            self.procs.append(dnsmasq_stub(ns, addr, R53_DNS, self.dir / f"stub-{ns.rsplit('-', 1)[1]}.log"))

    def route53_health(self):
        """The simulator's latest view: lab address -> healthy, from its log."""
        view = {}
        try:
            lines = (self.dir / "route53.jsonl").read_text().splitlines()
        except OSError:
            return view
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("event") == "health":
                view[rec["ip"]] = rec["healthy"]
            elif rec.get("event") == "start":
                checks = rec.get("health_checks", {})
                for hc in checks.values() if isinstance(checks, dict) else checks:
                    view[hc["ip"]] = hc["healthy"]
        return view

    # ---- the whole thing ----
    def start(self, generation=1):
        if self.root:
            self.events("note", "instances boot the .deb with systemd-nspawn")
        self.build_network()
        self.start_aws()
        self.start_backends()
        self.watch_addresses()
        self.deploy_fleet("static-fleet-1", generation)
        self.start_route53()
        self.wait_ready()

    def serving(self):
        """Every Elastic IP is associated with a live lab instance that answers /health 200 on
        that address, and the Route 53 simulator counts every address healthy."""
        if not self.watching():
            raise LabError("the Elastic IP watch stopped")
        r53 = self.route53_health()
        for alloc, eip in self.eip_of.items():
            inst = self.instances.get(self.holder.get(alloc) or "")
            if not inst or inst.dead or http_get(eip, ADMIN_PORT, "/health", 1.0)[0] != 200:
                return False
            if r53.get(eip) is not True:
                return False
        return True

    def wait_ready(self, timeout_s=None):
        t = self.timings
        timeout_s = timeout_s or 60 + 3 * t.r53_interval * t.r53_threshold
        wait_until("every Elastic IP held and healthy", self.serving, timeout_s, 0.25)
        self.events("note", "fleet ready: every Elastic IP held by a healthy instance")

    def stop(self):
        # Route 53 first, so that its log ends with the fleet as the scenario left it, not with
        # the teardown's stopped proxies.
        if self.route53:
            self.route53.stop(grace_s=3)
        self.stop_watch.set()
        if self.watch_thread:
            self.watch_thread.join(timeout=5)
        for inst in list(self.instances.values()):
            for p in (inst.proxy, inst.imds):
                if p:
                    p.stop(grace_s=2)
        for p in list(self.elb_procs.values()) + self.procs:
            p.stop(grace_s=3)
        if self.moto:
            self.moto.__exit__(None, None, None)
