#!/usr/bin/env python3
"""Reference vectors for fedge-fl's strategies, computed by Flower itself.

Writes models/fl/tests/vectors/<strategy>.json, read by models/fl/tests/flower.rs.

Every expected model comes from a real Flower strategy object's `aggregate_fit`
(FedAvg, FedProx, FedAvgM, FedAdam, FedYogi, FedAdagrad, FedMedian,
FedTrimmedAvg, Krum), fed `FitRes` objects built with `ndarrays_to_parameters`,
exactly as Flower's server loop calls it. The stateful strategies (FedAvgM and
the FedOpt family) are run for several rounds on the same object, so their
server state (momentum, m_t, v_t, current weights) carries over as in Flower.
As a cross-check, the script also recomputes the stateless results with the
pure functions of `flwr.server.strategy.aggregate` (aggregate,
aggregate_inplace, aggregate_median, aggregate_trimmed_avg, aggregate_krum)
and asserts they agree.

Inputs are float32 values (what fedge aggregates), handed to Flower as
float64 arrays so the expected outputs are Flower's arithmetic without float32
rounding; the Rust tests document the tolerances this implies. Inputs are
written with the shortest repr that round-trips their float32 value, outputs
with full float64 precision. All data come from numpy's default_rng with fixed
seeds, so the files are reproducible byte for byte with the pinned versions.

Usage (venv_fl.sh makes or reuses the pinned venv and prints its python):
  "$(tools/scripts/venv_fl.sh)" tools/scripts/flower_vectors.py [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
from pathlib import Path

import numpy as np
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
)
from flwr.server.strategy import aggregate as agg

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "models" / "fl" / "tests" / "vectors"

logging.getLogger("flwr").setLevel(logging.ERROR)


# ---------------------------------------------------------------- data


def f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def make_updates(rng, center: np.ndarray, n: int, spread: float, byzantine: int = 0):
    """n client updates around `center` (float32); the last `byzantine` are far off."""
    dim = center.shape[0]
    updates = []
    for i in range(n):
        params = center + f32(rng.normal(0.0, spread, dim))
        if i >= n - byzantine:
            params = params + f32(rng.normal(5.0, 3.0, dim))
        updates.append(
            {"client": f"c{i:02d}", "num_samples": int(rng.integers(1, 500)), "params": f32(params)}
        )
    return updates


def fit_results(updates):
    """(ClientProxy, FitRes) pairs as Flower's server hands them to aggregate_fit."""
    ok = Status(code=Code.OK, message="")
    return [
        (
            None,  # the proxy is not read by any aggregate_fit used here
            FitRes(
                status=ok,
                parameters=ndarrays_to_parameters([u["params"].astype(np.float64)]),
                num_examples=u["num_samples"],
                metrics={},
            ),
        )
        for u in updates
    ]


def run_round(strategy, server_round: int, updates) -> np.ndarray:
    params, _ = strategy.aggregate_fit(server_round, fit_results(updates), [])
    (out,) = parameters_to_ndarrays(params)
    assert out.dtype == np.float64, out.dtype
    return out


def pairs(updates):
    return [([u["params"].astype(np.float64)], u["num_samples"]) for u in updates]


# ---------------------------------------------------------------- JSON


def f32_list(a: np.ndarray) -> list:
    # str(np.float32) is the shortest decimal that round-trips the float32 value.
    return [float(str(np.float32(x))) for x in a]


def f64_list(a: np.ndarray) -> list:
    return [float(x) for x in a]


def round_json(server_round: int, updates, expected: np.ndarray) -> dict:
    return {
        "round": server_round,
        "updates": [
            {"client": u["client"], "num_samples": u["num_samples"], "params": f32_list(u["params"])}
            for u in updates
        ],
        "expected": f64_list(expected),
    }


# ---------------------------------------------------------------- strategies


def stateless_cases(name, make, pure, specs, seed):
    """One round per case; `pure(updates, params)` recomputes with flwr's aggregate module."""
    cases = []
    for k, (n, dim, params, byz) in enumerate(specs):
        rng = np.random.default_rng([seed, k])
        initial = f32(rng.normal(0.0, 1.0, dim))
        updates = make_updates(rng, initial, n, 0.3, byz)
        expected = run_round(make(params), 1, updates)
        check = pure(updates, params)
        np.testing.assert_allclose(expected, check, rtol=1e-12, atol=1e-12)
        cases.append(
            {
                "name": f"{name}_{k}_n{n}_d{dim}",
                "params": params,
                "initial": f32_list(initial),
                "rounds": [round_json(1, updates, expected)],
            }
        )
    return cases


def stateful_cases(name, make, specs, seed, rounds=3):
    """Several rounds on one strategy object; each round's clients start from the last model."""
    cases = []
    for k, (n, dim, params) in enumerate(specs):
        rng = np.random.default_rng([seed, k])
        initial = f32(rng.normal(0.0, 1.0, dim))
        strategy = make(params, initial)
        global_model = initial
        out_rounds = []
        for r in range(1, rounds + 1):
            # Clients drift in a shared direction plus noise, like local training would.
            drift = f32(rng.normal(0.0, 0.2, dim))
            updates = make_updates(rng, global_model + drift, n - (r % 2), 0.1)
            expected = run_round(strategy, r, updates)
            out_rounds.append(round_json(r, updates, expected))
            global_model = f32(expected)
        cases.append(
            {
                "name": f"{name}_{k}_n{n}_d{dim}",
                "params": params,
                "initial": f32_list(initial),
                "rounds": out_rounds,
            }
        )
    return cases


