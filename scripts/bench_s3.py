"""Benchmark: a 200 MB artifact up and down through the proxy's /s3 route, against going straight to the store.

Starts, as the stack does, the object store (`python -m installer.objectstore`) on its unix
socket behind the proxy (`python -m installer.proxy --s3-socket ...`), and a second store
process over the same data folder listening on TCP that checks signatures itself (the same
verifier and credentials). boto3 cannot speak over a unix socket, so that TCP store is the
"straight to the store" path: both paths are signed and verified, and the difference is
the proxy's relaying cost.

Transfers use boto3's defaults, as Metaflow does: parts of 8 MiB above 8 MiB (uploads) and
parallel ranged GETs (downloads), 10 threads. Rounds alternate between the paths; the
median round is reported.

    python scripts/bench_s3.py [--megabytes 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from boto3.s3.transfer import TransferConfig  # noqa: E402

from installer.objectstore import BUCKET  # noqa: E402
from installer.s3auth import credentials_for_token  # noqa: E402
from tests.helpers_proxy import free_port  # noqa: E402
from tests.helpers_s3 import s3_client, start_s3_stack, start_store  # noqa: E402


class _Sink(io.RawIOBase):
    """Hashes what it is given instead of keeping it (downloads arrive in parallel, at offsets)."""

    def __init__(self) -> None:
        self.parts: dict[int, bytes] = {}
        self.position = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = offset if whence == 0 else self.position + offset
        return self.position

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.parts[self.position] = bytes(data)
        self.position += len(data)
        return len(data)

    def digest(self) -> bytes:
        hasher = hashlib.sha256()
        for offset in sorted(self.parts):
            hasher.update(self.parts[offset])
        return hasher.digest()


def _round(client, key: str, payload: bytes, config: TransferConfig) -> tuple[float, float]:
    began = time.perf_counter()
    client.upload_fileobj(io.BytesIO(payload), BUCKET, key, Config=config)
    upload = time.perf_counter() - began
    sink = _Sink()
    began = time.perf_counter()
    client.download_fileobj(BUCKET, key, sink, Config=config)
    download = time.perf_counter() - began
    if sink.digest() != hashlib.sha256(payload).digest():
        raise SystemExit(f"downloaded {key} differs from what was uploaded")
    client.delete_object(Bucket=BUCKET, Key=key)
    return upload, download


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    size = args.megabytes * 1000 * 1000
    payload = os.urandom(size)
    config = TransferConfig()  # boto3's defaults, which Metaflow's S3 client uses unchanged

    with tempfile.TemporaryDirectory(prefix="bench-s3-") as folder:
        work = Path(folder)
        stack = start_s3_stack(work)
        port = free_port()
        direct_store = start_store(work, stack.store.data_dir, listen=f"127.0.0.1:{port}",
                                   token_file=stack.proxy.token_file)
        try:
            credentials = credentials_for_token(stack.token)
            clients = {
                "through the proxy (/s3, unix socket)": s3_client(stack.endpoint, credentials),
                "straight to the store (TCP, own check)": s3_client(f"http://127.0.0.1:{port}", credentials),
            }
            for name, client in clients.items():  # warm up connections and the page cache
                _round(client, f"warmup-{len(name)}", payload[:16 * 1024 * 1024], config)
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
            for number in range(args.rounds):
                for name, client in clients.items():
                    results[name].append(_round(client, f"bench/{number}-{len(name)}", payload, config))
        finally:
            direct_store.stop()
            stack.stop()

    mb = size / 1e6
    print(f"object: {args.megabytes} MB of random bytes; {args.rounds} rounds; boto3 TransferConfig defaults "
          f"(8 MiB parts, 10 threads); median round")
    print(f"{'path':42} {'upload MB/s':>12} {'download MB/s':>14}")
    medians = {}
    for name, rounds in results.items():
        up = mb / statistics.median(r[0] for r in rounds)
        down = mb / statistics.median(r[1] for r in rounds)
        medians[name] = (up, down)
        print(f"{name:42} {up:12.1f} {down:14.1f}")
    (proxy_up, proxy_down), (direct_up, direct_down) = medians.values()
    print(f"proxy / direct: upload {proxy_up / direct_up:.2f}, download {proxy_down / direct_down:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
