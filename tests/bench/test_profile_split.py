"""bench.profile's split of py-spy stacks into the categories the README's bounds are stated in."""

from __future__ import annotations

from bench.profile import CATEGORIES, ROOT, categorize, native_call_lines, split

LOOP = "main (cli/main.py:50);run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118)"


def _relay_line(text: str) -> int:
    lines = (ROOT / "tunnel" / "relay.py").read_text().splitlines()
    return next(n for n, line in enumerate(lines, 1) if text in line)


def test_native_call_lines_are_the_transport_writes_in_our_source() -> None:
    lines = native_call_lines()
    assert f"tunnel/relay.py:{_relay_line('tcp.write(data)')}" in lines
    assert f"tunnel/relay.py:{_relay_line('self.transport.writelines(segments)')}" in lines
    assert f"tunnel/relay.py:{_relay_line('def _deliver(')}" not in lines


def test_each_stack_lands_in_its_category() -> None:
    write = _relay_line("tcp.write(data)")
    deliver = f"TunnelStream._deliver (tunnel/relay.py:{write})"
    assert categorize(LOOP) == "loop (native)"
    assert categorize(f"{LOOP};{deliver}") == "TLS + socket calls (native)"
    # Another line of the same function is ours, not native.
    assert categorize(f"{LOOP};TunnelStream._deliver (tunnel/relay.py:{write - 2})") == "HBONE core + relay"
    assert categorize(f"{LOOP};SSLObject.do_handshake (ssl.py:979)") == "TLS + socket calls (native)"
    assert categorize(f"{LOOP};H2Connection.send_headers (h2/connection.py:809)") == "h2 / HPACK"
    assert categorize(f"{LOOP};Encoder.encode (hpack/hpack.py:289)") == "h2 / HPACK"
    assert categorize(f"{LOOP};Flags.__repr__ (hyperframe/flags.py:29)") == "h2 / HPACK"
    # Library code is charged to the innermost frame of ours that called it.
    access_log = "AccessLog.write (serving/accesslog.py:42);JSONEncoder.iterencode (json/encoder.py:258)"
    assert categorize(f"{LOOP};Tracker.close (agent/node/tracking.py:152);{access_log}") == "agent"
    assert categorize(f"{LOOP};_open_stream (tunnel/client.py:374);timeout (asyncio/timeouts.py:145)") == (
        "HBONE core + relay"
    )
    assert categorize(f"{LOOP};evaluate (policy/engine.py:10)") == "agent"
    # The agent's frames below the loop (cli, run) do not make the loop's own Python work ours.
    assert categorize(f"{LOOP};_run_once (asyncio/events.py:80)") == "other Python"
    assert categorize(f"{LOOP};Tracker.close ({ROOT.as_posix()}/agent/node/tracking.py:152)") == "agent"


def test_split_weighs_stacks_by_their_sample_counts() -> None:
    raw = "\n".join(
        [
            f"{LOOP} 6",
            f"{LOOP};SSLObject.write (ssl.py:930) 3",
            f"{LOOP};Tracker.close (agent/node/tracking.py:152) 1",
            "garbage line without a count",
        ]
    )
    shares = split(raw)
    assert set(shares) == set(CATEGORIES)
    assert shares["loop (native)"] == 0.6
    assert shares["TLS + socket calls (native)"] == 0.3
    assert shares["agent"] == 0.1
    assert shares["h2 / HPACK"] == 0.0
