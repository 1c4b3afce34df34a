"""Keeps the stack running after `up` has returned: restarts whatever dies.

    python -m installer.monitor --root MF_ROOT

Started by `up` as the last service and stopped first by `down`. It reads the
settings `up` saved under MF_ROOT (anew each round), checks every few seconds, and gives up on a
service that keeps dying (its log says why) rather than restarting it forever. A check reads the
recorded pids only; the rest of the stack's code is loaded the first time something needs restarting,
so that an idle monitor stays a small process.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import defaultdict, deque
from types import FrameType
from typing import TYPE_CHECKING

from . import logfiles, state, tunnel
from .errors import StackError
from .settings import Settings, resolve

if TYPE_CHECKING:
    from .stack import Event

CHECK_EVERY = 2.0
COPY_LOGS_EVERY = 3  # rounds: the logs' copies in MF_ROOT (Drive) are at most this many rounds behind
MAX_RESTARTS = 5
WINDOW = 600.0

log = logging.getLogger("installer.monitor")


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m installer.monitor", description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="the stack's MF_ROOT")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    signal.signal(signal.SIGTERM, _stop)
    history: dict[str, deque[float]] = defaultdict(deque)
    given_up: set[str] = set()

    def report(event: Event) -> None:
        log.info("%s: %s", event.step, event.message)

    log.info("watching the stack at %s", args.root)
    rounds = 0
    while True:
        time.sleep(CHECK_EVERY)
        rounds += 1
        try:
            # Read each time: `up` saves the settings only once everything, this monitor too, is up.
            settings = resolve({"root": args.root})
            _tend_logs(settings, only_large=rounds % COPY_LOGS_EVERY != 0)
            if not _something_died(settings, given_up):
                continue
            from . import stack

            restarted = stack.restart_dead(settings, report, skip=given_up)
        except StackError as exc:
            log.error("restart failed: %s", exc)
            continue
        now = time.monotonic()
        for name in restarted:
            times = history[name]
            times.append(now)
            while times and now - times[0] > WINDOW:
                times.popleft()
            if len(times) >= MAX_RESTARTS:
                given_up.add(name)
                log.error("%s died %d times in %d minutes: no more restarts; read %s",
                          name, len(times), WINDOW // 60, settings.log_path(name))


def _tend_logs(settings: Settings, only_large: bool) -> None:
    try:
        logfiles.tend(settings.live_logs_dir, settings.logs_dir, settings.log_max_mb, only_large=only_large)
    except OSError as exc:  # Drive unreachable for a while: the live logs keep everything until the next round
        log.warning("copying the logs to %s failed: %s", settings.logs_dir, exc)


def _something_died(settings: Settings, given_up: set[str]) -> bool:
    if state.dead(settings, skip=given_up | {"monitor"}):
        return True
    recorded_tunnel = tunnel.read_tunnel_state(settings) if settings.tunnel and "tunnel" not in given_up else None
    return recorded_tunnel is not None and not tunnel.tunnel_alive(recorded_tunnel)


if __name__ == "__main__":
    sys.exit(main())
