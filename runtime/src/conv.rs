//! `FedgeConv`: a dense 2-D convolution (NCHW, float32, one group) for the CPU backend on
//! x86-64 machines with AVX2 and FMA, and the activation that fedge's convolutions apply to
//! their outputs.
//!
//! tract 0.23.9 runs a convolution as an im2col packing of the input followed by its matrix
//! product kernel. For the narrow, wide convolutions of detection necks (24 output channels
//! over 96 × 3 × 3 taps on a 160 × 120 map) that packs the input nine times over and fills a
//! 16-row kernel tile with 24 rows, and measured about 15 GMAC/s here plus a separate padding
//! pass. This op reads the input where it lies:
//!
//! - each input channel is copied once into the zero-padded, stride-phase-split scratch of
//!   `FedgeDepthwiseConv` (`crate::dwconv::Window`), so every tap of every channel is one
//!   contiguous run at a fixed offset from the output position (a 1 × 1 kernel with stride 1
//!   and no padding reads the input itself);
//! - the output is computed over rows as wide as the scratch (the extra columns are
//!   discarded), in blocks of [`COLS`] positions that keep the input they read in the L2 cache;
//! - within a block, [`ROWS`] output channels × 16 positions stay in twelve AVX2 registers
//!   across all `C_in · KH · KW` taps: two loads of the input and six broadcast weights per
//!   twelve fused multiply-adds;
//! - output channels are split across tract's executor when it has threads.
//!
//! The sum over taps is in a different order from tract's (and from onnxruntime's), which
//! moves float results by a few ulps; sums of small integers held in floats (fedge's exact int8
//! convolutions) are exact in any order. fedge's import only writes this op where AVX2 and FMA
//! are present ([`fast`]); elsewhere tract's kernels stay (the portable loop here exists for
//! correctness, not speed).

use std::hash::{Hash, Hasher};

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::to_typed;

use crate::dwconv::{Geometry, Window, Word, conv_rules, eval_conv};

/// The op type fedge's import writes for a dense convolution, attributes `strides`,
/// `dilations`, `kernel_shape` (2 ints each), `pads` (4 ints: top, left, bottom, right) and an
/// optional activation (see [`Activation::from_node`]); inputs `X` `[N, C, H, W]`, the kernel
/// packed by [`pack`] (`[⌈M / 6⌉, C · KH · KW, 6]`, written by the import so that packing
/// costs nothing per run) and `B` `[M]`.
pub(crate) const CONV: &str = "FedgeConv";

/// Output channels per register block.
pub(crate) const ROWS: usize = 6;
/// Output positions per cache block (a multiple of 16).
pub(crate) const COLS: usize = 64;
/// Most taps (input channels × kernel points) summed per pass over a block's accumulators.
const TAPS: usize = 128;
/// Most floats gathered for one image (1 MiB): past this the phase-split scratch is used.
const GATHER_FLOATS: usize = 1 << 18;

/// A `[M, C, KH, KW]` kernel (`taps = C · KH · KW` weights per output channel) in [`CONV`]'s
/// layout: blocks of [`ROWS`] output channels, tap-major, [`ROWS`] weights per tap, the last
/// block padded with zeros. Returns the data and its shape.
pub(crate) fn pack(k: &[f32], m: usize, taps: usize) -> (Vec<f32>, [usize; 3]) {
    let blocks = m.div_ceil(ROWS);
    let mut packed = vec![0f32; blocks * taps * ROWS];
    for (bi, block) in packed.chunks_exact_mut(taps * ROWS).enumerate() {
        for r in 0..ROWS.min(m - bi * ROWS) {
            let kernel = &k[(bi * ROWS + r) * taps..(bi * ROWS + r + 1) * taps];
            for (t, &w) in kernel.iter().enumerate() {
                block[t * ROWS + r] = w;
            }
        }
    }
    (packed, [blocks, taps, ROWS])
}

/// Whether this machine runs [`CONV`] fast: x86-64 with AVX2 and FMA.
pub(crate) fn fast() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Stores the first `n` (at most 8) lanes of `v` at `dst`, in stores of 4, 2 and 1 lanes. A
/// masked store (`vmaskmovps`) is microcoded on AMD's Zen cores, a dozen cycles or more.
///
/// # Safety
/// The machine must have AVX2; `dst` must be valid for `n` writes.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
pub(crate) unsafe fn store_lanes(dst: *mut f32, v: std::arch::x86_64::__m256, n: usize) {
    use std::arch::x86_64::*;
    // SAFETY: lanes `0..n` go to `dst..dst + n`, which the caller vouches for.
    unsafe {
        if n >= 8 {
            _mm256_storeu_ps(dst, v);
            return;
        }
        let (mut p, mut n) = (dst, n);
        let mut low = _mm256_castps256_ps128(v);
        if n >= 4 {
            _mm_storeu_ps(p, low);
            low = _mm256_extractf128_ps::<1>(v);
            (p, n) = (p.add(4), n - 4);
        }
        if n >= 2 {
            _mm_store_sd(p.cast(), _mm_castps_pd(low));
            low = _mm_movehl_ps(low, low);
            (p, n) = (p.add(2), n - 2);
        }
        if n == 1 {
            _mm_store_ss(p, low);
        }
    }
}

/// An activation applied to a convolution's outputs, computed as ONNX defines it, one f32
/// rounding per step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Activation {
    Identity,
    /// `max(x, 0)`.
    Relu,
    /// `x` when `x ≥ 0`, else `alpha · x`.
    LeakyRelu {
        alpha: f32,
    },
    /// `min(max(x, lo), hi)`.
    Clip {
        lo: f32,
        hi: f32,
    },
    /// `x · max(0, min(1, alpha · x + beta))`: ONNX `HardSwish` (alpha 1/6, beta 1/2), or
    /// `Mul(x, HardSigmoid(x))`.
    HardSwish {
        alpha: f32,
        beta: f32,
    },
    /// `(x · min(max(x + shift, lo), hi)) / div`: the hard-swish of Paddle's exporter,
    /// `Div(Mul(x, Clip(Add(x, 3), 0, 6)), 6)`.
    ClipSwish {
        shift: f32,
        lo: f32,
        hi: f32,
        div: f32,
    },
}

impl Eq for Activation {}

impl Hash for Activation {
    fn hash<H: Hasher>(&self, state: &mut H) {
        std::mem::discriminant(self).hash(state);
        let params: &[f32] = match self {
            Activation::Identity | Activation::Relu => &[],
            Activation::LeakyRelu { alpha } => &[*alpha],
            Activation::Clip { lo, hi } => &[*lo, *hi],
            Activation::HardSwish { alpha, beta } => &[*alpha, *beta],
            Activation::ClipSwish { shift, lo, hi, div } => &[*shift, *lo, *hi, *div],
        };
        for p in params {
            p.to_bits().hash(state);
        }
    }
}

