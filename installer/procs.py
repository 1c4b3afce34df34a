"""The one place that runs, watches and signals processes.

Everything the stack starts goes through `run` (short commands we wait for) or
`spawn` (long-lived services, detached in their own session so that a notebook
cell or a terminal closing does not take them down). The /proc readers below
let `down` find what a service left behind and prove that nothing is left.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import StackError

log = logging.getLogger(__name__)

_TAIL_LINES = 20


def tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last `lines` lines of a text file, or '' if it cannot be read."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            data = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def run(cmd: Sequence[str], *, env: Mapping[str, str] | None = None, cwd: Path | None = None,
        timeout: float | None = None, check: bool = True, what: str | None = None,
        hint: str | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a command to completion and capture its output.

    `env` is added to the current environment. With `check`, a non-zero exit
    raises StackError naming `what` and showing the end of the command's output.
    """
    full_env = {**os.environ, **(env or {})}
    log.debug("run: %s", " ".join(cmd))
    try:
        done = subprocess.run(list(cmd), env=full_env, cwd=cwd, timeout=timeout, text=True,
                              input=input, stdin=None if input is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError as exc:
        raise StackError(f"{what or cmd[0]}: command not found: {cmd[0]}", hint=hint) from exc
    except subprocess.TimeoutExpired as exc:
        raise StackError(f"{what or cmd[0]} did not finish within {timeout:.0f} s", hint=hint) from exc
    if check and done.returncode != 0:
        out = "\n".join(done.stdout.strip().splitlines()[-_TAIL_LINES:])
        raise StackError(f"{what or ' '.join(cmd)} failed (exit {done.returncode})",
                         hint=hint, log_tail=out or None)
    return done


def stream(cmd: Sequence[str], on_line: Callable[[str], None], *, env: Mapping[str, str] | None = None,
           timeout: float | None = None, what: str | None = None, hint: str | None = None) -> str:
    """Run a command to completion, handing each output line to `on_line` as it comes.

    Returns the whole output; a non-zero exit raises StackError with its last lines.
    """
    full_env = {**os.environ, **(env or {})}
    log.debug("stream: %s", " ".join(cmd))
    lines: list[str] = []
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        proc = subprocess.Popen(list(cmd), env=full_env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)
    except FileNotFoundError as exc:
        raise StackError(f"{what or cmd[0]}: command not found: {cmd[0]}", hint=hint) from exc
    assert proc.stdout is not None
    with proc:
        for line in proc.stdout:
            line = line.rstrip("\n")
            lines.append(line)
            if line.strip():
                on_line(line)
            if deadline is not None and time.monotonic() > deadline:
                proc.kill()
                raise StackError(f"{what or cmd[0]} did not finish within {timeout:.0f} s", hint=hint)
        code = proc.wait()
    if code != 0:
        raise StackError(f"{what or ' '.join(cmd)} failed (exit {code})", hint=hint,
                         log_tail="\n".join(lines[-_TAIL_LINES:]) or None)
    return "\n".join(lines)


def open_private(path: Path, mode: str = "w") -> IO:
    """Open `path` for writing ("w", "a", "ab", ...), created 0600 and tightened to 0600 if it existed."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if "a" in mode else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, mode, buffering=0) if "b" in mode else os.fdopen(fd, mode)


def spawn(cmd: Sequence[str], *, log_path: Path, env: Mapping[str, str] | None = None,
          cwd: Path | None = None, inherit_env: bool = True) -> int:
    """Start a long-lived process in its own session, output appended to `log_path`.

    Returns its pid, which is also its process-group id.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**(os.environ if inherit_env else {}), **(env or {})}
    log.debug("spawn: %s", " ".join(cmd))
    with open_private(log_path, "ab") as out:
        shown = " ".join(cmd)
        shown = shown if len(shown) <= 300 else shown[:300] + " ..."
        out.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {shown}\n".encode())
        try:
            proc = subprocess.Popen(list(cmd), env=full_env, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                    close_fds=True)
        except FileNotFoundError as exc:
            raise StackError(f"cannot start {cmd[0]}: command not found") from exc
    return proc.pid


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    state: str
    cmdline: tuple[str, ...]
    start_ticks: int

    @property
    def command(self) -> str:
        return " ".join(self.cmdline)


