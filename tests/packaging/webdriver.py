"""A real headless browser for tests: Debian's chromium driven by its chromedriver over the W3C
WebDriver protocol (plain JSON over HTTP, so no client library is needed). Only what the status
page test uses: open a URL, read the text a person would see, take a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from conftest import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
START_TIMEOUT_S = 30.0
REQUEST_TIMEOUT_S = 60.0


class WebDriverError(Exception):
    pass


class Browser:
    """One chromedriver process and one headless chromium session, `width` x `height` CSS
    pixels (a phone by default). Use as a context manager: both stop at the end."""

    def __init__(self, workdir: Path, width: int = 412, height: int = 915):
        for path in (CHROMIUM, CHROMEDRIVER):
            if not shutil.which(path):
                raise WebDriverError(f"{path} not found: scripts/install-system-packages.sh chromium chromium-driver")
        self.port = free_port()
        self.log = workdir / "chromedriver.log"
        self.driver = subprocess.Popen(
            [CHROMEDRIVER, f"--port={self.port}", f"--log-path={self.log}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            # Its own process group, with the browsers it starts: close() ends the group.
            start_new_session=True,
        )  # fmt: skip
        self.session = None
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                if self._call("GET", "/status")["ready"]:
                    break
            except (OSError, WebDriverError):
                pass
            if self.driver.poll() is not None or time.monotonic() > deadline:
                self.close()
                raise WebDriverError(f"chromedriver did not start (log: {self.log})")
            time.sleep(0.1)
        options = {
            "binary": CHROMIUM,
            # Root in a test VM: chromium's own sandbox needs an unprivileged user. The page
            # under test is ours, on loopback.
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", f"--user-data-dir={workdir / 'profile'}"],
        }  # fmt: skip
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": options}}}
        try:
            self.session = self._call("POST", "/session", caps)["sessionId"]
        except BaseException:
            self.close()
            raise

    def _call(self, method: str, path: str, body: dict | None = None):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}{path}", data=data, method=method)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT_S) as resp:
                answer = json.loads(resp.read())
        except urllib.error.HTTPError as err:
            raise WebDriverError(f"{method} {path}: {err.code} {err.read()[:300]!r}") from err
        return answer["value"]

    def _session(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def open(self, url: str) -> None:
        self._session("POST", "/url", {"url": url})

    def text(self, css: str = "body") -> str:
        """The rendered text of the first element matching `css`, as a person reads it
        (hidden elements left out, whitespace as laid out)."""
        found = self._session("POST", "/element", {"using": "css selector", "value": css})
        element = next(iter(found.values()))
        return self._session("GET", f"/element/{element}/text")

    def title(self) -> str:
        return self._session("GET", "/title")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self._session("GET", "/screenshot")))
        return path

    def close(self) -> None:
        if self.session:
            try:
                self._session("DELETE", "")
            except (OSError, WebDriverError):
                pass
            self.session = None
        # The group of the chromedriver started above (its pid), browsers left behind included:
        # SIGTERM, a moment to exit, then SIGKILL to whatever of the group is still there.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.driver.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.driver.wait(5)
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.2)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
