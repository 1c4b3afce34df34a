"""The notebook panel: ipywidgets over the Python API (`up`, `status`, `down`, `connect`).

    import installer.notebook as nb
    panel = nb.start_stack()                  # steps with their times, then links and a stop button
    result = nb.connect("https://<host>/?token=<token>")   # on another notebook
    nb.show_runs(result, "HelloFlow/12")      # links to runs in the UI

The work is done by installer.api; this module only renders what it returns.
Without ipywidgets or outside a notebook kernel the same objects keep plain text
lines instead (`Panel.lines()`), for the caller to show.
"""

from __future__ import annotations

import contextlib
import html
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import api, humanize
from .clientconfig import FALLBACK_USER, ConnectResult, metaflow_user
from .errors import StackError
from .stack import Event, StackStatus
from .transfer import Transfer

LineSink = Callable[[str], None]

# A pull's progress reaches the plain-text lines this often (the bar moves continuously).
TRANSFER_LINE_EVERY = 10.0
_STYLE = """
<style>
.mfstack { font-family: -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; font-size: 13px;
           color: #1f2328; max-width: 860px; }
.mfstack h3 { margin: 0 0 4px 0; font-size: 16px; }
.mfstack .muted { color: #656d76; }
.mfstack .pill { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px; color: #fff;
                 margin-left: 8px; vertical-align: 2px; }
.mfstack .pill.starting, .mfstack .pill.stopping { background: #9a6700; }
.mfstack .pill.running { background: #1a7f37; }
.mfstack .pill.failed, .mfstack .pill.unhealthy { background: #cf222e; }
.mfstack .pill.stopped { background: #656d76; }
.mfstack table { border-collapse: collapse; margin: 6px 0; }
.mfstack table td, .mfstack table th { padding: 2px 12px 2px 0; line-height: 1.4; text-align: left;
                                       vertical-align: top; }
.mfstack th { color: #656d76; font-weight: 600; border-bottom: 1px solid #d0d7de; }
.mfstack td.time { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.mfstack td.detail { max-width: 560px; }
.mfstack .ok { color: #1a7f37; font-weight: bold; }
.mfstack .run { color: #9a6700; font-weight: bold; }
.mfstack .good { color: #1a7f37; }
.mfstack .bad { color: #cf222e; font-weight: bold; }
.mfstack .box { border-radius: 6px; padding: 8px 12px; margin: 8px 0; }
.mfstack .box.info { background: #ddf4ff; border: 1px solid #54aeff; }
.mfstack .box.good { background: #dafbe1; border: 1px solid #4ac26b; }
.mfstack .box.error { background: #ffebe9; border: 1px solid #ff8182; }
.mfstack .box.warn { background: #fff8c5; border: 1px solid #d4a72c; }
.mfstack pre { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 6px 8px;
               max-height: 260px; overflow: auto; font-size: 12px; white-space: pre-wrap; margin: 6px 0 0 0; }
.mfstack .conn { display: flex; gap: 6px; align-items: center; margin: 4px 0; }
.mfstack .conn input { flex: 1; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px;
                       padding: 4px 6px; border: 1px solid #d0d7de; border-radius: 6px; background: #f6f8fa; }
.mfstack .conn button { padding: 4px 12px; border: 1px solid #d0d7de; border-radius: 6px; background: #f6f8fa;
                        cursor: pointer; }
.mfstack a { color: #0969da; }
</style>
"""

# The copy button runs in the page: the Clipboard API where the page may use it, else the
# older select-and-copy, which also works inside sandboxed output frames (Colab).
_COPY_JS = ("(function(b){var t=b.parentNode.querySelector('input');t.select();"
            "var done=function(){b.textContent='Copied';setTimeout(function(){b.textContent='Copy';},1500);};"
            "var old=function(){try{document.execCommand('copy');done();}catch(e){b.textContent='Select and copy';}};"
            "if(navigator.clipboard&&window.isSecureContext){navigator.clipboard.writeText(t.value).then(done,old);}"
            "else{old();}})(this)")


