"""The proxy seen from a real browser: headless Chromium driven over the DevTools protocol.

Behind the proxy: the UI files are a small fixture bundle (index.html + hashed
assets, laid out like metaflow-ui's), and the UI backend is played by the small
aiohttp HTTP + websocket server in tests/helpers_proxy.py (the real UI backend
needs PostgreSQL and the service image; here only the proxy's behaviour is under
test). Screenshots of each state are left in /tmp/proxy-browser-*.png.
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
from installer.proxy import COOKIE_NAME

from . import helpers_proxy as hp

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path("/tmp")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proxy-browser")
    static_dir = hp.make_static_dir(workdir)
    upstream = hp.start_upstream(workdir)
    proxy = hp.start_proxy(workdir, metadata_url=upstream.url, ui_url=upstream.url, static_dir=static_dir)
    yield proxy
    proxy.stop()
    upstream.stop()


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
        path = SCREENSHOTS / f"proxy-browser-{name}.png"
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


OPEN_WEBSOCKET = """
new Promise((resolve) => {
  const ws = new WebSocket(`ws://${location.host}/api/ws`);
  const seen = {messages: []};
  const timer = setTimeout(() => resolve({...seen, outcome: 'timeout'}), 10000);
  ws.onmessage = (event) => {
    seen.messages.push(event.data);
    if (seen.messages.length === 1) { ws.send('from-the-page'); }
    else { clearTimeout(timer); ws.close(1000); resolve({...seen, outcome: 'open'}); }
  };
  ws.onclose = (event) => { clearTimeout(timer); resolve({...seen, outcome: 'closed', code: event.code}); };
})
"""


def test_browser_login_page_then_ui_and_websocket(stack, chromium):
    proxy = stack

    async def scenario() -> dict:
        found: dict = {}
        async with aiohttp.ClientSession() as session:
            page = await open_page(chromium, session)
            # 1. No token: the login page, and the API and websocket stay shut.
            await page.goto(proxy.url + "/")
            found["login_title"] = await page.js("document.title")
            found["login_form"] = await page.js("!!document.querySelector('form input[name=token]')")
            found["login_has_ui"] = await page.js("document.body.innerText.includes('Fixture UI index')")
            found["api_without_cookie"] = await page.js("fetch('/api/ping').then(r => r.status)")
            found["ws_without_cookie"] = await page.js(OPEN_WEBSOCKET)
            found["shot_login"] = str(await page.screenshot("1-login"))

            # 2. Paste the token into the form: the UI, with the token gone from the address bar.
            await page.js(f"document.getElementById('token').value = {json.dumps(proxy.token)}; "
                          "document.querySelector('form').submit(); true")
            await page.wait_event("Page.loadEventFired")
            found["after_form_url"] = await page.js("location.href")
            found["after_form_ui"] = await page.js("document.getElementById('root').innerText")
            found["asset_loaded"] = await page.js("window.fixtureLoaded === true")
            found["cookie_visible_to_js"] = await page.js(f"document.cookie.includes('{COOKIE_NAME}')")
            found["ws_with_cookie"] = await page.js(OPEN_WEBSOCKET)
            found["api_with_cookie"] = await page.js("fetch('/api/ping').then(r => r.text())")
            found["shot_ui"] = str(await page.screenshot("2-ui"))

            # 3. A fresh browser opening the /?token= link lands on the UI directly.
            await page.send("Network.clearBrowserCookies")
            await page.goto(f"{proxy.url}/HelloFlow/42?token={proxy.token}&tab=dag")
            found["link_url"] = await page.js("location.href")
            found["link_ui"] = await page.js("document.getElementById('root').innerText")
            found["link_ws"] = await page.js(OPEN_WEBSOCKET)
            found["shot_link"] = str(await page.screenshot("3-link"))

            # 4. A wrong token shows the login page with an error.
            await page.send("Network.clearBrowserCookies")
            await page.goto(f"{proxy.url}/?token=not-the-right-token-{'z' * 30}")
            found["wrong_error"] = await page.js("(document.getElementById('error') || {}).innerText || ''")
            found["shot_wrong"] = str(await page.screenshot("4-wrong-token"))
            page.reader.cancel()
            await page.ws.close()
        return found

    found = asyncio.run(scenario())

    assert found["login_title"] == "Metaflow: sign in"
    assert found["login_form"] is True and found["login_has_ui"] is False
    assert found["api_without_cookie"] == 401
    assert found["ws_without_cookie"]["outcome"] == "closed" and not found["ws_without_cookie"]["messages"]

    assert found["after_form_url"] == proxy.url + "/"
    assert found["after_form_ui"] == "Fixture UI index"
    assert found["asset_loaded"] is True
    assert found["cookie_visible_to_js"] is False, "the session cookie must be HttpOnly"
    ws = found["ws_with_cookie"]
    assert ws["outcome"] == "open", ws
    assert json.loads(ws["messages"][0])["hello"] == "from the UI backend stand-in"
    assert ws["messages"][1] == "echo:from-the-page"
    assert found["api_with_cookie"] == "pong"

    assert found["link_url"] == proxy.url + "/HelloFlow/42?tab=dag"
    assert found["link_ui"] == "Fixture UI index"
    assert found["link_ws"]["outcome"] == "open"

    assert "not valid" in found["wrong_error"]
    for key in ("shot_login", "shot_ui", "shot_link", "shot_wrong"):
        assert Path(found[key]).stat().st_size > 1000
    assert proxy.token not in proxy.log_text()
