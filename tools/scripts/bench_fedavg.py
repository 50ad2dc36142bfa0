#!/usr/bin/env python3
"""FedAvg side by side: fedge's streaming FedAvg vs Flower's numpy `aggregate`.

For each (N clients, P parameters) this runs, one right after the other,

  * the Rust example `bench_fedavg` (fedge-fl's FedAvg: begin, N x accumulate,
    finish; each update generated, accumulated, dropped), built with
    `cargo build --profile ci -p fedge-fl --example bench_fedavg`, and
  * a fresh Python process that generates the same N updates into one
    (N, P) float32 array, then calls `flwr.server.strategy.aggregate.aggregate`
    on `[([row], num_samples), ...]`, the pure function Flower's FedAvg uses
    when `inplace=False`,

and prints a markdown table: time of the aggregation alone (data generation
excluded on both sides), each process's peak RSS (VmHWM / ru_maxrss, so it
includes the interpreter, numpy and flwr for Flower: its RSS before generating
data is shown too), the ratios, and the largest difference between the two
models. Client c's value k is (splitmix64((c << 32 | k) ^ seed) >> 40) * 2^-23 - 1
and its sample count 1 + splitmix64(c ^ 0xABCDEF) % 1000 on both sides, so the
inputs are bit-identical. Flower computes in float32 (numpy keeps the arrays'
dtype); fedge in f64, rounded once to f32.

Because the machine is small and shared, the script waits before each pair
until no rustc / cargo build is running.

Usage (tools/scripts/bench_fedavg.sh builds the example and makes the venv):
  tools/scripts/bench_fedavg.sh [--clients 100,1000] [--params 100000,1000000]
                                [--repeat 3] [--max-wait 900] [--markdown OUT] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
TARGET = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
EXAMPLE = TARGET / "ci" / "examples" / "bench_fedavg"

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
M1 = np.uint64(0xBF58476D1CE4E5B9)
M2 = np.uint64(0x94D049BB133111EB)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 on a uint64 array (numpy array arithmetic wraps modulo 2^64)."""
    z = x + GOLDEN
    z = (z ^ (z >> np.uint64(30))) * M1
    z = (z ^ (z >> np.uint64(27))) * M2
    return z ^ (z >> np.uint64(31))


def client_params(seed: int, client: int, params: int) -> np.ndarray:
    k = np.arange(params, dtype=np.uint64)
    z = splitmix64((np.uint64(client) << np.uint64(32) | k) ^ np.uint64(seed))
    return (z >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-23) - np.float32(1.0)


def num_samples(client: int) -> int:
    return 1 + int(splitmix64(np.array([client ^ 0xABCDEF], dtype=np.uint64))[0]) % 1000


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def flower_child(clients: int, params: int, seed: int, out: str) -> None:
    """Runs in its own process: generate, aggregate with Flower, report."""
    from flwr.server.strategy.aggregate import aggregate

    before = rss_mib()
    data = np.empty((clients, params), dtype=np.float32)
    t = time.perf_counter()
    for c in range(clients):
        data[c] = client_params(seed, c, params)
    gen = time.perf_counter() - t
    results = [([data[c]], num_samples(c)) for c in range(clients)]
    t = time.perf_counter()
    (model,) = aggregate(results)
    elapsed = time.perf_counter() - t
    np.asarray(model, dtype=np.float32).tofile(out)
    print(
        json.dumps(
            {
                "aggregate_s": elapsed,
                "generate_s": gen,
                "peak_rss_mib": rss_mib(),
                "rss_before_data_mib": before,
                "dtype": str(model.dtype),
            }
        )
    )


def wait_for_quiet_machine(limit_s: float = 900.0) -> bool:
    """Waits until no rustc / cargo build runs; False if it gave up after limit_s."""
    start = time.time()
    while time.time() - start < limit_s:
        busy = subprocess.run(
            ["pgrep", "-x", "rustc|cargo|cc1|cc1plus|ld|ld.lld"], capture_output=True
        ).returncode == 0
        if not busy:
            return True
        time.sleep(5)
    return False


def run_json(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def measure(clients: int, params: int, seed: int, tmp: Path, max_wait: float) -> dict:
    quiet = wait_for_quiet_machine(max_wait)
    fedge_out, flower_out = tmp / "fedge.f32", tmp / "flower.f32"
    fedge = run_json(
        [str(EXAMPLE), "--clients", str(clients), "--params", str(params),
         "--seed", str(seed), "--out", str(fedge_out)]
    )
    flower = run_json(
        [sys.executable, __file__, "--child", f"{clients},{params},{seed},{flower_out}"]
    )
    a = np.fromfile(fedge_out, dtype=np.float32).astype(np.float64)
    b = np.fromfile(flower_out, dtype=np.float32).astype(np.float64)
    return {
        "clients": clients,
        "params": params,
        "fedge": fedge,
        "flower": flower,
        "max_abs_diff": float(np.max(np.abs(a - b))),
        "quiet": quiet,
        "load1": os.getloadavg()[0],
    }


def best_of(rows: list[dict]) -> dict:
    """The repeat with the lowest fedge time and, separately, the lowest Flower time."""
    out = dict(rows[0])
    out["fedge"] = min((r["fedge"] for r in rows), key=lambda x: x["aggregate_s"])
    out["flower"] = min((r["flower"] for r in rows), key=lambda x: x["aggregate_s"])
    out["quiet"] = all(r["quiet"] for r in rows)
    return out


def markdown(rows: list[dict]) -> str:
    lines = [
        "| N clients | P params | fedge time | Flower time | fedge/Flower time "
        "| fedge peak RSS | Flower peak RSS (before data) | fedge/Flower RSS | max abs diff |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        fe, fl = r["fedge"], r["flower"]
        lines.append(
            f"| {r['clients']} | {r['params']:,} | {fe['aggregate_s'] * 1e3:.1f} ms "
            f"| {fl['aggregate_s'] * 1e3:.1f} ms | {fe['aggregate_s'] / fl['aggregate_s']:.2f} "
            f"| {fe['peak_rss_mib']:.1f} MiB | {fl['peak_rss_mib']:.0f} MiB "
            f"({fl['rss_before_data_mib']:.0f}) | {fe['peak_rss_mib'] / fl['peak_rss_mib']:.4f} "
            f"| {r['max_abs_diff']:.1e}{'' if r['quiet'] else ' (builds running)'} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", default="100,1000")
    ap.add_argument("--params", default="100000,1000000")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--max-wait", type=float, default=900.0,
        help="seconds to wait for builds to stop before each pair (then run anyway, flagged)",
    )
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        c, p, s, out = args.child.split(",")
        flower_child(int(c), int(p), int(s), out)
        return
    if not EXAMPLE.exists():
        sys.exit(f"{EXAMPLE} missing: cargo build --profile ci -p fedge-fl --example bench_fedavg")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for clients in (int(x) for x in args.clients.split(",")):
            for params in (int(x) for x in args.params.split(",")):
                runs = [measure(clients, params, args.seed, Path(tmp), args.max_wait) for _ in range(args.repeat)]
                rows.append(best_of(runs))
                print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    table = markdown(rows)
    print(f"{platform.processor() or platform.machine()}, numpy {np.__version__}, best of {args.repeat}")
    print(table)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
