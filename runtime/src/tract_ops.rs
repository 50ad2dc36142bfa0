//! Ops fedge adds to tract-onnx's register, and the register every parse goes through. All are
//! written only by fedge's import pipeline (domain `ai.fedge`):
//!
//! - `FedgeExactDiv`: ONNX `Div` on floats computed as a true IEEE division. tract 0.23.9
//!   rewrites every float `Div` into a multiplication by the divisor's reciprocal, which differs
//!   from `a / b` by one ulp in about half of the elements. Where a quantize step follows (a
//!   hard-swish `x·relu6(x+3)/6` before `QuantizeLinear` or `DynamicQuantizeLinear`), the ulp
//!   moves values across rounding ties and the integers differ from onnxruntime's, which
//!   divides; deep int8 models amplify that.
//! - `FedgeQuantizeLinear`, `FedgeRequantize`: `QuantizeLinear` with constant scalar parameters,
//!   and the requantisation after an exact int8 convolution or matrix product, each one
//!   vectorised pass computing what onnxruntime computes.
//! - `FedgeQLinearAdd`, `FedgeGlobalAveragePool`: onnxruntime's arithmetic and summation order.
//! - `FedgeDynamicQuantizeLinear`: onnxruntime's scale, zero point and quantization in two
//!   vectorised passes (tract's own op is a tenth of some models' time).
//! - `FedgeDepthwiseConv`: depthwise convolutions (`crate::dwconv`).
//! - `FedgeConv`: dense convolutions on x86-64 with AVX2/FMA (`crate::conv`).
//! - `FedgeScaleBias`: the dynamic quantizer's scale and bias after an integer accumulator.
//! - `FedgeLookup`: an 8-bit to 8-bit element-wise chain as a 256-entry table.
//! - `FedgeCastNarrow`: `Cast` to 4-/2-bit integers and 8-/4-bit floats (`crate::lowp`).

use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::binary::BinMiniOp;
use tract_onnx::tract_hir::infer::*;
use tract_onnx::tract_hir::ops::binary::BinIntoHir;
use tract_onnx::tract_hir::to_typed;

/// The op type fedge's import writes for an exact float division.
pub(crate) const EXACT_DIV: &str = "FedgeExactDiv";

/// The op type for onnxruntime's `QLinearAdd` arithmetic, with attributes `ratio_a`,
/// `ratio_b`, `fixed` (floats) and `signed` (int: 1 for int8, 0 for uint8).
pub(crate) const QLINEAR_ADD: &str = "FedgeQLinearAdd";

/// The op type for `GlobalAveragePool` summed in onnxruntime's order (float32, NCHW).
pub(crate) const GLOBAL_AVERAGE_POOL: &str = "FedgeGlobalAveragePool";

/// The op type for `QuantizeLinear` with constant scalar parameters, attributes `scale`
/// (float), `zero_point` and `signed` (ints).
pub(crate) const QUANTIZE_LINEAR: &str = "FedgeQuantizeLinear";

/// The op type for onnxruntime's requantisation of an integer accumulator (f32 holding exact
/// integers, or i32): `saturate(round_half_even(acc · m[c]) + zero_point)` with one multiplier
/// per channel along `axis` (or one for all); attributes `m` (floats), `axis`, `zero_point`
/// and `signed` (ints).
pub(crate) const REQUANTIZE: &str = "FedgeRequantize";

/// The op type for `DynamicQuantizeLinear` computed as onnxruntime does (no attributes).
pub(crate) const DYNAMIC_QUANTIZE_LINEAR: &str = "FedgeDynamicQuantizeLinear";

/// The op type for an 8-bit to 8-bit element-wise chain run as a table lookup, attributes
/// `table` (256 ints, indexed by the input's byte) and `signed` (int: the output type).
pub(crate) const LOOKUP: &str = "FedgeLookup";

/// The op type for `x · s + b[c]` on an integer accumulator held in f32: input `x` and, when
/// scaled, a one-element `s`; attributes `bias` (floats: one, or one per channel along
/// `axis`, or none) and `axis`.
pub(crate) const SCALE_BIAS: &str = "FedgeScaleBias";

/// The op type for `Cast` to an ONNX narrow type (`crate::lowp`), attributes `to` (the narrow
/// ONNX type code) and `saturate` (int, default 1); the output is the type's container.
pub(crate) const CAST_NARROW: &str = "FedgeCastNarrow";

/// The 8-bit output type of a quantizing op.
pub(crate) fn byte_type(signed: bool) -> DatumType {
    if signed { DatumType::I8 } else { DatumType::U8 }
}

/// Round half to even for |v| ≤ 2^22 (and NaN), without `roundevenf`, which baseline x86-64
/// has no instruction for: adding and subtracting 1.5·2^23 leaves the integer the default
/// rounding mode picks.
#[inline(always)]
fn round_even(v: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    (v + MAGIC) - MAGIC
}

/// tract-onnx's op register plus fedge's ops.
pub(crate) fn onnx() -> tract_onnx::Onnx {
    let mut onnx = tract_onnx::onnx();
    onnx.op_register
        .insert(EXACT_DIV, |_, _| Ok((ExactDiv.into_hir(), vec![])));
    onnx.op_register.insert(QUANTIZE_LINEAR, |_, node| {
        let scale = node
            .get_attr_opt::<f32>("scale")?
            .with_context(|| format!("{QUANTIZE_LINEAR} without its `scale` attribute"))?;
        let zero_point = node.get_attr_opt::<i64>("zero_point")?.unwrap_or(0);
        let signed = node.get_attr_opt::<i64>("signed")?.unwrap_or(0) != 0;
        let op = QuantizeOrt {
            scale: scale.to_bits(),
            zero_point: zero_point as i32,
            signed,
        };
        Ok((
            tract_onnx::tract_hir::ops::expandable::expand(
                tract_onnx::tract_hir::ops::element_wise::ElementWiseOp(Box::new(op)),
            ),
            vec![],
        ))
    });
    onnx.op_register.insert(CAST_NARROW, |_, node| {
        let to = node
            .get_attr_opt::<i64>("to")?
            .with_context(|| format!("{CAST_NARROW} without its `to` attribute"))?;
        let to = i32::try_from(to)
            .ok()
            .filter(|&t| crate::lowp::is_narrow(t))
            .with_context(|| format!("{CAST_NARROW}: {to} is not a narrow ONNX type"))?;
        let saturate = node.get_attr_opt::<i64>("saturate")?.unwrap_or(1) != 0;
        Ok((
            tract_onnx::tract_hir::ops::expandable::expand(
                tract_onnx::tract_hir::ops::element_wise::ElementWiseOp(Box::new(CastNarrow {
                    to,
                    saturate,
                })),
            ),
            vec![],
        ))
    });
    onnx.op_register.insert(REQUANTIZE, |_, node| {
        let m = node
            .get_attr_opt_tvec::<f32>("m")?
            .with_context(|| format!("{REQUANTIZE} without its `m` attribute"))?;
        ensure!(!m.is_empty(), "{REQUANTIZE} with no multiplier");
        Ok((
            Box::new(Requantize {
                m: m.iter().map(|v| v.to_bits()).collect(),
                axis: node.get_attr_opt::<i64>("axis")?.unwrap_or(1),
                zero_point: node.get_attr_opt::<i64>("zero_point")?.unwrap_or(0) as i32,
                signed: node.get_attr_opt::<i64>("signed")?.unwrap_or(0) != 0,
            }),
            vec![],
        ))
    });
    onnx.op_register.insert(DYNAMIC_QUANTIZE_LINEAR, |_, _| {
        Ok((Box::new(DynamicQuantizeOrt), vec![]))
    });
    onnx.op_register.insert(SCALE_BIAS, |_, node| {
        Ok((
            Box::new(ScaleBias {
                axis: node.get_attr_opt::<i64>("axis")?.unwrap_or(1),
                scaled: node.input.len() > 1,
                tail: Tail::from_node(node, SCALE_BIAS)?,
            }),
            vec![],
        ))
    });
    onnx.op_register.insert(LOOKUP, |_, node| {
        let table = node
            .get_attr_opt_tvec::<i64>("table")?
            .with_context(|| format!("{LOOKUP} without its `table` attribute"))?;
        let signed = node.get_attr_opt::<i64>("signed")?.unwrap_or(0) != 0;
        let (lo, hi) = if signed { (-128, 127) } else { (0, 255) };
        ensure!(
            table.len() == 256 && table.iter().all(|v| (lo..=hi).contains(v)),
            "{LOOKUP}: the table must hold 256 values of the output type"
        );
        Ok((
            tract_onnx::tract_hir::ops::expandable::expand(
                tract_onnx::tract_hir::ops::element_wise::ElementWiseOp(Box::new(Lookup {
                    table: table.iter().map(|&v| v as u8).collect(),
                    signed,
                })),
            ),
            vec![],
        ))
    });
    onnx.op_register
        .insert(crate::dwconv::DEPTHWISE_CONV, |_, node| {
            Ok((
                Box::new(crate::dwconv::DepthwiseConv::from_node(node)?),
                vec![],
            ))
        });
    onnx.op_register.insert(crate::qconv::QCONV, |_, node| {
        Ok((Box::new(crate::qconv::QConv::from_node(node)?), vec![]))
    });
    onnx.op_register.insert(crate::conv::CONV, |_, node| {
        Ok((Box::new(crate::conv::Conv::from_node(node)?), vec![]))
    });
    onnx.op_register.insert(GLOBAL_AVERAGE_POOL, |_, _| {
        Ok((Box::new(GlobalAveragePoolOrt), vec![]))
    });
    onnx.op_register.insert(QLINEAR_ADD, |_, node| {
        let get = |name: &str| -> TractResult<f32> {
            node.get_attr_opt::<f32>(name)?
                .with_context(|| format!("{QLINEAR_ADD} without its `{name}` attribute"))
        };
        let signed = node
            .get_attr_opt::<i64>("signed")?
            .with_context(|| format!("{QLINEAR_ADD} without its `signed` attribute"))?;
        Ok((
            QLinearAddOrt {
                ratio_a: get("ratio_a")?.to_bits(),
                ratio_b: get("ratio_b")?.to_bits(),
                fixed: get("fixed")?.to_bits(),
                signed: signed != 0,
            }
            .into_hir(),
            vec![],
        ))
    });
    onnx
}

/// `a / b` on f16, f32 or f64 with numpy broadcasting, as one rounding per element.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ExactDiv;

