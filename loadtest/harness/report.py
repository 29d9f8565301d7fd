"""The machine's description, the table of medians and ratios, and docs/benchmarks.md."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

import flip
import measure
from procs import HarnessError

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis.md"


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    proxy_only: bool = False  # no number for the direct path (no proxy process)


METRICS = [
    Metric("bulk_1_gbit_s", "bulk throughput, 1 stream", "Gbit/s", True),
    Metric("bulk_8_gbit_s", "bulk throughput, 8 streams", "Gbit/s", True),
    Metric("cpu_s_per_gb", "proxy CPU per GB moved", "CPU s/GB", False, proxy_only=True),
    Metric("success_ratio", "success, HTTPS at a constant rate", "ratio", True),
    Metric("p50_ms", "latency p50, new TCP+TLS connection + GET", "ms", False),
    Metric("p99_ms", "latency p99", "ms", False),
    Metric("p999_ms", "latency p99.9", "ms", False),
    Metric("cpu_us_per_conn", "proxy CPU per connection", "CPU us", False, proxy_only=True),
    Metric("max_clean_rate", "highest clean new-connection rate", "conn/s", True),
    Metric("api_success_ratio", "success, keep-alive API load", "ratio", True),
    Metric("api_p99_ms", "latency p99, keep-alive API load", "ms", False),
    Metric("api_cpu_us_per_req", "proxy CPU per keep-alive request", "CPU us", False, proxy_only=True),
    Metric("rss_mib", "proxy RSS with the idle connections open", "MiB", False, proxy_only=True),
    Metric("rss_kib_per_conn", "proxy RSS per idle connection", "KiB", False, proxy_only=True),
    Metric("machine_kib_per_conn", "machine memory per idle connection (MemAvailable)", "KiB", False),
    Metric("kernel_kib_per_conn", "kernel socket memory per idle connection", "KiB", False),
]


def problems(medians: dict[str, dict], paths: list[str], strict: bool) -> list[str]:
    """What makes a run unusable: a number missing for a path, or (strict, for the smoke run)
    a failed request at the constant rate or no clean rate at all."""
    found = []
    for path in paths:
        numbers = medians.get(path, {})
        for metric in METRICS:
            if metric.proxy_only and path == "direct":
                continue
            if numbers.get(metric.key) is None:
                found.append(f"{path}: no {metric.label}")
        if path == "static-ingress":
            for key, label in SNI_FIGURES:
                if numbers.get(f"sni_{key}") is None:
                    found.append(f"{path}: no {label} routed by SNI")
            if strict and numbers.get("sni_success_ratio", 0) < 1:
                found.append(f"{path}: success ratio {numbers.get('sni_success_ratio')} routed by SNI")
        if strict and numbers.get("success_ratio", 0) < 1:
            found.append(f"{path}: success ratio {numbers.get('success_ratio')} at the constant rate")
        if strict and not numbers.get("max_clean_rate"):
            found.append(f"{path}: no rate passed the clean-rate search")
        if strict and path != "direct":
            # Like with like: each proxy wrote a line per connection, but the one run without.
            lines, connections = numbers.get("access_log_lines"), numbers.get("tls_connections") or 0
            if path == "static-ingress-nolog":
                if lines:
                    found.append(f"{path}: {lines} access-log lines with the access log off")
            elif lines is None or lines < connections:
                found.append(f"{path}: {lines} access-log lines for {connections} connections")
    return found


# The constant-rate figures measured again through an instance that routes by SNI.
SNI_FIGURES = [("success_ratio", "success"), ("p50_ms", "latency p50"), ("p99_ms", "latency p99"),
               ("p999_ms", "latency p99.9")]


def sni_section(results: dict) -> list[str]:
    """Latency at the constant rate with and without SNI routing: what reading the
    ClientHello before connecting to the backend costs."""
    si = results["medians"].get("static-ingress", {})
    if si.get("sni_p50_ms") is None:
        return []
    rows = ["| figure | without routes | routed by SNI | difference | rounds, routed by SNI |", "|---|---|---|---|---|"]
    for key, label in SNI_FIGURES:
        plain, routed = si.get(key), si.get(f"sni_{key}")
        unit = "ratio" if key == "success_ratio" else "ms"
        diff = "" if plain is None or routed is None or unit == "ratio" else f"{routed - plain:+.3f} ms"
        per_round = ", ".join(
            number(r["results"]["static-ingress"].get(f"sni_{key}"), unit)
            for r in results["rounds"] if "static-ingress" in r["results"]
        )
        rows.append(f"| {label} | {number(plain, unit)} | {number(routed, unit)} | {diff} | {per_round} |")
    return [
        "### What SNI routing costs",
        "",
        "The constant-rate test (a new TCP+TLS connection and one GET each) run again, right after the one "
        "above, through a static-ingress instance with one `[[route]]` by server name and "
        "`proxy.unmatched = \"refuse\"`: every request that succeeds was routed by the server name in its "
        "ClientHello, which the proxy reads before it connects to the backend (oha sends the name with "
        "`--connect-to`; see its command below). Medians over the rounds:",
        "",
        *rows,
        "",
    ]


def flip_problems(flips: dict[str, dict], paths: list[str]) -> list[str]:
    """A path that follows DNS without flip figures, or static-ingress failing a connection in
    a flip, which it must never do (the peers' failures are shown, not judged)."""
    found = [f"{path}: no blue/green flip figures" for path in paths if path not in flips]
    failed = flips.get("static-ingress", {}).get("flip_failed_connections")
    if failed:
        found.append(f"static-ingress: {failed} connection(s) failed during the flips")
    return found


def flip_section(results: dict) -> list[str]:
    """How soon each proxy that follows DNS sends new connections to a flipped name's new
    address, and what it asks of the DNS server for that."""
    flips = results.get("flip")
    if not flips:
        return []
    rows = [
        "| path | first new connection there, median | all new connections there, median | all there, slowest | "
        "each flip, all there (s) | DNS queries a second | failed connections |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, f in flips.items():
        rows.append(
            f"| {path} | {f['flip_first_s']:.3f} s | {f['flip_settled_s']:.3f} s | {f['flip_settled_max_s']:.3f} s | "
            f"{', '.join(f'{d:.2f}' for d in f['flip_settled_all_s'])} | {f['dns_queries_per_s']:.2f} | "
            f"{f['flip_failed_connections']} |"
        )
    count = len(next(iter(flips.values()))["flip_settled_all_s"])
    return [
        "### The blue/green flip",
        "",
        f"{count} flips of the backend's name through each proxy, alternating between two addresses (a server on "
        f"127.0.0.1 and one on 127.0.0.2, each writing its colour), each after a random wait of 0.5 to 2.5 s, so "
        "that the flips land at every phase of each proxy's re-resolve schedule. The harness's own DNS server "
        f"answers (TTL {flip.FLIP_TTL_S} s) and counts the queries; a new connection every "
        f"{flip.PROBE_INTERVAL_S * 1000:.0f} ms reads which server it reached. *All there* is the first of "
        f"{flip.SETTLED_PROBES} connections in a row on the new address: a proxy whose processes keep answers of "
        "their own (nginx's workers) sends some to the old one for longer. Schedules as configured: "
        "static-ingress `dns.refresh_interval` (default), HAProxy `timeout resolve 1s`, nginx "
        "`resolver ... valid=` as in its command below.",
        "",
        *rows,
        "",
    ]


def ratio(value, base) -> float | None:
    if value is None or base is None or base == 0:
        return None
    return value / base


def behind_factor(metric: Metric, proxy, reference) -> float | None:
    """How many times worse than the reference the proxy is on this metric (1 = level)."""
    r = ratio(proxy, reference)
    if r is None or r == 0:
        return None
    return 1 / r if metric.higher_is_better else r


def furthest_behind(medians: dict[str, dict], reference: str = "haproxy", count: int = 2) -> list[tuple[Metric, float]]:
    """The metrics where static-ingress trails the reference most, worst first."""
    if "static-ingress" not in medians or reference not in medians:
        return []
    scored = []
    for metric in METRICS:
        factor = behind_factor(metric, medians["static-ingress"].get(metric.key), medians[reference].get(metric.key))
        if factor is not None:
            scored.append((metric, factor))
    scored.sort(key=lambda item: item[1], reverse=True)
    return scored[:count]


def number(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "ratio":
        return f"{value:.4f}"
    if isinstance(value, int) or abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) >= 1 else f"{value:.3f}"


def times(value) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def table(medians: dict[str, dict], paths: list[str]) -> str:
    head = ["metric", "unit", "better", *paths]
    compare = [("static-ingress", "haproxy"), ("static-ingress", "direct"), ("haproxy", "direct"),
               ("static-ingress", "static-ingress-nolog")]
    compare = [(a, b) for a, b in compare if a in paths and b in paths]
    head += [f"{a} / {b}" for a, b in compare]
    rows = [head, ["---"] * len(head)]
    for metric in METRICS:
        row = [metric.label, metric.unit, "higher" if metric.higher_is_better else "lower"]
        row += [number(medians.get(p, {}).get(metric.key), metric.unit) for p in paths]
        row += [times(ratio(medians[a].get(metric.key), medians[b].get(metric.key))) for a, b in compare]
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def round_table(rounds: list[dict], paths: list[str]) -> str:
    head = ["round", "path", *[m.key for m in METRICS]]
    rows = [head, ["---"] * len(head)]
    for r in rounds:
        for path in r["order"]:
            numbers = r["results"][path]
            rows.append([str(r["round"]), path, *[number(numbers.get(m.key), m.unit) for m in METRICS]])
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


# The machine and the exact versions of everything that ran.


def first_line(argv: list[str], cwd: Path | None = None) -> str:
    """The first line a tool prints (a version), or "unknown" when it prints nothing."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HarnessError(f"cannot get the version of {argv[0]}: {err}") from err
    lines = (done.stdout + done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def describe_machine(repo: Path, binary: Path, oha: Path) -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next(
        (line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "unknown"
    )
    memtotal = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal:")
    )
    commit = first_line(["git", "-C", str(repo), "rev-parse", "HEAD"])
    # Local changes to what the binary is built from make the commit alone an incomplete name.
    changes = subprocess.run(
        ["git", "-C", str(repo), "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    sysctl = {}
    for name in (
        "net/core/somaxconn",
        "net/ipv4/tcp_tw_reuse",
        "net/ipv4/ip_local_port_range",
        "net/ipv4/tcp_congestion_control",
    ):
        try:
            sysctl[name.replace("/", ".")] = " ".join(Path(f"/proc/sys/{name}").read_text().split())
        except OSError:
            sysctl[name.replace("/", ".")] = "unknown"
    debian = Path("/etc/debian_version").read_text().strip() if Path("/etc/debian_version").exists() else "not Debian"
    return {
        "cpu_model": model,
        "cores": os.cpu_count(),
        "memory_gib": round(int(memtotal) / 2**20, 1),
        "kernel": platform.release(),
        "os": f"Debian {debian}",
        "static_ingress": f"{first_line([str(binary), '--version'])}, commit {commit}"
        + (" with local changes" if changes else "")
        + f", {binary.parent.name} build",
        "rustc": first_line(["rustc", "--version"], cwd=repo),  # the toolchain rust-toolchain.toml pins
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "iperf3": first_line(["iperf3", "--version"]),
        "oha": first_line([str(oha), "--version"]),
        "dnsmasq": first_line(["dnsmasq", "--version"]),
        "openssl": first_line(["openssl", "version"]),
        "python": platform.python_version(),
        "sysctl": sysctl,
    }


MACHINE_LABELS = {
    "cpu_model": "CPU", "cores": "cores", "memory_gib": "memory (GiB)", "kernel": "kernel", "os": "OS",
    "static_ingress": "static-ingress", "rustc": "rustc", "haproxy": "HAProxy", "nginx": "nginx",
    "iperf3": "iperf3", "oha": "oha", "dnsmasq": "dnsmasq", "openssl": "OpenSSL", "python": "Python",
}  # fmt: skip


def spread_table(rounds: list[dict], paths: list[str]) -> str:
    """Lowest and highest value over the rounds: how far a ratio can be trusted."""
    head = ["metric", *paths]
    rows = [head, ["---"] * len(head)]
    for metric in METRICS:
        row = [metric.label]
        for path in paths:
            values = [r["results"][path].get(metric.key) for r in rounds if path in r["results"]]
            values = [v for v in values if v is not None]
            row.append(f"{number(min(values), metric.unit)} to {number(max(values), metric.unit)}" if values else "n/a")
        rows.append(row)
    return "\n".join("| " + " | ".join(r) + " |" for r in rows)


def behind_section(results: dict, reference: str) -> list[str]:
    medians = results["medians"]
    behind = furthest_behind(medians, reference)
    if not behind:
        return []
    out = []
    for metric, factor in behind:
        si, ref = medians["static-ingress"].get(metric.key), medians[reference].get(metric.key)
        verdict = f"{factor:.2f}x worse" if factor > 1 else f"{1 / factor:.2f}x better: level or ahead everywhere"
        rounds = {
            path: ", ".join(number(r["results"][path].get(metric.key), metric.unit) for r in results["rounds"])
            for path in ("static-ingress", reference)
        }
        out.append(
            f"- **{metric.label}**: {number(si, metric.unit)} against {number(ref, metric.unit)} {metric.unit}, "
            f"{verdict} (rounds: static-ingress {rounds['static-ingress']}; {reference} {rounds[reference]})."
        )
    return out


def markdown(results: dict, paths: list[str], results_file: Path | None) -> str:
    s = results["settings"]
    m = results["machine"]
    medians = results["medians"]
    loads = [
        r["results"][p]["loadavg_1m"] for r in results["rounds"] for p in r["order"] if "loadavg_1m" in r["results"][p]
    ]
    out = [
        "# Benchmarks: static-ingress against HAProxy, nginx and a direct connection",
        "",
        f"Written by `{results['command']}` (`loadtest/harness/bench.py`); rerun it rather than edit this page, "
        "except for the analysis, which comes from `loadtest/analysis.md`. "
        f"Run started {results['started_utc']} and took {results['duration_s']:.0f} s: {s['rounds']} rounds, "
        "each path in turn within a round (the order rotates every round), medians over the rounds.",
        "",
        f"**Load on the machine**: the 1-minute load average was {results['loadavg_before'].split()[0]} before the run"
        + (f" and from {min(loads):.2f} to {max(loads):.2f} during it (read after each path's turn)" if loads else "")
        + f", on {m['cores']} cores. The run itself keeps about 2 busy; well above that, other work shared the "
        "CPU and the numbers are noisy.",
        "",
        "## Results",
        "",
        table(medians, paths),
        "",
        "Ratios divide the first path's median by the second's; whether above or below 1 is better "
        "follows the `better` column. `n/a`: the direct path has no proxy process to measure.",
        "",
    ]
    if "static-ingress" in paths and "haproxy" in paths:
        out += ["### Where static-ingress is furthest behind HAProxy in this run", ""]
        out += behind_section(results, "haproxy")
        if "haproxy-splice" in paths:
            out += ["", "Against HAProxy with splicing forced (`haproxy-splice`):", ""]
            out += behind_section(results, "haproxy-splice")
        out.append("")
    out += sni_section(results)
    out += flip_section(results)
    if ANALYSIS.exists():
        out += [ANALYSIS.read_text().strip(), ""]
    out += ["### Spread over the rounds (lowest to highest)", "", spread_table(results["rounds"], paths), ""]
    out += method(s)
    out += ["## Machine", "", "| what | value |", "|---|---|"]
    out += [f"| {label} | {m[key]} |" for key, label in MACHINE_LABELS.items()]
    out += [f"| {key} | `{value}` |" for key, value in m["sysctl"].items()]
    out += ["", "## Exact commands", "", f"The whole run: `{results['command']}` from the repository root.", ""]
    out += [
        "Load generators (PORT is the path's port for that role):",
        "",
        "```sh",
        f"iperf3 --client 127.0.0.1 --port PORT --time {s['bulk_seconds']} --parallel 1|8 "
        "--connect-timeout 3000 --json",
        shlex.join(measure.oha_argv(Path("oha"), 0, 0, 0))
        .replace(":0/", ":PORT/")
        .replace("-z 0s", "-z SECONDS")
        .replace("-q 0", "-q RATE"),
        "# routed by SNI: the same, naming the server (the route's) and sending it to loopback",
        shlex.join(measure.oha_argv(Path("oha"), 0, 0, 0, "api.example.com"))
        .replace(":0/", ":PORT/")
        .replace(":0:", ":PORT:")
        .replace(":0 ", ":PORT ")
        .replace("-z 0s", "-z SECONDS")
        .replace("-q 0", "-q RATE"),
        "```",
        "",
        "Ports are picked free at each run, and files live in a temporary directory (WORK below).",
        "",
    ]
    work = str(results.get("workdir", ""))

    def cmd(entry: dict) -> str:
        return shlex.join(entry["argv"]).replace(work, "WORK") if work else shlex.join(entry["argv"])

    backends = results["commands"].get("backends", {})
    if backends:
        out += ["### Backends and DNS", ""]
        out += [f"- {name}: `{cmd(entry)}`" for name, entry in backends.items()]
        https = backends.get("backend-https", {})
        if "config" in https:
            out += [
                "",
                "The HTTPS backend's configuration:",
                "",
                "```nginx",
                https["config"].replace(work, "WORK").strip(),
                "```",
            ]
        out.append("")
    for path in paths:
        entry = results["commands"].get(path, {}).get("tls", {})
        out += [f"### {path}", ""]
        if "argv" not in entry:
            out += ["Clients connect straight to each backend's port.", ""]
            continue
        out += ["The instance in front of the HTTPS backend (those in front of iperf3 and the echo server "
                "differ only in ports):", "", f"`{cmd(entry)}`", ""]  # fmt: skip
        if "config" in entry:
            out += ["```", entry["config"].replace(work, "WORK").strip(), "```", ""]
        sni = results["commands"].get(path, {}).get("tls-sni", {})
        if "argv" in sni:
            out += ["The instance routing by SNI (the same HTTPS backend):", "", f"`{cmd(sni)}`", ""]
            if "config" in sni:
                out += ["```toml", sni["config"].replace(work, "WORK").strip(), "```", ""]
    out += ["## Raw results", ""]
    if results_file:
        out += [
            f"Every number of every round, with the clean-rate search steps: [`{results_file}`](../{results_file}).",
            "",
        ]
    out += [round_table(results["rounds"], paths), ""]
    return "\n".join(out)


def method(s: dict) -> list[str]:
    return [
        "## How it was measured",
        "",
        "Everything runs on loopback on this one machine: a local DNS server (dnsmasq) answers "
        "`backend.test` with 127.0.0.1, and every proxy is given that name, not an address, so that "
        "each resolves it the way it would resolve an ELB name. Three backends sit behind the name "
        "on different ports: nginx serving HTTPS (a self-signed ECDSA P-256 certificate, TLS session "
        "resumption off, so every connection is a full handshake; `return 200`), an iperf3 server, and "
        "an echo server. Each proxy path runs one process per backend, so CPU time and memory are "
        "read from the process that did that work alone. The paths:",
        "",
        "- **direct**: clients connect straight to the backend; the limit of what this machine can do.",
        "- **static-ingress**: the release build (`make bench`) with `--dns-nameservers` pointing at the "
        "local DNS server and everything else at its defaults except the connection cap (9,000): its "
        "access log on (`log.access`, the default), a line per connection to stdout, which goes to a file.",
        "- **static-ingress-nolog**: the same with `--log-access false`: what the access log costs.",
        "- **haproxy**: HAProxy 2.6 configured as in the 2016 design (TCP mode, a `resolvers` section, "
        "one server by hostname with health checks every second, fall 3, rise 2), plus "
        "`option splice-auto`, and `option tcplog` with `log stdout format raw`: a line per connection, "
        "as static-ingress's, to a file.",
        "- **nginx**: nginx's stream module with `proxy_pass` through a variable, so the name is "
        "resolved at run time by its `resolver` (open-source nginx has no active health checks), and "
        "a stream `access_log` with a tcplog-like `log_format`, a line per connection to a file.",
        "- **haproxy-splice**: the same HAProxy with `option splice-request` and `option splice-response` "
        "instead of `splice-auto`. `splice-auto` splices only when its heuristic expects a gain, which "
        "on loopback is seldom; forcing it shows what zero-copy forwarding is worth, against "
        "static-ingress's own (`proxy.splice = auto`). Ratios against HAProxy use the design's configuration, "
        "`haproxy`.",
        "",
        "Every proxy may hold 9,000 connections (two descriptors each keeps every process under "
        "the 20,000 open files a process may have here) and runs as many threads or workers as its "
        "default gives on the machine's cores: HAProxy and nginx one per CPU, static-ingress one data-path "
        "worker per two CPUs (`proxy.workers = 0`; its admin server, DNS and health checks run on a separate "
        "runtime).",
        "",
        f"- **Bulk throughput**: iperf3, client to server through the path, {s['bulk_seconds']} s with one stream, "
        f"then {s['bulk_seconds']} s with eight.",
        "- **CPU per GB**: user plus system CPU time of the proxy's processes (`/proc/PID/stat`, all "
        "threads and nginx's workers) across both iperf3 runs, divided by the gigabytes iperf3 received.",
        "- **CPU per connection**: the proxy's CPU time across the constant-rate test and the clean-rate "
        "search below, divided by the requests sent in them: what accepting, connecting, copying a TLS "
        "handshake and a request, and closing cost the proxy. Less sensitive to a busy machine than "
        "the highest rate.",
        f"- **Latency at a constant rate**: {s['rate']} HTTPS GETs a second for {s['rate_seconds']} s, each on a new "
        "TCP and TLS connection. The tool is oha (from crates.io, pinned in `loadtest/install.sh`): "
        "Vegeta cannot be installed here, and oha with `-q` sends at a fixed rate like Vegeta does "
        "(open loop), opens a new connection per request with `--disable-keepalive`, and with "
        "`--latency-correction` measures each request from when it was due, not from when a worker "
        "got to it, so a stall shows in the percentiles instead of lowering the rate. A request "
        f"fails on any error or after {measure.OHA_TIMEOUT}. The percentiles come from oha's record of each request "
        f"(`--db-url`) and leave out the requests due in the first {measure.WARMUP_S:.0f} s, which wait for oha's own "
        "start-up (tens of milliseconds, the same on every path) and would otherwise be most of the p99.9; "
        "the success ratio counts every request.",
        f"- **Highest clean new-connection rate**: the same test for {s['search_seconds']} s a step, the rate "
        f"doubling from {s['search_start']}/s (up to {s['search_ceiling']}/s) until a step fails, then halving the "
        + (f"gap until the last pass and the first failure are within {s['search_resolution']:.1%} of the pass, "
           if "search_resolution" in s else "gap, ")
        + f"at most {s['search_steps']} steps. A step passes with no failed request, at least "
        f"{measure.PASS_SHARE:.0%} of the asked rate completed, and p99 under {measure.PASS_P99_MS:.0f} ms. On two "
        "cores the client's and the backend's TLS work share the CPU with the proxy, so this says how "
        "much of the machine the proxy leaves to them; compare it with the direct path.",
        f"- **Memory per idle connection**: {s['idle_connections']:,} connections opened through the path "
        "(from the harness, one process; the echo server is another; the proxy a third), one byte "
        "echoed on each, then left idle. Read before and with them open: the proxy's RSS (`VmRSS`); "
        "the machine's `MemAvailable`, which counts everything, kernel buffers included, but also "
        "moves with any other process on the machine (a negative figure means something else freed "
        "memory meanwhile); and the kernel's socket memory (unreclaimable slab, where socket "
        "structures live, plus the pages TCP buffers hold, from `/proc/net/sockstat`), which other "
        "work disturbs much less. The machine and kernel figures include the client's and the echo "
        "server's sockets, so compare them with the direct path, which has only those.",
        *(
            [
                f"- **Keep-alive API load**: the traffic this appliance mostly carries. oha opens "
                f"{s['api_connections']:,} HTTPS connections and keeps them (no `--disable-keepalive`), sending "
                f"{s['api_rate']:,} GETs a second among them for {s['api_seconds']} s, so each connection asks about "
                f"once every {s['api_connections'] / max(s['api_rate'], 1):.1f} s, to a port of the HTTPS backend that "
                "keeps connections open. Success ratio; p50 and p99 of the requests due after the first "
                f"{measure.API_WARMUP_S:g} s, once oha has opened its connections (it opens them all at the start: "
                "that many TLS handshakes at once hold up the first requests on every path); and the proxy's CPU "
                "time over the run divided by the requests (the connections' TLS handshakes included)."
            ]
            if "api_connections" in s
            else []
        ),
        "- **CPU per GB and splice**: static-ingress forwards through kernel pipes (`proxy.splice = auto`, "
        "the default) once a direction has moved 128 KiB, so the bulk runs splice and the other tests copy.",
        "",
    ]
