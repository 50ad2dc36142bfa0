//! `FedgeQConv`: a dense 2-D int8 convolution (NCHW, one group) with onnxruntime's
//! requantisation written from the accumulator, for the CPU backend on x86-64 machines with
//! AVX2.
//!
//! fedge's exact int8 convolutions (`import::qexact`) first ran as three ops: the input minus
//! its zero point widened to f32, the float `FedgeConv` on integer-valued weights, and
//! `FedgeRequantize`. That is the float model's work plus two passes, so an int8 model ran
//! slower than its float twin. This op does the same sums in integers:
//!
//! - the input minus its zero point is written once per image as i16, two input channels per
//!   32-bit word (`2j` low, `2j + 1` high), into the same zero-padded, phase-split scratch (or
//!   gathered taps) `FedgeConv` reads ([`crate::conv::Conv`]);
//! - the kernel minus its zero points is packed the same way, one 32-bit word per channel pair
//!   and kernel point, [`QROWS`] output channels per block;
//! - `vpmaddwd` multiplies 16 i16 pairs and adds each pair into eight i32 lanes: 16
//!   multiply-adds per instruction against the float kernel's 8, on half the bytes;
//! - the i32 sums (exact: every `|x - x_zp|`, `|w - w_zp|` is at most 255) are requantised as
//!   `FedgeRequantize` does (`saturate(round_half_even(f32(acc) · m[c]) + y_zp)`), with the
//!   same code, so the bytes are the ones the three-op form gave.
//!
//! For the dynamic quantizer (`ConvInteger` after `DynamicQuantizeLinear`) the input's zero
//! point is a run-time input and the sums are written as `FedgeScaleBias` writes them
//! (`f32(acc) · s + b[c]`, perhaps hard-swished, [`QOut::ScaleBias`]), in place of the cast,
//! subtraction, float kernel and epilogue pass.
//!
//! fedge's import writes this op in place of `DequantizeLinear → FedgeConv → FedgeRequantize`
//! or of the dynamic form (`import::qconv`), only where AVX2 is present; the portable loop
//! exists for correctness.

use std::hash::{Hash, Hasher};

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::to_typed;

use crate::conv::{Activation, COLS, Conv, output_runs, per_pass};
use crate::dwconv::{Geometry, Window};
use crate::tract_ops::{
    MAGIC, QByte, Steps, Swish, Tail, byte_type, fill, quant_params, quantize_one,
};

/// The op type fedge's import writes: attributes as `FedgeConv`'s (`strides`, `dilations`,
/// `kernel_shape`, `pads`) plus `x_zero_point`, `m` (the requantisation multipliers, one per
/// output channel), `zero_point` and `signed` (the output type); inputs `X` `[N, C, H, W]`
/// (u8 or i8), the kernel packed by [`pack`] (i32 words) and `B` `[M]` (i32). With
/// `x_zero_point_input = 1` the input's zero point is a fourth input (a scalar); with
/// `float_output = 1` the output is f32 (`bias`, `mul`, `add`, `hard_swish` and `clip_swish` as `FedgeScaleBias`'s, the
/// scale the last input) in place of `m`, `zero_point` and `signed`.
pub(crate) const QCONV: &str = "FedgeQConv";

/// Output channels per register block.
pub(crate) const QROWS: usize = 4;

/// Two i16 in one word: `lo` in the low half.
fn pair(lo: i32, hi: i32) -> u32 {
    (lo as i16 as u16 as u32) | ((hi as i16 as u16 as u32) << 16)
}

/// `lo · a_lo + hi · a_hi` of two words of i16 pairs, as `vpmaddwd` computes one lane.
fn madd(a: u32, b: u32) -> i32 {
    let (a0, a1) = (a as u16 as i16 as i32, (a >> 16) as u16 as i16 as i32);
    let (b0, b1) = (b as u16 as i16 as i32, (b >> 16) as u16 as i16 as i32);
    a0 * b0 + a1 * b1
}

/// A `[M, C, points]` integer kernel (`points = KH · KW`) in [`QCONV`]'s layout: blocks of
/// [`QROWS`] output channels, then channel pairs × kernel points, [`QROWS`] words per tap;
/// zeros pad the last block and an odd last channel. `None` when a weight does not fit i16.
pub(crate) fn pack(k: &[i32], m: usize, c: usize, points: usize) -> Option<(Vec<u32>, [usize; 3])> {
    if k.len() != m * c * points || k.iter().any(|&v| i16::try_from(v).is_err()) {
        return None;
    }
    let (blocks, taps) = (m.div_ceil(QROWS), c.div_ceil(2) * points);
    let mut packed = vec![0u32; blocks * taps * QROWS];
    for o in 0..m {
        let (bi, r) = (o / QROWS, o % QROWS);
        let w = |ci: usize, p: usize| {
            if ci < c {
                k[(o * c + ci) * points + p]
            } else {
                0
            }
        };
        for j in 0..c.div_ceil(2) {
            for p in 0..points {
                let t = j * points + p;
                packed[(bi * taps + t) * QROWS + r] = pair(w(2 * j, p), w(2 * j + 1, p));
            }
        }
    }
    Some((packed, [blocks, taps, QROWS]))
}

/// What [`QConv`] writes from its i32 sums.
#[derive(Debug, Clone)]
pub(crate) enum QOut {
    /// `saturate(round_half_even(f32(acc) · m[c]) + zero_point)`, 8-bit (`FedgeRequantize`).
    Requantize {
        /// Multipliers, one per output channel.
        m: Vec<f32>,
        zero_point: i32,
        signed: bool,
    },
    /// `f32(acc) · s` and then the tail, in f32 as `FedgeScaleBias` computes it: the dynamic
    /// quantizer's epilogue, `s` a run-time scalar (the last input).
    ScaleBias(Tail),
}

