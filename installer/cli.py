"""The command line: parse, call the Python API, render. Nothing else."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from . import api, logfiles
from .errors import StackError
from .output import Printer
from .procs import tail
from .settings import SETTINGS


def _settings_parser() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("settings (flag > environment variable > default)")
    for setting in SETTINGS:
        if not setting.on_command_line:
            continue
        flag = "--" + setting.name.replace("_", "-")
        if setting.switch:
            group.add_argument(flag, dest=setting.name, action="store_const", const=True, default=None,
                               help=f"{setting.help} [{setting.env}]")
        else:
            group.add_argument(flag, dest=setting.name, default=None, metavar=setting.env,
                               help=f"{setting.help} [{setting.env}]")
    parent.add_argument("--debug", action="store_true", help="show debug logging and tracebacks")
    return parent


def command_name() -> str:
    """This program as the user invoked it, for the commands its messages suggest."""
    launched = Path(sys.argv[0])
    if launched.name == "mfstack":
        return "mfstack"
    if launched.name == "__main__.py" and launched.parent.name == "mfstack":
        return "python -m mfstack"
    return "python -m installer"


def build_parser() -> argparse.ArgumentParser:
    common = _settings_parser()
    parser = argparse.ArgumentParser(prog=command_name(),
                                     description="A stateful Metaflow service and UI on a disposable machine.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    verbs.add_parser("up", parents=[common], help="start the stack (pulls images on first use)")
    down = verbs.add_parser("down", parents=[common], help="stop the stack cleanly")
    down.add_argument("--all", action="store_true", dest="all_",
                      help="also stop the local registry that scripts/offline_up.sh started")
    status = verbs.add_parser("status", parents=[common], help="show each service's state and the URLs")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    logs = verbs.add_parser("logs", parents=[common], help="show a service's log")
    logs.add_argument("service", nargs="?", help="one service (default: all)")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument("-n", "--lines", type=int, default=40, help="lines to show (default 40)")
    config = verbs.add_parser("config", parents=[common], help="show every setting and where its value comes from")
    config.add_argument("--clear", action="store_true",
                        help="forget the settings `up` saved (stack down), so defaults apply again")
    verbs.add_parser("snapshot", parents=[common], help="take a snapshot now and publish it")
    restore = verbs.add_parser("restore", parents=[common], help="restore the newest good snapshot (stack down)")
    restore.add_argument("--force", action="store_true",
                         help="move a non-empty data folder aside (to <PGDATA_DIR>.replaced-<time>) first")
    verbs.add_parser("url", parents=[common], help="print the connection string (URL and access token)")
    verbs.add_parser("rotate-token", parents=[common], help="replace the access token (old links stop working)")
    connect = verbs.add_parser("connect", help="point this machine's Metaflow client at a stack",
                               description="Check a stack and write a Metaflow profile for it. Give the "
                                           "connection string that `up` or `url` prints, or --url and --token.")
    connect.add_argument("connection", nargs="?", help="connection string: https://<host>/?token=<token>")
    connect.add_argument("--url", help="the stack's URL (with --token)")
    connect.add_argument("--token", help="the stack's access token (with --url)")
    connect.add_argument("--profile", help="write ~/.metaflowconfig/config_<profile>.json (default: config.json)")
    connect.add_argument("--root", help="read connection.json from this MF_ROOT (a shared Drive folder)")
    connect.add_argument("--timeout", type=float, default=10.0, help="seconds for each check (default 10)")
    connect.add_argument("--debug", action="store_true", help="show debug logging and tracebacks")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    flags = {s.name: getattr(args, s.name) for s in SETTINGS if s.name in vars(args)}
    printer = Printer()
    try:
        return _dispatch(args, flags, printer)
    except StackError as exc:
        if args.debug:
            logging.exception("failed")
        printer.error(exc)
        return 1
    except KeyboardInterrupt:
        printer.line("interrupted")
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _dispatch(args: argparse.Namespace, flags: dict, printer: Printer) -> int:
    if args.verb == "up":
        began = time.monotonic()
        status = api.up(progress=printer.event, **flags)
        if not status.already_running:
            printer.line(f"stack up in {time.monotonic() - began:.1f} s")
        printer.status(status)
        if api.settings(**flags).no_auth:
            printer.warning("access control is OFF (--no-auth): anyone who reaches port "
                            f"{api.settings(**flags).port} can read and write this stack's runs")
        printer.line(f"connection string: {api.connection(**flags)}")
        return 0
    if args.verb == "down":
        began = time.monotonic()
        stopped = api.down(progress=printer.event, **flags)
        printer.line(f"stopped {len(stopped)} service(s) in {time.monotonic() - began:.1f} s"
                     if stopped else "nothing was running")
        if args.all_:
            answer = api.local_registry("stop", **flags)
            if answer:
                printer.line(f"local registry: {answer}")
        elif (api.local_registry("status", **flags) or "").startswith("running"):
            printer.line(f"the local registry {api.settings(**flags).registry} (started by this project's "
                         f"scripts) keeps running; `{command_name()} down --all` stops it too")
        return 0
    if args.verb == "status":
        status = api.status(**flags)
        if args.json:
            printer.json(status.to_dict())
        else:
            printer.status(status)
        return 0 if status.running else 3
    if args.verb == "logs":
        return _logs(args, flags, printer)
    if args.verb == "snapshot":
        generation = api.snapshot(**flags)
        printer.line(f"published snapshot {generation.id}: {generation.files} files, "
                     f"{generation.uploaded / 1e6:.1f} MB written, {generation.duration_s:.1f} s")
        return 0
    if args.verb == "restore":
        report = api.restore(force=args.force, **flags)
        printer.restore(report)
        return 0
    if args.verb == "url":
        printer.line(api.connection(**flags))
        return 0
    if args.verb == "rotate-token":
        printer.line("new access token; previous links and cookies no longer work. Connection string:")
        printer.line(api.rotate_token(**flags))
        return 0
    if args.verb == "connect":
        result = api.connect(args.connection, url=args.url, token=args.token, profile=args.profile,
                             root=args.root, timeout=args.timeout, set_env=False)
        for line in result.lines():
            printer.line(line)
        return 0
    if args.verb == "config":
        if args.clear:
            forgotten = api.clear_settings(**flags)
            printer.line("forgot the saved settings: " + ", ".join(f"{k}={v}" for k, v in forgotten.items())
                         if forgotten else "no settings were saved")
            return 0
        for name, value, source in api.config(**flags):
            printer.line(f"{name:<15} {value:<60} ({source})")
        return 0
    raise AssertionError(args.verb)


def _logs(args: argparse.Namespace, flags: dict, printer: Printer) -> int:
    paths = api.log_files(args.service, **flags)
    for name, path in paths.items():
        if len(paths) > 1:
            printer.line(f"==> {name} ({path}) <==")
        text = tail(path, args.lines)
        if text:
            printer.line(text)
    if args.follow:
        _follow(paths, printer)
    return 0


def _follow(paths: dict, printer: Printer) -> None:
    handles = {}
    for name, path in paths.items():
        handle = open(path, errors="replace") if path.exists() else None
        if handle:
            handle.seek(0, os.SEEK_END)
        handles[name] = handle
    prefix = len(paths) > 1
    last: dict[str, str] = {}
    while True:
        quiet = True
        for name, handle in handles.items():
            if handle is None:
                continue
            if os.fstat(handle.fileno()).st_size < handle.tell():
                # Rotated: the part already copied was cut from the start (installer/logfiles.py); its
                # recent part is in <log>.1. Go on after the last line shown.
                time.sleep(0.2)  # the rotation writes where the output goes on right after the cut
                resume = logfiles.resume_after_rotation(paths[name])
                handle.seek(resume[1] if resume else 0)
                text = (resume[0].decode("utf-8", "replace") if resume else "") + handle.read()
                lines = text.splitlines(keepends=True)
                if last.get(name) in lines:
                    lines = lines[len(lines) - lines[::-1].index(last[name]):]
            else:
                lines = handle.readlines()
            for line in lines:
                quiet = False
                last[name] = line
                printer.line(f"{name}: {line.rstrip()}" if prefix else line.rstrip())
        if quiet:
            time.sleep(0.3)


if __name__ == "__main__":
    sys.exit(main())
