"""The lab's report: figures per scenario, docs/rehearsal.md, a plot per scenario, summary.json.

Reads a run directory (RUN_DIR) written by the lab: one subdirectory per scenario run, each with
client.jsonl, route53.jsonl, events.jsonl and scenario.json (formats: the lab's shared facts), and
an optional RUN_DIR/run.json describing the run. Writes RUN_DIR/summary.json, the document
(--doc, default RUN_DIR/rehearsal.md; `make lab` passes docs/rehearsal.md) and one PNG per scenario
(--images, default beside the document: docs/rehearsal/<scenario>.png); with --check, exits 1 when
a scenario fails its goal, after writing everything. Hand-written notes per scenario
(--notes DIR, default loadtest/lab/notes: <scenario>.md) are included verbatim in its section.

    python loadtest/lab/report.py RUN_DIR [--doc docs/rehearsal.md] [--images docs/rehearsal]
        [--notes loadtest/lab/notes] [--check]

Every figure, exactly:

- **Times.** Every timestamp is wall-clock epoch seconds. The *scenario start* is scenario.json's
  "started" (else the earliest timestamp seen); the deployment is built after it. The *load
  start* is the start of the first phase (else the scenario start): plots and the events list
  are relative to it (setup events get negative times), and the load's duration runs from it to
  scenario.json's "ended". The *reference* ("the fault") is the first event, at or after the
  start of the "during" phase, whose kind is "fault" or "flip"; if there is none, the first
  "instance_stop" or "eip_move" there; if none, the start of "during"; if none, the scenario
  start. Detect, recover, the failure window and the Route 53 health changes are relative to it.
- **Scale.** The lab divides every Route 53 interval, TTL, drain delay and grace by SCALE
  (scenario.json "scale", else run.json "scale", else 1). Every time figure derived from those
  timings (event times, detect, recover, failure window, health changes) is shown measured and
  "at real timings" = measured x SCALE. Latency and generator lag are network and CPU times, not
  scaled, and are shown as measured only.
- **Phases.** From scenario.json "phases" ({name: [from, to]}), else from the "phase" events (each
  runs to the next one, the last to the scenario end). A record belongs to the phase whose
  [from, to) holds its actual start ("start", else "t"); one before the first phase counts in the
  first, one after the last in the last.
- **Requests sent**: the client.jsonl records, short and stream counted separately (one record
  per finished request or stream; a stream is one long-lived connection).
  Per phase also *short/s*: short requests that started in the phase / the phase's length.
- **Client-visible failures**: every record whose outcome is not "ok", counted by outcome, by
  phase, by address connected to, and split into streams, short requests that started inside the
  detection window [reference, reference + detect], and other short requests; the 5 most common
  (outcome, detail) pairs are listed.
- A failure's *time* is when the client saw it: start + latency.
- **Detect**: from the reference to the first route53.jsonl "health" event with healthy=false at
  or after it; null if there is none.
- **Recover**: from the reference to the time of the last failure seen at or after it, i.e. the
  time after which every request succeeded; null when no failure was seen after the reference.
- **Failure window**: [time of the first failure, time of the last failure], relative to the
  reference, over the failures seen at or after it.
- **Latency p50/p99** per phase: over the "latency" of ok short requests (start to last byte,
  TCP connect + TLS + request). Percentiles are nearest-rank: the p-quantile of n sorted values
  is the value at rank ceil(p x n).
- **Lag** p50/p99/max per phase: the generator's "lag" (actual start - scheduled start) over every
  record. "Schedule kept" when the lag p99 of every phase is under LAG_P99_KEPT (50 ms).
- **Route 53**, from the load start on (the deployment's setup is left out): per address, the
  "health" events (healthy or not, healthy checkers / checkers) relative to the reference, and
  its health as the load started if a change before it was seen; the fraction of DNS answers per
  address = the sum of its counts over the "answers" events / the sum of all counts; how many
  answer intervals were fail-open.
- **Proxies**: per instance in scenario.json "proxies", after - before of each metric (a metric
  missing on one side counts 0 there); only the metrics that changed are shown. An instance with
  no or an empty "after" (it died or stopped) is listed with no differences; one with an empty
  "before" started during the scenario and is counted from 0.
- **Samples** (scenario.json "samples"), per instance in time order: first, last and max of RSS,
  fds and CPU seconds. *Flat* when the growth of the median RSS, from the second tenth of the
  samples (the first holds the start-up) to the last tenth, is at most max(5% of that baseline,
  2 MiB), and the median fds of the last tenth are within FD_SLACK (5) of the second tenth's
  (medians: a live proxy's descriptors move with the connections open at the instant, a leak
  moves the median; under 20 samples, the first and the last sample), and (with at least 20 samples) the
  CPU rate over the last tenth of the samples is at most max(1.5 x, + 0.02 s/s) the rate over the
  second tenth (the first holds the start-up); judged only with at least 3 samples, and where
  flatness is judged an instance with fewer fails.
- **Plots** (<scenario>.png, 10x4 in at 100 dpi): ok and failed requests per second by kind,
  binned by the time the client saw the outcome (1 s bins; runs over 15 minutes get wider bins,
  rates averaged over each), a tick per failure, events and phases as vertical lines, Route 53
  unhealthy spans shaded per address, and p50/p99 latency per bin below; with samples, also
  <scenario>-resources.png: RSS and fds per instance over time.
- **Verdict**: "incomplete" (a failure) when scenario.json is missing or unreadable, a file is
  missing, a JSONL line could not be parsed (it is skipped and the rest still counted), the
  directory holds the orchestrator's lab-error.txt (the lab, not the fleet, failed), or run.json's
  "scenarios" lists a scenario that has no directory (it did not run). Else by
  the goal: "zero" passes only with zero client-visible failures; "bounded" passes when failures
  <= bounds.failures (no bound: fails), every failure is on one of bounds.addresses (the lost
  addresses, when given) and Route 53 marked an address unhealthy after the fault (else the fault
  was not seen); "measured" always reports the numbers, verdict
  "measured" (not a failure). Where flatness is judged (scenario.json "flat_required", by default
  only for the scenario named "soak"), an instance that is not flat fails the scenario too; where
  the schedule is judged (scenario.json "schedule_required", default false: the 10x scenario should
  set it, for a pass under a load that was not sent proves nothing), a schedule not kept fails it.
  Whatever the goal, fewer short requests than 90% of scenario.json's "expected_short" (the
  schedule's count) fails it: the load was not sent.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import os
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FILES = ("client.jsonl", "route53.jsonl", "events.jsonl", "scenario.json")
PHASES = ("before", "during", "after")
FAULT_KINDS = ("fault", "flip")
FALLBACK_FAULT_KINDS = ("instance_stop", "eip_move")
LAG_P99_KEPT = 0.050  # seconds
LOAD_SENT_FRACTION = 0.9  # of scenario.json's expected_short
FLAT_RSS_FRACTION = 0.05
FLAT_RSS_MIN_BYTES = 2 * 1024 * 1024
FD_SLACK = 5
CPU_RATE_FACTOR = 1.5
CPU_RATE_SLACK = 0.02  # CPU seconds per second
MAX_BINS = 900  # plot bins; longer runs get wider ones
MAX_MARKS = 5000  # failure ticks drawn per kind
TOP_DETAILS = 5  # the most common (outcome, detail) pairs shown per scenario
MIN_FLAT_SAMPLES = 3


# ---------------------------------------------------------------------------------------------
# Reading


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """The objects of a JSON Lines file and how many lines could not be used (a killed writer
    leaves a truncated last line). A missing file reads as no records."""
    records, broken = [], 0
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return [], 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            broken += 1
            continue
        if isinstance(obj, dict) and _num(obj.get("t")) is not None:
            records.append(obj)
        else:
            broken += 1
    return records, broken


def read_json(path: Path) -> dict | None:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def _num(x) -> float | None:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def scenario_dirs(run_dir: Path) -> list[Path]:
    return sorted(d for d in run_dir.iterdir() if d.is_dir() and any((d / f).exists() for f in FILES))


# ---------------------------------------------------------------------------------------------
# Figures


def percentile(values: list[float], p: float) -> float | None:
    """Nearest rank: the value at rank ceil(p * n) of the sorted values."""
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p * len(s)) - 1))]


def _start(r: dict) -> float:
    s = _num(r.get("start"))
    return s if s is not None else float(r["t"])


def _seen(r: dict) -> float:
    """When the client saw the outcome: actual start + latency."""
    return _start(r) + (_num(r.get("latency")) or 0.0)


def phase_bounds(scenario: dict, events: list[dict], end: float) -> dict[str, tuple[float, float]]:
    """{phase: (from, to)}. A phase with no end (a killed run) ends where the next one starts, the
    last one at the scenario's end; an "end" mark closes the last phase and is no phase itself."""
    marks = []
    for name, span in (scenario.get("phases") or {}).items():
        if isinstance(span, (list, tuple)) and span and _num(span[0]) is not None:
            marks.append((float(span[0]), str(name), _num(span[1]) if len(span) > 1 else None))
    if not marks:
        marks = [(float(e["t"]), str(e.get("name")), None) for e in events if e.get("event") == "phase" and e.get("name")]
    marks.sort()
    phases = {}
    for i, (t, name, to) in enumerate(marks):
        if name == "end":
            continue
        if to is None:
            to = marks[i + 1][0] if i + 1 < len(marks) else max(end, t)
        phases[name] = (t, to)
    return phases