impl QOut {
    /// Everything that tells two outputs apart, floats as bits.
    fn key(&self) -> (u8, i32, Vec<u32>) {
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        match self {
            QOut::Requantize {
                m,
                zero_point,
                signed,
            } => (u8::from(*signed), *zero_point, bits(m)),
            QOut::ScaleBias(tail) => (2, 0, tail.key()),
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct QConv {
    /// Window, kernel size and the gathering choice, shared with the float op (activation
    /// none).
    pub conv: Conv,
    /// The input's zero point; `None`: a run-time scalar, the input after the bias (the
    /// dynamic quantizer's).
    pub x_zero_point: Option<i32>,
    pub out: QOut,
}

impl PartialEq for QConv {
    fn eq(&self, other: &Self) -> bool {
        self.conv == other.conv
            && self.x_zero_point == other.x_zero_point
            && self.out.key() == other.out.key()
    }
}

impl Eq for QConv {}

impl Hash for QConv {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.conv.hash(state);
        self.x_zero_point.hash(state);
        self.out.key().hash(state);
    }
}

impl QConv {
    pub(crate) fn from_node(node: &tract_onnx::pb::NodeProto) -> TractResult<Self> {
        let kernel = node
            .get_attr_opt_tvec::<usize>("kernel_shape")?
            .with_context(|| format!("{QCONV} without its `kernel_shape` attribute"))?;
        ensure!(
            kernel.len() == 2 && kernel.iter().all(|&k| k > 0),
            "{QCONV}: `kernel_shape` must be two positive ints, not {kernel:?}"
        );
        let int =
            |name: &str| -> TractResult<i64> { Ok(node.get_attr_opt::<i64>(name)?.unwrap_or(0)) };
        let floats = |name: &str| -> TractResult<Option<Vec<f32>>> {
            Ok(node.get_attr_opt_tvec::<f32>(name)?.map(|v| v.to_vec()))
        };
        let out = if int("float_output")? != 0 {
            QOut::ScaleBias(Tail::from_node(node, QCONV)?)
        } else {
            let m = floats("m")?.with_context(|| format!("{QCONV} without its `m` attribute"))?;
            ensure!(!m.is_empty(), "{QCONV} with no multiplier");
            let y_zp = int("zero_point")?;
            ensure!(
                (-128..=255).contains(&y_zp),
                "{QCONV}: output zero point {y_zp} is not 8-bit"
            );
            QOut::Requantize {
                m,
                zero_point: y_zp as i32,
                signed: int("signed")? != 0,
            }
        };
        let x_zero_point = if int("x_zero_point_input")? != 0 {
            None
        } else {
            let x_zp = int("x_zero_point")?;
            ensure!(
                (-128..=255).contains(&x_zp),
                "{QCONV}: input zero point {x_zp} is not 8-bit"
            );
            Some(x_zp as i32)
        };
        Ok(QConv {
            conv: Conv {
                window: Window::from_node(node, QCONV)?,
                kernel: [kernel[0], kernel[1]],
                act: Activation::Identity,
            },
            x_zero_point,
            out,
        })
    }

    /// How many inputs the op takes: input, kernel, bias, then the zero point and the scale
    /// where they are run-time values.
    fn arity(&self) -> usize {
        3 + usize::from(self.x_zero_point.is_none())
            + usize::from(matches!(self.out, QOut::ScaleBias(_)))
    }

    /// The output's element type.
    fn out_type(&self) -> DatumType {
        match self.out {
            QOut::Requantize { signed, .. } => byte_type(signed),
            QOut::ScaleBias(_) => f32::datum_type(),
        }
    }

    /// Whether the per-channel parameters fit `m` output channels.
    fn fits(&self, m: usize) -> bool {
        match &self.out {
            QOut::Requantize { m: mult, .. } => mult.len() == m,
            QOut::ScaleBias(tail) => tail.fits(m),
        }
    }

    fn geometry(&self, x: &[usize]) -> TractResult<Geometry> {
        ensure!(x.len() == 4, "{QCONV}: input {x:?} is not NCHW");
        self.conv
            .window
            .geometry(QCONV, [x[2], x[3]], self.conv.kernel)
    }

    fn packed_shape(&self, c: usize, m: usize) -> [usize; 3] {
        let points = self.conv.kernel[0] * self.conv.kernel[1];
        [m.div_ceil(QROWS), c.div_ceil(2) * points, QROWS]
    }

    /// The convolution of `x` (`[N, C, H, W]`, zero point `x_zp`) by the packed kernel `k`
    /// plus `b` (`[M]`), written as `Y` by [`QConv::out`] (`s`: the run-time scale of
    /// [`QOut::ScaleBias`], unused otherwise).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run<X: QByte + Into<i32>, Y: QOutput>(
        &self,
        x: &[X],
        x_shape: &[usize],
        x_zp: i32,
        k: &[u32],
        k_shape: &[usize],
        b: &[i32],
        s: f32,
    ) -> TractResult<Tensor> {
        let g = self.geometry(x_shape)?;
        let (n, c, m) = (x_shape[0], x_shape[1], b.len());
        let want = self.packed_shape(c, m);
        ensure!(
            k_shape == want,
            "{QCONV}: packed kernel {k_shape:?} for {c} input and {m} output channels, not {want:?}"
        );
        ensure!(
            self.fits(m),
            "{QCONV}: per-channel parameters for other than {m} output channels"
        );
        ensure!(
            Y::datum_type() == self.out_type(),
            "{QCONV}: writes {:?}, not {:?}",
            self.out_type(),
            Y::datum_type()
        );
        ensure!(
            x.len() == x_shape.iter().product::<usize>()
                && k.len() == k_shape.iter().product::<usize>(),
            "{QCONV}: data and shape disagree"
        );
        let plane = g.ho * g.wo;
        let pairs = c.div_ceil(2);
        let area = g.h * g.w;
        let conv = &self.conv;
        let source = conv.source(&g, pairs);
        let mut words = vec![0u32; pairs * area];
        let mut scratch = vec![0u32; source.scratch_len];
        let image = c * area;
        let avx2 = crate::conv::fast();
        fill::<Y>(&[n, m, g.ho, g.wo], |out| {
            if out.is_empty() {
                return Ok(());
            }
            for (i, out) in out.chunks_exact_mut(m * plane).enumerate() {
                let x = &x[i * image..(i + 1) * image];
                self.centre(avx2, x, x_zp, c, area, &mut words);
                let src = conv.read(&source, &g, &words, &mut scratch);
                let taps = source.offsets.len();
                tract_linalg::multithread::par_chunks_mut(
                    out,
                    QROWS * plane,
                    m * plane * taps * 2,
                    |first, chunk| {
                        let c0 = first * QROWS;
                        let (g, offsets) = (&source.rows, &source.offsets);
                        let packed = &k[c0 * taps..];
                        self.rows(g, avx2, src, offsets, packed, &b[c0..], c0, s, chunk);
                        Ok(())
                    },
                )?;
            }
            Ok(())
        })
    }

    /// One image's `c` channels of `area` values, minus the zero point, as i16 channel pairs.
    fn centre<X: QByte + Into<i32>>(
        &self,
        avx2: bool,
        x: &[X],
        zp: i32,
        c: usize,
        area: usize,
        words: &mut [u32],
    ) {
        for (j, w) in words.chunks_exact_mut(area).enumerate() {
            let lo = &x[2 * j * area..(2 * j + 1) * area];
            let hi = (2 * j + 1 < c).then(|| &x[(2 * j + 1) * area..(2 * j + 2) * area]);
            let mut done = 0;
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: AVX2 was detected; `lo`, `hi` and `w` are `area` long.
                done = unsafe { centre_avx2(lo, hi, zp, w) };
            }
            let _ = avx2;
            for (i, w) in w.iter_mut().enumerate().skip(done) {
                let h = hi.map_or(0, |hi| hi[i].into() - zp);
                *w = pair(lo[i].into() - zp, h);
            }
        }
    }

