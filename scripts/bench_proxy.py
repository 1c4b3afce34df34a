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

    python scripts/bench_proxy.py [--requests 3000] [--concurrency 16] [--flow-runs 3]
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp

import installer
from tests.test_proxy import FLOW

SHARED_UDOCKER_DIR = "/var/tmp/mfstack-test-udocker"  # the images the tests pulled already


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
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _compare(direct: str, proxied: str, key: dict[str, str], total: int, args: argparse.Namespace,
             proxy_pid: int) -> dict:
    """Interleaved rounds of the same load, direct and through the proxy."""
    asyncio.run(_load(direct, {}, min(total, 300), args.concurrency))  # warm both paths up
    asyncio.run(_load(proxied, key, min(total, 300), args.concurrency))
    result: dict = {"total": total, "direct_rates": [], "proxy_rates": [], "proxy_cpu_us": []}
    for _ in range(args.rounds):
        rate, result["direct_conc"] = asyncio.run(_load(direct, {}, total, args.concurrency))
        result["direct_rates"].append(rate)
        cpu_before = _cpu_s(proxy_pid)
        rate, result["proxy_conc"] = asyncio.run(_load(proxied, key, total, args.concurrency))
        result["proxy_cpu_us"].append((_cpu_s(proxy_pid) - cpu_before) / total * 1e6)
        result["proxy_rates"].append(rate)
    result["direct_lat"] = asyncio.run(_load(direct, {}, args.sequential, 1))[1]
    result["proxy_lat"] = asyncio.run(_load(proxied, key, args.sequential, 1))[1]
    return result


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
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--flow-runs", type=int, default=3)
    parser.add_argument("--registry", default=os.environ.get("MFSTACK_TEST_REGISTRY", "http://127.0.0.1:5000"))
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        flags = _stack_flags(workdir / "root", args.registry)
        try:
            began = time.perf_counter()
            status = installer.up(**flags)
            if not status.running:
                raise SystemExit(f"the stack did not start: {status}")
            print(f"stack up in {time.perf_counter() - began:.1f} s (ports: proxy {flags['port']}, "
                  f"metadata {flags['metadata_port']})")
            token = installer.token(**flags)
            if not token:
                raise SystemExit("the stack has no access token")
            pid = _proxy_pid(flags)
            (workdir / "flow.py").write_text(FLOW)
            direct_url = f"http://127.0.0.1:{flags['metadata_port']}"
            proxy_url = f"http://127.0.0.1:{flags['port']}/service"
            key = {"x-api-key": token}
            _run_flow(workdir, _flow_env(workdir, direct_url, None))  # data for the API to return
            runs_path = "/flows/ProxyTestFlow/runs"

            results = {}
            for path, total in (("/ping", args.requests), (runs_path, max(100, args.requests // 6))):
                results[path] = _compare(direct_url + path, proxy_url + path, key, total, args, pid)
            direct_flow, proxy_flow = [], []
            for _ in range(args.flow_runs):
                direct_flow.append(_run_flow(workdir, _flow_env(workdir, direct_url, None))[0])
                proxy_flow.append(_run_flow(workdir, _flow_env(workdir, proxy_url, token))[0])
        finally:
            installer.down(**flags)

    ms = 1000.0
    print(f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
    for path, r in results.items():
        d_rate, p_rate = statistics.median(r["direct_rates"]), statistics.median(r["proxy_rates"])
        d_med, p_med = statistics.median(r["direct_lat"]) * ms, statistics.median(r["proxy_lat"]) * ms
        print(f"metadata API GET {path}: {r['total']} requests x {args.rounds} rounds, concurrency {args.concurrency}")
        print(f"  throughput direct {d_rate:7.0f} req/s   proxy {p_rate:7.0f} req/s   ratio {p_rate / d_rate:.3f}"
              f"   rounds: direct {[round(x) for x in r['direct_rates']]}"
              f" proxy {[round(x) for x in r['proxy_rates']]}")
        cpu_us = statistics.median(r["proxy_cpu_us"])
        print(f"  proxy CPU per request: median {cpu_us:.0f} us"
              f"{' (target <= 120 us)' if path == '/ping' else ''}   rounds {[round(x) for x in r['proxy_cpu_us']]}")
        print(f"  latency under load: direct median {statistics.median(r['direct_conc']) * ms:6.2f} ms"
              f" p95 {_pct(r['direct_conc'], 0.95) * ms:6.2f} ms   proxy median"
              f" {statistics.median(r['proxy_conc']) * ms:6.2f} ms p95 {_pct(r['proxy_conc'], 0.95) * ms:6.2f} ms")
        print(f"  latency sequential: direct median {d_med:6.2f} ms p95 {_pct(r['direct_lat'], 0.95) * ms:6.2f} ms"
              f"   proxy median {p_med:6.2f} ms p95 {_pct(r['proxy_lat'], 0.95) * ms:6.2f} ms"
              f"   added median {p_med - d_med:+.2f} ms (target < 2 ms)")
    d_flow, p_flow = statistics.median(direct_flow), statistics.median(proxy_flow)
    print(f"small flow (3 steps) wall time, median of {args.flow_runs}: direct {d_flow:.2f} s   proxy {p_flow:.2f} s"
          f"   proxy speed {d_flow / p_flow:.3f} of direct (target >= 0.95)")


if __name__ == "__main__":
    main()