def proc_info(pid: int) -> ProcInfo | None:
    """What /proc says about `pid`, or None if it is gone (zombies count as gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read().decode("utf-8", "replace")
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    # The command name in field 2 may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    state = fields[0]
    if state in ("Z", "X"):
        return None
    cmdline = tuple(part.decode("utf-8", "replace") for part in raw.split(b"\0") if part)
    return ProcInfo(pid=pid, ppid=int(fields[1]), pgid=int(fields[2]), state=state,
                    cmdline=cmdline, start_ticks=int(fields[19]))


def alive(pid: int | None) -> bool:
    if pid is None or pid <= 0:
        return False
    _reap_children()
    return proc_info(pid) is not None


def pid_file_owner(path: Path, program: str) -> int | None:
    """The pid on the first line of `path` if that process runs `program`, else None.

    A pid file can outlive its process (a data folder copied, restored or left by a machine that
    died), and the pid can belong to any process since: never signal one without this check."""
    try:
        pid = int(path.read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    if pid <= 0:
        return None
    _reap_children()
    info = proc_info(pid)
    if info is None or not info.cmdline:
        return None
    return pid if Path(info.cmdline[0]).name == program else None


def all_processes() -> list[ProcInfo]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = proc_info(int(entry))
            if info is not None:
                found.append(info)
    return found


def descendants(pid: int, processes: Iterable[ProcInfo] | None = None) -> list[ProcInfo]:
    """Every living process below `pid` in the process tree, parents before children."""
    table = list(processes if processes is not None else all_processes())
    children: dict[int, list[ProcInfo]] = {}
    for info in table:
        children.setdefault(info.ppid, []).append(info)
    found: list[ProcInfo] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop(0)
        for child in children.get(parent, []):
            found.append(child)
            frontier.append(child.pid)
    return found


def with_environment(name: str, value: str, processes: Iterable[ProcInfo] | None = None) -> list[ProcInfo]:
    """Every living process whose environment has `name=value` (children inherit it, orphans too)."""
    wanted = f"{name}={value}".encode()
    found = []
    for info in processes if processes is not None else all_processes():
        try:
            with open(f"/proc/{info.pid}/environ", "rb") as handle:
                if wanted in handle.read().split(b"\0"):
                    found.append(info)
        except OSError:
            continue
    return found


def group_members(pgid: int) -> list[ProcInfo]:
    return [info for info in all_processes() if info.pgid == pgid]


def send(pid: int, sig: signal.Signals) -> bool:
    """Signal one process; False if it was already gone."""
    try:
        os.kill(pid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        raise StackError(f"not allowed to signal process {pid}",
                         hint="run the command as the user who started the stack") from exc


def wait_gone(pids: Iterable[int], timeout: float, poll: float = 0.05) -> list[int]:
    """Wait until none of `pids` is alive; return those still alive at the deadline."""
    pending = set(pids)
    deadline = time.monotonic() + timeout
    while True:
        _reap_children()
        pending = {pid for pid in pending if alive(pid)}
        if not pending or time.monotonic() >= deadline:
            return sorted(pending)
        _reap_children()
        time.sleep(poll)


_exit_codes: dict[int, int] = {}


def _reap_children() -> None:
    """Collect our own exited children so they do not linger as zombies; keep their exit codes."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _exit_codes[pid] = os.waitstatus_to_exitcode(status)


def exit_code(pid: int) -> int | None:
    """The exit code of `pid` if it was our child and has exited; None otherwise."""
    _reap_children()
    return _exit_codes.get(pid)


def terminate(pid: int, timeout: float = 10.0) -> list[int]:
    """SIGTERM a process group leader, wait up to `timeout`, then SIGKILL its whole group.

    Safe to call twice; returns any process of the group still alive at the end.
    """
    send(pid, signal.SIGTERM)
    if not wait_gone([pid], timeout):
        return []
    return kill_tree([info.pid for info in group_members(pid)] or [pid])


def kill_tree(pids: Iterable[int], timeout: float = 5.0) -> list[int]:
    """SIGKILL each pid; return any still alive after `timeout`."""
    targets = list(pids)
    for pid in targets:
        send(pid, signal.SIGKILL)
    return wait_gone(targets, timeout)


def listener_of(port: int, host: str = "") -> tuple[int, str] | None:
    """(pid, command) of the process listening on TCP `port`, pid 0 if unknown; None if free."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                next(handle)
                for line in handle:
                    parts = line.split()
                    local, state, inode = parts[1], parts[3], parts[9]
                    if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                        inodes.add(inode)
        except OSError:
            continue
    if not inodes:
        return None
    for info in all_processes():
        try:
            fds = os.listdir(f"/proc/{info.pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{info.pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:[") and target[8:-1] in inodes:
                return info.pid, info.command
    return 0, "another user's process"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def boot_id() -> str:
    """This boot of this machine; pids recorded under another boot id mean nothing here."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as handle:
            return handle.read().strip()
    except OSError:
        return "unknown"


def service_main(serve: Callable[[], None], *, quiet: Iterable[str] = ()) -> int:
    """Run a supervised service's main loop; returns its exit status.

    Logs go to stderr (the service's log file); a StackError ends it with its
    message and status 2 for a configuration problem, 1 otherwise.
    """
    from .errors import ConfigError

    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        serve()
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    return 0