fn div_in_place<T: Datum + Copy + std::ops::Div<Output = T>>(
    a: &mut Tensor,
    b: &Tensor,
) -> TractResult<()> {
    let b_plain = b.try_as_plain_ram()?;
    let mut a_plain = a.try_as_plain_ram_mut()?;
    if b_plain.len() == 1 && T::datum_type() == DatumType::F32 {
        let d = *b_plain
            .as_slice::<f32>()?
            .first()
            .context("empty divisor")?;
        div_by_scalar_f32(a_plain.as_slice_mut::<f32>()?, d);
    } else if b_plain.len() == 1 {
        let d = *b_plain.as_slice::<T>()?.first().context("empty divisor")?;
        a_plain
            .as_slice_mut::<T>()?
            .iter_mut()
            .for_each(|x| *x = *x / d);
    } else {
        let bv = b_plain.to_array_view::<T>()?;
        let mut av = a_plain.to_array_view_mut::<T>()?;
        let bv = bv
            .broadcast(av.shape())
            .with_context(|| format!("cannot broadcast {:?} to {:?}", bv.shape(), av.shape()))?;
        av.zip_mut_with(&bv, |x, y| *x = *x / *y);
    }
    Ok(())
}

/// `x / d` in place, four lanes at a time with SSE2 on x86-64 (`divps` rounds each lane as
/// `divss` does; LLVM's cost model for baseline x86-64 keeps float division scalar).
fn div_by_scalar_f32(x: &mut [f32], d: f32) {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "sse2")]
        fn sse2(x: &mut [f32], d: f32) {
            use std::arch::x86_64::*;
            let vd = _mm_set1_ps(d);
            for c in x.chunks_exact_mut(4) {
                let q = _mm_div_ps(_mm_set_ps(c[3], c[2], c[1], c[0]), vd);
                // SAFETY: `c` is 4 writable f32s; `storeu` has no alignment requirement.
                unsafe { _mm_storeu_ps(c.as_mut_ptr(), q) };
            }
        }
        // SAFETY: SSE2 is part of the x86-64 baseline, so every x86-64 CPU has it.
        unsafe { sse2(x, d) };
        let done = x.len() / 4 * 4;
        x[done..].iter_mut().for_each(|v| *v /= d);
    }
    #[cfg(not(target_arch = "x86_64"))]
    x.iter_mut().for_each(|v| *v /= d);
}

fn div_out_of_place<T: Datum + Copy + std::ops::Div<Output = T>>(
    c: &mut Tensor,
    a: &Tensor,
    b: &Tensor,
) -> TractResult<()> {
    let (a_plain, b_plain) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
    let (av, bv) = (a_plain.to_array_view::<T>()?, b_plain.to_array_view::<T>()?);
    let mut c_plain = c.try_as_plain_ram_mut()?;
    let mut cv = c_plain.to_array_view_mut::<T>()?;
    let shape = cv.shape().to_vec();
    let av = av
        .broadcast(shape.clone())
        .context("cannot broadcast the dividend")?;
    let bv = bv
        .broadcast(shape)
        .context("cannot broadcast the divisor")?;
    tract_ndarray::Zip::from(&mut cv)
        .and(&av)
        .and(&bv)
        .for_each(|c, &a, &b| *c = a / b);
    Ok(())
}

impl BinMiniOp for ExactDiv {
    fn name(&self) -> &'static str {
        EXACT_DIV
    }

    fn validation(&self) -> Validation {
        Validation::Accurate
    }

    fn result_datum_type(&self, a: DatumType, b: DatumType) -> TractResult<DatumType> {
        let dt = self.operating_datum_type(a, b)?;
        if dt.is_float() {
            Ok(dt)
        } else {
            bail!("{EXACT_DIV} divides floats only, got {a:?} / {b:?}")
        }
    }

    fn eval_in_a(&self, a: &mut Tensor, b: &Tensor) -> TractResult<()> {
        match a.datum_type() {
            DatumType::F32 => div_in_place::<f32>(a, b),
            DatumType::F64 => div_in_place::<f64>(a, b),
            DatumType::F16 => div_in_place::<f16>(a, b),
            dt => bail!("{EXACT_DIV} divides floats only, got {dt:?}"),
        }
    }

    fn eval_out_of_place(&self, c: &mut Tensor, a: &Tensor, b: &Tensor) -> TractResult<()> {
        match c.datum_type() {
            DatumType::F32 => div_out_of_place::<f32>(c, a, b),
            DatumType::F64 => div_out_of_place::<f64>(c, a, b),
            DatumType::F16 => div_out_of_place::<f16>(c, a, b),
            dt => bail!("{EXACT_DIV} divides floats only, got {dt:?}"),
        }
    }

    fn is_commutative(&self) -> bool {
        false
    }

    fn cost_per_element(&self, dt: DatumType) -> TVec<(Cost, usize)> {
        tvec!((Cost::Div(dt), 1))
    }
}

/// onnxruntime's `QLinearAdd` (MLAS, x86-64): with `ra = sa/sc`, `rb = sb/sc` and
/// `fixed = zc - (ra·za + rb·zb)` in f32, `c = saturate(round_half_even(fma(a, ra, fma(b, rb,
/// fixed))))`. The fused multiply-adds are computed in f64, where `a·ra` and `b·rb` are exact
/// (8-bit integers times f32), then rounded once to f32, as the hardware instruction does.
/// Parameters are kept as f32 bit patterns so the op can be `Eq` and `Hash`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QLinearAddOrt {
    pub ratio_a: u32,
    pub ratio_b: u32,
    pub fixed: u32,
    pub signed: bool,
}

impl QLinearAddOrt {
    fn params(&self) -> (f64, f64, f64) {
        (
            f32::from_bits(self.ratio_a) as f64,
            f32::from_bits(self.ratio_b) as f64,
            f32::from_bits(self.fixed) as f64,
        )
    }

    /// One output element from its two inputs (as integers).
    #[inline]
    fn one(&self, a: i32, b: i32, (ra, rb, fixed): (f64, f64, f64), (lo, hi): (f32, f32)) -> f32 {
        let inner = (b as f64 * rb + fixed) as f32;
        let v = (a as f64 * ra + inner as f64) as f32;
        // Clamping to integer bounds first changes no result and keeps |v| small.
        round_even(v.clamp(lo, hi))
    }

    fn eval_typed<T: Datum + Copy + Into<i32>>(
        &self,
        c: &mut Tensor,
        a: &Tensor,
        b: &Tensor,
        range: (f32, f32),
        cast: fn(f32) -> T,
    ) -> TractResult<()> {
        let p = self.params();
        // Fast paths: equal shapes, or a scalar `b`, on contiguous slices.
        if c.shape() == a.shape() && (a.shape() == b.shape() || b.len() == 1) {
            let (a_plain, b_plain) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
            let (xs, ys) = (a_plain.as_slice::<T>()?, b_plain.as_slice::<T>()?);
            let mut c_plain = c.try_as_plain_ram_mut()?;
            let out = c_plain.as_slice_mut::<T>()?;
            let done = self.fast(xs, ys, out, range);
            let (xs, out) = (&xs[done..], &mut out[done..]);
            let ys = if ys.len() == 1 { ys } else { &ys[done..] };
            if ys.len() == xs.len() {
                for ((o, &x), &y) in out.iter_mut().zip(xs).zip(ys) {
                    *o = cast(self.one(x.into(), y.into(), p, range));
                }
            } else {
                let y: i32 = ys.first().copied().context("empty b")?.into();
                for (o, &x) in out.iter_mut().zip(xs) {
                    *o = cast(self.one(x.into(), y, p, range));
                }
            }
            return Ok(());
        }
        let (a_plain, b_plain) = (a.try_as_plain_ram()?, b.try_as_plain_ram()?);
        let (av, bv) = (a_plain.to_array_view::<T>()?, b_plain.to_array_view::<T>()?);
        let mut c_plain = c.try_as_plain_ram_mut()?;
        let mut cv = c_plain.to_array_view_mut::<T>()?;
        let shape = cv.shape().to_vec();
        let av = av.broadcast(shape.clone()).context("cannot broadcast a")?;
        let bv = bv.broadcast(shape).context("cannot broadcast b")?;
        tract_ndarray::Zip::from(&mut cv)
            .and(&av)
            .and(&bv)
            .for_each(|c, &a, &b| *c = cast(self.one(a.into(), b.into(), p, range)));
        Ok(())
    }
}

impl QLinearAddOrt {
    /// The leading elements on AVX2 with hardware f32 fused multiply-adds, which is what
    /// onnxruntime runs on such machines; returns how many were done (0 elsewhere).
    fn fast<T: Datum + Copy>(&self, xs: &[T], ys: &[T], out: &mut [T], range: (f32, f32)) -> usize {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            let signed = match T::datum_type().unquantized() {
                DatumType::I8 => true,
                DatumType::U8 => false,
                _ => return 0,
            };
            let n = xs.len().min(out.len());
            if ys.len() != 1 && ys.len() < n {
                return 0;
            }
            // SAFETY: the features were just detected; T is one byte wide (checked above), and
            // the kernel reads and writes within the first `n` bytes of each slice (`ys` holds
            // one byte or at least `n`).
            return unsafe {
                qlinear_add_avx2(
                    xs.as_ptr() as *const u8,
                    ys.as_ptr() as *const u8,
                    ys.len() == 1,
                    out.as_mut_ptr() as *mut u8,
                    n,
                    signed,
                    self,
                    range,
                )
            };
        }
        let _ = (xs, ys, out, range);
        0
    }
}

/// [`QLinearAddOrt`] over 8 elements at a time: `fma(a, ra, fma(b, rb, fixed))` in f32,
/// clamped, rounded half to even. Returns the count done (a multiple of 8).
///
/// # Safety
/// AVX2 and FMA must be present; `a` and `out` hold `n` bytes, `b` one (`b_scalar`) or `n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn qlinear_add_avx2(
    a: *const u8,
    b: *const u8,
    b_scalar: bool,
    out: *mut u8,
    n: usize,
    signed: bool,
    op: &QLinearAddOrt,
    (lo, hi): (f32, f32),
) -> usize {
    use std::arch::x86_64::*;
    let ra = _mm256_set1_ps(f32::from_bits(op.ratio_a));
    let rb = _mm256_set1_ps(f32::from_bits(op.ratio_b));
    let fixed = _mm256_set1_ps(f32::from_bits(op.fixed));
    let (lo, hi) = (_mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let done = n / 8 * 8;
    // SAFETY: loads of 8 bytes at `i < done <= n` (or the one scalar byte), stores likewise.
    unsafe {
        let widen = |p: *const u8| -> __m256 {
            let v = _mm_loadl_epi64(p as *const __m128i);
            if signed {
                _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v))
            } else {
                _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v))
            }
        };
        let b_one = if signed { *b as i8 as f32 } else { *b as f32 };
        let b_one = _mm256_set1_ps(b_one);
        let mut lanes = [0i32; 8];
        for i in (0..done).step_by(8) {
            let av = widen(a.add(i));
            let bv = if b_scalar { b_one } else { widen(b.add(i)) };
            let v = _mm256_fmadd_ps(av, ra, _mm256_fmadd_ps(bv, rb, fixed));
            let v = _mm256_min_ps(_mm256_max_ps(v, lo), hi);
            let v = _mm256_cvtps_epi32(v);
            _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, v);
            for (k, &l) in lanes.iter().enumerate() {
                *out.add(i + k) = l as u8;
            }
        }
    }
    done
}

