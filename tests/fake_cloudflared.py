#!/usr/bin/env python3
"""A stand-in for `cloudflared tunnel --url ... --metrics ...`, for tests that cannot reach Cloudflare.

Behaves like the real binary where the tunnel manager looks: INF log lines on
stderr, the boxed banner carrying a random https://<words>.trycloudflare.com
address, `GET /quicktunnel` -> {"hostname": ...} on the --metrics address, keeps
running, exits 0 on SIGTERM after logging the shutdown.

Environment switches:
  FAKE_CLOUDFLARED_NO_URL=1        never announce an address (banner or metrics)
  FAKE_CLOUDFLARED_BANNER=0        announce the address on /quicktunnel only, not in the log
  FAKE_CLOUDFLARED_CRASH_AFTER=S   exit with code 1 S seconds after announcing
  FAKE_CLOUDFLARED_FAIL=1          log an error and exit with code 1 at once
  FAKE_CLOUDFLARED_DELAY=S         wait S seconds before announcing (default 0.3)
  FAKE_CLOUDFLARED_FORWARD=1       really forward: listen on a free 127.0.0.1 port, relay every
                                   request to the --url origin, and announce http://127.0.0.1:<port>
                                   instead of the unresolvable trycloudflare name, so a reachability
                                   check through the announced address is end to end
  FAKE_CLOUDFLARED_READY_DELAY=S   `GET /ready` answers 503 until S seconds after announcing (then logs
                                   "edge connection ready"); relayed requests are logged too
  FAKE_CLOUDFLARED_RECORD=PATH     append {"pid", "url", "argv"} as one JSON line per start
"""

from __future__ import annotations

import http.client
import json
import os
import random
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

WORDS = ("amber", "basin", "cedar", "delta", "ember", "fjord", "grove", "harbor", "island", "juniper",
         "kettle", "lagoon", "meadow", "nectar", "orchid", "prairie", "quartz", "ridge", "summit",
         "timber", "upland", "valley", "willow", "yonder", "zephyr")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}

state: dict[str, object] = {"hostname": "", "ready_at": None}


def log(level: str, message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sys.stderr.write(f"{stamp} {level} {message}\n")
    sys.stderr.flush()


def option(argv: list[str], name: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == name and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


class Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        if self.path == "/quicktunnel":
            body = json.dumps({"hostname": state["hostname"]}).encode()
            kind = "application/json"
        elif self.path == "/ready":
            ready_at = state["ready_at"]
            if ready_at is None or time.monotonic() < ready_at:  # type: ignore[operator]
                self.send_response(503)
                body = json.dumps({"status": 503, "readyConnections": 0}).encode()
            else:
                if not state.get("ready_logged"):
                    state["ready_logged"] = True
                    log("INF", "edge connection ready")
                self.send_response(200)
                body = json.dumps({"status": 200, "readyConnections": 1}).encode()
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def make_forwarder(origin: str) -> type[BaseHTTPRequestHandler]:
    target = urlsplit(origin)

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def relay(self) -> None:
            log("INF", f"relayed {self.command} {self.path}")
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else None
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
            conn = http.client.HTTPConnection(target.hostname or "127.0.0.1", target.port or 80, timeout=60)
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                payload = answer.read()
            except OSError:
                # Cloudflare answers 502 when the origin cannot be reached.
                payload = b"<html><body>Bad gateway: origin unreachable</body></html>"
                self.send_response(502)
                self.send_header("Content-Type", "text/html")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)
                return
            finally:
                conn.close()
            self.send_response(answer.status, answer.reason)
            for key, value in answer.getheaders():
                if key.lower() not in HOP_BY_HOP:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = relay

        def log_message(self, *args: object) -> None:
            pass

    return Forward


def serve(server: ThreadingHTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "tunnel":
        log("ERR", f"fake cloudflared only knows `tunnel`, got {argv}")
        return 2
    origin = option(argv, "--url") or "http://localhost:8080"
    metrics = option(argv, "--metrics") or "127.0.0.1:0"

    def on_term(signum: int, frame: object) -> None:
        log("INF", "Initiating graceful shutdown due to signal terminated ...")
        sys.exit(0)

    signal.signal(signal.SIGTERM, on_term)
    log("INF", "Thank you for trying Cloudflare Tunnel. Quick tunnels are for experiments only "
               "and come with no uptime guarantee.")
    log("INF", "Requesting new quick Tunnel on trycloudflare.com...")
    if os.environ.get("FAKE_CLOUDFLARED_FAIL") == "1":
        log("ERR", "failed to request quick Tunnel: Post \"https://api.trycloudflare.com/tunnel\": "
                   "dial tcp: lookup api.trycloudflare.com: no such host")
        return 1

    host, _, port = metrics.rpartition(":")
    metrics_server = ThreadingHTTPServer((host or "127.0.0.1", int(port)), Metrics)
    serve(metrics_server)
    log("INF", f"Starting metrics server on {metrics}/metrics")

    time.sleep(float(os.environ.get("FAKE_CLOUDFLARED_DELAY", "0.3")))
    if os.environ.get("FAKE_CLOUDFLARED_FORWARD") == "1":
        forwarder = ThreadingHTTPServer(("127.0.0.1", 0), make_forwarder(origin))
        serve(forwarder)
        hostname = f"127.0.0.1:{forwarder.server_address[1]}"
        url = f"http://{hostname}"
    else:
        hostname = "-".join(random.sample(WORDS, 4)) + ".trycloudflare.com"
        url = f"https://{hostname}"

    if os.environ.get("FAKE_CLOUDFLARED_NO_URL") != "1":
        state["hostname"] = hostname
        state["ready_at"] = time.monotonic() + float(os.environ.get("FAKE_CLOUDFLARED_READY_DELAY", "0"))
        if os.environ.get("FAKE_CLOUDFLARED_BANNER", "1") != "0":
            line = "Your quick Tunnel has been created! Visit it at (it may take some time to be reachable):"
            width = max(len(line), len(url)) + 4
            log("INF", "+" + "-" * width + "+")
            log("INF", "|  " + line.ljust(width - 2) + "|")
            log("INF", "|  " + url.ljust(width - 2) + "|")
            log("INF", "+" + "-" * width + "+")
        record = os.environ.get("FAKE_CLOUDFLARED_RECORD")
        if record:
            with open(record, "a") as handle:
                handle.write(json.dumps({"pid": os.getpid(), "url": url, "argv": argv}) + "\n")
    log("INF", f"Registered tunnel connection connIndex=0 location=fake01 protocol=quic origin={origin}")

    crash_after = os.environ.get("FAKE_CLOUDFLARED_CRASH_AFTER")
    deadline = time.monotonic() + float(crash_after) if crash_after else None
    while True:
        time.sleep(0.1)
        if deadline is not None and time.monotonic() >= deadline:
            log("ERR", "Connection terminated error=\"lost connection to the edge\"")
            log("ERR", "no more connections active and exiting")
            return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
