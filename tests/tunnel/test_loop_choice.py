"""The tunnel suite runs on the loop the agent uses (uvloop by default)."""

import asyncio
import os


async def test_runs_on_the_selected_loop() -> None:
    module = type(asyncio.get_running_loop()).__module__
    want = "asyncio" if os.environ.get("ZTAGENT_TEST_LOOP") == "asyncio" else "uvloop"
    assert module.startswith(want)
