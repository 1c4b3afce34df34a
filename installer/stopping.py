"""Stopping one service the way that works for it, then proving that nothing of it is left."""

from __future__ import annotations

import signal
from pathlib import Path

from . import procs
from .errors import ServiceFailed
from .services import GUEST_TAG, Service, StopPolicy

STOP_TIMEOUT = 30.0


def leftovers(service: Service, processes: list[procs.ProcInfo] | None = None) -> list[procs.ProcInfo]:
    """Processes of a container service that outlived their proot (its pid is no longer recorded)."""
    return procs.with_environment(GUEST_TAG, service.guest_tag, processes) if service.guest_tag else []


def stop(service: Service, pid: int | None, pgdata: Path) -> None:
    """Stop one service the way that works for it, then prove nothing of it is left.

    With `pid` None: what is left of a service whose recorded process died (see `leftovers`).
    """
    table = procs.all_processes()
    tree = procs.descendants(pid, table) if pid is not None else []
    tree_pids = {p.pid for p in tree}
    inside = tree + [p for p in leftovers(service, table) if p.pid not in tree_pids and p.pid != pid]
    members = ([pid] if pid is not None else []) + [p.pid for p in inside]
    if not members:
        return
    if service.stop is StopPolicy.HOST_TERM:
        if pid is not None:
            procs.terminate(pid, STOP_TIMEOUT)
    elif service.stop is StopPolicy.POSTMASTER:
        postmaster = procs.pid_file_owner(pgdata / "postmaster.pid", "postgres")
        if postmaster is not None:
            procs.send(postmaster, signal.SIGINT)
            procs.wait_gone([postmaster], STOP_TIMEOUT)
    elif service.stop is StopPolicy.GUEST_TERM:
        guests = [p.pid for p in inside if service.guest_marker in p.command and not _is_runtime_process(p)]
        for guest in guests:
            procs.send(guest, signal.SIGTERM)
        procs.wait_gone(guests, STOP_TIMEOUT)
    elif service.stop is StopPolicy.GUEST_KILL:
        # It ignores SIGTERM; stop every guest first so no worker is re-spawned, then kill them.
        guests = [p.pid for p in inside if not _is_runtime_process(p)]
        for guest in guests:
            procs.send(guest, signal.SIGSTOP)
        procs.kill_tree(guests)
    # proot (and udocker, where it waits for proot) exits by itself once its guest is gone; give it a moment.
    left = procs.wait_gone(members, 5.0)
    if left:
        left = procs.kill_tree(left)
    # A service stopped while it was still starting may have forked after `members` was read
    # (proot, left to init when its parent went): its session group still names it.
    for _ in range(3 if pid is not None else 0):
        stray = [p.pid for p in procs.group_members(pid) if p.pid not in left]
        if not stray:
            break
        left += procs.kill_tree(stray)
    if left:
        raise ServiceFailed(f"could not stop the {service.title}: processes {left} are still running",
                            hint="stop them by hand (kill -9) and run `installer down` again")


def _is_runtime_process(info: procs.ProcInfo) -> bool:
    head = " ".join(info.cmdline[:2])
    return "udocker" in head or "proot" in (info.cmdline[0] if info.cmdline else "")
