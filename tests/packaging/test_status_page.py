"""The status page in a real headless browser (Debian's chromium): the packaged binary runs with a
live backend and a failing one, and the test reads the page as a person would, on a phone-sized
window, then saves a screenshot in its own temporary directory. `make screenshot` runs this
test with STATIC_INGRESS_SCREENSHOT naming docs/status-page.png, the one the README shows."""

import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from conftest import free_port, stop
from webdriver import Browser

LIVE_NAME = "api.example.com"
FAILING_NAME = "legacy.example.com"


@pytest.fixture
def live_backend():
    """A TCP server that accepts and holds connections (health checks connect and close)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                conn.close()
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join(5)
    server.close()


def get(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def proxy(binary, live_backend, tmp_path):
    """The proxy in front of the live backend (route `default`) and of a port nobody listens on
    (route `legacy`), its page on an operator's listener apart from the Route 53 port."""
    failing = free_port()  # bound and closed: connections to it are refused
    ports = {"proxy": free_port(), "admin": free_port(), "operator": free_port()}
    config = tmp_path / "static-ingress.toml"
    config.write_text(
        f'[backend]\naddress = "127.0.0.1:{live_backend}"\n\n'
        f'[[route]]\nname = "legacy"\nserver_names = ["{FAILING_NAME}"]\nbackend = "127.0.0.1:{failing}"\n'
    )
    log = (tmp_path / "proxy.log").open("w")
    proc = subprocess.Popen(
        [str(binary), "run", "--config", str(config),
         "--proxy-listen", f"127.0.0.1:{ports['proxy']}",
         "--admin-listen", f"127.0.0.1:{ports['admin']}",
         "--admin-operator-listen", f"127.0.0.1:{ports['operator']}",
         "--health-interval", "500ms", "--lifecycle-drain-delay", "0s", "--lifecycle-grace-period", "1s"],
        stdout=log, stderr=subprocess.STDOUT, env={k: v for k, v in os.environ.items()
                                                   if not k.startswith("STATIC_INGRESS_")},
    )  # fmt: skip
    operator = f"http://127.0.0.1:{ports['operator']}"
    deadline = time.monotonic() + 20
    try:
        # Ready once the live address has passed its checks and the failing one has failed its.
        while True:
            try:
                code, body = get(f"{operator}/status")
                if code == 200 and '"unhealthy"' in body and '"state": "healthy"' in body:
                    break
            except OSError:
                pass
            assert proc.poll() is None, (tmp_path / "proxy.log").read_text()
            assert time.monotonic() < deadline, f"not ready: {(tmp_path / 'proxy.log').read_text()}"
            time.sleep(0.2)
        yield {"operator": operator, "admin": f"http://127.0.0.1:{ports['admin']}", "live": live_backend,
               "failing": failing}  # fmt: skip
    finally:
        stop(proc)
        log.close()


def test_the_status_page_reads_right_in_a_real_browser(proxy, tmp_path):
    with Browser(tmp_path) as browser:
        # ?refresh=0: the page must not reload itself between the reads below.
        browser.open(proxy["operator"] + "/?refresh=0")
        text = browser.text()
        title = browser.title()
        shot = browser.screenshot(tmp_path / "status-page.png")

        # The verdict first: healthy (one backend of two failing does not fail /health with the
        # default health.unhealthy_when = all_backends_down).
        assert title == "OK static-ingress"
        assert text.startswith("static-ingress: healthy\n/health answers 200"), text
        # Both backends, each with its own verdict and address.
        assert f"Backend default → 127.0.0.1:{proxy['live']} healthy" in text, text
        assert f"Backend legacy → 127.0.0.1:{proxy['failing']} ({FAILING_NAME}) unhealthy" in text, text
        assert f"127.0.0.1:{proxy['live']} healthy 0" in text, text
        assert f"127.0.0.1:{proxy['failing']} unhealthy 0" in text, text
        assert "Elastic IP disabled" in text, text
        assert "version" in text and "connections" in text and "0 open of" in text, text
        # A PNG of a phone-wide page.
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        width = int.from_bytes(data[16:20], "big")
        assert width >= 412, width
        target = os.environ.get("STATIC_INGRESS_SCREENSHOT")
        if target:
            shutil.copyfile(shot, target)

        # The Route 53 port shows nothing but /health and /live.
        browser.open(proxy["admin"] + "/")
        assert "this port serves /health and /live" in browser.text()
    code, body = get(proxy["admin"] + "/health")
    assert (code, body) == (200, "ok\n")
