"""Which visitors still have the studio open in a browser tab, so that the idle sweeper spares them.

Gradio's page keeps one long request open to `…/heartbeat/<session>` for as long as the tab is open, and it ends when
the tab closes (Gradio then runs `demo.unload`, which removes the visitor's files). A tab left open with no click for
longer than the idle expiry makes no other request, so the sweeper's clock alone would remove the files of a visitor
who is only thinking (issue 20). Gradio keeps no public list of these connections; this ASGI middleware counts them
per session as they open and end, which holds whatever Gradio does inside the route.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from typing import Any

HEARTBEAT = re.compile(r"/heartbeat/([^/]+)/?$")


class TabCount:
    """Open heartbeat connections per session (a visitor may have the same session in one tab only, but a
    reconnect can overlap the old connection for a moment, hence a count)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()

    def opened(self, session: str) -> None:
        with self.lock:
            self.counts[session] += 1

    def closed(self, session: str) -> None:
        with self.lock:
            self.counts[session] -= 1
            if self.counts[session] <= 0:
                del self.counts[session]

    def open_sessions(self) -> set[str]:
        with self.lock:
            return set(self.counts)


class OpenTabs:
    """ASGI middleware: `tabs` counts the heartbeat requests running now (Starlette calls it with the app first)."""

    def __init__(self, app: Any, tabs: TabCount) -> None:
        self.app, self.tabs = app, tabs

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        found = HEARTBEAT.search(scope.get("path", "")) if scope.get("type") == "http" else None
        if found is None:
            await self.app(scope, receive, send)
            return
        self.tabs.opened(found.group(1))
        try:
            await self.app(scope, receive, send)
        finally:  # the tab closed, the network dropped or the server stops: the connection has ended
            self.tabs.closed(found.group(1))
