"""The .deb (STATIC_INGRESS_DEB, from `make deb` or scripts/build-deb.sh) and the systemd unit
it carries: contents, conffile, maintainer scripts, `systemd-analyze verify` and `security`, and
the packaged binary judging the packaged config the way the unit's ExecStartPre does."""

import os
import re
import shutil
import subprocess
import tomllib

import pytest
import yaml

import cfn_yaml
from conftest import ROOT

UNIT = "static-ingress.service"
CONFFILE = "/etc/static-ingress/static-ingress.toml"


def run(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(scope="module")
def extracted(deb_path, tmp_path_factory):
    """The .deb unpacked into a directory, with the host's systemd units beside it so that
    `systemd-analyze verify --root` can resolve the unit's dependencies."""
    root = tmp_path_factory.mktemp("deb-root")
    r = run("dpkg-deb", "-x", str(deb_path), str(root))
    assert r.returncode == 0, r.stderr
    units = root / "usr/lib/systemd/system"
    units.mkdir(parents=True, exist_ok=True)
    for f in os.listdir("/usr/lib/systemd/system"):
        src = os.path.join("/usr/lib/systemd/system", f)
        if not (units / f).exists() and os.path.isfile(src):
            shutil.copy2(src, units / f, follow_symlinks=True)
    return root


def unit_path(root):
    for d in ("usr/lib/systemd/system", "lib/systemd/system"):
        if (root / d / UNIT).is_file() and (root / d / UNIT).read_text() == (ROOT / "systemd" / UNIT).read_text():
            return root / d / UNIT
    pytest.fail(f"{UNIT} from systemd/ is not in the package")


def test_package_holds_binary_unit_and_config(deb_path):
    fields = run("dpkg-deb", "-f", str(deb_path), "Package", "Architecture", "Depends").stdout
    assert "Package: static-ingress" in fields
    assert "Architecture: amd64" in fields
    # Installable on Debian 12 (glibc 2.36) as well as 13: the glibc the binary needs, as
    # dpkg-shlibdeps found it, is no newer.
    libc = re.search(r"Depends: .*libc6 \(>= ([0-9.]+)\)", fields)
    assert libc, fields
    assert tuple(map(int, libc.group(1).split("."))) <= (2, 36), fields
    assert re.search(r"Depends: .*ca-certificates", fields), fields
    listing = run("dpkg-deb", "-c", str(deb_path)).stdout
    paths = {line.split()[-1].lstrip(".") for line in listing.splitlines()}
    assert "/usr/bin/static-ingress" in paths
    assert CONFFILE in paths
    assert any(p.endswith(f"/systemd/system/{UNIT}") for p in paths), paths


def test_binary_ships_stripped_and_its_symbols_in_the_dbgsym_package(deb_path, extracted, tmp_path):
    binary = extracted / "usr/bin/static-ingress"
    sections = run("readelf", "-S", "-W", str(binary))
    assert sections.returncode == 0, sections.stderr
    assert ".debug_line" not in sections.stdout and ".debug_info" not in sections.stdout, "not stripped"
    build_id = re.search(r"Build ID: ([0-9a-f]{8,})", run("readelf", "-n", str(binary)).stdout)
    assert build_id, "the binary has no build ID for debuggers to find its symbols by"
    build_id = build_id.group(1)
    version = run("dpkg-deb", "-f", str(deb_path), "Version").stdout.strip().removeprefix("Version: ")
    ddeb = deb_path.parent / f"static-ingress-dbgsym_{version}_amd64.ddeb"
    assert ddeb.is_file(), f"no {ddeb.name} beside the .deb"
    fields = run("dpkg-deb", "-f", str(ddeb), "Package", "Version", "Recommends").stdout
    assert "Package: static-ingress-dbgsym" in fields and f"Version: {version}" in fields, fields
    assert f"static-ingress (= {version})" in fields, fields
    r = run("dpkg-deb", "-x", str(ddeb), str(tmp_path))
    assert r.returncode == 0, r.stderr
    debug = tmp_path / f"usr/lib/debug/.build-id/{build_id[:2]}/{build_id[2:]}.debug"
    assert debug.is_file(), f"no symbols under the binary's build ID {build_id}"
    assert ".debug_line" in run("readelf", "-S", "-W", str(debug)).stdout, "the symbol file has no line tables"
    assert build_id in run("readelf", "-n", str(debug)).stdout, "the symbol file is another build's"


def test_drop_in_directory_ships_with_a_readme_that_is_never_read(deb_path, extracted):
    readme = extracted / "etc/static-ingress/static-ingress.toml.d/README"
    assert readme.is_file()
    assert "50-launch-template.toml" in readme.read_text()
    # The proxy skips it (not *.toml): the packaged files check as they do without it.
    binary = extracted / "usr/bin/static-ingress"
    conf = extracted / CONFFILE.lstrip("/")
    r = run(binary, "check-config", conf, env={"PATH": os.environ["PATH"], "STATIC_INGRESS_BACKEND_ADDRESS": "a.example:443"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert "static-ingress.toml.d" not in r.stdout.splitlines()[0], r.stdout


def test_config_is_a_conffile(deb_path):
    # dpkg keeps an operator's edits of a conffile across upgrades.
    r = run("dpkg-deb", "-I", str(deb_path), "conffiles")
    assert r.returncode == 0, r.stderr
    assert CONFFILE in r.stdout.split()


def test_install_enables_the_unit_without_starting_it(deb_path):
    postinst = run("dpkg-deb", "-I", str(deb_path), "postinst").stdout
    assert f"deb-systemd-helper enable {UNIT}" in postinst or \
        re.search(rf"deb-systemd-helper .*enable.*{re.escape(UNIT)}", postinst), postinst
    # Started only once the launch template has configured the backend.
    assert not re.search(r"deb-systemd-invoke\s+(start|restart)\b", postinst), postinst


def test_systemd_analyze_verify_prints_nothing(extracted):
    unit = unit_path(extracted)
    r = run("systemd-analyze", "verify", f"--root={extracted}", unit.name)
    assert (r.returncode, r.stdout + r.stderr) == (0, "")


def test_security_exposure_is_at_most_2(extracted):
    r = run("systemd-analyze", "security", "--offline=true", "--no-pager", str(ROOT / "systemd" / UNIT))
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout)
    assert m, r.stdout + r.stderr
    score = float(m.group(1))
    print(f"systemd-analyze security: exposure {score}")
    assert score <= 2.0, r.stdout


def _unit_setting(key):
    values = re.findall(rf"^{key}=(.*)$", (ROOT / "systemd" / UNIT).read_text(), re.M)
    assert values, f"{key} not set in the unit"
    return values[-1].strip()


def _seconds(text):
    m = re.fullmatch(r"(\d+)s", text)
    assert m, f"expected a duration in seconds, got {text!r}"
    return int(m.group(1))


def test_stop_timeout_leaves_room_for_the_drain():
    conf = tomllib.loads((ROOT / "deb/static-ingress.toml").read_text())
    drain = _seconds(conf["lifecycle"]["drain_delay"]) + _seconds(conf["lifecycle"]["grace_period"])
    assert _seconds(_unit_setting("TimeoutStopSec")) > drain


def test_descriptor_limit_covers_the_connection_limit():
    example = tomllib.loads((ROOT / "docs/static-ingress.example.toml").read_text())
    max_conn = example["proxy"]["max_connections"]
    assert int(_unit_setting("LimitNOFILE")) >= 2 * max_conn + 256


def test_packaged_config_needs_only_the_backend(extracted, tmp_path):
    """What ExecStartPre sees on an instance: with the drop-in the launch template's user data
    writes, the packaged config is valid and each setting comes from the drop-in; without it,
    the one missing thing is named and the exit code is 78."""
    binary = str(extracted / "usr/bin/static-ingress")
    etc = tmp_path / "etc"
    shutil.copytree(extracted / "etc/static-ingress", etc)
    conf = str(etc / "static-ingress.toml")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
    r = run(binary, "check-config", conf, env=env)
    assert r.returncode == 78, r.stdout + r.stderr
    assert "backend.address" in r.stdout + r.stderr
    fleet = cfn_yaml.load(ROOT / "cloudformation/fleet.yaml")
    doc = yaml.safe_load(fleet["Resources"]["LaunchTemplate"]["Properties"]["LaunchTemplateData"]["UserData"]
                         ["Fn::Base64"]["Fn::Sub"])
    [drop_in] = [f for f in doc["write_files"] if f["path"].endswith("static-ingress.toml.d/50-launch-template.toml")]
    text = drop_in["content"]
    for name, value in {"AWS::StackName": "fleet-1", "BackendAddress": "api.example.com:443", "HealthPort": "9001",
                        "OperatorPort": "9002", "HandoffsAtOnce": "2"}.items():
        text = text.replace("${" + name + "}", value)
    assert "${" not in text, text
    (etc / "static-ingress.toml.d/50-launch-template.toml").write_text(text)
    r = run(binary, "check-config", conf, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"# effective configuration: {conf}, {etc}/static-ingress.toml.d/50-launch-template.toml (valid)"
    for setting in ('address = "api.example.com:443"', 'listen = "0.0.0.0:9001"', 'operator_listen = ["0.0.0.0:9002"]',
                    "handoffs_at_once = 2"):
        [line] = [x for x in lines if x.startswith(setting)]
        assert "static-ingress.toml.d/50-launch-template.toml:" in line, line