# ---------------------------------------------------------------- environment

def in_colab() -> bool:
    """True inside a Google Colab runtime."""
    try:
        import google.colab  # noqa: F401
    except ImportError:
        return False
    return True


def google_drive_mount(path: str | os.PathLike[str], mounts: str = "/proc/self/mounts") -> Path | None:
    """The Google Drive mount point `path` lies under, or None. Colab mounts Drive as a FUSE file
    system of type `fuse.drive` (at /content/drive)."""
    try:
        table = Path(mounts).read_text()
    except OSError:
        return None
    target = Path(path).resolve()  # a local symlink into Drive counts as on Drive
    for line in table.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "fuse.drive":
            # /proc/mounts writes spaces and other odd characters as octal escapes ("My\040Drive").
            mount = Path(re.sub(r"\\([0-7]{3})", lambda found: chr(int(found.group(1), 8)), fields[1]))
            if target == mount or mount in target.parents:
                return mount
    return None


def widgets_available() -> bool:
    """ipywidgets is installed and this code runs in a notebook kernel that can show them."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def _display(obj: Any) -> None:
    """Show `obj` in the notebook; outside IPython there is nowhere to show it (and nothing is printed)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return
    if get_ipython() is not None:
        display(obj)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------- rendering helpers

def snapshot_summary(snapshot: Mapping[str, Any] | None) -> tuple[str, str]:
    """(kind, sentence) for the stack's last snapshot; kind is ok, error or none.

    `snapshot` is StackStatus.snapshot: generation, age_seconds, size_bytes, error and,
    when known, folder and state (of the watcher); None when snapshots are off.
    """
    if not snapshot:
        return "none", ("off: the database lives only on this machine's disk (PGDATA_DIR) and is lost "
                        "with it")
    where = f" in {snapshot['folder']}" if snapshot.get("folder") else ""
    if snapshot.get("error"):
        return "error", f"the last snapshot failed: {snapshot['error']}"
    if snapshot.get("generation") is None:
        state = f" (watcher: {snapshot['state']})" if snapshot.get("state") else ""
        return "none", f"none taken yet{state}; one follows the first change to the database{where}"
    parts = [f"generation {snapshot['generation']}"]
    if snapshot.get("age_seconds") is not None:
        parts.append(f"taken {humanize.age(float(snapshot['age_seconds']))}")
    if snapshot.get("size_bytes") is not None:
        parts.append(humanize.size(float(snapshot["size_bytes"])))
    return "ok", "last snapshot: " + ", ".join(parts) + where


def copy_field(value: str, label: str = "") -> str:
    """HTML: a read-only text field holding `value` with a Copy button."""
    prefix = f"<span class='muted'>{_esc(label)}</span>" if label else ""
    return (f"<div class='conn'>{prefix}<input readonly value='{_esc(value)}' onclick='this.select()'>"
            f"<button type='button' onclick=\"{_COPY_JS}\">Copy</button></div>")


def ui_run_url(base_url: str, pathspec: str) -> str:
    """The UI's page for a run: <base>/<FlowName>/<run id> (metaflow-ui's route for a run)."""
    flow, _, run_id = pathspec.strip("/").partition("/")
    if not flow or not run_id or "/" in run_id:
        raise ValueError(f"not a run pathspec (FlowName/run_id): {pathspec!r}")
    return f"{base_url.rstrip('/')}/{flow}/{run_id}"


# ---------------------------------------------------------------- the stack panel

@dataclass
class _Step:
    name: str
    message: str
    began: float
    seconds: float | None = None
    failed: bool = False


