#!/usr/bin/env python3
"""Reference epsilons for fedge-fl's RDP accountant, computed by Google's dp-accounting.

Writes models/fl/tests/vectors/dp_rdp.json, read by models/fl/tests/dp.rs.

Each case is a Poisson-sampled Gaussian mechanism (noise multiplier z, sampling
rate q) composed `steps` times, exactly as DP-SGD / DP-FedAvg accounting does:

    accountant = dp_accounting.rdp.RdpAccountant()          # default orders
    accountant.compose(PoissonSampledDpEvent(q, GaussianDpEvent(z)), steps)
    epsilon, order = accountant.get_epsilon_and_optimal_order(delta)

The grid covers small and large sampling rates (1e-4 .. 1), noise multipliers
from 0.5 to 5, 1 to 10^4 steps and delta 1e-5 and 1e-6. The optimal order is
recorded too (as a diagnostic: fedge is only required to match epsilon). The
file is deterministic for the pinned versions in requirements-fl.txt.

Usage (venv_fl.sh makes or reuses the pinned venv and prints its python):
  "$(tools/scripts/venv_fl.sh)" tools/scripts/dp_vectors.py [--out FILE]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
from pathlib import Path

import dp_accounting
from dp_accounting.rdp import RdpAccountant

REPO = Path(__file__).resolve().parents[2]
OUT = REPO / "models" / "fl" / "tests" / "vectors" / "dp_rdp.json"

# (noise multiplier, sampling rate, steps, delta)
CASES = [
    # DP-SGD-like: small q, many steps
    (1.1, 0.004, 10_000, 1e-5),  # Abadi et al. MNIST setting
    (1.1, 0.004, 1_000, 1e-5),
    (0.5, 0.001, 10_000, 1e-5),
    (0.5, 0.0001, 1_000, 1e-6),
    (0.7, 0.01, 1_000, 1e-5),
    (0.8, 0.002, 5_000, 1e-6),
    (1.0, 0.01, 10_000, 1e-5),
    (1.0, 0.0001, 10_000, 1e-6),
    (1.3, 0.02, 2_000, 1e-5),
    (1.5, 0.001, 10_000, 1e-6),
    (2.0, 0.05, 500, 1e-5),
    (2.0, 0.005, 10_000, 1e-6),
    (3.0, 0.1, 1_000, 1e-5),
    (4.0, 0.01, 10_000, 1e-6),
    (5.0, 0.001, 10_000, 1e-5),
    (5.0, 0.2, 10_000, 1e-6),
    # cross-device FL-like: moderate q, fewer rounds
    (0.6, 0.1, 100, 1e-5),
    (0.9, 0.05, 300, 1e-6),
    (1.2, 0.25, 200, 1e-5),
    (1.7, 0.3, 50, 1e-6),
    (2.5, 0.5, 100, 1e-5),
    (3.5, 0.02, 3_000, 1e-5),
    # large q and the unsampled Gaussian (q = 1)
    (0.5, 1.0, 1, 1e-5),
    (1.0, 1.0, 1, 1e-6),
    (1.0, 1.0, 10, 1e-5),
    (2.0, 1.0, 100, 1e-5),
    (5.0, 1.0, 1_000, 1e-6),
    (0.8, 0.9, 20, 1e-5),
    # single steps and tiny budgets
    (0.5, 0.01, 1, 1e-5),
    (1.0, 0.1, 1, 1e-6),
    (2.0, 0.001, 10, 1e-5),
    (4.5, 0.5, 1, 1e-6),
]


def epsilon(z: float, q: float, steps: int, delta: float) -> tuple[float, float]:
    accountant = RdpAccountant()
    event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z))
    accountant.compose(event, steps)
    eps, order = accountant.get_epsilon_and_optimal_order(delta)
    return float(eps), float(order)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    cases = []
    for z, q, steps, delta in CASES:
        eps, order = epsilon(z, q, steps, delta)
        if not math.isfinite(eps) or eps <= 0:
            raise SystemExit(f"case z={z} q={q} steps={steps} delta={delta}: epsilon {eps}")
        cases.append(
            {
                "noise_multiplier": z,
                "sampling_rate": q,
                "steps": steps,
                "delta": delta,
                "epsilon": eps,
                "optimal_order": order,
            }
        )
    versions = {m: importlib.metadata.version(m) for m in ("dp-accounting", "scipy", "numpy")}
    doc = {
        "generator": "tools/scripts/dp_vectors.py",
        "reference": "dp_accounting.rdp.RdpAccountant, default orders, PoissonSampledDpEvent(q, GaussianDpEvent(z)) x steps",
        "versions": versions,
        "cases": cases,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {len(cases)} cases to {args.out}")


if __name__ == "__main__":
    main()
