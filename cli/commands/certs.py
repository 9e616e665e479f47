"""`ztagent certs verify`: validate an X509-SVID chain against trust bundles (the SVID
equivalent of `openssl verify`).

    ztagent certs verify --bundle root.pem [--bundle other.example=other.pem ...]
                         [--at 2026-01-01T00:00:00Z] [-o json] chain.pem

Exit status: 0 valid (prints the SPIFFE ID), 1 invalid (prints the rule that failed),
2 unusable input (unreadable or unparseable files, bad arguments).

A ``--bundle`` argument is ``PATH`` or ``TRUST_DOMAIN=PATH``. PEM files without a trust domain
are filed under the SPIFFE ID (``spiffe://<td>``) in each root's URI SAN, as our CA writes it;
roots that carry none need the ``TRUST_DOMAIN=`` form. A file whose content starts with ``{``
is read as a SPIFFE bundle (JWKS) and needs the ``TRUST_DOMAIN=`` form.

Output is stable: text mode prints exactly ``<spiffe-id>`` on success and
``<rule>: <message>`` on failure; JSON mode prints one object with sorted keys.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from cryptography import x509

from identity.bundle import BundleError, TrustBundle, TrustBundleSet, load_pem_roots
from identity.ca import signing_trust_domain
from identity.spiffe import SpiffeIdError, TrustDomain
from identity.svid import SvidError, load_pem_chain, verify_svid

EXIT_OK, EXIT_INVALID, EXIT_INPUT = 0, 1, 2
MAX_FILE_BYTES = 1024 * 1024


class InputError(Exception):
    """An input file or argument is unusable (exit 2)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule = rule
        self.message = message


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("certs", help="inspect and verify workload certificates (X509-SVIDs)")
    certs_sub = p.add_subparsers(dest="certs_command", metavar="SUBCOMMAND", required=True)
    v = certs_sub.add_parser(
        "verify",
        help="verify an SVID chain against trust bundles; print its SPIFFE ID",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    v.add_argument(
        "--bundle",
        action="append",
        required=True,
        metavar="[TRUST_DOMAIN=]PATH",
        help="trust bundle (PEM roots, or SPIFFE bundle JSON with TRUST_DOMAIN=); repeatable",
    )
    v.add_argument(
        "--at", metavar="RFC3339", help="validate at this time instead of now, e.g. 2026-01-01T00:00:00Z"
    )
    v.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    v.add_argument("chain", metavar="CHAIN_PEM", help="PEM file: leaf certificate first, then intermediates")
    v.set_defaults(func=run_verify)


def _read(path: str, what: str) -> bytes:
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > MAX_FILE_BYTES:
            raise InputError("input-too-large", f"{what} {path}: {size} bytes, at most {MAX_FILE_BYTES}")
        return p.read_bytes()
    except OSError as exc:
        raise InputError("input-unreadable", f"{what} {path}: {exc.strerror or exc}") from None


def _parse_time(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise InputError(
            "bad-time", f"--at {text!r} is not an RFC 3339 time (e.g. 2026-01-01T00:00:00Z)"
        ) from None
    if t.tzinfo is None:
        raise InputError("bad-time", f"--at {text!r} has no time zone offset (add Z or +hh:mm)")
    return t.astimezone(dt.UTC)


def _split_bundle_arg(arg: str) -> tuple[TrustDomain | None, str]:
    # An existing file named like "a=b.pem" wins over the TD=PATH reading.
    if "=" not in arg or Path(arg).exists():
        return None, arg
    td_text, path = arg.split("=", 1)
    try:
        return TrustDomain.parse(td_text), path
    except SpiffeIdError as exc:
        raise InputError("bad-bundle-argument", f"--bundle {arg!r}: {exc}") from None


def _root_trust_domain(cert: x509.Certificate) -> TrustDomain | None:
    try:
        return signing_trust_domain(cert)
    except ValueError:  # a malformed SAN extension: the root names no trust domain
        return None


def load_bundles(args: list[str]) -> TrustBundleSet:
    roots: dict[TrustDomain, list[x509.Certificate]] = {}
    jwks: list[TrustBundle] = []
    for arg in args:
        td, path = _split_bundle_arg(arg)
        data = _read(path, "bundle")
        try:
            if data.lstrip().startswith(b"{"):
                if td is None:
                    raise InputError(
                        "bundle-trust-domain",
                        f"bundle {path}: JSON bundles need --bundle TRUST_DOMAIN={path}",
                    )
                try:
                    doc = json.loads(data)
                except ValueError as exc:
                    raise InputError("bundle-unreadable", f"bundle {path}: not valid JSON: {exc}") from None
                if not isinstance(doc, dict):
                    raise InputError("bundle-unreadable", f"bundle {path}: JSON bundle is not an object")
                jwks.append(TrustBundle.from_jwks(td, doc))
                continue
            certs = load_pem_roots(data)
        except BundleError as exc:
            raise InputError("bundle-unreadable", f"bundle {path}: {exc}") from None
        for cert in certs:
            cert_td = td or _root_trust_domain(cert)
            if cert_td is None:
                raise InputError(
                    "bundle-trust-domain",
                    f"bundle {path}: root {cert.subject.rfc4514_string()!r} names no trust domain; "
                    f"use --bundle TRUST_DOMAIN={path}",
                )
            roots.setdefault(cert_td, []).append(cert)
    bundles = TrustBundleSet.of(*(TrustBundle(td, tuple(certs)) for td, certs in roots.items()))
    for b in jwks:
        existing = bundles.for_domain(b.trust_domain)
        merged = b if existing is None else TrustBundle(b.trust_domain, existing.roots + b.roots)
        bundles = bundles.with_bundle(merged)
    return bundles


def _emit(output: str, doc: dict[str, Any], text: str, stream: Any = None) -> None:
    if output == "json":
        print(json.dumps(doc, sort_keys=True))
    else:
        print(text, file=stream or sys.stdout)


def run_verify(args: argparse.Namespace) -> int:
    at_given = args.at is not None
    try:
        now = _parse_time(args.at) if at_given else dt.datetime.now(dt.UTC)
        bundles = load_bundles(args.bundle)
        data = _read(args.chain, "chain")
        try:
            chain = load_pem_chain(data)
        except SvidError as exc:
            raise InputError("chain-unreadable", f"chain {args.chain}: {exc.message}") from None
    except InputError as exc:
        doc = {"valid": False, "error": "input", "rule": exc.rule, "message": exc.message}
        _emit(args.output, doc, f"ztagent certs verify: {exc.rule}: {exc.message}", sys.stderr)
        return EXIT_INPUT
    base: dict[str, Any] = {"at": now.isoformat().replace("+00:00", "Z"), "chain": args.chain}
    try:
        sid = verify_svid(chain, bundles, now)
    except SvidError as exc:
        _emit(
            args.output,
            {**base, "valid": False, "rule": exc.rule, "message": exc.message},
            f"{exc.rule}: {exc.message}",
        )
        return EXIT_INVALID
    leaf = chain[0]
    doc = {
        **base,
        "valid": True,
        "spiffe_id": str(sid),
        "trust_domain": str(sid.trust_domain),
        "principal": sid.principal,
        "namespace": sid.namespace,
        "service_account": sid.service_account,
        "not_before": leaf.not_valid_before_utc.isoformat().replace("+00:00", "Z"),
        "not_after": leaf.not_valid_after_utc.isoformat().replace("+00:00", "Z"),
        "serial": f"{leaf.serial_number:x}",
    }
    _emit(args.output, doc, str(sid))
    return EXIT_OK
