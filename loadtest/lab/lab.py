"""`make lab`: the whole fleet rehearsed in network namespaces (docs/rehearsal.md).

    python loadtest/lab/lab.py [--scenario NAME ...] [--short] [--scale 10] [--binary PATH]
                               [--out DIR] [--doc docs/rehearsal.md] [--images DIR] [--check]

Runs as root. This process is the orchestrator: it creates the lab's namespaces, moves itself
into the control namespace (so its own traffic, to moto and to the proxies, stays inside the
lab), runs each scenario on a fresh deployment, and always tears everything down on the way
out, whether a scenario passed, failed or was interrupted (SIGINT, SIGTERM). A run killed
outright (SIGKILL) leaves namespaces named after its PID; the next run removes them.
"""

import argparse
import ctypes
import datetime
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback

import deploy
import netns
import scenarios
from deploy import Timings

ROOT = pathlib.Path(__file__).resolve().parents[2]
CLONE_NEWNET = 0x40000000


def enter_netns(name):
    """Moves this process (it has one thread so far) into namespace `name`: everything it
    connects to afterwards is inside the lab."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise netns.LabError(f"setns into {name}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Interrupted(BaseException):
    pass


def on_signal(signum, _frame):
    raise Interrupted(signal.Signals(signum).name)


def git_commit():
    try:
        r = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return r.stdout.strip() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenario", action="append", choices=sorted(scenarios.SCENARIOS),
                    help="run only this scenario (repeatable); default: all, in order")
    ap.add_argument("--short", action="store_true",
                    help="CI's short version: the flip, one instance death and an Auto Scaling replacement by handoff (at the base rate, already low)")
    ap.add_argument("--clean", action="store_true",
                    help="only remove what earlier runs that were killed outright left behind, then exit")
    ap.add_argument("--scale", type=float, default=10.0,
                    help="divide every Route 53 interval, TTL, drain delay and grace by this (1 = real timings)")
    ap.add_argument("--load", type=float, default=1.0, help="multiply every scenario's base rate by this")
    ap.add_argument("--tenx-seconds", type=float, default=60.0, help="how long the 10x load lasts")
    ap.add_argument("--soak-minutes", type=float, default=10.0, help="how long the soak lasts (hours: e.g. 240)")
    ap.add_argument("--binary", help="the static-ingress binary the instances run")
    ap.add_argument("--deb", help="the .deb the drain and replacement scenarios boot (systemd-nspawn); "
                    "without it they run the binary like the others")
    ap.add_argument("--out", help="keep the raw records here (default: loadtest/results/lab-<time>)")
    ap.add_argument("--doc", help="write the report here (e.g. docs/rehearsal.md)")
    ap.add_argument("--images", help="write the plots here (default: beside --doc, in rehearsal/)")
    ap.add_argument("--check", action="store_true", help="exit 1 when a scenario misses its goal")
    args = ap.parse_args()

    if os.geteuid() != 0:
        sys.exit("lab.py: needs root (network namespaces); run `sudo make lab`")
    if not 0 < args.scale <= 100:
        sys.exit("lab.py: --scale must be > 0 and <= 100")
    if not 0 < args.load <= 50:
        sys.exit("lab.py: --load must be > 0 and <= 50")
    if not 0 < args.tenx_seconds <= 3600 or not 0 < args.soak_minutes <= 48 * 60:
        sys.exit("lab.py: --tenx-seconds must be in (0, 3600] and --soak-minutes in (0, 2880]")
    binary = pathlib.Path(args.binary or "").resolve()
    if not args.clean and not (args.binary and os.access(binary, os.X_OK)):
        sys.exit(f"lab.py: {binary} is not an executable")
    if args.deb and not pathlib.Path(args.deb).is_file():
        sys.exit(f"lab.py: {args.deb} is not a file")
    names = args.scenario or (scenarios.SHORT if args.short else scenarios.ORDER)

    # The lab's own addresses are never behind a proxy (boto3 and urllib honour these).
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"):
        os.environ.pop(var, None)
    os.environ["NO_PROXY"] = os.environ["no_proxy"] = "*"

    removed = netns.sweep_stale()
    if removed:
        print(f"[lab] removed what earlier runs left: {removed}", file=sys.stderr)
    if args.clean:
        return 0
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = pathlib.Path(args.out or ROOT / "loadtest" / "results" / f"lab-{stamp}")
    out.mkdir(parents=True, exist_ok=True)

    prefix = netns.prefix_for(os.getpid())
    timings = Timings(args.scale)
    run_info = {"started": time.time(), "scale": args.scale, "mode": "short" if args.short else "full",
                "commit": git_commit(), "machine": f"{os.cpu_count()} cores, {os.uname().release}",
                "command": " ".join(sys.argv), "scenarios": names, "binary": str(binary)}
    failed = None
    lab = netns.Lab(prefix)
    work = pathlib.Path(tempfile.mkdtemp(prefix=f"{netns.WORK_PREFIX}{os.getpid()}-"))
    # nginx's workers run unprivileged and must read the stream body under it.
    work.chmod(0o755)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        try:
            # Everything that needs the host's network (debootstrap's mirror) comes first: once
            # this process is in the control namespace, nothing but the lab is reachable.
            root = None
            if args.deb and any(scenarios.SCENARIOS[n].boots_deb for n in names):
                root = deploy.prepare_root(work, args.deb)
            lab.add("ctl")
            enter_netns(lab.name("ctl"))
            for name in names:
                cls = scenarios.SCENARIOS[name]
                print(f"[lab] == scenario {name}: {cls.title}", file=sys.stderr, flush=True)
                sc = None
                try:
                    sc = cls(lab, out, work, timings, binary, args, root)
                    sc.run()
                except Exception as e:  # noqa: BLE001 (Interrupted is not an Exception subclass)
                    # The lab itself failed (not the fleet): recorded, and the run goes on.
                    detail = traceback.format_exc()
                    print(f"[lab] scenario {name} could not run: {detail}", file=sys.stderr)
                    (out / name).mkdir(parents=True, exist_ok=True)
                    (out / name / "lab-error.txt").write_text(detail)
                    failed = failed or f"scenario {name}: {e}"
                finally:
                    if sc is not None:
                        keep_logs(sc, out / name)
                    # Whatever the scenario left running in the control namespace (moto, if
                    # its stop failed) goes too: the next one starts from nothing.
                    netns.kill_namespace_processes(lab.name("ctl"))
                    netns.teardown_except(prefix, keep=[lab.name("ctl")])
                    lab.names = [lab.name("ctl")]
        except Interrupted as e:
            print(f"[lab] interrupted ({e}): tearing down", file=sys.stderr)
            failed = f"interrupted by {e}"
        finally:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            left = netns.teardown(prefix)
            if left:
                failed = failed or f"teardown left {left}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        run_info["ended"] = time.time()
        (out / "run.json").write_text(json.dumps(run_info, indent=1))
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
    print(f"[lab] records in {out}", file=sys.stderr)
    code = 1 if failed else 0
    if args.doc or args.check:
        cmd = [sys.executable, str(pathlib.Path(__file__).parent / "report.py"), str(out)]
        if args.doc:
            cmd += ["--doc", args.doc]
            cmd += ["--images", args.images or str(pathlib.Path(args.doc).with_suffix(""))]
        if args.check:
            cmd.append("--check")
        r = subprocess.run(cmd, timeout=600)
        code = code or r.returncode
    if failed:
        print(f"[lab] FAILED: {failed}", file=sys.stderr)
    return code


def keep_logs(sc, dest):
    """The deployment's logs (proxies, moto, nginx...) stay with the scenario's records."""
    if sc.dep is None:
        return
    logs = dest / "logs"
    logs.mkdir(exist_ok=True)
    for p in sc.dep.dir.rglob("*.log"):
        if "rootfs" in p.parts:
            continue
        rel = p.relative_to(sc.dep.dir)
        target = logs / str(rel).replace("/", "_")
        try:
            shutil.copyfile(p, target)
        except OSError:
            pass


if __name__ == "__main__":
    sys.exit(main())
