"""report.py against hand-written run directories: the counts, verdicts and times a reader relies on."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import report

T0 = 1_800_000_000.0
MIB = 2**20
IP_A, IP_B, IP_C = "198.18.1.1", "198.18.1.2", "198.18.1.3"


def write_jsonl(path: Path, records: list[dict], tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def short(t: float, outcome: str = "ok", ip: str = IP_B, latency: float = 0.010, lag: float = 0.001) -> dict:
    return {
        "t": t, "start": t + lag, "lag": lag, "kind": "short", "ip": ip, "outcome": outcome,
        "detail": "" if outcome == "ok" else "ConnectionResetError", "latency": latency,
        "connect": 0.001, "tls": 0.004, "bytes": 64 if outcome == "ok" else 0,
        "backend": "blue" if outcome == "ok" else None, "worker": 0,
    }


def steady(start: float, end: float, step: float = 0.1, **kw) -> list[dict]:
    n = round((end - start) / step)
    return [short(start + i * step, **kw) for i in range(n)]


def scenario(name: str, goal: str, **extra) -> dict:
    base = {
        "name": name, "title": name.replace("_", " ").title(), "goal": goal, "goal_text": f"{goal} failures",
        "scale": 10, "rate": 10, "started": T0, "ended": T0 + 30,
        "phases": {"before": [T0, T0 + 10], "during": [T0 + 10, T0 + 20], "after": [T0 + 20, T0 + 30]},
        "route53": {"interval": 3, "failure_threshold": 1, "ttl": 6, "checkers": 3},
        "proxies": {}, "samples": [], "bounds": {"failures": None},
    }
    base.update(extra)
    return base


def make(run: Path, name: str, sc: dict | None, client: list[dict], r53: list[dict], events: list[dict], client_tail: str = "") -> Path:
    d = run / name
    d.mkdir(parents=True)
    write_jsonl(d / "client.jsonl", client, client_tail)
    write_jsonl(d / "route53.jsonl", r53)
    write_jsonl(d / "events.jsonl", events)
    if sc is not None:
        (d / "scenario.json").write_text(json.dumps(sc))
    return d


def phase_events() -> list[dict]:
    return [{"t": T0 + 10 * i, "event": "phase", "name": p} for i, p in enumerate(("before", "during", "after"))]


def answers(t: float, counts: dict) -> dict:
    return {"t": t, "event": "answers", "interval": 1.0, "counts": counts, "fail_open": False}


def flip(run: Path, **kw) -> Path:
    client = steady(T0, T0 + 30) + [
        {**short(T0 + 1, latency=28.0), "kind": "stream"},
        {**short(T0 + 1.5, latency=28.0), "kind": "stream"},
    ]
    events = phase_events() + [{"t": T0 + 12, "event": "flip", "detail": "backend name to green"}]
    r53 = [answers(T0 + i, {IP_A: 5, IP_B: 5}) for i in range(1, 30)]
    return make(run, "flip", scenario("flip", "zero"), client, r53, events, **kw)


def instance_death(run: Path, bound: int = 10) -> Path:
    fault = T0 + 10
    resets = [fault + 0.5 + 0.5 * i for i in range(5)]  # 10.5 .. 12.5, all before detection at 13.5
    client = [r for r in steady(T0, T0 + 30) if not any(abs(r["t"] - x) < 1e-6 for x in resets)]
    client += [short(x, outcome="reset", ip=IP_A, latency=0.04, lag=0.0) for x in resets]
    events = phase_events() + [
        {"t": fault, "event": "fault", "detail": "kill i-a"},
        {"t": fault + 8, "event": "instance_ready", "detail": "i-c"},
    ]
    r53 = [
        {"t": fault + 2.0, "event": "checker_status", "checker": 0, "health_check": "hc-a", "healthy": False},
        {"t": fault + 3.5, "event": "health", "health_check": "hc-a", "ip": IP_A, "healthy": False, "healthy_checkers": 0, "checkers": 3},
        {"t": fault + 12.0, "event": "health", "health_check": "hc-a", "ip": IP_A, "healthy": True, "healthy_checkers": 3, "checkers": 3},
    ] + [answers(T0 + i, {IP_A: 3, IP_B: 1}) for i in range(1, 10)] + [answers(T0 + i, {IP_B: 4}) for i in range(10, 30)]
    proxies = {
        "i-a": {"before": {'static_ingress_tcp_close_total{reason="eof"}': 40}, "after": None},
        "i-b": {
            "before": {'static_ingress_tcp_close_total{reason="eof"}': 10, "static_ingress_tcp_open_connections": 2},
            "after": {'static_ingress_tcp_close_total{reason="eof"}': 130, "static_ingress_tcp_open_connections": 2,
                      'static_ingress_tcp_close_total{reason="reset"}': 1},
        },
    }
    sc = scenario("instance_death", "bounded", bounds={"failures": bound}, proxies=proxies)
    return make(run, "instance_death", sc, client, r53, events)


def soak(run: Path, growing: bool) -> Path:
    samples = []
    for i in range(20):
        t = T0 + 1.5 * i
        for inst in ("i-a", "i-b"):
            rss = 50 * MIB + (i * 0.5 * MIB if growing and inst == "i-b" else (i % 3) * 0.2 * MIB)
            samples.append({"t": t, "instance": inst, "rss_bytes": rss, "fds": 20 + (i % 2), "cpu_seconds": 0.1 * i})
    sc = scenario("soak", "zero", samples=samples)
    return make(run, "soak", sc, steady(T0, T0 + 30), [answers(T0 + 1, {IP_B: 10})], phase_events())


def run_report(run: Path, tmp: Path, *extra: str) -> tuple[int, dict, str]:
    doc, images, notes = tmp / "out" / "rehearsal.md", tmp / "out" / "img", tmp / "notes"
    code = report.main([str(run), "--doc", str(doc), "--images", str(images), "--notes", str(notes), *extra])
    return code, json.loads((run / "summary.json").read_text()), doc.read_text()


def table(md: str) -> dict[str, list[str]]:
    """The rows of the goals table, keyed by the scenario's `name`."""
    lines = md.split("## Scenarios against their goals", 1)[1].split("\n## ", 1)[0].splitlines()
    rows = {}
    for line in lines:
        if line.startswith("| ") and "`" in line:
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows[cells[0].split("`")[1]] = cells
    return rows


