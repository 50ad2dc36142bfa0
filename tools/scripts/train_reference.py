#!/usr/bin/env python3
"""Check a model fedge's `train::export_onnx` wrote against onnxruntime.

Runs MODEL on X (a .npy array fed to the model's first input) with onnxruntime's CPU provider
and compares the `probabilities` output with WANT (a .npy array fedge computed): the argmax must
agree on every row and the probabilities within --atol. With the `onnx` package present the file
also goes through `onnx.checker.check_model(full_check=True)`.

Prints one JSON line (rows, argmax mismatches, max abs difference, onnxruntime version) and exits
0 on agreement, 1 otherwise.

    python tools/scripts/train_reference.py MODEL.onnx X.npy WANT.npy [--atol 1e-5]
"""

import argparse
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("x")
    ap.add_argument("want")
    ap.add_argument("--atol", type=float, default=1e-5)
    args = ap.parse_args()

    checked = False
    try:
        import onnx

        onnx.checker.check_model(onnx.load(args.model), full_check=True)
        checked = True
    except ImportError:
        pass

    x = np.load(args.x)
    want = np.load(args.want)
    sess = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    (got,) = sess.run(["probabilities"], {name: x})

    mismatches = int(np.sum(got.argmax(axis=1) != want.argmax(axis=1)))
    max_abs = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
    ok = got.shape == want.shape and mismatches == 0 and max_abs <= args.atol
    print(
        json.dumps(
            {
                "rows": int(got.shape[0]),
                "argmax_mismatches": mismatches,
                "max_abs_diff": max_abs,
                "atol": args.atol,
                "onnx_checker": checked,
                "onnxruntime": ort.__version__,
                "ok": bool(ok),
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
