#!/usr/bin/env python3
"""First-pull time of the production images through a throttled registry: the old puller against the new.

The registry is tests/registry_front.py in front of the local registry of scripts/build_images.sh
(bearer tokens like Docker Hub), its blobs served at --rate bytes per second, either shared by all
connections (a slow link) or per connection (--per-connection: a server or CDN that caps each stream).

    old        `udocker pull --registry=...` image after image (what `up` ran before)
    new, 1     this project's puller, one layer at a time
    new, N     this project's puller, N layers side by side (what `up` runs)

Each run starts from an empty udocker folder; the figure is the wall time until udocker holds both images.

    python scripts/bench_pull.py [--rate 20e6] [--per-connection] [--parallel 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from installer import humanize, procs, runtime  # noqa: E402
from tests.registry_front import Behaviour, running  # noqa: E402

IMAGES = list(json.loads((REPO / "images" / "production.json").read_text()).values())


def old_puller(udocker: runtime.Udocker, url: str) -> None:
    for ref in IMAGES:
        procs.run(udocker.command("pull", f"--registry={url}", runtime.image_spec(ref).local_name),
                  env=udocker.env, timeout=1800, what=f"udocker pull {ref}")
        assert udocker.has_image(ref), ref


def new_puller(udocker: runtime.Udocker, url: str, parallel: int) -> None:
    udocker.pull_all(IMAGES, None, lambda _: None, mirrors=[url], parallel=parallel)
    assert all(udocker.has_image(ref) for ref in IMAGES)


def timed(label: str, action, work: Path) -> float:
    folder = work / label.replace(" ", "-").replace(",", "")
    udocker = runtime.prepare(folder / "udocker", work / "bin", lambda _: None)
    began = time.monotonic()
    action(udocker)
    seconds = time.monotonic() - began
    shutil.rmtree(folder, ignore_errors=True)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--registry", default="http://127.0.0.1:5000")
    parser.add_argument("--rate", type=float, default=20e6, help="bytes per second (default 20e6)")
    parser.add_argument("--per-connection", action="store_true")
    parser.add_argument("--parallel", type=int, default=runtime.PARALLEL_LAYERS)
    args = parser.parse_args()
    link = "per connection" if args.per_connection else "shared by all connections"
    print(f"registry front at {humanize.size(args.rate)}/s {link}, images: {', '.join(IMAGES)}")
    with tempfile.TemporaryDirectory(prefix="bench-pull-") as tmp, \
            running(Behaviour(upstream=args.registry, rate=args.rate, per_connection=args.per_connection)) as front:
        work = Path(tmp)
        results = {
            "old (udocker pull)": timed("old", lambda u: old_puller(u, front.url), work),
            "new, 1 layer at a time": timed("new 1", lambda u: new_puller(u, front.url, 1), work),
            f"new, {args.parallel} side by side": timed("new n", lambda u: new_puller(u, front.url, args.parallel),
                                                        work),
        }
    for label, seconds in results.items():
        print(f"{label:<28} {seconds:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