impl BinMiniOp for QLinearAddOrt {
    fn name(&self) -> &'static str {
        QLINEAR_ADD
    }

    fn result_datum_type(&self, a: DatumType, b: DatumType) -> TractResult<DatumType> {
        let want = byte_type(self.signed);
        if a.unquantized() == want && b.unquantized() == want {
            Ok(want)
        } else {
            bail!("{QLINEAR_ADD} adds two {want:?} tensors, got {a:?} and {b:?}")
        }
    }

    fn eval_in_a(&self, a: &mut Tensor, b: &Tensor) -> TractResult<()> {
        let src = a.clone();
        self.eval_out_of_place(a, &src, b)
    }

    fn eval(&self, a: TValue, b: TValue, c_dt: DatumType) -> TractResult<Tensor> {
        let shape = tract_onnx::tract_core::broadcast::multi_broadcast(&[a.shape(), b.shape()])?;
        let mut c = Tensor::zero_dt(c_dt, &shape)?;
        self.eval_out_of_place(&mut c, &a, &b)?;
        Ok(c)
    }

    fn eval_out_of_place(&self, c: &mut Tensor, a: &Tensor, b: &Tensor) -> TractResult<()> {
        // `one` returns integers already within the type's range, so the casts are exact.
        if self.signed {
            self.eval_typed::<i8>(c, a, b, (-128.0, 127.0), |v| v as i8)
        } else {
            self.eval_typed::<u8>(c, a, b, (0.0, 255.0), |v| v as u8)
        }
    }

    fn is_commutative(&self) -> bool {
        false
    }

    fn cost_per_element(&self, dt: DatumType) -> TVec<(Cost, usize)> {
        tvec!((Cost::FMA(dt), 2))
    }
}

/// `GlobalAveragePool` on float32 NCHW(…) tensors summed as onnxruntime's MLAS kernel sums:
/// four interleaved partial sums over the spatial elements in blocks of four, combined as
/// `(s0 + s2) + (s1 + s3)`, then the remaining elements one at a time, then a division by the
/// element count. tract sums in another order and multiplies by the reciprocal count; the last
/// bits differ, and after a dynamic quantization of the few pooled values (squeeze-excitation
/// blocks) that is a whole quantization step.
#[derive(Debug, Clone, Default, Hash, PartialEq, Eq)]
pub(crate) struct GlobalAveragePoolOrt;

impl GlobalAveragePoolOrt {
    fn pool(x: &[f32]) -> f32 {
        let mut lanes = [0f32; 4];
        let mut blocks = x.chunks_exact(4);
        for b in &mut blocks {
            for (l, v) in lanes.iter_mut().zip(b) {
                *l += v;
            }
        }
        let mut sum = (lanes[0] + lanes[2]) + (lanes[1] + lanes[3]);
        for v in blocks.remainder() {
            sum += v;
        }
        sum / x.len() as f32
    }
}

impl Op for GlobalAveragePoolOrt {
    fn name(&self) -> StaticName {
        GLOBAL_AVERAGE_POOL.into()
    }

    op_as_typed_op!();
}

impl EvalOp for GlobalAveragePoolOrt {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("GlobalAveragePool without input")?;
        ensure!(
            x.rank() >= 3,
            "GlobalAveragePool needs N, C and spatial axes"
        );
        let shape = x.shape().to_vec();
        let spatial: usize = shape[2..].iter().product();
        ensure!(
            spatial > 0,
            "GlobalAveragePool over an empty spatial extent"
        );
        let plain = x.try_as_plain_ram()?;
        let data = plain.as_slice::<f32>()?;
        let pooled: Vec<f32> = data.chunks_exact(spatial).map(Self::pool).collect();
        let mut out_shape = shape[..2].to_vec();
        out_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
        Ok(tvec!(
            Tensor::from_shape(&out_shape, &pooled)?.into_tvalue()
        ))
    }
}

impl InferenceRulesOp for GlobalAveragePoolOrt {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].rank, &outputs[0].rank)?;
        s.equals(&inputs[0].shape[0], &outputs[0].shape[0])?;
        s.equals(&inputs[0].shape[1], &outputs[0].shape[1])?;
        s.given(&inputs[0].rank, move |s, rank| {
            for axis in 2..rank as usize {
                s.equals(&outputs[0].shape[axis], TDim::from(1))?;
            }
            Ok(())
        })
    }

    as_op!();
    to_typed!();
}

