"""Credential directories: the PEM files a role reads its credential from.

A credential directory (what ``ztagent ca issue`` and ``ztagent ca bootstrap-node`` write and the
node agent reads as ``--node-credentials``) holds ``key.pem`` (0600), ``cert-chain.pem`` (leaf
then intermediates, never the root) and ``root-cert.pem`` (the trust bundle).

Every write goes to a temporary file in the same directory and is renamed into place, so a
crash leaves the old file or the new one, never half of one. The CA directory
(:mod:`caserver.store`) is written with the same helpers.

The node agent never writes those three files: they are the bootstrap credential, its way back
to the CA after any outage. It keeps its renewed node credential beside them in one file,
``node-renewed.pem`` (0600: key then chain), so one rename replaces key and certificate together.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Final

KEY_FILE: Final = "key.pem"
CHAIN_FILE: Final = "cert-chain.pem"
ROOTS_FILE: Final = "root-cert.pem"
RENEWED_FILE: Final = "node-renewed.pem"
_KEY_BEGIN: Final = b"-----BEGIN PRIVATE KEY-----"
_KEY_END: Final = b"-----END PRIVATE KEY-----"


class CredentialFileError(Exception):
    """A CA or credential directory cannot be created or used; the message says why and where."""


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        # The mode argument is filtered by the umask; set it explicitly so keys are 0600 exactly.
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_all(directory: Path, files: dict[str, tuple[bytes, int]]) -> None:
    """Write every file to a temporary name first, then rename them all: nothing half-written."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmps: list[tuple[Path, Path]] = []
    try:
        for name, (data, mode) in files.items():
            final = directory / name
            tmp = directory / f".{name}.new-{os.getpid()}"
            write_atomic(tmp, data, mode)
            tmps.append((tmp, final))
    except OSError as exc:
        for tmp, _ in tmps:
            tmp.unlink(missing_ok=True)
        raise CredentialFileError(f"cannot write {directory}: {exc}") from None
    for tmp, final in tmps:
        os.replace(tmp, final)


def read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise CredentialFileError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CredentialFileError(f"cannot read {what} {path}: {exc}") from None


def check_key_mode(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise CredentialFileError(
            f"private key {path} has mode {mode:04o}; it must not be readable by group or others "
            f"(chmod 600 {path})"
        )


@dataclass(frozen=True)
class CredentialFiles:
    """PEM material of one credential directory (raw bytes, as TLS libraries want them)."""

    key_pem: bytes
    chain_pem: bytes
    roots_pem: bytes


def write_credentials(directory: str | os.PathLike[str], files: CredentialFiles) -> dict[str, str]:
    d = Path(directory)
    write_all(
        d,
        {
            KEY_FILE: (files.key_pem, 0o600),
            CHAIN_FILE: (files.chain_pem, 0o644),
            ROOTS_FILE: (files.roots_pem, 0o644),
        },
    )
    return {"key": str(d / KEY_FILE), "cert_chain": str(d / CHAIN_FILE), "root_cert": str(d / ROOTS_FILE)}


def read_credentials(directory: str | os.PathLike[str]) -> CredentialFiles:
    d = Path(directory)
    key_path = d / KEY_FILE
    key = read_file(key_path, "private key")
    check_key_mode(key_path)
    chain = read_file(d / CHAIN_FILE, "certificate chain")
    return CredentialFiles(key, chain, read_file(d / ROOTS_FILE, "trust bundle"))


def write_renewed(directory: str | os.PathLike[str], key_pem: bytes, chain_pem: bytes) -> Path:
    """Persist a renewed node credential beside (never over) the bootstrap credential."""
    if not key_pem.lstrip().startswith(_KEY_BEGIN):
        raise CredentialFileError("renewed node key must be a PKCS#8 PEM private key")
    path = Path(directory) / RENEWED_FILE
    try:
        write_atomic(path, key_pem.rstrip(b"\n") + b"\n" + chain_pem, 0o600)
    except OSError as exc:
        raise CredentialFileError(f"cannot write {path}: {exc}") from None
    return path


def read_renewed(directory: str | os.PathLike[str]) -> tuple[bytes, bytes] | None:
    """(key PEM, chain PEM) of the persisted renewed node credential, or None if there is none."""
    path = Path(directory) / RENEWED_FILE
    if not path.exists():
        return None
    data = read_file(path, "renewed node credential")
    check_key_mode(path)
    start, end = data.find(_KEY_BEGIN), data.find(_KEY_END)
    if start < 0 or end < start:
        raise CredentialFileError(f"renewed node credential {path} holds no PKCS#8 private key")
    end += len(_KEY_END)
    return data[start:end] + b"\n", data[:start] + data[end:]
