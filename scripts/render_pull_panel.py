#!/usr/bin/env python3
"""Screenshot of the notebook panel while `up` pulls through a throttled registry (docs/panel-pull.png).

A real kernel runs the panel (`installer.notebook.Panel`, as `start_stack` shows it) over a real `up`
from an empty udocker folder, whose only registry is tests/registry_front.py in front of the local
registry of scripts/build_images.sh, its blobs served at --rate bytes per second (default 20 MB/s,
shared by all connections). When the pull has passed --at of its bytes, the cell stops redrawing the
panel and ends, so the notebook keeps the widgets as they were at that moment; nbconvert exports them
and headless Chromium renders them with the real widget renderer (see scripts/render_panel.py). The
kernel, and with it the unfinished `up`, is then shut down, and what it left is stopped and removed.

    python scripts/render_pull_panel.py [--out docs/panel-pull.png] [--rate 20e6] [--at 0.45]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbconvert import HTMLExporter

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import installer  # noqa: E402
from render_panel import CHROMIUM, port_or_free, renderer_files, screenshot  # noqa: E402
from tests.registry_front import Behaviour, running  # noqa: E402

CELL = """
import threading, time
from installer import notebook as nb
panel = nb.Panel(json.loads({flags!r}), widgets=True)
display(panel.view.box)
threading.Thread(target=panel.start, daemon=True).start()
while not (panel.transfer is not None and panel.transfer.what == "pulling" and panel.transfer.fraction >= {at}):
    time.sleep(0.05)
panel._render()
panel._render = lambda: None  # the picture is this moment; the kernel stops right after
time.sleep(1)
"""

RENDERED = "document.querySelectorAll('.widget-html-content').length > 3 && !!document.querySelector('.progress-bar')"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "panel-pull.png")
    parser.add_argument("--registry", default=os.environ.get("MFSTACK_TEST_REGISTRY", "http://127.0.0.1:5000"))
    parser.add_argument("--rate", type=float, default=20e6)
    parser.add_argument("--at", type=float, default=0.45)
    args = parser.parse_args()
    if not CHROMIUM.exists():
        print(f"{CHROMIUM} is missing: apt-get install -y chromium", file=sys.stderr)
        return 1
    embed, require = renderer_files()
    work = Path(tempfile.gettempdir()) / "mfstack-pull-demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    root = work / "metaflow-stack"
    try:
        with running(Behaviour(upstream=args.registry, rate=args.rate)) as front:
            flags = {"root": str(root), "udocker_dir": str(work / "udocker"), "mirrors": front.url,
                     "port": str(port_or_free(7860)), "metadata_port": str(port_or_free(8080)),
                     "ui_port": str(port_or_free(8083)), "db_port": str(port_or_free(5432))}
            source = "import json\n" + CELL.format(flags=json.dumps(flags), at=args.at)
            notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(source)])
            env = {k: v for k, v in os.environ.items() if not k.startswith(("MF_", "METAFLOW_"))}
            env["PYTHONPATH"] = str(REPO)
            NotebookClient(notebook, timeout=600, kernel_name="python3", store_widget_state=True).execute(env=env)
        exporter = HTMLExporter(template_name="lab", exclude_input=True, exclude_input_prompt=True,
                                exclude_output_prompt=True, widget_renderer_url=embed.as_uri(),
                                require_js_url=require.as_uri())
        body, _ = exporter.from_notebook_node(notebook)
        page = work / "panel.html"
        page.write_text(body)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        asyncio.run(screenshot(page, args.out, work / "chromium-profile", RENDERED))
        print(f"wrote {args.out}")
    finally:
        installer.down(root=str(root), udocker_dir=str(work / "udocker"))
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
