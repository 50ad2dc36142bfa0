//! `FedgeDepthwiseConv`: a 2-D depthwise convolution (NCHW, float32, one filter per channel)
//! for the CPU backend.
//!
//! tract 0.23.9 has vectorised depthwise kernels for arm64 and wasm only; on x86-64 every
//! output point walks its taps one scalar multiply-add at a time, and depthwise convolutions
//! were 40-45 % of the MobileNet-style zoo models' time. This op turns every tap into one long
//! contiguous multiply-add over a whole block of output rows:
//!
//! - each channel's input is copied once into a zero-padded scratch plane, split by stride
//!   phase (`s_h · s_w` planes, `(y, x)` of the padded input at `(y % s_h, x % s_w)` and
//!   `(y / s_h, x / s_w)`), so a strided tap reads a contiguous run too;
//! - the output is accumulated in rows as wide as a phase plane (the columns past the output
//!   width are discarded), so tap `(ky, kx)` is `acc[j] += w · plane[j + offset]` over the
//!   block, with `offset` fixed per tap;
//! - blocks of output rows are sized to stay in the L1 cache, and channels are split across
//!   tract's executor when it has threads.
//!
//! On x86-64 with AVX2 and FMA (detected at run time) the loop is compiled for them; elsewhere
//! for the target's baseline. The sum over taps is in a different order from tract's (and
//! from onnxruntime's), which moves float results by a few ulps; sums of small integers held
//! in floats (fedge's exact int8 convolutions) are exact in any order.

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::to_typed;

use crate::conv::Activation;

/// The op type fedge's import writes for a depthwise convolution, attributes `strides`,
/// `dilations` (2 ints each) and `pads` (4 ints: top, left, bottom, right); inputs `X`
/// `[N, C, H, W]`, `W` `[C, 1, KH, KW]` and `B` `[C]`.
pub(crate) const DEPTHWISE_CONV: &str = "FedgeDepthwiseConv";

/// Output rows per block: about this many accumulator floats (8 KiB) per block.
const BLOCK_FLOATS: usize = 2048;

/// Strides, dilations and padding of a 2-D convolution, and the zero-padded, phase-split
/// scratch layout that turns every tap into one contiguous run (shared with `FedgeConv`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Window {
    pub strides: [usize; 2],
    pub dilations: [usize; 2],
    /// Top, left, bottom, right.
    pub pads: [usize; 4],
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DepthwiseConv {
    pub window: Window,
    /// Applied to every output.
    pub act: Activation,
}

/// Sizes of one channel's convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
    pub h: usize,
    pub w: usize,
    pub kh: usize,
    pub kw: usize,
    pub ho: usize,
    pub wo: usize,
    /// Rows and columns of one phase plane.
    pub hq: usize,
    pub wq: usize,
}

impl Window {
    /// `strides`, `dilations` and `pads` of a fedge convolution node named `op`.
    pub(crate) fn from_node(node: &tract_onnx::pb::NodeProto, op: &str) -> TractResult<Self> {
        let ints = |name: &str, len: usize, default: usize| -> TractResult<Vec<usize>> {
            match node.get_attr_opt_tvec::<usize>(name)? {
                Some(v) => {
                    ensure!(
                        v.len() == len,
                        "{op}: `{name}` has {} values, not {len}",
                        v.len()
                    );
                    Ok(v.to_vec())
                }
                None => Ok(vec![default; len]),
            }
        };
        let (s, d, p) = (
            ints("strides", 2, 1)?,
            ints("dilations", 2, 1)?,
            ints("pads", 4, 0)?,
        );
        ensure!(
            s.iter().chain(&d).all(|&v| v > 0),
            "{op}: strides and dilations must be positive"
        );
        Ok(Window {
            strides: [s[0], s[1]],
            dilations: [d[0], d[1]],
            pads: [p[0], p[1], p[2], p[3]],
        })
    }

