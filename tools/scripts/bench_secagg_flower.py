#!/usr/bin/env python3
"""Cost of Flower's own SecAgg+ primitives, per device and on the server.

Simulates one SecAgg+ round of N devices in a single process by calling, in
the same order and with the same arguments, the functions that flwr 1.42.0's
client mod (flwr/client/mod/secure_aggregation/secaggplus_mod.py) and server
workflow (flwr/server/workflow/secure_aggregation/secaggplus_workflow.py) call.
Message passing, ConfigRecord/state (de)serialization and the Grid are left
out: only the cryptographic / arithmetic work is timed.

Devices sit on a shuffled ring, as in the workflow; each one's neighbourhood is
itself plus K/2 devices on each side (K must be even), so it makes K + 1 Shamir
shares (Flower's `num_shares`, one kept by the device) with threshold T.
Each device's update is P float32 values uniform in [-1, 1); clipping_range is
1.0, quantization (target) range 2**16, modulus 2**(16 + ceil(log2 N)), and
num_examples == max_weight so the weighting factor is exactly 2**16.
With --drop-percent D, round(N * D / 100) devices drop after the share-keys
stage: they send no masked vector and the server rebuilds their sk1 from
shares and re-derives their pairwise masks.

Device stages timed (wall with time.perf_counter, CPU with time.process_time):
  setup         2 x generate_key_pairs (SECP384R1), PEM serialization
  share_keys    os.urandom(32) self-mask seed, create_shares for it and for sk1,
                per neighbour: generate_shared_key(sk2, pk2) + encrypt (Fernet)
  collect       decrypt the K received ciphertexts, parameters_multiply,
                quantize, factor_combine, pseudo_rand_gen self mask, per
                neighbour generate_shared_key(sk1, pk1) + pseudo_rand_gen pairwise
                mask, parameters_mod, ndarray_to_bytes
  unmask        pick the seed / sk1 shares to return
Server (aggregator_ms): bytes_to_ndarray + parameters_addition + parameters_mod
of the masked vectors, combine_shares for every device, self-mask or pairwise
mask re-derivation and removal, parameters_mod, factor_extract, dequantize.

sent_bytes is the mean, over surviving devices, of the payload bytes a device
uploads: PEM pk1 + pk2, the Fernet ciphertexts, the masked vector as
ndarray_to_bytes (npy format, int64, plus the 1-element factor array) and the
Shamir shares sent back in the unmask stage; node-ID lists and protobuf
framing are not counted. "exact" checks that the unmasked sum equals the sum
(mod the modulus) of the survivors' quantized inputs, factor included.

Usage:
  .cache/venv-fl/bin/python tools/scripts/bench_secagg_flower.py \\
      --devices 50 --params 100000 --neighbours 40 --threshold 21 [--drop-percent 10]
Prints one JSON line.
"""

import argparse
import json
import math
import os
import random
import time
from statistics import fmean as mean

import numpy as np
from flwr.common import bytes_to_ndarray, ndarray_to_bytes
from flwr.common.secure_aggregation.crypto.shamir import combine_shares, create_shares
from flwr.common.secure_aggregation.crypto.symmetric_encryption import (
    decrypt,
    encrypt,
    generate_shared_key,
)
from flwr.common.secure_aggregation.ndarrays_arithmetic import (
    factor_combine,
    factor_extract,
    get_parameters_shape,
    parameters_addition,
    parameters_mod,
    parameters_multiply,
    parameters_subtraction,
)
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.common.secure_aggregation.secaggplus_utils import (
    pseudo_rand_gen,
    share_keys_plaintext_concat,
    share_keys_plaintext_separate,
)
from flwr.supercore.primitives.asymmetric import (
    bytes_to_private_key,
    bytes_to_public_key,
    generate_key_pairs,
    private_key_to_bytes,
    public_key_to_bytes,
)

CLIPPING_RANGE = 1.0
TARGET_RANGE = 2**16
MAX_WEIGHT = 1.0
NUM_EXAMPLES = 1


class Meter:
    """Accumulates wall and CPU seconds of the `with` blocks it is used in."""

    def __init__(self) -> None:
        self.wall = 0.0
        self.cpu = 0.0

    def __enter__(self) -> "Meter":
        self._w0, self._c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall += time.perf_counter() - self._w0
        self.cpu += time.process_time() - self._c0