impl TypedOp for GlobalAveragePoolOrt {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs.first().context("GlobalAveragePool without input")?;
        ensure!(
            x.datum_type == f32::datum_type(),
            "{GLOBAL_AVERAGE_POOL} pools float32 only"
        );
        ensure!(
            x.rank() >= 3,
            "GlobalAveragePool needs N, C and spatial axes"
        );
        let mut shape: TVec<TDim> = x.shape.iter().take(2).cloned().collect();
        shape.extend(std::iter::repeat_n(TDim::from(1), x.rank() - 2));
        Ok(tvec!(f32::fact(shape)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::lcg;

    #[test]
    fn round_even_is_round_half_to_even() {
        for v in [
            -2.5f32,
            -1.5,
            -0.5,
            0.5,
            1.5,
            2.5,
            3.4999998,
            -127.5,
            254.5,
            1e6 + 0.5,
            0.0,
            -0.0,
        ] {
            assert_eq!(round_even(v), v.round_ties_even(), "{v}");
        }
        assert!(round_even(f32::NAN).is_nan());
    }

    #[test]
    fn exact_div_divides_where_a_reciprocal_multiply_does_not() {
        let mut seed = 1;
        let a: Vec<f32> = (0..4096)
            .map(|_| lcg(&mut seed) as f32 / 1e6 - 2000.0)
            .collect();
        let x = Tensor::from_shape(&[4096], &a).expect("a");
        let six = Tensor::from_shape::<f32>(&[], &[6.0]).expect("b");
        // Broadcast scalar, in place.
        let mut got = x.clone();
        ExactDiv.eval_in_a(&mut got, &six).expect("in place");
        let got = got
            .try_as_plain_ram()
            .expect("ram")
            .as_slice::<f32>()
            .expect("f32")
            .to_vec();
        let want: Vec<f32> = a.iter().map(|v| v / 6.0).collect();
        assert_eq!(got, want);
        let recip = 1.0f32 / 6.0;
        assert!(
            a.iter().zip(&want).any(|(v, w)| v * recip != *w),
            "no case tells them apart"
        );
        // Out of place, broadcasting a column against a row.
        let col = Tensor::from_shape(&[3, 1], &[1.0f32, 3.0, 7.0]).expect("col");
        let row = Tensor::from_shape(&[1, 2], &[10.0f32, 0.1]).expect("row");
        let mut c = Tensor::zero::<f32>(&[3, 2]).expect("c");
        ExactDiv
            .eval_out_of_place(&mut c, &col, &row)
            .expect("out of place");
        let c = c
            .try_as_plain_ram()
            .expect("ram")
            .as_slice::<f32>()
            .expect("f32")
            .to_vec();
        assert_eq!(c, vec![0.1, 10.0, 0.3, 30.0, 0.7, 70.0]);
        // Integers are refused, not truncated.
        assert!(
            ExactDiv
                .result_datum_type(DatumType::I32, DatumType::I32)
                .is_err()
        );
    }

    /// onnxruntime's formula with the hardware-style fused multiply-add (`f32::mul_add`, one
    /// rounding), independent of the f64 evaluation the op uses.
    fn reference(a: i32, b: i32, ra: f32, rb: f32, fixed: f32, lo: f32, hi: f32) -> f32 {
        (a as f32)
            .mul_add(ra, (b as f32).mul_add(rb, fixed))
            .round_ties_even()
            .clamp(lo, hi)
    }

    #[test]
    fn qlinear_add_matches_fused_multiply_adds_on_every_input_pair() {
        // Scales and zero points from ppocr_rec_v4_qop, and an asymmetric uint8 set.
        let cases = [
            (
                0.21323152f32,
                26f32,
                0.02362205f32,
                0f32,
                0.02352941f32,
                -128f32,
                true,
            ),
            (0.013f32, 120f32, 0.051f32, 3f32, 0.047f32, 131f32, false),
        ];
        for (sa, za, sb, zb, sc, zc, signed) in cases {
            let (ra, rb) = (sa / sc, sb / sc);
            let fixed = zc - (ra * za + rb * zb);
            let op = QLinearAddOrt {
                ratio_a: ra.to_bits(),
                ratio_b: rb.to_bits(),
                fixed: fixed.to_bits(),
                signed,
            };
            let (lo, hi) = if signed {
                (-128.0, 127.0)
            } else {
                (0.0, 255.0)
            };
            let values: Vec<i32> = if signed {
                (-128..128).collect()
            } else {
                (0..256).collect()
            };
            let n = values.len();
            // Every (a, b) pair: a varies along axis 0, b along axis 1 (broadcast).
            let (a, b, mut c, want): (Tensor, Tensor, Tensor, Vec<f32>);
            let want_of = |x: i32, y: i32| reference(x, y, ra, rb, fixed, lo, hi);
            want = values
                .iter()
                .flat_map(|&x| values.iter().map(move |&y| (x, y)))
                .map(|(x, y)| want_of(x, y))
                .collect();
            if signed {
                let v: Vec<i8> = values.iter().map(|&x| x as i8).collect();
                a = Tensor::from_shape(&[n, 1], &v).expect("a");
                b = Tensor::from_shape(&[1, n], &v).expect("b");
                c = Tensor::zero::<i8>(&[n, n]).expect("c");
            } else {
                let v: Vec<u8> = values.iter().map(|&x| x as u8).collect();
                a = Tensor::from_shape(&[n, 1], &v).expect("a");
                b = Tensor::from_shape(&[1, n], &v).expect("b");
                c = Tensor::zero::<u8>(&[n, n]).expect("c");
            }
            op.eval_out_of_place(&mut c, &a, &b).expect("eval");
            let got: Vec<f32> = c
                .cast_to::<f32>()
                .expect("cast")
                .try_as_plain_ram()
                .expect("ram")
                .as_slice::<f32>()
                .expect("f32")
                .to_vec();
            assert_eq!(got, want, "signed={signed}");
            // The same pairs as two flat tensors of equal shape: the vectorised path (where
            // the machine has AVX2 and FMA) and its scalar tail (n² = 65 536 is a multiple of
            // 8, so drop 3 elements to leave one).
            let m = n * n - 3;
            let flat = |t: &Tensor| -> Tensor {
                let full = t.broadcast_to_shape(&[n, n]).expect("broadcast");
                full.into_shape(&[n * n])
                    .expect("flat")
                    .slice(0, 0, m)
                    .expect("slice")
            };
            let (fa, fb) = (flat(&a), flat(&b));
            let mut fc = Tensor::zero_dt(fa.datum_type(), &[m]).expect("c");
            op.eval_out_of_place(&mut fc, &fa, &fb).expect("eval");
            let got: Vec<f32> = fc
                .cast_to::<f32>()
                .expect("cast")
                .try_as_plain_ram()
                .expect("ram")
                .as_slice::<f32>()
                .expect("f32")
                .to_vec();
            assert_eq!(got, want[..m], "equal shapes, signed={signed}");
        }
    }

    #[test]
    fn lookup_agrees_with_the_table_for_every_byte_and_tail() {
        let mut seed = 21;
        let table: [u8; 256] = std::array::from_fn(|_| crate::testutil::lcg(&mut seed) as u8);
        for len in [0usize, 1, 31, 32, 33, 256 + 17, 1000] {
            let x: Vec<u8> = (0..len).map(|i| (i * 97 + len) as u8).collect();
            let mut o = vec![0u8; len];
            lookup(&table, &x, &mut o);
            let want: Vec<u8> = x.iter().map(|&v| table[v as usize]).collect();
            assert_eq!(o, want, "length {len}");
        }
    }

    #[test]
    fn scale_bias_matches_its_definition_on_either_channel_axis() {
        // [2, 3, 13]: channels on axis 1 (a convolution's, 13 values each) or on the last
        // axis (a matrix product's, one bias per element of each row); vector blocks and
        // scalar tails both.
        let x: Vec<f32> = (0..2 * 3 * 13).map(|i| (i as f32 - 40.0) * 3.0).collect();
        let t = Tensor::from_shape(&[2, 3, 13], &x).expect("x");
        let s = 0.0371f32;
        let (a, b) = (1.0f32 / 6.0, 0.5f32);
        for (axis, channels) in [(1i64, 3usize), (-1, 13)] {
            let bias: Vec<f32> = (0..channels).map(|c| c as f32 * 0.3 - 1.0).collect();
            let mul: Vec<f32> = (0..channels).map(|c| 1.3 - c as f32 * 0.07).collect();
            let add = vec![0.45f32];
            let swishes = [
                Swish::None,
                Swish::Sigmoid([a, b]),
                Swish::Clip([3.0, 0.0, 6.0, 6.0]),
            ];
            for (swish, affine) in swishes.into_iter().zip([false, true, true]) {
                let op = ScaleBias {
                    axis,
                    scaled: true,
                    tail: Tail {
                        bias: bias.clone(),
                        mul: if affine { mul.clone() } else { vec![] },
                        add: if affine { add.clone() } else { vec![] },
                        swish,
                    },
                };
                let out = op
                    .eval(
                        &EvalContext::out_of_plan(),
                        tvec!(t.clone().into_tvalue(), Tensor::from(s).into_tvalue()),
                    )
                    .expect("eval");
                let got: Vec<u32> = out[0]
                    .try_as_plain_ram()
                    .expect("ram")
                    .as_slice::<f32>()
                    .expect("f32")
                    .iter()
                    .map(|v| v.to_bits())
                    .collect();
                let want: Vec<u32> = (0..x.len())
                    .map(|i| {
                        let c = if axis == 1 { i / 13 % 3 } else { i % 13 };
                        let mut v = x[i] * s + bias[c];
                        if affine {
                            v = v * mul[c] + add[0];
                        }
                        match swish {
                            Swish::None => {}
                            Swish::Sigmoid(_) => v *= (v * a + b).clamp(0.0, 1.0),
                            Swish::Clip(_) => v = v * (v + 3.0).clamp(0.0, 6.0) / 6.0,
                        }
                        v.to_bits()
                    })
                    .collect();
                assert_eq!(got, want, "axis {axis}, {swish:?}");
            }
        }
    }

    /// The fedge ops a crafted model can name directly (domain `ai.fedge`): bad parameters
    /// and inputs are errors, not panics.
    #[test]
    fn scale_bias_and_lookup_refuse_bad_parameters_and_inputs() {
        let op = ScaleBias {
            axis: 1,
            scaled: true,
            tail: Tail {
                bias: vec![1.0; 3],
                ..Tail::default()
            },
        };
        let x = Tensor::zero::<f32>(&[1, 2, 2]).expect("x");
        let one = Tensor::from(2f32);
        let err = op
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(x.clone().into_tvalue(), one.clone().into_tvalue()),
            )
            .expect_err("3 biases for 2 channels");
        assert!(
            format!("{err:?}").contains("3 bias, 0 multiplier and 0 addend values for 2 channels"),
            "{err:?}"
        );
        let two = Tensor::zero::<f32>(&[2]).expect("s");
        let ok = ScaleBias {
            tail: Tail::default(),
            ..op.clone()
        };
        let err = ok
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(x.clone().into_tvalue(), two.into_tvalue()),
            )
            .expect_err("a two-value scale");
        assert!(format!("{err:?}").contains("not one"), "{err:?}");
        let err = ok
            .eval(&EvalContext::out_of_plan(), tvec!(x.clone().into_tvalue()))
            .expect_err("no scale");
        assert!(format!("{err:?}").contains("without its scale"), "{err:?}");
        let far = ScaleBias { axis: 5, ..ok };
        assert!(
            far.eval(
                &EvalContext::out_of_plan(),
                tvec!(x.clone().into_tvalue(), one.into_tvalue())
            )
            .is_err()
        );

        let short = Lookup {
            table: vec![0; 10],
            signed: false,
        };
        let bytes = Tensor::zero::<u8>(&[4]).expect("bytes");
        assert!(short.eval_out_of_place(&bytes, None).is_err());
        let full = Lookup {
            table: (0..=255u8).rev().collect(),
            signed: false,
        };
        assert!(
            full.eval_out_of_place(&x, None).is_err(),
            "floats are not bytes"
        );
        let out = full.eval_out_of_place(&bytes, None).expect("lookup");
        assert_eq!(
            out.try_as_plain_ram()
                .expect("ram")
                .as_slice::<u8>()
                .expect("u8"),
            [255; 4]
        );
    }

    #[test]
    fn quantize_divides_rounds_half_to_even_saturates_and_sends_nan_to_the_bottom() {
        let op = QuantizeOrt {
            scale: 0.5f32.to_bits(),
            zero_point: -3,
            signed: true,
        };
        let x = Tensor::from_shape(&[6], &[1.25f32, 0.75, 1000.0, -1000.0, f32::NAN, -0.25])
            .expect("x");
        let q = op.eval_out_of_place(&x, None).expect("eval");
        let q = q
            .try_as_plain_ram()
            .expect("ram")
            .as_slice::<i8>()
            .expect("i8")
            .to_vec();
        // 2.5 → 2, 1.5 → 2 (half to even), saturation both ways, NaN → -128, -0.5 → -0.
        assert_eq!(q, vec![-1, -1, 127, -128, -128, -3]);
        let s = 0.023_529_41f32;
        let op = QuantizeOrt {
            scale: s.to_bits(),
            zero_point: 0,
            signed: false,
        };
        // x / s is 64.5 exactly and rounds to 64; x · (1/s) is 64.50001 and would give 65.
        let x = 1.517_647f32;
        assert_eq!(x / s, 64.5);
        assert_ne!(x * (1.0 / s), 64.5);
        let q = op
            .eval_out_of_place(&Tensor::from_shape(&[1], &[x]).expect("x"), None)
            .expect("eval");
        assert_eq!(
            q.try_as_plain_ram()
                .expect("ram")
                .as_slice::<u8>()
                .expect("u8"),
            &[64]
        );
    }

    /// Values that probe every branch: ties, bounds, NaN, infinities, signed zeros, randoms.
    fn probes(n: usize) -> Vec<f32> {
        let mut seed = 5;
        let special = [
            0.5,
            1.5,
            2.5,
            -0.5,
            -1.5,
            127.5,
            128.5,
            -128.5,
            255.5,
            1e9,
            -1e9,
            0.0,
            -0.0,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            4_194_303.5,
        ];
        (0..n)
            .map(|i| {
                special
                    .get(i % 40)
                    .copied()
                    .unwrap_or_else(|| (lcg(&mut seed) as f32 / u32::MAX as f32 - 0.5) * 700.0)
            })
            .collect()
    }

