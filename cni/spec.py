"""CNI specification 1.0 types for a chained plugin: network configuration, the ``CNI_*``
environment, and the result / error / version JSON the runtime reads back.

Pure: bytes and mappings in, immutable values or :class:`CniError` out. Only the standard library,
because this module is part of the plugin zipapp that the node's own ``python3`` runs per pod
(cni/install.py). Values are NamedTuples rather than dataclasses for that start-up: importing
``dataclasses`` (it pulls in ``inspect``) and building seven frozen classes took ~9 ms here against
~4 ms for ``typing.NamedTuple`` (``python3 -IS``, 4 runs each).

Spec facts followed here (SPEC.md 1.0.0, sections 1, 2 and 5):

- ``ADD``/``CHECK`` need ``CNI_COMMAND``, ``CNI_CONTAINERID``, ``CNI_NETNS``, ``CNI_IFNAME``; ``DEL``
  does not need ``CNI_NETNS``; ``CNI_ARGS`` and ``CNI_PATH`` are optional; ``VERSION`` needs only
  ``CNI_COMMAND``. An invalid-environment error (code 4) names every bad variable.
- The runtime inserts ``cniVersion``, ``name``, ``runtimeConfig``, ``prevResult`` (and ``args``) into
  the plugin's configuration object; keys starting with ``cni.dev/`` are reserved for the protocol.
- A chained plugin outputs ``prevResult`` (with its own changes, none here) as its ADD result, with
  ``cniVersion`` equal to the one supplied. CHECK and DEL print nothing on success.
- Errors are ``{"cniVersion", "code", "msg", "details"}``; codes 0-99 are the spec's, 100+ ours.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

SPEC_VERSION = "1.0.0"
# Every result format that is the same "current" result type as 1.0.0 for a pass-through plugin
# (0.3.0 introduced the rich result and chaining). CHECK exists from 0.4.0. 1.1.0 is not claimed:
# this plugin follows 1.0 (no STATUS/GC commands).
SUPPORTED_VERSIONS: tuple[str, ...] = ("0.3.0", "0.3.1", "0.4.0", "1.0.0")
CHECK_MIN_VERSION = "0.4.0"
COMMANDS = ("ADD", "DEL", "CHECK", "VERSION")

# Well-known error codes (SPEC.md section 5, "Error").
INCOMPATIBLE_VERSION = 1
UNSUPPORTED_FIELD = 2
UNKNOWN_CONTAINER = 3
INVALID_ENV = 4
IO_FAILURE = 5
DECODE_FAILURE = 6
INVALID_CONFIG = 7
TRY_AGAIN_LATER = 11
# Plugin-specific codes (100+).
AGENT_REFUSED = 100  # the node agent answered with a non-retryable error
AGENT_PROTOCOL = 101  # the node agent's answer was not a valid protocol message

DEFAULT_SOCKET = "/var/run/ztagent/cni.sock"
DEFAULT_TIMEOUT_S = 30.0
MAX_TIMEOUT_S = 300.0

# Container ID and network name: alphanumeric first, then alphanumerics, '_', '.', '-' (SPEC.md 2).
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]*\Z")
_VERSION_RE = re.compile(r"\d+\.\d+\.\d+\Z")

# Keys of the execution configuration this plugin understands. Our own options are camelCase like
# the spec's well-known keys (ipMasq, disableCheck). ``ztagentInstall`` is the installer's record of
# what it changed, read back only by ``--uninstall`` (cni/install.py).
PLUGIN_KEYS = frozenset({"socketPath", "timeoutSeconds", "ztagentInstall"})
PROTOCOL_KEYS = frozenset(
    {"cniVersion", "name", "type", "prevResult", "runtimeConfig", "args", "capabilities"}
)


class CniError(Exception):
    """An error result. ``code`` is a spec code (1-99) or ours (100+); ``msg`` short, ``details`` the
    long explanation naming the field or variable."""

    def __init__(self, code: int, msg: str, details: str = "") -> None:
        super().__init__(f"{msg}: {details}" if details else msg)
        self.code = code
        self.msg = msg
        self.details = details

    def to_json(self, cni_version: str) -> dict[str, Any]:
        out: dict[str, Any] = {"cniVersion": cni_version, "code": self.code, "msg": self.msg}
        if self.details:
            out["details"] = self.details
        return out


class Env(NamedTuple):
    """The ``CNI_*`` parameters of one invocation."""

    command: str
    container_id: str = ""
    netns: str | None = None
    ifname: str = ""
    args: tuple[tuple[str, str], ...] = ()
    path: tuple[str, ...] = ()

    def arg(self, key: str) -> str | None:
        for k, v in self.args:
            if k == key:
                return v
        return None


def _ifname_problem(name: str) -> str | None:
    # Linux interface name rules as the spec states them (SPEC.md 2, CNI_IFNAME / ADD parameters).
    if not name:
        return "empty"
    if name in (".", ".."):
        return f"{name!r} is not an interface name"
    if len(name) >= 16:
        return f"{name!r} is {len(name)} characters (at most 15)"
    if "/" in name or ":" in name or any(c.isspace() for c in name):
        return f"{name!r} contains '/', ':' or whitespace"
    return None


def parse_cni_args(text: str) -> tuple[tuple[str, str], ...]:
    """``CNI_ARGS``: ``K=V`` pairs separated by ``;`` (e.g. the kubelet's
    ``K8S_POD_NAMESPACE=ns;K8S_POD_NAME=p``). Empty pieces are ignored; a piece without ``=`` or with an
    empty key is an error (ValueError naming it)."""
    pairs: list[tuple[str, str]] = []
    for piece in text.split(";"):
        if not piece:
            continue
        key, sep, value = piece.partition("=")
        if not sep or not key:
            raise ValueError(f"{piece!r} is not KEY=VALUE")
        pairs.append((key, value))
    return tuple(pairs)


def parse_env(environ: Mapping[str, str]) -> Env:
    """Validate the environment for the command it names. Raises CniError(4) naming every invalid or
    missing variable."""
    command = environ.get("CNI_COMMAND", "")
    if command not in COMMANDS:
        shown = repr(command) if command else "missing"
        raise CniError(INVALID_ENV, "invalid environment variables",
                       f"CNI_COMMAND: {shown} (one of {', '.join(COMMANDS)})")
    if command == "VERSION":
        return Env(command=command)
    problems: list[str] = []
    container_id = environ.get("CNI_CONTAINERID", "")
    if not container_id:
        problems.append("CNI_CONTAINERID: missing")
    elif not _ID_RE.match(container_id):
        problems.append(f"CNI_CONTAINERID: {container_id!r} must start with a letter or digit and "
                        "contain only letters, digits, '_', '.', '-'")
    netns = environ.get("CNI_NETNS") or None
    if netns is None and command != "DEL":
        problems.append("CNI_NETNS: missing")
    ifname = environ.get("CNI_IFNAME", "")
    why = _ifname_problem(ifname)
    if why is not None:
        problems.append(f"CNI_IFNAME: {'missing' if not ifname else why}")
    args: tuple[tuple[str, str], ...] = ()
    try:
        args = parse_cni_args(environ.get("CNI_ARGS", ""))
    except ValueError as e:
        problems.append(f"CNI_ARGS: {e}")
    if problems:
        raise CniError(INVALID_ENV, "invalid environment variables", "; ".join(problems))
    path = tuple(p for p in environ.get("CNI_PATH", "").split(":") if p)
    return Env(command=command, container_id=container_id, netns=netns, ifname=ifname, args=args, path=path)


class Interface(NamedTuple):
    name: str
    mac: str | None = None
    sandbox: str | None = None


class IPConfig(NamedTuple):
    address: str  # CIDR, e.g. "10.1.0.5/16"
    gateway: str | None = None
    interface: int | None = None  # index into the result's interfaces


class PrevResult(NamedTuple):
    """The previous plugin's result: kept verbatim (``raw``) because a chained plugin must hand it on
    unchanged, plus the parts the node agent needs."""

    raw: Mapping[str, Any]
    interfaces: tuple[Interface, ...]
    ips: tuple[IPConfig, ...]


class NetConf(NamedTuple):
    """One plugin's execution configuration (the object on stdin)."""

    cni_version: str
    name: str
    type: str
    prev_result: PrevResult | None
    runtime_config: Mapping[str, Any]
    args: Mapping[str, Any]
    socket_path: str
    timeout_s: float
    ignored_keys: tuple[str, ...] = ()  # unknown keys (and a bad prevResult) tolerated on DEL


