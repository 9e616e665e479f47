"""The agent's unary gRPC client (h2 + asyncio TLS) against a real grpcio server.

The server is grpcio's (what `ztagent ca serve` runs, and the reference implementation of the
protocol) with real mTLS over TCP on loopback; its handlers are scripted per test so each wire
behaviour (status codes with messages, deadlines, multiplexing, server restarts) is observed
from our side.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import pytest

from caserver import store as ca_store
from credentials.client import CREATE_CERTIFICATE, NodeCredentials, ca_client_context
from credentials.grpc_unary import (
    MAX_MESSAGE,
    GrpcError,
    Status,
    UnaryChannel,
    _Call,
    decode_message,
    encode_message,
    grpc_timeout,
)
from credentials.identities import CA_SERVER_NAME
from credentials.proto import ca_pb2, ca_pb2_grpc
from tests.agent.test_ca_helpers import CaEnv, make_env, now, short_tmpdir


class ScriptedCa(ca_pb2_grpc.IstioCertificateServiceServicer):
    def __init__(self) -> None:
        self.peers: list[str] = []
        self.delay = 0.0
        self.abort: tuple[grpc.StatusCode, str] | None = None
        self.metadata: list[tuple[str, str]] = []

    async def CreateCertificate(self, request: Any, context: Any) -> Any:  # the wire name
        self.peers.append(context.peer())
        self.metadata = [(m.key, m.value) for m in context.invocation_metadata()]
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.abort is not None:
            await context.abort(*self.abort)
        return ca_pb2.IstioCertificateResponse(cert_chain=[request.csr[::-1]])


@pytest.fixture(scope="module")
def env() -> Iterator[CaEnv]:
    with short_tmpdir() as base:
        yield make_env(base)


async def _start(env: CaEnv, servicer: ScriptedCa, port: int = 0) -> tuple[grpc.aio.Server, int]:
    st = ca_store.load(env.ca_dir)
    key_pem, chain_pem, _ = ca_store.issue_server_certificate(st, now=now())
    server = grpc.aio.server()
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, server)  # type: ignore[no-untyped-call]
    creds = grpc.ssl_server_credentials(
        [(key_pem, chain_pem)], root_certificates=st.bundle.to_pem(), require_client_auth=True
    )
    port = server.add_secure_port(f"127.0.0.1:{port}", creds)
    assert port
    await server.start()
    return server, port


def _channel(env: CaEnv, port: int) -> UnaryChannel:
    """A channel as node-a's agent would open it (its node credential, the CA's TLS name)."""
    return UnaryChannel(
        f"127.0.0.1:{port}", ca_client_context(NodeCredentials.from_dir(env.node_a)), CA_SERVER_NAME
    )


@pytest.fixture
async def served(env: CaEnv) -> AsyncIterator[tuple[ScriptedCa, UnaryChannel]]:
    servicer = ScriptedCa()
    server, port = await _start(env, servicer)
    channel = _channel(env, port)
    try:
        yield servicer, channel
    finally:
        await channel.close()
        await server.stop(None)


def _request(csr: str) -> bytes:
    return bytes(ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=60).SerializeToString())


def _answer(raw: bytes) -> list[str]:
    return list(ca_pb2.IstioCertificateResponse.FromString(raw).cert_chain)


async def test_concurrent_calls_share_one_connection(served: tuple[ScriptedCa, UnaryChannel]) -> None:
    servicer, channel = served
    answers = await asyncio.gather(
        *(channel.call(CREATE_CERTIFICATE, _request(f"csr-{i}"), timeout=10) for i in range(40))
    )
    assert [_answer(a) for a in answers] == [[f"csr-{i}"[::-1]] for i in range(40)]
    assert len(servicer.peers) == 40 and len(set(servicer.peers)) == 1  # one TCP connection
    # What a gRPC server sees of us: a deadline and the gRPC content type.
    assert ("user-agent", "ztagent-grpc-unary") in [(k, v.split(" ")[0]) for k, v in servicer.metadata]


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (grpc.StatusCode.PERMISSION_DENIED, "node node-a may not have spiffe://x/ns/a/sa/b: 100% sure"),
        (grpc.StatusCode.INVALID_ARGUMENT, "CSR carries 2 URI SANs, want exactly one (ünïcode too)"),
        (grpc.StatusCode.UNAUTHENTICATED, "no client certificate"),
    ],
)
async def test_error_statuses_arrive_with_their_message(
    served: tuple[ScriptedCa, UnaryChannel], code: grpc.StatusCode, message: str
) -> None:
    servicer, channel = served
    servicer.abort = (code, message)
    with pytest.raises(GrpcError) as ei:
        await channel.call(CREATE_CERTIFICATE, _request("x"), timeout=10)
    assert ei.value.code == Status(code.value[0]) and ei.value.details == message
    servicer.abort = None  # the connection is still good for the next call
    assert _answer(await channel.call(CREATE_CERTIFICATE, _request("ok"), timeout=10)) == ["ko"]


async def test_a_deadline_cancels_the_call_not_the_connection(
    served: tuple[ScriptedCa, UnaryChannel],
) -> None:
    servicer, channel = served
    servicer.delay = 2.0
    with pytest.raises(GrpcError) as ei:
        await channel.call(CREATE_CERTIFICATE, _request("slow"), timeout=0.3)
    assert ei.value.code is Status.DEADLINE_EXCEEDED
    servicer.delay = 0.0
    assert _answer(await channel.call(CREATE_CERTIFICATE, _request("fast"), timeout=10)) == ["tsaf"]
    assert len(set(servicer.peers)) == 1


async def test_a_restarted_server_is_redialled(env: CaEnv) -> None:
    servicer = ScriptedCa()
    server, port = await _start(env, servicer)
    channel = _channel(env, port)
    try:
        assert _answer(await channel.call(CREATE_CERTIFICATE, _request("a"), timeout=10)) == ["a"]
        await server.stop(None)
        with pytest.raises(GrpcError) as ei:
            await channel.call(CREATE_CERTIFICATE, _request("b"), timeout=3)
        assert ei.value.code in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED)
        server, _ = await _start(env, servicer, port)
        assert _answer(await channel.call(CREATE_CERTIFICATE, _request("c"), timeout=10)) == ["c"]
        assert len(set(servicer.peers)) == 2  # a new connection after the restart
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_server_we_do_not_trust_is_refused_at_the_handshake(env: CaEnv) -> None:
    servicer = ScriptedCa()
    foreign = ca_store.init_self_signed(env.base / f"foreign-grpc-{now().timestamp()}", "other.td", now=now())
    key_pem, chain_pem, _ = ca_store.issue_server_certificate(foreign, now=now())
    impostor = grpc.aio.server()
    ca_pb2_grpc.add_IstioCertificateServiceServicer_to_server(servicer, impostor)  # type: ignore[no-untyped-call]
    iport = impostor.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([(key_pem, chain_pem)]))
    await impostor.start()
    channel = _channel(env, iport)
    try:
        with pytest.raises(GrpcError) as ei:
            await channel.call(CREATE_CERTIFICATE, _request("x"), timeout=5)
        assert ei.value.code is Status.UNAVAILABLE and "certificate verify failed" in ei.value.details
        assert servicer.peers == []  # the request never left
    finally:
        await channel.close()
        await impostor.stop(None)


# --- framing and status mapping (no I/O) ---------------------------------------------------------
def test_message_framing_round_trip_and_refusals() -> None:
    assert decode_message(encode_message(b"hello")) == b"hello"
    assert decode_message(encode_message(b"")) == b""
    for body, needle in [
        (b"\x00\x00", "holds no message"),
        (b"\x01\x00\x00\x00\x01x", "compressed"),
        (encode_message(b"abc")[:-1], "its message says"),
        (encode_message(b"abc") + b"x", "its message says"),
        (b"\x00" + (MAX_MESSAGE + 1).to_bytes(4, "big"), "limit"),
    ]:
        with pytest.raises(GrpcError, match=needle):
            decode_message(body)


def test_grpc_timeout_header_fits_eight_digits() -> None:
    assert grpc_timeout(0.0001) == "1m"
    assert grpc_timeout(10) == "10000m"
    assert grpc_timeout(10**6) == "1000000S"
    assert all(len(grpc_timeout(t)) <= 9 for t in (1e-9, 1, 99_999.999, 1e12))


@pytest.mark.parametrize(
    ("status", "headers", "trailers", "code"),
    [
        (503, {}, {}, Status.UNAVAILABLE),  # a proxy in front answered, no gRPC status
        (404, {}, {}, Status.UNIMPLEMENTED),
        (
            200,
            {"content-type": "application/grpc"},
            {"grpc-status": "7", "grpc-message": "no%20way"},
            Status.PERMISSION_DENIED,
        ),
        (200, {"content-type": "text/html"}, {"grpc-status": "0"}, Status.UNKNOWN),
        (200, {"content-type": "application/grpc"}, {"grpc-status": "99"}, Status.UNKNOWN),
    ],
)
async def test_responses_without_a_usable_status_map_per_the_spec(
    status: int, headers: dict[str, str], trailers: dict[str, str], code: Status
) -> None:
    call = _Call(asyncio.get_running_loop().create_future(), status, headers, bytearray(encode_message(b"")))
    call.finish(trailers)
    with pytest.raises(GrpcError) as ei:
        call.future.result()
    assert ei.value.code is code
    if "grpc-message" in trailers:
        assert ei.value.details == "no way"


async def test_a_graceful_server_shutdown_lets_the_call_in_flight_finish(env: CaEnv) -> None:
    servicer = ScriptedCa()
    server, port = await _start(env, servicer)
    channel = _channel(env, port)
    try:
        assert _answer(await channel.call(CREATE_CERTIFICATE, _request("warm"), timeout=10)) == ["mraw"]
        servicer.delay = 1.0
        in_flight = asyncio.ensure_future(channel.call(CREATE_CERTIFICATE, _request("late"), timeout=10))
        await asyncio.sleep(0.3)
        stopping = asyncio.ensure_future(server.stop(5))  # GOAWAY(NO_ERROR), then waits for calls
        assert _answer(await in_flight) == ["etal"]  # not an INTERNAL error from the GOAWAY
        await stopping
        with pytest.raises(GrpcError) as ei:
            await channel.call(CREATE_CERTIFICATE, _request("after"), timeout=2)
        assert ei.value.code in (Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED)
    finally:
        await channel.close()
        await server.stop(None)


async def test_calls_sharing_a_stalled_dial_fail_cleanly_when_the_channel_is_dropped(env: CaEnv) -> None:
    # A black hole: the kernel completes TCP handshakes, nobody ever answers the TLS hello.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    channel = _channel(env, hole.getsockname()[1])
    try:
        first = asyncio.ensure_future(channel.call(CREATE_CERTIFICATE, _request("a"), timeout=0.3))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(channel.call(CREATE_CERTIFICATE, _request("b"), timeout=3))
        with pytest.raises(GrpcError) as e1:
            await first
        assert e1.value.code is Status.DEADLINE_EXCEEDED
        await channel.close()  # what CaClient does after an unreachable CA: must not cancel `second`
        with pytest.raises(GrpcError) as e2:
            await second
        assert e2.value.code in (Status.DEADLINE_EXCEEDED, Status.UNAVAILABLE)
    finally:
        await channel.close(cancel_dial=True)
        hole.close()