    /// Output planes for the channels `c0..` whose packed kernels start `packed` and biases
    /// start `b` (`out.len() / plane` of them, from a block boundary), from `src` read at
    /// `offsets`; `s` as in [`QConv::run`].
    #[allow(clippy::too_many_arguments)]
    fn rows<Y: QOutput>(
        &self,
        g: &Geometry,
        avx2: bool,
        src: &[u32],
        offsets: &[usize],
        packed: &[u32],
        b: &[i32],
        c0: usize,
        s: f32,
        out: &mut [Y],
    ) {
        let plane = g.ho * g.wo;
        let m = out.len() / plane;
        let taps = offsets.len();
        let blocks = m.div_ceil(QROWS);
        let packed = &packed[..blocks * taps * QROWS];
        let positions = g.ho * g.wq;
        let reach = offsets.iter().copied().max().unwrap_or(0);
        let per_pass = per_pass(positions, taps);
        let mut stage = vec![0i32; blocks * QROWS * COLS];
        // The output is written from the registers where positions are output indices (no
        // discarded columns).
        let direct = (avx2 && g.wq == g.wo).then_some(&self.out);
        // Each output channel's steps, for the float output.
        let steps: Vec<Steps> = match &self.out {
            QOut::ScaleBias(tail) => (0..c0 + m).map(|c| tail.channel(c, Some(s))).collect(),
            QOut::Requantize { .. } => vec![],
        };
        let mut j0 = 0;
        while j0 < positions {
            let len = COLS.min(positions - j0);
            assert!(
                reach + j0 + len <= src.len(),
                "{QCONV}: taps read past the input"
            );
            let src = &src[j0..];
            let mut t0 = 0;
            while t0 < taps {
                let t1 = (t0 + per_pass).min(taps);
                for (bi, (wp, acc)) in packed
                    .chunks_exact(taps * QROWS)
                    .zip(stage.chunks_exact_mut(QROWS * COLS))
                    .enumerate()
                {
                    let r0 = bi * QROWS;
                    let rows = QROWS.min(m - r0);
                    let init = (t0 == 0).then(|| &b[r0..r0 + rows]);
                    let (wp, offsets) = (&wp[t0 * QROWS..t1 * QROWS], &offsets[t0..t1]);
                    // The last pass writes the output bytes itself where positions are
                    // output indices (no discarded columns).
                    let direct = direct.filter(|_| t1 == taps).and_then(|o| {
                        let at = out[r0 * plane + j0..].as_mut_ptr();
                        match o {
                            QOut::Requantize { m, zero_point, .. } if Y::BYTES => {
                                const { assert!(!Y::BYTES || std::mem::size_of::<Y>() == 1) };
                                Some(Direct::Bytes(QDirect {
                                    ptr: at.cast::<u8>(),
                                    stride: plane,
                                    m: &m[c0 + r0..c0 + r0 + rows],
                                    params: quant_params(*zero_point, Y::SIGNED),
                                    signed: Y::SIGNED,
                                }))
                            }
                            QOut::ScaleBias(_) if Y::FLOAT => {
                                const { assert!(!Y::FLOAT || std::mem::size_of::<Y>() == 4) };
                                Some(Direct::Floats(FDirect {
                                    ptr: at.cast::<f32>(),
                                    stride: plane,
                                    steps: &steps[c0 + r0..c0 + r0 + rows],
                                }))
                            }
                            _ => None,
                        }
                    });
                    // SAFETY: every offset plus `j0 + len` is within the input (`reach`,
                    // asserted above); `direct` starts at row `r0`, position `j0` of `out`,
                    // which holds `m` one-byte planes, and the block writes rows
                    // `r0..r0 + rows`, positions `j0..j0 + len` of them.
                    unsafe {
                        match rows {
                            4 => qblock::<4>(avx2, acc, len, init, wp, offsets, src, direct),
                            3 => qblock::<3>(avx2, acc, len, init, wp, offsets, src, direct),
                            2 => qblock::<2>(avx2, acc, len, init, wp, offsets, src, direct),
                            _ => qblock::<1>(avx2, acc, len, init, wp, offsets, src, direct),
                        }
                    }
                }
                t0 = t1;
            }
            // Write the finished sums into the output plane, dropping the columns past the
            // output width (unless written directly).
            for r in (0..m).filter(|_| direct.is_none()) {
                let steps = steps.get(c0 + r);
                let acc = &stage[(r / QROWS) * QROWS * COLS + (r % QROWS) * COLS..][..len];
                let dst = &mut out[r * plane..(r + 1) * plane];
                output_runs(g, j0, len, |from, at, n| {
                    let (acc, dst) = (&acc[from..from + n], &mut dst[at..at + n]);
                    Y::finish(&self.out, avx2, c0 + r, steps, acc, dst);
                });
            }
            j0 += len;
        }
    }
}

/// What [`QConv`] writes: the bytes of [`QOut::Requantize`] or the floats of
/// [`QOut::ScaleBias`].
pub(crate) trait QOutput: Datum + Copy + Default {
    /// Whether this is a requantised byte (which the AVX2 sweep may write from the registers).
    const BYTES: bool;
    /// Whether this is [`QOut::ScaleBias`]'s f32.
    const FLOAT: bool;
    /// `QByte::SIGNED` for bytes.
    const SIGNED: bool;
    /// Channel `c`'s finished sums `acc` into `dst` (same length); `steps`: the channel's,
    /// for the float output. Writes nothing when `out` is not this type's kind
    /// (`QConv::run` checks it is).
    fn finish(
        out: &QOut,
        avx2: bool,
        c: usize,
        steps: Option<&Steps>,
        acc: &[i32],
        dst: &mut [Self],
    );
}

/// [`QOutput::finish`] for the 8-bit types.
fn finish_bytes<Y: QByte>(out: &QOut, avx2: bool, c: usize, acc: &[i32], dst: &mut [Y]) {
    if let QOut::Requantize { m, zero_point, .. } = out {
        requantize(avx2, acc, dst, m[c], *zero_point);
    }
}

impl QOutput for u8 {
    const BYTES: bool = true;
    const FLOAT: bool = false;
    const SIGNED: bool = false;
    fn finish(out: &QOut, avx2: bool, c: usize, _: Option<&Steps>, a: &[i32], d: &mut [u8]) {
        finish_bytes(out, avx2, c, a, d);
    }
}