    /// Output extent along one spatial axis, `None` when the kernel does not fit.
    pub(crate) fn out_len(&self, axis: usize, len: usize, k: usize) -> Option<usize> {
        let padded = len + self.pads[axis] + self.pads[axis + 2];
        let reach = self.dilations[axis] * (k.max(1) - 1) + 1;
        (k > 0 && padded >= reach).then(|| (padded - reach) / self.strides[axis] + 1)
    }

    /// Sizes for an `h × w` input and a `kh × kw` kernel; an error naming `op` when the kernel
    /// does not fit.
    pub(crate) fn geometry(
        &self,
        op: &str,
        [h, w]: [usize; 2],
        [kh, kw]: [usize; 2],
    ) -> TractResult<Geometry> {
        let (Some(ho), Some(wo)) = (self.out_len(0, h, kh), self.out_len(1, w, kw)) else {
            bail!("{op}: kernel {kh}x{kw} is larger than the padded {h}x{w} input")
        };
        let [sh, sw] = self.strides;
        Ok(Geometry {
            h,
            w,
            kh,
            kw,
            ho,
            wo,
            hq: (h + self.pads[0] + self.pads[2]).div_ceil(sh),
            wq: (w + self.pads[1] + self.pads[3]).div_ceil(sw),
        })
    }

    /// Offset of tap `(ky, kx)` in the scratch: its phase plane plus its row and column shift.
    pub(crate) fn tap_offset(&self, g: &Geometry, ky: usize, kx: usize) -> usize {
        let (y, x) = (ky * self.dilations[0], kx * self.dilations[1]);
        let [sh, sw] = self.strides;
        let phase = (y % sh) * sw + x % sw;
        phase * g.hq * g.wq + (y / sh) * g.wq + x / sw
    }

    pub(crate) fn scratch_len(&self, g: &Geometry) -> usize {
        // Slack past the last plane: the discarded columns of the last row read up to a
        // kernel's width beyond it.
        self.strides[0] * self.strides[1] * g.hq * g.wq + g.kw * self.dilations[1] + g.wq
    }

    /// Copies one channel of the input into the zero-padded, phase-split scratch.
    pub(crate) fn fill_scratch<T: Word>(&self, g: &Geometry, x: &[T], scratch: &mut [T]) {
        scratch.fill(T::default());
        let [sh, sw] = self.strides;
        let (pt, pl) = (self.pads[0], self.pads[1]);
        let plane = g.hq * g.wq;
        for (y, row) in x.chunks_exact(g.w).enumerate() {
            let py = y + pt;
            let base = (py % sh) * sw * plane + (py / sh) * g.wq;
            if sw == 1 {
                scratch[base + pl..base + pl + g.w].copy_from_slice(row);
            } else if sw == 2 {
                // Input column `x` is padded column `x + pl`: phase `(x + pl) % 2`, at
                // `(x + pl) / 2`. Even columns go to phase `pl % 2`, odd ones to the other.
                let (p0, p1) = scratch[base..].split_at_mut(plane);
                let (p0, p1) = (&mut p0[..g.wq], &mut p1[..g.wq]);
                let (even, odd) = if pl % 2 == 0 { (p0, p1) } else { (p1, p0) };
                let (even, odd) = (&mut even[pl / 2..], &mut odd[pl.div_ceil(2)..]);
                deinterleave(row, even, odd);
            } else {
                // Phase `b` holds padded columns `b, b + sw, ...`: input columns `j·sw + b - pl`.
                for b in 0..sw {
                    let lo = pl.saturating_sub(b).div_ceil(sw);
                    let hi = (pl + g.w).saturating_sub(b).div_ceil(sw);
                    let dst = &mut scratch[base + b * plane..base + b * plane + hi];
                    for (j, d) in dst.iter_mut().enumerate().skip(lo) {
                        *d = row[j * sw + b - pl];
                    }
                }
            }
        }
    }

    /// The op's `info` line: strides, dilations, pads and the activation.
    pub(crate) fn describe(&self, act: Activation) -> String {
        format!(
            "strides {:?}, dilations {:?}, pads {:?}, activation {act:?}",
            self.strides, self.dilations, self.pads
        )
    }

