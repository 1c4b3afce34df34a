"""Keeps the stack running after `up` has returned: restarts whatever dies.

    python -m installer.monitor --root MF_ROOT

Started by `up` as the last service and stopped first by `down`. It reads the
settings `up` saved under MF_ROOT (anew each round), checks every few seconds, and gives up on a
service that keeps dying (its log says why) rather than restarting it forever.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
from collections import defaultdict, deque
from types import FrameType

from . import stack
from .errors import StackError
from .settings import resolve

CHECK_EVERY = 2.0
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

    def report(event: stack.Event) -> None:
        log.info("%s: %s", event.step, event.message)

    log.info("watching the stack at %s", args.root)
    while True:
        time.sleep(CHECK_EVERY)
        try:
            # Read each time: `up` saves the settings only once everything, this monitor too, is up.
            settings = resolve({"root": args.root})
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


if __name__ == "__main__":
    sys.exit(main())