impl QOutput for i8 {
    const BYTES: bool = true;
    const FLOAT: bool = false;
    const SIGNED: bool = true;
    fn finish(out: &QOut, avx2: bool, c: usize, _: Option<&Steps>, a: &[i32], d: &mut [i8]) {
        finish_bytes(out, avx2, c, a, d);
    }
}

impl QOutput for f32 {
    const BYTES: bool = false;
    const FLOAT: bool = true;
    const SIGNED: bool = true;
    fn finish(_: &QOut, avx2: bool, _: usize, steps: Option<&Steps>, acc: &[i32], dst: &mut [f32]) {
        let Some(steps) = steps else {
            return;
        };
        let n = acc.len().min(dst.len());
        let mut done = 0;
        #[cfg(target_arch = "x86_64")]
        if avx2 {
            use std::arch::x86_64::*;
            done = n / 8 * 8;
            for i in (0..done).step_by(8) {
                // SAFETY: AVX2 was detected; `i + 8 <= n`, within both slices.
                unsafe {
                    let v = _mm256_loadu_si256(acc.as_ptr().add(i).cast());
                    _mm256_storeu_ps(dst.as_mut_ptr().add(i), steps8(v, steps));
                }
            }
        }
        let _ = avx2;
        // The sums are exact in f32 (|acc| < 2^24, checked at import), as the accumulator
        // `FedgeScaleBias` reads.
        for (d, &a) in dst[done..n].iter_mut().zip(&acc[done..n]) {
            *d = steps.one(a as f32, 0);
        }
    }
}

/// Eight i32 sums through one channel's `steps` as `FedgeScaleBias` computes them
/// ([`Steps::one`]): each step rounded in f32, no fused multiply-add.
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn steps8(v: std::arch::x86_64::__m256i, steps: &Steps) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let mut v = _mm256_cvtepi32_ps(v);
    if let Some(s) = steps.s {
        v = _mm256_mul_ps(v, _mm256_set1_ps(s));
    }
    if let Some(b) = steps.b {
        v = _mm256_add_ps(v, _mm256_set1_ps(b));
    }
    if let Some(m) = steps.m {
        v = _mm256_mul_ps(v, _mm256_set1_ps(m));
    }
    if let Some(a) = steps.a {
        v = _mm256_add_ps(v, _mm256_set1_ps(a));
    }
    // minps/maxps return the second operand on NaN, as the comparisons of `Steps::one`.
    match steps.swish {
        Swish::None => v,
        Swish::Sigmoid([al, be]) => {
            let t = _mm256_add_ps(_mm256_mul_ps(v, _mm256_set1_ps(al)), _mm256_set1_ps(be));
            let t = _mm256_max_ps(_mm256_min_ps(t, _mm256_set1_ps(1.0)), _mm256_setzero_ps());
            _mm256_mul_ps(v, t)
        }
        Swish::Clip([shift, lo, hi, div]) => {
            let t = _mm256_add_ps(v, _mm256_set1_ps(shift));
            let t = _mm256_min_ps(_mm256_max_ps(t, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
            _mm256_div_ps(_mm256_mul_ps(v, t), _mm256_set1_ps(div))
        }
    }
}

/// `out[i] = saturate(round_half_even(f32(acc[i]) · s) + zp)`, as `FedgeRequantize` computes
/// it (`crate::tract_ops::quantize_one`); eight at a time with AVX2.
fn requantize<Y: QByte>(avx2: bool, acc: &[i32], out: &mut [Y], s: f32, zp: i32) {
    let p = quant_params(zp, Y::SIGNED);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: AVX2 was detected.
        done = unsafe { requantize_avx2(acc, out, s, p) };
    }
    let _ = avx2;
    for (o, &a) in out.iter_mut().zip(acc).skip(done) {
        // Round to nearest, as `cvtdq2ps` does (exact below 2^24).
        *o = Y::narrow(quantize_one::<true>(a as f32, s, p));
    }
}

/// [`requantize`] on every value (the last 1-7 through a masked load); returns how many.
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn requantize_avx2<Y: QByte>(
    acc: &[i32],
    out: &mut [Y],
    s: f32,
    params: (f32, f32, i32),
) -> usize {
    const { assert!(std::mem::size_of::<Y>() == 1) };
    use std::arch::x86_64::*;
    let n = acc.len().min(out.len());
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mut i = 0;
    while i < n {
        let k = (n - i).min(8);
        // SAFETY: lanes `i..i + k` of `acc` and `out` exist; lanes past `k` are masked on
        // load and not stored.
        unsafe {
            let p = acc.as_ptr().add(i);
            let v = if k == 8 {
                _mm256_loadu_si256(p.cast())
            } else {
                let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(k as i32), lanes);
                _mm256_maskload_epi32(p, mask)
            };
            let b = requantize8(v, s, params, Y::SIGNED);
            store_bytes(out.as_mut_ptr().add(i).cast::<u8>(), b, k);
        }
        i += k;
    }
    n
}

/// [`QConv::centre`] 16 values at a time: `w[i] = pair(lo[i] - zp, hi[i] - zp)` (`hi` zero
/// when absent); returns how many it wrote.
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn centre_avx2<X: QByte>(lo: &[X], hi: Option<&[X]>, zp: i32, w: &mut [u32]) -> usize {
    const { assert!(std::mem::size_of::<X>() == 1) };
    use std::arch::x86_64::*;
    let n = lo.len().min(w.len()).min(hi.map_or(usize::MAX, <[X]>::len)) / 16 * 16;
    let vzp = _mm256_set1_epi16(zp as i16);
    let widen = |p: *const X| {
        // SAFETY: the caller reads 16 bytes inside a slice.
        let b = unsafe { _mm_loadu_si128(p.cast()) };
        let v = if X::SIGNED {
            _mm256_cvtepi8_epi16(b)
        } else {
            _mm256_cvtepu8_epi16(b)
        };
        _mm256_sub_epi16(v, vzp)
    };
    for i in (0..n).step_by(16) {
        // SAFETY: `i + 16 <= n`, within every slice.
        unsafe {
            let l = widen(lo.as_ptr().add(i));
            let h = match hi {
                Some(hi) => widen(hi.as_ptr().add(i)),
                None => _mm256_setzero_si256(),
            };
            // Words 0-3 | 8-11 and 4-7 | 12-15, then in order.
            let (a, b) = (_mm256_unpacklo_epi16(l, h), _mm256_unpackhi_epi16(l, h));
            let p = w.as_mut_ptr().add(i).cast::<__m256i>();
            _mm256_storeu_si256(p, _mm256_permute2x128_si256::<0x20>(a, b));
            _mm256_storeu_si256(p.add(1), _mm256_permute2x128_si256::<0x31>(a, b));
        }
    }
    n
}

