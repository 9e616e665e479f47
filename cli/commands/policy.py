"""`ztagent policy check|lint`: evaluate a hypothetical connection, or flag policy foot-guns.

``check`` decides exactly as the destination node agent would (policy.PolicyIndex.check:
PeerAuthentication first, then AuthorizationPolicy) and prints ``ALLOW`` or ``DENY`` as the first
word, the deciding policies and the reason. Exit 0 allow, 1 deny, 2 bad input.

``lint`` prints one finding per line (``SEVERITY code policy path: message``), with stable codes
(policy.lint.CODES) and severities error/warning/info, like ``istioctl analyze``. Exit status: 0 no
finding at or above ``--failure-threshold`` (default error), 1 some finding at or above it, 2 bad
input (unreadable file, invalid YAML, a MeshConfig error, an unknown --suppress code). Findings
are still printed below the threshold. ``--suppress CODE[=GLOB]`` (repeatable) drops a code, or
only for policies matching the glob (``Kind ns/name`` or ``ns/name``).

``-n/--namespace NS`` gives documents without ``metadata.namespace`` that namespace, as
``kubectl apply -n NS`` does; without it such a document is an error (lint) or bad input (check).

Files (``-f``, repeatable) are YAML streams: either the local config (a ``kind: MeshConfig``
document plus policies, read with mesh.config, which gives workload labels, IPs, trust domain
and root namespace) or plain Istio policy documents. At most one MeshConfig in all files.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from identity.spiffe import SpiffeId, SpiffeIdError
from mesh.config import ConfigError, MeshConfig, Workload, parse_config
from policy import (
    Connection,
    DocumentIssue,
    Policy,
    PolicyIndex,
    PolicySet,
    parse_policies,
)
from policy.lint import (
    CODES,
    ERROR,
    SEVERITIES,
    Finding,
    Suppression,
    WorkloadRef,
    document_findings,
    failing,
    lint,
    parse_suppression,
)
from policy.model import DEFAULT_ROOT_NAMESPACE
from policy.parse import valid_namespace

EXIT_ALLOW, EXIT_DENY, EXIT_BAD_INPUT = 0, 1, 2
EXIT_CLEAN, EXIT_FINDINGS = 0, 1


_INVALID_POLICIES = (
    "invalid policy documents (the agent enforces them fail-closed: an invalid ALLOW allows nothing,"
    " an invalid DENY denies everything it selects; fix them before relying on this answer):\n  "
)


class BadInput(Exception):
    """Input the command cannot evaluate: reported on stderr, exit 2."""


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("policy", help="evaluate or lint Istio security policies offline")
    psub = p.add_subparsers(dest="policy_command", metavar="SUBCOMMAND", required=True)

    c = psub.add_parser(
        "check",
        help="decide one hypothetical connection as the destination agent would",
        description="Evaluate one connection exactly as the destination node agent would "
        "(PeerAuthentication, then AuthorizationPolicy). Prints ALLOW or DENY first. "
        "Exit 0 allow, 1 deny, 2 bad input.",
    )
    _files_arg(c)
    src = c.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--source-principal",
        metavar="SPIFFE_ID",
        help="the client's identity, e.g. spiffe://cluster.local/ns/ns1/sa/sleep",
    )
    src.add_argument(
        "--plaintext", action="store_true", help="the client is not in the mesh (no mTLS identity)"
    )
    c.add_argument(
        "--source-ip",
        metavar="IP",
        help="client IP (default: the client workload's first IP, "
        "when the config knows it; otherwise unknown, which fails closed)",
    )
    c.add_argument(
        "--destination",
        metavar="NAMESPACE/WORKLOAD",
        help="the destination workload (L4; required without --waypoint)",
    )
    c.add_argument(
        "--destination-labels",
        metavar="K=V,...",
        help="destination labels (default: the workload's labels from the config)",
    )
    c.add_argument(
        "--port",
        type=int,
        metavar="PORT",
        help="destination workload (target) port, as the destination agent sees it (L4: required); "
        "with --waypoint the port the request was sent to (default: the service's first port, else 80)",
    )
    l7 = c.add_argument_group(
        "L7 (a request at a waypoint)",
        "With --waypoint the request is decided as that waypoint decides it: RequestAuthentication "
        "(--jwt checked with --jwks), then the AuthorizationPolicies bound with targetRefs to the "
        "Gateway or to --service; the same code as `ztagent waypoint`.",
    )
    l7.add_argument("--waypoint", metavar="NAMESPACE/NAME", help="the waypoint's Gateway")
    l7.add_argument("--service", metavar="NAMESPACE/NAME", help="the service the request is addressed to")
    l7.add_argument("--method", default="GET", help="HTTP method (default GET)")
    l7.add_argument("--path", help="request-target: path and query, as sent (required with --waypoint)")
    l7.add_argument("--host", help="Host / :authority (default: the service's hostname)")
    l7.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="a request header (repeatable; repeated names are kept in order)",
    )
    l7.add_argument("--jwt", metavar="TOKEN|@FILE", help="sent as 'authorization: Bearer TOKEN'")
    l7.add_argument(
        "--jwks",
        action="append",
        default=[],
        metavar="[URI=]FILE",
        help="the JWKS document a jwksUri serves (FILE alone: for every jwksUri); repeatable",
    )
    l7.add_argument(
        "--at", type=float, metavar="EPOCH_SECONDS", help="evaluate tokens at this time (default now)"
    )
    l7.add_argument(
        "--custom",
        choices=("allow", "deny"),
        help="the ext_authz provider's answer, when a CUSTOM policy matches (offline: not asked)",
    )
    c.add_argument(
        "--root-namespace", help=f"mesh root namespace (default: the config's, else {DEFAULT_ROOT_NAMESPACE})"
    )
    c.add_argument("-o", "--output", choices=("text", "json"), default="text")
    c.set_defaults(func=run_check)

    lp = psub.add_parser(
        "lint",
        help="flag policy foot-guns (fit for CI, like istioctl analyze)",
        description="Flag invalid and legal-but-dangerous policy. Every finding has a stable code and a "
        "severity. Exit status: 0 when no finding is at or above --failure-threshold, 1 when some is, "
        "2 for bad input.",
        epilog="codes:\n" + "\n".join(f"  {c.name:<28} {c.severity:<8} {c.summary}" for c in CODES.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _files_arg(lp)
    lp.add_argument(
        "--failure-threshold",
        choices=SEVERITIES,
        default=ERROR,
        help="the lowest severity that makes lint exit 1 (default: error)",
    )
    lp.add_argument(
        "--suppress",
        action="append",
        default=[],
        metavar="CODE[=GLOB]",
        help="drop findings of CODE, or only those whose policy matches GLOB "
        "('Kind ns/name' or 'ns/name', shell-style); repeatable",
    )
    lp.add_argument(
        "--trust-domain", help="the mesh trust domain (default: the config's, else cluster.local)"
    )
    lp.add_argument(
        "--root-namespace", help=f"mesh root namespace (default: the config's, else {DEFAULT_ROOT_NAMESPACE})"
    )
    lp.add_argument("-o", "--output", choices=("text", "json"), default="text")
    lp.set_defaults(func=run_lint)


def _files_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-f",
        "--file",
        dest="files",
        action="append",
        required=True,
        metavar="FILE",
        help="config or policy YAML file (repeatable; a later file may also be given after one -f)",
    )
    p.add_argument("more_files", nargs="*", metavar="FILE", help=argparse.SUPPRESS)
    p.add_argument(
        "-n",
        "--namespace",
        metavar="NS",
        help="namespace for documents without metadata.namespace (as kubectl apply -n does)",
    )


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Inputs:
    policies: list[Policy] = field(default_factory=list)
    errors: list[str] = field(
        default_factory=list
    )  # policy document errors, "file: document N ...: path: msg"
    located: list[tuple[str, DocumentIssue]] = field(default_factory=list)  # (file, error) for lint
    warnings: list[str] = field(default_factory=list)
    cross_file: list[Finding] = field(default_factory=list)
    mesh: MeshConfig | None = None
    policy_set: PolicySet = field(default_factory=PolicySet)


class _StrictLoader(yaml.SafeLoader):
    """Duplicate keys are errors (PyYAML would keep the last one, silently changing a policy)."""


def _mapping_no_dupes(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    out: dict[Any, Any] = {}
    for k_node, v_node in node.value:
        k = loader.construct_object(k_node, deep=deep)
        if k in out:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {k!r}", k_node.start_mark)
        out[k] = loader.construct_object(v_node, deep=deep)
    return out


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_no_dupes)


def _policy_parser(default_namespace: str | None) -> Callable[[Sequence[Any]], tuple[Any, Sequence[Any]]]:
    # Keep policy errors out of ConfigError: lint reports them as findings, check as bad input.
    from mesh.config import thaw

    def parse(docs: Sequence[Any]) -> tuple[Any, Sequence[Any]]:
        return parse_policies([thaw(d.raw) for d in docs], default_namespace=default_namespace), ()

    return parse


def _issue_text(file: str, issue: DocumentIssue) -> str:
    return f"{file}: {issue}"


def load_inputs(
    paths: Sequence[str], *, strict_policies: bool, default_namespace: str | None = None
) -> Inputs:
    """Read every file; raise BadInput for unreadable files, bad YAML, config errors.

    With ``strict_policies`` a policy document error is also BadInput (check: the agent would
    refuse this config); otherwise it is returned in ``errors`` (lint reports it as a finding).
    ``default_namespace`` is the namespace of documents without one (``-n``).
    """
    if default_namespace is not None and not valid_namespace(default_namespace):
        raise BadInput(f"-n/--namespace: {default_namespace!r} is not a valid namespace name")
    out = Inputs()
    seen: dict[tuple[str, str], str] = {}
    sets: list[PolicySet] = []
    for path in paths:
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise BadInput(f"{path}: cannot read: {exc}") from None
        try:
            docs = list(yaml.load_all(text, Loader=_StrictLoader))
        except yaml.YAMLError as exc:
            raise BadInput(f"{path}: invalid YAML: {exc}") from None
        if any(isinstance(d, dict) and d.get("kind") == "MeshConfig" for d in docs):
            if out.mesh is not None:
                raise BadInput(f"{path}: a second MeshConfig (the first is in {out.mesh.source})")
            try:
                out.mesh = parse_config(text, file=path, policy_parser=_policy_parser(default_namespace))
            except ConfigError as exc:
                raise BadInput("\n".join(str(i) for i in exc.issues)) from None
            ps = out.mesh.parsed_policies
            assert isinstance(ps, PolicySet)
        else:
            ps = parse_policies(docs, default_namespace=default_namespace)
        for e in ps.errors:
            out.errors.append(_issue_text(path, e))
            out.located.append((path, e))
        for w in ps.warnings:
            out.warnings.append(_issue_text(path, w))
        for p in ps:
            ident = (p.kind, p.key)
            if ident in seen and seen[ident] != path:  # same-file duplicates are already in ps.errors
                out.errors.append(f"{path}: duplicate {p.kind} {p.key} (also in {seen[ident]})")
                out.cross_file.append(
                    Finding(
                        "invalid",
                        ERROR,
                        f"{p.kind} {p.key}",
                        "metadata.name",
                        f"duplicate: defined in {seen[ident]} and {path}",
                    )
                )
            else:
                seen[ident] = path
        sets.append(ps)
    if strict_policies and out.errors:
        raise BadInput(_INVALID_POLICIES + "\n  ".join(out.errors))
    out.policy_set = PolicySet(
        authorization=tuple(p for s in sets for p in s.authorization),
        peer_authentication=tuple(p for s in sets for p in s.peer_authentication),
        request_authentication=tuple(p for s in sets for p in s.request_authentication),
        errors=tuple(e for s in sets for e in s.errors),
        warnings=tuple(w for s in sets for w in s.warnings),
    )
    out.policies = list(out.policy_set)
    return out


# --------------------------------------------------------------------------------------------
# check


def _parse_labels(text: str) -> dict[str, str]:
    labels: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise BadInput(f"--destination-labels: {item!r} is not key=value")
        labels[k.strip()] = v.strip()
    return labels


def _find_workload(mesh: MeshConfig | None, namespace: str, name: str) -> Workload | None:
    if mesh is None:
        return None
    for w in mesh.workloads:
        if w.namespace == namespace and w.name == name:
            return w
    return None


def _build_connection(args: argparse.Namespace, inputs: Inputs) -> tuple[Connection, list[str]]:
    notes: list[str] = []
    if args.destination is None or args.port is None:
        raise BadInput("--destination and --port are required (or --waypoint for a request at a waypoint)")
    ns, sep, name = args.destination.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise BadInput(f"--destination: {args.destination!r} is not NAMESPACE/WORKLOAD")
    if not 1 <= args.port <= 65535:
        raise BadInput(f"--port: {args.port} is not in 1..65535")
    wl = _find_workload(inputs.mesh, ns, name)
    if args.destination_labels is not None:
        labels = _parse_labels(args.destination_labels)
    elif wl is not None:
        labels = dict(wl.labels)
    else:
        where = "the config has no such workload" if inputs.mesh else "no MeshConfig was given"
        raise BadInput(f"--destination {args.destination}: {where}; pass --destination-labels")
    dest_ip = wl.ips[0] if wl is not None and wl.ips else None

    principal: str | None = None
    source_wl: Workload | None = None
    if not args.plaintext:
        raw = args.source_principal
        text = raw if raw.startswith("spiffe://") else "spiffe://" + raw
        try:
            sid = SpiffeId.parse(text)
        except SpiffeIdError as exc:
            raise BadInput(f"--source-principal: {raw!r} is not a SPIFFE ID ({exc})") from None
        principal = sid.principal
        if inputs.mesh is not None:
            matches = [w for w in inputs.mesh.workloads if w.spiffe_id == sid]
            source_wl = matches[0] if len(matches) == 1 else None
    if args.source_ip is not None:
        try:
            src_ip = ipaddress.ip_address(args.source_ip)
        except ValueError:
            raise BadInput(f"--source-ip: {args.source_ip!r} is not an IP address") from None
    elif source_wl is not None and source_wl.ips:
        src_ip = source_wl.ips[0]
        notes.append(f"source IP {src_ip} taken from workload {source_wl.key}")
    else:
        src_ip = None
        if _uses_source_ip(inputs):
            notes.append("source IP unknown: ipBlocks/source.ip are evaluated fail-closed (pass --source-ip)")
    return (
        Connection(
            source_principal=principal,
            source_ip=src_ip,
            destination_namespace=ns,
            destination_port=args.port,
            destination_labels=labels,
            destination_ip=dest_ip,
        ),
        notes,
    )


def _uses_source_ip(inputs: Inputs) -> bool:
    for p in inputs.policy_set.authorization:
        for r in p.rules or ():
            if any(s.ip_blocks or s.not_ip_blocks for s in r.sources or ()):
                return True
            if any(c.key == "source.ip" for c in r.conditions or ()):
                return True
    return False


def run_check(args: argparse.Namespace) -> int:
    if args.waypoint is not None:
        return run_check_l7(args)
    try:
        inputs = load_inputs(
            [*args.files, *args.more_files], strict_policies=True, default_namespace=args.namespace
        )
        conn, notes = _build_connection(args, inputs)
    except BadInput as exc:
        print(f"ztagent policy check: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    root = args.root_namespace or (inputs.mesh.root_namespace if inputs.mesh else DEFAULT_ROOT_NAMESPACE)
    decision = PolicyIndex(inputs.policies, root).check(conn)
    if args.output == "json":
        print(json.dumps(decision.to_dict(), indent=2))
    else:
        who = ", ".join(decision.policies) if decision.policies else "(no policy)"
        print(f"{decision.verdict.value} {who}")
        print(f"  reason: {decision.reason}")
        if decision.mtls is not None:
            print(f"  mtls: {decision.mtls.describe()}")
        if decision.audit:
            print(f"  audit: {', '.join(decision.audit)}")
        if decision.dry_run_verdict is not None:
            matched = ", ".join(f"{m.policy} ({m.action.value})" for m in decision.dry_run) or "none matched"
            print(f"  dry-run: would {decision.dry_run_verdict.value} ({matched})")
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    for w in inputs.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_ALLOW if decision.allowed else EXIT_DENY


# --------------------------------------------------------------------------------------------
# check, L7: one request at a waypoint (waypoint.decide, the waypoint's own code)


def _ns_name(flag: str, text: str) -> tuple[str, str]:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name or "/" in name:
        raise BadInput(f"{flag}: {text!r} is not NAMESPACE/NAME")
    return ns, name


def _read_arg(flag: str, text: str) -> str:
    if not text.startswith("@"):
        return text
    try:
        with open(text[1:], encoding="utf-8") as f:
            return f.read().strip()
    except OSError as exc:
        raise BadInput(f"{flag}: cannot read {text[1:]}: {exc}") from None


def run_check_l7(args: argparse.Namespace) -> int:
    import time

    from mesh.model import Waypoint
    from policy.jwt import JwksError, JwksStore, rules_from_policy
    from policy.l7 import CustomOutcome, L7PolicyIndex
    from waypoint.decide import RequestFacts, WaypointPolicies, decide

    try:
        inputs = load_inputs(
            [*args.files, *args.more_files], strict_policies=True, default_namespace=args.namespace
        )
        wns, wname = _ns_name("--waypoint", args.waypoint)
        mesh = inputs.mesh
        wp = next((w for w in mesh.waypoints if w.key == args.waypoint), None) if mesh else None
        if wp is None:
            if mesh is not None and mesh.waypoints:
                have = ", ".join(w.key for w in mesh.waypoints)
                raise BadInput(
                    f"--waypoint {args.waypoint}: the config declares no such Gateway (has: {have})"
                )
            td = str(mesh.trust_domain) if mesh else "cluster.local"
            wp = Waypoint(wname, wns, wname, (), SpiffeId.for_workload(td, wns, wname))
        svc = None
        if args.service is not None:
            sns, sname = _ns_name("--service", args.service)
            svc = (
                next((x for x in mesh.services if x.namespace == sns and x.name == sname), None)
                if mesh
                else None
            )
        if args.path is None:
            raise BadInput("--path is required with --waypoint")
        headers: list[tuple[str, str]] = []
        for h in args.header:
            n, sep, v = h.partition(":")
            if not sep or not n.strip():
                raise BadInput(f"-H/--header: {h!r} is not 'NAME: VALUE'")
            headers.append((n.strip().lower(), v.strip()))
        if args.jwt is not None:
            headers.append(("authorization", "Bearer " + _read_arg("--jwt", args.jwt)))
        now = args.at if args.at is not None else time.time()
        root = args.root_namespace or (mesh.root_namespace if mesh else DEFAULT_ROOT_NAMESPACE)
        stores: dict[str, JwksStore] = {}
        uris = {r.key for ra in inputs.policy_set.request_authentication for r in rules_from_policy(ra)
                if r.rule.jwks_uri}  # fmt: skip
        for item in args.jwks:
            uri, sep, path = item.rpartition("=")
            targets = [uri] if sep and uri else sorted(uris)
            doc = _read_arg("--jwks", "@" + path)
            for u in targets:
                try:
                    stores.setdefault(u, JwksStore(u)).update(doc, now)
                except JwksError as exc:
                    raise BadInput(f"--jwks {item}: {exc}") from None
        pols = WaypointPolicies(wp, L7PolicyIndex(inputs.policy_set.authorization, root),
                                inputs.policy_set.request_authentication, root,
                                inputs.policy_set.authorization, stores)  # fmt: skip
        sref = _ns_name("--service", args.service) if args.service else (None, None)
        target = pols.target(sref[0], sref[1])
        port = args.port or (svc.ports[0].port if svc and svc.ports else 80)
        host = args.host or (f"{svc.hostname}:{port}" if svc else f"{args.service or 'example'}:{port}")
        principal = None
        if not args.plaintext:
            raw = args.source_principal
            try:
                principal = str(SpiffeId.parse(raw if raw.startswith("spiffe://") else "spiffe://" + raw))
            except SpiffeIdError as exc:
                raise BadInput(f"--source-principal: {raw!r} is not a SPIFFE ID ({exc})") from None
        facts = RequestFacts(args.method, args.path, host, tuple(headers), principal, args.source_ip,
                             str(svc.vips[0]) if svc and svc.vips else None, port)  # fmt: skip
        out = decide(pols, target, facts, now)
        if out.pending_custom is not None and args.custom is not None:
            out = decide(pols, target, facts, now, CustomOutcome(out.pending_custom, args.custom == "allow"))
    except BadInput as exc:
        print(f"ztagent policy check: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.output == "json":
        print(json.dumps(out.to_dict(), indent=2))
    else:
        verdict = "ALLOW" if out.allowed else "DENY"
        print(f"{verdict} {', '.join(out.policies) if out.policies else '(no policy)'}")
        print(f"  status: {out.status}" + (f" ({out.body})" if out.body else ""))
        print(f"  reason: {out.reason}")
        if out.request is not None:
            print(f"  normalized path: {out.request.path}")
        print(f"  request principal: {out.request_principal or '(none)'}")
        if out.pending_custom:
            print(f"  CUSTOM: provider {out.pending_custom} would be asked (pass --custom allow|deny)")
    for w in inputs.warnings:
        print(f"warning: {w}", file=sys.stderr)
    return EXIT_ALLOW if out.allowed else EXIT_DENY


# --------------------------------------------------------------------------------------------
# lint


def run_lint(args: argparse.Namespace) -> int:
    try:
        suppressions: list[Suppression] = []
        for text in args.suppress:
            try:
                suppressions.append(parse_suppression(text))
            except ValueError as exc:
                raise BadInput(f"--suppress: {exc}") from None
        inputs = load_inputs(
            [*args.files, *args.more_files], strict_policies=False, default_namespace=args.namespace
        )
    except BadInput as exc:
        print(f"ztagent policy lint: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    mesh = inputs.mesh
    td = args.trust_domain or (str(mesh.trust_domain) if mesh else "cluster.local")
    root = args.root_namespace or (mesh.root_namespace if mesh else DEFAULT_ROOT_NAMESPACE)
    workloads = (
        [WorkloadRef(w.namespace, w.name, w.labels) for w in mesh.workloads if w.enrolled] if mesh else []
    )
    # Policy errors are reported with their file (lint() alone only knows document indexes).
    by_file: dict[str, list[DocumentIssue]] = {}
    for file, e in inputs.located:
        by_file.setdefault(file, []).append(e)
    located = [f for file, issues in by_file.items() for f in document_findings(issues, file)]
    ps = inputs.policy_set
    clean = PolicySet(ps.authorization, ps.peer_authentication, ps.request_authentication, (), ps.warnings)
    findings = [
        *located,
        *inputs.cross_file,
        *lint(clean, trust_domain=td, root_namespace=root, workloads=workloads),
    ]
    findings = [f for f in findings if not any(s.matches(f) for s in suppressions)]
    failed = failing(findings, args.failure_threshold)
    if args.output == "json":
        print(
            json.dumps(
                {
                    "findings": [f.to_dict() for f in findings],
                    "failureThreshold": args.failure_threshold,
                    "failing": len(failed),
                },
                indent=2,
            )
        )
    else:
        for f in findings:
            print(str(f))
        if not findings:
            print("OK: no findings")
        else:
            counts = ", ".join(
                f"{sum(f.severity == sev for f in findings)} {sev}" for sev in reversed(SEVERITIES)
            )
            verdict = f"{len(failed)} at or above" if failed else "none at or above"
            print(f"{counts}; {verdict} --failure-threshold {args.failure_threshold}", file=sys.stderr)
    return EXIT_FINDINGS if failed else EXIT_CLEAN
