"""Shared setup for the packaging tests (make package-test, make container-test).

Tools come from the repo's install scripts; the make targets pass their locations:
  STATIC_INGRESS_TOOLS_BIN  cargo-installed tools (cfn-guard)
  STATIC_INGRESS_DEB        the .deb built by `make deb`
Python tools (cfn-lint, moto_server) sit beside the interpreter running pytest."""

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from ports import free_port  # noqa: F401  (for the tests: from conftest import free_port)

ROOT = pathlib.Path(__file__).resolve().parents[2]
VENV_BIN = pathlib.Path(sys.executable).parent


def tool(name, env_dir=None):
    """Path of a tool: in the directory an environment variable names, beside the Python
    interpreter, or on PATH. A missing tool fails the test (the install scripts provide it)."""
    candidates = []
    if env_dir and os.environ.get(env_dir):
        candidates.append(pathlib.Path(os.environ[env_dir]) / name)
    candidates.append(VENV_BIN / name)
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    found = shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: run the repo's install scripts (see Makefile, package-test)")
    return found


@pytest.fixture(scope="session")
def deb_path():
    path = os.environ.get("STATIC_INGRESS_DEB")
    if not path or not pathlib.Path(path).is_file():
        pytest.fail("STATIC_INGRESS_DEB must name the .deb built by `make deb`")
    return pathlib.Path(path)


@pytest.fixture(scope="session")
def binary(deb_path, tmp_path_factory):
    """The static-ingress binary the .deb ships, unpacked."""
    root = tmp_path_factory.mktemp("deb-binary")
    r = subprocess.run(["dpkg-deb", "-x", str(deb_path), str(root)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return root / "usr/bin/static-ingress"




def stop(proc, timeout=10):
    """Ends a process this test started: SIGTERM, then SIGKILL if it lingers."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