def _version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


def version_of(data: bytes) -> str:
    """The ``cniVersion`` to put in an error result: the one supplied if it can be read, else ours."""
    try:
        obj = json.loads(data)
    except ValueError:
        return SPEC_VERSION
    v = obj.get("cniVersion") if isinstance(obj, dict) else None
    return v if isinstance(v, str) and v else SPEC_VERSION


def decode(data: bytes) -> dict[str, Any]:
    """stdin bytes -> JSON object, or CniError(6) / (7) for something that is not one."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CniError(DECODE_FAILURE, "failed to decode network configuration", str(e)) from None
    if not isinstance(obj, dict):
        raise CniError(INVALID_CONFIG, "invalid network configuration",
                       f"expected a JSON object, got {type(obj).__name__}")
    return obj


def _bad(field: str, why: str) -> CniError:
    return CniError(INVALID_CONFIG, "invalid network configuration", f"{field}: {why}")


def _parse_prev_result(obj: Any) -> PrevResult:
    if not isinstance(obj, dict):
        raise _bad("prevResult", f"expected an object, got {type(obj).__name__}")
    raw_ifaces = obj.get("interfaces", [])
    if not isinstance(raw_ifaces, list):
        raise _bad("prevResult.interfaces", "expected a list")
    ifaces: list[Interface] = []
    for i, it in enumerate(raw_ifaces):
        where = f"prevResult.interfaces[{i}]"
        if not isinstance(it, dict) or not isinstance(it.get("name"), str) or not it["name"]:
            raise _bad(where, "expected an object with a non-empty string 'name'")
        for key in ("mac", "sandbox"):
            if key in it and not isinstance(it[key], str):
                raise _bad(f"{where}.{key}", "expected a string")
        ifaces.append(Interface(it["name"], mac=it.get("mac") or None, sandbox=it.get("sandbox") or None))
    raw_ips = obj.get("ips", [])
    if not isinstance(raw_ips, list):
        raise _bad("prevResult.ips", "expected a list")
    ips: list[IPConfig] = []
    for i, it in enumerate(raw_ips):
        where = f"prevResult.ips[{i}]"
        if not isinstance(it, dict):
            raise _bad(where, "expected an object")
        addr = it.get("address")
        try:
            if not isinstance(addr, str):
                raise ValueError("missing")
            ipaddress.ip_interface(addr)
            if "/" not in addr:
                raise ValueError("no prefix length")
        except ValueError as e:
            raise _bad(f"{where}.address", f"{addr!r} is not an IP address in CIDR notation ({e})") from None
        gw = it.get("gateway")
        if gw is not None:
            try:
                if not isinstance(gw, str):
                    raise ValueError("not a string")
                ipaddress.ip_address(gw)
            except ValueError:
                raise _bad(f"{where}.gateway", f"{gw!r} is not an IP address") from None
        idx = it.get("interface")
        if idx is not None and (
            not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx < len(ifaces)
        ):
            raise _bad(f"{where}.interface", f"{idx!r} is not an index into prevResult.interfaces "
                       f"({len(ifaces)} entries)")
        ips.append(IPConfig(address=addr, gateway=gw, interface=idx))
    return PrevResult(raw=obj, interfaces=tuple(ifaces), ips=tuple(ips))


def parse_config(data: bytes, command: str) -> NetConf:
    """Parse and validate the execution configuration for ``command`` (ADD, DEL or CHECK).

    - cniVersion missing/malformed: 7; not supported (or CHECK before 0.4.0): 1.
    - ADD and CHECK need ``prevResult``: this is a chained plugin, it adds nothing of its own to the
      pod's network and has to learn the interfaces and IPs from the plugin before it (7).
    - Unknown keys: 2 (naming key and value, as the spec requires) on ADD and CHECK, because an
      unknown key is usually a misspelt option that would otherwise be silently replaced by its
      default. On DEL they are tolerated (``ignored_keys``): a DEL that fails keeps the runtime from
      ever releasing the sandbox, and no option changes what un-enrolling means. For the same reason
      an invalid ``prevResult`` is ignored on DEL (it is not needed to un-enroll).
    """
    obj = decode(data)
    version = obj.get("cniVersion")
    if not isinstance(version, str) or not version:
        raise _bad("cniVersion", "required string")
    if not _VERSION_RE.match(version):
        raise _bad("cniVersion", f"{version!r} is not a semantic version")
    if version not in SUPPORTED_VERSIONS:
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version", f"cniVersion {version!r} is not "
                       f"supported (supported: {', '.join(SUPPORTED_VERSIONS)})")
    if command == "CHECK" and _version_key(version) < _version_key(CHECK_MIN_VERSION):
        raise CniError(INCOMPATIBLE_VERSION, "incompatible CNI version",
                       f"CHECK needs cniVersion {CHECK_MIN_VERSION} or later, config has {version!r}")
    name = obj.get("name")
    if not isinstance(name, str) or not _ID_RE.match(name):
        raise _bad("name", f"{name!r} must be a string starting with a letter or digit and containing "
                   "only letters, digits, '_', '.', '-'")
    ptype = obj.get("type")
    if not isinstance(ptype, str) or not ptype or "/" in ptype:
        raise _bad("type", f"{ptype!r} must be a non-empty string without '/'")
    unknown = sorted(
        k for k in obj if k not in PROTOCOL_KEYS and k not in PLUGIN_KEYS and not k.startswith("cni.dev/")
    )
    if unknown and command != "DEL":
        k = unknown[0]
        raise CniError(UNSUPPORTED_FIELD, "unsupported field in network configuration",
                       f"{k}={json.dumps(obj[k])} (ztagent-cni accepts socketPath and timeoutSeconds)")
    prev: PrevResult | None = None
    if "prevResult" in obj and obj["prevResult"] is not None:
        try:
            prev = _parse_prev_result(obj["prevResult"])
        except CniError as e:
            if command != "DEL":
                raise
            # DEL needs only the attachment's identity; a cached result we cannot read must not
            # keep the sandbox from ever being released.
            unknown.append(f"prevResult ({e.details})")
    elif command in ("ADD", "CHECK"):
        raise _bad("prevResult", "missing: ztagent-cni is a chained plugin and must follow the interface "
                   "plugin (e.g. ptp or bridge) in the conflist's plugins list")
    for key in ("runtimeConfig", "args"):
        if key in obj and not isinstance(obj[key], dict):
            raise _bad(key, f"expected an object, got {type(obj[key]).__name__}")
    sock = obj.get("socketPath", DEFAULT_SOCKET)
    if not isinstance(sock, str) or not sock.startswith("/"):
        raise _bad("socketPath", f"{sock!r} must be an absolute path")
    timeout = obj.get("timeoutSeconds", DEFAULT_TIMEOUT_S)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not 0 < timeout <= MAX_TIMEOUT_S:
        raise _bad("timeoutSeconds", f"{timeout!r} must be a number in (0, {MAX_TIMEOUT_S:g}]")
    return NetConf(
        cni_version=version, name=name, type=ptype, prev_result=prev,
        runtime_config=obj.get("runtimeConfig") or {}, args=obj.get("args") or {},
        socket_path=sock, timeout_s=float(timeout), ignored_keys=tuple(unknown),
    )


class PodRef(NamedTuple):
    """Who the sandbox belongs to, as the runtime tells it (kubelet/containerd put it in CNI_ARGS).
    None where the runtime did not say (a non-Kubernetes runtime): the agent then decides."""

    namespace: str | None = None
    name: str | None = None
    uid: str | None = None


def pod_ref(env: Env) -> PodRef:
    return PodRef(
        namespace=env.arg("K8S_POD_NAMESPACE") or None,
        name=env.arg("K8S_POD_NAME") or None,
        uid=env.arg("K8S_POD_UID") or None,
    )


def add_result(conf: NetConf) -> dict[str, Any]:
    """The ADD success result: ``prevResult`` handed on unchanged (we change no interface, IP or
    route), under the configuration's ``cniVersion``."""
    assert conf.prev_result is not None  # parse_config requires it for ADD
    out = dict(conf.prev_result.raw)
    out["cniVersion"] = conf.cni_version
    return out


def version_result(data: bytes) -> dict[str, Any]:
    """The VERSION result. stdin may be empty (then we answer with our spec version) or carry
    ``{"cniVersion": ...}``, which is echoed. Undecodable stdin: CniError(6)."""
    version = SPEC_VERSION
    if data.strip():
        obj = decode(data)
        v = obj.get("cniVersion")
        if v is not None:
            if not isinstance(v, str) or not _VERSION_RE.match(v):
                raise _bad("cniVersion", f"{v!r} is not a semantic version")
            version = v
    return {"cniVersion": version, "supportedVersions": list(SUPPORTED_VERSIONS)}