impl Activation {
    /// From a fedge convolution node named `op`: attribute `activation` (`relu`,
    /// `leaky_relu` with `alpha`, `clip` with `min` and `max`, `hard_swish` with `alpha` and
    /// `beta`, `clip_swish` with `shift`, `min`, `max` and `div`); none means the identity.
    pub(crate) fn from_node(node: &tract_onnx::pb::NodeProto, op: &str) -> TractResult<Self> {
        let Some(kind) = node.get_attr_opt::<String>("activation")? else {
            return Ok(Activation::Identity);
        };
        let f = |name: &str| -> TractResult<f32> {
            node.get_attr_opt::<f32>(name)?
                .with_context(|| format!("{op}: activation `{kind}` needs attribute `{name}`"))
        };
        Ok(match kind.as_str() {
            "relu" => Activation::Relu,
            "leaky_relu" => Activation::LeakyRelu { alpha: f("alpha")? },
            "clip" => Activation::Clip {
                lo: f("min")?,
                hi: f("max")?,
            },
            "hard_swish" => Activation::HardSwish {
                alpha: f("alpha")?,
                beta: f("beta")?,
            },
            "clip_swish" => Activation::ClipSwish {
                shift: f("shift")?,
                lo: f("min")?,
                hi: f("max")?,
                div: f("div")?,
            },
            other => bail!("{op}: unknown activation `{other}`"),
        })
    }

    /// The node attributes [`Activation::from_node`] reads back.
    pub(crate) fn attributes(&self) -> Vec<tract_onnx::pb::AttributeProto> {
        use tract_onnx::pb::{AttributeProto, attribute_proto::AttributeType};
        let s = |v: &str| AttributeProto {
            name: "activation".into(),
            r#type: AttributeType::String as i32,
            s: v.as_bytes().to_vec(),
            ..Default::default()
        };
        let f = |name: &str, v: f32| AttributeProto {
            name: name.into(),
            r#type: AttributeType::Float as i32,
            f: v,
            ..Default::default()
        };
        match *self {
            Activation::Identity => vec![],
            Activation::Relu => vec![s("relu")],
            Activation::LeakyRelu { alpha } => vec![s("leaky_relu"), f("alpha", alpha)],
            Activation::Clip { lo, hi } => vec![s("clip"), f("min", lo), f("max", hi)],
            Activation::HardSwish { alpha, beta } => {
                vec![s("hard_swish"), f("alpha", alpha), f("beta", beta)]
            }
            Activation::ClipSwish { shift, lo, hi, div } => vec![
                s("clip_swish"),
                f("shift", shift),
                f("min", lo),
                f("max", hi),
                f("div", div),
            ],
        }
    }

    #[inline(always)]
    fn one(self, x: f32) -> f32 {
        match self {
            Activation::Identity => x,
            Activation::Relu => {
                if x < 0.0 {
                    0.0
                } else {
                    x
                }
            }
            Activation::LeakyRelu { alpha } => {
                if x < 0.0 {
                    alpha * x
                } else {
                    x
                }
            }
            Activation::Clip { lo, hi } => {
                let y = if x < lo { lo } else { x };
                if y > hi { hi } else { y }
            }
            Activation::HardSwish { alpha, beta } => {
                let t = alpha * x + beta;
                let t = if t < 0.0 { 0.0 } else { t };
                x * if t > 1.0 { 1.0 } else { t }
            }
            Activation::ClipSwish { shift, lo, hi, div } => {
                let t = x + shift;
                let t = if t < lo { lo } else { t };
                (x * if t > hi { hi } else { t }) / div
            }
        }
    }

