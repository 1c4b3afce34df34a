"""The proxy seen from a real browser: headless Chromium driven over the DevTools protocol.

Here only the proxy's behaviour is under test (sign-in, cookie, websocket relay): the UI files
are a small fixture bundle laid out like metaflow-ui's, and /api goes to the small aiohttp
server of tests/helpers_proxy.py, which shows what reached it. The real UI with the real UI
backend is driven in tests/test_real_service.py. Screenshots of each state are left in /tmp/proxy-browser-*.png.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from installer.proxy import COOKIE_NAME

from . import helpers_proxy as hp
from .browser import chromium, open_page  # noqa: F401  (chromium is a fixture)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("proxy-browser")
    static_dir = hp.make_static_dir(workdir)
    upstream = hp.start_upstream(workdir)
    proxy = hp.start_proxy(workdir, metadata_url=upstream.url, ui_url=upstream.url, static_dir=static_dir)
    yield proxy
    proxy.stop()
    upstream.stop()


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
            found["shot_login"] = str(await page.screenshot("proxy-browser-1-login"))

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
            found["shot_ui"] = str(await page.screenshot("proxy-browser-2-ui"))

            # 3. A fresh browser opening the /?token= link lands on the UI directly.
            await page.send("Network.clearBrowserCookies")
            await page.goto(f"{proxy.url}/HelloFlow/42?token={proxy.token}&tab=dag")
            found["link_url"] = await page.js("location.href")
            found["link_ui"] = await page.js("document.getElementById('root').innerText")
            found["link_ws"] = await page.js(OPEN_WEBSOCKET)
            found["shot_link"] = str(await page.screenshot("proxy-browser-3-link"))

            # 4. A wrong token shows the login page with an error.
            await page.send("Network.clearBrowserCookies")
            await page.goto(f"{proxy.url}/?token=not-the-right-token-{'z' * 30}")
            found["wrong_error"] = await page.js("(document.getElementById('error') || {}).innerText || ''")
            found["shot_wrong"] = str(await page.screenshot("proxy-browser-4-wrong-token"))
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
    assert json.loads(ws["messages"][0])["hello"] == "from the test upstream"
    assert ws["messages"][1] == "echo:from-the-page"
    assert found["api_with_cookie"] == "pong"

    assert found["link_url"] == proxy.url + "/HelloFlow/42?tab=dag"
    assert found["link_ui"] == "Fixture UI index"
    assert found["link_ws"]["outcome"] == "open"

    assert "not valid" in found["wrong_error"]
    for key in ("shot_login", "shot_ui", "shot_link", "shot_wrong"):
        assert Path(found[key]).stat().st_size > 1000
    assert proxy.token not in proxy.log_text()
