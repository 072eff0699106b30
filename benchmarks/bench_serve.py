"""The per-user steering server under load (a benchmark, not a test): prints its figures.

    python -m benchmarks.bench_serve --config configs/demo.json --run-dir runs/demo \
        --clients 16 --requests 500 --alone 32 --threads 2

Starts ``scripts.serve`` on a free loopback port (``--threads`` torch threads, pinned with
OMP_NUM_THREADS too), then sends task-mode requests of mixed users and algorithms (the
run's ``--split`` samples round-robin over users, ``--algos`` in turn):

(a) the first ``--alone`` requests one at a time (a lone request's latency, and the
    one-at-a-time throughput);
(b) ``--requests`` requests from ``--clients`` concurrent clients (each sends its next
    request when the previous one is answered), the server batching across users.

Prints throughput (requests/s) of both and their ratio (goal >= 2.5x at 16 clients on 2
cores), p50/p95 latency of both (goal: p95 under load within 2x of a lone request's),
errors (goal 0), whether every answer of (b) equals the same request's answer in (a)
(greedy decoding), and the server's resident memory after every 100 requests of (b)
(goal: flat).  Requests are identical between the phases, so the ratio is like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from data_process.artifact_io import read_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _requests(run_dir: Path, split: str, algos: list[str], n: int, model: str, mode: str,
              max_tokens: int | None) -> list[dict]:
    """``n`` request bodies: samples round-robin over users (neighbours differ), algorithms in
    turn; chat mode asks the first 40 words of the sample's input as a chat message."""
    by_user: dict[str, list[dict]] = {}
    for s in read_jsonl(run_dir / "ranked" / f"{split}.jsonl"):
        by_user.setdefault(s["user_id"], []).append(s)
    order = [s for turn in range(max(map(len, by_user.values()))) for _, ss in sorted(by_user.items())
             if turn < len(ss) for s in [ss[turn]]]
    bodies = []
    for i in range(n):
        s = order[i % len(order)]
        body = {"model": model, "user": s["user_id"], "fints": {"algo": algos[i % len(algos)], "mode": mode}}
        if mode == "chat":
            body["messages"] = [{"role": "user", "content": " ".join(s["input"].split()[:40])}]
        else:
            body["prompt"] = s["input"]
        if max_tokens:
            body["max_tokens"] = max_tokens
        bodies.append(body)
    return bodies


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    """Resident memory of ``pid`` (``VmHWM``: its peak so far) in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def _start(args) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "scripts.serve", "--config", args.config, "--run-dir", args.run_dir,
           "--port", str(port), "--threads", str(args.threads), "--log-level", "WARNING",
           "--max-batch-size", str(args.max_batch_size), "--batch-window-ms", str(args.batch_window_ms),
           "--max-queue", str(max(64, args.clients * 2)), "--request-timeout-s", "600"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the server did not start within 300 s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/demo.json")
    parser.add_argument("--run-dir", default="runs/demo")
    parser.add_argument("--split", default="seen_test", help="ranked split whose samples are asked")
    parser.add_argument("--algos", default="fints,steer,rag", help="algorithms, in turn (chat mode: no rag)")
    parser.add_argument("--mode", default="task", choices=["task", "chat"],
                        help="task: the task input, 05's prompt; chat: a 40-word chat message (short prompts)")
    parser.add_argument("--max-tokens", type=int, default=0, help="answer length (0: the server's default)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--requests", type=int, default=500, help="requests of the concurrent phase")
    parser.add_argument("--alone", type=int, default=32, help="requests sent one at a time first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--batch-window-ms", type=float, default=50)
    args = parser.parse_args()

    proc, url = _start(args)
    try:
        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        bodies = _requests(Path(args.run_dir), args.split, args.algos.split(","), args.requests, model, args.mode,
                           args.max_tokens)
        path = "/v1/chat/completions" if args.mode == "chat" else "/v1/completions"
        client = httpx.Client(timeout=600, limits=httpx.Limits(max_connections=args.clients + 4))

        def ask(body: dict) -> tuple[float, int, str]:
            start = time.perf_counter()
            reply = client.post(url + path, json=body)
            if reply.status_code != 200:
                return time.perf_counter() - start, reply.status_code, reply.text
            choice = reply.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            return time.perf_counter() - start, reply.status_code, text

        ask(bodies[0])  # warm-up: the first request of each algorithm loads its vectors
        for body in bodies[1:len(args.algos.split(","))]:
            ask(body)
        rss = [("start", _rss_mb(proc.pid))]
        start = time.perf_counter()
        alone = [ask(b) for b in bodies[:args.alone]]
        alone_s = time.perf_counter() - start

        results: list[tuple[float, int, str] | None] = [None] * len(bodies)
        cursor, lock = iter(range(len(bodies))), threading.Lock()

        def client_loop() -> None:
            while True:
                with lock:
                    i = next(cursor, None)
                    done = sum(r is not None for r in results)
                if i is None:
                    return
                if done and done % 100 == 0 and (not rss or rss[-1][0] != done):
                    rss.append((done, _rss_mb(proc.pid)))
                results[i] = ask(bodies[i])

        start = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            for _ in range(args.clients):
                pool.submit(client_loop)
        load_s = time.perf_counter() - start
        rss.append((len(bodies), _rss_mb(proc.pid)))
        rss.append(("peak", _rss_mb(proc.pid, "VmHWM")))
        health = httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(60)

    lone, loaded = [r[0] for r in alone], [r[0] for r in results]
    errors = sum(r[1] != 200 for r in results) + sum(r[1] != 200 for r in alone)
    same = sum(results[i][2] == alone[i][2] for i in range(len(alone)))
    figures = {
        "mode": args.mode, "clients": args.clients, "requests": len(bodies), "alone": len(alone),
        "server_threads": args.threads,
        "throughput_alone_rps": len(alone) / alone_s, "throughput_loaded_rps": len(bodies) / load_s,
        "throughput_ratio": (len(bodies) / load_s) / (len(alone) / alone_s),
        "latency_alone_p50_s": _pct(lone, 50), "latency_alone_p95_s": _pct(lone, 95),
        "latency_loaded_p50_s": _pct(loaded, 50), "latency_loaded_p95_s": _pct(loaded, 95),
        "p95_loaded_over_p50_alone": _pct(loaded, 95) / _pct(lone, 50), "errors": errors,
        "same_answer_as_alone": f"{same}/{len(alone)}", "rows_per_batch": health["rows"] / max(health["batches"], 1),
        "server_rss_mb": {str(k): round(v, 1) for k, v in rss},
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