    #[test]
    fn vector_quantize_and_divide_equal_their_scalar_forms() {
        let x = probes(1003);
        for s in [1.0f32, 0.023_529_41, 3.0, 0.7] {
            for zp in [0, 7, -3, 128] {
                for signed in [false, true] {
                    let p = quant_params(zp, signed);
                    let (mut div, mut mul) = (vec![0u8; x.len()], vec![0u8; x.len()]);
                    if signed {
                        let (mut d, mut m) = (vec![0i8; x.len()], vec![0i8; x.len()]);
                        quantize_slice::<i8, false>(&x, &mut d, s, zp);
                        quantize_slice::<i8, true>(&x, &mut m, s, zp);
                        div = d.iter().map(|&v| v as u8).collect();
                        mul = m.iter().map(|&v| v as u8).collect();
                    } else {
                        quantize_slice::<u8, false>(&x, &mut div, s, zp);
                        quantize_slice::<u8, true>(&x, &mut mul, s, zp);
                    }
                    // The SSE2 form, which machines without AVX2 run.
                    #[cfg(target_arch = "x86_64")]
                    if !signed {
                        let mut sse = vec![0u8; x.len()];
                        // SAFETY: SSE2 is part of the x86-64 baseline.
                        let done = unsafe { quantize_sse2::<u8, false>(&x, &mut sse, s, p) };
                        assert_eq!(sse[..done], div[..done], "SSE2, / {s}, zero point {zp}");
                    }
                    for (i, &v) in x.iter().enumerate() {
                        assert_eq!(div[i], quantize_one::<false>(v, s, p) as u8, "{v} / {s}");
                        assert_eq!(mul[i], quantize_one::<true>(v, s, p) as u8, "{v} * {s}");
                        let q = (v / s).round_ties_even() + zp as f32;
                        let (lo, hi) = if signed {
                            (-128.0, 127.0)
                        } else {
                            (0.0, 255.0)
                        };
                        let want = if v.is_nan() { lo } else { q.clamp(lo, hi) };
                        let got = if signed {
                            div[i] as i8 as f32
                        } else {
                            div[i] as f32
                        };
                        assert_eq!(got, want, "{v} / {s} + {zp}");
                    }
                }
            }
            let mut y = x.clone();
            div_by_scalar_f32(&mut y, s);
            for (a, b) in y.iter().zip(&x) {
                assert!(a.to_bits() == (b / s).to_bits() || (a.is_nan() && b.is_nan()));
            }
        }
    }

    #[test]
    fn dynamic_quantize_takes_onnxruntimes_scale_and_zero_point() {
        // The ONNX node test's input: min -3, max 2 → scale 5/255, zero point 153.
        let x = [0.0f32, 2.0, -3.0, -2.5, 1.34, 0.5];
        let (s, zp) = DynamicQuantizeOrt::params(&x);
        assert_eq!(s, 5.0 / 255.0);
        assert_eq!(zp, 153);
        // All positive: the range still includes 0. All zero: scale 1.
        let long: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 + 1.0).collect();
        assert_eq!(DynamicQuantizeOrt::params(&long), (19.0 / 255.0, 0));
        assert_eq!(DynamicQuantizeOrt::params(&[0.0; 20]), (1.0, 0));
        // The extremes in each lane of the vector blocks and in the remainder.
        for at in [0, 5, 15, 16, 31, 997, 1000] {
            let mut v: Vec<f32> = (0..1003).map(|i| ((i * 37) % 101) as f32 * 0.01).collect();
            v[at] = -7.5;
            v[(at + 400) % 1003] = 9.25;
            let (s, zp) = DynamicQuantizeOrt::params(&v);
            assert_eq!((s, zp), (16.75 / 255.0, 114), "extremes at {at}");
        }
        let t = Tensor::from_shape(&[6], &x).expect("x");
        let out = DynamicQuantizeOrt
            .eval(&EvalContext::out_of_plan(), tvec!(t.into_tvalue()))
            .expect("eval");
        let y = out[0].try_as_plain_ram().expect("ram");
        assert_eq!(
            y.as_slice::<u8>().expect("u8"),
            &[153, 255, 0, 26, 221, 179]
        );
    }

    #[test]
    fn requantize_scales_each_channel_once_and_checks_its_multipliers() {
        let acc: Vec<f32> = probes(2 * 3 * 20).iter().map(|v| v.round()).collect();
        let m = [0.01f32, 0.5, 0.003];
        let op = |axis: i64, m: &[f32]| Requantize {
            m: m.iter().map(|v| v.to_bits()).collect(),
            axis,
            zero_point: 10,
            signed: false,
        };
        let want = |v: f32, m: f32| -> u8 {
            if v.is_nan() {
                0
            } else {
                ((v * m).round_ties_even() + 10.0).clamp(0.0, 255.0) as u8
            }
        };
        let run = |op: &Requantize, shape: &[usize]| -> TractResult<Vec<u8>> {
            let mut out = vec![0u8; acc.len()];
            op.requantize_into(&acc, shape, &mut out).map(|()| out)
        };
        // NCHW: channels on axis 1, 20 values each.
        let got = run(&op(1, &m), &[2, 3, 4, 5]).expect("nchw");
        for (i, (&g, &v)) in got.iter().zip(&acc).enumerate() {
            assert_eq!(g, want(v, m[i / 20 % 3]), "nchw {i}");
        }
        // Channels last (a matrix product's columns).
        let got = run(&op(-1, &m), &[40, 3]).expect("last");
        for (i, (&g, &v)) in got.iter().zip(&acc).enumerate() {
            assert_eq!(g, want(v, m[i % 3]), "last {i}");
        }
        // One multiplier for everything.
        let got = run(&op(1, &m[..1]), &[120]).expect("one");
        for (&g, &v) in got.iter().zip(&acc) {
            assert_eq!(g, want(v, m[0]));
        }
        // Multipliers that fit no axis, and an axis out of range: errors, not panics.
        assert!(run(&op(1, &m), &[2, 4, 15]).is_err());
        assert!(run(&op(3, &m), &[40, 3]).is_err());
        // An i32 accumulator runs through `eval`, converted to f32 first.
        let acc_i: Vec<i32> = (0..6).map(|i| i * 1000 - 2500).collect();
        let t = Tensor::from_shape(&[1, 3, 2], &acc_i).expect("acc");
        let out = op(1, &m)
            .eval(&EvalContext::out_of_plan(), tvec!(t.into_tvalue()))
            .expect("eval");
        let out = out[0].try_as_plain_ram().expect("ram");
        let q = out.as_slice::<u8>().expect("u8");
        let want_i: Vec<u8> = acc_i
            .iter()
            .enumerate()
            .map(|(i, &a)| want(a as f32, m[i / 2]))
            .collect();
        assert_eq!(q, want_i.as_slice());
    }

    #[test]
    fn global_average_pool_sums_in_four_lanes_then_the_tail() {
        // 2 channels of 3x3: 9 elements, two blocks of four and a tail of one.
        let x: Vec<f32> = (0..18).map(|i| 0.1 * i as f32 + 1e-3).collect();
        let out = GlobalAveragePoolOrt
            .eval(
                &EvalContext::out_of_plan(),
                tvec!(
                    Tensor::from_shape(&[1, 2, 3, 3], &x)
                        .expect("x")
                        .into_tvalue()
                ),
            )
            .expect("eval");
        assert_eq!(out[0].shape(), &[1, 2, 1, 1]);
        let got = out[0]
            .try_as_plain_ram()
            .expect("ram")
            .as_slice::<f32>()
            .expect("f32")
            .to_vec();
        for (ch, g) in got.iter().enumerate() {
            let v = &x[ch * 9..ch * 9 + 9];
            let lanes = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
            let want = ((lanes[0] + lanes[2]) + (lanes[1] + lanes[3]) + v[8]) / 9.0;
            assert_eq!(*g, want, "channel {ch}");
        }
        // A non-float input is refused when typed.
        let fact = i32::fact([1usize, 2, 3, 3]);
        assert!(GlobalAveragePoolOrt.output_facts(&[&fact]).is_err());
    }
}

/// `QuantizeLinear` with a constant scalar scale and zero point, as onnxruntime computes it:
/// `saturate(round_half_even(x / scale) + zero_point)`, one pass (tract multiplies by the
/// reciprocal scale).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct QuantizeOrt {
    pub scale: u32,
    pub zero_point: i32,
    pub signed: bool,
}

impl QuantizeOrt {
    fn quantize<T: QByte>(&self, x: &[f32], shape: &[usize]) -> TractResult<Tensor> {
        let (s, zp) = (f32::from_bits(self.scale), self.zero_point);
        fill::<T>(shape, |out| {
            quantize_slice::<T, false>(x, out, s, zp);
            Ok(())
        })
    }
}

/// A new tensor of `shape` written by `write` (tract's own allocation: building one from a
/// `Vec` copies it into aligned storage).
pub(crate) fn fill<T: Datum>(
    shape: &[usize],
    write: impl FnOnce(&mut [T]) -> TractResult<()>,
) -> TractResult<Tensor> {
    let mut t = Tensor::zero_dt(T::datum_type(), shape)?;
    {
        let mut plain = t.try_as_plain_ram_mut()?;
        write(plain.as_slice_mut::<T>()?)?;
    }
    Ok(t)
}

/// The bounds `(lo, hi)` of an 8-bit type relative to the zero point, and the integer bias
/// that turns [`MAGIC`]-rounded bits back into the value plus the zero point.
pub(crate) fn quant_params(zero_point: i32, signed: bool) -> (f32, f32, i32) {
    let (lo, hi) = if signed {
        (-128.0, 127.0)
    } else {
        (0.0, 255.0)
    };
    (
        lo - zero_point as f32,
        hi - zero_point as f32,
        zero_point - MAGIC_BITS,
    )
}

/// One element: `v / s` (or `v · s` with `MUL`), clamped, rounded half to even, plus the zero
/// point. Clamping to the integer bounds before rounding changes no result; NaN fails
/// `q > lo` and becomes the lowest value, as onnxruntime's `maxps` does. Adding 1.5·2^23
/// rounds half to even and leaves the integer in the low mantissa bits, read without a float
/// to int conversion; the zero point is then added as an integer, exactly.
#[inline(always)]
pub(crate) fn quantize_one<const MUL: bool>(
    v: f32,
    s: f32,
    (lo, hi, bias): (f32, f32, i32),
) -> i32 {
    let q = if MUL { v * s } else { v / s };
    let q = if q > lo { q } else { lo };
    let q = if q < hi { q } else { hi };
    (q + MAGIC).to_bits() as i32 + bias
}