/// Where [`qsweep_avx2`] writes its finished sums instead of the stage.
#[derive(Clone, Copy)]
enum Direct<'a> {
    Bytes(QDirect<'a>),
    Floats(FDirect<'a>),
}

impl Direct<'_> {
    /// Whether it has what `R` rows need.
    fn rows(&self, r: usize) -> bool {
        match self {
            Direct::Bytes(d) => d.m.len() >= r,
            Direct::Floats(d) => d.steps.len() >= r,
        }
    }
}

/// [`QOut::ScaleBias`] from the registers: row `r`, position `j` at `ptr + r · stride + j`,
/// through `steps[r]`.
#[derive(Clone, Copy)]
struct FDirect<'a> {
    ptr: *mut f32,
    stride: usize,
    steps: &'a [Steps<'a>],
}

/// [`QOut::Requantize`] from the registers: row `r`, position `j` at `ptr + r · stride + j`,
/// requantised with multiplier `m[r]`.
#[derive(Clone, Copy)]
struct QDirect<'a> {
    ptr: *mut u8,
    stride: usize,
    m: &'a [f32],
    /// [`quant_params`] of the zero point and output type.
    params: (f32, f32, i32),
    signed: bool,
}

/// `R` rows of `stage` (`COLS` apart), positions `0..len`:
/// `stage[r][j] = s + Σ_t madd(wp[t · QROWS + r], src[offsets[t] + j])`, where `s` is
/// `bias[r]` when `bias` is given and `stage[r][j]` (a sum over earlier taps) when not. With
/// `direct` (AVX2 only), the sums go requantised to its rows instead.
///
/// # Safety
/// Every `offsets[t] + len` is at most `src.len()`; with `direct`, its rows `0..R` are valid
/// for one-byte writes at positions `0..len` and its `m` has `R` multipliers.
#[allow(clippy::too_many_arguments)]
unsafe fn qblock<const R: usize>(
    avx2: bool,
    stage: &mut [i32],
    len: usize,
    bias: Option<&[i32]>,
    wp: &[u32],
    offsets: &[usize],
    src: &[u32],
    direct: Option<Direct>,
) {
    assert!(
        R <= QROWS
            && bias.is_none_or(|b| b.len() >= R)
            && wp.len() >= offsets.len() * QROWS
            && len <= COLS
            && stage.len() >= (R - 1) * COLS + len.next_multiple_of(8)
            && direct.is_none_or(|d| d.rows(R)),
        "{QCONV}: block reads or writes out of bounds"
    );
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when AVX2 was detected on this machine; the caller
        // vouches for the offsets and `direct`.
        unsafe { qblock_avx2::<R>(stage, len, bias, wp, offsets, src, direct) };
        return;
    }
    assert!(direct.is_none(), "{QCONV}: direct output needs AVX2");
    let _ = avx2;
    for j in 0..len {
        for r in 0..R {
            let mut a = bias.map_or(stage[r * COLS + j], |b| b[r]);
            for (t, &off) in offsets.iter().enumerate() {
                a = a.wrapping_add(madd(wp[t * QROWS + r], src[off + j]));
            }
            stage[r * COLS + j] = a;
        }
    }
}

/// Eight i32 sums requantised (see [`requantize`]) to the low eight bytes.
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn requantize8(
    v: std::arch::x86_64::__m256i,
    s: f32,
    (lo, hi, bias): (f32, f32, i32),
    signed: bool,
) -> std::arch::x86_64::__m128i {
    use std::arch::x86_64::*;
    let q = _mm256_mul_ps(_mm256_cvtepi32_ps(v), _mm256_set1_ps(s));
    // maxps(q, lo) is `lo` for NaN, as `quantize_one`'s comparison.
    let q = _mm256_min_ps(_mm256_max_ps(q, _mm256_set1_ps(lo)), _mm256_set1_ps(hi));
    let r = _mm256_add_epi32(
        _mm256_castps_si256(_mm256_add_ps(q, _mm256_set1_ps(MAGIC))),
        _mm256_set1_epi32(bias),
    );
    // In range already, so the saturating packs only narrow.
    let w = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256::<1>(r));
    if signed {
        _mm_packs_epi16(w, w)
    } else {
        _mm_packus_epi16(w, w)
    }
}

/// The low `n` (1-8) bytes of `b` to `dst`.
///
/// # Safety
/// `dst` must be valid for `n` one-byte writes; the machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_bytes(dst: *mut u8, b: std::arch::x86_64::__m128i, n: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        if n == 8 {
            _mm_storel_epi64(dst.cast(), b);
        } else {
            let bytes = (_mm_cvtsi128_si64(b) as u64).to_le_bytes();
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, n);
        }
    }
}

/// The first `n` (1-8) floats of `f` to `dst`.
///
/// # Safety
/// `dst` must be valid for `n` f32 writes; the machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
unsafe fn store_floats(dst: *mut f32, f: std::arch::x86_64::__m256, n: usize) {
    use std::arch::x86_64::*;
    // SAFETY: the caller's contract.
    unsafe {
        if n == 8 {
            _mm256_storeu_ps(dst, f);
        } else {
            let mut tmp = [0f32; 8];
            _mm256_storeu_ps(tmp.as_mut_ptr(), f);
            std::ptr::copy_nonoverlapping(tmp.as_ptr(), dst, n);
        }
    }
}

/// [`qblock`] with AVX2: `R` rows × 16 positions in registers across all taps, the last 1-15
/// positions in one sweep (the last register's loads masked; stage rows are [`COLS`] long,
/// so whole registers are stored).
///
/// # Safety
/// The machine must have AVX2; the bounds [`qblock`] asserts and its contract must hold.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn qblock_avx2<const R: usize>(
    stage: &mut [i32],
    len: usize,
    bias: Option<&[i32]>,
    wp: &[u32],
    offsets: &[usize],
    src: &[u32],
    direct: Option<Direct>,
) {
    let mut j = 0;
    // SAFETY (every call): positions `j..j + 8 (V - 1) + last` are below `len`.
    unsafe {
        while j + 16 <= len {
            qsweep_avx2::<R, 2, true>(stage, j, 8, bias, wp, offsets, src, direct);
            j += 16;
        }
        match len - j {
            0 => {}
            8 => qsweep_avx2::<R, 1, true>(stage, j, 8, bias, wp, offsets, src, direct),
            rest @ 1..=7 => {
                qsweep_avx2::<R, 1, false>(stage, j, rest, bias, wp, offsets, src, direct)
            }
            rest => qsweep_avx2::<R, 2, false>(stage, j, rest - 8, bias, wp, offsets, src, direct),
        }
    }
}