    /// Scratch offsets of every tap, row by row.
    pub(crate) fn taps(&self, g: &Geometry) -> Vec<usize> {
        (0..g.kh)
            .flat_map(|ky| (0..g.kw).map(move |kx| (ky, kx)))
            .map(|(ky, kx)| self.tap_offset(g, ky, kx))
            .collect()
    }
}

/// `eval` of a fedge convolution named `op`: input, kernel and bias, all float32, to `run`.
pub(crate) fn eval_conv(
    op: &str,
    inputs: &[TValue],
    run: impl FnOnce(&[f32], &[usize], &[f32], &[usize], &[f32]) -> TractResult<Tensor>,
) -> TractResult<TVec<TValue>> {
    ensure!(inputs.len() == 3, "{op} takes input, kernel and bias");
    let (x, k, b) = (&inputs[0], &inputs[1], &inputs[2]);
    let (xp, kp, bp) = (
        x.try_as_plain_ram()?,
        k.try_as_plain_ram()?,
        b.try_as_plain_ram()?,
    );
    let t = run(
        xp.as_slice::<f32>()?,
        x.shape(),
        kp.as_slice::<f32>()?,
        k.shape(),
        bp.as_slice::<f32>()?,
    )?;
    Ok(tvec!(t.into_tvalue()))
}

/// The inference rules both fedge convolutions share: three float32 inputs (NCHW input, a
/// kernel of rank `kernel_rank`, a bias of rank 1), one NCHW float32 output with the input's
/// batch and the bias's channels.
pub(crate) fn conv_rules<'r, 'p: 'r>(
    s: &mut Solver<'r>,
    inputs: &'p [TensorProxy],
    outputs: &'p [TensorProxy],
    kernel_rank: i64,
) -> InferenceResult {
    check_input_arity(inputs, 3)?;
    check_output_arity(outputs, 1)?;
    for t in [&inputs[0], &inputs[1], &inputs[2], &outputs[0]] {
        s.equals(&t.datum_type, f32::datum_type())?;
    }
    s.equals(&inputs[0].rank, 4)?;
    s.equals(&inputs[1].rank, kernel_rank)?;
    s.equals(&inputs[2].rank, 1)?;
    s.equals(&outputs[0].rank, 4)?;
    s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
    s.equals(&inputs[2].shape[0], &outputs[0].shape[1])
}

/// A 4-byte value the convolution scratch holds: an f32, or the two i16 of
/// `FedgeQConv` (`crate::qconv`). Only moved, never computed on, so any bit pattern is fine.
pub(crate) trait Word: Copy + Default + 'static {}

impl Word for f32 {}

impl Word for u32 {}

/// `even[i] = row[2i]`, `odd[i] = row[2i + 1]`; `even` and `odd` hold at least
/// `⌈len / 2⌉` and `⌊len / 2⌋` values.
fn deinterleave<T: Word>(row: &[T], even: &mut [T], odd: &mut [T]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::conv::fast() {
        let f = |s: &[T]| s.as_ptr().cast::<f32>();
        // SAFETY: AVX2 and FMA were just detected; `T` is f32 or u32 (4 bytes, 4-aligned,
        // every bit pattern valid as f32), and the views cover exactly the given slices,
        // which the AVX2 loop only moves values between.
        done = unsafe {
            deinterleave_avx2(
                std::slice::from_raw_parts(f(row), row.len()),
                std::slice::from_raw_parts_mut(even.as_mut_ptr().cast::<f32>(), even.len()),
                std::slice::from_raw_parts_mut(odd.as_mut_ptr().cast::<f32>(), odd.len()),
            )
        };
    }
    let (row, even, odd) = (&row[2 * done..], &mut even[done..], &mut odd[done..]);
    let pairs = row.chunks_exact(2);
    if let [last] = pairs.remainder() {
        even[row.len() / 2] = *last;
    }
    for ((e, o), pair) in even.iter_mut().zip(odd.iter_mut()).zip(pairs) {
        *e = pair[0];
        *o = pair[1];
    }
}

