"""Benchmark: the reverse proxy's cost on the metadata API, measured against going direct.

Starts a real metadata service (PyPI metaflow-local-service, as in the tests), a
UI-backend stand-in and the proxy (`python -m installer.proxy`), records one small
flow so the API has data, then measures in the same run:

  - throughput: N requests of GET /ping (cheap: shows the proxy's own cost) and N/6 of
    GET /flows/{flow}/runs (a real listing) at concurrency C, direct vs proxy
    (interleaved rounds, median round reported);
  - latency: sequential requests (no queueing), median and p95, direct vs proxy;
  - a small flow's wall time (`python flow.py run`), median of 3, direct vs proxy.

Targets: proxy throughput >= 0.85 of direct; added median latency < 2 ms.

    python scripts/bench_proxy.py [--requests 3000] [--concurrency 16] [--flow-runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import aiohttp

from tests import helpers_proxy as hp
from tests.test_proxy import FLOW


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
    result: dict = {"total": total, "direct_rates": [], "proxy_rates": [], "proxy_cpu_s": 0.0}
    for _ in range(args.rounds):
        rate, result["direct_conc"] = asyncio.run(_load(direct, {}, total, args.concurrency))
        result["direct_rates"].append(rate)
        cpu_before = _cpu_s(proxy_pid)
        rate, result["proxy_conc"] = asyncio.run(_load(proxied, key, total, args.concurrency))
        result["proxy_cpu_s"] += _cpu_s(proxy_pid) - cpu_before
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequential", type=int, default=500)
    parser.add_argument("--flow-runs", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp:
        workdir = Path(tmp)
        static_dir = hp.make_static_dir(workdir)
        metadata = hp.start_metadata(workdir)
        upstream = hp.start_upstream(workdir)
        proxy = hp.start_proxy(workdir, metadata_url=metadata.url, ui_url=upstream.url, static_dir=static_dir)
        try:
            (workdir / "flow.py").write_text(FLOW)
            direct_url = metadata.url
            proxy_url = f"{proxy.url}/service"
            key = {"x-api-key": proxy.token}
            _run_flow(workdir, _flow_env(workdir, direct_url, None))  # data for the API to return
            runs_path = "/flows/ProxyTestFlow/runs"

            results = {}
            for path, total in (("/ping", args.requests), (runs_path, max(100, args.requests // 6))):
                results[path] = _compare(direct_url + path, proxy_url + path, key, total, args, proxy.pid)
            direct_flow, proxy_flow = [], []
            for _ in range(args.flow_runs):
                direct_flow.append(_run_flow(workdir, _flow_env(workdir, direct_url, None))[0])
                proxy_flow.append(_run_flow(workdir, _flow_env(workdir, proxy_url, proxy.token))[0])
        finally:
            proxy.stop()
            upstream.stop()
            metadata.stop()

    ms = 1000.0
    for path, r in results.items():
        d_rate, p_rate = statistics.median(r["direct_rates"]), statistics.median(r["proxy_rates"])
        d_med, p_med = statistics.median(r["direct_lat"]) * ms, statistics.median(r["proxy_lat"]) * ms
        print(f"metadata API GET {path}: {r['total']} requests x {args.rounds} rounds, concurrency {args.concurrency}")
        print(f"  throughput direct {d_rate:7.0f} req/s   proxy {p_rate:7.0f} req/s   ratio {p_rate / d_rate:.3f}"
              f" (target >= 0.85)   rounds: direct {[round(x) for x in r['direct_rates']]}"
              f" proxy {[round(x) for x in r['proxy_rates']]}")
        cpu_us = r["proxy_cpu_s"] / (r["total"] * args.rounds) * 1e6
        print(f"  proxy CPU per request {cpu_us:.0f} us (its ceiling on one free core: ~{1e6 / cpu_us:.0f} req/s)"
              f"   machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        print(f"  latency under load: direct median {statistics.median(r['direct_conc']) * ms:6.2f} ms"
              f" p95 {_pct(r['direct_conc'], 0.95) * ms:6.2f} ms   proxy median"
              f" {statistics.median(r['proxy_conc']) * ms:6.2f} ms p95 {_pct(r['proxy_conc'], 0.95) * ms:6.2f} ms")
        print(f"  latency sequential: direct median {d_med:6.2f} ms p95 {_pct(r['direct_lat'], 0.95) * ms:6.2f} ms"
              f"   proxy median {p_med:6.2f} ms p95 {_pct(r['proxy_lat'], 0.95) * ms:6.2f} ms"
              f"   added median {p_med - d_med:+.2f} ms (target < 2 ms)")
    d_flow, p_flow = statistics.median(direct_flow), statistics.median(proxy_flow)
    print(f"small flow (3 steps) wall time, median of {args.flow_runs}: direct {d_flow:.2f} s   proxy {p_flow:.2f} s"
          f"   ratio {p_flow / d_flow:.3f}")


if __name__ == "__main__":
    main()