    /// Inlined into each arm of a match on the kind, so that each loop vectorises.
    #[inline(always)]
    fn copy_with(self, dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = self.one(s);
        }
    }

    /// `dst[i] = act(src[i])`.
    pub(crate) fn apply(self, dst: &mut [f32], src: &[f32]) {
        if self == Activation::Identity {
            dst.copy_from_slice(src);
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if fast() {
            // SAFETY: AVX2 and FMA were just detected.
            unsafe { self.apply_avx2(dst, src) };
            return;
        }
        self.copy_with(dst, src);
    }

    /// [`Activation::apply`] eight lanes at a time through [`Activation::vec`].
    ///
    /// # Safety
    /// The machine must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn apply_avx2(self, dst: &mut [f32], src: &[f32]) {
        use std::arch::x86_64::*;
        let len = dst.len().min(src.len());
        let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
        // `$f` maps one vector of inputs.
        macro_rules! lanes {
            (|$x:ident| $f:expr) => {{
                let mut i = 0;
                // SAFETY: every load and store is below `len`.
                unsafe {
                    while i + 8 <= len {
                        let $x = _mm256_loadu_ps(sp.add(i));
                        _mm256_storeu_ps(dp.add(i), $f);
                        i += 8;
                    }
                }
                if i < len {
                    // The last 1-7 values: lanes past `len` masked off (neither read nor
                    // written).
                    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
                    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32((len - i) as i32), lanes);
                    // SAFETY: only lanes below `len - i` are loaded or stored.
                    unsafe {
                        let $x = _mm256_maskload_ps(sp.add(i), mask);
                        store_lanes(dp.add(i), $f, len - i);
                    }
                }
            }};
        }
        match self {
            Activation::Identity => dst.copy_from_slice(src),
            // One arm per kind, so that `vec`'s match folds away in each loop.
            Activation::Relu => lanes!(|x| self.vec(x)),
            Activation::LeakyRelu { .. } => lanes!(|x| self.vec(x)),
            Activation::Clip { .. } => lanes!(|x| self.vec(x)),
            Activation::HardSwish { .. } => lanes!(|x| self.vec(x)),
            Activation::ClipSwish { .. } => lanes!(|x| self.vec(x)),
        }
    }

    /// [`Activation::one`] on eight lanes. Each lane is computed exactly as `one` computes it:
    /// `max`/`min` take their second operand when the comparison is false (a NaN passes
    /// through as in `one`), and nothing is fused.
    ///
    /// # Safety
    /// The machine must have AVX2 and FMA.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    pub(crate) unsafe fn vec(self, x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
        use std::arch::x86_64::*;
        let zero = _mm256_setzero_ps();
        let c = _mm256_set1_ps;
        match self {
            Activation::Identity => x,
            // `x < 0 ? 0 : x`
            Activation::Relu => _mm256_max_ps(zero, x),
            Activation::LeakyRelu { alpha } => _mm256_blendv_ps(
                x,
                _mm256_mul_ps(c(alpha), x),
                _mm256_cmp_ps::<_CMP_LT_OQ>(x, zero),
            ),
            Activation::Clip { lo, hi } => _mm256_min_ps(c(hi), _mm256_max_ps(c(lo), x)),
            Activation::HardSwish { alpha, beta } => {
                let t = _mm256_add_ps(_mm256_mul_ps(c(alpha), x), c(beta));
                _mm256_mul_ps(x, _mm256_min_ps(c(1.0), _mm256_max_ps(zero, t)))
            }
            Activation::ClipSwish { shift, lo, hi, div } => {
                let t = _mm256_min_ps(c(hi), _mm256_max_ps(c(lo), _mm256_add_ps(x, c(shift))));
                _mm256_div_ps(_mm256_mul_ps(x, t), c(div))
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Conv {
    pub window: Window,
    /// `[KH, KW]`.
    pub kernel: [usize; 2],
    /// Applied to every output.
    pub act: Activation,
}

impl Conv {
    pub(crate) fn from_node(node: &tract_onnx::pb::NodeProto) -> TractResult<Self> {
        let kernel = node
            .get_attr_opt_tvec::<usize>("kernel_shape")?
            .with_context(|| format!("{CONV} without its `kernel_shape` attribute"))?;
        ensure!(
            kernel.len() == 2 && kernel.iter().all(|&k| k > 0),
            "{CONV}: `kernel_shape` must be two positive ints, not {kernel:?}"
        );
        Ok(Conv {
            window: Window::from_node(node, CONV)?,
            kernel: [kernel[0], kernel[1]],
            act: Activation::from_node(node, CONV)?,
        })
    }

    /// The packed kernel's shape for `c` input and `m` output channels.
    fn packed_shape(&self, c: usize, m: usize) -> [usize; 3] {
        [m.div_ceil(ROWS), c * self.kernel[0] * self.kernel[1], ROWS]
    }

    fn geometry(&self, x: &[usize]) -> TractResult<Geometry> {
        ensure!(x.len() == 4, "{CONV}: input {x:?} is not NCHW");
        self.window.geometry(CONV, [x[2], x[3]], self.kernel)
    }

    /// Whether the input is read where it lies: a 1 × 1 kernel, stride 1, no padding.
    fn in_place(&self, g: &Geometry) -> bool {
        g.kh == 1 && g.kw == 1 && self.window.strides == [1, 1] && self.window.pads == [0; 4]
    }

    /// Whether to gather one row of output positions per tap (`C·KH·KW` rows of `HO·WO`)
    /// instead of the phase-split scratch: for a strided or padded 1 × 1 kernel (the scratch
    /// would copy every phase of the input, one is read), and for small outputs whose scratch
    /// rows would be a third or more discarded columns (ResNet's last stages: 3 × 3 on 5 × 2
    /// computes 5 × 4 positions). Where fewer columns are discarded, computing them costs
    /// less than gathering.
    fn gathers(&self, g: &Geometry, c: usize) -> bool {
        let taps = c * g.kh * g.kw;
        g.kh * g.kw == 1 || (2 * g.wq >= 3 * g.wo && taps * g.ho * g.wo <= GATHER_FLOATS)
    }

    /// `rows[t][y · WO + x]` = the input under tap `t` (channel, ky, kx) of output `(y, x)`,
    /// zero in the padding.
    fn gather<T: Word>(&self, g: &Geometry, x: &[T], rows: &mut [T]) {
        let [sh, sw] = self.window.strides;
        let [dh, dw] = self.window.dilations;
        let (pt, pl) = (self.window.pads[0], self.window.pads[1]);
        let plane = g.ho * g.wo;
        let taps = g.kh * g.kw;
        for (t, row) in rows.chunks_exact_mut(plane).enumerate() {
            let (ci, ky, kx) = (t / taps, (t % taps) / g.kw, t % g.kw);
            let channel = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
            for (y, out) in row.chunks_exact_mut(g.wo).enumerate() {
                // Padded row `y · sh + ky · dh` is input row that minus `pt`.
                let Some(iy) = (y * sh + ky * dh).checked_sub(pt).filter(|&iy| iy < g.h) else {
                    out.fill(T::default());
                    continue;
                };
                let line = &channel[iy * g.w..(iy + 1) * g.w];
                if sw == 1 {
                    // Output `xo` reads input `xo + kx · dw - pl`: one run, zeros either side.
                    let shift = kx * dw;
                    let lo = pl.saturating_sub(shift).min(g.wo);
                    let hi = (g.w + pl).saturating_sub(shift).clamp(lo, g.wo);
                    out[..lo].fill(T::default());
                    out[hi..].fill(T::default());
                    if hi > lo {
                        let first = lo + shift - pl;
                        out[lo..hi].copy_from_slice(&line[first..first + hi - lo]);
                    }
                    continue;
                }
                for (xo, o) in out.iter_mut().enumerate() {
                    *o = (xo * sw + kx * dw)
                        .checked_sub(pl)
                        .and_then(|ix| line.get(ix))
                        .copied()
                        .unwrap_or_default();
                }
            }
        }
    }

    /// Where the kernel reads `channels` input planes of `g`: the input itself, one gathered
    /// row per tap, or the zero-padded phase-split scratch, one per channel.
    pub(crate) fn source(&self, g: &Geometry, channels: usize) -> Source {
        let plane = g.ho * g.wo;
        let in_place = self.in_place(g);
        let gathered = !in_place && self.gathers(g, channels);
        if gathered {
            let offsets: Vec<usize> = (0..channels * g.kh * g.kw).map(|t| t * plane).collect();
            return Source {
                scratch_len: offsets.len() * plane,
                offsets,
                stride: 0,
                in_place,
                gathered,
                // Positions are output indices: the geometry of a 1 x 1 convolution on the
                // output.
                rows: Geometry {
                    wq: g.wo,
                    hq: g.ho,
                    ..*g
                },
            };
        }
        let stride = if in_place {
            g.h * g.w
        } else {
            self.window.scratch_len(g)
        };
        let taps = self.window.taps(g);
        Source {
            offsets: (0..channels)
                .flat_map(|ci| taps.iter().map(move |&t| ci * stride + t))
                .collect(),
            stride,
            scratch_len: if in_place { 0 } else { channels * stride },
            in_place,
            gathered,
            rows: *g,
        }
    }

    /// What the kernel reads for one image `x` (`channels` planes of `g`), written into
    /// `scratch` (`source.scratch_len` long) unless read in place.
    pub(crate) fn read<'a, T: Word>(
        &self,
        source: &Source,
        g: &Geometry,
        x: &'a [T],
        scratch: &'a mut [T],
    ) -> &'a [T] {
        if source.in_place {
            x
        } else if source.gathered {
            self.gather(g, x, scratch);
            scratch
        } else {
            for (s, x) in scratch
                .chunks_exact_mut(source.stride)
                .zip(x.chunks_exact(g.h * g.w))
            {
                self.window.fill_scratch(g, x, s);
            }
            scratch
        }
    }

    /// The convolution of `x` (`[N, C, H, W]`) by the packed kernel `k` plus `b` (`[M]`),
    /// then the activation.
    pub(crate) fn run(
        &self,
        x: &[f32],
        x_shape: &[usize],
        k: &[f32],
        k_shape: &[usize],
        b: &[f32],
    ) -> TractResult<Tensor> {
        let g = self.geometry(x_shape)?;
        let (n, c, m) = (x_shape[0], x_shape[1], b.len());
        let want = self.packed_shape(c, m);
        ensure!(
            k_shape == want,
            "{CONV}: packed kernel {k_shape:?} for {c} input and {m} output channels, not {want:?}"
        );
        ensure!(
            x.len() == x_shape.iter().product::<usize>()
                && k.len() == k_shape.iter().product::<usize>(),
            "{CONV}: data and shape disagree"
        );
        let shape = [n, m, g.ho, g.wo];
        // SAFETY: every element is written below (each plane by exactly one call).
        let mut t = unsafe { Tensor::uninitialized::<f32>(&shape)? };
        let plane = g.ho * g.wo;
        let source = self.source(&g, c);
        let mut scratch = vec![0f32; source.scratch_len];
        let image = c * g.h * g.w;
        {
            let mut plain = t.try_as_plain_ram_mut()?;
            let out = plain.as_slice_mut::<f32>()?;
            if out.is_empty() {
                return Ok(t);
            }
            let avx2 = fast();
            for (i, out) in out.chunks_exact_mut(m * plane).enumerate() {
                let x = &x[i * image..(i + 1) * image];
                let src = self.read(&source, &g, x, &mut scratch);
                let taps = source.offsets.len();
                tract_linalg::multithread::par_chunks_mut(
                    out,
                    ROWS * plane,
                    m * plane * taps,
                    |first, chunk| {
                        let c0 = first * ROWS;
                        let packed = &k[c0 * taps..];
                        let (g, offsets) = (&source.rows, &source.offsets);
                        self.rows(g, avx2, src, offsets, packed, &b[c0..], chunk);
                        Ok(())
                    },
                )?;
            }
        }
        Ok(t)
    }

    /// Output planes for the channels whose packed kernels start `packed` and biases start
    /// `b` (`out.len() / plane` of them, from a block boundary), from `src` read at `offsets`.
    #[allow(clippy::too_many_arguments)]
    fn rows(
        &self,
        g: &Geometry,
        avx2: bool,
        src: &[f32],
        offsets: &[usize],
        packed: &[f32],
        b: &[f32],
        out: &mut [f32],
    ) {
        let plane = g.ho * g.wo;
        let m = out.len() / plane;
        let taps = offsets.len();
        let blocks = m.div_ceil(ROWS);
        let packed = &packed[..blocks * taps * ROWS];
        let positions = g.ho * g.wq;
        let reach = offsets.iter().copied().max().unwrap_or(0);
        let per_pass = per_pass(positions, taps);
        let mut stage = vec![0f32; blocks * ROWS * COLS];
        let mut j0 = 0;
        while j0 < positions {
            let len = COLS.min(positions - j0);
            assert!(
                reach + j0 + len <= src.len(),
                "{CONV}: taps read past the input"
            );
            let src = &src[j0..];
            let mut t0 = 0;
            while t0 < taps {
                let t1 = (t0 + per_pass).min(taps);
                for (bi, (wp, acc)) in packed
                    .chunks_exact(taps * ROWS)
                    .zip(stage.chunks_exact_mut(ROWS * COLS))
                    .enumerate()
                {
                    let r0 = bi * ROWS;
                    let rows = ROWS.min(m - r0);
                    let init = (t0 == 0).then(|| &b[r0..r0 + rows]);
                    let (wp, offsets) = (&wp[t0 * ROWS..t1 * ROWS], &offsets[t0..t1]);
                    // The last pass writes the output itself where positions are output
                    // indices (no discarded columns).
                    let direct = (avx2 && g.wq == g.wo && t1 == taps).then(|| Direct {
                        ptr: out[r0 * plane + j0..].as_mut_ptr(),
                        stride: plane,
                        act: self.act,
                    });
                    // SAFETY: `direct` starts at row `r0`, position `j0` of `out`, which holds
                    // `m` planes; the block writes rows `r0..r0 + rows` and positions
                    // `j0..j0 + len` of them, all inside.
                    match rows {
                        6 => unsafe { block::<6>(avx2, acc, len, init, wp, offsets, src, direct) },
                        5 => unsafe { block::<5>(avx2, acc, len, init, wp, offsets, src, direct) },
                        4 => unsafe { block::<4>(avx2, acc, len, init, wp, offsets, src, direct) },
                        3 => unsafe { block::<3>(avx2, acc, len, init, wp, offsets, src, direct) },
                        2 => unsafe { block::<2>(avx2, acc, len, init, wp, offsets, src, direct) },
                        _ => unsafe { block::<1>(avx2, acc, len, init, wp, offsets, src, direct) },
                    }
                }
                t0 = t1;
            }
            if !(avx2 && g.wq == g.wo) {
                for r in 0..m {
                    let acc = &stage[(r / ROWS) * ROWS * COLS + (r % ROWS) * COLS..][..len];
                    self.scatter(g, j0, acc, &mut out[r * plane..(r + 1) * plane]);
                }
            }
            j0 += len;
        }
    }

    /// Positions `j0..j0 + acc.len()` of the scratch-wide output grid into the output plane,
    /// dropping the columns past the output width, through the activation.
    fn scatter(&self, g: &Geometry, j0: usize, acc: &[f32], dst: &mut [f32]) {
        output_runs(g, j0, acc.len(), |from, at, n| {
            self.act.apply(&mut dst[at..at + n], &acc[from..from + n]);
        });
    }
}