/// Positions `j..j + 8 (V - 1) + last` of [`qblock_avx2`]: `R × V` registers of eight i32
/// sums across all taps; unless `WHOLE`, lanes past `last` of the last register read no input.
///
/// # Safety
/// As [`qblock_avx2`], for those positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn qsweep_avx2<const R: usize, const V: usize, const WHOLE: bool>(
    stage: &mut [i32],
    j: usize,
    last: usize,
    bias: Option<&[i32]>,
    wp: &[u32],
    offsets: &[usize],
    src: &[u32],
    direct: Option<Direct>,
) {
    use std::arch::x86_64::*;
    let (sp, wpp, op) = (src.as_ptr(), wp.as_ptr(), stage.as_mut_ptr());
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(last as i32), lanes);
    // SAFETY: the caller's contract; the last register's input lanes past `last` are masked,
    // and stage rows hold whole registers up to `COLS`.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); V]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, a) in a.iter_mut().enumerate() {
                *a = match bias {
                    Some(b) => _mm256_set1_epi32(b[r]),
                    None => _mm256_loadu_si256(op.add(r * COLS + j + 8 * v).cast()),
                };
            }
        }
        for (t, &off) in offsets.iter().enumerate() {
            let p = sp.add(off + j);
            let mut x = [_mm256_setzero_si256(); V];
            for (v, x) in x.iter_mut().enumerate() {
                *x = if WHOLE || v + 1 < V {
                    _mm256_loadu_si256(p.add(8 * v).cast())
                } else {
                    _mm256_maskload_epi32(p.add(8 * v).cast(), mask)
                };
            }
            let w = wpp.add(t * QROWS);
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_epi32(*w.add(r) as i32);
                for (a, &x) in a.iter_mut().zip(&x) {
                    *a = _mm256_add_epi32(*a, _mm256_madd_epi16(wv, x));
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                let n = if WHOLE || v + 1 < V { 8 } else { last };
                match direct {
                    Some(Direct::Bytes(d)) => {
                        let b = requantize8(a, d.m[r], d.params, d.signed);
                        store_bytes(d.ptr.add(r * d.stride + j + 8 * v), b, n);
                    }
                    Some(Direct::Floats(d)) => {
                        let f = steps8(a, &d.steps[r]);
                        store_floats(d.ptr.add(r * d.stride + j + 8 * v), f, n);
                    }
                    None => _mm256_storeu_si256(op.add(r * COLS + j + 8 * v).cast(), a),
                }
            }
        }
    }
}