class Device:
    """State of one SecAgg+ client, mirroring secaggplus_mod.SecAggPlusState."""

    def __init__(self, nid: int, share_num: int, threshold: int, mod_range: int):
        self.nid = nid
        self.share_num = share_num
        self.threshold = threshold
        self.mod_range = mod_range
        self.rd_seed_share_dict: dict[int, bytes] = {}
        self.sk1_share_dict: dict[int, bytes] = {}
        self.ss2_dict: dict[int, bytes] = {}
        self.stage_meters = {s: Meter() for s in ("setup", "share_keys", "collect", "unmask")}
        self.sent = {"public_keys": 0, "encrypted_shares": 0, "masked_vector": 0, "unmask_shares": 0}

    def setup(self) -> tuple[bytes, bytes]:
        """Stage 0 (`_setup`): two key pairs, serialized."""
        with self.stage_meters["setup"]:
            sk1, pk1 = generate_key_pairs()
            sk2, pk2 = generate_key_pairs()
            self.sk1, self.pk1 = private_key_to_bytes(sk1), public_key_to_bytes(pk1)
            self.sk2, self.pk2 = private_key_to_bytes(sk2), public_key_to_bytes(pk2)
        self.sent["public_keys"] = len(self.pk1) + len(self.pk2)
        return self.pk1, self.pk2

    def share_keys(self, public_keys: dict[int, tuple[bytes, bytes]]) -> dict[int, bytes]:
        """Stage 1 (`_share_keys`): share rd_seed and sk1, encrypt for each neighbour."""
        with self.stage_meters["share_keys"]:
            self.public_keys_dict = public_keys
            pk_list = [pk for pair in public_keys.values() for pk in pair]
            if len(set(pk_list)) != len(pk_list):
                raise ValueError("Some public keys are identical")
            self.rd_seed = os.urandom(32)
            b_shares = create_shares(self.rd_seed, self.threshold, self.share_num)
            sk1_shares = create_shares(self.sk1, self.threshold, self.share_num)
            out = {}
            for idx, (nid, (_, pk2)) in enumerate(public_keys.items()):
                if nid == self.nid:
                    self.rd_seed_share_dict[nid] = b_shares[idx]
                    self.sk1_share_dict[nid] = sk1_shares[idx]
                else:
                    shared_key = generate_shared_key(
                        bytes_to_private_key(self.sk2), bytes_to_public_key(pk2)
                    )
                    self.ss2_dict[nid] = shared_key
                    plaintext = share_keys_plaintext_concat(
                        self.nid, nid, b_shares[idx], sk1_shares[idx]
                    )
                    out[nid] = encrypt(shared_key, plaintext)
        self.sent["encrypted_shares"] = sum(len(c) for c in out.values())
        return out

    def collect(
        self, ciphertexts: dict[int, bytes], update: np.ndarray
    ) -> tuple[list[bytes], list[np.ndarray]]:
        """Stage 2 (`_collect_masked_vectors`); also returns the unmasked quantized input."""
        with self.stage_meters["collect"]:
            available = []
            for src, ciphertext in ciphertexts.items():
                plaintext = decrypt(self.ss2_dict[src], ciphertext)
                actual_src, dst, rd_seed_share, sk1_share = share_keys_plaintext_separate(
                    plaintext
                )
                if actual_src != src or dst != self.nid:
                    raise ValueError("Misrouted ciphertext")
                available.append(src)
                self.rd_seed_share_dict[src] = rd_seed_share
                self.sk1_share_dict[src] = sk1_share
            q_ratio = round(NUM_EXAMPLES / MAX_WEIGHT * TARGET_RANGE)
            parameters = parameters_multiply([update], q_ratio / TARGET_RANGE)
            quantized = factor_combine(
                q_ratio, quantize(parameters, CLIPPING_RANGE, TARGET_RANGE)
            )
            dimensions_list = [a.shape for a in quantized]
            private_mask = pseudo_rand_gen(self.rd_seed, self.mod_range, dimensions_list)
            masked = parameters_addition(quantized, private_mask)
            for node_id in available:
                shared_key = generate_shared_key(
                    bytes_to_private_key(self.sk1),
                    bytes_to_public_key(self.public_keys_dict[node_id][0]),
                )
                pairwise_mask = pseudo_rand_gen(shared_key, self.mod_range, dimensions_list)
                if self.nid > node_id:
                    masked = parameters_addition(masked, pairwise_mask)
                else:
                    masked = parameters_subtraction(masked, pairwise_mask)
            masked = parameters_mod(masked, self.mod_range)
            payload = [ndarray_to_bytes(arr) for arr in masked]
        self.sent["masked_vector"] = sum(len(b) for b in payload)
        return payload, quantized

    def unmask(self, active: list[int], dead: list[int]) -> tuple[list[int], list[bytes]]:
        """Stage 3 (`_unmask`): seed shares of survivors, sk1 shares of dropped."""
        with self.stage_meters["unmask"]:
            if len(active) < self.threshold:
                raise ValueError("Available neighbours number smaller than threshold")
            shares = [self.rd_seed_share_dict[nid] for nid in active]
            shares += [self.sk1_share_dict[nid] for nid in dead]
        self.sent["unmask_shares"] = sum(len(s) for s in shares)
        return active + dead, shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--params", type=int, required=True)
    ap.add_argument("--neighbours", type=int, required=True, help="even; shares = K + 1")
    ap.add_argument("--threshold", type=int, required=True)
    ap.add_argument("--drop-percent", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0, help="ring order, drops, inputs")
    args = ap.parse_args()
    n, p, k, t = args.devices, args.params, args.neighbours, args.threshold
    if k % 2 or not 0 < k < n or not 2 <= t <= k + 1:
        ap.error("need even 0 < K < N and 2 <= T <= K + 1")
    mod_range = 2 ** (16 + math.ceil(math.log2(n)))
    rng = random.Random(args.seed)
    data_rng = np.random.default_rng(args.seed)

    # Workflow setup stage: shuffled ring, neighbourhood = self + K/2 each side.
    nids = list(range(1, n + 1))
    rng.shuffle(nids)
    half = k // 2
    neighbours = {
        nid: {nids[(i + off) % n] for off in range(-half, half + 1)}
        for i, nid in enumerate(nids)
    }
    devices = {nid: Device(nid, k + 1, t, mod_range) for nid in nids}
    dropped = set(rng.sample(nids, round(n * args.drop_percent / 100)))
    survivors = [nid for nid in nids if nid not in dropped]

    public_keys = {nid: dev.setup() for nid, dev in devices.items()}
    forward: dict[int, dict[int, bytes]] = {nid: {} for nid in nids}
    for nid, dev in devices.items():
        out = dev.share_keys({m: public_keys[m] for m in neighbours[nid]})
        for dst, ciphertext in out.items():
            forward[dst][nid] = ciphertext

    masked_payloads = []
    expected = None
    for nid in survivors:
        update = data_rng.uniform(-1.0, 1.0, p).astype(np.float32)
        payload, quantized = devices[nid].collect(forward[nid], update)
        masked_payloads.append(payload)
        expected = quantized if expected is None else parameters_addition(expected, quantized)
    expected = parameters_mod(expected, mod_range)

    server = Meter()
    with server:
        masked_vector = None
        for payload in masked_payloads:
            vec = [bytes_to_ndarray(b) for b in payload]
            masked_vector = vec if masked_vector is None else parameters_addition(masked_vector, vec)
        masked_vector = parameters_mod(masked_vector, mod_range)

    replies = []
    for nid in survivors:
        active = [m for m in neighbours[nid] if m not in dropped]
        dead = [m for m in neighbours[nid] if m in dropped]
        replies.append(devices[nid].unmask(active, dead))

    with server:
        collected: dict[int, list[bytes]] = {nid: [] for nid in nids}
        for owners, shares in replies:
            for owner, share in zip(owners, shares, strict=True):
                collected[owner].append(share)
        shapes = get_parameters_shape(masked_vector)
        for nid, share_list in collected.items():
            if len(share_list) < t:
                raise SystemExit(f"device {nid}: {len(share_list)} shares < threshold {t}")
            secret = combine_shares(share_list)
            if nid not in dropped:
                private_mask = pseudo_rand_gen(secret, mod_range, shapes)
                masked_vector = parameters_subtraction(masked_vector, private_mask)
            else:
                for neighbor_nid in neighbours[nid] - {nid}:
                    shared_key = generate_shared_key(
                        bytes_to_private_key(secret),
                        bytes_to_public_key(public_keys[neighbor_nid][0]),
                    )
                    pairwise_mask = pseudo_rand_gen(shared_key, mod_range, shapes)
                    if nid > neighbor_nid:
                        masked_vector = parameters_addition(masked_vector, pairwise_mask)
                    else:
                        masked_vector = parameters_subtraction(masked_vector, pairwise_mask)
        recon = parameters_mod(masked_vector, mod_range)
        q_total_ratio, recon_params = factor_extract(recon)
        aggregated = dequantize(recon_params, CLIPPING_RANGE, TARGET_RANGE)
        offset = -(len(survivors) - 1) * CLIPPING_RANGE
        for vec in aggregated:
            vec += offset
            vec *= TARGET_RANGE / q_total_ratio

    exact = all(np.array_equal(a, b) for a, b in zip(recon, expected, strict=True))
    surv = [devices[nid] for nid in survivors]
    sent_parts = {key: round(mean([d.sent[key] for d in surv])) for key in surv[0].sent}
    print(json.dumps({
        "devices": n,
        "params": p,
        "neighbours": k,
        "threshold": t,
        "dropped": len(dropped),
        "mod_range": mod_range,
        "device_ms": round(mean([sum(m.wall for m in d.stage_meters.values()) for d in surv]) * 1e3, 2),
        "device_cpu_ms": round(mean([sum(m.cpu for m in d.stage_meters.values()) for d in surv]) * 1e3, 2),
        "device_stage_ms": {
            s: round(mean([d.stage_meters[s].wall for d in surv]) * 1e3, 2)
            for s in surv[0].stage_meters
        },
        "aggregator_ms": round(server.wall * 1e3, 2),
        "aggregator_cpu_ms": round(server.cpu * 1e3, 2),
        "sent_bytes": sum(sent_parts.values()),
        "sent_bytes_parts": sent_parts,
        "exact": exact,
    }))


if __name__ == "__main__":
    main()