/// The runs of positions `j0..j0 + len` of the scratch-wide grid of `g` that are output
/// positions (columns past the output width dropped): `f(i, at, n)` for `n` values from
/// index `i` of the block to output index `at`.
pub(crate) fn output_runs(
    g: &Geometry,
    j0: usize,
    len: usize,
    mut f: impl FnMut(usize, usize, usize),
) {
    let end = j0 + len;
    let mut j = j0;
    while j < end {
        let (y, x) = (j / g.wq, j % g.wq);
        let row_end = ((y + 1) * g.wq).min(end);
        if x < g.wo {
            f(j - j0, y * g.wo + x, (row_end - j).min(g.wo - x));
        }
        j = row_end;
    }
}

/// Taps per pass over a block's accumulators, balanced: the input those taps read for one
/// block of positions stays in the L1 cache across all output channels. With one block of
/// positions, the input is read once per block of rows either way: one pass keeps each block's
/// packed kernel one sequential stream.
pub(crate) fn per_pass(positions: usize, taps: usize) -> usize {
    let passes = if positions <= COLS {
        1
    } else {
        taps.div_ceil(TAPS).max(1)
    };
    taps.div_ceil(passes).max(1)
}

/// Where a fedge convolution's kernel reads its input (see [`Conv::source`]).
pub(crate) struct Source {
    /// Where tap `t` starts, relative to an output position.
    pub offsets: Vec<usize>,
    /// Values per channel in the scratch (or the input, in place); 0 when gathered.
    pub stride: usize,
    pub scratch_len: usize,
    pub in_place: bool,
    pub gathered: bool,
    /// The geometry of the positions the kernel computes.
    pub rows: Geometry,
}