/// [`quantize_one`] over a slice into 8-bit codes (two's complement bytes when `signed`),
/// 16 values per step with SSE2 on x86-64 (the same operations, so the same results).
pub(crate) fn quantize_slice<T: QByte, const MUL: bool>(x: &[f32], out: &mut [T], s: f32, zp: i32) {
    let p = quant_params(zp, T::SIGNED);
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AVX2 is used only where detected; SSE2 is part of the x86-64 baseline.
    let done = unsafe {
        if crate::conv::fast() {
            quantize_avx2::<T, MUL>(x, out, s, p)
        } else {
            quantize_sse2::<T, MUL>(x, out, s, p)
        }
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (o, &v) in out[done..].iter_mut().zip(&x[done..]) {
        *o = T::narrow(quantize_one::<MUL>(v, s, p));
    }
}

/// The 8-bit output types of the quantize kernels.
pub(crate) trait QByte: Datum + Copy + Default {
    const SIGNED: bool;
    /// An integer already in range.
    fn narrow(v: i32) -> Self;
}

impl QByte for u8 {
    const SIGNED: bool = false;
    fn narrow(v: i32) -> u8 {
        v as u8
    }
}

impl QByte for i8 {
    const SIGNED: bool = true;
    fn narrow(v: i32) -> i8 {
        v as i8
    }
}

/// [`quantize_slice`] on the first multiple of 16 values; returns how many it did.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "sse2")]
fn quantize_sse2<T: QByte, const MUL: bool>(
    x: &[f32],
    out: &mut [T],
    s: f32,
    (lo, hi, bias): (f32, f32, i32),
) -> usize {
    const { assert!(std::mem::size_of::<T>() == 1) };
    use std::arch::x86_64::*;
    let (vs, vlo, vhi) = (_mm_set1_ps(s), _mm_set1_ps(lo), _mm_set1_ps(hi));
    let (magic, vbias) = (_mm_set1_ps(MAGIC), _mm_set1_epi32(bias));
    let four = |c: &[f32]| -> __m128i {
        let v = _mm_set_ps(c[3], c[2], c[1], c[0]);
        let q = if MUL {
            _mm_mul_ps(v, vs)
        } else {
            _mm_div_ps(v, vs)
        };
        // maxps(q, lo) returns `lo` when `q` is NaN, as `quantize_one` does.
        let q = _mm_min_ps(_mm_max_ps(q, vlo), vhi);
        _mm_add_epi32(_mm_castps_si128(_mm_add_ps(q, magic)), vbias)
    };
    for (o, c) in out.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
        // In range already, so the saturating packs only narrow.
        let lo16 = _mm_packs_epi32(four(&c[0..4]), four(&c[4..8]));
        let hi16 = _mm_packs_epi32(four(&c[8..12]), four(&c[12..16]));
        let bytes = if T::SIGNED {
            _mm_packs_epi16(lo16, hi16)
        } else {
            _mm_packus_epi16(lo16, hi16)
        };
        // SAFETY: `o` is 16 writable one-byte values (asserted above); `storeu` has no
        // alignment requirement.
        unsafe { _mm_storeu_si128(o.as_mut_ptr().cast::<__m128i>(), bytes) };
    }
    x.len().min(out.len()) / 16 * 16
}

/// [`quantize_sse2`] eight lanes at a time (twice the divisions per instruction).
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2<T: QByte, const MUL: bool>(
    x: &[f32],
    out: &mut [T],
    s: f32,
    (lo, hi, bias): (f32, f32, i32),
) -> usize {
    const { assert!(std::mem::size_of::<T>() == 1) };
    use std::arch::x86_64::*;
    let (vs, vlo, vhi) = (_mm256_set1_ps(s), _mm256_set1_ps(lo), _mm256_set1_ps(hi));
    let (magic, vbias) = (_mm256_set1_ps(MAGIC), _mm256_set1_epi32(bias));
    let eight = |c: &[f32]| -> __m256i {
        // SAFETY: `c` holds eight values.
        let v = unsafe { _mm256_loadu_ps(c.as_ptr()) };
        let q = if MUL {
            _mm256_mul_ps(v, vs)
        } else {
            _mm256_div_ps(v, vs)
        };
        // maxps(q, lo) returns `lo` when `q` is NaN, as `quantize_one` does.
        let q = _mm256_min_ps(_mm256_max_ps(q, vlo), vhi);
        _mm256_add_epi32(_mm256_castps_si256(_mm256_add_ps(q, magic)), vbias)
    };
    for (o, c) in out.chunks_exact_mut(16).zip(x.chunks_exact(16)) {
        // In range already, so the saturating packs only narrow; the pack works within
        // 128-bit lanes, so the quarters are put back in order before the last one.
        let w = _mm256_packs_epi32(eight(&c[0..8]), eight(&c[8..16]));
        let w = _mm256_permute4x64_epi64::<0b11_01_10_00>(w);
        let (a, b) = (_mm256_castsi256_si128(w), _mm256_extracti128_si256::<1>(w));
        let bytes = if T::SIGNED {
            _mm_packs_epi16(a, b)
        } else {
            _mm_packus_epi16(a, b)
        };
        // SAFETY: `o` is 16 writable one-byte values (asserted above).
        unsafe { _mm_storeu_si128(o.as_mut_ptr().cast::<__m128i>(), bytes) };
    }
    x.len().min(out.len()) / 16 * 16
}

/// 1.5·2^23 and its bits: see [`quantize_one`].
pub(crate) const MAGIC: f32 = 12_582_912.0;
const MAGIC_BITS: i32 = 0x4b40_0000;

impl ElementWiseMiniOp for QuantizeOrt {
    fn name(&self) -> String {
        QUANTIZE_LINEAR.into()
    }

    fn output_type(&self, _input_type: DatumType) -> Option<DatumType> {
        Some(byte_type(self.signed))
    }

    fn eval_out_of_place(&self, t: &Tensor, _out_dt: Option<DatumType>) -> TractResult<Tensor> {
        let t = t.cast_to::<f32>()?;
        let plain = t.try_as_plain_ram()?;
        let x = plain.as_slice::<f32>()?;
        if self.signed {
            self.quantize::<i8>(x, t.shape())
        } else {
            self.quantize::<u8>(x, t.shape())
        }
    }
}

/// ONNX `Cast` to a narrow type (4/2-bit integers, 8-bit and 4-bit floats), onto the type's
/// container (`crate::lowp`): any numeric input, as the value the narrow type keeps.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct CastNarrow {
    pub to: i32,
    pub saturate: bool,
}

impl CastNarrow {
    fn container(&self) -> DatumType {
        match crate::lowp::container(self.to) {
            Some(3) => DatumType::I8,
            Some(2) => DatumType::U8,
            _ => DatumType::F32,
        }
    }
}

impl ElementWiseMiniOp for CastNarrow {
    fn name(&self) -> String {
        CAST_NARROW.into()
    }

    fn output_type(&self, _input_type: DatumType) -> Option<DatumType> {
        Some(self.container())
    }

    fn eval_out_of_place(&self, t: &Tensor, _out_dt: Option<DatumType>) -> TractResult<Tensor> {
        let t = t.cast_to::<f64>()?;
        let plain = t.try_as_plain_ram()?;
        let x = plain.as_slice::<f64>()?;
        let v = x
            .iter()
            .map(|&v| crate::lowp::narrow(self.to, v, self.saturate));
        match self.container() {
            DatumType::I8 => Tensor::from_shape(t.shape(), &v.map(|v| v as i8).collect::<Vec<_>>()),
            DatumType::U8 => Tensor::from_shape(t.shape(), &v.map(|v| v as u8).collect::<Vec<_>>()),
            _ => Tensor::from_shape(t.shape(), &v.map(|v| v as f32).collect::<Vec<_>>()),
        }
    }
}

/// `saturate(round_half_even(acc · m[c]) + zero_point)`, onnxruntime's requantisation of a
/// convolution's or matrix product's integer accumulator, in one pass (see [`REQUANTIZE`]).
/// An i32 accumulator is converted to f32 first (round to nearest, as `cvtdq2ps` does).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Requantize {
    /// Multipliers (f32 bits): one, or one per channel along `axis`.
    pub m: Vec<u32>,
    pub axis: i64,
    pub zero_point: i32,
    pub signed: bool,
}

impl Requantize {
    fn out_type(&self) -> DatumType {
        byte_type(self.signed)
    }

    /// Outer count, channels and inner count of `shape` around `axis` (all one block when
    /// there is a single multiplier).
    fn blocks(&self, shape: &[usize]) -> TractResult<(usize, usize, usize)> {
        let n: usize = shape.iter().product();
        if self.m.len() == 1 {
            return Ok((1, 1, n));
        }
        let rank = shape.len() as i64;
        let axis = if self.axis < 0 {
            self.axis + rank
        } else {
            self.axis
        };
        ensure!(
            (0..rank).contains(&axis),
            "{REQUANTIZE}: axis {} out of range for rank {rank}",
            self.axis
        );
        let axis = axis as usize;
        ensure!(
            shape[axis] == self.m.len(),
            "{REQUANTIZE}: {} multipliers for {} channels",
            self.m.len(),
            shape[axis]
        );
        Ok((
            shape[..axis].iter().product(),
            shape[axis],
            shape[axis + 1..].iter().product(),
        ))
    }

    fn requantize<T: QByte>(&self, acc: &[f32], shape: &[usize]) -> TractResult<Tensor> {
        fill::<T>(shape, |out| self.requantize_into(acc, shape, out))
    }

    fn requantize_into<T: QByte>(
        &self,
        acc: &[f32],
        shape: &[usize],
        out: &mut [T],
    ) -> TractResult<()> {
        let (outer, channels, inner) = self.blocks(shape)?;
        ensure!(
            acc.len() == out.len(),
            "{REQUANTIZE}: accumulator and output sizes differ"
        );
        let m: Vec<f32> = self.m.iter().map(|&b| f32::from_bits(b)).collect();
        if inner == 1 && channels > 1 {
            // Channels along the last axis (a matrix product's columns).
            let p = quant_params(self.zero_point, T::SIGNED);
            for (o, a) in out
                .chunks_exact_mut(channels)
                .zip(acc.chunks_exact(channels))
            {
                for ((o, &a), &m) in o.iter_mut().zip(a).zip(&m) {
                    *o = T::narrow(quantize_one::<true>(a, m, p));
                }
            }
        } else {
            let blocks = out
                .chunks_exact_mut(inner)
                .zip(acc.chunks_exact(inner))
                .take(outer * channels);
            for (i, (o, a)) in blocks.enumerate() {
                quantize_slice::<T, true>(a, o, m[i % channels], self.zero_point);
            }
        }
        Ok(())
    }
}

impl Op for Requantize {
    fn name(&self) -> StaticName {
        REQUANTIZE.into()
    }

    op_as_typed_op!();
}

impl EvalOp for Requantize {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let acc = inputs.first().context("FedgeRequantize without input")?;
        let acc = acc.cast_to::<f32>()?;
        let plain = acc.try_as_plain_ram()?;
        let (x, shape) = (plain.as_slice::<f32>()?, acc.shape());
        let t = if self.signed {
            self.requantize::<i8>(x, shape)?
        } else {
            self.requantize::<u8>(x, shape)?
        };
        Ok(tvec!(t.into_tvalue()))
    }
}

impl InferenceRulesOp for Requantize {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, self.out_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)
    }

    as_op!();
    to_typed!();
}

