"""cni.install into a temp CNI bin/conf dir with real network configurations: containerd's default
bridge conflist and the ptp example of the reference plugins (a single-plugin .conf)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from cni import install
from cni.install import InstallError

pytestmark = pytest.mark.timeout(60)
REPO = Path(__file__).resolve().parents[2]

# containerd's 10-containerd-net.conflist (bridge + host-local + portmap), formatted as shipped.
BRIDGE_CONFLIST = """{
  "cniVersion": "1.0.0",
  "name": "containerd-net",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cni0",
      "isGateway": true,
      "ipMasq": true,
      "promiscMode": true,
      "ipam": {
        "type": "host-local",
        "ranges": [
          [{
            "subnet": "10.88.0.0/16"
          }]
        ],
        "routes": [
          { "dst": "0.0.0.0/0" }
        ]
      }
    },
    {
      "type": "portmap",
      "capabilities": {"portMappings": true}
    }
  ]
}
"""
# The ptp plugin's example configuration (containernetworking/plugins, plugins/main/ptp).
PTP_CONF = """{
    "cniVersion": "1.0.0",
    "name": "mynet",
    "type": "ptp",
    "ipam": {
        "type": "host-local",
        "subnet": "10.1.1.0/24"
    },
    "dns": {
        "nameservers": [ "10.1.1.1", "8.8.8.8" ]
    }
}
"""


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    b, c = tmp_path / "bin", tmp_path / "net.d"
    b.mkdir()
    c.mkdir()
    return b, c


def snapshot(d: Path) -> dict[str, tuple[bytes, int, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_ino, stat.S_IMODE(p.stat().st_mode)) for p in d.iterdir()}


ENTRY = install.plugin_entry("/run/ztagent/cni.sock", 20.0)


def test_conflist_gets_our_entry_last_then_uninstall_restores_the_bytes(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    f = conf_dir / "10-containerd-net.conflist"
    f.write_text(BRIDGE_CONFLIST)
    f.chmod(0o600)
    done = install.install(bin_dir, conf_dir, ENTRY)
    assert done == [f"installed {bin_dir}/ztagent-cni", f"chained ztagent-cni into {f}"]
    got = json.loads(f.read_text())
    orig = json.loads(BRIDGE_CONFLIST)
    assert got["plugins"][:-1] == orig["plugins"]
    assert dict(got, plugins=None) == dict(orig, plugins=None)
    ours = got["plugins"][-1]
    assert {k: ours[k] for k in ("type", "socketPath", "timeoutSeconds")} == {
        "type": "ztagent-cni", "socketPath": "/run/ztagent/cni.sock", "timeoutSeconds": 20.0}
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    exe = bin_dir / "ztagent-cni"
    assert stat.S_IMODE(exe.stat().st_mode) == 0o755
    out = subprocess.run([str(exe)], env={"CNI_COMMAND": "VERSION"}, capture_output=True, timeout=30)
    assert json.loads(out.stdout)["supportedVersions"][-1] == "1.0.0"
    assert sorted(p.name for p in conf_dir.iterdir()) == [f.name]  # no temp file left behind

    before = snapshot(conf_dir) | {"bin": snapshot(bin_dir)["ztagent-cni"]}
    assert install.install(bin_dir, conf_dir, ENTRY) == []  # idempotent: nothing rewritten
    assert snapshot(conf_dir) | {"bin": snapshot(bin_dir)["ztagent-cni"]} == before

    done = install.uninstall(bin_dir, conf_dir)
    assert done == [f"restored {f}", f"removed {exe}"]
    assert f.read_text() == BRIDGE_CONFLIST
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    assert list(bin_dir.iterdir()) == []
    assert install.uninstall(bin_dir, conf_dir) == []  # idempotent


def test_single_plugin_conf_is_converted_to_a_conflist_and_back(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    (conf_dir / "10-mynet.conf").write_text(PTP_CONF)
    install.install(bin_dir, conf_dir, ENTRY)
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-mynet.conflist"]
    got = json.loads((conf_dir / "10-mynet.conflist").read_text())
    ptp = json.loads(PTP_CONF)
    assert (got["cniVersion"], got["name"]) == ("1.0.0", "mynet")
    assert got["plugins"][0] == {k: v for k, v in ptp.items() if k not in ("cniVersion", "name")}
    assert got["plugins"][1]["type"] == "ztagent-cni"
    assert got["plugins"][1]["ztagentInstall"]["convertedFrom"] == "10-mynet.conf"
    assert install.install(bin_dir, conf_dir, ENTRY) == []
    done = install.uninstall(bin_dir, conf_dir)
    assert done[0] == f"restored {conf_dir}/10-mynet.conf (removed 10-mynet.conflist)"
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-mynet.conf"]
    assert (conf_dir / "10-mynet.conf").read_text() == PTP_CONF


def test_a_crash_between_writing_the_conflist_and_removing_the_conf_converges(
    dirs: tuple[Path, Path]
) -> None:
    bin_dir, conf_dir = dirs
    (conf_dir / "10-mynet.conf").write_text(PTP_CONF)
    install.install(bin_dir, conf_dir, ENTRY)
    (conf_dir / "10-mynet.conf").write_text(PTP_CONF)  # as if the unlink never happened
    assert install.install_config(conf_dir, ENTRY) == conf_dir / "10-mynet.conflist"
    assert sorted(p.name for p in conf_dir.iterdir()) == ["10-mynet.conflist"]
    install.uninstall(bin_dir, conf_dir)
    assert (conf_dir / "10-mynet.conf").read_text() == PTP_CONF


def test_only_the_first_config_by_name_is_changed(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    (conf_dir / "20-other.conflist").write_text(BRIDGE_CONFLIST)
    (conf_dir / "10-containerd-net.conflist").write_text(BRIDGE_CONFLIST)
    (conf_dir / "README").write_text("not a config")
    install.install(bin_dir, conf_dir, ENTRY)
    assert "ztagent-cni" in (conf_dir / "10-containerd-net.conflist").read_text()
    assert (conf_dir / "20-other.conflist").read_text() == BRIDGE_CONFLIST


def test_socket_change_rewrites_our_entry_and_uninstall_still_restores_the_original(
    dirs: tuple[Path, Path]
) -> None:
    bin_dir, conf_dir = dirs
    f = conf_dir / "10-containerd-net.conflist"
    f.write_text(BRIDGE_CONFLIST)
    install.install(bin_dir, conf_dir, ENTRY)
    install.install(bin_dir, conf_dir, install.plugin_entry("/run/other.sock"))
    plugins = json.loads(f.read_text())["plugins"]
    assert [p["type"] for p in plugins] == ["bridge", "portmap", "ztagent-cni"]
    assert plugins[-1]["socketPath"] == "/run/other.sock"
    install.uninstall(bin_dir, conf_dir)
    assert f.read_text() == BRIDGE_CONFLIST


def test_primary_cni_rewriting_its_config_is_repaired_and_its_changes_kept_on_uninstall(
    dirs: tuple[Path, Path]
) -> None:
    bin_dir, conf_dir = dirs
    f = conf_dir / "10-containerd-net.conflist"
    f.write_text(BRIDGE_CONFLIST)
    install.install(bin_dir, conf_dir, ENTRY)
    changed = json.loads(BRIDGE_CONFLIST)
    changed["plugins"].append({"type": "bandwidth", "capabilities": {"bandwidth": True}})
    f.write_text(json.dumps(changed))  # the primary CNI rewrote its file: our entry is gone
    assert install.install(bin_dir, conf_dir, ENTRY) == [f"chained ztagent-cni into {f}"]
    assert [p["type"] for p in json.loads(f.read_text())["plugins"]] == [
        "bridge", "portmap", "bandwidth", "ztagent-cni"]
    done = install.uninstall(bin_dir, conf_dir)
    assert done[0] == f"restored {f}"  # the primary CNI's version, as it was when we re-added ourselves
    assert f.read_text() == json.dumps(changed)


def test_uninstall_after_the_file_changed_removes_only_our_entry(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    f = conf_dir / "10-containerd-net.conflist"
    f.write_text(BRIDGE_CONFLIST)
    install.install(bin_dir, conf_dir, ENTRY)
    obj = json.loads(f.read_text())
    obj["plugins"].insert(1, {"type": "tuning", "sysctl": {"net.core.somaxconn": "500"}})
    f.write_text(json.dumps(obj))
    done = install.uninstall(bin_dir, conf_dir)
    assert done[0] == f"removed ztagent-cni from {f} (the file changed since install)"
    assert [p["type"] for p in json.loads(f.read_text())["plugins"]] == ["bridge", "tuning", "portmap"]


@pytest.mark.parametrize("files, error", [
    ({}, "no CNI network configuration"),
    ({"10-x.conflist": BRIDGE_CONFLIST.replace('"1.0.0"', '"1.1.0"')}, "cniVersion '1.1.0' is not supported"),
    ({"10-x.conf": PTP_CONF.replace('"1.0.0"', '"0.2.0"')}, "cniVersion '0.2.0' is not supported"),
    ({"10-x.conflist": "{not json"}, "not JSON"),
    ({"10-x.conflist": '{"cniVersion": "1.0.0", "name": "n", "plugins": []}'}, "no interface plugin"),
    ({"10-x.conf": PTP_CONF, "10-x.conflist": BRIDGE_CONFLIST}, "10-x.conflist exists and is not ours"),
])
def test_refusals_change_nothing(dirs: tuple[Path, Path], files: dict[str, str], error: str) -> None:
    _, conf_dir = dirs
    for name, text in files.items():
        (conf_dir / name).write_text(text)
    before = snapshot(conf_dir)
    with pytest.raises(InstallError, match=error):
        install.install_config(conf_dir, ENTRY)
    assert snapshot(conf_dir) == before


def test_python_m_cni_install_and_uninstall(dirs: tuple[Path, Path]) -> None:
    bin_dir, conf_dir = dirs
    (conf_dir / "10-mynet.conf").write_text(PTP_CONF)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "cni.install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir)]
    run = {"capture_output": True, "text": True, "env": env, "timeout": 60}
    p = subprocess.run([*cmd, "--socket-path", "/run/z.sock"], **run)  # type: ignore[call-overload]
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [f"installed {bin_dir}/ztagent-cni",
                                     f"chained ztagent-cni into {conf_dir}/10-mynet.conflist"]
    p = subprocess.run([*cmd, "--socket-path", "/run/z.sock"], **run)  # type: ignore[call-overload]
    assert p.stdout.strip() == "already installed"
    p = subprocess.run([*cmd, "--socket-path", "relative.sock"], **run)  # type: ignore[call-overload]
    assert p.returncode == 1 and "socketPath" in p.stderr
    p = subprocess.run([*cmd, "--uninstall"], **run)  # type: ignore[call-overload]
    assert p.returncode == 0, p.stderr
    assert (conf_dir / "10-mynet.conf").read_text() == PTP_CONF and list(bin_dir.iterdir()) == []


def test_the_plugin_build_is_identified_by_digest_and_has_bytecode_for_every_module() -> None:
    import io
    import zipfile

    a, b = install.build_plugin(), install.build_plugin("/usr/local/bin/python3")
    assert a.startswith(b"#!/usr/bin/python3 -IS\n") and b.startswith(b"#!/usr/local/bin/python3 -IS\n")
    za, zb = zipfile.ZipFile(io.BytesIO(a)), zipfile.ZipFile(io.BytesIO(b))
    assert za.comment.startswith(b"ztagent-cni sha256:") and za.comment != zb.comment
    assert zipfile.ZipFile(io.BytesIO(install.build_plugin())).comment == za.comment
    names = za.namelist()
    assert names == ["__main__.py"] + [f"cni/{m}{c}" for m in install.ZIP_MODULES for c in ("", "c")]
    with pytest.raises(InstallError, match="absolute path"):
        install.build_plugin("python3")


def test_watch_repairs_a_rewritten_config_and_exits_on_sigterm_without_uninstalling(
    dirs: tuple[Path, Path]
) -> None:
    import signal
    import time

    bin_dir, conf_dir = dirs
    f = conf_dir / "10-containerd-net.conflist"
    f.write_text(BRIDGE_CONFLIST)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.Popen(
        [sys.executable, "-m", "cni.install", "--bin-dir", str(bin_dir), "--conf-dir", str(conf_dir),
         "--watch", "0.2"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_chained() -> None:
        deadline = time.monotonic() + 20
        while "ztagent-cni" not in f.read_text():
            assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.stderr else ""
            time.sleep(0.05)

    try:
        wait_chained()
        f.write_text(BRIDGE_CONFLIST)  # the primary CNI rewrites its file
        wait_chained()
    finally:
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    assert p.returncode == 0, err
    assert "ztagent-cni" in f.read_text() and (bin_dir / "ztagent-cni").exists()
    assert out.count("chained ztagent-cni into") == 2