/// [`deinterleave`] 16 values at a time; returns how many pairs it wrote.
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn deinterleave_avx2(row: &[f32], even: &mut [f32], odd: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let n = (row.len() / 16).min(even.len() / 8).min(odd.len() / 8);
    for i in 0..n {
        // SAFETY: `16 i + 16 <= row.len()`, `8 i + 8 <=` both outputs' lengths.
        unsafe {
            let a = _mm256_loadu_ps(row.as_ptr().add(16 * i));
            let b = _mm256_loadu_ps(row.as_ptr().add(16 * i + 8));
            // [a0 a2 b0 b2 | a4 a6 b4 b6], then 64-bit lanes in order 0, 2, 1, 3.
            let e = _mm256_shuffle_ps::<0b10_00_10_00>(a, b);
            let o = _mm256_shuffle_ps::<0b11_01_11_01>(a, b);
            let e = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(e)));
            let o = _mm256_castpd_ps(_mm256_permute4x64_pd::<0b11_01_10_00>(_mm256_castps_pd(o)));
            _mm256_storeu_ps(even.as_mut_ptr().add(8 * i), e);
            _mm256_storeu_ps(odd.as_mut_ptr().add(8 * i), o);
        }
    }
    8 * n
}

impl DepthwiseConv {
    pub(crate) fn from_node(node: &tract_onnx::pb::NodeProto) -> TractResult<Self> {
        Ok(DepthwiseConv {
            window: Window::from_node(node, DEPTHWISE_CONV)?,
            act: Activation::from_node(node, DEPTHWISE_CONV)?,
        })
    }

    /// Output extent along one spatial axis, `None` when the kernel does not fit.
    fn out_len(&self, axis: usize, len: usize, k: usize) -> Option<usize> {
        self.window.out_len(axis, len, k)
    }

    fn geometry(&self, x: &[usize], k: &[usize]) -> TractResult<Geometry> {
        ensure!(
            x.len() == 4 && k.len() == 4 && k[0] == x[1] && k[1] == 1,
            "{DEPTHWISE_CONV}: input {x:?} and kernel {k:?} are not NCHW with one filter per channel"
        );
        self.window
            .geometry(DEPTHWISE_CONV, [x[2], x[3]], [k[2], k[3]])
    }

    /// One channel: `out` (`ho · wo`) from the filled scratch, filter `k` (`kh · kw`) and
    /// bias `b`, accumulating in `acc`.
    #[allow(clippy::too_many_arguments)]
    fn channel(
        &self,
        g: &Geometry,
        avx2: bool,
        taps: &[usize],
        scratch: &[f32],
        k: &[f32],
        b: f32,
        acc: &mut [f32],
        out: &mut [f32],
    ) {
        let rows = (BLOCK_FLOATS / g.wq).clamp(1, g.ho);
        let mut r0 = 0;
        while r0 < g.ho {
            let r1 = (r0 + rows).min(g.ho);
            let acc = &mut acc[..(r1 - r0) * g.wq];
            let src = &scratch[r0 * g.wq..];
            #[cfg(target_arch = "x86_64")]
            if avx2 {
                // SAFETY: `avx2` is true only when AVX2 and FMA were detected on this machine.
                unsafe { taps_avx2_fma(acc, b, src, taps, k) };
            } else {
                taps_generic(acc, b, src, taps, k);
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = avx2;
                taps_generic(acc, b, src, taps, k);
            }
            for (o, a) in out[r0 * g.wo..r1 * g.wo]
                .chunks_exact_mut(g.wo)
                .zip(acc.chunks_exact(g.wq))
            {
                self.act.apply(o, &a[..g.wo]);
            }
            r0 = r1;
        }
    }

