"""The one error type users see, and its few specialisations.

    StackError                 every failure the CLI or a notebook shows to a person
    ├── ChecksFailed           `up` found several problems before starting anything
    ├── ConfigError            a bad flag, environment variable or file
    ├── PortInUse              a port the stack needs is taken
    ├── ImageError             an image cannot be pulled or is missing
    ├── RuntimeUnavailable     udocker or its engine cannot run containers
    ├── ServiceFailed          a service died or never became healthy
    ├── StackBusy              another `up`/`down` holds the stack's lock
    ├── SnapshotError          taking, publishing or restoring a snapshot failed
    ├── TunnelError            the public tunnel could not be started or reached
    └── ConnectError           a remote notebook cannot reach or use the stack

Library code raises these with a message that says what happened and a hint that
says what to try next; only the CLI and the notebook panel turn them into output.
"""

from __future__ import annotations

from pathlib import Path


class StackError(Exception):
    """A failure with a message meant for a person, and what to do about it."""

    def __init__(self, message: str, *, hint: str | None = None, log: Path | None = None,
                 log_tail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.log = log
        self.log_tail = log_tail

    def __str__(self) -> str:
        parts = [self.message]
        if self.log_tail:
            parts.append(f"last lines of {self.log}:\n{self.log_tail}" if self.log else self.log_tail)
        elif self.log:
            parts.append(f"log: {self.log}")
        if self.hint:
            parts.append(f"hint: {self.hint}")
        return "\n".join(parts)


class ChecksFailed(StackError):
    """Several problems found at once, each with its own hint."""

    def __init__(self, problems: list[StackError]) -> None:
        lines = [f"{len(problems)} problems; nothing was started:"]
        for number, problem in enumerate(problems, 1):
            lines.append(f"  {number}. {problem.message}")
            if problem.log_tail:
                lines.extend(f"       {line}" for line in problem.log_tail.splitlines())
            if problem.hint:
                lines.append(f"     hint: {problem.hint}")
        super().__init__("\n".join(lines))
        self.problems = problems


class ConfigError(StackError):
    pass


class PortInUse(StackError):
    pass


class ImageError(StackError):
    pass


class RuntimeUnavailable(StackError):
    pass


class ServiceFailed(StackError):
    pass


class StackBusy(StackError):
    pass


class SnapshotError(StackError):
    pass


class TunnelError(StackError):
    pass


class ConnectError(StackError):
    pass
