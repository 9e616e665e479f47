"""CA throughput: CSRs signed per second, and time to issue certificates for N workloads.

    .venv/bin/python -m bench.ca_bench [--csrs 2000] [--workloads 1000] [--json]

Every figure is printed beside a reference measured in the same run on the same machine:

* ``sign_csr`` (parse + verify the CSR, SPIFFE checks, build and sign the leaf) against
  building and signing the same certificate directly with ``cryptography`` (no checks), the
  same plus parsing and verifying the CSR's signature (the proof of possession, an ECDSA
  verify, which costs more than the sign), and a bare ECDSA P-256 signature over the leaf's
  TBS bytes (the cryptographic floor);
  ``openssl speed ecdsap256`` is added when the openssl binary is present;
* issuing for N workloads (key generation + CSR + sign) against the same steps done with raw
  ``cryptography`` calls (including the CSR parse and signature check a CA cannot skip);
* ``verify_svid`` against cryptography's verifier alone (what our SPIFFE checks add).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store

from identity.bundle import TrustBundleSet
from identity.ca import CertificateAuthority
from identity.keys import build_csr, generate_key
from identity.spiffe import SpiffeId
from identity.svid import verify_svid

TD = "cluster.local"


def _timed(fn: Callable[[], Any], n: int) -> float:
    """Seconds for n calls (one warm-up call first)."""
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return time.perf_counter() - t0


def _raw_leaf(
    ca_key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate,
    pub: ec.EllipticCurvePublicKey,
    sid: str,
    now: dt.datetime,
) -> x509.Certificate:
    """The same leaf the CA builds, made with cryptography directly and no checks."""
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(issuer.subject)
        .public_key(pub)
        .serial_number(int.from_bytes(os.urandom(16), "big") or 1)
        .not_valid_before(now - dt.timedelta(minutes=2))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid)]), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _openssl_speed() -> float | None:
    exe = shutil.which("openssl")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "speed", "-seconds", "2", "ecdsap256"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    for line in out.splitlines():
        if "nistp256" in line:
            # "256 bits ecdsa (nistp256)   0.0000s   0.0001s  52385.9  17005.0"
            return float(line.split()[-2])
    return None


def run(n_csrs: int, n_workloads: int) -> dict[str, Any]:
    now = dt.datetime.now(dt.UTC)
    ca_key = generate_key()
    ca = CertificateAuthority.create_root(TD, now - dt.timedelta(minutes=5), key=ca_key)
    sids = [SpiffeId.for_workload(TD, f"ns{i % 50}", f"sa{i}") for i in range(max(n_csrs, n_workloads))]
    allow = lambda _: True  # noqa: E731

    # 1. CSRs signed per second.
    keys = [generate_key() for _ in range(n_csrs)]
    csrs = [build_csr(k, s) for k, s in zip(keys, sids, strict=False)]
    it = iter(range(10**9))

    def sign_one() -> None:
        i = next(it) % n_csrs
        ca.sign_csr(csrs[i], allowed=allow, now=now)

    t_sign = _timed(sign_one, n_csrs)

    it2 = iter(range(10**9))

    def raw_one() -> None:
        i = next(it2) % n_csrs
        _raw_leaf(ca_key, ca.certificate, keys[i].public_key(), str(sids[i]), now)

    t_raw = _timed(raw_one, n_csrs)

    it3 = iter(range(10**9))

    def raw_checked_one() -> None:
        i = next(it3) % n_csrs
        csr = x509.load_pem_x509_csr(csrs[i])
        assert csr.is_signature_valid
        _raw_leaf(ca_key, ca.certificate, csr.public_key(), str(sids[i]), now)  # type: ignore[arg-type]

    t_raw_checked = _timed(raw_checked_one, n_csrs)

    tbs = _raw_leaf(ca_key, ca.certificate, keys[0].public_key(), str(sids[0]), now).tbs_certificate_bytes
    t_ecdsa = _timed(lambda: ca_key.sign(tbs, ec.ECDSA(hashes.SHA256())), n_csrs)

    # 2. Issue for N workloads: key generation + CSR + sign, sequentially.
    t0 = time.perf_counter()
    for s in sids[:n_workloads]:
        ca.sign_csr(build_csr(generate_key(), s), allowed=allow, now=now)
    t_issue = time.perf_counter() - t0

    t0 = time.perf_counter()
    for s in sids[:n_workloads]:
        k = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(s))]), critical=True
            )
            .sign(k, hashes.SHA256())
        )
        # The CA side, as a CA must do it at least: parse the PEM and check proof of possession.
        got = x509.load_pem_x509_csr(csr.public_bytes(serialization.Encoding.PEM))
        assert got.is_signature_valid
        _raw_leaf(ca_key, ca.certificate, got.public_key(), str(s), now)  # type: ignore[arg-type]
    t_issue_raw = time.perf_counter() - t0

    # 3. Verification (what a peer does per handshake).
    issued = ca.sign_csr(csrs[0], allowed=allow, now=now)
    bundles = TrustBundleSet.of(ca.bundle)
    n_verify = n_csrs
    t_verify = _timed(lambda: verify_svid(issued.chain, bundles, now), n_verify)
    store = Store(list(ca.roots))
    t_verify_raw = _timed(
        lambda: PolicyBuilder().store(store).time(now).build_client_verifier().verify(issued.certificate, []),
        n_verify,
    )

    return {
        "csr_sign_per_s": n_csrs / t_sign,
        "ref_raw_cert_sign_per_s": n_csrs / t_raw,
        "ref_raw_csr_verify_and_sign_per_s": n_csrs / t_raw_checked,
        "ref_raw_ecdsa_sign_per_s": n_csrs / t_ecdsa,
        "ref_openssl_speed_sign_per_s": _openssl_speed(),
        "workloads": n_workloads,
        "issue_workloads_s": t_issue,
        "ref_raw_issue_workloads_s": t_issue_raw,
        "verify_per_s": n_verify / t_verify,
        "ref_raw_verify_per_s": n_verify / t_verify_raw,
    }


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.ca_bench", description=__doc__.splitlines()[0])
    ap.add_argument("--csrs", type=int, default=2000, help="CSRs to sign for the rate (default 2000)")
    ap.add_argument("--workloads", type=int, default=1000, help="workloads to issue for (default 1000)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.csrs < 1 or args.workloads < 1:
        ap.error("--csrs and --workloads must be >= 1")
    r = run(args.csrs, args.workloads)
    if args.json:
        print(json.dumps(r, sort_keys=True))
        return
    ossl = r["ref_openssl_speed_sign_per_s"]
    print(f"CA benchmark (ECDSA P-256, one core, {args.csrs} CSRs, {args.workloads} workloads)")
    print(f"  sign_csr (checks + build + sign)      {r['csr_sign_per_s']:9.0f} CSR/s")
    print(
        f"    ref: same cert, raw cryptography    {r['ref_raw_cert_sign_per_s']:9.0f} cert/s"
        f"  (ours = {r['csr_sign_per_s'] / r['ref_raw_cert_sign_per_s']:.2f}x)"
    )
    print(
        f"    ref: raw CSR parse+verify + sign    {r['ref_raw_csr_verify_and_sign_per_s']:9.0f} cert/s"
        f"  (ours = {r['csr_sign_per_s'] / r['ref_raw_csr_verify_and_sign_per_s']:.2f}x)"
    )
    print(f"    ref: bare ECDSA sign of the TBS     {r['ref_raw_ecdsa_sign_per_s']:9.0f} sig/s")
    if ossl is not None:
        print(f"    ref: openssl speed ecdsap256        {ossl:9.0f} sig/s")
    print(
        f"  issue {r['workloads']} workloads (keygen+CSR+sign) {r['issue_workloads_s']:8.3f} s"
        f"  ({r['issue_workloads_s'] / r['workloads'] * 1e3:.2f} ms each)"
    )
    print(
        f"    ref: same steps + CSR verify, raw    {r['ref_raw_issue_workloads_s']:8.3f} s"
        f"  (ours = {r['issue_workloads_s'] / r['ref_raw_issue_workloads_s']:.2f}x the time)"
    )
    print(f"  verify_svid                           {r['verify_per_s']:9.0f} chains/s")
    print(
        f"    ref: cryptography verifier alone    {r['ref_raw_verify_per_s']:9.0f} chains/s"
        f"  (ours = {r['verify_per_s'] / r['ref_raw_verify_per_s']:.2f}x)"
    )


if __name__ == "__main__":
    main()
