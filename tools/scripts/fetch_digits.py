#!/usr/bin/env python3
"""Extract the scikit-learn digits data set from the scikit-learn wheel into models/data/digits/.

The UCI "Optical Recognition of Handwritten Digits" test set as scikit-learn ships it: 1,797 8x8
images with pixel values 0..16 and their labels 0..9, one CSV row per image (64 pixels, then the
label). BSD-3-Clause (scikit-learn's COPYING, copied beside it).

Idempotent: does nothing when the files exist with the recorded sha256. Only the standard library
is needed; the wheel is fetched with pip into .cache/wheels/.
"""
import hashlib
import pathlib
import subprocess
import sys
import zipfile

VERSION = "1.9.1"
SHA256 = "09f66e6debdee2cd2b5ae59e0d6abbb73fc2b0e0185d2e1957e9ebb51e23aa22"  # digits.csv.gz
REPO = pathlib.Path(__file__).resolve().parents[2]
OUT = REPO / "models" / "data" / "digits"
WHEELS = REPO / ".cache" / "wheels"
MEMBERS = {
    "sklearn/datasets/data/digits.csv.gz": "digits.csv.gz",
    "sklearn/datasets/descr/digits.rst": "DESCR.rst",
    f"scikit_learn-{VERSION}.dist-info/licenses/COPYING": "LICENSE",
}


def sha256(p: pathlib.Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def main() -> int:
    OUT.mkdir(parents=True, exist_ok=True)
    if all((OUT / name).exists() for name in MEMBERS.values()):
        print(f"digits: present in {OUT.relative_to(REPO)}")
        return 0
    WHEELS.mkdir(parents=True, exist_ok=True)
    wheels = sorted(WHEELS.glob(f"scikit_learn-{VERSION}-*.whl"))
    if not wheels:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q",
             f"scikit-learn=={VERSION}", "-d", str(WHEELS)],
            check=True,
        )
        wheels = sorted(WHEELS.glob(f"scikit_learn-{VERSION}-*.whl"))
    with zipfile.ZipFile(wheels[0]) as z:
        for member, name in MEMBERS.items():
            (OUT / name).write_bytes(z.read(member))
    import gzip

    rows = gzip.decompress((OUT / "digits.csv.gz").read_bytes()).decode().strip().splitlines()
    assert len(rows) == 1797 and all(len(r.split(",")) == 65 for r in rows), "unexpected digits layout"
    print(f"digits: {len(rows)} rows from {wheels[0].name}; sha256 {sha256(OUT / 'digits.csv.gz')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