/// `R` rows of `stage` (`COLS` apart), positions `0..len`:
/// `stage[r][j] = s + Σ_t wp[t · ROWS + r] · src[offsets[t] + j]`, where `s` is `bias[r]` when
/// `bias` is given and `stage[r][j]` (a sum over earlier taps) when not.
///
/// # Safety
/// With `direct`, its rows `0..R` must be valid for writes at positions `0..len`.
#[allow(clippy::too_many_arguments)]
unsafe fn block<const R: usize>(
    avx2: bool,
    stage: &mut [f32],
    len: usize,
    bias: Option<&[f32]>,
    wp: &[f32],
    offsets: &[usize],
    src: &[f32],
    direct: Option<Direct>,
) {
    #[cfg(target_arch = "x86_64")]
    if avx2 {
        // SAFETY: `avx2` is true only when AVX2 and FMA were detected on this machine; the
        // caller vouches for `direct`.
        unsafe { block_avx2_fma::<R>(stage, len, bias, wp, offsets, src, direct) };
        return;
    }
    assert!(direct.is_none(), "{CONV}: direct output needs AVX2");
    let _ = avx2;
    block_generic::<R>(stage, len, bias, wp, offsets, src);
}

/// Where [`block_avx2_fma`] writes its finished sums instead of the stage: row `r`, position
/// `j` at `ptr + r · stride + j`, through `act`.
#[derive(Clone, Copy)]
struct Direct {
    ptr: *mut f32,
    stride: usize,
    act: Activation,
}

fn block_generic<const R: usize>(
    stage: &mut [f32],
    len: usize,
    bias: Option<&[f32]>,
    wp: &[f32],
    offsets: &[usize],
    src: &[f32],
) {
    let mut j = 0;
    while j + 8 <= len {
        let mut acc = [[0f32; 8]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            *a = match bias {
                Some(b) => [b[r]; 8],
                None => stage[r * COLS + j..r * COLS + j + 8]
                    .try_into()
                    .expect("eight values"),
            };
        }
        for (t, &off) in offsets.iter().enumerate() {
            let s: &[f32; 8] = src[off + j..off + j + 8].try_into().expect("eight values");
            for (r, a) in acc.iter_mut().enumerate() {
                let w = wp[t * ROWS + r];
                for (a, &v) in a.iter_mut().zip(s) {
                    *a += w * v;
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            stage[r * COLS + j..r * COLS + j + 8].copy_from_slice(a);
        }
        j += 8;
    }
    for j in j..len {
        for r in 0..R {
            let mut a = bias.map_or(stage[r * COLS + j], |b| b[r]);
            for (t, &off) in offsets.iter().enumerate() {
                a += wp[t * ROWS + r] * src[off + j];
            }
            stage[r * COLS + j] = a;
        }
    }
}

/// [`block_generic`] with AVX2 and FMA: `R` rows × 16 positions in registers across all taps;
/// the last 1-15 positions in one sweep of the taps too (one or two registers per row, the
/// last one masked), so that a small output reads each weight once. With `direct`, the sums
/// go through its activation to its rows instead of the stage.
///
/// # Safety
/// The machine must have AVX2 and FMA; with `direct`, its rows `0..R` must be valid for
/// writes at positions `0..len`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn block_avx2_fma<const R: usize>(
    stage: &mut [f32],
    len: usize,
    bias: Option<&[f32]>,
    wp: &[f32],
    offsets: &[usize],
    src: &[f32],
    direct: Option<Direct>,
) {
    assert!(
        R <= ROWS
            && bias.is_none_or(|b| b.len() >= R)
            && wp.len() >= offsets.len() * ROWS
            && stage.len() >= (R - 1) * COLS + len
            && len <= COLS
            && offsets.iter().all(|&off| off + len <= src.len()),
        "{CONV}: block reads or writes out of bounds"
    );
    let mut j = 0;
    // SAFETY (every call): positions `j..j + 8 (V - 1) + last` are below `len` (asserted
    // above with every tap's reads and the stage's rows).
    unsafe {
        while j + 16 <= len {
            sweep_avx2_fma::<R, 2, true>(stage, j, 8, bias, wp, offsets, src, direct);
            j += 16;
        }
        match len - j {
            0 => {}
            8 => sweep_avx2_fma::<R, 1, true>(stage, j, 8, bias, wp, offsets, src, direct),
            rest @ 1..=7 => {
                sweep_avx2_fma::<R, 1, false>(stage, j, rest, bias, wp, offsets, src, direct)
            }
            rest => {
                sweep_avx2_fma::<R, 2, false>(stage, j, rest - 8, bias, wp, offsets, src, direct)
            }
        }
    }
}

/// Positions `j..j + 8 (V - 1) + last` (`1 <= last <= 8`; `last == 8` when `WHOLE`) of
/// [`block_avx2_fma`]: `R × V` registers across all taps; unless `WHOLE`, lanes past `last` in
/// the last register are neither read nor written.
///
/// # Safety
/// As [`block_avx2_fma`], for those positions.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn sweep_avx2_fma<const R: usize, const V: usize, const WHOLE: bool>(
    stage: &mut [f32],
    j: usize,
    last: usize,
    bias: Option<&[f32]>,
    wp: &[f32],
    offsets: &[usize],
    src: &[f32],
    direct: Option<Direct>,
) {
    use std::arch::x86_64::*;
    let (sp, wpp, op) = (src.as_ptr(), wp.as_ptr(), stage.as_mut_ptr());
    let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(last as i32), lanes);
    // SAFETY: the caller's contract; only lanes below `last` of the last register are loaded
    // or stored.
    unsafe {
        macro_rules! load {
            ($p:expr, $v:expr) => {
                if WHOLE || $v + 1 < V {
                    _mm256_loadu_ps($p)
                } else {
                    _mm256_maskload_ps($p, mask)
                }
            };
        }
        let mut acc = [[_mm256_setzero_ps(); V]; R];
        for (r, a) in acc.iter_mut().enumerate() {
            for (v, a) in a.iter_mut().enumerate() {
                *a = match bias {
                    Some(b) => _mm256_set1_ps(b[r]),
                    None => load!(op.add(r * COLS + j + 8 * v), v),
                };
            }
        }
        for (t, &off) in offsets.iter().enumerate() {
            let p = sp.add(off + j);
            let mut x = [_mm256_setzero_ps(); V];
            for (v, x) in x.iter_mut().enumerate() {
                *x = load!(p.add(8 * v), v);
            }
            let w = wpp.add(t * ROWS);
            for (r, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_broadcast_ss(&*w.add(r));
                for (a, &x) in a.iter_mut().zip(&x) {
                    *a = _mm256_fmadd_ps(wv, x, *a);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (v, &a) in a.iter().enumerate() {
                let (dst, a) = match direct {
                    Some(d) => (d.ptr.add(r * d.stride + j + 8 * v), d.act.vec(a)),
                    None => (op.add(r * COLS + j + 8 * v), a),
                };
                if WHOLE || v + 1 < V {
                    _mm256_storeu_ps(dst, a);
                } else {
                    store_lanes(dst, a, last);
                }
            }
        }
    }
}

impl Op for Conv {
    fn name(&self) -> StaticName {
        CONV.into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![self.window.describe(self.act)])
    }

    op_as_typed_op!();
}