    /// Planes `first..` of the output (`out` holds whole planes), any batch.
    #[allow(clippy::too_many_arguments)]
    fn planes(
        &self,
        g: &Geometry,
        channels: usize,
        first: usize,
        x: &[f32],
        k: &[f32],
        b: &[f32],
        out: &mut [f32],
    ) {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        let taps = self.window.taps(g);
        let mut scratch = vec![0f32; self.window.scratch_len(g)];
        let mut acc = vec![0f32; (BLOCK_FLOATS / g.wq).clamp(1, g.ho) * g.wq];
        let (ip, op, kp) = (g.h * g.w, g.ho * g.wo, g.kh * g.kw);
        for (i, o) in out.chunks_exact_mut(op).enumerate() {
            let p = first + i;
            let c = p % channels;
            self.window
                .fill_scratch(g, &x[p * ip..(p + 1) * ip], &mut scratch);
            self.channel(
                g,
                avx2,
                &taps,
                &scratch,
                &k[c * kp..(c + 1) * kp],
                b[c],
                &mut acc,
                o,
            );
        }
    }

    /// The convolution of `x` (`[N, C, H, W]`) by `k` (`[C, 1, KH, KW]`) plus `b` (`[C]`).
    pub(crate) fn run(
        &self,
        x: &[f32],
        x_shape: &[usize],
        k: &[f32],
        k_shape: &[usize],
        b: &[f32],
    ) -> TractResult<Tensor> {
        let g = self.geometry(x_shape, k_shape)?;
        let channels = x_shape[1];
        ensure!(
            x.len() == x_shape.iter().product::<usize>()
                && k.len() == k_shape.iter().product::<usize>(),
            "{DEPTHWISE_CONV}: data and shape disagree"
        );
        ensure!(
            b.len() == channels,
            "{DEPTHWISE_CONV}: {} bias values for {channels} channels",
            b.len()
        );
        let shape = [x_shape[0], channels, g.ho, g.wo];
        // SAFETY: every element is written below (each plane by exactly one call).
        let mut t = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let plane = g.ho * g.wo;
        {
            let mut plain = t.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            if plane == 0 || out.is_empty() {
                return Ok(t);
            }
            let total = out.len() * g.kh * g.kw;
            tract_linalg::multithread::par_chunks_mut(out, plane, total, |first, chunk| {
                self.planes(&g, channels, first, x, k, b, chunk);
                Ok(())
            })?;
        }
        Ok(t)
    }
}

/// `acc[j] = b + Σ_t k[t] · src[taps[t] + j]`; `src` holds `taps[t] + acc.len()` values for
/// every `t`. Eight outputs at a time stay in registers across all taps.
fn taps_generic(acc: &mut [f32], b: f32, src: &[f32], taps: &[usize], k: &[f32]) {
    let len = acc.len();
    let mut j = 0;
    while j + 8 <= len {
        let mut a = [b; 8];
        for (&off, &w) in taps.iter().zip(k) {
            let s: &[f32; 8] = src[off + j..off + j + 8].try_into().expect("eight values");
            for (a, &v) in a.iter_mut().zip(s) {
                *a += w * v;
            }
        }
        acc[j..j + 8].copy_from_slice(&a);
        j += 8;
    }
    for (j, a) in acc.iter_mut().enumerate().skip(j) {
        *a = b;
        for (&off, &w) in taps.iter().zip(k) {
            *a += w * src[off + j];
        }
    }
}