class Panel:
    """The stack as a notebook panel: steps with their times, failures, links, snapshot state, a stop button.

    `handle(event)` is the progress callback for `installer.up`; `start()` runs `up` with it.
    With `widgets=False` (or without ipywidgets) it keeps plain text only: see `lines()`;
    `on_line` receives each progress line as it happens.
    """

    def __init__(self, flags: Mapping[str, Any] | None = None, *, widgets: bool | None = None,
                 on_line: LineSink | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.flags = dict(flags or {})
        self.state = "idle"
        self.status: StackStatus | None = None
        self.error: StackError | None = None
        self.stopped: list[str] | None = None
        self.drive_flushed: str | None = None  # what the stop did about Google Drive, when on Colab
        self.progress_lines: list[str] = []
        self.transfer: Transfer | None = None  # the running pull, for the progress bar
        self._transfer_logged = -TRANSFER_LINE_EVERY
        self._steps: dict[str, _Step] = {}
        self._clock = clock
        self._on_line = on_line
        self._lock = threading.RLock()
        self._ticker: threading.Thread | None = None
        self._ticking = threading.Event()
        self.view: _PanelView | None = None
        if widgets if widgets is not None else widgets_available():
            self.view = _PanelView(self)

    # -- work ------------------------------------------------------------

    def start(self) -> StackStatus | None:
        """Run `installer.up` with this panel as its progress callback; the error is kept, not raised."""
        with self._lock:
            self.state, self.error, self.stopped, self._steps = "starting", None, None, {}
        self._start_ticker()
        try:
            status = api.up(progress=self.handle, **self.flags)
        except StackError as exc:
            self._fail(exc)
            return None
        except KeyboardInterrupt:
            self._fail(StackError("the start was interrupted", hint="run the cell again to finish starting, "
                                  "or press Stop the stack to stop what already started"))
            raise
        except Exception as exc:
            # Not a failure `up` knows how to describe: still end the panel's "starting" state.
            self._fail(StackError(f"unexpected error: {type(exc).__name__}: {exc}",
                                  hint="run the cell again; if it happens again, report it with the traceback"))
            raise
        finally:
            self._stop_ticker()
        self.show_status(status)
        if status.running and not status.ui_ready:
            self._watch_ui()
        return status

    def _watch_ui(self) -> None:
        """Refresh the panel once the UI backend, which `up` does not wait for, answers (or gives up)."""
        def watch() -> None:
            deadline = time.monotonic() + api.settings(**self.flags).start_timeout
            while time.monotonic() < deadline:
                time.sleep(1.0)
                with contextlib.suppress(StackError):
                    status = api.status(**self.flags)
                    if status.ui_ready or not status.running:
                        self.show_status(status)
                        return
            self.refresh()

        threading.Thread(target=watch, name="mfstack-panel-ui-watch", daemon=True).start()

    def refresh(self) -> StackStatus | None:
        """Read the stack's status again (services, snapshot) and show it."""
        try:
            status = api.status(**self.flags)
        except StackError as exc:
            self._fail(exc, during="status")
            return None
        self.show_status(status)
        return status

    def stop(self) -> list[str] | None:
        """Stop the stack (`installer.down`); what the stop button does."""
        with self._lock:
            self.state, self.error = "stopping", None
            self._steps = {}  # the table now shows the stop, service by service
        self._render()
        try:
            stopped = api.down(progress=self.handle, **self.flags)
        except StackError as exc:
            self._fail(exc, during="down")
            return None
        with self._lock:
            self.stopped = stopped
            self.state = "stopped"
            self.status = None
        self._line("stopped " + (", ".join(stopped) if stopped else "nothing (nothing was running)"))
        self.drive_flushed = self._flush_google_drive()
        self._render()
        return stopped

    def _flush_google_drive(self) -> str | None:
        """On Colab, once `down` has taken the final snapshot: upload what Drive still holds back.

        Drive uploads in the background and whatever is pending when the runtime ends is lost; the
        final snapshot is the newest state, so it must reach Google before the runtime goes."""
        if not in_colab():
            return None
        try:
            settings = api.settings(**self.flags)
        except StackError:
            return None
        mounts = {mount for mount in (google_drive_mount(settings.root), google_drive_mount(settings.snapshot_dir))
                  if mount is not None}
        if not mounts:
            return None
        where = ", ".join(sorted(map(str, mounts)))
        self._line(f"uploading what is pending to Google Drive ({where}): drive.flush_and_unmount()")
        self._render()
        try:
            from google.colab import drive
            drive.flush_and_unmount()
        except Exception as exc:  # Colab's own errors have no common base class
            sentence = (f"Google Drive could not be flushed ({type(exc).__name__}: {exc}); the last seconds of "
                        "the final snapshot may not have reached Google: keep this runtime running a minute, "
                        "or run `from google.colab import drive; drive.flush_and_unmount()` yourself")
            self._line(sentence)
            return sentence
        sentence = (f"Google Drive flushed and unmounted ({where}): the final snapshot has reached Google; "
                    "mount Drive again (drive.mount('/content/drive')) before starting the stack again")
        self._line(sentence)
        return sentence

    # -- progress --------------------------------------------------------

    def handle(self, event: Event) -> None:
        """The `progress` callback: called from `up`'s worker threads too."""
        now = self._clock()
        if isinstance(event.message, Transfer) and event.seconds is None:
            with self._lock:
                self.transfer = event.message
                if event.step in self._steps:
                    self._steps[event.step].message = event.message
                log = event.message.finished or now - self._transfer_logged >= TRANSFER_LINE_EVERY
                if log:
                    self._transfer_logged = now
            if log:
                self._line(f"   {event.step:<11} {event.message}")
            self._render()
            return
        with self._lock:
            if event.seconds is not None:
                self.transfer = None
            step = self._steps.get(event.step)
            if step is None or (step.seconds is not None and event.seconds is None
                                and event.message in ("starting", "stopping")):
                step = self._steps[event.step] = _Step(event.step, event.message, now)
            if event.seconds is None:
                if event.message not in ("starting", "stopping") or step.message in ("starting", "stopping"):
                    step.message = event.message
                step.seconds = None
            else:
                step.message, step.seconds = event.message, event.seconds
        if event.seconds is not None:
            self._line(f"ok {event.step:<11} {event.message} ({event.seconds:.1f} s)")
        elif event.message not in ("starting", "stopping"):
            self._line(f"   {event.step:<11} {event.message}")
        self._render()

    def show_status(self, status: StackStatus) -> None:
        with self._lock:
            self.status, self.stopped = status, None
            if status.running:
                self.state = "running"
            elif all(row.state == "stopped" for row in status.services):
                self.state = "stopped"
            else:
                self.state = "unhealthy"
        self._render()

    def _fail(self, exc: StackError, during: str = "up") -> None:
        with self._lock:
            self.error = exc
            self.state = "failed"
            for step in self._steps.values():
                if step.seconds is None:
                    step.failed = True
                    step.seconds = self._clock() - step.began
                    if step.message in ("starting", "stopping"):
                        step.message = "failed"
        self._line(f"error ({during}): {exc}")
        self._render()

    def _line(self, text: str) -> None:
        self.progress_lines.append(text)
        if self._on_line is not None:
            self._on_line(text)

    # -- elapsed time while steps run ------------------------------------

    def _start_ticker(self) -> None:
        if self.view is None:
            return
        self._ticking.set()

        def tick() -> None:
            while self._ticking.is_set():
                time.sleep(0.5)
                self._render()

        self._ticker = threading.Thread(target=tick, name="mfstack-panel-ticker", daemon=True)
        self._ticker.start()

    def _stop_ticker(self) -> None:
        self._ticking.clear()
        if self._ticker is not None:
            self._ticker.join(timeout=2)
            self._ticker = None

    def _render(self) -> None:
        if self.view is not None:
            self.view.render()

    # -- data for views --------------------------------------------------

    def steps(self) -> list[dict[str, Any]]:
        """Each step: name, message, state (running, done, failed) and seconds (elapsed so far while running)."""
        now = self._clock()
        with self._lock:
            return [{"name": s.name, "message": s.message,
                     "state": "failed" if s.failed else ("running" if s.seconds is None else "done"),
                     "seconds": (now - s.began) if s.seconds is None else s.seconds}
                    for s in self._steps.values()]

    @property
    def ok(self) -> bool:
        return self.error is None and self.status is not None and self.status.running

    @property
    def connection_string(self) -> str | None:
        return self.status.connection_string if self.status else None

    @property
    def ui_url(self) -> str | None:
        """The address that opens the UI in a browser (and logs it in, when the stack has a token)."""
        if self.status is None:
            return None
        return self.status.connection_string or self.status.urls.get("public") or self.status.urls.get("ui")

    def lines(self) -> list[str]:
        """The panel as plain text (no token: the connection string is left to `connection_string`)."""
        out = [f"Metaflow stack: {self.state}"]
        for step in self.steps():
            mark = {"done": "ok", "running": "..", "failed": "!!"}[step["state"]]
            out.append(f"{mark} {step['name']:<11} {step['message']} ({step['seconds']:.1f} s)")
        if self.error is not None:
            out.append(f"error: {self.error.message}")
            if self.error.log_tail:
                out.append(f"last lines of {self.error.log}:" if self.error.log else "last lines of the log:")
                out.extend("    " + line for line in self.error.log_tail.splitlines())
            if self.error.hint:
                out.append(f"hint: {self.error.hint}")
        status = self.status
        if status is not None:
            if status.restored:
                out.append(f"restored: {status.restored}")
            if status.already_running:
                out.append("the stack was already running")
            out.append(f"UI: {status.urls.get('public') or status.urls.get('ui')}")
            out.append(snapshot_summary(status.snapshot)[1])
            for row in status.services:
                out.append(f"  {row.name:<11} {row.state}{'' if row.healthy else ' (unhealthy)'}")
        if self.stopped is not None:
            out.append("stopped: " + (", ".join(self.stopped) or "nothing was running"))
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())

    def _ipython_display_(self) -> None:
        if self.view is not None:
            _display(self.view.box)
        else:
            from IPython.display import display
            display({"text/plain": str(self)}, raw=True)


