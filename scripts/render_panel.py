#!/usr/bin/env python3
"""Screenshot of the service notebook's panel, as a browser shows it (docs/panel.png).

Runs notebooks/metaflow_service.ipynb in a real kernel against the offline stack
(the production images from the local registry of scripts/build_images.sh), keeps the widget state, exports the panel's cell to
HTML with nbconvert, opens it in headless Chromium and captures the panel. The
widget renderer (@jupyter-widgets/html-manager) and require.js come from npm into
a local cache, so no CDN is needed. The stack is stopped afterwards.

    python scripts/render_panel.py [--restored] [--out docs/panel.png] [--html /tmp/panel.html]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import nbformat
import requests
from nbclient import NotebookClient
from nbconvert import HTMLExporter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import installer
from installer import procs

NPM_PACKAGES = {"html-manager": "@jupyter-widgets/html-manager@1.0.15", "requirejs": "requirejs@2.3.7"}
CACHE = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mfstack-render"
CHROMIUM = Path("/usr/bin/chromium")
# A fixed, obviously illustrative token: the picture must not show a real one.
DEMO_TOKEN = "example-token-shown-in-the-readme"


def port_or_free(preferred: int) -> int:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]


def renderer_files() -> tuple[Path, Path]:
    """(embed-amd.js, require.js) unpacked from their npm packages, cached."""
    embed = CACHE / "html-manager" / "package" / "dist" / "embed-amd.js"
    require = CACHE / "requirejs" / "package" / "require.js"
    for name, spec in NPM_PACKAGES.items():
        folder = CACHE / name
        if (folder / "package").is_dir():
            continue
        folder.mkdir(parents=True, exist_ok=True)
        out = procs.run(["npm", "pack", spec, "--silent"], cwd=folder, what=f"npm pack {spec}").stdout
        tarball = folder / out.strip().splitlines()[-1]
        procs.run(["tar", "-xzf", str(tarball), "-C", str(folder)], what="unpacking " + tarball.name)
    return embed, require


def run_service_notebook(work: Path, registry: str, pgdata: str = "pgdata") -> nbformat.NotebookNode:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MF_", "METAFLOW_"))}
    env.update({
        "HOME": str(work / "home"),
        "PYTHONPATH": str(REPO),
        "MF_ROOT": str(work / "metaflow-stack"),
        "PGDATA_DIR": str(work / pgdata),
        "MF_REGISTRY": registry,
        "UDOCKER_DIR": os.environ.get("UDOCKER_DIR", "/var/tmp/mfstack-test-udocker"),
        "MF_PORT": str(port_or_free(7860)),
        "MF_METADATA_PORT": str(port_or_free(8080)),
        "MF_UI_METADATA_PORT": str(port_or_free(8083)),
        "MF_DB_PORT": str(port_or_free(5432)),
        "MF_TOKEN": DEMO_TOKEN,
    })
    (work / "home").mkdir(parents=True, exist_ok=True)
    path = REPO / "notebooks" / "metaflow_service.ipynb"
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}}, store_widget_state=True)
    client.execute(env=env)
    return notebook


def panel_html(notebook: nbformat.NotebookNode, embed: Path, require: Path) -> str:
    """The panel's cell alone, exported with its widget state."""
    cell = next(c for c in notebook.cells if c.cell_type == "code" and "start_stack(" in c.source)
    single = nbformat.v4.new_notebook(cells=[cell], metadata=notebook.metadata)
    exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                            exclude_output_prompt=True, widget_renderer_url=embed.as_uri(),
                            require_js_url=require.as_uri())
    body, _ = exporter.from_notebook_node(single)
    return body


class DevTools:
    """The few DevTools protocol calls a screenshot needs."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=30)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    async def evaluate(self, expression: str) -> object:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result.get("result", {}).get("value")


PANEL_RENDERED = ("document.querySelectorAll('.widget-html-content').length > 3 && "
                  "document.body.innerText.includes('Stop the stack')")


async def screenshot(page: Path, out: Path, profile: Path, rendered: str = PANEL_RENDERED) -> None:
    pid = procs.spawn([str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                       "--disable-background-networking", "--disable-component-update", "--disable-sync",
                       "--allow-file-access-from-files", "--hide-scrollbars", f"--user-data-dir={profile}",
                       "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
                       "--window-size=1000,900", "about:blank"], log_path=profile.parent / "chromium.log")
    try:
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not (port_file.exists() and port_file.read_text().strip()):
            if time.monotonic() > deadline or not procs.alive(pid):
                raise RuntimeError(f"Chromium did not start; see {profile.parent / 'chromium.log'}")
            await asyncio.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        async with aiohttp.ClientSession() as http:
            targets = await (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
            target = next(t for t in targets if t["type"] == "page")
            async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                tools = DevTools(ws)
                await tools.call("Emulation.setDeviceMetricsOverride", width=1000, height=900,
                                 deviceScaleFactor=2, mobile=False)
                await tools.call("Page.navigate", url=page.as_uri())
                deadline = time.monotonic() + 30
                while not await tools.evaluate(rendered):
                    if time.monotonic() > deadline:
                        raise RuntimeError("the widgets did not render: is the widget state in the HTML?")
                    await asyncio.sleep(0.2)
                await asyncio.sleep(0.5)
                box = await tools.evaluate(
                    "(() => { const r = document.querySelector('.widget-vbox').getBoundingClientRect();"
                    " return {x: r.x, y: r.y, width: r.width, height: r.height}; })()")
                assert isinstance(box, dict)
                pad = 12
                clip = {"x": max(0, box["x"] - pad), "y": max(0, box["y"] - pad),
                        "width": min(box["width"], 900) + 2 * pad, "height": box["height"] + 2 * pad, "scale": 1}
                shot = await tools.call("Page.captureScreenshot", format="png", clip=clip)
                out.write_bytes(base64.b64decode(shot["data"]))
    finally:
        procs.kill_tree([p.pid for p in procs.group_members(pid)] or [pid])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "panel.png")
    parser.add_argument("--html", type=Path, help="also keep the exported HTML here")
    parser.add_argument("--restored", action="store_true",
                        help="show a fresh runtime restoring the database from an earlier one's snapshot")
    parser.add_argument("--registry", default=os.environ.get("MFSTACK_TEST_REGISTRY", "http://127.0.0.1:5000"))
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 1
    try:
        requests.get(f"{args.registry}/v2/_catalog", timeout=5).raise_for_status()
    except requests.RequestException as exc:
        print(f"the local registry {args.registry} is not answering ({exc}); run scripts/build_images.sh",
              file=sys.stderr)
        return 1
    embed, require = renderer_files()
    # A fixed, short folder: its path shows on the panel.
    work = Path(tempfile.gettempdir()) / "mfstack-panel-demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    root = work / "metaflow-stack"
    try:
        if args.restored:
            # A first runtime makes the database and leaves a snapshot in MF_ROOT at `down`;
            # the picture is of the next runtime, whose local disk is empty.
            run_service_notebook(work, args.registry, "pgdata-first-runtime")
            installer.down(root=str(root))
        began = time.monotonic()
        notebook = run_service_notebook(work, args.registry)
        print(f"service notebook executed in {time.monotonic() - began:.1f} s")
        page = work / "panel.html"
        page.write_text(panel_html(notebook, embed, require))
        if args.html:
            args.html.write_text(page.read_text())
        args.out.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(screenshot(page, args.out, work / "chromium-profile"))
        print(f"wrote {args.out}")
    finally:
        installer.down(root=str(root))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