/// [`taps_generic`] with AVX2 and FMA: up to 64 outputs in eight registers across all taps
/// (eight independent multiply-add chains hide the latency), the last 1-7 outputs in a masked
/// register.
///
/// # Safety
/// The machine must have AVX2 and FMA.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn taps_avx2_fma(acc: &mut [f32], b: f32, src: &[f32], taps: &[usize], k: &[f32]) {
    let len = acc.len();
    assert!(
        k.len() >= taps.len() && taps.iter().all(|&off| off + len <= src.len()),
        "depthwise taps read past the scratch"
    );
    let mut j = 0;
    // SAFETY (every call): positions `j..j + 8 N` (the last vector only up to `len`) are
    // below `len`, and `off + len <= src.len()` for every tap (asserted above).
    unsafe {
        while j + 64 <= len {
            outputs_avx2_fma::<8>(acc, b, src, taps, k, j, 8);
            j += 64;
        }
        let rest = len - j;
        let last = rest - (rest.saturating_sub(1) / 8) * 8;
        match rest.div_ceil(8) {
            0 => {}
            1 => outputs_avx2_fma::<1>(acc, b, src, taps, k, j, last),
            2 => outputs_avx2_fma::<2>(acc, b, src, taps, k, j, last),
            3 => outputs_avx2_fma::<3>(acc, b, src, taps, k, j, last),
            4 => outputs_avx2_fma::<4>(acc, b, src, taps, k, j, last),
            5 => outputs_avx2_fma::<5>(acc, b, src, taps, k, j, last),
            6 => outputs_avx2_fma::<6>(acc, b, src, taps, k, j, last),
            7 => outputs_avx2_fma::<7>(acc, b, src, taps, k, j, last),
            _ => outputs_avx2_fma::<8>(acc, b, src, taps, k, j, last),
        }
    }
}

/// Outputs `j..j + 8 (N - 1) + last` (`1 <= last <= 8`) of [`taps_avx2_fma`], `N` registers.
///
/// # Safety
/// The machine must have AVX2 and FMA; those outputs are below `acc.len()` and every tap's
/// reads below `src.len()`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn outputs_avx2_fma<const N: usize>(
    acc: &mut [f32],
    b: f32,
    src: &[f32],
    taps: &[usize],
    k: &[f32],
    j: usize,
    last: usize,
) {
    use std::arch::x86_64::*;
    let (sp, ap) = (src.as_ptr(), acc.as_mut_ptr());
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(last as i32), lanes);
    let full = last == 8;
    let mut a = [_mm256_set1_ps(b); N];
    // SAFETY: the caller's contract; lanes past `last` in the last register are neither
    // read nor written.
    unsafe {
        for (&off, &w) in taps.iter().zip(k) {
            let w = _mm256_set1_ps(w);
            let p = sp.add(off + j);
            for (i, a) in a.iter_mut().enumerate() {
                let x = if i + 1 < N || full {
                    _mm256_loadu_ps(p.add(8 * i))
                } else {
                    _mm256_maskload_ps(p.add(8 * i), mask)
                };
                *a = _mm256_fmadd_ps(w, x, *a);
            }
        }
        for (i, a) in a.iter().enumerate() {
            if i + 1 < N || full {
                _mm256_storeu_ps(ap.add(j + 8 * i), *a);
            } else {
                crate::conv::store_lanes(ap.add(j + 8 * i), *a, last);
            }
        }
    }
}

impl Op for DepthwiseConv {
    fn name(&self) -> StaticName {
        DEPTHWISE_CONV.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.window.describe(self.act)])
    }

    op_as_typed_op!();
}

impl EvalOp for DepthwiseConv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_conv(DEPTHWISE_CONV, &inputs, |x, xs, k, ks, b| {
            self.run(x, xs, k, ks, b)
        })
    }
}

impl InferenceRulesOp for DepthwiseConv {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        conv_rules(s, inputs, outputs, 4)?;
        s.equals(&inputs[0].shape[1], &outputs[0].shape[1])?;
        s.equals(&inputs[1].shape[0], &outputs[0].shape[1])?;
        for axis in 0..2 {
            s.given_2(
                &inputs[0].shape[2 + axis],
                &inputs[1].shape[2 + axis],
                move |s, len, k| {
                    if let (Ok(len), Ok(k)) = (len.to_usize(), k.to_usize()) {
                        let out = self.out_len(axis, len, k).with_context(|| {
                            format!("{DEPTHWISE_CONV}: kernel {k} larger than padded {len}")
                        })?;
                        s.equals(&outputs[0].shape[2 + axis], out.to_dim())?;
                    }
                    Ok(())
                },
            )?;
        }
        Ok(())
    }

    as_op!();
    to_typed!();
}

