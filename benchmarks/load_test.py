"""Load generator for `sparse-gguf serve`: N concurrent streaming chat clients on loopback for D seconds.

Every client loops: POST /v1/chat/completions with stream=true, read the server-sent events to `data: [DONE]`,
record the status and the latency, repeat until the time is up. The server's resident memory is sampled
from /proc meanwhile. Prints a JSON summary: requests, 200s completed, 503s, anything else, p50/p95 latency of
the completed requests, start and peak RSS.

    python benchmarks/load_test.py                        # starts its own server, 8 clients x 120 s
    python benchmarks/load_test.py --clients 8 --seconds 10
    python benchmarks/load_test.py --url 127.0.0.1:8000 --server-pid PID   # an already running server
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
TOPICS = ["the sea", "mountains", "bread", "trains", "owls", "rain", "chess", "copper", "tea", "bridges"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    try:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def start_server(port: int, *extra: str, log: pathlib.Path | None = None) -> subprocess.Popen:
    """`python -m cli serve` on 127.0.0.1:port; returns once /v1/models answers."""
    err = open(log, "wb") if log else subprocess.DEVNULL
    proc = subprocess.Popen([sys.executable, "-m", "cli", "serve", "--port", str(port), *extra], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/v1/models")
            if conn.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("server did not start within 180 s")


def stream_chat(host: str, port: int, body: dict, timeout: float = 600) -> dict:
    """One streaming chat request. Returns status, latency (s), whether [DONE] arrived, the text."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        if resp.status != 200:
            resp.read()
            return {"status": resp.status, "latency": time.monotonic() - t0, "done": False, "text": ""}
        text, done, finish = [], False, None
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            choice = json.loads(data)["choices"][0]
            text.append(choice["delta"].get("content", ""))
            finish = choice["finish_reason"] or finish
        return {"status": 200, "latency": time.monotonic() - t0, "done": done and finish is not None,
                "text": "".join(text)}
    finally:
        conn.close()


def run_load(host: str, port: int, clients: int = 8, seconds: float = 120, max_tokens: int = 64,
             server_pid: int | None = None) -> dict:
    results: list[dict] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds
    rss: list[float] = []

    def client(i: int) -> None:
        n = 0
        while time.monotonic() < stop_at:
            body = {"messages": [{"role": "user", "content": f"Tell me one fact about {TOPICS[(i + n) % len(TOPICS)]}."}],
                    "stream": True, "max_tokens": max_tokens, "temperature": 0.8, "seed": i * 1000 + n}
            n += 1
            try:
                r = stream_chat(host, port, body)
            except Exception as e:   # a dropped connection or a timeout counts as an error
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                results.append(r)
            if r["status"] == 503:
                time.sleep(0.2)      # what a polite client does on Retry-After

    def watch() -> None:
        while time.monotonic() < stop_at + 1:
            v = rss_mib(server_pid) if server_pid else None
            if v is not None:
                rss.append(v)
            time.sleep(0.25)

    start_rss = rss_mib(server_pid) if server_pid else None
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ok = sorted(r["latency"] for r in results if r["status"] == 200 and r["done"])

    def pct(q: float) -> float | None:
        return round(ok[min(len(ok) - 1, int(q * len(ok)))], 3) if ok else None

    statuses: dict[str, int] = {}
    for r in results:
        statuses[str(r["status"])] = statuses.get(str(r["status"]), 0) + 1
    return {"clients": clients, "seconds": seconds, "max_tokens": max_tokens, "requests": len(results) + len(errors),
            "completed": len(ok), "status_503": statuses.get("503", 0), "statuses": statuses,
            "incomplete_200": sum(1 for r in results if r["status"] == 200 and not r["done"]),
            "errors": len(errors), "error_samples": errors[:5], "latency_p50_s": pct(0.50),
            "latency_p95_s": pct(0.95), "rss_start_mib": start_rss, "rss_peak_mib": max(rss) if rss else None,
            # the peak within each tenth of the run: flat at the end means bounded, rising means growth
            "rss_peak_by_tenth_mib": [round(max(rss[i * len(rss) // 10:(i + 1) * len(rss) // 10] or [0]), 1)
                                      for i in range(10)] if len(rss) >= 10 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", help="host:port of a running server (default: start one)")
    ap.add_argument("--server-pid", type=int, help="pid of that server, for its RSS")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--serve-args", default="--ctx 1024 --max-queue 4",
                    help="extra `sparse-gguf serve` arguments when the script starts the server")
    args = ap.parse_args()
    proc = None
    if args.url:
        host, port = args.url.rsplit(":", 1)
        pid = args.server_pid
    else:
        host, port = "127.0.0.1", free_port()
        proc = start_server(port, *args.serve_args.split())
        pid = proc.pid
    summary = run_load(host, int(port), args.clients, args.seconds, args.max_tokens, pid)
    if proc is not None:
        proc.send_signal(signal.SIGTERM)
        summary["server_exit_code"] = proc.wait(timeout=60)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
