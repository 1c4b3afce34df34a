"""A real browser for the tests: headless Chromium driven over the DevTools protocol.

`chromium` (a fixture) starts Chromium with a fresh profile and yields its DevTools port;
`open_page` attaches to its page; `Page` speaks just enough of the protocol to navigate,
run JavaScript, wait for events and take screenshots (left in /tmp for a person to look at).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import time
from pathlib import Path

import aiohttp
import pytest

from installer import procs

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path("/tmp")


@pytest.fixture()
def chromium(tmp_path):
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: these tests need a real browser. "
                    "Install it with `apt-get install -y chromium`.")
    profile = tmp_path / "profile"
    log = tmp_path / "chromium.log"
    pid = procs.spawn([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu",
                       "--disable-background-networking", "--disable-component-update", "--disable-sync",
                       "--no-first-run", "--no-default-browser-check", "--disable-dev-shm-usage",
                       f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1",
                       "--remote-debugging-port=0", "--window-size=1000,700", "about:blank"],
                      log_path=log)
    port_file = profile / "DevToolsActivePort"
    deadline = time.monotonic() + 60
    while not (port_file.exists() and port_file.read_text().strip()):
        if time.monotonic() > deadline or not procs.alive(pid):
            procs.kill_tree([info.pid for info in procs.group_members(pid)] or [pid])
            pytest.fail(f"Chromium did not open its DevTools port; log:\n{procs.tail(log)}")
        time.sleep(0.1)
    yield int(port_file.read_text().split()[0])
    members = [info.pid for info in procs.group_members(pid)] or [pid]
    procs.kill_tree(members)
    procs.wait_gone(members, timeout=10)
    shutil.rmtree(profile, ignore_errors=True)


class Page:
    """Just enough of the Chrome DevTools protocol: commands by id, events by name."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future] = {}
        self.events: asyncio.Queue = asyncio.Queue()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        async for message in self.ws:
            data = json.loads(message.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
            elif "method" in data:
                await self.events.put(data)

    async def send(self, method: str, **params) -> dict:
        ident = next(self.ids)
        future = asyncio.get_running_loop().create_future()
        self.pending[ident] = future
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        reply = await asyncio.wait_for(future, 30)
        if "error" in reply:
            raise AssertionError(f"{method} failed: {reply['error']}")
        return reply["result"]

    async def wait_event(self, name: str, timeout: float = 30) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {name} event within {timeout} s")
            event = await asyncio.wait_for(self.events.get(), left)
            if event["method"] == name:
                return event

    async def goto(self, url: str) -> None:
        while not self.events.empty():
            self.events.get_nowait()
        await self.send("Page.navigate", url=url)
        await self.wait_event("Page.loadEventFired")

    async def js(self, expression: str):
        result = await self.send("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"JS failed: {result['exceptionDetails']}")
        return result["result"].get("value")

    async def screenshot(self, name: str) -> Path:
        data = await self.send("Page.captureScreenshot", format="png")
        path = SCREENSHOTS / f"{name}.png"
        path.write_bytes(base64.b64decode(data["data"]))
        return path


async def open_page(devtools_port: int, session: aiohttp.ClientSession) -> Page:
    async with session.get(f"http://127.0.0.1:{devtools_port}/json/list") as response:
        targets = await response.json(content_type=None)
    page_target = next(t for t in targets if t["type"] == "page")
    ws = await session.ws_connect(page_target["webSocketDebuggerUrl"], max_msg_size=0)
    page = Page(ws)
    await page.send("Page.enable")
    await page.send("Runtime.enable")
    await page.send("Network.enable")
    # The login page's CSP forbids all connections; lift it so the checks below reach the proxy itself.
    await page.send("Page.setBypassCSP", enabled=True)
    return page