def initial_parameters(initial):
    return ndarrays_to_parameters([initial.astype(np.float64)])


def fedavg_pure(updates, _params):
    (a,) = agg.aggregate(pairs(updates))
    (b,) = agg.aggregate_inplace(fit_results(updates))
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    return a


def krum_pure(updates, p):
    (a,) = agg.aggregate_krum(pairs(updates), p["byzantine"], p["keep"] if p["keep"] > 1 else 0)
    return a


def build_all():
    files = {}
    avg_specs = [(2, 8, {}, 0), (3, 16, {}, 0), (5, 24, {}, 0), (10, 12, {}, 0)]
    files["fedavg"] = (
        "FedAvg.aggregate_fit (aggregate_inplace)",
        stateless_cases("fedavg", lambda p: FedAvg(), fedavg_pure, avg_specs, 1),
    )
    prox_specs = [(3, 16, {"proximal_mu": 0.01}, 0), (6, 20, {"proximal_mu": 1.0}, 0)]
    files["fedprox"] = (
        "FedProx.aggregate_fit (FedAvg's aggregate_inplace)",
        stateless_cases(
            "fedprox", lambda p: FedProx(proximal_mu=p["proximal_mu"]), fedavg_pure, prox_specs, 2
        ),
    )
    med_specs = [(3, 16, {}, 0), (4, 16, {}, 0), (7, 20, {}, 2), (10, 12, {}, 3)]
    files["fedmedian"] = (
        "FedMedian.aggregate_fit (aggregate_median)",
        stateless_cases(
            "fedmedian",
            lambda p: FedMedian(),
            lambda u, p: agg.aggregate_median(pairs(u))[0],
            med_specs,
            3,
        ),
    )
    trim_specs = [
        (5, 16, {"beta": 0.2}, 1),
        (7, 16, {"beta": 0.1}, 0),
        (10, 20, {"beta": 0.3}, 3),
        (9, 12, {"beta": 0.45}, 2),
        (4, 12, {"beta": 0.0}, 0),
    ]
    files["fedtrimmedavg"] = (
        "FedTrimmedAvg.aggregate_fit (aggregate_trimmed_avg)",
        stateless_cases(
            "fedtrimmedavg",
            lambda p: FedTrimmedAvg(beta=p["beta"]),
            lambda u, p: agg.aggregate_trimmed_avg(pairs(u), p["beta"])[0],
            trim_specs,
            4,
        ),
    )
    krum_specs = [
        (5, 16, {"byzantine": 1, "keep": 1}, 1),
        (7, 20, {"byzantine": 2, "keep": 1}, 2),
        (9, 16, {"byzantine": 2, "keep": 4}, 2),
        (10, 12, {"byzantine": 3, "keep": 3}, 3),
    ]
    files["krum"] = (
        "Krum.aggregate_fit (aggregate_krum; num_clients_to_keep = keep when keep > 1)",
        stateless_cases(
            "krum",
            lambda p: Krum(
                num_malicious_clients=p["byzantine"],
                num_clients_to_keep=p["keep"] if p["keep"] > 1 else 0,
            ),
            krum_pure,
            krum_specs,
            5,
        ),
    )
    avgm_specs = [
        (4, 16, {"server_learning_rate": 1.0, "server_momentum": 0.9}),
        (6, 12, {"server_learning_rate": 0.5, "server_momentum": 0.0}),
        (5, 20, {"server_learning_rate": 0.7, "server_momentum": 0.5}),
    ]
    files["fedavgm"] = (
        "FedAvgM.aggregate_fit over consecutive rounds",
        stateful_cases(
            "fedavgm",
            lambda p, init: FedAvgM(initial_parameters=initial_parameters(init), **p),
            avgm_specs,
            6,
        ),
    )
    opt = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}
    opt_specs = {
        "fedadam": [
            (4, 16, {}),
            (5, 12, {"eta": 0.05, "beta_1": 0.8, "beta_2": 0.95, "tau": 1e-3}),
            (3, 20, {"eta": 0.3, "beta_1": 0.0, "beta_2": 0.5, "tau": 0.1}),
        ],
        "fedyogi": [
            (4, 16, {}),
            (5, 12, {"eta": 0.1, "beta_1": 0.5, "beta_2": 0.9, "tau": 1e-2}),
        ],
        "fedadagrad": [(4, 16, {}), (5, 12, {"eta": 0.5, "tau": 1e-2})],
    }
    for seed, (name, cls) in enumerate(opt.items(), start=7):
        files[name] = (
            f"{cls.__name__}.aggregate_fit over consecutive rounds",
            stateful_cases(
                name,
                lambda p, init, cls=cls: cls(initial_parameters=initial_parameters(init), **p),
                opt_specs[name],
                seed,
            ),
        )
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    versions = {m: importlib.metadata.version(m) for m in ("flwr", "numpy")}
    total = 0
    for strategy, (source, cases) in build_all().items():
        doc = {
            "generator": "tools/scripts/flower_vectors.py",
            "flwr": versions["flwr"],
            "numpy": versions["numpy"],
            "strategy": strategy,
            "flower": f"flwr.server.strategy.{source}",
            "cases": cases,
        }
        path = args.out / f"{strategy}.json"
        text = json.dumps(doc, indent=1) + "\n"
        path.write_text(text)
        total += len(text)
        print(f"{path.relative_to(REPO)}: {len(cases)} cases, {len(text)} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
