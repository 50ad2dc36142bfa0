#!/usr/bin/env python3
"""Flower baseline for `fedge demo` on the identical split (issue 6, "Baselines").

Reads a split written by `fedge demo --dump-split DIR` (dev-NN.csv per device, test.csv,
split.json with the hyper-parameters and initial global parameters), then runs, in numpy:

* federated training for the same rounds: every device trains the same softmax-regression
  head from the current global model with the same mini-batch SGD as fedge's devices
  (runtime/src/train/sgd.rs: learning rate, batch size, epochs, momentum, L2 and FedProx μ
  from split.json; the gradient is the batch mean of the cross-entropy gradient plus
  λ·w + μ·(w − w_g), heavy-ball momentum v ← m·v + g, w ← w − lr·v, a fresh velocity each
  round); the updates are aggregated by Flower's own code:
  `flwr.server.strategy.aggregate.aggregate` (FedAvg's sample-weighted mean) for fedavg and
  fedprox, `flwr.server.strategy.FedAdam.aggregate_fit` for fedadam; the global model is
  evaluated on the test split after every round;
* a centralized baseline: the same head from the same start trained on the union of the shards
  for rounds × epochs epochs with the same SGD (fedge's own centralized baseline, likewise).

Differences from fedge: the shuffling (numpy's PCG64 seeded with (seed, device, round) here,
SplitMix64 seeded with a hash of seed, device, job and round in fedge) and the arithmetic
(float64 here; fedge keeps f32 parameters and accumulates gradients in f64).

Usage (with the venv of tools/scripts/venv_fl.sh):
    fedge demo --seed 7 --dump-split /tmp/split-7 --json > fedge.json
    $PY tools/scripts/flower_baseline.py /tmp/split-7 [--strategy fedavg] [--out result.json]
Prints one line per round on stderr and one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import flwr
from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.strategy import FedAdam
from flwr.server.strategy.aggregate import aggregate

logging.getLogger("flwr").setLevel(logging.ERROR)


def read_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    a = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64, ndmin=2)
    return a[:, :-1], a[:, -1].astype(np.int64)


def unpack(params: np.ndarray, features: int, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """fedge's layout: W (classes × features, row-major) then b (classes)."""
    w = params[: classes * features].reshape(classes, features)
    return w, params[classes * features :]


def loss_and_accuracy(params, x, y, features, classes) -> tuple[float, float]:
    w, b = unpack(params, features, classes)
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-logp[np.arange(len(y)), y].mean())
    acc = float((z.argmax(axis=1) == y).mean())
    return loss, acc


def gradient(params, x, y, features, classes) -> np.ndarray:
    """Mean cross-entropy gradient over the batch, in fedge's parameter layout."""
    w, b = unpack(params, features, classes)
    z = x @ w.T + b
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(y)), y] -= 1.0
    p /= len(y)
    return np.concatenate([(p.T @ x).ravel(), p.sum(axis=0)])


def sgd(params, x, y, hp, epochs, rng, anchor=None) -> np.ndarray:
    """fedge's `train::train`: per epoch a fresh permutation, batches of `batch_size`."""
    w = params.copy()
    v = np.zeros_like(w)
    lr, m, lam = hp["learning_rate"], hp["momentum"], hp["weight_decay"]
    mu = hp["proximal_mu"]
    f, c = hp["features"], hp["classes"]
    bs = hp["batch_size"]
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for s in range(0, len(y), bs):
            idx = order[s : s + bs]
            g = gradient(w, x[idx], y[idx], f, c)
            if lam > 0:
                g += lam * w
            if mu > 0 and anchor is not None:
                g += mu * (w - anchor)
            v = m * v + g
            w -= lr * v
    return w