impl Op for QConv {
    fn name(&self) -> StaticName {
        QCONV.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let x_zp = self
            .x_zero_point
            .map_or("at run time".to_string(), |z| z.to_string());
        let out = match &self.out {
            QOut::Requantize {
                zero_point, signed, ..
            } => format!(
                "requantised to {} (zero point {zero_point})",
                if *signed { "i8" } else { "u8" }
            ),
            QOut::ScaleBias(tail) => format!(
                "f32 times a run-time scale, then {:?}",
                tail.channel(0, None)
            ),
        };
        Ok(vec![format!(
            "{}, x zero point {x_zp}, {out}",
            self.conv.window.describe(Activation::Identity),
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for QConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        ensure!(
            inputs.len() == self.arity(),
            "{QCONV} takes input, kernel, bias{}{}",
            if self.x_zero_point.is_none() {
                ", zero point"
            } else {
                ""
            },
            if self.arity() > 3 + usize::from(self.x_zero_point.is_none()) {
                ", scale"
            } else {
                ""
            }
        );
        let (x, k, b) = (&inputs[0], &inputs[1], &inputs[2]);
        let x_zp = match self.x_zero_point {
            Some(z) => z,
            None => {
                let z = &inputs[3];
                ensure!(z.len() == 1, "{QCONV}: a zero point of {} values", z.len());
                let z = z.cast_to::<i32>()?;
                let z = z.try_as_plain_ram()?.as_slice::<i32>()?[0];
                ensure!(
                    (-128..=255).contains(&z),
                    "{QCONV}: input zero point {z} is not 8-bit"
                );
                z
            }
        };
        let s = match self.out {
            QOut::ScaleBias(_) => {
                let s = inputs.last().context("no scale")?;
                ensure!(s.len() == 1, "{QCONV}: a scale of {} values", s.len());
                let s = s.cast_to::<f32>()?;
                s.try_as_plain_ram()?.as_slice::<f32>()?[0]
            }
            QOut::Requantize { .. } => 1.0,
        };
        let (xp, kp, bp) = (
            x.try_as_plain_ram()?,
            k.try_as_plain_ram()?,
            b.try_as_plain_ram()?,
        );
        let kw: &[i32] = kp.as_slice::<i32>()?;
        // SAFETY: i32 and u32 have the same size, alignment and valid bit patterns.
        let kw: &[u32] = unsafe { std::slice::from_raw_parts(kw.as_ptr().cast(), kw.len()) };
        let (ks, bs) = (k.shape(), bp.as_slice::<i32>()?);
        let xs = x.shape();
        macro_rules! go {
            ($x:ty, $y:ty) => {
                self.run::<$x, $y>(xp.as_slice()?, xs, x_zp, kw, ks, bs, s)?
            };
        }
        let t = match (x.datum_type(), self.out_type()) {
            (DatumType::U8, DatumType::U8) => go!(u8, u8),
            (DatumType::U8, DatumType::I8) => go!(u8, i8),
            (DatumType::U8, _) => go!(u8, f32),
            (DatumType::I8, DatumType::U8) => go!(i8, u8),
            (DatumType::I8, DatumType::I8) => go!(i8, i8),
            (DatumType::I8, _) => go!(i8, f32),
            (dt, _) => bail!("{QCONV} takes a u8 or i8 input, not {dt:?}"),
        };
        Ok(tvec!(t.into_tvalue()))
    }
}

impl InferenceRulesOp for QConv {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, self.arity())?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[1].datum_type, i32::datum_type())?;
        s.equals(&inputs[2].datum_type, i32::datum_type())?;
        s.equals(&outputs[0].datum_type, self.out_type())?;
        s.equals(&inputs[0].rank, 4)?;
        s.equals(&inputs[1].rank, 3)?;
        s.equals(&inputs[2].rank, 1)?;
        s.equals(&outputs[0].rank, 4)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[2].shape[0], &outputs[0].shape[1])?;
        for axis in 0..2 {
            let k = self.conv.kernel[axis];
            s.given(&inputs[0].shape[2 + axis], move |s, len| {
                if let Ok(len) = len.to_usize() {
                    let out =
                        self.conv.window.out_len(axis, len, k).with_context(|| {
                            format!("{QCONV}: kernel {k} larger than padded {len}")
                        })?;
                    s.equals(&outputs[0].shape[2 + axis], out.to_dim())?;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    as_op!();
    to_typed!();
}

impl TypedOp for QConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == self.arity(),
            "{QCONV} takes {} inputs, not {}",
            self.arity(),
            inputs.len()
        );
        let (x, k, b) = (inputs[0], inputs[1], inputs[2]);
        ensure!(
            matches!(x.datum_type, DatumType::U8 | DatumType::I8)
                && k.datum_type == i32::datum_type()
                && b.datum_type == i32::datum_type(),
            "{QCONV} takes a u8 or i8 input, an i32 kernel and an i32 bias"
        );
        let (Some(k_shape), Ok(m), Ok(c)) = (
            k.shape.as_concrete(),
            b.shape.first().map_or(Ok(0), |d| d.to_usize()),
            x.shape.get(1).map_or(Ok(0), |d| d.to_usize()),
        ) else {
            bail!("{QCONV}: channel counts and the kernel's shape must be known")
        };
        let want = self.packed_shape(c, m);
        ensure!(
            x.rank() == 4 && b.rank() == 1 && k_shape == want && self.fits(m),
            "{QCONV}: input {:?}, packed kernel {k_shape:?}, bias {:?} and the per-channel parameters disagree (kernel {want:?} expected)",
            x.shape,
            b.shape,
        );
        let mut shape: TVec<TDim> = tvec![x.shape[0].clone(), m.to_dim()];
        for axis in 0..2 {
            let len = x.shape[2 + axis].to_usize().with_context(|| {
                format!("{QCONV}: spatial size {} not known", x.shape[2 + axis])
            })?;
            let out = self
                .conv
                .window
                .out_len(axis, len, self.conv.kernel[axis])
                .with_context(|| format!("{QCONV}: kernel larger than padded input"))?;
            shape.push(out.to_dim());
        }
        Ok(tvec!(self.out_type().fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let out = self.output_facts(inputs)?;
        let taps = inputs[1].shape.get(1).and_then(|d| d.to_usize().ok());
        Ok(tvec!((
            Cost::FMA(i32::datum_type()),
            out[0].shape.volume() * taps.unwrap_or(0) * 2
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;

    /// A geometry to test: input `[N, C, H, W]`, `M` outputs, kernel, strides, pads
    /// (top, left, bottom, right), dilations.
    struct Case {
        x: [usize; 4],
        m: usize,
        kernel: [usize; 2],
        strides: [usize; 2],
        pads: [usize; 4],
        dilations: [usize; 2],
    }

    /// The definition, one output at a time in i64, requantised by `quantize_one` or scaled,
    /// biased and hard-swished step by step in f32.
    fn reference<X: QByte + Into<i32>>(
        op: &QConv,
        case: &Case,
        (x, x_zp): (&[X], i32),
        k: &[i32],
        b: &[i32],
        s: f32,
    ) -> Vec<f64> {
        let [n, c, h, w] = case.x;
        let [kh, kw] = case.kernel;
        let o = &op.conv.window;
        let (ho, wo) = (
            o.out_len(0, h, kh).expect("fits"),
            o.out_len(1, w, kw).expect("fits"),
        );
        let mut out = Vec::new();
        for ni in 0..n {
            for mi in 0..case.m {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut acc = b[mi] as i64;
                        for ci in 0..c {
                            for ky in 0..kh {
                                for kx in 0..kw {
                                    let y = (oy * o.strides[0] + ky * o.dilations[0]) as isize
                                        - o.pads[0] as isize;
                                    let xx = (ox * o.strides[1] + kx * o.dilations[1]) as isize
                                        - o.pads[1] as isize;
                                    if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                        continue;
                                    }
                                    let xv: i32 = x
                                        [((ni * c + ci) * h + y as usize) * w + xx as usize]
                                        .into();
                                    let wv = k[((mi * c + ci) * kh + ky) * kw + kx];
                                    acc += (xv - x_zp) as i64 * wv as i64;
                                }
                            }
                        }
                        let acc = acc as i32 as f32;
                        out.push(match &op.out {
                            QOut::Requantize {
                                m,
                                zero_point,
                                signed,
                            } => {
                                let p = quant_params(*zero_point, *signed);
                                quantize_one::<true>(acc, m[mi], p) as f64
                            }
                            QOut::ScaleBias(t) => {
                                let at =
                                    |v: &[f32]| v.get(if v.len() == 1 { 0 } else { mi }).copied();
                                let mut v = acc * s;
                                if let Some(b) = at(&t.bias) {
                                    v += b;
                                }
                                if let Some(m) = at(&t.mul) {
                                    v *= m;
                                }
                                if let Some(a) = at(&t.add) {
                                    v += a;
                                }
                                match t.swish {
                                    Swish::None => {}
                                    Swish::Sigmoid([a, b]) => v *= (v * a + b).clamp(0.0, 1.0),
                                    Swish::Clip([sh, lo, hi, d]) => {
                                        v = v * (v + sh).clamp(lo, hi) / d
                                    }
                                }
                                v as f64
                            }
                        });
                    }
                }
            }
        }
        out
    }

    /// `case` run as `out` (with `Y` its type) against [`reference`].
    fn check<X: QByte + Into<i32>, Y: QOutput + Into<f64>>(
        case: &Case,
        out: QOut,
        dynamic_zp: bool,
        seed: &mut u64,
    ) {
        let [_, c, kh, kw] = [case.x[0], case.x[1], case.kernel[0], case.kernel[1]];
        let x: Vec<X> = (0..case.x.iter().product::<usize>())
            .map(|_| {
                let v = (lcg(seed) % 256) as i32;
                X::narrow(if X::SIGNED { v - 128 } else { v })
            })
            .collect();
        // Centred weights span the whole range an 8-bit kernel minus its zero point has.
        let k: Vec<i32> = (0..case.m * c * kh * kw)
            .map(|_| (lcg(seed) % 511) as i32 - 255)
            .collect();
        let b: Vec<i32> = (0..case.m)
            .map(|_| (lcg(seed) % 20001) as i32 - 10000)
            .collect();
        let x_zp = if X::SIGNED { -3 } else { 131 };
        let op = QConv {
            conv: Conv {
                window: Window {
                    strides: case.strides,
                    dilations: case.dilations,
                    pads: case.pads,
                },
                kernel: case.kernel,
                act: Activation::Identity,
            },
            x_zero_point: (!dynamic_zp).then_some(x_zp),
            out,
        };
        let s = 3.7e-4;
        let (packed, shape) = pack(&k, case.m, c, kh * kw).expect("fits i16");
        let got = op
            .run::<X, Y>(&x, &case.x, x_zp, &packed, &shape, &b, s)
            .expect("run");
        let got: Vec<f64> = got
            .try_as_plain_ram()
            .expect("plain")
            .as_slice::<Y>()
            .expect("typed")
            .iter()
            .map(|&v| v.into())
            .collect();
        let want = reference(&op, case, (&x, x_zp), &k, &b, s);
        assert_eq!(got, want, "{:?} {:?}", case.x, op.out);
    }

    /// Requantisation to `Y`: small multipliers, and one large enough to saturate most
    /// outputs.
    fn requantize_to<Y: QByte>(m: usize) -> QOut {
        QOut::Requantize {
            m: (0..m)
                .map(|i| if i == 1 { 0.05 } else { 1e-4 * (i + 1) as f32 })
                .collect(),
            zero_point: if Y::SIGNED { 5 } else { 117 },
            signed: Y::SIGNED,
        }
    }

    #[test]
    fn matches_the_definition_for_strides_pads_dilations_and_channel_counts() {
        let mut seed = 5;
        let cases = [
            // 1 x 1 read in place; odd channel count; five output channels (a partial block).
            Case {
                x: [1, 5, 6, 7],
                m: 9,
                kernel: [1, 1],
                strides: [1, 1],
                pads: [0; 4],
                dilations: [1, 1],
            },
            // Padded 3 x 3 over a batch of two: discarded scratch columns.
            Case {
                x: [2, 8, 13, 11],
                m: 6,
                kernel: [3, 3],
                strides: [1, 1],
                pads: [1; 4],
                dilations: [1, 1],
            },
            // Strided, dilated, asymmetric padding.
            Case {
                x: [1, 3, 17, 19],
                m: 5,
                kernel: [3, 3],
                strides: [2, 2],
                pads: [1, 2, 0, 1],
                dilations: [2, 1],
            },
            // A strided 1 x 1 kernel: gathered taps.
            Case {
                x: [1, 4, 9, 10],
                m: 4,
                kernel: [1, 1],
                strides: [2, 2],
                pads: [0; 4],
                dilations: [1, 1],
            },
            // 180 tap pairs over 168 positions: two passes over the accumulators.
            Case {
                x: [1, 40, 12, 12],
                m: 7,
                kernel: [3, 3],
                strides: [1, 1],
                pads: [1; 4],
                dilations: [1, 1],
            },
        ];
        for case in &cases {
            let m = case.m;
            check::<u8, u8>(case, requantize_to::<u8>(m), false, &mut seed);
            check::<i8, i8>(case, requantize_to::<i8>(m), false, &mut seed);
            check::<u8, i8>(case, requantize_to::<i8>(m), false, &mut seed);
            check::<i8, u8>(case, requantize_to::<u8>(m), true, &mut seed);
            // The dynamic quantizer's epilogue: per-channel, one or no bias, a batch norm as
            // multiplier and addend, either hard-swish.
            let per_channel: Vec<f32> = (0..m).map(|i| i as f32 * 0.37 - 1.1).collect();
            let mul: Vec<f32> = (0..m).map(|i| 1.2 - i as f32 * 0.05).collect();
            for (bias, affine, swish) in [
                (per_channel.clone(), false, Swish::Sigmoid([1.0 / 6.0, 0.5])),
                (vec![0.25], false, Swish::None),
                (vec![], false, Swish::Sigmoid([0.2, 0.5])),
                (per_channel, true, Swish::Clip([3.0, 0.0, 6.0, 6.0])),
            ] {
                let out = QOut::ScaleBias(Tail {
                    bias,
                    mul: if affine { mul.clone() } else { vec![] },
                    add: if affine { vec![-0.3] } else { vec![] },
                    swish,
                });
                check::<u8, f32>(case, out.clone(), true, &mut seed);
                check::<i8, f32>(case, out, false, &mut seed);
            }
        }
    }

    #[test]
    fn block_loops_agree_with_the_portable_sum() {
        if !crate::conv::fast() {
            return;
        }
        let mut seed = 9;
        let taps = 7;
        let wp: Vec<u32> = (0..taps * QROWS).map(|_| lcg(&mut seed)).collect();
        let offsets: Vec<usize> = (0..taps).map(|t| t * 70 + t % 3).collect();
        let src: Vec<u32> = (0..taps * 70 + 2 + COLS).map(|_| lcg(&mut seed)).collect();
        let bias: Vec<i32> = (0..QROWS as i32).map(|r| r * 1000 - 1500).collect();
        for len in [1, 7, 8, 9, 15, 16, 17, 40, 63, 64] {
            for with_bias in [true, false] {
                let mut a = vec![0i32; QROWS * COLS];
                for (i, v) in a.iter_mut().enumerate() {
                    *v = i as i32 - 100;
                }
                let mut b = a.clone();
                let init = with_bias.then_some(&bias[..]);
                // SAFETY: every offset + 64 is inside `src`; no direct output.
                unsafe {
                    qblock::<3>(false, &mut a, len, init, &wp, &offsets, &src, None);
                    qblock::<3>(true, &mut b, len, init, &wp, &offsets, &src, None);
                }
                for r in 0..3 {
                    assert_eq!(
                        a[r * COLS..r * COLS + len],
                        b[r * COLS..r * COLS + len],
                        "len {len} row {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn kernels_past_i16_and_mismatched_shapes_are_rejected() {
        assert!(pack(&[40_000], 1, 1, 1).is_none());
        assert!(pack(&[1, 2, 3], 1, 2, 1).is_none());
        let op = QConv {
            conv: Conv {
                window: Window {
                    strides: [1, 1],
                    dilations: [1, 1],
                    pads: [0; 4],
                },
                kernel: [3, 3],
                act: Activation::Identity,
            },
            x_zero_point: Some(0),
            out: QOut::Requantize {
                m: vec![1.0; 2],
                zero_point: 0,
                signed: false,
            },
        };
        let (k, ks) = pack(&[1; 2 * 3 * 9], 2, 3, 9).expect("fits");
        let x = vec![0u8; 3 * 5 * 5];
        let b = [0i32; 2];
        // A kernel larger than the input, a packed kernel for other channel counts, and a
        // multiplier count that disagrees: errors, not panics.
        assert!(
            op.run::<u8, u8>(&x[..3 * 2 * 2], &[1, 3, 2, 2], 0, &k, &ks, &b, 1.0)
                .is_err()
        );
        assert!(
            op.run::<u8, u8>(&x[..25], &[1, 1, 5, 5], 0, &k, &ks, &b, 1.0)
                .is_err()
        );
        assert!(
            op.run::<u8, u8>(&x, &[1, 3, 5, 5], 0, &k, &ks, &b[..1], 1.0)
                .is_err()
        );
        // The wrong output type for the op's epilogue.
        assert!(
            op.run::<u8, f32>(&x, &[1, 3, 5, 5], 0, &k, &ks, &b, 1.0)
                .is_err()
        );
        assert!(
            op.run::<u8, u8>(&x, &[1, 3, 5, 5], 0, &k, &ks, &b, 1.0)
                .is_ok()
        );
    }
}