def test_flip_with_zero_failures_passes(tmp_path):
    run = tmp_path / "run"
    flip(run)
    (run / "run.json").write_text(json.dumps({"started": T0, "ended": T0 + 40, "scale": 10, "machine": "2-core test box",
                                              "commit": "abc123", "mode": "short", "command": "make lab SCENARIO=flip"}))
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 0
    s = summary["scenarios"]["flip"]
    assert (s["requests"], s["requests_by_kind"], s["failures"], s["verdict"]) == (302, {"short": 300, "stream": 2}, 0, "pass")
    assert s["detect_s"] is None and s["recover_s"] is None and s["failure_window_s"] is None
    assert s["reference"]["kind"] == "flip" and s["reference"]["t_rel"] == pytest.approx(12)
    assert [s["per_phase"][p]["requests"] for p in ("before", "during", "after")] == [102, 100, 100]
    assert s["per_phase"]["during"]["latency"]["p50"] == pytest.approx(0.010)
    assert s["per_phase"]["during"]["short_per_s"] == pytest.approx(10.0)
    assert s["schedule_kept"] is True
    assert s["route53"]["answer_fraction"] == {IP_A: pytest.approx(0.5), IP_B: pytest.approx(0.5)}
    assert summary["passed"] is True and summary["failed"] == []
    assert table(md)["flip"][1:5] == ["zero", "302", "0", "pass"]
    assert "make lab SCENARIO=flip" in md and "2-core test box" in md
    assert "+12.0 s (~+120.0 s real) flip: backend name to green" in md


