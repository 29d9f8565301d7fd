#!/usr/bin/env python3
"""Side-by-side benchmark on loopback: a direct connection, static-ingress, HAProxy (as in the
2016 design, and with splicing forced) and nginx stream in front of the same backends,
alternated within each round so that drift of a shared machine hits all paths alike.
`make bench` runs the full mode and writes docs/benchmarks.md; `make bench-smoke` runs a few
seconds of each measurement and fails if any number is missing.

    python3 loadtest/harness/bench.py --mode full|smoke [--binary PATH] [--out FILE]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import flip
import measure
import peers
import report
from procs import HarnessError, Processes, cpu_seconds, run

REPO = Path(__file__).resolve().parents[2]
TOOLS = Path(os.environ.get("STATIC_INGRESS_TOOLS", Path.home() / ".cache/static-ingress/tools")) / "bin"
REQUIRED_TOOLS = ("nginx", "haproxy", "iperf3", "dnsmasq", "openssl")
# Open files the run needs in one process: the proxies hold two per idle connection.
NEEDED_NOFILE = 12000


@dataclass(frozen=True)
class Mode:
    rounds: int
    bulk_seconds: int  # each iperf3 run, one stream and eight
    rate: int  # the constant rate for latency, new connections per second
    rate_seconds: float
    search_start: int  # the highest-clean-rate search: first rate, cap, runs, seconds a run
    search_ceiling: int
    search_steps: int
    search_seconds: float
    idle_connections: int
    api_connections: int  # the API-like load: keep-alive connections, requests a second, seconds
    api_rate: int
    api_seconds: float
    flips: int  # blue/green flips through each proxy that follows DNS
    profile: str  # cargo profile of the static-ingress binary


MODES = {
    # About 2.4 minutes a round for the five paths on 2 cores: three rounds fit the 10 minutes.
    "full": Mode(3, 3, 300, 6, 500, 16000, 10, 2, 5000, 2000, 2000, 10, 8, "release"),
    # Enough of each measurement to prove it still yields a number, in well under a minute.
    "smoke": Mode(1, 1, 50, 1, 100, 200, 2, 1, 200, 50, 50, 2, 2, "debug"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=MODES, default="full")
    parser.add_argument("--binary", type=Path, help="static-ingress binary (default: build it with cargo)")
    parser.add_argument("--out", type=Path, help="Markdown report (default: docs/benchmarks.md in full mode)")
    parser.add_argument(
        "--results", type=Path, help="raw results JSON (default: loadtest/results/TIME.json in full mode)"
    )
    parser.add_argument("--paths", default=",".join(peers.PATHS), help="comma-separated subset of the paths")
    parser.add_argument("--keep-workdir", action="store_true", help="keep configurations and logs")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="measure nothing: write the report again from saved results (after editing loadtest/analysis.md)",
    )
    args = parser.parse_args()
    if args.render:
        return render(args.render, args.out or REPO / "docs" / "benchmarks.md")
    mode = MODES[args.mode]
    paths = [p for p in args.paths.split(",") if p]
    unknown = [p for p in paths if p not in peers.PATHS]
    if unknown:
        parser.error(f"unknown path {unknown[0]}: choose from {', '.join(peers.PATHS)}")

    # SIGTERM (CI's timeout, a supervisor) ends the run through the same cleanup as Ctrl-C.
    signal.signal(signal.SIGTERM, interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="static-ingress-bench-"))
    procs = Processes(workdir)
    ok = False
    try:
        oha = preflight()
        binary = args.binary or build(mode.profile)
        started = time.time()
        machine = report.describe_machine(REPO, binary, oha)
        load_before = Path("/proc/loadavg").read_text().strip()
        rounds, commands = run_rounds(procs, workdir, binary, oha, mode, paths)
        flip_paths = [p for p in paths if p in flip.PATHS]
        log(f"blue/green flips: {mode.flips} through each of {', '.join(flip_paths)}")
        flips = flip.measure(procs, workdir, binary, flip_paths, mode.flips)
        for path, figures in flips.items():
            log(
                f"  {path}: first on the new address after {figures['flip_first_s']:.3f} s, all after "
                f"{figures['flip_settled_s']:.3f} s (median), {figures['dns_queries_per_s']:.2f} DNS queries/s"
            )
        results = {
            "mode": args.mode,
            "settings": {**mode.__dict__, "search_resolution": measure.SEARCH_RESOLUTION},
            "started_utc": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - started, 1),
            "loadavg_before": load_before,
            "loadavg_after": Path("/proc/loadavg").read_text().strip(),
            "machine": machine,
            "command": command_line(args),
            "workdir": str(workdir),
            "commands": commands,
            "rounds": rounds,
            "flip": flips,
            "paths": paths,
            "medians": medians(rounds, paths),
        }
        missing = report.problems(results["medians"], paths, strict=args.mode == "smoke")
        missing += report.flip_problems(flips, flip_paths)
        if missing:
            # Keep the numbers for a look, but never let an incomplete run replace the report.
            (workdir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            raise HarnessError(f"{len(missing)} problem(s): " + "; ".join(missing))
        write_outputs(args, results, paths)
        ok = True
        return 0
    except HarnessError as err:
        print(f"bench: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug or a tool's output changed shape: say where, keep the logs
        (workdir / "traceback.txt").write_text(traceback.format_exc())
        print(
            f"bench: error: unexpected {type(err).__name__}: {err} (traceback in {workdir}/traceback.txt)",
            file=sys.stderr,
        )
        return 1
    finally:
        procs.stop_all()
        if ok and not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: configurations and logs kept in {workdir}", file=sys.stderr)


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def preflight() -> Path:
    """Every tool present and enough open files allowed, or a one-line reason why not."""
    for tool in REQUIRED_TOOLS:
        if not shutil.which(tool):
            raise HarnessError(f"{tool} not found: run loadtest/install.sh")
    oha = TOOLS / "oha"
    if not os.access(oha, os.X_OK):
        raise HarnessError(f"oha not found at {oha}: run loadtest/install.sh")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < NEEDED_NOFILE:
        raise HarnessError(f"open-file limit {hard} is below the {NEEDED_NOFILE} the idle-connection test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    return oha


def build(profile: str) -> Path:
    """Builds static-ingress with cargo (a no-op when up to date) and returns the binary."""
    if profile == "release":
        argv = ["cargo", "build", "--locked", "--release", "--bin", "static-ingress"]
    else:
        # The debug binary `make test` builds, by the same command: a plain `cargo build` has
        # other tokio features (no dev-dependencies) and recompiles the whole AWS stack.
        argv = ["cargo", "test", "--locked", "--all-targets", "--no-run", "--quiet"]
    print(f"bench: {' '.join(argv)}", file=sys.stderr)
    result = run(argv, 3600, "building static-ingress", cwd=REPO)
    if result.returncode != 0:
        last = result.stderr.strip().splitlines()[-1:] or ["no output"]
        raise HarnessError(f"cargo build failed: {last[0]}")
    meta = run(["cargo", "metadata", "--no-deps", "--format-version", "1"], 120, "cargo metadata", cwd=REPO)
    if meta.returncode != 0:
        raise HarnessError(f"cargo metadata failed: {meta.stderr.strip()[:200]}")
    binary = Path(json.loads(meta.stdout)["target_directory"]) / profile / "static-ingress"
    if not os.access(binary, os.X_OK):
        raise HarnessError(f"no binary at {binary} after cargo build")
    return binary


def run_rounds(procs: Processes, workdir: Path, binary: Path, oha: Path, mode: Mode, paths: list[str]):
    """Starts the backends once; then per round each path in turn (the order rotates by one
    every round) gets fresh proxy processes and every measurement."""
    backends = peers.start_backends(procs, workdir)
    ctx = peers.Context(procs, workdir, backends, binary)
    rounds: list[dict] = []
    commands: dict[str, dict] = {"backends": {proc.name: peers.describe(proc) for proc in procs.procs}}
    for number in range(mode.rounds):
        order = paths[number % len(paths) :] + paths[: number % len(paths)]
        this_round = {"round": number + 1, "order": order, "results": {}}
        for path in order:
            log(f"round {number + 1}/{mode.rounds}: {path}")
            instances = peers.start_path(ctx, path)
            commands.setdefault(path, peers.describe_path(instances))
            try:
                this_round["results"][path] = measure_path(instances, oha, mode)
                this_round["results"][path]["loadavg_1m"] = float(Path("/proc/loadavg").read_text().split()[0])
            finally:
                peers.stop_path(ctx, instances)
            # Counted once the processes have exited, so every line is out.
            this_round["results"][path]["access_log_lines"] = peers.access_log_lines(path, instances["tls"])
        rounds.append(this_round)
    return rounds, commands


def measure_path(instances: dict[str, peers.Instance], oha: Path, mode: Mode) -> dict:
    result: dict = {}
    # Memory first, while the proxy processes are fresh.
    idle = instances["idle"]
    result.update(measure.idle_memory(idle.port, idle.pids(), mode.idle_connections))
    log(f"  idle: {fmt(result, 'rss_kib_per_conn')} KiB/conn RSS, {fmt(result, 'kernel_kib_per_conn')} KiB/conn kernel")
    bulk = instances["bulk"]
    result.update(measure.bulk_with_cpu(bulk.port, bulk.pids(), mode.bulk_seconds))
    log(
        f"  bulk: {fmt(result, 'bulk_1_gbit_s')} / {fmt(result, 'bulk_8_gbit_s')} Gbit/s (1/8 streams), "
        f"{fmt(result, 'cpu_s_per_gb')} CPU s/GB"
    )
    tls = instances["tls"]
    cpu_before = cpu_seconds(tls.pids())
    steady = measure.constant_rate(oha, tls.port, mode.rate, mode.rate_seconds)
    result.update(
        {
            k: steady[k]
            for k in ("success_ratio", "p50_ms", "p99_ms", "p999_ms", "requests", "latency_samples", "errors")
        }
    )
    log(
        f"  {mode.rate}/s: success {steady['success_ratio']:.4f}, p50 {fmt(steady, 'p50_ms')} "
        f"p99 {fmt(steady, 'p99_ms')} p99.9 {fmt(steady, 'p999_ms')} ms"
    )
    sni = instances.get(peers.SNI_ROLE)
    if sni:
        # The same load through an instance that routes by the ClientHello's server name,
        # right after the one that does not, so both see the same machine.
        routed = measure.constant_rate(oha, sni.port, mode.rate, mode.rate_seconds, peers.SNI_NAME)
        result.update({f"sni_{k}": routed[k] for k in ("success_ratio", "p50_ms", "p99_ms", "p999_ms")})
        log(
            f"  {mode.rate}/s routed by SNI: success {routed['success_ratio']:.4f}, p50 {fmt(routed, 'p50_ms')} "
            f"p99 {fmt(routed, 'p99_ms')} p99.9 {fmt(routed, 'p999_ms')} ms"
        )
    search = measure.highest_clean_rate(
        oha, tls.port, mode.search_start, mode.search_ceiling, mode.search_steps, mode.search_seconds
    )
    result.update(search)
    # CPU per connection over both tests: tens of thousands of connections, so the 10 ms
    # granularity of /proc's CPU times does not matter.
    if tls.proc:
        connections = steady["requests"] + sum(step["requests"] for step in search["max_rate_steps"])
        result["tls_connections"] = connections
        result["cpu_us_per_conn"] = (cpu_seconds(tls.pids()) - cpu_before) / connections * 1e6
    log(f"  highest clean rate: {search['max_clean_rate']}/s; {fmt(result, 'cpu_us_per_conn')} CPU us/conn")
    api = instances["api"]
    cpu_before = cpu_seconds(api.pids())
    result.update(measure.api_load(oha, api.port, mode.api_connections, mode.api_rate, mode.api_seconds))
    if api.proc:
        result["api_cpu_us_per_req"] = (cpu_seconds(api.pids()) - cpu_before) / result["api_requests"] * 1e6
    log(
        f"  keep-alive API load ({mode.api_connections} connections, {mode.api_rate}/s): success "
        f"{result['api_success_ratio']:.4f}, p50 {fmt(result, 'api_p50_ms')} p99 {fmt(result, 'api_p99_ms')} ms, "
        f"{fmt(result, 'api_cpu_us_per_req')} CPU us/request"
    )
    return result


def medians(rounds: list[dict], paths: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for path in paths:
        per_metric: dict[str, list[float]] = {}
        for r in rounds:
            for metric, value in r["results"].get(path, {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    per_metric.setdefault(metric, []).append(value)
        out[path] = {metric: statistics.median(values) for metric, values in per_metric.items()}
    return out


def write_outputs(args, results: dict, paths: list[str]) -> None:
    results_file = args.results
    out = args.out
    if args.mode == "full":
        stamp = results["started_utc"].replace(":", "").replace("-", "").replace("+0000", "Z")
        results_file = results_file or REPO / "loadtest" / "results" / f"{stamp}.json"
        out = out or REPO / "docs" / "benchmarks.md"
    if results_file:
        results_file.parent.mkdir(parents=True, exist_ok=True)
        results_file.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
        log(f"raw results: {results_file}")
    table = report.table(results["medians"], paths)
    if out:
        out.write_text(report.markdown(results, paths, repo_relative(results_file)))
        log(f"report: {out}")
    print(table)


def render(results_file: Path, out: Path) -> int:
    try:
        results = json.loads(results_file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        print(f"bench: error: cannot read results {results_file}: {err}", file=sys.stderr)
        return 1
    paths = results.get("paths") or [p for p in peers.PATHS if p in results["medians"]]
    out.write_text(report.markdown(results, paths, repo_relative(results_file)))
    log(f"report: {out}")
    return 0


def repo_relative(path: Path | None) -> Path | None:
    """The path as the report links it (from docs/), or None when it is outside the repository."""
    if path is None or not path.resolve().is_relative_to(REPO):
        return None
    return path.resolve().relative_to(REPO)


def command_line(args) -> str:
    if args.mode == "full" and not args.out and not args.binary:
        return "make bench"
    return " ".join(["python3", "loadtest/harness/bench.py", *sys.argv[1:]])


def fmt(result: dict, key: str) -> str:
    value = result.get(key)
    return "n/a" if value is None else f"{value:.3g}"


def log(line: str) -> None:
    print(f"bench: {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