impl TypedOp for Requantize {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let acc = inputs.first().context("FedgeRequantize without input")?;
        ensure!(
            matches!(acc.datum_type, DatumType::F32 | DatumType::I32),
            "{REQUANTIZE} takes an f32 or i32 accumulator, not {:?}",
            acc.datum_type
        );
        Ok(tvec!(self.out_type().fact(acc.shape.clone())))
    }
}

/// `DynamicQuantizeLinear` (uint8) as onnxruntime computes it: `min`/`max` of the input widened
/// to include 0, `scale = (max - min) / 255` (1 when they are equal), zero point
/// `round_half_even(clamp(0 - min / scale, 0, 255))`, then `saturate(round_half_even(x / scale)
/// + zero_point)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct DynamicQuantizeOrt;

impl DynamicQuantizeOrt {
    /// Scale and zero point of `x`.
    fn params(x: &[f32]) -> (f32, i32) {
        let (mut lo, mut hi) = ([0f32; 16], [0f32; 16]);
        let mut blocks = x.chunks_exact(16);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: SSE is baseline on x86-64; every load is inside a 16-value block and every
        // store inside `lo`/`hi`. LLVM leaves the portable loop below scalar.
        unsafe {
            use std::arch::x86_64::*;
            let mut l = [_mm_setzero_ps(); 4];
            let mut h = [_mm_setzero_ps(); 4];
            for b in &mut blocks {
                for k in 0..4 {
                    let v = _mm_loadu_ps(b.as_ptr().add(4 * k));
                    // minps(v, l) is `v < l ? v : l`, as the comparison below (NaN keeps l).
                    l[k] = _mm_min_ps(v, l[k]);
                    h[k] = _mm_max_ps(v, h[k]);
                }
            }
            for k in 0..4 {
                _mm_storeu_ps(lo.as_mut_ptr().add(4 * k), l[k]);
                _mm_storeu_ps(hi.as_mut_ptr().add(4 * k), h[k]);
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        for b in &mut blocks {
            for k in 0..16 {
                lo[k] = if b[k] < lo[k] { b[k] } else { lo[k] };
                hi[k] = if b[k] > hi[k] { b[k] } else { hi[k] };
            }
        }
        let (mut min, mut max) = (0f32, 0f32);
        for &v in lo.iter().chain(blocks.remainder()) {
            min = if v < min { v } else { min };
        }
        for &v in hi.iter().chain(blocks.remainder()) {
            max = if v > max { v } else { max };
        }
        let scale = if max == min { 1.0 } else { (max - min) / 255.0 };
        let zp = (0.0 - min / scale).clamp(0.0, 255.0).round_ties_even();
        (scale, zp as i32)
    }
}

impl Op for DynamicQuantizeOrt {
    fn name(&self) -> StaticName {
        DYNAMIC_QUANTIZE_LINEAR.into()
    }

    op_as_typed_op!();
}

impl EvalOp for DynamicQuantizeOrt {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs
            .first()
            .context("DynamicQuantizeLinear without input")?;
        let plain = x.try_as_plain_ram()?;
        let xs = plain.as_slice::<f32>()?;
        let (scale, zp) = Self::params(xs);
        let y = fill::<u8>(x.shape(), |out| {
            quantize_slice::<u8, false>(xs, out, scale, zp);
            Ok(())
        })?;
        Ok(tvec!(
            y.into_tvalue(),
            tensor0(scale).into_tvalue(),
            tensor0(zp as u8).into_tvalue()
        ))
    }
}

impl InferenceRulesOp for DynamicQuantizeOrt {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1)?;
        check_output_arity(outputs, 3)?;
        s.equals(&inputs[0].datum_type, f32::datum_type())?;
        s.equals(&outputs[0].datum_type, u8::datum_type())?;
        s.equals(&outputs[1].datum_type, f32::datum_type())?;
        s.equals(&outputs[2].datum_type, u8::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)?;
        s.equals(&outputs[1].rank, 0)?;
        s.equals(&outputs[2].rank, 0)
    }

    fn nboutputs(&self) -> TractResult<usize> {
        Ok(3)
    }

    as_op!();
    to_typed!();
}

impl TypedOp for DynamicQuantizeOrt {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs
            .first()
            .context("DynamicQuantizeLinear without input")?;
        ensure!(
            x.datum_type == f32::datum_type(),
            "{DYNAMIC_QUANTIZE_LINEAR} quantizes float32 only"
        );
        Ok(tvec!(
            u8::fact(x.shape.clone()),
            f32::scalar_fact(),
            u8::scalar_fact()
        ))
    }
}

/// An 8-bit to 8-bit element-wise function as a table (`crate::import` builds it by running
/// the chain it replaces on all 256 codes). Output bytes are the output type's bits.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Lookup {
    pub table: Vec<u8>,
    pub signed: bool,
}

impl Lookup {
    fn apply<O: Datum + Copy>(&self, t: &Tensor) -> TractResult<Tensor> {
        let mut table = [0u8; 256];
        ensure!(
            self.table.len() == 256,
            "{LOOKUP}: a table of {} entries",
            self.table.len()
        );
        table.copy_from_slice(&self.table);
        let plain = t.try_as_plain_ram()?;
        let x: &[u8] = match t.datum_type().unquantized() {
            DatumType::U8 => plain.as_slice::<u8>()?,
            DatumType::I8 => {
                let x = plain.as_slice::<i8>()?;
                // SAFETY: i8 and u8 have the same size and alignment; the index is the bits.
                unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, x.len()) }
            }
            other => bail!("{LOOKUP} reads 8-bit integers, not {other:?}"),
        };
        // SAFETY: every element is written below; O is a one-byte integer type (the table's
        // bytes are its bits).
        let mut out = unsafe { Tensor::uninitialized::<O>(t.shape())? };
        {
            let mut plain = out.try_as_plain_ram_mut()?;
            let o = plain.as_slice_mut::<O>()?;
            ensure!(
                std::mem::size_of::<O>() == 1 && o.len() == x.len(),
                "{LOOKUP}: sizes"
            );
            // SAFETY: as above, `o` is `x.len()` one-byte values.
            let o = unsafe { std::slice::from_raw_parts_mut(o.as_mut_ptr() as *mut u8, o.len()) };
            lookup(&table, x, o);
        }
        Ok(out)
    }
}

/// `o[i] = table[x[i]]`, 32 bytes at a time with AVX2.
fn lookup(table: &[u8; 256], x: &[u8], o: &mut [u8]) {
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if crate::conv::fast() {
        // SAFETY: AVX2 was detected.
        done = unsafe { lookup_avx2(table, x, o) };
    }
    // A u8 index into a 256-entry array needs no bounds check.
    for (o, &v) in o.iter_mut().zip(x).skip(done) {
        *o = table[v as usize];
    }
}

/// [`lookup`] on the first multiple of 32 bytes; returns how many. Each of the 16 rows of the
/// table is a `vpshufb` by the low nibbles, kept where the high nibble is the row's.
///
/// # Safety
/// The machine must have AVX2.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lookup_avx2(table: &[u8; 256], x: &[u8], o: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    let n = x.len().min(o.len()) / 32 * 32;
    let mut rows = [_mm256_setzero_si256(); 16];
    for (k, r) in rows.iter_mut().enumerate() {
        // SAFETY: `16 k + 16 <= 256`.
        *r = _mm256_broadcastsi128_si256(unsafe {
            _mm_loadu_si128(table.as_ptr().add(16 * k).cast())
        });
    }
    let nibble = _mm256_set1_epi8(0x0F);
    for i in (0..n).step_by(32) {
        // SAFETY: `i + 32 <= n`, within both slices.
        unsafe {
            let v = _mm256_loadu_si256(x.as_ptr().add(i).cast());
            let lo = _mm256_and_si256(v, nibble);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), nibble);
            let mut acc = _mm256_setzero_si256();
            for (k, &r) in rows.iter().enumerate() {
                let here = _mm256_cmpeq_epi8(hi, _mm256_set1_epi8(k as i8));
                acc = _mm256_or_si256(acc, _mm256_and_si256(here, _mm256_shuffle_epi8(r, lo)));
            }
            _mm256_storeu_si256(o.as_mut_ptr().add(i).cast(), acc);
        }
    }
    n
}

impl ElementWiseMiniOp for Lookup {
    fn name(&self) -> String {
        LOOKUP.into()
    }

    fn output_type(&self, _input_type: DatumType) -> Option<DatumType> {
        Some(byte_type(self.signed))
    }

    fn eval_out_of_place(&self, t: &Tensor, _out_dt: Option<DatumType>) -> TractResult<Tensor> {
        if self.signed {
            self.apply::<i8>(t)
        } else {
            self.apply::<u8>(t)
        }
    }
}

/// `x · s + b[c]` (each step rounded in f32, as the `Mul` and `Add` it replaces): see
/// `crate::import`'s `scalebias`.
/// The steps after `FedgeScaleBias`'s scale, each optional and rounded in f32 as the graph's
/// separate ops round them (no fused multiply-add): `+ bias`, `· mul`, `+ add` (each none,
/// one value, or one per channel: a bias, then a batch norm left as `Mul` and `Add`), then a
/// swish.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tail {
    pub bias: Vec<f32>,
    pub mul: Vec<f32>,
    pub add: Vec<f32>,
    pub swish: Swish,
}

/// The activation at the end of a [`Tail`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) enum Swish {
    #[default]
    None,
    /// `y · min(max(α·y + β, 0), 1)`: `Mul(y, HardSigmoid(y))`.
    Sigmoid([f32; 2]),
    /// `(y · min(max(y + shift, lo), hi)) / div`, a true division: Paddle's
    /// `Div(Mul(y, Clip(Add(y, 3), 0, 6)), 6)`.
    Clip([f32; 4]),
}

impl Tail {
    /// From the attributes `bias`, `mul`, `add` (floats), `hard_swish` (α, β) and
    /// `clip_swish` (shift, lo, hi, div) of a node of type `op`.
    pub(crate) fn from_node(node: &tract_onnx::pb::NodeProto, op: &str) -> TractResult<Tail> {
        let floats = |name: &str| -> TractResult<Vec<f32>> {
            Ok(node
                .get_attr_opt_tvec::<f32>(name)?
                .map(|v| v.to_vec())
                .unwrap_or_default())
        };
        let swish = match (
            node.get_attr_opt_tvec::<f32>("hard_swish")?.as_deref(),
            node.get_attr_opt_tvec::<f32>("clip_swish")?.as_deref(),
        ) {
            (None, None) => Swish::None,
            (Some(&[a, b]), None) => Swish::Sigmoid([a, b]),
            (None, Some(&[shift, lo, hi, div])) => Swish::Clip([shift, lo, hi, div]),
            _ => bail!(
                "{op}: `hard_swish` takes α and β, `clip_swish` shift, min, max and div, not both"
            ),
        };
        Ok(Tail {
            bias: floats("bias")?,
            mul: floats("mul")?,
            add: floats("add")?,
            swish,
        })
    }

