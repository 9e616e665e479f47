"""Access log: one JSON line per connection decision/close.

Each line names source and destination workload and principal, the decision, the policy that
decided and the reason, so "why was my connection refused?" is answered by one grep.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TextIO


class AccessLog:
    """Writes JSON lines to a file (appending) or a stream; line-buffered so tails see them."""

    def __init__(
        self,
        path: str | None = None,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.path = path
        self._clock = clock
        self._lock = threading.Lock()
        if path is not None and path != "-":
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
            self._out: TextIO = os.fdopen(fd, "a", buffering=1, encoding="utf-8")
            self._owned = True
        else:
            self._out = stream if stream is not None else sys.stdout
            self._owned = False

    def write(self, event: str, **fields: Any) -> dict[str, Any]:
        record: dict[str, Any] = {"time": self._clock().isoformat(timespec="milliseconds"), "event": event}
        record.update({k: v for k, v in fields.items() if v is not None})
        line = json.dumps(record, separators=(",", ":"), default=str)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()
        return record

    def close(self) -> None:
        if self._owned:
            self._out.close()