def phase_of(t: float, phases: dict[str, tuple[float, float]]) -> str | None:
    if not phases:
        return None
    ordered = sorted(phases.items(), key=lambda kv: kv[1][0])
    for name, (a, b) in ordered:
        if a <= t < b:
            return name
    return ordered[0][0] if t < ordered[0][1][0] else ordered[-1][0]


def reference(events: list[dict], phases: dict, started: float) -> tuple[float, str]:
    """The time the scenario's change happened ("the fault") and what it was. Only events from
    the start of the "during" phase count: the deployment's own setup moves addresses too."""
    since = phases["during"][0] if "during" in phases else float("-inf")
    ordered = sorted((e for e in events if e["t"] >= since), key=lambda e: e["t"])
    for kinds in (FAULT_KINDS, FALLBACK_FAULT_KINDS):
        for e in ordered:
            if e.get("event") in kinds:
                return float(e["t"]), str(e.get("event"))
    if "during" in phases:
        return phases["during"][0], "during"
    return started, "start"


def lag_figures(records: list[dict]) -> dict:
    lags = [x for x in (_num(r.get("lag")) for r in records) if x is not None]
    return {"n": len(lags), "p50": percentile(lags, 0.5), "p99": percentile(lags, 0.99), "max": max(lags) if lags else None}