def test_instance_death_detect_recover_and_bound(tmp_path):
    run = tmp_path / "run"
    instance_death(run, bound=10)
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 0
    s = summary["scenarios"]["instance_death"]
    assert s["failures"] == 5 and s["failures_by_kind"] == {"reset": 5}
    assert s["failures_split"] == {"in_detection_window": 5, "streams": 0, "other": 0}
    assert s["failures_by_ip"] == {IP_A: 5}
    assert s["failure_details"] == [{"outcome": "reset", "detail": "ConnectionResetError", "n": 5}]
    assert s["per_phase"]["during"]["failures"] == 5 and s["per_phase"]["before"]["failures"] == 0
    assert s["detect_s"] == pytest.approx(3.5)
    assert s["recover_s"] == pytest.approx(2.54)  # last reset started at +2.5 and took 40 ms
    assert s["failure_window_s"] == pytest.approx([0.54, 2.54])
    assert [c["healthy"] for c in s["route53"]["health_changes"][IP_A]] == [False, True]
    assert s["route53"]["health_changes"][IP_A][0]["t"] == pytest.approx(3.5)
    assert s["proxies"]["i-a"] is None
    assert s["proxies"]["i-b"] == {"new": False, "changes": {'static_ingress_tcp_close_total{reason="eof"}': 120,
                                                             'static_ingress_tcp_close_total{reason="reset"}': 1}}
    assert s["verdict"] == "pass"
    row = table(md)["instance_death"]
    assert row[1:4] == ["bounded", "300", "5"] and row[4] == "pass (5 <= 10)"
    assert row[5] == "3.5 s (~35.0 s real)" and row[6] == "2.5 s (~25.4 s real)"
    assert 'static_ingress_tcp_close_total{reason="eof"}` +120' in md
    assert "i-a: no after sample (instance gone)" in md
    assert "most common: 5 x reset `ConnectionResetError`" in md
    assert "(no run.json" in md


def test_bounded_over_its_bound_fails_check(tmp_path):
    run = tmp_path / "run"
    instance_death(run, bound=3)
    flip(run)
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 1
    assert summary["failed"] == ["instance_death"]
    assert summary["scenarios"]["instance_death"]["verdict"] == "FAIL"
    assert table(md)["instance_death"][4] == "**FAIL** (5 > 3)"
    # Without --check the same run exits 0: only CI asks for the verdict.
    assert run_report(run, tmp_path)[0] == 0


def test_zero_goal_with_one_failure_fails(tmp_path):
    run = tmp_path / "run"
    d = flip(run)
    with open(d / "client.jsonl", "a") as f:
        f.write(json.dumps(short(T0 + 15.05, outcome="eof", latency=0.3)) + "\n")
    code, summary, md = run_report(run, tmp_path, "--check")
    s = summary["scenarios"]["flip"]
    assert code == 1 and s["verdict"] == "FAIL" and s["failures_by_kind"] == {"eof": 1}
    assert s["recover_s"] == pytest.approx(15.05 + 0.001 + 0.3 - 12)
    assert table(md)["flip"][4] == "**FAIL**"


def test_soak_flat_passes(tmp_path):
    run = tmp_path / "run"
    soak(run, growing=False)
    code, summary, md = run_report(run, tmp_path, "--check")
    s = summary["scenarios"]["soak"]
    assert code == 0 and s["verdict"] == "pass"
    assert all(f["flat"] is True for f in s["samples"].values())
    assert s["samples"]["i-a"]["rss_bytes"]["first"] == 50 * MIB
    assert s["samples"]["i-a"]["cpu_seconds"]["last"] == pytest.approx(1.9)
    img = tmp_path / "out" / "img"
    assert (img / "soak-resources.png").stat().st_size > 1000
    assert "](img/soak-resources.png)" in md


