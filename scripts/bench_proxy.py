"""Benchmark: the reverse proxy's cost on the metadata API of the real stack, measured against going direct.

Starts the real stack (`installer.up`, the production images from the local registry, free ports),
records one small flow so the API has data, then measures in the same run:

  - throughput: N requests of GET /ping (cheap: shows the proxy's own cost) and N/6 of
    GET /flows/{flow}/runs (a real listing) at concurrency C, direct (the metadata service's
    port) vs proxy (`/service/...` with the token), interleaved rounds, median round reported;
  - the proxy's CPU per request: utime+stime of the proxy process (/proc/<pid>/stat) over the
    requests it served, per round, median reported;
  - latency: sequential requests (no queueing), median and p95, direct vs proxy;
  - a small flow's wall time (`python flow.py run`), median of 3, direct vs proxy.

Targets: proxy CPU per request <= 120 us on /ping; added median latency < 2 ms; a flow's wall
time through the proxy >= 0.95 of direct. The stack is always taken down at the end.

--baseline DIR adds, in the same run, a second proxy started from another source tree (for
example `git archive <commit> | tar -x -C DIR`) with the stack proxy's own arguments on another
port, measured interleaved with the others: before and after from one run, on the same load.

--paced-upstream 0,1,5 runs one more proxy of this tree (and, with --baseline, one of that tree,
interleaved) against a stand-in upstream that answers /ping after each fixed delay: the proxy's CPU
per request when only its upstream's pace changes (a slower upstream means fewer events per wake-up
of the proxy's loop), and the ratio to the baseline at the same pace. --floor adds four floors, on
the real service's /ping and on each stand-in, none fit to serve anything: a byte pipe; a lean
relay (this tree's upstream client and path check on a bare asyncio protocol, no aiohttp server,
no access log); the same relay behind aiohttp's low-level server (aiohttp's request layer without
the proxy's admission, header filtering, connection guards or access log); and this tree's whole
request handler behind a bare request layer (what a request layer of the proxy's own would save).

--profile runs one more proxy of this tree under cProfile (CPU time, not wall time) for a load of
/service/ping and of /healthz, and prints where its CPU per request goes: the event loop and socket
calls, aiohttp's server (parser, request and response objects), routing, auth, header handling,
the upstream client, the access log.

    python scripts/bench_proxy.py [--requests 3000] [--concurrency 16] [--flow-runs 3]
                                  [--baseline DIR] [--profile] [--paced-upstream 0,1,5] [--floor]
                                  [--registry http://127.0.0.1:5000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp

import installer
from tests.test_proxy import FLOW

SHARED_UDOCKER_DIR = "/var/tmp/mfstack-test-udocker"  # the images the tests pulled already
SETTLE_S = 5.0  # after `up`, before the first measurement


async def _load(url: str, headers: dict[str, str], total: int, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        remaining = iter(range(total))

        async def worker() -> None:
            for _ in remaining:
                began = time.perf_counter()
                async with session.get(url, headers=headers) as response:
                    await response.read()
                    if response.status != 200:
                        raise SystemExit(f"{url} answered {response.status}")
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return total / elapsed, latencies


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _cpu_s(pid: int) -> float:
    """CPU time the process has used, all its threads: from the scheduler in ns where the kernel keeps it
    (clock ticks of 10 ms would quantise a round's figure by a few percent), else in clock ticks."""
    try:
        return sum(int((task / "schedstat").read_text().split()[0])
                   for task in Path(f"/proc/{pid}/task").iterdir()) / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Target:
    label: str
    url: str                      # base: the metadata service itself, or a proxy's /service
    headers: dict[str, str]
    pid: int | None = None        # a proxy's, for its CPU time
    rates: list[float] = field(default_factory=list)
    cpu_us: list[float] = field(default_factory=list)
    conc: list[float] = field(default_factory=list)
    seq: list[float] = field(default_factory=list)
    flows: list[float] = field(default_factory=list)


def _compare(targets: list[Target], path: str, total: int, args: argparse.Namespace) -> list[Target]:
    """Interleaved rounds of the same load on every target (the metadata service direct, the proxies)."""
    measured = [Target(t.label, t.url, t.headers, t.pid) for t in targets]
    for target in measured:  # warm every path up
        asyncio.run(_load(target.url + path, target.headers, min(total, 300), args.concurrency))
    for _ in range(args.rounds):
        for target in measured:
            cpu_before = _cpu_s(target.pid) if target.pid else 0.0
            rate, target.conc = asyncio.run(_load(target.url + path, target.headers, total, args.concurrency))
            target.rates.append(rate)
            if target.pid:
                target.cpu_us.append((_cpu_s(target.pid) - cpu_before) / total * 1e6)
    for target in measured:
        target.seq = asyncio.run(_load(target.url + path, target.headers, args.sequential, 1))[1]
    return measured


def _extra_proxy(stack_pid: int, tree: Path, workdir: Path, label: str,
                 wrap: list[str] | None = None, overrides: dict[str, str] | None = None) -> tuple[subprocess.Popen, int]:
    """Another proxy with the stack proxy's own arguments (but `overrides`) on a free port, its code from `tree`."""
    argv = Path(f"/proc/{stack_pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    args = [a.decode() for a in argv[3:]]  # after "python -m installer.proxy"
    port = _free_port()
    for option, value in {**(overrides or {}), "--listen-port": str(port)}.items():
        args[args.index(option) + 1] = value
    env = {**os.environ, "PYTHONPATH": str(tree)}
    log_path = workdir / f"{label}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    command = [sys.executable, *(wrap or ["-m", "installer.proxy"]), *args]
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=log, cwd=str(tree))
    return _listening(proc, port, label, log_path)


def _listening(proc: subprocess.Popen, port: int, label: str, log: Path) -> tuple[subprocess.Popen, int]:
    """(proc, port) once the proxy `proc` accepts connections on `port`; exits with its log if it dies."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the {label} proxy died while starting:\n{log.read_text()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"the {label} proxy did not listen within 30 s")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# Where a function's CPU time is counted, by its file (first match wins); see _breakdown().
_COMPONENTS = (
    ("access log", ("installer/edge/logbuffer.py", "installer/edge/redact.py", "/logging/", "server.py:log",
                    "web_protocol.py:log_access")),
    ("upstream client", ("installer/edge/client.py", "forward.py:forward", "forward.py:_relay_response",
                         "aiohttp/client", "aiohttp/connector", "aiohttp/streams")),
    ("header handling", ("forward.py:request_headers", "forward.py:_response_headers", "forward.py:_connection",
                         "forward.py:_strip", "multidict")),
    ("auth", ("installer/edge/access.py", "installer/secrets.py", "hmac", "posix.stat", "compare_digest",
              "server.py:authenticate")),
    ("routing and checks", ("installer/edge/", "urllib/parse")),
    ("aiohttp server", ("aiohttp/", "yarl", "http/cookies", "email/")),
    ("event loop and socket calls", ("asyncio/", "uvloop", "<method", "<built-in", "selectors", "socket")),
    ("other (start-up, signals, argument parsing)", ("",)),
)


def _component(filename: str, name: str) -> str:
    key = f"{filename}:{name}"
    for label, needles in _COMPONENTS:
        for needle in needles:
            if ":" in needle:
                file_part, func = needle.split(":", 1)
                if filename.endswith(file_part) and name.split(".")[-1] == func.split(".")[-1]:
                    return label
            elif needle in key:
                return label
    return _COMPONENTS[-1][0]


_SOCKET_CALLS = ("uvloop", "socket", "select", "epoll")


def _breakdown(stats_file: Path, requests: int) -> dict[str, float]:
    """CPU us per request by component, from a cProfile dump. Built-in functions (str.lower, len, ...)
    count for the Python functions that called them; socket and loop calls for the event loop."""
    import pstats

    stats = pstats.Stats(str(stats_file)).stats  # type: ignore[attr-defined]
    totals: dict[str, float] = {}

    def add(label: str, seconds: float) -> None:
        totals[label] = totals.get(label, 0.0) + seconds

    for (filename, _line, name), (_cc, _nc, tottime, _ct, callers) in stats.items():
        if filename == "~" and not any(part in name for part in _SOCKET_CALLS) and callers:
            spent = sum(value[2] for value in callers.values()) or 1.0
            for (c_file, _c_line, c_name), value in callers.items():
                add(_component(c_file, c_name), tottime * value[2] / spent)
        else:
            add(_component(filename, name), tottime)
    return {label: seconds / requests * 1e6 for label, seconds in totals.items()}


_PROFILE_WRAPPER = """
import cProfile, sys, time
out = sys.argv.pop(1)
from installer import proxy  # imported before profiling starts: start-up is not what is measured
profiler = cProfile.Profile(time.process_time)
profiler.enable()
try:
    proxy.main(sys.argv[1:])
finally:
    profiler.disable()
    profiler.dump_stats(out)
"""


def _profile(stack_pid: int, workdir: Path, key: dict[str, str], args: argparse.Namespace) -> None:
    print("profile (cProfile with CPU time; its own overhead inflates every figure, compare shares):")
    for path, headers in (("/service/ping", key), ("/healthz", {})):
        out = workdir / "proxy.prof"
        proc, port = _extra_proxy(stack_pid, REPO, workdir, "profiled", ["-c", _PROFILE_WRAPPER, str(out)])
        try:
            url = f"http://127.0.0.1:{port}{path}"
            asyncio.run(_load(url, headers, 300, args.concurrency))
            asyncio.run(_load(url, headers, args.requests, args.concurrency))
        finally:
            _stop(proc)
        parts = _breakdown(out, 300 + args.requests)
        total = sum(parts.values())
        shown = "   ".join(f"{label} {us:.0f} us ({us / total:.0%})"
                           for label, us in sorted(parts.items(), key=lambda kv: -kv[1]))
        print(f"  GET {path}: {total:.0f} us per request under the profiler: {shown}")


# A stand-in upstream that answers every request as the metadata service answers /ping, after a
# fixed delay: what the proxy's CPU per request is when only its upstream's pace changes.
_PACED_UPSTREAM = """
import asyncio, sys
delay, port = float(sys.argv[1]), int(sys.argv[2])
ANSWER = (b"HTTP/1.1 200 OK\\r\\nContent-Type: text/plain; charset=utf-8\\r\\nContent-Length: 4\\r\\n"
          b"Date: Wed, 02 Dec 2026 00:00:00 GMT\\r\\nServer: paced-stand-in\\r\\n\\r\\npong")
class Paced(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\\r\\n\\r\\n" in self.buffer:
            self.buffer = self.buffer.split(b"\\r\\n\\r\\n", 1)[1]
            asyncio.get_running_loop().call_later(delay, self.transport.write, ANSWER)
async def main():
    server = await asyncio.get_running_loop().create_server(Paced, "127.0.0.1", port)
    await server.serve_forever()
asyncio.run(main())
"""


# Floors for --floor, each on the same stand-in upstream as the proxies (none is fit to serve anything):
# "pipe" relays bytes as they come, one upstream connection per client connection, no parsing or checks;
# "lean" admits with an exact x-api-key match and this tree's path check, and relays with this tree's
# upstream client, on a bare asyncio protocol: what the proxy would cost without aiohttp's server,
# its request and response objects and the access log; "aiohttp" is the lean relay behind aiohttp's
# low-level server, with its request and response objects: aiohttp's request layer without the
# proxy's admission, header filtering, connection guards and access log.
_PIPE_FLOOR = """
import asyncio, sys, uvloop
listen, upstream = int(sys.argv[1]), int(sys.argv[2])
class Back(asyncio.Protocol):
    def __init__(self, front): self.front = front
    def data_received(self, data): self.front.transport.write(data)
class Front(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.back, self.queued = transport, None, []
        asyncio.ensure_future(self.open())
    async def open(self):
        transport, _ = await asyncio.get_running_loop().create_connection(lambda: Back(self), "127.0.0.1", upstream)
        self.back = transport
        for data in self.queued: transport.write(data)
    def data_received(self, data):
        if self.back is None: self.queued.append(data)
        else: self.back.write(data)
async def main():
    server = await asyncio.get_running_loop().create_server(Front, "127.0.0.1", listen)
    await server.serve_forever()
uvloop.run(main())
"""
_LEAN_FLOOR = """
import asyncio, hmac, os, sys, uvloop
from installer.edge.client import Pool
from installer.edge.routes import path_problem
listen, upstream = int(sys.argv[1]), int(sys.argv[2])
KEY, DROP = os.environ["BENCH_KEY"].encode(), {b"connection", b"keep-alive", b"host", b"x-api-key"}
class Front(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport, self.buffer, self.heads = transport, bytearray(), asyncio.Queue()
        self.task = asyncio.ensure_future(self.serve())
    def data_received(self, data):
        self.buffer += data
        while (end := self.buffer.find(b"\\r\\n\\r\\n")) >= 0:
            self.heads.put_nowait(bytes(self.buffer[:end]))
            del self.buffer[:end + 4]
    def connection_lost(self, exc): self.task.cancel()
    async def serve(self):
        while True:
            request_line, *lines = (await self.heads.get()).split(b"\\r\\n")
            method, target, _version = request_line.decode().split(" ")
            headers, key = [], b""
            for line in lines:
                name, _, value = line.partition(b":")
                value = value.strip()
                if name.lower() == b"x-api-key": key = value
                elif name.lower() not in DROP: headers.append((name.decode(), value.decode()))
            if not hmac.compare_digest(key, KEY) or path_problem(target, api=True):
                self.transport.write(b"HTTP/1.1 401 Unauthorized\\r\\nContent-Length: 0\\r\\n\\r\\n")
                continue
            headers.append(("X-Forwarded-For", "127.0.0.1"))
            answer = await POOL.request(method, target[len("/service"):], headers)
            try:
                body = answer.body or b""
                head = [f"HTTP/1.1 {answer.status} {answer.reason}"]
                head += [f"{n}: {v}" for n, v in answer.headers if n.lower() not in ("server", "connection", "content-length")]
                head += ["Server: lean", f"Content-Length: {len(body)}", "", ""]
                self.transport.write("\\r\\n".join(head).encode() + body)
            finally:
                answer.finish()
async def main():
    global POOL
    POOL = Pool("127.0.0.1", upstream)
    server = await asyncio.get_running_loop().create_server(Front, "127.0.0.1", listen)
    await server.serve_forever()
uvloop.run(main())
"""


_AIOHTTP_FLOOR = """
import asyncio, hmac, os, sys, uvloop
from aiohttp import web, web_server
from installer.edge.client import Pool
from installer.edge.routes import path_problem
listen, upstream = int(sys.argv[1]), int(sys.argv[2])
KEY, DROP = os.environ["BENCH_KEY"].encode(), {"connection", "keep-alive", "host", "x-api-key"}
async def handle(request):
    if not hmac.compare_digest(request.headers.get("x-api-key", "").encode(), KEY) \\
            or path_problem(request.raw_path, api=True):
        return web.Response(status=401)
    headers = [(n, v) for n, v in request.headers.items() if n.lower() not in DROP]
    headers.append(("X-Forwarded-For", "127.0.0.1"))
    answer = await POOL.request(request.method, request.raw_path[len("/service"):], headers)
    try:
        kept = [(n, v) for n, v in answer.headers if n.lower() not in ("server", "connection", "content-length")]
        return web.Response(status=answer.status, reason=answer.reason, headers=kept, body=answer.body)
    finally:
        answer.finish()
async def main():
    global POOL
    POOL = Pool("127.0.0.1", upstream)
    runner = web.ServerRunner(web_server.Server(handle), handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", listen).start()
    await asyncio.Event().wait()
uvloop.run(main())
"""


# "edge" runs this tree's whole request handler (Edge.handle: admission, header filtering, the relay, the
# response objects, the access log) behind a bare request layer: aiohttp's C parser on a plain protocol,
# none of aiohttp's request loop, request objects or response writing. What a request layer of the
# proxy's own would save, with everything above it unchanged. GET without a body only.
_EDGE_FLOOR = """
import asyncio, os, sys, uvloop
from collections import deque
from pathlib import Path
from aiohttp.base_protocol import BaseProtocol
from aiohttp.http_parser import HttpRequestParser
from installer.edge import server
from installer.edge.config import ProxyConfig
from installer.procs import service_main
from installer.secrets import write_secret
listen, upstream = int(sys.argv[1]), int(sys.argv[2])
class Request:
    __slots__ = ("method", "raw_path", "headers", "version", "remote", "host", "content_length", "content")
    scheme, body_exists, query, cookies = "http", False, {}, {}
    def __init__(self, message, remote):
        self.method, self.raw_path, self.headers = message.method, message.path, message.headers
        self.version, self.remote, self.host = message.version, remote, message.headers.get("Host", "")
        self.content_length, self.content = None, None
class Connection(BaseProtocol):
    def connection_made(self, transport):
        super().connection_made(transport)
        self.parser = HttpRequestParser(self, self._loop, 2 ** 16, max_line_size=16384, max_field_size=16384)
        self.remote, self.queue, self.waiter = transport.get_extra_info("peername")[0], deque(), None
        self.task = self._loop.create_task(self.serve())
    def connection_lost(self, exc):
        super().connection_lost(exc)
        self.task.cancel()
    def data_received(self, data):
        messages, _, _ = self.parser.feed_data(data)
        self.queue.extend(messages)
        if messages and self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)
    async def serve(self):
        while True:
            if not self.queue:
                self.waiter = self._loop.create_future()
                await self.waiter
            message, _ = self.queue.popleft()
            began = self._loop.time()
            request = Request(message, self.remote)
            response = await EDGE.handle(request)
            body = response.body or b""
            head = [f"HTTP/1.1 {response.status} {response.reason}"]
            head += [f"{k}: {v}" for k, v in response.headers.items() if k.lower() != "content-length"]
            head += [f"Content-Length: {len(body)}", "", ""]
            self.transport.write("\\r\\n".join(head).encode() + body)
            ACCESS.log(request, response, self._loop.time() - began)
async def main():
    global EDGE, ACCESS
    folder = Path(os.environ["BENCH_DIR"]) / "edge-floor"
    folder.mkdir(exist_ok=True)  # one per delay, the same folder
    (folder / "index.html").write_text("ui")
    write_secret(folder / "token", os.environ["BENCH_KEY"])
    EDGE = server.build_app(ProxyConfig("127.0.0.1", listen, f"http://127.0.0.1:{upstream}", "http://127.0.0.1:9",
                                        folder, folder / "token"))
    server.configure_logging(EDGE)
    ACCESS = server._AccessLogger(server.access_log, "")
    await EDGE.start()
    loop = asyncio.get_running_loop()
    await (await loop.create_server(lambda: Connection(loop), "127.0.0.1", listen)).serve_forever()
service_main(lambda: uvloop.run(main()))
"""


def _floor(script: str, label: str, upstream_port: int, token: str, workdir: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    log_path = workdir / f"{label}.log"
    log = open(log_path, "w")  # noqa: SIM115 - closed with the process
    proc = subprocess.Popen([sys.executable, "-c", script, str(port), str(upstream_port)], cwd=str(REPO),
                            env={**os.environ, "PYTHONPATH": str(REPO), "BENCH_KEY": token, "BENCH_DIR": str(workdir)},
                            stdout=log, stderr=log)
    return _listening(proc, port, label, log_path)


_FLOORS = (("pipe", _PIPE_FLOOR), ("lean", _LEAN_FLOOR), ("aiohttp", _AIOHTTP_FLOOR), ("edge", _EDGE_FLOOR))


def _floors(upstream_port: int, key: dict[str, str], workdir: Path, procs: list[subprocess.Popen]) -> list[Target]:
    """Every floor started against `upstream_port` (appended to `procs`, for the caller to stop)."""
    targets = []
    for label, script in _FLOORS:
        proc, proxy_port = _floor(script, label, upstream_port, key["x-api-key"], workdir)
        procs.append(proc)
        prefix = "" if label == "pipe" else "/service"  # a byte pipe sends the path on as it is
        targets.append(Target(label, f"http://127.0.0.1:{proxy_port}{prefix}", key, proc.pid))
    return targets


def _paced(stack_pid: int, workdir: Path, key: dict[str, str], delays_ms: list[float],
           args: argparse.Namespace) -> None:
    print("proxy CPU per request against a stand-in upstream answering /ping after a fixed delay (not the real "
          "service; only the upstream's pace changes"
          f"{'; the baseline proxy against the same stand-in, interleaved' if args.baseline else ''}):")
    trees = [("proxy", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
    for delay in delays_ms:
        port = _free_port()
        upstream = subprocess.Popen([sys.executable, "-c", _PACED_UPSTREAM, str(delay / 1000), str(port)])
        procs: list[subprocess.Popen] = []
        try:
            targets = []
            for label, tree in trees:
                proc, proxy_port = _extra_proxy(stack_pid, tree, workdir, f"paced-{label}",
                                                overrides={"--metadata-url": f"http://127.0.0.1:{port}"})
                procs.append(proc)
                targets.append(Target(label, f"http://127.0.0.1:{proxy_port}/service", key, proc.pid))
            if args.floor:
                targets += _floors(port, key, workdir, procs)
            measured = _compare(targets, "/ping", args.requests, args)
            cpu = [statistics.median(target.cpu_us) for target in measured]
            for target, median in zip(measured, cpu):
                print(f"  upstream delay {delay:g} ms, {target.label:8}: CPU per request median {median:.0f} us"
                      f"   rounds {[round(x) for x in target.cpu_us]}   throughput "
                      f"{statistics.median(target.rates):.0f} req/s")
            if args.baseline:
                print(f"  upstream delay {delay:g} ms: proxy vs baseline CPU per request {cpu[0] / cpu[1]:.2f}x")
        finally:
            for proc in procs:
                _stop(proc)
            upstream.kill()
            upstream.wait()


def _flow_env(workdir: Path, service_url: str, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("METAFLOW_")}
    env.update({"METAFLOW_DEFAULT_METADATA": "service", "METAFLOW_SERVICE_URL": service_url,
                "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(workdir / "datastore"), "HOME": str(workdir),
                "USERNAME": "bench"})
    if token:
        env["METAFLOW_SERVICE_AUTH_KEY"] = token
    return env


def _run_flow(workdir: Path, env: dict[str, str]) -> tuple[float, str]:
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "flow.py", "run"], cwd=workdir, env=env, capture_output=True, text=True,
                          check=False)
    elapsed = time.perf_counter() - began
    if done.returncode != 0:
        raise SystemExit(f"flow failed:\n{done.stdout}\n{done.stderr}")
    run_id = re.search(r"run-id (\w+)", done.stdout + done.stderr).group(1)
    return elapsed, run_id


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stack_flags(root: Path, registry: str) -> dict[str, str]:
    return {"root": str(root), "udocker_dir": SHARED_UDOCKER_DIR, "registry": registry,
            "port": str(_free_port()), "metadata_port": str(_free_port()), "ui_port": str(_free_port()),
            "db_port": str(_free_port())}


def _proxy_pid(flags: dict[str, str]) -> int:
    for service in installer.status(**flags).services:
        if service.name == "proxy" and service.pid:
            return service.pid
    raise SystemExit("the stack reports no running proxy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--flow-runs", type=int, default=3)
    parser.add_argument("--baseline", type=Path, help="source tree of a proxy to compare with, in the same run")
    parser.add_argument("--profile", action="store_true", help="also print where the proxy's CPU goes")
    parser.add_argument("--paced-upstream", metavar="MS,MS", type=lambda text: [float(x) for x in text.split(",")],
                        help="also measure the proxy against a stand-in upstream answering after these delays")
    parser.add_argument("--floor", action="store_true",
                        help="also measure a byte pipe, a lean relay, that relay behind aiohttp's server, and the "
                             "proxy's handler behind a bare request layer (on the real /ping, and on the stand-in "
                             "with --paced-upstream)")
    parser.add_argument("--registry", default=os.environ.get("MFSTACK_TEST_REGISTRY", "http://127.0.0.1:5000"))
    args = parser.parse_args()
    if args.baseline is not None and not (args.baseline / "installer" / "proxy.py").is_file():
        raise SystemExit(f"--baseline {args.baseline}: no installer/proxy.py there (a source tree of this project)")

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        flags = _stack_flags(workdir / "root", args.registry)
        baseline = None
        try:
            began = time.perf_counter()
            # The UI backend too, and then a pause: its start-up (several Pythons importing the Metaflow
            # client) would otherwise take the CPU from the first rounds and inflate every figure.
            status = installer.up(wait_ui=True, **flags)
            if not status.running:
                raise SystemExit(f"the stack did not start: {status}")
            print(f"stack up in {time.perf_counter() - began:.1f} s (ports: proxy {flags['port']}, "
                  f"metadata {flags['metadata_port']})")
            time.sleep(SETTLE_S)
            token = installer.token(**flags)
            if not token:
                raise SystemExit("the stack has no access token")
            pid = _proxy_pid(flags)
            (workdir / "flow.py").write_text(FLOW)
            key = {"x-api-key": token}
            targets = [Target("direct", f"http://127.0.0.1:{flags['metadata_port']}", {}),
                       Target("proxy", f"http://127.0.0.1:{flags['port']}/service", key, pid)]
            if args.baseline is not None:
                baseline, port = _extra_proxy(pid, args.baseline.resolve(), workdir, "baseline")
                targets.append(Target("baseline", f"http://127.0.0.1:{port}/service", key, baseline.pid))
            _run_flow(workdir, _flow_env(workdir, targets[0].url, None))  # data for the API to return
            runs_path = "/flows/ProxyTestFlow/runs"

            results = {}
            floors: list[subprocess.Popen] = []
            try:
                # The floors on /ping only: the lean ones relay a body only when it comes whole with its
                # head, which a run listing's may not.
                ping_targets = targets + (_floors(flags["metadata_port"], key, workdir, floors) if args.floor else [])
                results["/ping"] = _compare(ping_targets, "/ping", args.requests, args)
            finally:
                for proc in floors:
                    _stop(proc)
            results[runs_path] = _compare(targets, runs_path, max(100, args.requests // 6), args)
            for _ in range(args.flow_runs):
                for target in targets:
                    env = _flow_env(workdir, target.url, target.headers.get("x-api-key"))
                    target.flows.append(_run_flow(workdir, env)[0])
            if args.profile:
                _profile(pid, workdir, key, args)
            if args.paced_upstream:
                _paced(pid, workdir, key, args.paced_upstream, args)
        finally:
            if baseline is not None:
                _stop(baseline)
            installer.down(**flags)

    ms = 1000.0
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for path, measured in results.items():
        direct = measured[0]
        d_rate, d_med = statistics.median(direct.rates), statistics.median(direct.seq) * ms
        print(f"metadata API GET {path}: {args.rounds} rounds of "
              f"{args.requests if path == '/ping' else max(100, args.requests // 6)} requests, "
              f"concurrency {args.concurrency}")
        print(f"  direct   throughput {d_rate:7.0f} req/s   latency under load median "
              f"{statistics.median(direct.conc) * ms:6.2f} ms p95 {_pct(direct.conc, 0.95) * ms:6.2f} ms   "
              f"sequential median {d_med:6.2f} ms p95 {_pct(direct.seq, 0.95) * ms:6.2f} ms")
        for target in measured[1:]:
            rate, med = statistics.median(target.rates), statistics.median(target.seq) * ms
            cpu_us = statistics.median(target.cpu_us)
            print(f"  {target.label:8} throughput {rate:7.0f} req/s (ratio {rate / d_rate:.3f} of direct)   "
                  f"rounds {[round(x) for x in target.rates]}")
            goal = " (target <= 120 us)" if path == "/ping" and target.label == "proxy" else ""
            print(f"           CPU per request: median {cpu_us:.0f} us{goal}   "
                  f"rounds {[round(x) for x in target.cpu_us]}")
            print(f"           latency under load median {statistics.median(target.conc) * ms:6.2f} ms"
                  f" p95 {_pct(target.conc, 0.95) * ms:6.2f} ms   sequential median {med:6.2f} ms"
                  f" p95 {_pct(target.seq, 0.95) * ms:6.2f} ms   added median {med - d_med:+.2f} ms (target < 2 ms)")
        if args.baseline is not None:
            proxy, base = measured[1], measured[2]
            print(f"  proxy vs baseline, same run: CPU per request {statistics.median(proxy.cpu_us):.0f} vs "
                  f"{statistics.median(base.cpu_us):.0f} us "
                  f"({statistics.median(proxy.cpu_us) / statistics.median(base.cpu_us):.2f}x)")
    d_flow = statistics.median(targets[0].flows)
    for target in targets[1:]:
        flow = statistics.median(target.flows)
        print(f"small flow (3 steps) wall time, median of {args.flow_runs}: direct {d_flow:.2f} s   "
              f"{target.label} {flow:.2f} s   speed {d_flow / flow:.3f} of direct (target >= 0.95)")


if __name__ == "__main__":
    main()