class _PanelView:
    """The ipywidgets of one Panel."""

    def __init__(self, panel: Panel) -> None:
        import ipywidgets as w

        self.panel = panel
        self.header = w.HTML()
        self.banner = w.HTML()
        self.steps = w.HTML()
        self.problem = w.HTML()
        self.result = w.HTML()
        self.refresh_button = w.Button(description="Refresh status", layout=w.Layout(width="auto"))
        self.stop_button = w.Button(description="Stop the stack", button_style="danger",
                                    layout=w.Layout(width="auto"),
                                    tooltip="installer.down(): stops every service (state stays on disk)")
        self.refresh_button.on_click(lambda _: self._run(panel.refresh))
        self.stop_button.on_click(lambda _: self._run(panel.stop))
        self.buttons = w.HBox([self.refresh_button, self.stop_button])
        self.bar = w.FloatProgress(min=0.0, max=1.0, value=0.0, bar_style="info", description="pulling",
                                   layout=w.Layout(width="45%"))
        self.bar_label = w.Label()
        self.transfer = w.HBox([self.bar, self.bar_label])
        self.box = w.VBox([self.header, self.banner, self.steps, self.transfer, self.problem, self.result,
                           self.buttons])
        self._lock = threading.Lock()
        self.render()

    def _run(self, action: Callable[[], Any]) -> None:
        self.refresh_button.disabled = self.stop_button.disabled = True
        try:
            action()
        finally:
            self.refresh_button.disabled = self.stop_button.disabled = False
            self.render()

    def render(self) -> None:
        with self._lock:
            panel = self.panel
            self.header.value = self._header()
            self.banner.value = self._banner()
            self.steps.value = self._steps()
            self.problem.value = self._problem()
            self.result.value = self._result()
            transfer = panel.transfer
            self.transfer.layout.display = "flex" if transfer is not None else "none"
            if transfer is not None:
                self.bar.value = transfer.fraction
                self.bar.bar_style = "success" if transfer.finished else "info"
                self.bar.description = transfer.what
                self.bar_label.value = str(transfer).removeprefix(transfer.what + " ")
            # After a failure something may still run (a service left for inspection): offer the stop too.
            shown = panel.state in ("running", "unhealthy", "failed", "stopped")
            self.buttons.layout.display = "flex" if shown else "none"
            self.stop_button.layout.display = "none" if panel.state == "stopped" else "flex"

    def _wrap(self, body: str) -> str:
        return f"<div class='mfstack'>{body}</div>" if body else ""

    def _header(self) -> str:
        panel = self.panel
        labels = {"idle": "not started", "starting": "starting", "running": "running", "failed": "failed",
                  "unhealthy": "not healthy",
                  "stopping": "stopping", "stopped": "stopped"}
        where = panel.status.root if panel.status else panel.flags.get("root")
        sub = f"<div class='muted'>MF_ROOT: {_esc(where)}</div>" if where else ""
        return _STYLE + self._wrap(f"<h3>Metaflow stack<span class='pill {panel.state}'>"
                                   f"{labels.get(panel.state, panel.state)}</span></h3>{sub}")

    def _banner(self) -> str:
        status = self.panel.status
        if status is None:
            return ""
        parts = []
        if status.restored:
            parts.append(f"<div class='box info'><b>Restored from a snapshot.</b> {_esc(status.restored)}</div>")
        if status.already_running:
            parts.append("<div class='box info'>The stack was already running; nothing was started.</div>")
        return self._wrap("".join(parts))

    def _steps(self) -> str:
        rows = []
        for step in self.panel.steps():
            mark = {"done": "<span class='ok'>&#10003;</span>", "running": "<span class='run'>&#8943;</span>",
                    "failed": "<span class='bad'>&#10007;</span>"}[step["state"]]
            elapsed = humanize.duration(step["seconds"])
            time_cell = f"<i>{elapsed}</i>" if step["state"] == "running" else elapsed
            rows.append(f"<tr><td>{mark}</td><td><b>{_esc(step['name'])}</b></td>"
                        f"<td class='detail'>{_esc(step['message'])}</td><td class='time'>{time_cell}</td></tr>")
        if not rows:
            return ""
        return self._wrap("<table><tr><th></th><th>step</th><th>detail</th><th>time</th></tr>"
                          + "".join(rows) + "</table>")

    def _problem(self) -> str:
        error = self.panel.error
        if error is None:
            return ""
        body = f"<b>{_esc(error.message)}</b>"
        if error.hint:
            body += f"<div>What to do: {_esc(error.hint)}</div>"
        if error.log_tail:
            where = f"last lines of <code>{_esc(error.log)}</code>" if error.log else "last lines of the log"
            body += f"<div class='muted' style='margin-top:6px'>{where}</div><pre>{_esc(error.log_tail)}</pre>"
        elif error.log:
            body += f"<div class='muted'>log: <code>{_esc(error.log)}</code></div>"
        return self._wrap(f"<div class='box error'>{body}</div>")

    def _result(self) -> str:
        panel = self.panel
        if panel.stopped is not None:
            names = ", ".join(panel.stopped) or "nothing was running"
            drive = f"<div style='margin-top:6px'>{_esc(panel.drive_flushed)}.</div>" if panel.drive_flushed else ""
            return self._wrap(f"<div class='box warn'>Stopped: {_esc(names)}. The data stays in MF_ROOT and "
                              f"PGDATA_DIR; run the start cell again to bring the stack back.{drive}</div>")
        status = panel.status
        if status is None:
            return ""
        parts = []
        ui = panel.ui_url
        public = status.urls.get("public")
        if ui:
            parts.append(f"<div><b>UI:</b> <a href='{_esc(ui)}' target='_blank' rel='noopener'>open the Metaflow "
                         f"UI</a> <span class='muted'>({_esc(public or status.urls.get('ui', ''))})</span></div>")
        if status.connection_string:
            parts.append("<div style='margin-top:6px'><b>Connection string</b> <span class='muted'>(paste it "
                         "into the remote notebook; it holds the access token)</span></div>"
                         + copy_field(status.connection_string))
        if not public:
            parts.append("<div class='muted'>No tunnel: the stack is reachable from this machine only. "
                         "Turn the tunnel on to reach it from other notebooks.</div>")
        kind, sentence = snapshot_summary(status.snapshot)
        css = {"ok": "good", "error": "bad", "none": "muted"}[kind]
        parts.append(f"<div style='margin-top:6px'><b>Snapshots:</b> <span class='{css}'>{_esc(sentence)}"
                     "</span></div>")
        healthy = [row for row in status.services if row.state == "running" and row.healthy]
        summary = f"{len(healthy)} of {len(status.services)} services healthy"
        if status.running and not status.ui_ready:
            summary += " &middot; the UI is starting (this panel updates when it is ready)"
        if status.schema_version is not None:
            summary += f" &middot; schema version {status.schema_version}"
        parts.append(f"<div class='muted' style='margin-top:6px'>{summary}</div>")
        # The step table already says where each service runs; the service table is for what differs.
        if len(healthy) < len(status.services) or status.already_running or not panel.steps():
            parts.append(services_table(status))
        return self._wrap("".join(parts))