def latency_figures(records: list[dict]) -> dict:
    lat = [x for x in (_num(r.get("latency")) for r in records if r.get("kind") == "short" and r.get("outcome") == "ok") if x is not None]
    return {"n": len(lat), "p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)}


def route53_figures(r53: list[dict], ref: float, origin: float) -> dict:
    """Health changes from the load start on (relative to the reference), each address's health
    as the load started (from the last change before it; absent: no change seen), and the
    answers given from the load start on."""
    health, at_start = defaultdict(list), {}
    answers, fail_open, intervals = Counter(), 0, 0
    for e in sorted(r53, key=lambda e: e["t"]):
        if e.get("event") == "health" and e.get("ip"):
            if e["t"] < origin:
                at_start[str(e["ip"])] = bool(e.get("healthy"))
                continue
            health[str(e["ip"])].append(
                {"t": e["t"] - ref, "healthy": bool(e.get("healthy")), "healthy_checkers": e.get("healthy_checkers"), "checkers": e.get("checkers")}
            )
        elif e.get("event") == "answers" and e["t"] >= origin:
            intervals += 1
            fail_open += bool(e.get("fail_open"))
            for ip, n in (e.get("counts") or {}).items():
                if _num(n) is not None:
                    answers[str(ip)] += n
    total = sum(answers.values())
    return {
        "health_at_load_start": at_start,
        "health_changes": dict(health),
        "answers": dict(answers),
        "answer_fraction": {ip: n / total for ip, n in sorted(answers.items())} if total else {},
        "answer_intervals": intervals,
        "fail_open_intervals": fail_open,
    }


def proxy_figures(proxies: dict) -> dict:
    """{instance: {metric: after - before} of the changed metrics}, None for an instance with no
    "after" (it died or had stopped), and "new": True for one with no "before" (started since)."""
    out = {}
    for inst, snap in (proxies or {}).items():
        snap = snap if isinstance(snap, dict) else {}
        before, after = snap.get("before") or {}, snap.get("after")
        if not isinstance(after, dict) or not after:
            out[inst] = None
            continue
        changes = {}
        for metric in sorted(set(before) | set(after)):
            a, b = _num(after.get(metric)) or 0.0, _num(before.get(metric)) or 0.0
            if a != b:
                changes[metric] = a - b
        out[inst] = {"new": not before, "changes": changes}
    return out


def sample_figures(samples: list) -> dict:
    per = defaultdict(list)
    for s in samples or []:
        if isinstance(s, dict) and _num(s.get("t")) is not None and s.get("instance") is not None:
            per[str(s["instance"])].append(s)
    out = {}
    for inst, ss in sorted(per.items()):
        ss.sort(key=lambda s: s["t"])
        fig = {"n": len(ss)}
        for key in ("rss_bytes", "fds", "cpu_seconds"):
            vals = [v for v in (_num(s.get(key)) for s in ss) if v is not None]
            fig[key] = {"first": vals[0], "last": vals[-1], "max": max(vals)} if vals else None
        fig["flat"] = None
        rss = [(_num(s.get("rss_bytes")), _num(s.get("fds"))) for s in ss]
        rss = [(r, f) for r, f in rss if r is not None and f is not None]
        if len(rss) >= MIN_FLAT_SAMPLES:
            # Medians over windows, not single samples: the descriptors (and a little of the
            # memory) of a live proxy move with the connections open at that instant, which a
            # leak does not; a leak moves the median. Baseline: the second tenth of the samples
            # (the first holds the start-up); end: the last tenth.
            tenth = max(1, len(rss) // 10)
            early = rss[tenth:2 * tenth] if len(rss) >= 3 * tenth and len(rss) >= 20 else rss[:1]
            late = rss[-tenth:] if len(rss) >= 20 else rss[-1:]
            base_rss, base_fds = statistics.median(r for r, _ in early), statistics.median(f for _, f in early)
            last_rss, last_fds = statistics.median(r for r, _ in late), statistics.median(f for _, f in late)
            bound = max(FLAT_RSS_FRACTION * base_rss, FLAT_RSS_MIN_BYTES)
            fig.update(
                baseline_rss_bytes=base_rss,
                rss_growth_bytes=last_rss - base_rss,
                rss_bound_bytes=bound,
                baseline_fds=base_fds,
                fds_change=last_fds - base_fds,
                flat=(last_rss - base_rss) <= bound and abs(last_fds - base_fds) <= FD_SLACK,
            )
        # CPU: the rate (CPU seconds per second) over the last tenth of the samples against the
        # second tenth (the first holds the start-up), flat within CPU_RATE_FACTOR or
        # CPU_RATE_SLACK, whichever is larger.
        cpu = [(s["t"], _num(s.get("cpu_seconds"))) for s in ss if _num(s.get("cpu_seconds")) is not None]
        if fig["flat"] is not None and len(cpu) >= 20:
            tenth = len(cpu) // 10

            def rate(a, b):
                return (cpu[b][1] - cpu[a][1]) / (cpu[b][0] - cpu[a][0]) if cpu[b][0] > cpu[a][0] else 0.0

            early, late = rate(tenth, 2 * tenth), rate(len(cpu) - 1 - tenth, len(cpu) - 1)
            cpu_flat = late <= max(early * CPU_RATE_FACTOR, early + CPU_RATE_SLACK)
            fig.update(cpu_rate_early=early, cpu_rate_late=late, cpu_flat=cpu_flat)
            fig["flat"] = fig["flat"] and cpu_flat
        out[inst] = fig
    return out


def analyse(sdir: Path, run: dict | None) -> dict:
    """Every figure of one scenario run (see the module docstring)."""
    if not sdir.is_dir():
        problems = ["no records: the scenario did not run (listed in run.json)"]
    else:
        problems = []
    scenario = read_json(sdir / "scenario.json")
    if scenario is None:
        if sdir.is_dir():
            problems.append("scenario.json missing or unreadable")
        scenario = {}
    for f in FILES[:3] if sdir.is_dir() else ():
        if not (sdir / f).exists():
            problems.append(f"{f} missing")
    try:  # the orchestrator's note that the lab itself (not the fleet) failed in this scenario
        problems.append("the lab failed: " + (sdir / "lab-error.txt").read_text(errors="replace").strip()[:300])
    except OSError:
        pass
    client, b1 = read_jsonl(sdir / "client.jsonl")
    r53, b2 = read_jsonl(sdir / "route53.jsonl")
    events, b3 = read_jsonl(sdir / "events.jsonl")
    for f, b in zip(FILES, (b1, b2, b3)):
        if b:
            problems.append(f"{f}: {b} unreadable line(s) skipped")

    times = [float(r["t"]) for r in client + r53 + events]
    started = _num(scenario.get("started"))
    started = started if started is not None else (min(times) if times else 0.0)
    ended = _num(scenario.get("ended"))
    ended = ended if ended is not None else max([started] + times + [_seen(r) for r in client])
    scale = _num(scenario.get("scale")) or _num((run or {}).get("scale")) or 1.0
    phases = phase_bounds(scenario, events, ended)
    ref, ref_kind = reference(events, phases, started)
    origin = min(a for a, _ in phases.values()) if phases else started  # the load starts here

    by_phase = defaultdict(list)
    for r in client:
        by_phase[phase_of(_start(r), phases) or "during"].append(r)
    failed = [r for r in client if r.get("outcome") != "ok"]
    kinds = Counter(str(r.get("kind")) for r in client)

    detect = next((e["t"] - ref for e in sorted(r53, key=lambda e: e["t"]) if e.get("event") == "health" and e.get("healthy") is False and e["t"] >= ref), None)
    after_ref = [r for r in failed if _seen(r) >= ref]
    recover = max(_seen(r) for r in after_ref) - ref if after_ref else None
    window = [min(_seen(r) for r in after_ref) - ref, recover] if after_ref else None

    split = Counter()
    for r in failed:
        if r.get("kind") == "stream":
            split["streams"] += 1
        elif detect is not None and ref <= _start(r) <= ref + detect:
            split["in_detection_window"] += 1
        else:
            split["other"] += 1

    phase_names = [p for p in PHASES if p in phases] + [p for p in sorted(phases) if p not in PHASES]
    if not phase_names:
        phase_names = ["during"]
    per_phase = {}
    for p in phase_names:
        rs = by_phase.get(p, [])
        a, b = phases.get(p, (started, ended))
        n_short = sum(r.get("kind") == "short" for r in rs)
        per_phase[p] = {
            "requests": len(rs),
            "short_per_s": n_short / (b - a) if b > a else None,
            "failures": sum(r.get("outcome") != "ok" for r in rs),
            "failures_by_kind": dict(Counter(str(r.get("outcome")) for r in rs if r.get("outcome") != "ok")),
            "latency": latency_figures(rs),
            "lag": lag_figures(rs),
        }
    lag_p99s = [f["lag"]["p99"] for f in per_phase.values() if f["lag"]["p99"] is not None]

    name = str(scenario.get("name") or sdir.name)
    goal = scenario.get("goal")
    bounds = scenario.get("bounds") if isinstance(scenario.get("bounds"), dict) else {}
    bound = _num(bounds.get("failures"))
    samples = sample_figures(scenario.get("samples"))
    judge_flat = bool(scenario.get("flat_required", name == "soak"))
    not_flat = [i for i, s in samples.items() if s["flat"] is False] if judge_flat else []
    if judge_flat and not samples:
        not_flat = ["no samples"]
    if judge_flat:
        not_flat += [f"{i} (too few samples)" for i, s in samples.items() if s["flat"] is None]
    judge_schedule = bool(scenario.get("schedule_required", False))
    schedule_kept = bool(lag_p99s) and max(lag_p99s) < LAG_P99_KEPT

    n_fail = len(failed)
    reasons = []
    if goal == "zero":
        verdict = "pass" if n_fail == 0 else "FAIL"
        if n_fail:
            reasons.append(f"{n_fail} client-visible failure(s), goal zero")
    elif goal == "bounded":
        verdict = "pass" if bound is not None and n_fail <= bound else "FAIL"
        if bound is None:
            reasons.append("goal bounded but no bounds.failures given")
        elif n_fail > bound:
            reasons.append(f"{n_fail} client-visible failure(s), bound {bound:g}")
        # The bound covers the lost addresses only: a failure anywhere else fails the goal, and
        # so does a fault Route 53 never saw (it did not happen, or nothing was tested).
        lost = bounds.get("addresses")
        if isinstance(lost, list):
            elsewhere = [r for r in failed if r.get("ip") not in lost]
            if elsewhere:
                verdict = "FAIL"
                reasons.append(f"{len(elsewhere)} failure(s) on addresses that were not lost ({', '.join(sorted({str(r.get('ip')) for r in elsewhere}))})")
        if detect is None:
            verdict = "FAIL"
            reasons.append("Route 53 never marked an address unhealthy: the fault was not seen")
    elif goal == "measured":
        verdict = "measured"
    else:
        verdict = "FAIL"
        reasons.append(f"unknown goal {goal!r}")
    if not_flat and verdict in ("pass", "measured"):
        verdict = "FAIL"
    if not_flat:
        reasons.append("not flat: " + ", ".join(not_flat))
    # The load must have been sent: a client that died early would leave a "zero" with
    # nothing behind it.
    expected = _num(scenario.get("expected_short"))
    if expected is not None and kinds.get("short", 0) < LOAD_SENT_FRACTION * expected:
        verdict = "FAIL"
        reasons.append(f"only {kinds.get('short', 0)} short requests of the {expected:.0f} scheduled: the load was not sent")
    if judge_schedule and not schedule_kept:
        if verdict in ("pass", "measured"):
            verdict = "FAIL"
        reasons.append(f"schedule not kept: lag p99 {max(lag_p99s, default=float('nan')) * 1000:.0f} ms, limit {LAG_P99_KEPT * 1000:.0f} ms")
    # Capacity: a scenario that promises at least N - K addresses announced throughout says
    # so in its bounds, with the lowest count it sampled.
    announced = {"min": _num(bounds.get("announced_min")), "at_least": _num(bounds.get("announced_at_least")),
                 "of": _num(bounds.get("addresses_total")), "took_s": _num(bounds.get("took_s"))}
    if announced["at_least"] is not None:
        if announced["min"] is None:
            verdict = "FAIL"
            reasons.append("no sample of how many addresses were announced")
        elif announced["min"] < announced["at_least"]:
            verdict = "FAIL"
            reasons.append(f"only {announced['min']:g} addresses announced at one point, goal at least {announced['at_least']:g}")
    goal_verdict = verdict  # what the records there are say, even when some are missing
    if problems:
        verdict = "incomplete"
        reasons = problems + [f"the records there are: {goal_verdict}"] + reasons

    return {
        "name": name,
        "file": re.sub(r"[^A-Za-z0-9._-]", "_", name),
        "dir": sdir.name,
        "ran": sdir.is_dir(),
        "title": str(scenario.get("title") or name),
        "goal": goal,
        "goal_text": str(scenario.get("goal_text") or ""),
        "bound": bound,
        "bound_window_s": _num(bounds.get("window_s")),
        "announced": announced,
        "verdict": verdict,
        "goal_verdict": goal_verdict,
        "passed": verdict in ("pass", "measured"),
        "reasons": reasons,
        "complete": not problems,
        "scale": scale,
        "rate": scenario.get("rate"),
        "started": started,
        "ended": ended,
        "origin": origin,
        "setup_s": origin - started,
        "duration_s": ended - origin,
        "reference": {"kind": ref_kind, "t": ref, "t_rel": ref - origin},
        "route53_config": scenario.get("route53") or {},
        "phases": {p: [a - origin, b - origin] for p, (a, b) in phases.items()},
        "events": [
            {"t_rel": e["t"] - origin, "event": e.get("event"), "detail": e.get("detail") or e.get("name") or ""}
            for e in sorted(events, key=lambda e: e["t"])
        ],
        "requests": len(client),
        "requests_by_kind": {"short": kinds.get("short", 0), "stream": kinds.get("stream", 0)},
        "failures": n_fail,
        "failures_by_kind": dict(sorted(Counter(str(r.get("outcome")) for r in failed).items())),
        "failures_by_ip": dict(sorted(Counter(str(r.get("ip")) for r in failed).items())),
        "failure_details": [
            {"outcome": o, "detail": d, "n": n}
            for (o, d), n in Counter((str(r.get("outcome")), str(r.get("detail") or "")[:120]) for r in failed).most_common(TOP_DETAILS)
        ],
        "failures_split": {k: split.get(k, 0) for k in ("in_detection_window", "streams", "other")},
        "detect_s": detect,
        "recover_s": recover,
        "failure_window_s": window,
        "per_phase": per_phase,
        "lag_p99_threshold_s": LAG_P99_KEPT,
        "schedule_kept": schedule_kept,
        "schedule_judged": judge_schedule,
        "route53": route53_figures(r53, ref, origin),
        "proxies": proxy_figures(scenario.get("proxies")),
        "samples": samples,
        "flat_judged": judge_flat,
        "_raw": {"client": client, "route53": r53, "events": events, "samples": scenario.get("samples") or []},
    }


# ---------------------------------------------------------------------------------------------
# Plots


def plot(fig_data: dict, images: Path) -> list[Path]:
    """<name>.png and, with samples, <name>-resources.png. Top: ok and failed requests per second
    (by kind, stacked; by the time the client saw the outcome; 1 s bins, wider past MAX_BINS s),
    a tick per failure above them, events as dashed lines, phases dotted, each address's Route 53
    unhealthy spans shaded. Bottom: p50/p99 latency of ok short requests per bin."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images.mkdir(parents=True, exist_ok=True)
    raw, t0 = fig_data["_raw"], fig_data["origin"]
    # 1 s bins; a run longer than MAX_BINS seconds gets wider ones (rates averaged over the bin),
    # or a soak of hours would be a smear of single-pixel lines.
    width = max(1, math.ceil(fig_data["duration_s"] / MAX_BINS))
    n_bins = max(1, math.ceil(fig_data["duration_s"] / width))
    xs = [b * width for b in range(n_bins)]

    def bin_of(t: float) -> int | None:
        b = math.floor((t - t0) / width)
        return b if 0 <= b < n_bins else None

    ok = [0.0] * n_bins
    fails = defaultdict(lambda: [0.0] * n_bins)
    marks = defaultdict(list)  # each failure's time, so one failure in hours still shows
    lat = defaultdict(list)
    for r in raw["client"]:
        b = bin_of(_seen(r))
        if b is None:
            continue
        if r.get("outcome") == "ok":
            ok[b] += 1 / width
            if r.get("kind") == "short" and _num(r.get("latency")) is not None:
                lat[b].append(r["latency"] * 1000)
        else:
            fails[str(r.get("outcome"))][b] += 1 / width
            marks[str(r.get("outcome"))].append(_seen(r) - t0)

    fig, (ax, axl) = plt.subplots(2, 1, figsize=(10, 4), dpi=100, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    edges = xs + [n_bins * width]
    ax.step(edges, ok + ok[-1:], where="post", color="tab:green", lw=1, label="ok/s")
    bottom = [0.0] * n_bins
    colors = ["tab:red", "tab:orange", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "black", "tab:gray", "tab:cyan"]
    for i, (kind, counts) in enumerate(sorted(fails.items())):
        top = [a + b for a, b in zip(bottom, counts)]
        # One stepped polygon per kind, stacked: cheap even for hours of 1 s bins.
        ax.fill_between(edges, bottom + bottom[-1:], top + top[-1:], step="post", color=colors[i % len(colors)], lw=0, label=f"{kind}/s")
        bottom = top
    fail_colors = {kind: colors[i % len(colors)] for i, kind in enumerate(sorted(fails))}
    ref = fig_data["reference"]["t"]
    shades = ["tab:red", "tab:blue", "tab:orange", "tab:purple"]
    r = fig_data["route53"]
    for i, ip in enumerate(sorted(set(r["health_changes"]) | set(r["health_at_load_start"]))):
        changes = r["health_changes"].get(ip, [])
        down = 0.0 if r["health_at_load_start"].get(ip) is False else None
        spans = []
        for c in changes:
            t = c["t"] + ref - t0
            if not c["healthy"] and down is None:
                down = t
            elif c["healthy"] and down is not None:
                spans.append((down, t))
                down = None
        if down is not None:
            spans.append((down, fig_data["duration_s"]))
        for j, (a, b) in enumerate(spans):
            for axis in (ax, axl):
                axis.axvspan(a, b, color=shades[i % len(shades)], alpha=0.12, label=f"R53 unhealthy {ip}" if (axis is ax and j == 0) else None)
    ymax = max([1] + ok + bottom)
    for e in fig_data["events"]:
        if e["event"] == "phase":
            continue
        for axis in (ax, axl):
            axis.axvline(e["t_rel"], color="gray", ls="--", lw=0.8)
        ax.text(e["t_rel"], ymax * 1.33, str(e["event"])[:16], rotation=90, fontsize=6, va="top", ha="right")
    for p, (a, _b) in fig_data["phases"].items():
        ax.axvline(a, color="black", ls=":", lw=0.6)
        ax.text(a, 0, f" {p}", fontsize=6, va="bottom", ha="left", color="black")
    for kind, ts in marks.items():
        ax.plot(ts[:MAX_MARKS], [ymax * 1.15] * len(ts[:MAX_MARKS]), "|", ms=5, color=fail_colors[kind])
    ax.set_ylim(0, ymax * 1.35)
    ax.set_ylabel("requests per second" + (f" ({width} s bins)" if width > 1 else ""), fontsize=7)
    ax.legend(fontsize=6, loc="upper left", ncol=4)
    ax.set_title(f"{fig_data['title']} ({fig_data['name']}), scale 1/{fig_data['scale']:g}", fontsize=8)
    lx = sorted(lat)
    centres = [(b + 0.5) * width for b in lx]
    axl.plot(centres, [percentile(lat[b], 0.5) for b in lx], lw=0.8, label="p50 ms")
    axl.plot(centres, [percentile(lat[b], 0.99) for b in lx], lw=0.8, label="p99 ms")
    if lx:
        axl.set_yscale("log")
    axl.set_ylabel("latency ms", fontsize=7)
    axl.set_xlabel("seconds since the load started", fontsize=7)
    axl.legend(fontsize=6, loc="upper left", ncol=2)
    for axis in (ax, axl):
        axis.tick_params(which="both", labelsize=7)
        axis.set_xlim(0, n_bins * width)
    # Fixed margins: tight_layout would cost half the plot's time for the same picture.
    fig.subplots_adjust(left=0.06, right=0.99, top=0.93, bottom=0.11, hspace=0.1)
    out = [images / f"{fig_data['file']}.png"]
    fig.savefig(out[0], dpi=100)
    plt.close(fig)

    per = defaultdict(list)
    for s in raw["samples"]:
        if isinstance(s, dict) and _num(s.get("t")) is not None:
            per[str(s.get("instance"))].append(s)
    if per:
        fig, (ar, af) = plt.subplots(2, 1, figsize=(10, 4), dpi=100, sharex=True)
        for inst, ss in sorted(per.items()):
            ss.sort(key=lambda s: s["t"])
            ar.plot([s["t"] - t0 for s in ss], [(_num(s.get("rss_bytes")) or 0) / 2**20 for s in ss], lw=0.8, label=inst)
            af.plot([s["t"] - t0 for s in ss], [_num(s.get("fds")) or 0 for s in ss], lw=0.8, label=inst)
        ar.set_ylabel("RSS MiB", fontsize=7)
        af.set_ylabel("fds", fontsize=7)
        af.set_xlabel("seconds since the load started", fontsize=7)
        ar.legend(fontsize=6, loc="upper left", ncol=4)
        ar.set_title(f"{fig_data['title']}: proxy RSS and descriptors", fontsize=8)
        for axis in (ar, af):
            axis.tick_params(which="both", labelsize=7)
        fig.subplots_adjust(left=0.06, right=0.99, top=0.93, bottom=0.11, hspace=0.1)
        out.append(images / f"{fig_data['file']}-resources.png")
        fig.savefig(out[1], dpi=100)
        plt.close(fig)
    return out


# ---------------------------------------------------------------------------------------------
# The document


def fmt_t(x: float | None, scale: float, signed: bool = False) -> str:
    """A scaled time figure: measured, and at real timings (measured x scale)."""
    if x is None:
        return "-"
    f = "{:+.1f}" if signed else "{:.1f}"
    if scale == 1:
        return f.format(x) + " s"
    return f.format(x) + " s (~" + f.format(x * scale) + " s real)"


def fmt_ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1000:.1f} ms"


def fmt_kinds(d: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def verdict_cell(s: dict) -> str:
    """The verdict for the goals table: failures are bold, a bounded goal shows both numbers."""
    v = s["verdict"]
    cell = "**FAIL**" if v == "FAIL" else v
    if s["goal"] == "bounded" and v in ("pass", "FAIL") and s["bound"] is not None:
        cell += f" ({s['failures']} {'<=' if s['failures'] <= s['bound'] else '>'} {s['bound']:g})"
    if v == "FAIL" and any(r.startswith("not flat") for r in s["reasons"]):
        cell += " (not flat)"
    if v == "FAIL" and any(r.startswith("schedule not kept") for r in s["reasons"]):
        cell += " (schedule not kept)"
    return cell


def section(s: dict, doc: Path, images: list[Path], notes_dir: Path) -> list[str]:
    sc = s["scale"]
    L = [f"## {s['title']} (`{s['name']}`)", ""]
    text = s["goal_text"].strip()
    text = f": {text}" + ("" if text.endswith(".") else ".") if text else "."
    L.append(f"Goal: **{s['goal']}**{text} Verdict: **{s['verdict']}**.")
    if s["goal"] == "bounded":
        win = f", from a window of {fmt_t(s['bound_window_s'], sc)}" if s.get("bound_window_s") is not None else ""
        L.append(f"Bound: at most {'-' if s['bound'] is None else format(s['bound'], 'g')} failures{win}; seen {s['failures']}.")
    a = s.get("announced") or {}
    if a.get("at_least") is not None:
        took = f"; the replacement took {fmt_t(a['took_s'], sc)}" if a.get("took_s") is not None else ""
        lowest = "-" if a.get("min") is None else format(a["min"], "g")
        L.append(f"Capacity: at least {a['at_least']:g} of {a.get('of') or 0:g} addresses announced by Route 53 and served"
                 f" by a healthy instance throughout; the lowest seen was {lowest}{took}.")
    if s["reasons"]:
        L.append("")
        L += [f"- {r}" for r in s["reasons"]]
    L += ["", "### What was done", ""]
    rate = f", {s['rate']} requests/s at 1x" if s.get("rate") is not None else ""
    L.append(f"Load for {fmt_t(s['duration_s'], sc)}{rate}, after {fmt_t(s['setup_s'], sc)} building the deployment."
             " Times from the start of the load (the first phase); the setup's events have negative times:")
    L.append("")
    L += [f"- {fmt_t(e['t_rel'], sc, signed=True)} {e['event']}" + (f": {e['detail']}" if e["detail"] else "") for e in s["events"]] or ["- (no events recorded)"]
    ref = s["reference"]
    what = {"during": "the start of the during phase (no fault event)", "start": "the scenario start (no fault event, no phases)"}.get(ref["kind"], f"the first `{ref['kind']}` event")
    L += ["", f"Reference (\"the fault\") for detect, recover and Route 53 times: {what}, at {fmt_t(ref['t_rel'], sc, signed=True)}.", ""]
    L += ["### Figures", ""]
    rk = s["requests_by_kind"]
    L.append(f"- Requests sent: {s['requests']} ({rk['short']} short, {rk['stream']} streams).")
    L.append(f"- Client-visible failures: {s['failures']} ({fmt_kinds(s['failures_by_kind'])}).")
    if s["failures"]:
        sp = s["failures_split"]
        L.append(
            f"  - {sp['streams']} on streams, {sp['in_detection_window']} short requests started in the detection window, {sp['other']} other;"
            f" by address: {fmt_kinds(s['failures_by_ip'])}."
        )
        L.append("  - most common: " + "; ".join(f"{d['n']} x {d['outcome']}" + (f" `{d['detail']}`" if d["detail"] else "") for d in s["failure_details"]) + ".")
    w = s["failure_window_s"]
    L.append(f"- Detect: {fmt_t(s['detect_s'], sc)}. Recover: {fmt_t(s['recover_s'], sc)}." + (f" Failure window: {fmt_t(w[0], sc, True)} to {fmt_t(w[1], sc, True)} from the reference." if w else ""))
    L += ["", "| phase | requests | short/s | failures | latency p50 | latency p99 | lag p50 | lag p99 | lag max |", "|---|---|---|---|---|---|---|---|---|"]
    for p, f in s["per_phase"].items():
        fails = str(f["failures"]) + (f" ({fmt_kinds(f['failures_by_kind'])})" if f["failures"] else "")
        rate = "-" if f["short_per_s"] is None else f"{f['short_per_s']:.1f}"
        L.append(f"| {p} | {f['requests']} | {rate} | {fails} | {fmt_ms(f['latency']['p50'])} | {fmt_ms(f['latency']['p99'])} | {fmt_ms(f['lag']['p50'])} | {fmt_ms(f['lag']['p99'])} | {fmt_ms(f['lag']['max'])} |")
    worst = max((f["lag"]["p99"] for f in s["per_phase"].values() if f["lag"]["p99"] is not None), default=None)
    L += ["", "Latency: ok short requests, start to last byte (not scaled). Generator schedule: "
          + ("**kept**" if s["schedule_kept"] else "**not kept**")
          + f" (kept: lag p99 under {s['lag_p99_threshold_s'] * 1000:.0f} ms in every phase; worst phase here {fmt_ms(worst)}).", ""]
    r = s["route53"]
    L.append("Route 53:")
    L.append("")
    for ip, healthy in sorted(r["health_at_load_start"].items()):
        if not healthy:
            L.append(f"- {ip}: unhealthy already when the load started")
    if r["health_changes"]:
        for ip, ch in sorted(r["health_changes"].items()):
            marks = "; ".join(f"{fmt_t(c['t'], sc, True)} {'healthy' if c['healthy'] else 'unhealthy'} ({c['healthy_checkers']}/{c['checkers']})" for c in ch)
            L.append(f"- {ip}: {marks}")
    else:
        L.append("- no health changes")
    frac = ", ".join(f"{ip} {f * 100:.1f}%" for ip, f in r["answer_fraction"].items()) or "no answers recorded"
    L.append(f"- answers: {frac}; {r['fail_open_intervals']} of {r['answer_intervals']} answer intervals fail-open.")
    L += ["", "Proxies (after - before, changed metrics only):", ""]
    if s["proxies"]:
        for inst, ch in sorted(s["proxies"].items()):
            if ch is None:
                L.append(f"- {inst}: no after sample (instance gone)")
            else:
                new = " (started during the scenario: counted from 0)" if ch["new"] else ""
                L.append(f"- {inst}{new}: " + (", ".join(f"`{m}` {v:+g}" for m, v in ch["changes"].items()) or "no change"))
    else:
        L.append("- no proxy metrics recorded")
    if s["samples"]:
        L += ["", "| instance | samples | RSS first / last / max MiB | fds first / last / max | CPU s last | flat |", "|---|---|---|---|---|---|"]
        for inst, f in s["samples"].items():
            rss, fds, cpu = f["rss_bytes"], f["fds"], f["cpu_seconds"]
            mib = lambda v: f"{v / 2**20:.1f}"
            flat = "-" if f["flat"] is None else (
                ("yes" if f["flat"] else "**no**") + f" (RSS {f['rss_growth_bytes'] / 2**20:+.2f} MiB, bound {f['rss_bound_bytes'] / 2**20:.2f}; fds {f['fds_change']:+g})"
            )
            L.append(
                f"| {inst} | {f['n']} | " + (f"{mib(rss['first'])} / {mib(rss['last'])} / {mib(rss['max'])}" if rss else "-")
                + " | " + (f"{fds['first']:g} / {fds['last']:g} / {fds['max']:g}" if fds else "-")
                + " | " + (f"{cpu['last']:.2f}" if cpu else "-") + f" | {flat} |"
            )
        L += ["", f"Flat: median RSS growth from the second tenth of the samples to the last tenth at most max(5%, 2 MiB), median fds within {FD_SLACK}, CPU rate of the last tenth at most max(1.5x, +0.02 s/s) the second tenth's"
              + ("" if s["flat_judged"] else " (reported, not judged in this scenario)") + "."]
    L.append("")
    for img in images:
        rel = Path(os.path.relpath(img, doc.parent)).as_posix()
        L += [f"![{s['name']}]({rel})", ""]
    note = notes_dir / f"{s['file']}.md"
    try:
        shown = note.resolve().relative_to(REPO).as_posix()
    except ValueError:
        shown = str(note)
    L += ["### What this means for an operator", "", f"<!-- hand-written, included verbatim from {shown}: edit that file, not this section -->", ""]
    try:
        L.append(note.read_text(encoding="utf-8").rstrip("\n"))
    except OSError:
        L.append("(no notes yet)")
    L.append("")
    return L


def document(run: dict | None, summaries: list[dict], doc: Path, images: dict[str, list[Path]], notes_dir: Path, run_dir: Path) -> str:
    L = ["# Fleet rehearsal: the 2016 design's tests in the lab", ""]
    L.append(f"Generated by `loadtest/lab/report.py` from `{run_dir.name}`; regenerate rather than edit. The figures are defined in that module's docstring.")
    L += ["", "## How it was run", ""]
    if run:
        for key in ("started", "ended", "scale", "mode", "machine", "commit", "command"):
            if key in run:
                v = run[key]
                if key in ("started", "ended") and _num(v) is not None:
                    import datetime

                    v = datetime.datetime.fromtimestamp(v, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
                L.append(f"- {key}: " + (f"`{v}`" if key in ("command", "commit") else str(v)))
    else:
        L.append("(no run.json: when, where and how this run was made is not recorded)")
    scales = sorted({s["scale"] for s in summaries}) or [_num((run or {}).get("scale")) or 1.0]
    sc = scales[0]
    L += ["", "## Time scale", ""]
    if scales == [1.0]:
        L.append("Scale 1: this run used real timings (Route 53 intervals, TTLs, drain delay and grace as in production).")
    else:
        L.append(
            f"Scale {', '.join(f'{x:g}' for x in scales)}: every Route 53 interval, TTL, drain delay and grace is divided by SCALE, "
            f"so a detection time of 3.4 s here is about {3.4 * sc:g} s at real timings. Every time figure below is given measured "
            "and at real timings (measured x SCALE). Latencies and the generator's lag are not scaled: they are the same at any scale."
        )
    L += ["", "## Scenarios against their goals", "", "| scenario | goal | requests | failures | verdict | detect | recover |", "|---|---|---|---|---|---|---|"]
    for s in summaries:
        L.append(
            f"| {s['title']} (`{s['name']}`) | {s['goal']} | {s['requests']} | {s['failures']} | {verdict_cell(s)} | {fmt_t(s['detect_s'], s['scale'])} | {fmt_t(s['recover_s'], s['scale'])} |"
        )
    if not summaries:
        L.append("| (no scenarios found) | | | | | | |")
    L.append("")
    for s in summaries:
        L += section(s, doc, images.get(s["name"], []), notes_dir)
    return "\n".join(L) + "\n"


# ---------------------------------------------------------------------------------------------


def safe_analyse(sdir: Path, run: dict | None) -> dict:
    """analyse(), or, when records of a shape nobody expected break it, an incomplete scenario
    that says why, so one odd directory does not cost the report of the others."""
    try:
        return analyse(sdir, run)
    except Exception as e:
        print(f"report: cannot analyse {sdir}: {type(e).__name__}: {e}", file=sys.stderr)
        s = analyse(sdir / ".report-no-such-directory", run)
        s.update(name=sdir.name, dir=sdir.name, ran=False, verdict="incomplete", passed=False,
                 reasons=[f"the report could not read it: {type(e).__name__}: {e}"])
        return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="Figures: see the module docstring.")
    ap.add_argument("run_dir", type=Path, help="directory with one subdirectory per scenario run (and run.json)")
    # No default inside the repository: a CI run with only --check must not overwrite the
    # committed docs/rehearsal.md with a short run's figures.
    ap.add_argument("--doc", type=Path, help="markdown to write, e.g. docs/rehearsal.md (default RUN_DIR/rehearsal.md)")
    ap.add_argument("--images", type=Path, help="directory for <scenario>.png (default: beside --doc, named for it: docs/rehearsal/)")
    ap.add_argument("--notes", type=Path, default=REPO / "loadtest" / "lab" / "notes", help="directory of hand-written <scenario>.md notes")
    ap.add_argument("--check", action="store_true", help="exit 1 if a scenario fails its goal (after writing everything)")
    args = ap.parse_args(argv)
    if not args.run_dir.is_dir():
        ap.error(f"{args.run_dir} is not a directory")
    args.doc = args.doc or args.run_dir / "rehearsal.md"
    args.images = args.images or args.doc.with_suffix("")

    run = read_json(args.run_dir / "run.json")
    dirs = scenario_dirs(args.run_dir)
    planned = [n for n in (run or {}).get("scenarios") or [] if isinstance(n, str) and n not in {d.name for d in dirs}]
    summaries = [safe_analyse(d, run) for d in dirs + [args.run_dir / n for n in planned]]
    summaries.sort(key=lambda s: (not s["ran"], s["started"], s["dir"]))
    seen = Counter()
    for s in summaries:  # two runs of one scenario in one RUN_DIR must not share an image
        seen[s["name"]] += 1
        n = seen[s["name"]]
        if n > 1:
            s["name"], s["file"] = f"{s['name']}-{n}", f"{s['file']}-{n}"
    images = {}
    for s in summaries:
        if not s["ran"]:
            continue
        try:
            images[s["name"]] = plot(s, args.images)
        except Exception as e:  # a plot that cannot be drawn must not cost the figures and verdicts
            print(f"report: no plot for {s['name']}: {type(e).__name__}: {e}", file=sys.stderr)
    args.doc.parent.mkdir(parents=True, exist_ok=True)
    args.doc.write_text(document(run, summaries, args.doc, images, args.notes, args.run_dir), encoding="utf-8")
    failed = [s for s in summaries if not s["passed"]]
    summary = {
        "run": run,
        "passed": bool(summaries) and not failed,
        "failed": [s["name"] for s in failed],
        "scenarios": {s["name"]: {k: v for k, v in s.items() if not k.startswith("_")} for s in summaries},
    }
    (args.run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.doc}, {sum(len(v) for v in images.values())} image(s) in {args.images}, {args.run_dir / 'summary.json'}")
    if args.check:
        if not summaries:
            print("FAIL: no scenarios found", file=sys.stderr)
            return 1
        for s in failed:
            print(f"FAIL {s['name']}: {s['verdict']}: " + "; ".join(s["reasons"]), file=sys.stderr)
        return 1 if failed else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