def fit_res(params: np.ndarray, n: int):
    ok = Status(code=Code.OK, message="")
    res = FitRes(status=ok, parameters=ndarrays_to_parameters([params]), num_examples=n, metrics={})
    return (None, res)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("split", type=Path, help="directory written by fedge demo --dump-split")
    ap.add_argument("--strategy", choices=["fedavg", "fedprox", "fedadam"], default="fedavg")
    ap.add_argument("--mu", type=float, help="FedProx μ (default: split.json's, else 0.1)")
    ap.add_argument("--rounds", type=int, default=None, help="default: split.json's")
    ap.add_argument("--shuffle-seed", type=int, help="seeds the SGD shuffling (default: split's)")
    ap.add_argument("--out", type=Path, help="also write the JSON object here")
    a = ap.parse_args()

    hp = json.loads((a.split / "split.json").read_text())
    if hp["head"] != "softmax":
        sys.exit("only the softmax head is reproduced here")
    rounds = a.rounds or hp["rounds"]
    if a.strategy == "fedprox":
        hp["proximal_mu"] = a.mu if a.mu is not None else (hp["proximal_mu"] or 0.1)
    else:
        hp["proximal_mu"] = 0.0
    f, c = hp["features"], hp["classes"]
    shards = [read_csv(a.split / f"dev-{i:02d}.csv") for i in range(hp["devices"])]
    xt, yt = read_csv(a.split / "test.csv")
    init = np.asarray(hp["initial_params"], dtype=np.float64)
    seed = hp["seed"] if a.shuffle_seed is None else a.shuffle_seed

    fedadam = None
    if a.strategy == "fedadam":
        # Flower's defaults, which are fedge's: eta 0.1, beta_1 0.9, beta_2 0.99, tau 1e-9.
        fedadam = FedAdam(
            initial_parameters=ndarrays_to_parameters([init]),
            eta=0.1,
            beta_1=0.9,
            beta_2=0.99,
            tau=1e-9,
        )

    glob = init.copy()
    accs, losses = [], []
    for r in range(1, rounds + 1):
        results = []
        for i, (x, y) in enumerate(shards):
            rng = np.random.default_rng([seed, i, r])
            results.append((sgd(glob, x, y, hp, hp["epochs"], rng, anchor=glob), len(y)))
        if fedadam is None:
            (glob,) = aggregate([([p], n) for p, n in results])
        else:
            params, _ = fedadam.aggregate_fit(r, [fit_res(p, n) for p, n in results], [])
            (glob,) = parameters_to_ndarrays(params)
        loss, acc = loss_and_accuracy(glob, xt, yt, f, c)
        accs.append(acc)
        losses.append(loss)
        print(f"round {r:>3}/{rounds}  test accuracy {acc:.4f}  loss {loss:.4f}", file=sys.stderr)

    xu = np.concatenate([s[0] for s in shards])
    yu = np.concatenate([s[1] for s in shards])
    central_hp = dict(hp, proximal_mu=0.0)
    central_rng = np.random.default_rng([seed, 10**6])
    central = sgd(init, xu, yu, central_hp, rounds * hp["epochs"], central_rng)
    c_loss, c_acc = loss_and_accuracy(central, xt, yt, f, c)

    out = {
        "flwr": flwr.__version__,
        "numpy": np.__version__,
        "strategy": a.strategy,
        "aggregation": "flwr.server.strategy.FedAdam.aggregate_fit"
        if fedadam
        else "flwr.server.strategy.aggregate.aggregate",
        "rounds": rounds,
        "devices": hp["devices"],
        "alpha": hp["alpha"],
        "seed": hp["seed"],
        "shuffle_seed": seed,
        "learning_rate": hp["learning_rate"],
        "batch_size": hp["batch_size"],
        "epochs": hp["epochs"],
        "momentum": hp["momentum"],
        "weight_decay": hp["weight_decay"],
        "proximal_mu": hp["proximal_mu"],
        "train_rows": int(len(yu)),
        "test_rows": int(len(yt)),
        "accuracy": accs,
        "loss": losses,
        "final_accuracy": accs[-1],
        "final_loss": losses[-1],
        "centralized_accuracy": c_acc,
        "centralized_loss": c_loss,
    }
    text = json.dumps(out)
    if a.out:
        a.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