def services_table(status: StackStatus) -> str:
    rows = []
    for row in status.services:
        good = row.state == "running" and row.healthy
        state = "healthy" if good else (row.state if row.state != "running" else "unhealthy")
        up = humanize.duration(row.uptime) if row.uptime is not None else ""
        rows.append(f"<tr><td>{_esc(row.name)}</td><td class='{'ok' if good else 'bad'}'>{_esc(state)}</td>"
                    f"<td>{row.port or ''}</td><td>{row.pid or ''}</td><td class='time'>{up}</td>"
                    f"<td class='muted'>{'' if good else _esc(row.log)}</td></tr>")
    return ("<table><tr><th>service</th><th>state</th><th>port</th><th>pid</th><th>uptime</th><th></th></tr>"
            + "".join(rows) + "</table>")


def start_stack(*, widgets: bool | None = None, raise_on_error: bool = True, on_line: LineSink | None = None,
                **flags: Any) -> Panel:
    """Show a panel and start the stack (`installer.up(**flags)`) under it; returns the panel.

    A failure stays on the panel (message, hint, end of the failing log) and is raised
    again, so that a notebook run stops there; pass raise_on_error=False to keep going.
    """
    panel = Panel({**colab_registry_secrets(flags), **flags}, widgets=widgets, on_line=on_line)
    if panel.view is not None:
        _display(panel.view.box)
    panel.start()
    if panel.error is not None and raise_on_error:
        raise _shown(panel.error)
    return panel


