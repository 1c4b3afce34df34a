"""The two notebooks, executed for real, and the panel they show.

The notebooks run in a real Jupyter kernel through nbclient (the engine nbmake
uses), against the offline stack: the production images (the Metaflow service built
from upstream's release archives, PostgreSQL 15) under their production names, from
the local registry. Settings reach the notebooks through environment variables only,
as they would in CI.

Order: the service notebook starts the stack (its stop button is not pressed),
the remote notebook finds the connection in the same MF_ROOT, connects and runs
two real flows (the training one with PyTorch on the CPU here), and the
fixture's teardown stops the stack.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import psycopg
import pytest
import requests
from nbclient import NotebookClient

import installer
import installer.notebook as nb
from installer import procs
from installer.errors import ServiceFailed, StackError
from installer.settings import resolve
from installer.snapshot import list_generations
from installer.stack import Event, dsn
from installer.stackstatus import ServiceStatus, StackStatus

from .conftest import REPO, SHARED_UDOCKER_DIR, free_port, stack_flags
from .drivefs import DriveMount
from .flowtools import client_env, read_latest_run

NOTEBOOKS = REPO / "notebooks"
SERVICE = NOTEBOOKS / "metaflow_service.ipynb"
REMOTE = NOTEBOOKS / "remote_gpu_metaflow.ipynb"
CELL_TIMEOUT = 600

# Strings that look like credentials: our own tokens (43 url-safe characters), connection
# strings with a token, and the usual cloud and hub key formats.
TOKEN_PATTERNS = (
    re.compile(r"token=[A-Za-z0-9_\-.~%]{8,}"),
    re.compile(r"(?<![A-Za-z0-9_\-])[A-Za-z0-9_\-]{40,}(?![A-Za-z0-9_\-])"),
    re.compile(r"\b(ghp|gho|ghs|github_pat|hf|sk|xox[abp])_[A-Za-z0-9_]{10,}"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
)


# ---------------------------------------------------------------- running notebooks

def kernel_env(root: Path, home: Path, registry: str, ports: dict[str, int]) -> dict[str, str]:
    """The environment a CI job gives the notebooks: settings by environment variables only."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("MF_", "METAFLOW_")) and key not in ("PGDATA_DIR", "UDOCKER_DIR")}
    env.update({
        "HOME": str(home),
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "MF_ROOT": str(root),
        "MF_REGISTRY": registry,
        "UDOCKER_DIR": str(SHARED_UDOCKER_DIR),
        "MF_PORT": str(ports["port"]),
        "MF_METADATA_PORT": str(ports["metadata"]),
        "MF_UI_METADATA_PORT": str(ports["ui"]),
        "MF_DB_PORT": str(ports["db"]),
        "MF_START_TIMEOUT": "90",
    })
    return env


def execute(path: Path, env: dict[str, str], *, store_widget_state: bool = True) -> nbformat.NotebookNode:
    """Run every cell in a fresh kernel with `env`; a failing cell (an assertion included) fails the test."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(notebook, timeout=CELL_TIMEOUT, kernel_name="python3",
                            resources={"metadata": {"path": str(path.parent)}},
                            store_widget_state=store_widget_state)
    client.execute(env=env)
    return notebook


def cell_text(notebook: nbformat.NotebookNode) -> str:
    """Everything the cells printed or showed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output["text"])
            elif "data" in output and "text/plain" in output["data"]:
                parts.append(output["data"]["text/plain"])
    return "\n".join(parts)


def widget_html(notebook: nbformat.NotebookNode) -> str:
    """The value of every HTML widget in the saved widget state, joined."""
    state = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    values = [model["state"].get("value", "") for model in state.get("state", {}).values()
              if model.get("model_name") == "HTMLModel"]
    return "\n".join(values)


def widget_descriptions(notebook: nbformat.NotebookNode) -> list[str]:
    state = notebook.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    return [model["state"].get("description", "") for model in state.get("state", {}).values()
            if model.get("model_name") == "ButtonModel"]


