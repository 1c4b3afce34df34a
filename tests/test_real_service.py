"""What only the real Metaflow service makes possible to check: its UI backend and UI, with real runs.

One stack (the shared one: production image names, only the registry is local) and one FanoutFlow
run made from another HOME through `connect`, with the stack's S3 datastore, as a remote notebook
makes it. The UI backend is the upstream one, with the Metaflow client its image carries (2.19.34).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import aiohttp
import pytest
import requests

import installer
from installer import procs
from installer.connection import format_connection
from installer.services import UI_BACKEND_TUNING

from .browser import chromium, open_page  # noqa: F401  (chromium is a fixture)
from .flowtools import FLOWS, connect_remote, read_latest_run, remote_env, run_flow

FLOW = "FanoutFlow"
EXPECTED_STDOUT = {"square": {"squared 1 -> 1", "squared 2 -> 4", "squared 3 -> 9"}, "end": {"total is 14"}}


@pytest.fixture(scope="module")
def tracked(shared_stack: dict, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A run of FanoutFlow made from a separate HOME with only the connection string."""
    settings = installer.settings(**shared_stack)
    token = installer.token(**shared_stack)
    base = f"http://127.0.0.1:{settings.port}"
    work = tmp_path_factory.mktemp("remote-work")
    env = remote_env(work / "home")
    printed = connect_remote(format_connection(base, token), env, work)
    assert "object store" in printed, printed
    done = run_flow("fanout_flow.py", env, work)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = read_latest_run(FLOW, env, "total")
    assert run["successful"] is True and run["artifact"] == 14
    return SimpleNamespace(flags=shared_stack, base=base, token=token, run_id=run["id"], env=env, work=work)


def ui_api(tracked: SimpleNamespace, path: str, **params: str) -> list | dict:
    """GET a UI backend resource through the entry point; its caches answer 202-free only when ready."""
    deadline = time.monotonic() + 60
    while True:
        answer = requests.get(f"{tracked.base}/api{path}", headers={"x-api-key": tracked.token}, params=params,
                              timeout=60)
        if answer.status_code == 200:
            return answer.json()["data"]
        assert answer.status_code in (202, 404, 500, 503) and time.monotonic() < deadline, \
            f"{path}: HTTP {answer.status_code} {answer.text[:500]}"
        time.sleep(0.5)


def tasks_of(tracked: SimpleNamespace) -> list[tuple[str, str]]:
    run = f"/flows/{FLOW}/runs/{tracked.run_id}"
    return [(step["step_name"], str(task["task_id"]))
            for step in ui_api(tracked, f"{run}/steps")
            for task in ui_api(tracked, f"{run}/steps/{step['step_name']}/tasks")]


def read_logs_then_artifacts(tracked: SimpleNamespace) -> dict:
    """Every task's stdout, then the content of every artifact of every task, as the UI reads them."""
    run = f"/flows/{FLOW}/runs/{tracked.run_id}"
    tasks = tasks_of(tracked)
    stdout = {task: [line["line"] for line in ui_api(tracked, f"{run}/steps/{step}/tasks/{task}/logs/out",
                                                      attempt_id="0")]
              for step, task in tasks}
    artifacts = {task: {a["name"]: a["content"] for a in ui_api(
                     tracked, f"{run}/steps/{step}/tasks/{task}/artifacts", postprocess="true", _limit="1000")}
                 for step, task in tasks}
    return {"tasks": tasks, "stdout": stdout, "artifacts": artifacts}


def cache_servers(flags: dict) -> dict[int, list[int]]:
    """The UI backend's cache servers, each with the processes it has forked (its pool's workers)."""
    backend = next(s for s in installer.status(**flags).services if s.name == "ui-backend")
    tree = procs.descendants(backend.pid)
    servers = [p for p in tree if "cache.client.cache_server" in p.command and
               not any(q.pid == p.ppid and "cache.client.cache_server" in q.command for q in tree)]
    return {server.pid: [p.pid for p in tree if p.ppid == server.pid] for server in servers}