    /// Everything that tells two tails apart, floats as bits.
    pub(crate) fn key(&self) -> Vec<u32> {
        let mut k = Vec::new();
        for v in [&self.bias, &self.mul, &self.add] {
            k.push(v.len() as u32);
            k.extend(v.iter().map(|f| f.to_bits()));
        }
        match self.swish {
            Swish::None => k.push(0),
            Swish::Sigmoid(p) => k.extend(std::iter::once(1).chain(p.map(f32::to_bits))),
            Swish::Clip(p) => k.extend(std::iter::once(2).chain(p.map(f32::to_bits))),
        }
        k
    }

    /// Whether every per-channel list fits `channels`.
    pub(crate) fn fits(&self, channels: usize) -> bool {
        [&self.bias, &self.mul, &self.add]
            .iter()
            .all(|v| v.len() <= 1 || v.len() == channels)
    }

    /// The steps for channel `c`.
    pub(crate) fn channel(&self, c: usize, s: Option<f32>) -> Steps<'_> {
        let pick = |v: &[f32]| -> Option<f32> {
            match v.len() {
                0 => None,
                1 => Some(v[0]),
                _ => Some(v[c]),
            }
        };
        Steps {
            s,
            b: pick(&self.bias),
            m: pick(&self.mul),
            a: pick(&self.add),
            per: [&[], &[], &[]],
            swish: self.swish,
        }
    }

    /// The steps for whole rows whose elements are the channels (a matrix product's).
    fn rows(&self, s: Option<f32>) -> Steps<'_> {
        let one = |v: &[f32]| (v.len() == 1).then(|| v[0]);
        fn many(v: &[f32]) -> &[f32] {
            if v.len() > 1 { v } else { &[] }
        }
        Steps {
            s,
            b: one(&self.bias),
            m: one(&self.mul),
            a: one(&self.add),
            per: [many(&self.bias), many(&self.mul), many(&self.add)],
            swish: self.swish,
        }
    }
}

impl PartialEq for Tail {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for Tail {}

impl std::hash::Hash for Tail {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

/// `x · s`, `+ b`, `· m`, `+ a`, then the swish: one value each for every element, or (from
/// `per`: bias, multiplier, addend) one per element.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Steps<'a> {
    pub s: Option<f32>,
    pub b: Option<f32>,
    pub m: Option<f32>,
    pub a: Option<f32>,
    pub per: [&'a [f32]; 3],
    pub swish: Swish,
}

impl Steps<'_> {
    /// One value through the steps; `i` indexes the per-element lists.
    #[inline(always)]
    pub(crate) fn one(&self, x: f32, i: usize) -> f32 {
        let mut v = x;
        if let Some(s) = self.s {
            v *= s;
        }
        let [pb, pm, pa] = self.per;
        if let Some(b) = self.b.or_else(|| pb.get(i).copied()) {
            v += b;
        }
        if let Some(m) = self.m.or_else(|| pm.get(i).copied()) {
            v *= m;
        }
        if let Some(a) = self.a.or_else(|| pa.get(i).copied()) {
            v += a;
        }
        match self.swish {
            Swish::None => v,
            Swish::Sigmoid([al, be]) => {
                let t = v * al + be;
                let t = if t < 1.0 { t } else { 1.0 };
                let t = if t > 0.0 { t } else { 0.0 };
                v * t
            }
            Swish::Clip([shift, lo, hi, div]) => {
                let t = v + shift;
                let t = if t > lo { t } else { lo };
                let t = if t < hi { t } else { hi };
                (v * t) / div
            }
        }
    }
}

/// `FedgeScaleBias`: `Tail` applied to `x · s` (an integer accumulator held in f32: the
/// dynamic quantizer's epilogue).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct ScaleBias {
    pub axis: i64,
    /// Whether a one-element scale is the second input.
    pub scaled: bool,
    pub tail: Tail,
}

impl ScaleBias {
    fn run(&self, x: &[f32], shape: &[usize], s: Option<f32>) -> TractResult<Tensor> {
        let rank = shape.len() as i64;
        let axis = if self.axis < 0 {
            self.axis + rank
        } else {
            self.axis
        };
        ensure!(
            (0..rank).contains(&axis),
            "{SCALE_BIAS}: axis {} out of range for rank {rank}",
            self.axis
        );
        let axis = axis as usize;
        let channels = shape[axis];
        ensure!(
            self.tail.fits(channels),
            "{SCALE_BIAS}: {} bias, {} multiplier and {} addend values for {channels} channels",
            self.tail.bias.len(),
            self.tail.mul.len(),
            self.tail.add.len()
        );
        let inner: usize = shape[axis + 1..].iter().product();
        fill::<f32>(shape, |out| {
            if inner == 0 || channels == 0 {
                return Ok(());
            }
            let block = inner * channels;
            // Channels on the last axis (a matrix product's): whole rows, one value per element.
            if inner == 1 {
                let steps = self.tail.rows(s);
                for (o, x) in out.chunks_exact_mut(block).zip(x.chunks_exact(block)) {
                    scale_bias(o, x, &steps);
                }
                return Ok(());
            }
            for (o, x) in out.chunks_exact_mut(block).zip(x.chunks_exact(block)) {
                for (c, (o, x)) in o
                    .chunks_exact_mut(inner)
                    .zip(x.chunks_exact(inner))
                    .enumerate()
                {
                    scale_bias(o, x, &self.tail.channel(c, s));
                }
            }
            Ok(())
        })
    }
}

/// `o = steps(x)` as [`SCALE_BIAS`] computes it: f32 roundings in the graph's order, no fused
/// multiply-add; the clamps pick what tract's `Min`/`Max` pick for every number (up to the
/// sign of zero), and NaN as the comparisons of [`Steps::one`].
pub(crate) fn scale_bias(o: &mut [f32], x: &[f32], steps: &Steps) {
    let mut n = o.len().min(x.len());
    for p in steps.per.iter().filter(|p| !p.is_empty()) {
        n = n.min(p.len());
    }
    // SSE is baseline on x86-64; LLVM leaves this loop scalar there.
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the intrinsics need SSE only, which x86-64 always has; every load and store is
    // at `i + 4 <= done`, within every slice.
    let done = unsafe {
        use std::arch::x86_64::*;
        let done = n / 4 * 4;
        let set = |v: Option<f32>| v.map(|v| _mm_set1_ps(v));
        let (sv, bv, mv, av) = (set(steps.s), set(steps.b), set(steps.m), set(steps.a));
        let [pb, pm, pa] = steps.per;
        // A step's four values at `i`: its one value, or its list's.
        let get = |one: Option<__m128>, per: &[f32], i: usize| match one {
            Some(v) => Some(v),
            None if !per.is_empty() => Some(_mm_loadu_ps(per.as_ptr().add(i))),
            None => None,
        };
        for i in (0..done).step_by(4) {
            let mut v = _mm_loadu_ps(x.as_ptr().add(i));
            if let Some(s) = sv {
                v = _mm_mul_ps(v, s);
            }
            if let Some(b) = get(bv, pb, i) {
                v = _mm_add_ps(v, b);
            }
            if let Some(m) = get(mv, pm, i) {
                v = _mm_mul_ps(v, m);
            }
            if let Some(a) = get(av, pa, i) {
                v = _mm_add_ps(v, a);
            }
            v = match steps.swish {
                Swish::None => v,
                Swish::Sigmoid([al, be]) => {
                    // minps/maxps return the second operand on NaN, as `Steps::one`.
                    let t = _mm_add_ps(_mm_mul_ps(v, _mm_set1_ps(al)), _mm_set1_ps(be));
                    let t = _mm_max_ps(_mm_min_ps(t, _mm_set1_ps(1.0)), _mm_setzero_ps());
                    _mm_mul_ps(v, t)
                }
                Swish::Clip([shift, lo, hi, div]) => {
                    let t = _mm_add_ps(v, _mm_set1_ps(shift));
                    let t = _mm_min_ps(_mm_max_ps(t, _mm_set1_ps(lo)), _mm_set1_ps(hi));
                    _mm_div_ps(_mm_mul_ps(v, t), _mm_set1_ps(div))
                }
            };
            _mm_storeu_ps(o.as_mut_ptr().add(i), v);
        }
        done
    };
    #[cfg(not(target_arch = "x86_64"))]
    let done = 0;
    for (i, (o, &x)) in o[..n].iter_mut().zip(&x[..n]).enumerate().skip(done) {
        *o = steps.one(x, i);
    }
}

impl Op for ScaleBias {
    fn name(&self) -> StaticName {
        SCALE_BIAS.into()
    }

    op_as_typed_op!();
}

impl EvalOp for ScaleBias {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs.first().context("FedgeScaleBias without input")?;
        let x = x.cast_to::<f32>()?;
        let s = match (self.scaled, inputs.get(1)) {
            (true, Some(s)) => {
                ensure!(
                    s.len() == 1,
                    "{SCALE_BIAS}: the scale has {} values, not one",
                    s.len()
                );
                let s = s.cast_to::<f32>()?;
                let plain = s.try_as_plain_ram()?;
                Some(plain.as_slice::<f32>()?[0])
            }
            (true, None) => bail!("{SCALE_BIAS} without its scale"),
            (false, _) => None,
        };
        let plain = x.try_as_plain_ram()?;
        let t = self.run(plain.as_slice::<f32>()?, x.shape(), s)?;
        Ok(tvec!(t.into_tvalue()))
    }
}

impl InferenceRulesOp for ScaleBias {
    fn rules<'r, 'p: 'r, 's: 'r>(
        &'s self,
        s: &mut Solver<'r>,
        inputs: &'p [TensorProxy],
        outputs: &'p [TensorProxy],
    ) -> InferenceResult {
        check_input_arity(inputs, 1 + self.scaled as usize)?;
        check_output_arity(outputs, 1)?;
        s.equals(&outputs[0].datum_type, f32::datum_type())?;
        s.equals(&inputs[0].shape, &outputs[0].shape)
    }

    as_op!();
    to_typed!();
}

impl TypedOp for ScaleBias {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let x = inputs.first().context("FedgeScaleBias without input")?;
        Ok(tvec!(f32::fact(x.shape.clone())))
    }
}
