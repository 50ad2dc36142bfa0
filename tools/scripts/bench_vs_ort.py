#!/usr/bin/env python3
"""Side-by-side latency benchmark: fedge (target/ci/fedge bench) vs onnxruntime.

For every zoo model whose model.onnx exists (models/zoo/<name>/ when the
manifest says committed = true, else .cache/zoo/<name>/), and for each thread
count, this runs

  * `fedge bench MODEL --input ... --threads N --warmup W --iters K
     --max-seconds 20 --json` as a subprocess, then
  * onnxruntime in this process (InferenceSession with intra_op_num_threads=N,
    inter_op_num_threads=1, ORT_SEQUENTIAL, default graph optimisation level),
    W untimed runs then K runs each timed with time.perf_counter,

one right after the other for the same model and thread count, so both see the
same machine load. Both get the same inputs: case 0 of the model's reference
npz (keys c0_in{k}, k = input index in manifest order), written to .npy files.

Reported per (model, threads): fedge p50, ORT p50, fedge/ORT (< 1 means fedge
faster), fedge peak RSS (from fedge's own JSON), and for int8 models the
fedge p50 of the int8 model divided by the fedge p50 of its float_twin at the
same thread count (< 1 means int8 faster on fedge).

ORT's peak RSS is not measured: ORT runs inside this Python process, whose RSS
also holds numpy, onnx, the other sessions, etc., so it cannot be isolated
in-process.

Because the machine is small, the script waits before each model until no
rustc / `cargo build` process is running.

Usage:
  tools/scripts/bench_vs_ort.sh [--only a,b] [--threads 1,2] [--iters 30]
                                [--warmup 5] [--markdown OUT] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import hashlib

import numpy as np
import onnxruntime as ort

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "models" / "zoo"
CACHE_ZOO = REPO / ".cache" / "zoo"
FEDGE = REPO / "target" / "ci" / "fedge"

MAX_SECONDS = 20  # fedge --max-seconds
FEDGE_BUDGET_S = 60.0  # if one fedge bench takes longer than this, cap iters
FEDGE_TIMEOUT_S = 600.0


def fedge_id() -> str:
    st = FEDGE.stat()
    h = hashlib.sha256(FEDGE.read_bytes()).hexdigest()[:16]
    return f"sha256:{h} mtime:{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(st.st_mtime))}Z"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def busy_builders() -> list[str]:
    out = []
    for pat, full in (("rustc", False), ("cargo build", True)):
        args = ["pgrep", "-f", pat] if full else ["pgrep", pat]
        r = subprocess.run(args, capture_output=True, text=True)
        pids = [p for p in r.stdout.split() if p and int(p) != os.getpid()]
        if pids:
            out.append(f"{pat} ({len(pids)})")
    return out


def wait_quiet(poll_s: float = 10.0) -> float:
    """Block until no rustc / cargo build is running; returns seconds waited."""
    t0 = time.monotonic()
    announced = False
    while True:
        busy = busy_builders()
        if not busy:
            return time.monotonic() - t0
        if not announced:
            log(f"  waiting: {', '.join(busy)} running")
            announced = True
        time.sleep(poll_s)


def load_manifest(name: str) -> dict:
    with open(ZOO / name / "manifest.toml", "rb") as f:
        return tomllib.load(f)


def model_path(name: str, man: dict) -> Path:
    if man.get("committed", True):
        return ZOO / name / "model.onnx"
    return CACHE_ZOO / name / "model.onnx"


def refs_path(name: str, man: dict) -> Path | None:
    for key in ("references", "references_small"):
        sec = man.get(key)
        if not sec or "file" not in sec:
            continue
        f = sec["file"]
        p = REPO / f if f.startswith(".cache") else ZOO / name / f
        if p.exists():
            return p
    return None


def case0_inputs(name: str, man: dict) -> list[tuple[str, np.ndarray]]:
    p = refs_path(name, man)
    if p is None:
        raise FileNotFoundError("no reference npz found")
    z = np.load(p)
    feeds = []
    for k, inp in enumerate(man["inputs"]):
        key = f"c0_in{k}"
        if key not in z.files:
            raise KeyError(f"{p} has no {key}")
        feeds.append((inp["name"], np.array(z[key], order="C")))  # 0-d stays 0-d
    return feeds


def run_fedge(model: Path, npys: list[tuple[str, Path, tuple]], threads: int,
              warmup: int, iters: int) -> dict:
    cmd = [str(FEDGE), "bench", str(model)]
    for n, f, shape in npys:
        cmd += ["--input", f"{n}={f}"]
        # fedge rejects an input whose declared shape has unnamed dims
        # ("expected shape [?, 3, ?, ?], got [1, 3, 48, 192]") unless --shape
        # gives it; pass the reference input's own shape for every input.
        if len(shape) > 0:
            cmd += ["--shape", f"{n}={','.join(str(d) for d in shape)}"]
    cmd += ["--threads", str(threads), "--iters", str(iters), "--warmup",
            str(warmup), "--max-seconds", str(MAX_SECONDS), "--json"]
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True,
                           timeout=FEDGE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {FEDGE_TIMEOUT_S:.0f} s",
                "wall_s": time.monotonic() - t0, "cmd": cmd}
    wall = time.monotonic() - t0
    if r.returncode != 0:
        err = (r.stderr.strip() or r.stdout.strip()).splitlines()
        return {"error": " | ".join(err[-3:]) if err else f"exit {r.returncode}",
                "rc": r.returncode, "wall_s": wall, "cmd": cmd}
    for line in reversed(r.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            d = json.loads(line)
            d["wall_s"] = wall
            d["cmd"] = cmd
            return d
    return {"error": f"no JSON in fedge output: {r.stdout[-300:]!r}",
            "wall_s": wall, "cmd": cmd}


def run_ort(model: Path, feeds: list[tuple[str, np.ndarray]], threads: int,
            warmup: int, iters: int) -> dict:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    t0 = time.perf_counter()
    try:
        sess = ort.InferenceSession(str(model), so,
                                    providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    load_ms = (time.perf_counter() - t0) * 1e3
    fd = dict(feeds)
    try:
        for _ in range(warmup):
            sess.run(None, fd)
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            sess.run(None, fd)
            times.append((time.perf_counter() - t) * 1e3)
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}".splitlines()[0]}
    del sess
    return {
        "p50_ms": float(np.percentile(times, 50)),
        "p95_ms": float(np.percentile(times, 95)),
        "mean_ms": statistics.fmean(times),
        "min_ms": min(times),
        "runs": len(times),
        "load_ms": load_ms,
    }


def capped_iters(fd: dict, warmup: int) -> int:
    """Iterations that keep one fedge bench under FEDGE_BUDGET_S."""
    per = max(fd["mean_ms"], fd["p50_ms"]) / 1e3
    left = FEDGE_BUDGET_S - fd.get("load_ms", 0) / 1e3 - warmup * per - 2.0
    return max(3, int(left / per)) if per > 0 else 3


def fmt(x, nd=2):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, float):
        if abs(x) >= 100:
            return f"{x:.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}"
        return f"{x:.{nd}f}"
    return str(x)


def markdown(rows: list[dict]) -> str:
    hdr = ("| model | format | threads | fedge p50 ms | ORT p50 ms | fedge/ORT "
           "| int8/float (fedge) | fedge peak RSS MiB | notes |")
    sep = "|" + "---|" * 9
    out = [hdr, sep]
    for r in rows:
        ratio = f"{r['ratio']:.2f}" if r.get("ratio") is not None else "—"
        q = f"{r['int8_vs_float']:.2f}" if r.get("int8_vs_float") is not None else "—"
        rss = fmt(r.get("fedge_rss_mib"), 1)
        notes = "; ".join(r.get("notes", [])).replace("|", "\\|")
        out.append(f"| {r['model']} | {r['format']} | {r['threads']} | "
                   f"{fmt(r.get('fedge_p50'))} | {fmt(r.get('ort_p50'))} | "
                   f"{ratio} | {q} | {rss} | {notes} |")
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated zoo model names")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--cap", action="append", default=[], metavar="NAME=ITERS",
                    help="fixed lower iters for one model (repeatable)")
    ap.add_argument("--merge", metavar="PREV.json",
                    help="a previous --json output: its rows for models not measured "
                         "in this run are kept, so a few models can be re-measured")
    ap.add_argument("--markdown", metavar="OUT")
    ap.add_argument("--json", metavar="OUT")
    args = ap.parse_args()

    if not FEDGE.exists():
        log(f"error: {FEDGE} not found; run `cargo build --workspace --profile ci`")
        return 2
    threads = [int(t) for t in args.threads.split(",") if t.strip()]
    names = sorted(p.name for p in ZOO.iterdir() if (p / "manifest.toml").exists())
    if args.only:
        want = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in want if n not in names]
        if unknown:
            log(f"error: unknown model(s): {', '.join(unknown)}")
            return 2
        names = [n for n in names if n in want]
    caps = {}
    for c in args.cap:
        n, _, v = c.partition("=")
        caps[n] = int(v)

    log(f"fedge: {FEDGE}; onnxruntime {ort.__version__}; threads {threads}; "
        f"warmup {args.warmup}; iters {args.iters}")
    t_start = time.monotonic()
    fedge_before = fedge_id()
    log(f"fedge binary {fedge_before}")
    rows: list[dict] = []
    skipped: list[tuple[str, str]] = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_vs_ort_"))
    for name in names:
        man = load_manifest(name)
        q = man.get("quantization", {})
        fmt_ = q.get("format", "float")
        mp = model_path(name, man)
        if not mp.exists():
            msg = f"model file absent: {mp.relative_to(REPO)}"
            print(f"skip {name}: {msg}", flush=True)
            skipped.append((name, msg))
            continue
        try:
            feeds = case0_inputs(name, man)
        except Exception as e:  # noqa: BLE001
            msg = f"no inputs: {e}"
            print(f"skip {name}: {msg}", flush=True)
            skipped.append((name, msg))
            continue
        mdir = tmp / name
        mdir.mkdir()
        npys = []
        for k, (n, a) in enumerate(feeds):
            f = mdir / f"in{k}.npy"
            np.save(f, a)
            npys.append((n, f, a.shape))

        waited = wait_quiet()
        if waited > 1:
            log(f"  waited {waited:.0f} s for builds to finish")
        iters = caps.get(name, args.iters)
        for t in threads:
            # A rustc/cargo started by someone else during the pair spoils it:
            # wait for the build to end and measure the pair again (3 tries).
            for attempt in range(3):
                notes: list[str] = []
                if iters != args.iters:
                    notes.append(f"iters capped to {iters} (fedge bench > {FEDGE_BUDGET_S:.0f} s at {args.iters})")
                if busy_builders():
                    wait_quiet()
                log(f"{name} t={t}: fedge ...")
                fd = run_fedge(mp, npys, t, args.warmup, iters)
                if "error" not in fd and fd["wall_s"] > FEDGE_BUDGET_S and iters > 3:
                    new = capped_iters(fd, args.warmup)
                    if new < iters:
                        log(f"  fedge took {fd['wall_s']:.0f} s; capping iters {iters} -> {new}")
                        iters = new
                        notes = [f"iters capped to {iters} (fedge bench took "
                                 f"{fd['wall_s']:.0f} s at {args.iters})"]
                        fd = run_fedge(mp, npys, t, args.warmup, iters)
                ort_iters = iters
                row = {"model": name, "format": fmt_, "threads": t,
                       "float_twin": q.get("float_twin", ""),
                       "model_file": str(mp.relative_to(REPO))}
                if "error" in fd:
                    notes.append(f"fedge failed: {fd['error']}")
                    row["fedge_error"] = fd["error"]
                    log(f"  fedge error: {fd['error']}")
                else:
                    row.update(fedge_p50=fd["p50_ms"], fedge_p95=fd["p95_ms"],
                               fedge_mean=fd["mean_ms"], fedge_min=fd["min_ms"],
                               fedge_rss_mib=fd["peak_rss_mib"],
                               fedge_load_ms=fd["load_ms"], fedge_runs=fd["runs"],
                               fedge_wall_s=fd["wall_s"], fedge_backend=fd.get("backend"))
                    if fd["runs"] < iters:
                        notes.append(f"fedge stopped at {fd['runs']} runs (--max-seconds {MAX_SECONDS})")
                        ort_iters = fd["runs"]
                    log(f"  fedge p50 {fd['p50_ms']:.3f} ms, rss {fd['peak_rss_mib']:.1f} MiB, "
                        f"runs {fd['runs']}, wall {fd['wall_s']:.1f} s")
                log(f"{name} t={t}: onnxruntime ...")
                od = run_ort(mp, feeds, t, args.warmup, ort_iters)
                if "error" in od:
                    notes.append(f"ORT failed: {od['error']}")
                    row["ort_error"] = od["error"]
                    log(f"  ORT error: {od['error']}")
                else:
                    row.update(ort_p50=od["p50_ms"], ort_p95=od["p95_ms"],
                               ort_mean=od["mean_ms"], ort_min=od["min_ms"],
                               ort_runs=od["runs"], ort_load_ms=od["load_ms"])
                    log(f"  ORT p50 {od['p50_ms']:.3f} ms, runs {od['runs']}")
                if row.get("fedge_p50") and row.get("ort_p50"):
                    row["ratio"] = row["fedge_p50"] / row["ort_p50"]
                row["notes"] = notes
                busy = busy_builders()
                if not busy:
                    break
                log(f"  {', '.join(busy)} ran during this measurement")
                if attempt == 2:
                    notes.append("a rustc/cargo build was running at the end of this measurement")
                    break
                wait_quiet()
                log("  measuring again")
            if attempt > 0 and not busy:
                notes.append(f"re-measured ({attempt}x) because a build ran during an earlier try")
            rows.append(row)

    if args.merge:
        prev = json.loads(Path(args.merge).read_text())
        done = {(r["model"], r["threads"]) for r in rows}
        kept = [r for r in prev["rows"] if (r["model"], r["threads"]) not in done]
        for r in kept:
            r.pop("int8_vs_float", None)
        rows = sorted(kept + rows, key=lambda r: (r["model"], r["threads"]))
        log(f"merged {len(kept)} rows from {args.merge}")

    # int8 / float twin on fedge, same thread count
    by = {(r["model"], r["threads"]): r for r in rows}
    for r in rows:
        if r["format"] == "float" or not r["float_twin"]:
            continue
        tw = by.get((r["float_twin"], r["threads"]))
        if tw and r.get("fedge_p50") and tw.get("fedge_p50"):
            r["int8_vs_float"] = r["fedge_p50"] / tw["fedge_p50"]

    total = time.monotonic() - t_start
    fedge_after = fedge_id()
    if fedge_after != fedge_before:
        print(f"WARNING: {FEDGE} changed during the run ({fedge_before} -> {fedge_after})")
    table = markdown(rows)
    print()
    print(table)
    for n, why in skipped:
        print(f"skipped {n}: {why}")
    print(f"total {total:.0f} s")

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "onnxruntime": ort.__version__,
        "python": platform.python_version(),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "threads": threads, "warmup": args.warmup, "iters": args.iters,
        "fedge_max_seconds": MAX_SECONDS, "total_s": total,
        "fedge_binary": fedge_before, "fedge_binary_after": fedge_after,
        "skipped": [{"model": n, "reason": w} for n, w in skipped],
        "merged_from": args.merge,
    }
    if args.markdown:
        Path(args.markdown).write_text(table)
    if args.json:
        for r in rows:
            r.pop("cmd", None)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
