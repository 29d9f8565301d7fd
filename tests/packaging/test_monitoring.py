"""The monitoring kit in docs/monitoring, checked by the real tools: the alerting rules by
`promtool check rules` and `promtool test rules` (cases that fire and cases that must not), the
live /metrics of the packaged binary by `promtool check metrics`, and every dashboard query and
every alert expression evaluated by a real Prometheus (Debian's package) scraping that proxy,
so that a query naming a metric the proxy does not export fails here."""

import json
import os
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
import yaml

from conftest import ROOT, free_port, stop

MONITORING = ROOT / "docs" / "monitoring"
PROMTOOL = "/usr/bin/promtool"
PROMETHEUS = "/usr/bin/prometheus"
BACKEND_NAME = "api.test"
# Grafana's variables, as the dashboard's queries use them, given values Prometheus takes.
GRAFANA_VARIABLES = {"$instance": ".*", "$__rate_interval": "15s"}
METRIC_NAME = re.compile(r"\b((?:static_ingress|process)_[a-z_]+)\b")


def run(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


def get(url):
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


def dashboard_queries():
    dash = json.loads((MONITORING / "dashboard.json").read_text())
    out = []
    for panel in dash["panels"]:
        for target in panel["targets"]:
            out.append((panel["title"], target["expr"]))
    return out


def alert_expressions():
    rules = yaml.safe_load((MONITORING / "alerts.yml").read_text())
    return [(r["alert"], r["expr"]) for g in rules["groups"] for r in g["rules"]]


def with_values(expr):
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


def test_promtool_checks_the_rules():
    r = run(PROMTOOL, "check", "rules", str(MONITORING / "alerts.yml"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 8 rules found" in r.stdout, r.stdout


def test_the_alerts_fire_where_they_should_and_a_handoff_is_no_alert():
    r = run(PROMTOOL, "test", "rules", "alerts.test.yml", cwd=MONITORING)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


@pytest.fixture(scope="module")
def proxy(binary, tmp_path_factory):
    """The packaged binary in front of a live backend found through a real DNS server
    (dnsmasq), with its operator's listener; yields that listener's address."""
    work = tmp_path_factory.mktemp("monitoring-proxy")
    # The kernel completes the health checks' connects into its backlog: enough for a test
    # of well under a minute.
    backend = socket.create_server(("127.0.0.1", 0), backlog=512)
    dns_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("STATIC_INGRESS_")}
    dns = subprocess.Popen(
        ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
         "--listen-address=127.0.0.1", "--bind-interfaces", f"--port={dns_port}",
         f"--host-record={BACKEND_NAME},127.0.0.1", "--local-ttl=5", "--pid-file=", "--log-facility=-"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    operator = f"127.0.0.1:{free_port()}"
    config = work / "static-ingress.toml"
    config.write_text("# every setting comes from the flags\n")
    log = (work / "proxy.log").open("w")
    proc = None
    try:
        proc = subprocess.Popen(
            [str(binary), "run", "--config", str(config),
             "--backend-address", f"{BACKEND_NAME}:{backend.getsockname()[1]}",
             "--dns-nameservers", f"127.0.0.1:{dns_port}",
             "--proxy-listen", f"127.0.0.1:{free_port()}", "--admin-listen", f"127.0.0.1:{free_port()}",
             "--admin-operator-listen", operator, "--lifecycle-drain-delay", "0s"],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while True:
            try:
                if '"state": "healthy"' in get(f"http://{operator}/status"):
                    break
            except OSError:
                pass
            assert proc.poll() is None, (work / "proxy.log").read_text()
            assert time.monotonic() < deadline, (work / "proxy.log").read_text()
            time.sleep(0.2)
        yield operator
    finally:
        if proc:
            stop(proc)
        stop(dns)
        backend.close()
        log.close()


def test_promtool_finds_nothing_to_lint_in_the_live_metrics(proxy):
    body = get(f"http://{proxy}/metrics")
    r = run(PROMTOOL, "check", "metrics", input=body)
    assert r.returncode == 0, r.stdout + r.stderr


def test_every_dashboard_query_and_alert_names_metrics_the_proxy_exports(proxy):
    body = get(f"http://{proxy}/metrics")
    exported = {line.split("{")[0].split(" ")[0] for line in body.splitlines() if line and not line.startswith("#")}
    for title, expr in dashboard_queries() + alert_expressions():
        for name in METRIC_NAME.findall(expr):
            assert name in exported, f"{title}: {name} is not in the proxy's /metrics"


@pytest.fixture(scope="module")
def prometheus(proxy, tmp_path_factory):
    """Debian's Prometheus scraping the proxy every second, with the alerting rules loaded."""
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(MONITORING / "alerts.yml")],
        "scrape_configs": [{"job_name": "static-ingress", "static_configs": [{"targets": [proxy]}]}],
    }))  # fmt: skip
    listen = f"127.0.0.1:{free_port()}"
    log = (work / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
         f"--web.listen-address={listen}"],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    api = f"http://{listen}/api/v1"
    try:
        # Ready once it holds a few scrapes of the proxy (rates need two samples in their range).
        deadline = time.monotonic() + 60
        while True:
            try:
                found = query(api, 'count_over_time(up{job="static-ingress"}[1m]) >= 5 and up == 1')
                if found:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (work / "prometheus.log").read_text()
            assert time.monotonic() < deadline, (work / "prometheus.log").read_text()[-2000:]
            time.sleep(0.5)
        yield api
    finally:
        stop(proc)
        log.close()


def query(api, expr):
    answer = json.loads(get(f"{api}/query?" + urllib.parse.urlencode({"query": expr})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def test_a_real_prometheus_answers_every_dashboard_query(prometheus):
    empty = []
    for title, expr in dashboard_queries():
        if not query(prometheus, with_values(expr)):
            empty.append(f"{title}: {expr}")
    assert not empty, "queries with no data from a running proxy:\n" + "\n".join(empty)
    instances = json.loads(get(f"{prometheus}/label/instance/values?match[]=static_ingress_build_info"))
    assert instances["data"], "the dashboard's proxy variable would list nothing"


def test_a_real_prometheus_loads_the_rules_and_none_fires_on_a_healthy_proxy(prometheus):
    groups = json.loads(get(f"{prometheus}/rules"))["data"]["groups"]
    rules = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(rules) == {name for name, _ in alert_expressions()}
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    assert query(prometheus, "ALERTS") == []
    # Each expression evaluates (no error) against the live series.
    for name, expr in alert_expressions():
        query(prometheus, expr)