impl EvalOp for Conv {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        eval_conv(CONV, &inputs, |x, xs, k, ks, b| self.run(x, xs, k, ks, b))
    }
}

impl InferenceRulesOp for Conv {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        conv_rules(s, inputs, outputs, 3)?;
        for axis in 0..2 {
            let k = self.kernel[axis];
            s.given(&inputs[0].shape[2 + axis], move |s, len| {
                if let Ok(len) = len.to_usize() {
                    let out = self
                        .window
                        .out_len(axis, len, k)
                        .with_context(|| format!("{CONV}: kernel {k} larger than padded {len}"))?;
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

impl TypedOp for Conv {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3, "{CONV} takes input, kernel and bias");
        let (x, k, b) = (inputs[0], inputs[1], inputs[2]);
        ensure!(
            inputs.iter().all(|f| f.datum_type == f32::datum_type()),
            "{CONV} runs on float32 only"
        );
        let (Some(k_shape), Ok(m), Ok(c)) = (
            k.shape.as_concrete(),
            b.shape.first().map_or(Ok(0), |d| d.to_usize()),
            x.shape.get(1).map_or(Ok(0), |d| d.to_usize()),
        ) else {
            bail!("{CONV}: channel counts and the kernel's shape must be known")
        };
        let want = self.packed_shape(c, m);
        ensure!(
            x.rank() == 4 && b.rank() == 1 && k_shape == want,
            "{CONV}: input {:?}, packed kernel {k_shape:?} and bias {:?} disagree (kernel {want:?} expected)",
            x.shape,
            b.shape
        );
        let mut shape: TVec<TDim> = tvec![x.shape[0].clone(), m.to_dim()];
        for axis in 0..2 {
            let len = x.shape[2 + axis]
                .to_usize()
                .with_context(|| format!("{CONV}: spatial size {} not known", x.shape[2 + axis]))?;
            let out = self
                .window
                .out_len(axis, len, self.kernel[axis])
                .with_context(|| format!("{CONV}: kernel larger than padded input"))?;
            shape.push(out.to_dim());
        }
        Ok(tvec!(f32::fact(shape)))
    }

    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let out = self.output_facts(inputs)?;
        let taps = inputs[1].shape.get(1).and_then(|d| d.to_usize().ok());
        Ok(tvec!((
            Cost::FMA(f32::datum_type()),
            out[0].shape.volume() * taps.unwrap_or(0)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, one output point at a time, then the activation.
    fn reference(
        op: &Conv,
        x: &[f32],
        xs: [usize; 4],
        k: &[f32],
        ks: [usize; 4],
        b: &[f32],
    ) -> (Vec<f32>, [usize; 4]) {
        let [n, c, h, w] = xs;
        let [m, _, kh, kw] = ks;
        let o = &op.window;
        let ho = o.out_len(0, h, kh).expect("fits");
        let wo = o.out_len(1, w, kw).expect("fits");
        let mut out = vec![0f32; n * m * ho * wo];
        for ni in 0..n {
            for mi in 0..m {
                for oy in 0..ho {
                    for ox in 0..wo {
                        let mut s = b[mi] as f64;
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
                                    let v = x[((ni * c + ci) * h + y as usize) * w + xx as usize];
                                    let wgt = k[((mi * c + ci) * kh + ky) * kw + kx];
                                    s += (v * wgt) as f64;
                                }
                            }
                        }
                        out[((ni * m + mi) * ho + oy) * wo + ox] = op.act.one(s as f32);
                    }
                }
            }
        }
        (out, [n, m, ho, wo])
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
    /// is exact. Output channel counts cover every register block height (1-6 and more), and
    /// output sizes every position class (blocks of 16, of 8, the tail, several cache blocks).
    #[test]
    fn matches_the_definition_for_strides_pads_dilations_channels_and_activations() {
        let mut seed = 11;
        // input shape, kernel shape, strides, dilations, pads, activation
        type Case = (
            [usize; 4],
            [usize; 4],
            [usize; 2],
            [usize; 2],
            [usize; 4],
            Activation,
        );
        let id = Activation::Identity;
        let cases: &[Case] = &[
            ([1, 3, 7, 9], [4, 3, 3, 3], [1, 1], [1, 1], [1, 1, 1, 1], id),
            (
                [2, 5, 14, 14],
                [7, 5, 1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                id,
            ),
            (
                [1, 4, 15, 16],
                [13, 4, 3, 3],
                [2, 2],
                [1, 1],
                [1, 1, 1, 1],
                id,
            ),
            (
                [1, 2, 9, 11],
                [5, 2, 3, 2],
                [2, 3],
                [1, 1],
                [0, 1, 2, 0],
                id,
            ),
            (
                [1, 3, 12, 12],
                [6, 3, 3, 3],
                [1, 1],
                [2, 2],
                [2, 2, 2, 2],
                id,
            ),
            (
                [1, 8, 30, 33],
                [2, 8, 1, 1],
                [2, 2],
                [1, 1],
                [0, 0, 0, 0],
                id,
            ),
            ([1, 1, 3, 3], [1, 1, 3, 3], [1, 1], [1, 1], [0, 0, 0, 0], id),
            (
                [1, 6, 40, 40],
                [12, 6, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                id,
            ),
            ([1, 3, 5, 5], [3, 3, 1, 1], [1, 1], [1, 1], [1, 1, 1, 1], id),
            // 180 and 400 taps: sums in two and four passes.
            (
                [1, 20, 12, 12],
                [7, 20, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                id,
            ),
            (
                [1, 400, 6, 5],
                [8, 400, 1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                id,
            ),
            (
                [1, 4, 10, 10],
                [6, 4, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                Activation::Relu,
            ),
            (
                [1, 4, 10, 10],
                [3, 4, 1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                Activation::LeakyRelu { alpha: 0.5 },
            ),
            (
                [1, 4, 10, 10],
                [5, 4, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                Activation::Clip { lo: -6.0, hi: 6.0 },
            ),
            (
                [1, 4, 10, 10],
                [6, 4, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                Activation::HardSwish {
                    alpha: 0.25,
                    beta: 0.5,
                },
            ),
            (
                [1, 4, 10, 10],
                [2, 4, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                Activation::ClipSwish {
                    shift: 3.0,
                    lo: 0.0,
                    hi: 6.0,
                    div: 6.0,
                },
            ),
            // Gathered taps: small outputs whose scratch rows would be mostly padding.
            (
                [1, 150, 4, 2],
                [7, 150, 3, 3],
                [1, 1],
                [1, 1],
                [1, 1, 1, 1],
                Activation::Relu,
            ),
            ([1, 5, 9, 6], [4, 5, 3, 3], [2, 2], [2, 1], [1, 2, 0, 1], id),
            // Padding wider than the output: some taps read only zeros.
            ([1, 3, 2, 1], [2, 3, 3, 3], [1, 1], [1, 1], [4, 4, 0, 1], id),
            // Written straight to the output (1 x 1, no padding): 70 positions, 13 rows.
            (
                [1, 9, 7, 10],
                [13, 9, 1, 1],
                [1, 1],
                [1, 1],
                [0, 0, 0, 0],
                Activation::HardSwish {
                    alpha: 0.2,
                    beta: 0.5,
                },
            ),
        ];
        for &(xs, ks, strides, dilations, pads, act) in cases {
            let op = Conv {
                window: Window {
                    strides,
                    dilations,
                    pads,
                },
                kernel: [ks[2], ks[3]],
                act,
            };
            let x = values(&mut seed, xs.iter().product());
            let k = values(&mut seed, ks.iter().product());
            let b = values(&mut seed, ks[0]);
            let (want, shape) = reference(&op, &x, xs, &k, ks, &b);
            let (packed, packed_shape) = pack(&k, ks[0], ks[1] * ks[2] * ks[3]);
            let got = op.run(&x, &xs, &packed, &packed_shape, &b).expect("runs");
            assert_eq!(got.shape(), &shape, "{xs:?} {ks:?} {op:?}");
            let got = got.try_as_plain_ram().expect("runs");
            assert_eq!(
                got.as_slice::<f32>().expect("runs"),
                &want[..],
                "{xs:?} {ks:?} {op:?}"
            );
        }
    }

    /// The gathered-taps path is taken where the tests above expect it.
    #[test]
    fn taps_are_gathered_for_strided_pointwise_and_small_outputs() {
        let op = |k: usize, s: usize, p: usize| Conv {
            window: Window {
                strides: [s, s],
                dilations: [1, 1],
                pads: [p; 4],
            },
            kernel: [k, k],
            act: Activation::Identity,
        };
        let gathers = |op: Conv, x: [usize; 4]| {
            let g = op.geometry(&x).expect("fits");
            op.gathers(&g, x[1])
        };
        assert!(gathers(op(1, 2, 0), [1, 8, 30, 33]));
        assert!(gathers(op(1, 1, 1), [1, 3, 5, 5]));
        assert!(gathers(op(3, 1, 1), [1, 150, 4, 2]));
        assert!(!gathers(op(3, 1, 1), [1, 20, 12, 12]));
        assert!(!gathers(op(3, 1, 1), [1, 96, 160, 120]));
        let pointwise = op(1, 1, 0);
        assert!(pointwise.in_place(&pointwise.geometry(&[1, 8, 3, 3]).expect("fits")));
    }

    /// Every activation's vector loop gives, bit for bit, what the one-value definition gives,
    /// on ordinary values, both zeros, infinities, NaN and every tail length.
    #[test]
    fn vector_activations_match_the_one_value_definition() {
        let mut seed = 3;
        let mut src = values(&mut seed, 61);
        src.iter_mut().for_each(|v| *v *= 8.0);
        src.extend([
            0.0,
            -0.0,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::NAN,
            -3.0,
            3.0,
            6.0,
        ]);
        let kinds = [
            Activation::Identity,
            Activation::Relu,
            Activation::LeakyRelu { alpha: 0.1 },
            Activation::Clip { lo: 0.0, hi: 6.0 },
            Activation::HardSwish {
                alpha: 1.0 / 6.0,
                beta: 0.5,
            },
            Activation::ClipSwish {
                shift: 3.0,
                lo: 0.0,
                hi: 6.0,
                div: 6.0,
            },
        ];
        for act in kinds {
            for len in (0..=17).chain([23, src.len()]) {
                let mut dst = vec![1234.5f32; len];
                act.apply(&mut dst, &src[src.len() - len..]);
                for (d, &s) in dst.iter().zip(&src[src.len() - len..]) {
                    let want = act.one(s);
                    assert!(
                        d.to_bits() == want.to_bits(),
                        "{act:?} on {s}: {d} != {want}"
                    );
                }
            }
        }
    }

    /// [`block`] without direct output.
    fn run_block<const R: usize>(
        avx2: bool,
        stage: &mut [f32],
        len: usize,
        bias: Option<&[f32]>,
        wp: &[f32],
        offsets: &[usize],
        src: &[f32],
    ) {
        // SAFETY: no direct output.
        unsafe { block::<R>(avx2, stage, len, bias, wp, offsets, src, None) }
    }

    /// Both block loops (the portable one and, where the machine has them, AVX2/FMA) against
    /// the sum written out, for every block height and length class.
    #[test]
    fn block_loops_agree_with_the_plain_sum() {
        let mut seed = 5;
        let src = values(&mut seed, 600);
        let offsets = [0, 1, 2, 40, 41, 42, 80, 81, 82, 200, 201];
        let wp = values(&mut seed, offsets.len() * ROWS);
        let bias = values(&mut seed, ROWS);
        for len in [1, 7, 8, 9, 15, 16, 17, 24, 31, 33, COLS - 1, COLS] {
            let want = |r: usize, j: usize| {
                bias[r]
                    + offsets
                        .iter()
                        .enumerate()
                        .map(|(t, &o)| wp[t * ROWS + r] * src[o + j])
                        .sum::<f32>()
            };
            let check = |stage: &[f32], rows: usize, what: &str| {
                for r in 0..rows {
                    for j in 0..len {
                        assert_eq!(stage[r * COLS + j], want(r, j), "{what} {rows} rows, {len}");
                    }
                }
            };
            for avx2 in [false, fast()] {
                let what = if avx2 { "avx2" } else { "portable" };
                let mut stage = vec![f32::NAN; ROWS * COLS];
                run_block::<6>(avx2, &mut stage, len, Some(&bias), &wp, &offsets, &src);
                check(&stage, 6, what);
                let mut stage = vec![f32::NAN; ROWS * COLS];
                run_block::<1>(avx2, &mut stage, len, Some(&bias), &wp, &offsets, &src);
                check(&stage, 1, what);
                let mut stage = vec![f32::NAN; ROWS * COLS];
                run_block::<4>(avx2, &mut stage, len, Some(&bias), &wp, &offsets, &src);
                check(&stage, 4, what);
                // In two passes: the second continues the first's sums.
                let mut stage = vec![f32::NAN; ROWS * COLS];
                let (o1, o2) = offsets.split_at(5);
                let (w1, w2) = wp.split_at(5 * ROWS);
                run_block::<5>(avx2, &mut stage, len, Some(&bias), w1, o1, &src);
                run_block::<5>(avx2, &mut stage, len, None, w2, o2, &src);
                check(&stage, 5, what);
            }
        }
    }

    #[test]
    fn mismatched_shapes_and_oversized_kernels_are_errors() {
        let op = |k: usize| Conv {
            window: Window {
                strides: [1, 1],
                dilations: [1, 1],
                pads: [0, 0, 0, 0],
            },
            kernel: [k, k],
            act: Activation::Identity,
        };
        let x = vec![0f32; 2 * 2 * 2];
        let (k3, s3) = pack(&[0f32; 3 * 2 * 9], 3, 18);
        let err = op(3).run(&x, &[1, 2, 2, 2], &k3, &s3, &[0.0; 3]);
        assert!(format!("{:?}", err.expect_err("an error")).contains("larger than"));
        let (k1, s1) = pack(&[0f32; 3 * 2], 3, 2);
        assert!(op(1).run(&x, &[1, 2, 2, 2], &k1, &s1, &[0.0; 3]).is_ok());
        // Packed for another input channel count, another output channel count, or short data.
        let (k1c, s1c) = pack(&[0f32; 3], 3, 1);
        let err = op(1).run(&x, &[1, 2, 2, 2], &k1c, &s1c, &[0.0; 3]);
        assert!(format!("{:?}", err.expect_err("an error")).contains("packed kernel"));
        let err = op(1).run(&x, &[1, 2, 2, 2], &k1, &s1, &[0.0; 7]);
        assert!(err.is_err());
        let err = op(1).run(&x[..4], &[1, 2, 2, 2], &k1, &s1, &[0.0; 3]);
        assert!(err.is_err());
        let err = op(1).run(&x, &[1, 2, 2, 2], &k1[..6], &s1, &[0.0; 3]);
        assert!(err.is_err());
    }

    /// A model naming `FedgeConv` itself with bad attributes or a kernel of the wrong shape
    /// gets an error at load, not a panic at run time.
    #[test]
    fn bad_attributes_and_kernel_shapes_are_load_errors() {
        use crate::import::graph::{ints_attr, node};
        let mut n = node(CONV, "c".into(), &["x", "w", "b"], &["y"], vec![]);
        let err = Conv::from_node(&n).expect_err("no kernel_shape");
        assert!(format!("{err:?}").contains("kernel_shape"), "{err:?}");
        n.attribute.push(ints_attr("kernel_shape", &[3, 0]));
        assert!(Conv::from_node(&n).is_err(), "a zero kernel side");
        n.attribute = vec![ints_attr("kernel_shape", &[3, 3])];
        let op = Conv::from_node(&n).expect("valid");
        assert_eq!(op.act, Activation::Identity);
        let mut bad_act = n.clone();
        bad_act.attribute.extend(Activation::Relu.attributes());
        bad_act.attribute[1].s = b"swish".to_vec();
        let err = Conv::from_node(&bad_act).expect_err("unknown activation");
        assert!(format!("{err:?}").contains("unknown activation"), "{err:?}");
        let mut no_param = n.clone();
        no_param
            .attribute
            .push(Activation::Clip { lo: 0.0, hi: 6.0 }.attributes()[0].clone());
        let err = Conv::from_node(&no_param).expect_err("clip without bounds");
        assert!(format!("{err:?}").contains("needs attribute"), "{err:?}");

        let x = f32::fact([1usize, 4, 8, 8]);
        let b = f32::fact([5usize]);
        let good = f32::fact([1usize, 36, ROWS]);
        let facts = op.output_facts(&[&x, &good, &b]).expect("shapes agree");
        assert_eq!(
            facts[0].shape.to_tvec(),
            tvec![1.to_dim(), 5.to_dim(), 6.to_dim(), 6.to_dim()]
        );
        for wrong in [[1usize, 35, ROWS], [2, 36, ROWS], [1, 36, 4]] {
            let w = f32::fact(wrong);
            let err = op
                .output_facts(&[&x, &w, &b])
                .expect_err("wrong packed shape");
            assert!(format!("{err:?}").contains("disagree"), "{err:?}");
        }
        let bytes = u8::fact([1usize, 4, 8, 8]);
        assert!(op.output_facts(&[&bytes, &good, &b]).is_err(), "not float");
    }
}
