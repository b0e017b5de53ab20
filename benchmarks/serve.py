"""Load test of the webhook server: signed events from concurrent clients on loopback.

    python benchmarks/serve.py                    # 60 seconds, 8 clients
    python benchmarks/serve.py --seconds 10 --clients 16

Starts ``retention serve`` in its own process on a fresh database with the retail
rules and a Standard Webhooks secret, then opens ``--clients`` keep-alive HTTP/1.1
connections from this process. Each client posts one event per request, signed
(``webhook-id``, ``webhook-timestamp``, ``webhook-signature``), and waits for the
answer before the next: a host's webhook sender. The events are the bundled example
stream, repeated under fresh ids and customers as long as the run lasts; each
customer's events go through one client, in time order.

The server runs with its delivery loop off (``--deliver-every 0``): this measures
taking events in, not sending decisions out, which runs in its own thread with its
own connection and is ``retention deliver``'s cost (the output says so too).

Prints accepted events per second, latency percentiles (p50, p90, p99, max) and
errors (any answer but 200 with one new event, or a broken connection). The target
is at least 1,000 events per second with p99 under 100 ms and no error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from retention import signing  # noqa: E402

SECRET = "whsec_" + "c2VydmUtYmVuY2htYXJrLXNlY3JldC1rZXk="
EVENTS = ROOT / "examples" / "events" / "retail.jsonl"
RULES = ROOT / "examples" / "rules" / "retail.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def streams(clients: int) -> list[list[dict]]:
    """The example events, one list per client (a customer always on the same one)."""
    per_client: list[list[dict]] = [[] for _ in range(clients)]
    with EVENTS.open(encoding="utf-8") as handle:
        for line in handle:
            event = json.loads(line)
            if event.get("type") == "identify":
                continue
            per_client[zlib.crc32(event["customer"].encode()) % clients].append(event)
    return per_client


def start_server(db: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "RETENTION_STANDARD_SECRET": SECRET}
    process = subprocess.Popen(
        [sys.executable, "-m", "retention.cli", "serve", "--db", str(db), "--rules",
         str(RULES), "--port", str(port), "--deliver-every", "0", "--quiet"],
        env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server stopped: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1):
                return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit("the server did not start within 30 s")


async def client(port: int, events: list[dict], index: int, stop_at: float,
                 latencies: list[float], errors: list[str]) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    accepted = 0
    round_ = 0
    try:
        while True:
            for event in events:
                if time.monotonic() >= stop_at:
                    return accepted
                e = dict(event, id=f"{event['id']}-r{round_}",
                         customer=f"{event['customer']}-r{round_}")
                body = json.dumps(e).encode()
                headers = signing.sign(SECRET, f"m-{index}-{e['id']}", int(time.time()), body)
                head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                request = (f"POST /events HTTP/1.1\r\nhost: 127.0.0.1\r\n"
                           f"content-type: application/json\r\n{head}"
                           f"content-length: {len(body)}\r\n\r\n").encode() + body
                started = time.perf_counter()
                writer.write(request)
                status_line = await reader.readline()
                length = 0
                while True:
                    line = await reader.readline()
                    if line in (b"\r\n", b""):
                        break
                    name, _, value = line.decode().partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                answer = await reader.readexactly(length)
                latencies.append(time.perf_counter() - started)
                status = status_line.split()[1:2]
                if status != [b"200"] or json.loads(answer).get("new") != 1:
                    errors.append(f"{status_line.decode().strip()} {answer[:200]!r}")
                else:
                    accepted += 1
            round_ += 1
    except (OSError, asyncio.IncompleteReadError) as exc:
        errors.append(f"client {index}: {type(exc).__name__}: {exc}")
        return accepted
    finally:
        writer.close()


async def load(port: int, clients: int, seconds: float) -> tuple[int, list[float],
                                                                 list[str], float]:
    per_client = streams(clients)
    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    stop_at = started + seconds
    counts = await asyncio.gather(*(client(port, per_client[i], i, stop_at, latencies,
                                           errors) for i in range(clients)))
    return sum(counts), latencies, errors, time.monotonic() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        db = Path(folder) / "serve.db"
        port = free_port()
        server = start_server(db, port)
        try:
            accepted, latencies, errors, elapsed = asyncio.run(
                load(port, args.clients, args.seconds))
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
    ms = [v * 1000 for v in latencies]
    print(f"clients {args.clients}, {elapsed:.1f} s, one signed event per request "
          "(delivery off: --deliver-every 0)")
    print(f"accepted: {accepted:,} events, {accepted / elapsed:,.0f} events/s")
    print(f"latency ms: p50 {percentile(ms, 0.50):.1f}, p90 {percentile(ms, 0.90):.1f}, "
          f"p99 {percentile(ms, 0.99):.1f}, max {max(ms, default=0):.1f}")
    print(f"errors: {len(errors)}")
    for error in errors[:5]:
        print(f"  {error}")
    ok = accepted / elapsed >= 1000 and percentile(ms, 0.99) < 100 and not errors
    print("target (>= 1,000 events/s, p99 < 100 ms, no error): " + ("met" if ok else "NOT met"))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