@pytest.fixture(scope="module")
def service_run(tmp_path_factory: pytest.TempPathFactory, registry: str) -> Iterator[dict]:
    """The service notebook, executed; the stack it started is stopped at the end of the module."""
    base = tmp_path_factory.mktemp("notebooks")
    root, home = base / "root", base / "home"
    home.mkdir()
    ports = {"port": free_port(), "metadata": free_port(), "ui": free_port(), "db": free_port()}
    env = kernel_env(root, home, registry, ports)
    try:
        executed = execute(SERVICE, env)
        yield {"env": env, "root": root, "home": home, "notebook": executed, "ports": ports}
    finally:
        installer.down(root=str(root))
        left = [p.pid for p in procs.all_processes() if str(root) in p.command]
        assert not left, f"processes of the notebook's stack still running after down: {left}"


# ---------------------------------------------------------------- the committed files

def committed_notebooks() -> list[Path]:
    """Every .ipynb git would commit: tracked ones and new ones not ignored."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "*.ipynb"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return sorted({REPO / name for name in listed if (REPO / name).exists()})


def test_committed_notebooks_have_no_outputs_or_secrets() -> None:
    found = committed_notebooks()
    assert SERVICE in found and REMOTE in found, f"both notebooks must be committed; found {found}"
    problems = []
    for path in found:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        if "widgets" in notebook.metadata:
            problems.append(f"{path.name}: saved widget state in the metadata")
        for index, cell in enumerate(notebook.cells):
            if cell.cell_type != "code":
                continue
            if cell.get("outputs"):
                problems.append(f"{path.name} cell {index}: has outputs")
            if cell.get("execution_count") is not None:
                problems.append(f"{path.name} cell {index}: has an execution count")
        text = path.read_text()
        for pattern in TOKEN_PATTERNS:
            for match in pattern.finditer(text):
                problems.append(f"{path.name}: token-like string {match.group(0)[:12]}...")
    assert not problems, "\n".join(problems)


def test_token_check_catches_a_leaked_connection_string() -> None:
    """The secret scan above would see a real connection string and a token of the kind `up` makes."""
    token = secrets.token_urlsafe(32)
    assert TOKEN_PATTERNS[0].search(f'print("http://127.0.0.1:7860/?token={token}")')
    assert any(p.search(f"MF_TOKEN = '{token}'") for p in TOKEN_PATTERNS)


def test_notebooks_have_colab_forms_and_a_pinned_package() -> None:
    service = nbformat.read(SERVICE, as_version=4)
    remote = nbformat.read(REMOTE, as_version=4)
    service_src = "\n".join(c.source for c in service.cells)
    remote_src = "\n".join(c.source for c in remote.cells)
    for name in ("MF_ROOT", "PGDATA_DIR", "TUNNEL"):
        assert re.search(rf"^{name} = .*# @param", service_src, re.MULTILINE), f"service notebook: no form field {name}"
    assert re.search(r'^CONNECTION = "" +# @param', remote_src, re.MULTILINE), "remote notebook: no CONNECTION field"
    for source in (service_src, remote_src):
        package = re.search(r'^PACKAGE = "git\+https://github\.com/[^"@]+@([^"]+)"', source, re.MULTILINE)
        assert package and package.group(1) not in ("main", "master", "HEAD"), "the package must be pinned"
        assert "drive.mount(\"/content/drive\")" in source
        assert "installer.down()" not in [line.strip() for line in source.splitlines()], \
            "no cell may stop the stack by itself"


# ---------------------------------------------------------------- the service notebook

def test_service_notebook_starts_the_stack_and_shows_the_panel(service_run: dict) -> None:
    root = service_run["root"]
    executed = service_run["notebook"]
    status = installer.status(root=str(root))
    assert status.running, [(s.name, s.state, s.healthy) for s in status.services]
    assert status.urls["ui"].startswith(f"http://127.0.0.1:{service_run['ports']['port']}/")

    printed = cell_text(executed)
    assert f"The stack answers at http://127.0.0.1:{service_run['ports']['port']}" in printed, printed

    panel = widget_html(executed)
    for step in ("runtime", "images", "postgres", "metadata", "ui-backend", "proxy"):
        assert f"<b>{step}</b>" in panel, f"step {step} missing from the panel"
    assert re.search(r"\d+\.\d s</td>", panel), "no step time on the panel"
    assert "running</span>" in panel and "failed</span>" not in panel
    connection = installer.connection(root=str(root))
    assert f"value='{connection}'" in panel, "the connection string is not in the copy field"
    assert ">Copy</button>" in panel and "navigator.clipboard" in panel
    assert f"href='{connection}'" in panel, "no UI link"
    assert "Snapshots:" in panel
    assert "Stop the stack" in widget_descriptions(executed)
    # The connection string works: the token it carries opens the UI through the entry point.
    login = requests.get(connection, timeout=10)
    assert login.status_code == 200 and "<html" in login.text.lower()


def test_remote_notebook_connects_and_runs_both_flows(service_run: dict) -> None:
    env = dict(service_run["env"])
    executed = execute(REMOTE, env)
    printed = cell_text(executed)
    assert re.search(r"HelloFlow/\d+ succeeded; its artifact says: 'Hello from a remote notebook'", printed), printed
    trained = re.search(r"TrainFlow/(\d+) trained on cpu \(torch [\d.]+", printed)
    assert trained, printed

    # The runs are in the stack: read back by another process with the stack's token.
    root = service_run["root"]
    status = installer.status(root=str(root))
    token = installer.token(root=str(root))
    client = client_env(service_run["home"], status.urls["metadata_service"], token,
                        service_run["home"] / "metaflow-work" / "datastore")
    train = read_latest_run("TrainFlow", client, "final_loss")
    assert train["successful"] and train["finished"]
    assert train["id"] == trained.group(1)
    assert train["steps"] == ["end", "start", "train"]
    assert train["artifact"] < 0.01
    hello = read_latest_run("HelloFlow", client, "message")
    assert hello["successful"] and hello["artifact"] == "Hello from a remote notebook"

    # The notebook's links point at the UI's run pages, which the entry point serves.
    links = widget_html(executed)
    base = status.urls["ui"].rstrip("/")
    for flow, run_id in (("HelloFlow", hello["id"]), ("TrainFlow", train["id"])):
        url = f"{base}/{flow}/{run_id}"
        assert f"href='{url}'" in links, f"no link to {url}"
        page = requests.get(url, headers={"x-api-key": token}, timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower(), (url, page.status_code)
    assert token not in links.replace(installer.connection(root=str(root)), ""), \
        "the token appears in the run links"


def test_service_notebook_on_a_fresh_runtime_restores_and_says_so(tmp_path: Path, registry: str) -> None:
    """Same MF_ROOT (the Drive folder), an empty PGDATA_DIR (a new runtime's local disk): restored, and shown."""
    root, home = tmp_path / "root", tmp_path / "home"
    home.mkdir()
    try:
        first = kernel_env(root, home, registry, {k: free_port() for k in ("port", "metadata", "ui", "db")})
        first["PGDATA_DIR"] = str(tmp_path / "pgdata-first-runtime")
        execute(SERVICE, first, store_widget_state=False)
        stopped = installer.down(root=str(root))
        assert "postgres" in stopped
        assert installer.status(root=str(root)).snapshot["generation"] is not None, "down left no snapshot"

        second = kernel_env(root, home, registry, {k: free_port() for k in ("port", "metadata", "ui", "db")})
        second["PGDATA_DIR"] = str(tmp_path / "pgdata-second-runtime")
        executed = execute(SERVICE, second)
        panel = widget_html(executed)
        assert "<b>Restored from a snapshot.</b> restored the database from snapshot" in panel, panel[-3000:]
        assert "<b>restore</b>" in panel
        assert "The stack answers at" in cell_text(executed)
        assert any((tmp_path / "pgdata-second-runtime").iterdir())
    finally:
        installer.down(root=str(root))


# ---------------------------------------------------------------- the panel in this process

def test_stop_button_stops_the_stack(stack: dict) -> None:
    panel = nb.start_stack(widgets=True, **stack)
    assert panel.ok and panel.state == "running"
    assert panel.connection_string == installer.connection(root=stack["root"])
    view = panel.view
    assert view is not None and view.buttons.layout.display == "flex"
    assert "Metaflow stack" in view.header.value and "running</span>" in view.header.value
    names = [step["name"] for step in panel.steps()]
    assert names[:3] == ["runtime", "checks", "images"] and "proxy" in names and "monitor" in names
    assert all(step["state"] == "done" for step in panel.steps())

    view.stop_button.click()

    assert panel.state == "stopped" and panel.error is None
    assert set(panel.stopped or []) >= {"postgres", "metadata", "ui-backend", "proxy", "monitor"}
    assert all(step["state"] == "done" and step["message"] == "stopped" for step in panel.steps())
    assert "Stopped:" in view.result.value and view.stop_button.layout.display == "none"
    after = installer.status(**stack)
    assert all(s.state == "stopped" for s in after.services), [(s.name, s.state) for s in after.services]

    view.refresh_button.click()
    assert panel.state == "stopped" and "<td class='bad'>stopped</td>" in view.result.value


def test_failed_start_shows_the_log_tail_and_hint(tmp_path: Path, registry: str) -> None:
    flags = stack_flags(tmp_path / "root", registry)
    pgdata = tmp_path / "pgdata"
    pgdata.mkdir()
    # A data folder from a PostgreSQL major version this server cannot read: it exits at start-up.
    (pgdata / "PG_VERSION").write_text("9\n")
    flags["pgdata_dir"] = str(pgdata)
    lines: list[str] = []
    try:
        panel = nb.start_stack(widgets=True, raise_on_error=False, on_line=lines.append, **flags)
        assert panel.state == "failed" and not panel.ok
        error = panel.error
        assert isinstance(error, ServiceFailed), repr(error)
        assert error.log_tail and error.hint
        failed = [step for step in panel.steps() if step["state"] == "failed"]
        assert [step["name"] for step in failed] == ["postgres"]
        problem = panel.view.problem.value
        assert "box error" in problem and "What to do:" in problem
        assert nb._esc(error.log_tail.splitlines()[-1]) in problem, "the log tail is not on the panel"
        assert "<span class='bad'>&#10007;</span></td><td><b>postgres</b>" in panel.view.steps.value
        assert any(line.startswith("error (up): ") for line in lines)
        assert panel.view.buttons.layout.display == "flex", "no stop button after a failed start"
        text = panel.lines()
        assert any(line.startswith("error: ") for line in text) and any(line.startswith("hint: ") for line in text)

        with pytest.raises(StackError) as raised:
            nb.start_stack(widgets=False, **flags)
        assert raised.value._render_traceback_()[0].startswith(type(raised.value).__name__)
    finally:
        installer.down(**flags)


def test_panel_renders_events_as_they_come() -> None:
    """Steps in the order they start, elapsed time while running, the final time once done."""
    now = [100.0]
    lines: list[str] = []
    panel = nb.Panel({}, widgets=True, on_line=lines.append, clock=lambda: now[0])
    panel.handle(Event("runtime", "starting"))
    now[0] += 1.5
    panel.handle(Event("runtime", "installing udocker's engine"))
    assert panel.steps() == [{"name": "runtime", "message": "installing udocker's engine", "state": "running",
                              "seconds": 1.5}]
    assert "<i>1.5 s</i>" in panel.view.steps.value
    panel.handle(Event("runtime", "udocker ready", 1.75))
    panel.handle(Event("postgres", "starting"))
    panel.handle(Event("metadata", "starting"))
    now[0] += 70
    panel.handle(Event("metadata", "healthy on port 8080 (pid 7)", 3.2))
    steps = panel.steps()
    assert [s["name"] for s in steps] == ["runtime", "postgres", "metadata"]
    assert [s["state"] for s in steps] == ["done", "running", "done"]
    assert steps[1]["seconds"] == 70.0 and "<i>1 min 10 s</i>" in panel.view.steps.value
    assert lines == ["   runtime     installing udocker's engine", "ok runtime     udocker ready (1.8 s)",
                     "ok metadata    healthy on port 8080 (pid 7) (3.2 s)"]
    assert "&lt;" not in panel.view.steps.value
    panel.handle(Event("metadata", "uses <b>html</b>", None))
    assert "uses &lt;b&gt;html&lt;/b&gt;" in panel.view.steps.value


def _status(**changes: object) -> StackStatus:
    services = [ServiceStatus("postgres", "PostgreSQL", "running", 11, 5432, True, 30.0, "/r/logs/postgres.log"),
                ServiceStatus("metadata", "metadata service", "dead", None, 8080, False, None,
                              "/r/logs/metadata.log")]
    values: dict = {"root": "/r", "services": services, "schema_version": 20220901093000,
                    "urls": {"ui": "http://127.0.0.1:7860/"}, "connection_string": "http://127.0.0.1:7860/?token=x"}
    values.update(changes)
    return StackStatus(**values)


def test_panel_shows_restore_snapshot_and_unhealthy_services() -> None:
    panel = nb.Panel({}, widgets=True)
    panel.handle(Event("runtime", "udocker ready", 0.4))
    panel.show_status(_status(restored="restored generation 7 from /content/drive/MyDrive/s (2 min old)",
                              snapshot={"generation": 7, "age_seconds": 30, "size_bytes": 2_000_000,
                                        "error": "Drive is full"}))
    view = panel.view
    assert "Restored from a snapshot." in view.banner.value and "generation 7 from /content" in view.banner.value
    assert "the last snapshot failed: Drive is full" in view.result.value
    assert "1 of 2 services healthy" in view.result.value
    assert "<td class='bad'>dead</td>" in view.result.value and "/r/logs/metadata.log" in view.result.value
    assert panel.state == "unhealthy" and "not healthy</span>" in view.header.value
    assert any(line.startswith("restored: restored generation 7") for line in panel.lines())

    healthy = [ServiceStatus("postgres", "PostgreSQL", "running", 11, 5432, True, 30.0, "/r/logs/postgres.log")]
    panel.show_status(_status(services=healthy, already_running=True, snapshot=None))
    assert "already running" in view.banner.value and "Restored" not in view.banner.value
    assert "<td class='ok'>healthy</td>" in view.result.value, "an already running stack lists its services"
    assert "Snapshots:</b> <span class='muted'>off: the database lives only" in view.result.value
    assert panel.ok and panel.ui_url == "http://127.0.0.1:7860/?token=x"


def test_snapshot_summary_covers_every_case() -> None:
    assert nb.snapshot_summary(None)[0] == "none"
    assert nb.snapshot_summary({"generation": None, "age_seconds": None, "size_bytes": None,
                                "error": None})[0] == "none"
    kind, text = nb.snapshot_summary({"generation": 4, "age_seconds": 125, "size_bytes": 31_400_000,
                                      "error": None})
    assert kind == "ok" and text == "last snapshot: generation 4, taken 2 min ago, 31.4 MB"
    kind, text = nb.snapshot_summary({"folder": "/content/drive/MyDrive/s", "generation": None,
                                      "age_seconds": None, "size_bytes": None, "error": None, "state": "watching"})
    assert kind == "none" and "(watcher: watching)" in text and text.endswith("in /content/drive/MyDrive/s")
    kind, text = nb.snapshot_summary({"generation": 4, "age_seconds": 9, "size_bytes": 1, "error": "disk full"})
    assert kind == "error" and "disk full" in text


def test_run_links_follow_the_ui_routes() -> None:
    links = nb.run_links("https://abc.trycloudflare.com/", ["HelloFlow/12", "TrainFlow/1700000000123456"])
    assert links == {"HelloFlow/12": "https://abc.trycloudflare.com/HelloFlow/12",
                     "TrainFlow/1700000000123456": "https://abc.trycloudflare.com/TrainFlow/1700000000123456"}
    with pytest.raises(ValueError):
        nb.ui_run_url("http://x", "HelloFlow/12/start")


def test_metaflow_user_is_set_only_when_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("METAFLOW_USER", "SUDO_USER", "USERNAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("USER", "root")
    assert nb.ensure_metaflow_user() == "notebook" and os.environ["METAFLOW_USER"] == "notebook"
    monkeypatch.delenv("METAFLOW_USER")
    monkeypatch.setenv("USER", "ada")
    assert nb.ensure_metaflow_user() == "ada" and "METAFLOW_USER" not in os.environ


def test_plain_text_without_widgets_needs_no_kernel() -> None:
    """In a terminal (no kernel) the panel keeps text and builds no widgets."""
    code = ("import installer.notebook as nb; from installer.stack import Event\n"
            "p = nb.Panel({})\n"
            "p.handle(Event('runtime', 'starting')); p.handle(Event('runtime', 'ready', 0.5))\n"
            "import json; print(json.dumps([p.view is None, nb.widgets_available(), p.lines()]))")
    done = subprocess.run([sys.executable, "-c", code], check=False, cwd=REPO, capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr
    no_view, available, lines = json.loads(done.stdout)
    assert no_view and not available
    assert lines == ["Metaflow stack: idle", "ok runtime     ready (0.5 s)"]


# ---------------------------------------------------------------- Stop on Colab with Google Drive

def fake_colab(monkeypatch: pytest.MonkeyPatch, flush_and_unmount: Any) -> None:
    """`google.colab.drive` as Colab's runtime has it, with our own flush_and_unmount."""
    google, colab, drive = (types.ModuleType(name) for name in ("google", "google.colab", "google.colab.drive"))
    google.__path__, colab.__path__ = [], []
    google.colab, colab.drive, drive.flush_and_unmount = colab, drive, flush_and_unmount
    for module in (google, colab, drive):
        monkeypatch.setitem(sys.modules, module.__name__, module)


def files_under(folder: Path) -> dict[str, int]:
    return {str(path.relative_to(folder)): path.stat().st_size for path in folder.rglob("*") if path.is_file()}


def test_stop_on_colab_flushes_google_drive_after_the_final_snapshot(stack: dict, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """MF_ROOT on a Drive-like mount (FUSE type fuse.drive, as Colab's): Stop runs `down`, which takes
    the final snapshot, then drive.flush_and_unmount(), so that snapshot reaches Google."""
    mount = DriveMount(tmp_path / "content" / "drive", tmp_path / "google", latency=0.05, upload_delay=1,
                       reorder=1).start()
    try:
        root = mount.mountpoint / "MyDrive" / "metaflow-stack"
        root.parent.mkdir()
        stack.update(root=str(root), pgdata_dir=str(tmp_path / "local" / "pgdata"),
                     cache_dir=str(tmp_path / "local" / "cache"))
        settings = resolve(stack)
        calls: list[dict[str, Any]] = []

        def flush_and_unmount(timeout_ms: int = 24 * 60 * 60 * 1000) -> None:
            calls.append({"running": [s.name for s in installer.status(**stack).services if s.state != "stopped"],
                          "lines": list(panel.progress_lines),
                          "snapshots": files_under(settings.snapshot_dir),
                          "newest": list_generations(settings.snapshot_dir)[0].id})
            mount.stop()  # what Colab's does: wait for every upload, then unmount

        fake_colab(monkeypatch, flush_and_unmount)
        panel = nb.start_stack(widgets=True, **stack)
        assert panel.ok and panel.state == "running"
        password = (settings.secrets_dir / "db_password").read_text().strip()
        with psycopg.connect(dsn(settings, password)) as conn:
            conn.execute("CREATE TABLE stop_probe (note text)")
            conn.execute("INSERT INTO stop_probe VALUES ('written just before Stop')")

        panel.view.stop_button.click()

        assert panel.state == "stopped" and panel.error is None and len(calls) == 1, (calls, panel.lines())
        call = calls[0]
        assert call["running"] == [], f"Drive was flushed while {call['running']} still ran"
        final = [n for n, line in enumerate(call["lines"]) if "final snapshot" in line]
        assert final, f"no final snapshot before the flush:\n{call['lines']}"
        assert "flush_and_unmount" in call["lines"][-1] and final[-1] < len(call["lines"]) - 1
        # Everything the snapshot folder held at the flush is on "Google", whole.
        uploaded = files_under(tmp_path / "google" / "MyDrive" / "metaflow-stack" / "snapshots")
        assert {name: size for name, size in call["snapshots"].items() if not name.startswith("tmp/")} == \
            {name: size for name, size in uploaded.items() if not name.startswith("tmp/")}
        assert list_generations(tmp_path / "google" / "MyDrive" / "metaflow-stack" / "snapshots")[0].id == \
            call["newest"]
        assert not os.path.ismount(mount.mountpoint)
        assert "Google Drive flushed and unmounted" in (panel.drive_flushed or "")
        assert "Google Drive flushed and unmounted" in panel.view.result.value
    finally:
        mount.kill()


def test_stop_flushes_nothing_when_the_stack_is_not_on_google_drive(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    fake_colab(monkeypatch, lambda *args, **kwargs: calls.append(1))
    local = nb.Panel({"root": str(tmp_path / "local-root")}, widgets=False)
    assert local.stop() == [] and local.drive_flushed is None and calls == []

    # On a Drive-like mount but not on Colab (no google.colab to call): nothing to flush, no error.
    mount = DriveMount(tmp_path / "content" / "drive", tmp_path / "google", latency=0.0, upload_delay=0,
                       reorder=0).start()
    try:
        assert nb.google_drive_mount(mount.mountpoint / "MyDrive" / "x") == mount.mountpoint
        monkeypatch.setitem(sys.modules, "google.colab", None)
        on_drive = nb.Panel({"root": str(mount.mountpoint / "metaflow-stack")}, widgets=False)
        assert on_drive.stop() == [] and on_drive.drive_flushed is None and calls == []
    finally:
        mount.kill()