def check_reads(reads: dict) -> None:
    steps = {task: step for step, task in reads["tasks"]}
    assert sorted(set(steps.values())) == ["_parameters", "end", "join", "square", "start"]
    for step, expected in EXPECTED_STDOUT.items():
        lines = {line for task, out in reads["stdout"].items() if steps[task] == step for line in out}
        assert lines == expected, (step, reads["stdout"])
    for task, artifacts in reads["artifacts"].items():
        if steps[task] == "_parameters":
            continue
        missing = sorted(name for name, content in artifacts.items() if content is None)
        assert not missing, f"task {steps[task]}/{task}: no content for {missing}"
    values = sorted(a["value"] for t, a in reads["artifacts"].items() if steps[t] == "square")
    assert values == ["1", "4", "9"]
    assert {a["total"] for t, a in reads["artifacts"].items() if steps[t] in ("join", "end")} == {"14"}


def test_logs_then_artifacts_read_back_twice_and_after_a_restart(tracked: SimpleNamespace) -> None:
    """The upstream UI backend with metaflow 2.19 loses artifact reads after a log view, unless worked around."""
    first = read_logs_then_artifacts(tracked)
    check_reads(first)
    assert read_logs_then_artifacts(tracked) == first

    assert "ui-backend" in installer.down(**tracked.flags)
    assert installer.up(wait_ui=True, **tracked.flags).running
    assert read_logs_then_artifacts(tracked) == first
    # The log and artifact caches forked their workers to read; once idle, the workers leave (and
    # the next read forks them again).
    servers = cache_servers(tracked.flags)
    assert len(servers) == 3 and sum(map(len, servers.values())) >= 2, servers
    deadline = time.monotonic() + float(UI_BACKEND_TUNING["MFSTACK_CACHE_POOL_IDLE_S"]) + 30
    while any(cache_servers(tracked.flags).values()):
        assert time.monotonic() < deadline, cache_servers(tracked.flags)
        time.sleep(1)
    assert read_logs_then_artifacts(tracked) == first

    # The client on the remote side still reads the logs: viewing them in the UI consumed nothing.
    code = (f"from metaflow import Run, namespace; namespace(None); "
            f"r = Run('{FLOW}/{tracked.run_id}'); print(sorted(t.stdout.strip() for t in r['square']))")
    done = subprocess.run([sys.executable, "-c", code], env=tracked.env, cwd=tracked.work, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == str(sorted(EXPECTED_STDOUT["square"]))


def test_websocket_delivers_a_run_as_it_starts(tracked: SimpleNamespace) -> None:
    async def scenario() -> list[dict]:
        async with aiohttp.ClientSession() as session:
            ws = await session.ws_connect(f"{tracked.base}/api/ws", headers={"x-api-key": tracked.token})
            await ws.send_json({"type": "SUBSCRIBE", "uuid": "runs-of-fanout", "resource": f"/flows/{FLOW}/runs"})
            flow = await asyncio.create_subprocess_exec(
                sys.executable, str(FLOWS / "fanout_flow.py"), "--no-pylint", "run", env=tracked.env,
                cwd=tracked.work, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            seen: list[dict] = []
            try:
                deadline = time.monotonic() + 120
                while not any(m.get("type") == "INSERT" for m in seen):
                    message = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
                    assert message.type == aiohttp.WSMsgType.TEXT, message
                    seen.append(json.loads(message.data))
            finally:
                assert await flow.wait() == 0
                await ws.close()
            return seen

    messages = asyncio.run(scenario())
    insert = next(m for m in messages if m.get("type") == "INSERT")
    assert insert["uuid"] == "runs-of-fanout" and insert["resource"] == f"/flows/{FLOW}/runs"
    assert insert["data"]["flow_id"] == FLOW
    assert int(insert["data"]["run_number"]) > int(tracked.run_id)


WAIT_FOR_TEXT = """
new Promise((resolve) => {
  const wanted = %s;
  const started = Date.now();
  const look = () => {
    const text = document.body ? document.body.innerText : '';
    if (wanted.every((w) => text.includes(w))) { resolve({found: true, text}); }
    else if (Date.now() - started > 45000) { resolve({found: false, text}); }
    else { setTimeout(look, 250); }
  };
  look();
})
"""


def test_the_ui_in_a_browser_shows_the_run_its_dag_and_a_tasks_stdout(tracked: SimpleNamespace,
                                                                       chromium: int) -> None:  # noqa: F811
    run = tracked.run_id
    square_task = next(task for step, task in tasks_of(tracked) if step == "square")

    async def scenario() -> dict:
        found: dict = {}
        async with aiohttp.ClientSession() as session:
            page = await open_page(chromium, session)

            async def visit(name: str, path: str, wanted: list[str]) -> None:
                await page.goto(tracked.base + path)
                found[name] = await page.js(WAIT_FOR_TEXT % json.dumps(wanted))
                found[name]["url"] = await page.js("location.href")
                found[name]["shot"] = str(await page.screenshot(f"real-ui-{name}"))

            # The connection string logs the browser in (a cookie) and drops the token from the address bar.
            await visit("runs", f"/?token={tracked.token}", [FLOW, run])
            await visit("dag", f"/{FLOW}/{run}/view/dag", ["start", "square", "join", "end"])
            await visit("task", f"/{FLOW}/{run}/square/{square_task}", ["squared"])
            await visit("task-again", f"/{FLOW}/{run}/square/{square_task}", ["squared"])
            page.reader.cancel()
            await page.ws.close()
        return found

    found = asyncio.run(scenario())
    for name in ("runs", "dag", "task", "task-again"):
        assert found[name]["found"], f"{name}: page text was:\n{found[name]['text'][:2000]}"
        assert Path(found[name]["shot"]).stat().st_size > 5000
    assert found["runs"]["url"] == tracked.base + "/"
    assert "Metaflow" in found["runs"]["text"] or FLOW in found["runs"]["text"]
    # The page's web app manifest (fetched without cookies) and icon load: no refusal in the access log.
    access = installer.settings(**tracked.flags).log_path("proxy").read_text()
    assert '"GET /manifest.json" 200' in access
    assert not [line for line in access.splitlines() if "/manifest.json" in line and '" 401 ' in line]


CACHE_START_PROBE = r"""
import asyncio, json, time
from services.ui_backend_service.data.cache import store

events = []

class Probe:
    def __init__(self, name):
        self.name = name

    async def start_cache(self):
        events.append(("start", self.name, time.monotonic()))
        await asyncio.sleep(0.3)
        events.append(("started", self.name, time.monotonic()))

    async def restart_requested(self):
        return False

async def main():
    caches = store.CacheStore.__new__(store.CacheStore)
    for name in ("artifact_cache", "dag_cache", "log_cache", "card_cache"):
        setattr(caches, name, Probe(name))
    await caches.start_caches(None)
    left = [name for name in ("artifact_cache", "dag_cache", "log_cache", "card_cache")
            if "start_cache" in vars(getattr(caches, name))]
    await asyncio.sleep(0)
    print(json.dumps({"events": events, "left_patched": left}))

asyncio.run(main())
"""


def test_the_ui_backend_starts_its_caches_side_by_side_each_once(shared_stack: dict) -> None:
    """Our sitecustomize, against upstream's own CacheStore in the image: every cache is started exactly
    once, all before the first has finished starting, and later restarts use the real start again."""
    from installer import runtime
    from installer.services import UI_BACKEND_SITE, UI_BACKEND_SITE_IN_GUEST, service_container

    settings = installer.settings(**shared_stack)
    udocker = runtime.prepare(settings.udocker_dir, settings.cache_dir / "bin", lambda _: None)
    argv = udocker.run_argv(service_container(settings), ["/opt/latest/bin/python3", "-c", CACHE_START_PROBE],
                            env={"PYTHONPATH": f"{UI_BACKEND_SITE_IN_GUEST}:/root", "FEATURE_PREFETCH_DISABLE": "1"},
                            volumes=[(UI_BACKEND_SITE, UI_BACKEND_SITE_IN_GUEST)], workdir="/root")
    done = subprocess.run(argv, env={**os.environ, **udocker.env}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    starts = [e for e in report["events"] if e[0] == "start"]
    finishes = [e for e in report["events"] if e[0] == "started"]
    assert sorted(e[1] for e in starts) == ["artifact_cache", "card_cache", "dag_cache", "log_cache"]
    assert len(finishes) == 4
    assert max(e[2] for e in starts) < min(e[2] for e in finishes), report["events"]
    assert report["left_patched"] == []
