"""bench.profile's split of py-spy stacks into the categories the README's bounds are stated in."""

from __future__ import annotations

from bench.profile import CATEGORIES, categorize, split

LOOP = "main (agent/cli.py:50);run (uvloop/__init__.py:92);Runner.run (asyncio/runners.py:118)"


def test_each_leaf_lands_in_its_category() -> None:
    assert categorize(LOOP) == "loop (native)"
    assert categorize(LOOP + ";H2Session.flush (tunnel/relay.py:717)") == "TLS + socket calls (native)"
    assert categorize(LOOP + ";SSLObject.read (ssl.py:921)") == "TLS + socket calls (native)"
    assert categorize(LOOP + ";H2Connection.send_headers (h2/connection.py:809)") == "h2 / HPACK"
    assert categorize(LOOP + ";Encoder.encode (hpack/hpack.py:289)") == "h2 / HPACK"
    assert categorize(LOOP + ";Flags.__repr__ (hyperframe/flags.py:29)") == "h2 / HPACK"
    assert categorize(LOOP + ";HboneConnection._receive (tunnel/hbone.py:509)") == "HBONE core + relay"
    assert categorize(LOOP + ";Tracker.close (agent/node/tracking.py:152)") == "agent"
    assert categorize(LOOP + ";evaluate (policy/engine.py:10)") == "agent"
    assert categorize(LOOP + ";JSONEncoder.iterencode (json/encoder.py:258)") == "other Python"


def test_split_weighs_stacks_by_their_sample_counts() -> None:
    raw = "\n".join(
        [
            f"{LOOP} 6",
            f"{LOOP};H2Session.flush (tunnel/relay.py:717) 3",
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
