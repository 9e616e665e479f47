"""CI's check of the kernel lab (vagrant/) without booting a VM: the Vagrantfile validates against the
real Vagrant and its libvirt provider, and the box builder's dry run plans what setup.sh asks for."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT_DIR = REPO / "vagrant"
BUILD_BOX = VAGRANT_DIR / "build-box.sh"
SCRIPTS = ["build-box.sh", "lab.sh", "kvm-probe.sh", "guest-tests.sh", "setup-host.sh"]
BUILDER_TOOLS = ["debootstrap", "qemu-img", "parted", "losetup", "mkfs.ext4", "extlinux", "dpkg-repack",
                 "chroot", "mount", "tar", "python3"]

needs_vagrant = pytest.mark.skipif(shutil.which("vagrant") is None,
                                   reason="vagrant not installed (scripts/setup.sh installs it)")


def _vagrant(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "VAGRANT_CWD": str(VAGRANT_DIR), "VAGRANT_CHECKPOINT_DISABLE": "1", **env}
    return subprocess.run(["vagrant", *args], env=full, capture_output=True, text=True, timeout=120)


def _setup_sh_packages() -> list[str]:
    """scripts/setup.sh's APT_PACKAGES, read independently of build-box.sh's own parser."""
    text = (REPO / "scripts" / "setup.sh").read_text()
    block = re.search(r"^APT_PACKAGES=\((.*?)^\)", text, re.S | re.M)
    assert block, "APT_PACKAGES=( ... ) not found in scripts/setup.sh"
    return [w for line in block.group(1).splitlines() for w in line.split("#", 1)[0].split()]


@needs_vagrant
@pytest.mark.parametrize("kernel", ["debian12", "debian13"])
def test_vagrantfile_validates_with_the_libvirt_provider(kernel: str) -> None:
    plugins = _vagrant("plugin", "list")
    assert "vagrant-libvirt" in plugins.stdout, plugins.stdout + plugins.stderr
    out = _vagrant("validate", ZTAGENT_KERNEL=kernel)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "validated successfully" in out.stdout


@needs_vagrant
def test_vagrantfile_refuses_a_bad_setting_loudly() -> None:
    out = _vagrant("validate", ZTAGENT_VM_CPUS="two")
    assert out.returncode != 0
    assert "two" in out.stdout + out.stderr  # Ruby's Integer() names the bad value


@needs_vagrant
def test_vagrantfile_picks_emulation_when_told() -> None:
    # The driver actually chosen, as vagrant-libvirt's finalized config holds it (printed by Ruby).
    # `vagrant validate` cannot print the config: run the Vagrantfile's own rule in the real interpreter.
    probe = VAGRANT_DIR / "Vagrantfile"
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby not installed")
    src = probe.read_text()
    fn = src[src.index("def libvirt_driver"):src.index("end\n\nVagrant.configure") + 4]
    script = f'HERE = "/nonexistent"; KERNEL = "debian12"\n{fn}\nputs libvirt_driver\n'
    for forced, want in (("qemu", "qemu"), ("kvm", "kvm")):
        got = subprocess.run([ruby, "-e", script], env={**os.environ, "ZTAGENT_LIBVIRT_DRIVER": forced},
                             capture_output=True, text=True, timeout=30)
        assert got.stdout.strip() == want, got.stderr
    unforced = {k: v for k, v in os.environ.items() if k != "ZTAGENT_LIBVIRT_DRIVER"}
    got = subprocess.run([ruby, "-e", script], env=unforced, capture_output=True, text=True, timeout=30)
    # No probe result cached under /nonexistent: KVM if /dev/kvm is usable, else emulation.
    assert got.stdout.strip() == ("kvm" if os.access("/dev/kvm", os.W_OK) else "qemu"), got.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_lab_scripts_parse(name: str) -> None:
    out = subprocess.run(["bash", "-n", str(VAGRANT_DIR / name)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.parametrize(("kernel", "suite"), [("debian12", "bookworm"), ("debian13", "trixie"),
                                               ("debian12-bpo", "bookworm"), ("debian12-k510", "bookworm")])
def test_build_box_dry_run_plans_and_checks_its_tools(kernel: str, suite: str, tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(BUILD_BOX), "--dry-run", kernel], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "ZTAGENT_VAGRANT_BUILD": str(tmp_path)})
    # The plan is "key<2+ spaces>value" lines.
    plan = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.stdout.splitlines())
    assert f"debootstrap {suite} from http://deb.debian.org/debian" in plan["kernel profile"]
    assert plan["kernel packages"].startswith("linux-image-amd64 linux-headers-amd64")
    assert plan["setup packages"].split() == _setup_sh_packages()
    assert "MODULES=list" in plan["initramfs"]
    assert f"ztagent-{kernel}.box" in plan["box"]
    assert "no-index" in plan["guest venv"]
    assert str(tmp_path / kernel) in plan["cache"] and "rootfs to build" in plan["cache"]
    missing = [t for t in BUILDER_TOOLS if shutil.which(t) is None]
    if missing:
        assert out.returncode == 1 and all(t in out.stderr for t in missing), out.stderr
    else:
        assert out.returncode == 0, out.stderr
        assert "tools ok" in out.stderr
    assert not (tmp_path / kernel).exists(), "a dry run must not create anything"


def test_build_box_refuses_an_unknown_kernel_naming_it(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(BUILD_BOX), "--dry-run", "debian99"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "ZTAGENT_VAGRANT_BUILD": str(tmp_path)})
    assert out.returncode != 0
    assert "KERNEL=debian99" in out.stderr and "debian12" in out.stderr
    assert list(tmp_path.iterdir()) == []


def test_build_box_refuses_an_unknown_option() -> None:
    out = subprocess.run(["bash", str(BUILD_BOX), "--dryrun", "debian12"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 2 and "--dryrun" in out.stderr