impl TypedOp for DepthwiseConv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(
            inputs.len() == 3,
            "{DEPTHWISE_CONV} takes input, kernel and bias"
        );
        let (x, k) = (inputs[0], inputs[1]);
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "{DEPTHWISE_CONV} runs on float32 only"
        );
        let k_shape = k
            .shape
            .as_concrete()
            .with_context(|| format!("{DEPTHWISE_CONV}: the kernel's shape is not known"))?;
        ensure!(
            x.rank() == 4 && k_shape.len() == 4 && k_shape[1] == 1,
            "{DEPTHWISE_CONV}: input {:?} and kernel {k_shape:?} are not NCHW with one filter per channel",
            x.shape
        );
        let mut shape: TVec<TDim> = x.shape.iter().take(2).cloned().collect();
        for axis in 0..2 {
            let len = x.shape[2 + axis].to_usize().with_context(|| {
                format!(
                    "{DEPTHWISE_CONV}: spatial size {} not known",
                    x.shape[2 + axis]
                )
            })?;
            let out = self
                .out_len(axis, len, k_shape[2 + axis])
                .with_context(|| format!("{DEPTHWISE_CONV}: kernel larger than padded input"))?;
            shape.push(out.to_dim());
        }
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let out = self.output_facts(inputs)?;
        let taps: usize = inputs[1]
            .shape
            .iter()
            .skip(2)
            .filter_map(|d| d.to_usize().ok())
            .product();
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            out[0].shape.volume() * taps
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output point at a time.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        op: &DepthwiseConv,
        x: &[f32],
        xs: [usize; 4],
        k: &[f32],
        ks: [usize; 2],
        b: &[f32],
    ) -> (Vec<f32>, [usize; 4]) {
        let [n, c, h, w] = xs;
        let [kh, kw] = ks;
        let ho = op.out_len(0, h, kh).expect("fits");
        let wo = op.out_len(1, w, kw).expect("fits");
        let mut out = vec![0f32; n * c * ho * wo];
        for ni in 0..n {
            for ci in 0..c {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = b[ci] as f64;
                        for ky in 0..kh {
                            for kx in 0..kw {
                                let o = &op.window;
                                let y = (oy * o.strides[0] + ky * o.dilations[0]) as isize
                                    - o.pads[0] as isize;
                                let xx = (ox * o.strides[1] + kx * o.dilations[1]) as isize
                                    - o.pads[1] as isize;
                                if y < 0 || xx < 0 || y >= h as isize || xx >= w as isize {
                                    continue;
                                }
                                let v = x[((ni * c + ci) * h + y as usize) * w + xx as usize];
                                s += (v * k[(ci * kh + ky) * kw + kx]) as f64;
                            }
                        }
                        out[((ni * c + ci) * ho + oy) * wo + ox] = s as f32;
                    }
                }
            }
        }
        (out, [n, c, ho, wo])
    }

    fn values(seed: &mut u64, len: usize) -> Vec<f32> {
        (0..len)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6_364_136_223_846_793_005)
                    .wrapping_add(1_442_695_040_888_963_407);
                ((*seed >> 40) % 17) as f32 - 8.0
            })
            .collect()
    }

    /// Small integers, so that every order of summation gives the same float: the comparison
    /// is exact.
    #[test]
    fn matches_the_definition_for_strides_pads_dilations_and_kernel_sizes() {
        let mut seed = 7;
        // input shape, kernel, strides, dilations, pads
        type Case = ([usize; 4], [usize; 2], [usize; 2], [usize; 2], [usize; 4]);
        let cases: &[Case] = &[
            ([1, 3, 7, 9], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
            ([2, 4, 14, 14], [5, 5], [1, 1], [1, 1], [2, 2, 2, 2]),
            ([1, 5, 15, 16], [3, 3], [2, 2], [1, 1], [1, 1, 1, 1]),
            ([1, 2, 14, 13], [5, 5], [2, 2], [1, 1], [2, 2, 2, 2]),
            ([1, 2, 9, 37], [3, 3], [2, 2], [1, 1], [1, 1, 1, 2]),
            ([1, 2, 7, 40], [3, 3], [2, 2], [1, 1], [0, 0, 1, 1]),
            ([1, 2, 9, 11], [3, 2], [2, 3], [1, 1], [0, 1, 2, 0]),
            ([1, 3, 12, 12], [3, 3], [1, 1], [2, 2], [2, 2, 2, 2]),
            ([1, 2, 10, 10], [3, 3], [3, 2], [2, 1], [0, 0, 0, 0]),
            ([1, 1, 3, 3], [3, 3], [1, 1], [1, 1], [0, 0, 0, 0]),
            ([1, 2, 1, 100], [1, 7], [1, 1], [1, 1], [0, 3, 0, 3]),
            ([1, 3, 70, 70], [3, 3], [1, 1], [1, 1], [1, 1, 1, 1]),
        ];
        for &(xs, ks, strides, dilations, pads) in cases {
            let op = DepthwiseConv {
                window: Window {
                    strides,
                    dilations,
                    pads,
                },
                act: Activation::Identity,
            };
            let x = values(&mut seed, xs.iter().product());
            let k = values(&mut seed, xs[1] * ks[0] * ks[1]);
            let b = values(&mut seed, xs[1]);
            let (want, shape) = reference(&op, &x, xs, &k, ks, &b);
            let got = op
                .run(&x, &xs, &k, &[xs[1], 1, ks[0], ks[1]], &b)
                .expect("runs");
            assert_eq!(got.shape(), &shape, "{xs:?} {ks:?} {op:?}");
            let got = got.try_as_plain_ram().expect("runs");
            assert_eq!(
                got.as_slice::<f32>().expect("runs"),
                &want[..],
                "{xs:?} {ks:?} {op:?}"
            );
        }
    }

    /// Both tap loops (the portable one and, where the machine has them, AVX2/FMA) against
    /// the sum written out, on every length class (blocks of 64, one to seven whole registers, the masked tail).
    #[test]
    fn tap_loops_agree_with_the_plain_sum() {
        let mut seed = 3;
        let src = values(&mut seed, 400);
        let taps = [0, 1, 2, 40, 41, 42, 80, 81, 82];
        let k = values(&mut seed, taps.len());
        for len in [1, 7, 8, 9, 31, 32, 33, 63, 64, 65, 70, 127, 300] {
            let want: Vec<f32> = (0..len)
                .map(|j| {
                    0.5 + taps
                        .iter()
                        .zip(&k)
                        .map(|(&o, &w)| w * src[o + j])
                        .sum::<f32>()
                })
                .collect();
            let mut acc = vec![f32::NAN; len];
            taps_generic(&mut acc, 0.5, &src, &taps, &k);
            assert_eq!(acc, want, "portable, {len}");
            #[cfg(target_arch = "x86_64")]
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                let mut acc = vec![f32::NAN; len];
                // SAFETY: the features were just detected.
                unsafe { taps_avx2_fma(&mut acc, 0.5, &src, &taps, &k) };
                assert_eq!(acc, want, "avx2, {len}");
            }
        }
    }

    #[test]
    fn kernel_larger_than_the_input_or_mismatched_shapes_are_errors() {
        let op = DepthwiseConv {
            window: Window {
                strides: [1, 1],
                dilations: [1, 1],
                pads: [0, 0, 0, 0],
            },
            act: Activation::Identity,
        };
        let x = vec![0f32; 2 * 2 * 2];
        let k = vec![0f32; 2 * 9];
        let err = op.run(&x, &[1, 2, 2, 2], &k, &[2, 1, 3, 3], &[0.0; 2]);
        assert!(format!("{:?}", err.expect_err("an error")).contains("larger than"));
        let err = op.run(&x, &[1, 2, 2, 2], &k[..9], &[1, 1, 3, 3], &[0.0; 2]);
        assert!(err.is_err());
        let err = op.run(&x, &[1, 2, 2, 2], &[0f32; 4], &[2, 1, 1, 1], &[0.0; 3]);
        assert!(err.is_err());
    }
}