def colab_registry_secrets(flags: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Registry credentials from Colab's secrets (MF_REGISTRY_USER, MF_REGISTRY_PASSWORD), as `up` flags.

    Only on Colab, only when neither flags nor the environment give any, and only secrets this
    notebook was granted; passed in memory, never written anywhere.
    """
    names = ("registry_user", "registry_password", "registry_auth_file")
    if not in_colab() or any(flags.get(n) for n in names) or any(
            environ.get(v) for v in ("MF_REGISTRY_USER", "MF_REGISTRY_PASSWORD", "MF_REGISTRY_AUTH_FILE")):
        return {}
    try:
        from google.colab import userdata

        found = {"registry_user": userdata.get("MF_REGISTRY_USER"),
                 "registry_password": userdata.get("MF_REGISTRY_PASSWORD")}
    except Exception:  # a secret that is missing or not granted to this notebook: pull anonymously
        return {}
    return found if all(found.values()) else {}


# ---------------------------------------------------------------- remote notebooks

def connect(connection: str | None = None, *, widgets: bool | None = None, **options: Any) -> ConnectResult:
    """`installer.connect(...)` with its outcome shown in the notebook (no token shown).

    It also gives Metaflow a user name when this process has none but "root"
    (Colab runs as root, and Metaflow refuses to run flows as an unknown user).
    """
    show = widgets if widgets is not None else widgets_available()
    if options.get("set_env", True):
        ensure_metaflow_user()
    try:
        result = api.connect(connection, **options)
    except StackError as exc:
        if show:
            _display_html(_error_html(exc, "Cannot connect"))
        raise _shown(exc) from None
    if show:
        _display_html(connection_html(result))
    return result


def ensure_metaflow_user(default: str = FALLBACK_USER) -> str:
    """The user name Metaflow will record; sets METAFLOW_USER to `default` when there is none."""
    found = metaflow_user()
    if found is not None:
        return found
    os.environ["METAFLOW_USER"] = default
    return default


def connection_html(result: ConnectResult) -> str:
    lines = result.lines()
    items = "".join(f"<li>{_esc(line)}</li>" for line in lines[1:])
    login = result.connection_string or result.base_url
    return (_STYLE + f"<div class='mfstack'><div class='box good'><b>{_esc(lines[0])}</b><ul>{items}</ul>"
            f"<a href='{_esc(login)}' target='_blank' rel='noopener'>Open the Metaflow UI</a> "
            "<span class='muted'>(this link logs the browser in)</span></div></div>")


def run_links(base_url: str, pathspecs: Iterable[str]) -> dict[str, str]:
    """{pathspec: UI address} for runs given as 'FlowName/run_id'."""
    return {spec: ui_run_url(base_url, spec) for spec in pathspecs}


def show_runs(target: ConnectResult | str, *pathspecs: str, widgets: bool | None = None) -> dict[str, str]:
    """Show links to runs in the UI; returns {pathspec: UI address}.

    `target` is the result of `connect` (or the stack's base URL). A browser that has not
    opened the connection string yet is asked for the token first.
    """
    base = target.base_url if isinstance(target, ConnectResult) else str(target).rstrip("/")
    links = run_links(base, pathspecs)
    if widgets if widgets is not None else widgets_available():
        login = target.connection_string if isinstance(target, ConnectResult) else ""
        items = "".join(f"<li><a href='{_esc(url)}' target='_blank' rel='noopener'>{_esc(spec)}</a> "
                        f"<span class='muted'>{_esc(url)}</span></li>" for spec, url in links.items())
        first = (f"<div class='muted'>First time in this browser? <a href='{_esc(login)}' target='_blank' "
                 "rel='noopener'>Open the UI once with the token</a>, then the links below work.</div>"
                 if login else "")
        _display_html(_STYLE + f"<div class='mfstack'><b>Runs in the Metaflow UI</b>{first}<ul>{items}</ul></div>")
    return links


def _display_html(text: str) -> None:
    import ipywidgets as w
    _display(w.HTML(text))


def _error_html(exc: StackError, title: str) -> str:
    body = f"<b>{_esc(title)}: {_esc(exc.message)}</b>"
    if exc.hint:
        body += f"<div>What to do: {_esc(exc.hint)}</div>"
    if exc.log_tail:
        body += f"<pre>{_esc(exc.log_tail)}</pre>"
    return _STYLE + f"<div class='mfstack'><div class='box error'>{body}</div></div>"


def _shown(exc: StackError) -> StackError:
    """The error, made to show in a notebook as its message only (the panel already shows the details).

    IPython renders an exception through its `_render_traceback_` when it has one;
    a Python traceback into this package helps nobody reading a notebook.
    """
    text = [f"{type(exc).__name__}: {exc}"]
    exc._render_traceback_ = lambda: text  # type: ignore[attr-defined]
    return exc