def test_soak_growing_rss_fails(tmp_path):
    run = tmp_path / "run"
    soak(run, growing=True)
    code, summary, md = run_report(run, tmp_path, "--check")
    s = summary["scenarios"]["soak"]
    assert table(md)["soak"][4] == "**FAIL** (not flat)"
    assert code == 1 and s["verdict"] == "FAIL" and s["failures"] == 0
    assert s["samples"]["i-a"]["flat"] is True and s["samples"]["i-b"]["flat"] is False
    # Medians: of the second tenth (samples 3-4 of 20: 51.25 MiB) and of the last tenth
    # (59.25 MiB); bound 5% of the baseline.
    assert s["samples"]["i-b"]["rss_growth_bytes"] == 8 * MIB
    assert s["samples"]["i-b"]["rss_bound_bytes"] == pytest.approx(0.05 * 51.25 * MIB)
    assert "not flat: i-b" in s["reasons"]


def test_truncated_file_and_missing_scenario_json_are_incomplete(tmp_path):
    run = tmp_path / "run"
    flip(run, client_tail='{"t": 1800000029.9, "start": 18000')
    make(run, "zone_partition", None, steady(T0, T0 + 5), [], [])
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 1
    f = summary["scenarios"]["flip"]
    assert f["verdict"] == "incomplete" and f["requests"] == 302 and f["failures"] == 0
    assert any("1 unreadable line" in r for r in f["reasons"])
    assert f["goal_verdict"] == "pass" and "the records there are: pass" in f["reasons"]
    z = summary["scenarios"]["zone_partition"]
    assert z["verdict"] == "incomplete" and z["requests"] == 50
    assert sorted(summary["failed"]) == ["flip", "zone_partition"]
    assert table(md)["flip"][4] == "incomplete"


def test_images_and_notes(tmp_path):
    run = tmp_path / "run"
    flip(run)
    instance_death(run)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "flip.md").write_text("An operator can flip **under load**: nothing to watch.\n\n- line two\n")
    _, _, md = run_report(run, tmp_path)
    img = tmp_path / "out" / "img"
    for name in ("flip", "instance_death"):
        size = (img / f"{name}.png").stat().st_size
        assert 1000 < size < 150_000, size
        assert f"](img/{name}.png)" in md
    flip_sec = md.split("## Flip (`flip`)", 1)[1].split("\n## ", 1)[0]
    assert "An operator can flip **under load**: nothing to watch.\n\n- line two" in flip_sec
    death_sec = md.split("(`instance_death`)", 2)[2]
    assert "### What this means for an operator" in death_sec and "(no notes yet)" in death_sec


def test_percentile_is_nearest_rank():
    assert report.percentile([], 0.5) is None
    assert report.percentile([3, 1, 2], 0.5) == 2
    assert report.percentile(list(range(1, 101)), 0.99) == 99
    assert report.percentile(list(range(1, 101)), 1.0) == 100
    assert report.percentile([5], 0.99) == 5


