"""The AMI recipe, without AWS: Debian's packer validates and formats the template, shellcheck
reads the provisioning script, and every kernel setting says why it is there and names a real
sysctl. ami/README.md lists what this old packer cannot check."""

import pathlib
import re
import subprocess

from conftest import ROOT, tool

AMI = ROOT / "ami"
TEMPLATE = AMI / "static-ingress.pkr.hcl"


def run(*args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=120, **kw)


def test_packer_validates_the_template(deb_path):
    r = run(tool("packer"), "validate", f"-var=deb={deb_path}", str(TEMPLATE), cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_packer_rejects_a_broken_template(deb_path, tmp_path):
    # Shows validate reads the builder's fields: a misspelt one fails.
    broken = tmp_path / "broken.pkr.hcl"
    broken.write_text(TEMPLATE.read_text().replace("ssh_username", "ssh_user_name"))
    for f in ("60-static-ingress.conf", "provision.sh"):
        (tmp_path / f).write_text((AMI / f).read_text())
    r = run(tool("packer"), "validate", f"-var=deb={deb_path}", str(broken))
    assert r.returncode != 0
    assert "ssh_user_name" in r.stdout + r.stderr


def test_packer_files_are_formatted():
    r = run(tool("packer"), "fmt", "-check", "-diff", str(AMI))
    assert r.returncode == 0, r.stdout + r.stderr


def test_shell_scripts_pass_shellcheck():
    # The provisioning script, and the scripts that install the tools and build the package.
    scripts = [AMI / "provision.sh", ROOT / ".ci/run", *sorted((ROOT / "scripts").glob("*.sh"))]
    r = run(tool("shellcheck"), *map(str, scripts))
    assert r.returncode == 0, r.stdout


def test_every_kernel_setting_has_a_reason_and_exists():
    lines = (AMI / "60-static-ingress.conf").read_text().splitlines()
    settings = 0
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith("#"):
            continue
        key, _, value = (part.strip() for part in line.partition("="))
        settings += 1
        assert value, f"{key} has no value"
        assert i > 0 and lines[i - 1].startswith("#"), f"{key}: no comment saying why, just above it"
        assert pathlib.Path("/proc/sys", *key.split(".")).exists(), f"{key} is not a sysctl this kernel has"
    assert settings >= 5
    # The settings the issue names.
    text = "\n".join(lines)
    for key in ("net.core.somaxconn", "net.ipv4.ip_local_port_range", "fs.file-max"):
        assert re.search(rf"^{re.escape(key)} = ", text, re.M), key
