"""HBONE's wire vocabulary, shared by the HTTP/2 core (``tunnel.h2``) and the shell: the
CONNECT target (:class:`Authority`), the statuses a server answers, the request error, the
``forwarded`` header, and ztunnel's HTTP/2 settings (DESIGN.md §4).

Pure (no sockets, no clock) and at the bottom of the tunnel's layers: ``tunnel.h2`` imports it,
and ``tunnel.hbone`` re-exports it under the names the rest of the code has always used.

The HTTP/2 settings are ztunnel's: the common library defaults (64 KiB windows, 16 KiB frames)
would cap a tunnel at a few hundred Mbit/s on a LAN-latency path, so they are set explicitly.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass
from enum import IntEnum

# --- ztunnel's HTTP/2 settings (DESIGN.md §4) -------------------------------------------------
STREAM_WINDOW = 4 * 1024 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
MAX_FRAME_SIZE = 1024 * 1024
# Credit goes back in 1/16-window steps (tunnel.h2.connection.ACK_STEP_FRACTION).
STREAM_ACK_STEP = STREAM_WINDOW // 16
CONNECTION_ACK_STEP = CONNECTION_WINDOW // 16
SERVER_MAX_CONCURRENT_STREAMS = 200
CLIENT_MAX_STREAMS_PER_CONNECTION = 100
# HPACK table and header-list bounds: a CONNECT carries a handful of short headers; anything
# bigger than this is abuse, not a tunnel.
MAX_HEADER_LIST_SIZE = 64 * 1024


class Status(IntEnum):
    """The statuses an HBONE server answers, one per failure class (ztunnel's mapping)."""

    OK = 200
    BAD_REQUEST = 400  # malformed CONNECT, or an authority that is not a local destination
    UNAUTHORIZED = 401  # authorization policy denied the connection
    SERVICE_UNAVAILABLE = 503  # upstream connect failed, or unknown port


class HboneError(Exception):
    """A request or response that breaks the HBONE rules. ``status`` is what a server answers."""

    def __init__(self, message: str, status: Status = Status.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


# --- authority --------------------------------------------------------------------------------
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=8192)
def parse_ip(text: str) -> IpAddress:
    """``ipaddress.ip_address`` remembered: the same few pod IPs are parsed on every connection
    (peer, destination, policy input), and parsing was a few percent of a new tunnel's CPU.
    Raises ValueError like ``ip_address`` (errors are not cached)."""
    return ipaddress.ip_address(text)


@dataclass(frozen=True, order=True)
class Authority:
    """A CONNECT target: an IP literal and a port (HBONE never tunnels to a host name)."""

    ip: IpAddress
    port: int

    @classmethod
    def of(cls, ip: str | IpAddress, port: int) -> Authority:
        try:
            addr = parse_ip(ip) if isinstance(ip, str) else ip
        except ValueError as exc:
            raise HboneError(f"authority host {ip!r} is not an IP address") from exc
        if not isinstance(port, int) or not 0 < port < 65536:
            raise HboneError(f"authority port {port!r} is out of range 1..65535")
        return cls(addr, port)

    @classmethod
    def parse(cls, text: str) -> Authority:
        """Parse ``ip:port`` or ``[ipv6]:port`` strictly (no host names, no zone ids, a port)."""
        if not text:
            raise HboneError("empty :authority; HBONE needs ip:port")
        if "%" in text:
            raise HboneError(f"authority {text!r}: zone ids are not allowed")
        if text.startswith("["):
            close = text.find("]")
            if close < 0 or text[close + 1 : close + 2] != ":":
                raise HboneError(f"authority {text!r}: expected [ipv6]:port")
            host, port_text = text[1:close], text[close + 2 :]
            try:
                ip: IpAddress = ipaddress.IPv6Address(host)
            except ValueError as exc:
                raise HboneError(f"authority {text!r}: {host!r} is not an IPv6 address") from exc
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep:
                raise HboneError(f"authority {text!r} has no port; HBONE needs ip:port")
            if ":" in host:
                raise HboneError(f"authority {text!r}: IPv6 addresses must be bracketed, [addr]:port")
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError as exc:
                raise HboneError(f"authority {text!r}: {host!r} is not an IPv4 address") from exc
        # isdigit() alone accepts '³' and other non-ASCII digits, which int() refuses (fuzz finding).
        if not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
            raise HboneError(f"authority {text!r} has no valid port; HBONE needs ip:port")
        port = int(port_text)
        if not 0 < port < 65536:
            raise HboneError(f"authority {text!r}: port {port} is out of range 1..65535")
        return cls(ip, port)

    def __str__(self) -> str:
        if self.ip.version == 6:
            return f"[{self.ip}]:{self.port}"
        return f"{self.ip}:{self.port}"


def format_forwarded(ip: str | IpAddress, port: int) -> str:
    """ztunnel's ``forwarded`` value: ``for="ip:port"`` (RFC 7239, IPv6 bracketed)."""
    return f'for="{Authority.of(ip, port)}"'


def parse_forwarded_for(value: str) -> Authority | None:
    """The ``for=`` address of the first ``forwarded`` element, or None when absent/not ip:port."""
    first = value.split(",", 1)[0]
    for pair in first.split(";"):
        key, sep, raw = pair.strip().partition("=")
        if sep and key.strip().lower() == "for":
            raw = raw.strip().strip('"')
            try:
                return Authority.parse(raw)
            except HboneError:
                return None
    return None
