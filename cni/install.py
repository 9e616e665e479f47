"""Install ``ztagent-cni`` on a node, as istio-cni's install-cni does: what the DaemonSet's init (or
sidecar, with ``--watch``) container runs with the node's CNI directories mounted.

1. The plugin executable goes to the CNI bin dir first (a runtime must never see a conflist naming a
   plugin it cannot find). It is a zipapp of cni/{__init__,spec,protocol,plugin}.py run by the node's
   own ``python3 -IS`` (standard library only, >= 3.10), so it needs nothing from this image.
2. ``{"type": "ztagent-cni", ...}`` is appended to the ``plugins`` list of the node's primary network
   configuration: the first ``*.conf`` / ``*.conflist`` / ``*.json`` file by name, the one libcni's
   ``ConfFiles`` order makes kubelet and containerd use. A single-plugin ``.conf`` (or ``.json``) is
   converted to ``<stem>.conflist`` with that plugin first, and the original removed, as istio-cni
   does. A conflist whose ``cniVersion`` the plugin does not support is refused here, loudly, rather
   than failing every pod later.
3. Every write is a temp file in the same directory, fsync, rename: the runtime reads either the old
   or the new file, never half of one. Running install again changes nothing.

``--uninstall`` removes exactly what install added. Our entry carries ``ztagentInstall`` with the
original file's text: if the file is otherwise as we left it, the original bytes come back (and a
converted ``.conf`` gets its name back); if the primary CNI changed it since, only our entry is
removed. Then the executable is removed.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import io
import json
import logging
import marshal
import os
import signal
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cni import spec

log = logging.getLogger("ztagent.cni.install")

PLUGIN_TYPE = "ztagent-cni"
MARKER = "ztagentInstall"
CONF_EXTS = (".conf", ".conflist", ".json")
ZIP_MODULES = ("__init__.py", "spec.py", "protocol.py", "plugin.py")
DEFAULT_BIN_DIR = "/opt/cni/bin"
DEFAULT_CONF_DIR = "/etc/cni/net.d"
DEFAULT_PYTHON = "/usr/bin/python3"
_TMP_SUFFIX = ".ztagent-tmp"  # not a config extension: a runtime listing the dir never loads it
_MAIN = b"import sys\nfrom cni.plugin import main\nsys.exit(main())\n"


class InstallError(Exception):
    pass


def build_plugin(interpreter: str = DEFAULT_PYTHON) -> bytes:
    """The plugin executable: a shebang line, then a zip that ``python3`` runs as an application.

    Built with zipfile rather than ``zipapp.create_archive`` because that copies each source file's
    mtime into the archive, and install must tell "already installed" from "changed": the archive
    comment is a digest of everything the plugin's behaviour depends on (interpreter, bytecode magic,
    sources), compared by :func:`install_binary`. (Not the bytes themselves: ``marshal`` output
    depends on reference counts, so two builds of the same code can differ.) Entries are stored,
    not deflated, so that starting the plugin does not need zlib.

    Each module also goes in as an unchecked-hash ``.pyc``: zipimport cannot cache bytecode, and
    compiling the sources on every exec was a third of the plugin's start-up (``-X importtime``:
    cni.spec 6.3 ms of 25 ms). A node python3 with another bytecode magic number skips the ``.pyc``
    and compiles the ``.py`` next to it.
    """
    if not interpreter.startswith("/") or any(c.isspace() for c in interpreter):
        raise InstallError(f"--python {interpreter!r} must be an absolute path without spaces")
    src = Path(__file__).resolve().parent
    buf = io.BytesIO()
    buf.write(f"#!{interpreter} -IS\n".encode())
    digest = hashlib.sha256(f"{interpreter}\0".encode() + importlib.util.MAGIC_NUMBER + _MAIN)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        entries = [("__main__.py", _MAIN)]
        for m in ZIP_MODULES:
            source = (src / m).read_bytes()
            digest.update(f"\0{m}\0{len(source)}\0".encode() + source)
            code = compile(source, f"cni/{m}", "exec", dont_inherit=True)
            pyc = importlib.util.MAGIC_NUMBER + (0b01).to_bytes(4, "little")  # hash-based, unchecked
            pyc += importlib.util.source_hash(source) + marshal.dumps(code)
            entries += [(f"cni/{m}", source), (f"cni/{m}c", pyc)]
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, data)
        zf.comment = f"{PLUGIN_TYPE} sha256:{digest.hexdigest()}".encode()
    return buf.getvalue()


def plugin_digest(path: Path) -> bytes | None:
    """The build digest of an installed plugin, None if the file is not one of our zipapps."""
    try:
        with zipfile.ZipFile(path) as zf:
            return zf.comment if zf.comment.startswith(PLUGIN_TYPE.encode()) else None
    except (OSError, zipfile.BadZipFile):
        return None


def _atomic_write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}{_TMP_SUFFIX}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        os.write(fd, data)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def install_binary(bin_dir: Path, interpreter: str = DEFAULT_PYTHON) -> bool:
    """Put the plugin into ``bin_dir``. Returns whether anything changed."""
    if not bin_dir.is_dir():
        raise InstallError(f"CNI bin dir {bin_dir} does not exist")
    data = build_plugin(interpreter)
    dest = bin_dir / PLUGIN_TYPE
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        wanted = zf.comment
    try:
        if plugin_digest(dest) == wanted and (dest.stat().st_mode & 0o777) == 0o755:
            return False
    except FileNotFoundError:
        pass
    _atomic_write(dest, data, 0o755)
    log.info("installed %s", dest)
    return True


def config_files(conf_dir: Path) -> list[Path]:
    """The network configuration files in the order libcni (kubelet, containerd) considers them."""
    if not conf_dir.is_dir():
        raise InstallError(f"CNI conf dir {conf_dir} does not exist")
    return sorted(p for p in conf_dir.iterdir() if p.suffix in CONF_EXTS and p.is_file())


def plugin_entry(
    socket_path: str = spec.DEFAULT_SOCKET, timeout_s: float = spec.DEFAULT_TIMEOUT_S
) -> dict[str, Any]:
    return {"type": PLUGIN_TYPE, "socketPath": socket_path, "timeoutSeconds": timeout_s}


def _load(path: Path) -> tuple[str, dict[str, Any]]:
    text = path.read_text()
    try:
        obj = json.loads(text)
    except ValueError as e:
        raise InstallError(f"{path}: not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise InstallError(f"{path}: expected a JSON object")
    return text, obj


def _dump(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj, indent=2) + "\n").encode()


def _is_ours(plugin: Any) -> bool:
    return isinstance(plugin, dict) and plugin.get("type") == PLUGIN_TYPE


def _check_version(path: Path, obj: dict[str, Any]) -> None:
    v = obj.get("cniVersion")
    if v not in spec.SUPPORTED_VERSIONS:
        raise InstallError(f"{path}: cniVersion {v!r} is not supported by {PLUGIN_TYPE} "
                           f"(supported: {', '.join(spec.SUPPORTED_VERSIONS)})")


def install_config(conf_dir: Path, entry: dict[str, Any]) -> Path | None:
    """Chain ``entry`` into the primary network configuration. Returns the file written, or None if
    it already was as wanted."""
    files = config_files(conf_dir)
    if not files:
        raise InstallError(f"no CNI network configuration in {conf_dir}: the cluster's CNI must be "
                           "installed first")
    primary = files[0]
    text, obj = _load(primary)
    _check_version(primary, obj)
    plugins = obj.get("plugins")
    if isinstance(plugins, list):
        ours = [p for p in plugins if _is_ours(p)]
        marker = ours[0].get(MARKER) if ours else None
        if not isinstance(marker, dict):
            marker = {"original": text}
        rest = [p for p in plugins if not _is_ours(p)]
        if not rest:
            raise InstallError(f"{primary}: no interface plugin to chain after")
        wanted = dict(obj, plugins=[*rest, dict(entry, **{MARKER: marker})])
        if wanted == obj:
            return None
        _atomic_write(primary, _dump(wanted), primary.stat().st_mode & 0o777)
        log.info("chained %s into %s", PLUGIN_TYPE, primary)
        return primary
    if not isinstance(obj.get("type"), str):
        raise InstallError(f"{primary}: neither a conflist ('plugins') nor a plugin configuration ('type')")
    if _is_ours(obj):
        raise InstallError(f"{primary}: {PLUGIN_TYPE} cannot be the only plugin")
    target = primary.with_suffix(".conflist")
    if target.exists():
        _, existing = _load(target)
        mine = [p for p in existing.get("plugins", []) if _is_ours(p)]
        if not (mine and isinstance(mine[0].get(MARKER), dict)
                and mine[0][MARKER].get("convertedFrom") == primary.name):
            raise InstallError(f"cannot convert {primary} to {target}: {target.name} exists and is not ours")
    converted = {
        "cniVersion": obj["cniVersion"],
        "name": obj.get("name"),
        "plugins": [
            {k: v for k, v in obj.items() if k not in ("cniVersion", "name")},
            dict(entry, **{MARKER: {"convertedFrom": primary.name, "original": text}}),
        ],
    }
    # The conflist first, then the .conf goes: a crash in between leaves the .conf first by name, so
    # the runtime keeps using the old network and a rerun converts again.
    _atomic_write(target, _dump(converted), primary.stat().st_mode & 0o777)
    primary.unlink()
    log.info("converted %s to %s with %s chained", primary, target, PLUGIN_TYPE)
    return target


def uninstall(bin_dir: Path, conf_dir: Path) -> list[str]:
    """Remove what install added (from every config file, not only the primary). Returns what it did."""
    done: list[str] = []
    for path in config_files(conf_dir) if conf_dir.is_dir() else []:
        try:
            _, obj = _load(path)
        except (InstallError, OSError):
            continue  # not a file we could have written
        plugins = obj.get("plugins")
        if not isinstance(plugins, list) or not any(_is_ours(p) for p in plugins):
            continue
        marker = next(p for p in plugins if _is_ours(p)).get(MARKER)
        marker = marker if isinstance(marker, dict) else {}
        rest = [p for p in plugins if not _is_ours(p)]
        without = dict(obj, plugins=rest)
        original = marker.get("original")
        try:
            original_obj = json.loads(original) if isinstance(original, str) else None
        except ValueError:
            original_obj = None
        mode = path.stat().st_mode & 0o777
        src = marker.get("convertedFrom")
        if isinstance(src, str) and "/" not in src and isinstance(original_obj, dict) and len(rest) == 1:
            as_conf = dict(rest[0], cniVersion=obj.get("cniVersion"), name=obj.get("name"))
            if as_conf == original_obj:
                _atomic_write(conf_dir / src, original.encode(), mode)  # type: ignore[union-attr]
                path.unlink()
                done.append(f"restored {conf_dir / src} (removed {path.name})")
                continue
        if original_obj == without:
            _atomic_write(path, original.encode(), mode)  # type: ignore[union-attr]
            done.append(f"restored {path}")
        else:
            _atomic_write(path, _dump(without), mode)
            done.append(f"removed {PLUGIN_TYPE} from {path} (the file changed since install)")
    exe = bin_dir / PLUGIN_TYPE
    if exe.exists():
        exe.unlink()
        done.append(f"removed {exe}")
    return done


def install(
    bin_dir: Path, conf_dir: Path, entry: dict[str, Any], interpreter: str = DEFAULT_PYTHON
) -> list[str]:
    done = []
    if install_binary(bin_dir, interpreter):
        done.append(f"installed {bin_dir / PLUGIN_TYPE}")
    written = install_config(conf_dir, entry)
    if written is not None:
        done.append(f"chained {PLUGIN_TYPE} into {written}")
    return done


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cni.install", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR), help="the node's CNI bin dir")
    ap.add_argument("--conf-dir", type=Path, default=Path(DEFAULT_CONF_DIR), help="the node's CNI conf dir")
    ap.add_argument("--socket-path", default=spec.DEFAULT_SOCKET, help="the agent's CNI socket on the node")
    ap.add_argument("--timeout-seconds", type=float, default=spec.DEFAULT_TIMEOUT_S)
    ap.add_argument("--python", default=DEFAULT_PYTHON, help="the node's python3 (>= 3.10) for the plugin")
    ap.add_argument("--uninstall", action="store_true", help="remove what install added, then exit")
    ap.add_argument("--watch", type=float, metavar="SECONDS",
                    help="stay running and re-apply every SECONDS (the primary CNI may rewrite its "
                    "config); exits on SIGTERM without uninstalling, so a restart of this container "
                    "never lets pods start outside the mesh")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        if args.uninstall:
            for line in uninstall(args.bin_dir, args.conf_dir) or ["nothing to remove"]:
                print(line)
            return 0
        entry = plugin_entry(args.socket_path, args.timeout_seconds)
        spec.parse_config(json.dumps(dict(entry, cniVersion=spec.SPEC_VERSION, name="check",
                                          prevResult={})).encode(), "ADD")
        if args.watch is None:
            for line in install(args.bin_dir, args.conf_dir, entry, args.python) or ["already installed"]:
                print(line)
            return 0
    except (InstallError, spec.CniError, OSError) as e:
        print(f"cni.install: {e}", file=sys.stderr)
        return 1
    stop = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop:
        try:
            for line in install(args.bin_dir, args.conf_dir, entry, args.python):
                print(line, flush=True)
        except (InstallError, OSError) as e:
            print(f"cni.install: {e} (retrying in {args.watch:g}s)", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.watch
        while not stop and time.monotonic() < deadline:
            time.sleep(min(0.2, args.watch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