def test_cli_check_exit_status(tmp_path):
    run = tmp_path / "run"
    instance_death(run, bound=1)
    script = Path(report.__file__)
    out = tmp_path / "cli"
    args = [sys.executable, str(script), str(run), "--doc", str(out / "r.md"), "--images", str(out / "img"), "--notes", str(out / "n")]
    bad = subprocess.run(args + ["--check"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1, bad.stderr
    assert "FAIL instance_death" in bad.stderr and "bound 1" in bad.stderr
    assert (out / "img" / "instance_death.png").stat().st_size > 0


def test_empty_run_dir_fails_check(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 1 and summary["scenarios"] == {} and summary["passed"] is False
    assert "(no scenarios found)" in md


def test_orchestrator_shaped_run(tmp_path):
    """As lab.py writes it: the deployment is built before the first phase (with its own address
    moves), an "end" phase mark, a stopped proxy with an empty "after", a new one with no "before"."""
    run = tmp_path / "run"
    events = [
        {"t": T0 - 15, "event": "eip_move", "detail": f"{IP_A} (eipalloc-1) -> i-a"},
        {"t": T0 - 5, "event": "note", "detail": "fleet ready"},
        *phase_events(),
        {"t": T0 + 11, "event": "fault", "detail": "SIGTERM to static-ingress on i-a"},
        {"t": T0 + 14, "event": "instance_stop", "detail": "static-ingress on i-a exited 0"},
        {"t": T0 + 30, "event": "phase", "detail": "end", "name": "end"},
    ]
    proxies = {"i-a": {"before": {"m": 1}, "after": {}}, "i-n": {"before": {}, "after": {"m": 3}}}
    sc = scenario("graceful-stop", "zero", started=T0 - 20, proxies=proxies)
    r53 = [
        {"t": T0 - 10, "event": "health", "health_check": "hc-a", "ip": IP_A, "healthy": True, "healthy_checkers": 8, "checkers": 8},
        {"t": T0 - 9, "event": "health", "health_check": "hc-c", "ip": IP_C, "healthy": False, "healthy_checkers": 0, "checkers": 8},
        answers(T0 - 8, {IP_A: 100}),
        {"t": T0 + 12.5, "event": "health", "health_check": "hc-a", "ip": IP_A, "healthy": False, "healthy_checkers": 1, "checkers": 8},
        answers(T0 + 1, {IP_A: 1, IP_B: 3}),
    ]
    make(run, "graceful-stop", sc, steady(T0, T0 + 30), r53, events)
    code, summary, md = run_report(run, tmp_path, "--check")
    s = summary["scenarios"]["graceful-stop"]
    assert code == 0 and s["verdict"] == "pass"
    assert s["reference"] == {"kind": "fault", "t": T0 + 11, "t_rel": 11}
    assert s["detect_s"] == pytest.approx(1.5)
    assert s["setup_s"] == pytest.approx(20) and s["duration_s"] == pytest.approx(30)
    assert list(s["per_phase"]) == ["before", "during", "after"]
    assert s["proxies"] == {"i-a": None, "i-n": {"new": True, "changes": {"m": 3}}}
    assert "-15.0 s (~-150.0 s real) eip_move" in md
    # The setup's Route 53 changes and answers are left out; an address still down at the start is said.
    assert s["route53"]["health_changes"] == {IP_A: [{"t": 1.5, "healthy": False, "healthy_checkers": 1, "checkers": 8}]}
    assert s["route53"]["answer_fraction"] == {IP_A: 0.25, IP_B: 0.75}
    assert f"{IP_C}: unhealthy already when the load started" in md
    assert "i-n (started during the scenario: counted from 0): `m` +3" in md


def test_killed_run_open_phase_lab_error_and_scenario_not_run(tmp_path):
    run = tmp_path / "run"
    (run).mkdir()
    (run / "run.json").write_text(json.dumps({"scale": 10, "scenarios": ["flip", "instance-death", "fleet-replacement"]}))
    # A flip whose run was killed in "during": that phase has no end.
    sc = scenario("flip", "zero", ended=T0 + 15, phases={"before": [T0, T0 + 10], "during": [T0 + 10, None]})
    make(run, "flip", sc, steady(T0, T0 + 15), [], phase_events()[:2])
    d = instance_death(run)
    d.rename(run / "instance-death")
    (run / "instance-death" / "lab-error.txt").write_text("moto did not answer in 30 s\n")
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 1
    sc = summary["scenarios"]
    assert sc["flip"]["verdict"] == "pass" and sc["flip"]["per_phase"]["during"]["requests"] == 50
    assert sc["instance_death"]["verdict"] == "incomplete"
    assert any("moto did not answer" in r for r in sc["instance_death"]["reasons"])
    assert sc["fleet-replacement"]["verdict"] == "incomplete" and sc["fleet-replacement"]["ran"] is False
    assert sorted(summary["failed"]) == ["fleet-replacement", "instance_death"]
    assert table(md)["fleet-replacement"][4] == "incomplete"
    assert not (tmp_path / "out" / "img" / "fleet-replacement.png").exists()


def test_generator_lag_reported_and_judged_where_required(tmp_path):
    run = tmp_path / "run"
    client = steady(T0, T0 + 10) + steady(T0 + 10, T0 + 30, lag=0.2)  # fell 200 ms behind from +10 s
    make(run, "load-10x", scenario("load-10x", "zero", schedule_required=True), client, [], phase_events())
    make(run, "flip", scenario("flip", "zero"), list(client), [], phase_events())
    code, summary, md = run_report(run, tmp_path, "--check")
    x, f = summary["scenarios"]["load-10x"], summary["scenarios"]["flip"]
    assert x["per_phase"]["before"]["lag"]["p99"] == pytest.approx(0.001)
    assert x["per_phase"]["during"]["lag"]["p99"] == pytest.approx(0.2) and x["per_phase"]["during"]["lag"]["max"] == pytest.approx(0.2)
    assert x["schedule_kept"] is False and x["verdict"] == "FAIL" and x["failures"] == 0
    assert f["schedule_kept"] is False and f["verdict"] == "pass"  # reported, not judged
    assert code == 1 and summary["failed"] == ["load-10x"]
    assert table(md)["load-10x"][4] == "**FAIL** (schedule not kept)"
    assert "Generator schedule: **not kept** (kept: lag p99 under 50 ms in every phase; worst phase here 200.0 ms)" in md


def test_defaults_write_beside_the_records_not_into_the_repository(tmp_path):
    run = tmp_path / "run"
    flip(run)
    assert report.main([str(run), "--notes", str(tmp_path / "notes"), "--check"]) == 0
    assert "](rehearsal/flip.png)" in (run / "rehearsal.md").read_text()
    assert (run / "rehearsal" / "flip.png").stat().st_size > 0


def test_records_of_an_unexpected_shape_cost_only_their_scenario(tmp_path):
    run = tmp_path / "run"
    flip(run)
    odd = [{**short(T0 + 1), "latency": "slow", "kind": 5, "lag": None}, {"t": "yesterday"}, [1, 2]]
    make(run, "odd", scenario("odd", "zero", phases="all of them", proxies=[1, 2], samples={"x": 1}), odd, [], [])
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 1 and summary["failed"] == ["odd"]
    assert summary["scenarios"]["odd"]["verdict"] == "incomplete", summary["scenarios"]["odd"]["reasons"]
    assert any("could not read it" in r for r in summary["scenarios"]["odd"]["reasons"]), summary["scenarios"]["odd"]["reasons"]
    assert summary["scenarios"]["flip"]["verdict"] == "pass"
    assert table(md)["odd"][4] == "incomplete"


def test_two_runs_of_one_scenario_keep_their_own_images(tmp_path):
    run = tmp_path / "run"
    flip(run)
    later = scenario("flip", "zero", started=T0 + 100, ended=T0 + 130,
                     phases={"before": [T0 + 100, T0 + 130]})
    make(run, "flip-again", later, steady(T0 + 100, T0 + 130), [], [])
    code, summary, md = run_report(run, tmp_path, "--check")
    assert code == 0 and list(summary["scenarios"]) == ["flip", "flip-2"]
    img = tmp_path / "out" / "img"
    assert (img / "flip.png").stat().st_size > 0 and (img / "flip-2.png").stat().st_size > 0
    assert "](img/flip-2.png)" in md


def test_bounded_failures_only_on_the_lost_addresses(tmp_path):
    run = tmp_path / "run"
    d = instance_death(run, bound=10)
    sc = json.loads((d / "scenario.json").read_text())
    # Lost: IP_A. The same five resets are within the bound and on IP_A: a pass.
    sc["bounds"]["addresses"] = [IP_A]
    (d / "scenario.json").write_text(json.dumps(sc))
    assert run_report(run, tmp_path, "--check")[0] == 0
    # One failure on the address that was not lost fails the goal, although 6 <= 10.
    with open(d / "client.jsonl", "a") as f:
        f.write(json.dumps(short(T0 + 15, outcome="timeout", ip=IP_B)) + "\n")
    code, summary, _ = run_report(run, tmp_path, "--check")
    s = summary["scenarios"]["instance_death"]
    assert code == 1 and s["verdict"] == "FAIL"
    assert any("not lost" in r and IP_B in r for r in s["reasons"])


def test_bounded_fault_route53_never_saw_fails(tmp_path):
    run = tmp_path / "run"
    d = instance_death(run, bound=10)
    lines = [json.loads(x) for x in (d / "route53.jsonl").read_text().splitlines()]
    write_jsonl(d / "route53.jsonl", [r for r in lines if r["event"] != "health"])
    code, summary, _ = run_report(run, tmp_path, "--check")
    s = summary["scenarios"]["instance_death"]
    assert code == 1 and s["verdict"] == "FAIL" and s["detect_s"] is None
    assert any("never marked" in r for r in s["reasons"])


def test_zero_goal_without_the_scheduled_load_fails(tmp_path):
    run = tmp_path / "run"
    d = flip(run)
    sc = json.loads((d / "scenario.json").read_text())
    sc["expected_short"] = 300  # the records hold 300: passes
    (d / "scenario.json").write_text(json.dumps(sc))
    assert run_report(run, tmp_path, "--check")[0] == 0
    sc["expected_short"] = 600  # a client that sent half of its schedule
    (d / "scenario.json").write_text(json.dumps(sc))
    code, summary, _ = run_report(run, tmp_path, "--check")
    assert code == 1
    assert any("load was not sent" in r for r in summary["scenarios"]["flip"]["reasons"])


def test_soak_cpu_rate_climbing_is_not_flat(tmp_path):
    run = tmp_path / "run"
    samples = []
    for i in range(40):
        t = T0 + 0.75 * i
        # Flat memory and descriptors, but CPU per second rising from 0.01 to 0.4 s/s.
        cpu = sum(0.01 + 0.01 * k for k in range(i))
        samples.append({"t": t, "instance": "i-a", "rss_bytes": 50 * MIB, "fds": 20, "cpu_seconds": cpu})
    make(run, "soak", scenario("soak", "zero", samples=samples), steady(T0, T0 + 30), [answers(T0 + 1, {IP_B: 10})], phase_events())
    code, summary, _ = run_report(run, tmp_path, "--check")
    fig = summary["scenarios"]["soak"]["samples"]["i-a"]
    assert code == 1 and fig["cpu_flat"] is False and fig["flat"] is False


def test_soak_descriptors_of_open_connections_at_the_last_sample_are_flat(tmp_path):
    # Streams open at the moment of the last sample add descriptors; a leak would move the
    # median of the last tenth, a snapshot does not.
    run = tmp_path / "run"
    samples = [{"t": T0 + 0.5 * i, "instance": "i-a", "rss_bytes": 50 * MIB, "fds": 20 + (8 if i in (5, 59) else 0),
                "cpu_seconds": 0.005 * i} for i in range(60)]
    make(run, "soak", scenario("soak", "zero", samples=samples), steady(T0, T0 + 30), [answers(T0 + 1, {IP_B: 10})], phase_events())
    code, summary, _ = run_report(run, tmp_path, "--check")
    assert code == 0 and summary["scenarios"]["soak"]["samples"]["i-a"]["flat"] is True
    # The same descriptors held over the last tenth are a leak.
    for i in range(54, 60):
        samples[i]["fds"] = 28
    (run / "soak" / "scenario.json").write_text(json.dumps(scenario("soak", "zero", samples=samples)))
    code, summary, _ = run_report(run, tmp_path, "--check")
    assert code == 1 and summary["scenarios"]["soak"]["samples"]["i-a"]["flat"] is False
