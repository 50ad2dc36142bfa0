//! Typed host tensors: what callers hand to a model and get back.

use crate::error::{Result, RuntimeError};

/// Element type of a [`Tensor`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DType {
    F32,
    F64,
    F16,
    I64,
    I32,
    I16,
    I8,
    U8,
    U16,
    U32,
    U64,
    Bool,
}

impl DType {
    /// The ONNX `TensorProto.DataType` number (`FLOAT` = 1, `UINT8` = 2, ...).
    pub fn onnx_code(self) -> i32 {
        match self {
            DType::F32 => 1,
            DType::U8 => 2,
            DType::I8 => 3,
            DType::U16 => 4,
            DType::I16 => 5,
            DType::I32 => 6,
            DType::I64 => 7,
            DType::Bool => 9,
            DType::F16 => 10,
            DType::F64 => 11,
            DType::U32 => 12,
            DType::U64 => 13,
        }
    }

    /// The type of an ONNX `TensorProto.DataType` number; `None` for types fedge does not hold
    /// (strings, bfloat16, complex, float8, int4).
    pub fn from_onnx_code(code: i32) -> Option<DType> {
        [
            DType::F32,
            DType::U8,
            DType::I8,
            DType::U16,
            DType::I16,
            DType::I32,
            DType::I64,
            DType::Bool,
            DType::F16,
            DType::F64,
            DType::U32,
            DType::U64,
        ]
        .into_iter()
        .find(|d| d.onnx_code() == code)
    }

    /// The numpy/ONNX name (`float32`, `int64`, ...).
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::F64 => "float64",
            DType::F16 => "float16",
            DType::I64 => "int64",
            DType::I32 => "int32",
            DType::I16 => "int16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::U16 => "uint16",
            DType::U32 => "uint32",
            DType::U64 => "uint64",
            DType::Bool => "bool",
        }
    }

    /// Parses a numpy/ONNX name.
    pub fn from_name(s: &str) -> Option<DType> {
        [
            DType::F32,
            DType::F64,
            DType::F16,
            DType::I64,
            DType::I32,
            DType::I16,
            DType::I8,
            DType::U8,
            DType::U16,
            DType::U32,
            DType::U64,
            DType::Bool,
        ]
        .into_iter()
        .find(|d| d.name() == s)
    }

    pub fn size_of(self) -> usize {
        match self {
            DType::F64 | DType::I64 | DType::U64 => 8,
            DType::F32 | DType::I32 | DType::U32 => 4,
            DType::F16 | DType::I16 | DType::U16 => 2,
            DType::I8 | DType::U8 | DType::Bool => 1,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64 | DType::F16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense, row-major tensor owned by the host.
///
/// The data is kept as little-endian bytes so every dtype shares one representation; typed
/// views are [`Tensor::as_f32`] and friends.
#[derive(Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tensor<{}>{:?}", self.dtype, self.shape)
    }
}

/// Element types that a [`Tensor`] can be built from and viewed as.
pub trait Element: Copy + 'static {
    const DTYPE: DType;
    fn to_le(self, out: &mut Vec<u8>);
    fn from_le(b: &[u8]) -> Self;
}

macro_rules! element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn to_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
            }
            fn from_le(b: &[u8]) -> Self {
                // A fixed-size read (no memcpy call per element); callers pass exact chunks.
                b.try_into().map_or(0 as $t, <$t>::from_le_bytes)
            }
        }
    };
}
element!(f32, DType::F32);
element!(f64, DType::F64);
element!(i64, DType::I64);
element!(i32, DType::I32);
element!(i16, DType::I16);
element!(i8, DType::I8);
element!(u8, DType::U8);
element!(u16, DType::U16);
element!(u32, DType::U32);
element!(u64, DType::U64);

impl Element for bool {
    const DTYPE: DType = DType::Bool;
    fn to_le(self, out: &mut Vec<u8>) {
        out.push(self as u8);
    }
    fn from_le(b: &[u8]) -> Self {
        b[0] != 0
    }
}

impl Tensor {
    /// Builds a tensor from typed data.
    ///
    /// # Errors
    /// [`RuntimeError::TensorSize`] when `data.len()` is not the product of `shape`.
    pub fn new<T: Element>(shape: &[usize], data: &[T]) -> Result<Tensor> {
        let expected = shape.iter().product::<usize>();
        if expected != data.len() {
            return Err(RuntimeError::TensorSize {
                shape: shape.to_vec(),
                expected,
                got: data.len(),
            });
        }
        let mut bytes = Vec::with_capacity(data.len() * T::DTYPE.size_of());
        data.iter().for_each(|v| v.to_le(&mut bytes));
        Ok(Tensor {
            dtype: T::DTYPE,
            shape: shape.to_vec(),
            bytes,
        })
    }

    /// Builds a tensor from little-endian bytes.
    ///
    /// # Errors
    /// [`RuntimeError::TensorSize`] when the byte count does not match shape and dtype.
    pub fn from_le_bytes(dtype: DType, shape: &[usize], bytes: Vec<u8>) -> Result<Tensor> {
        let expected = shape.iter().product::<usize>();
        if bytes.len() != expected * dtype.size_of() {
            return Err(RuntimeError::TensorSize {
                shape: shape.to_vec(),
                expected,
                got: bytes.len() / dtype.size_of(),
            });
        }
        Ok(Tensor {
            dtype,
            shape: shape.to_vec(),
            bytes,
        })
    }

    /// A zero-filled tensor.
    pub fn zeros(dtype: DType, shape: &[usize]) -> Tensor {
        let n = shape.iter().product::<usize>() * dtype.size_of();
        Tensor {
            dtype,
            shape: shape.to_vec(),
            bytes: vec![0; n],
        }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The raw little-endian bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Copies the elements out as `T`, or `None` when the dtype differs.
    pub fn to_vec<T: Element>(&self) -> Option<Vec<T>> {
        (self.dtype == T::DTYPE).then(|| {
            self.bytes
                .chunks_exact(std::mem::size_of::<T>())
                .map(T::from_le)
                .collect()
        })
    }

    /// The elements as `f32`, or `None` when the tensor is not `float32`.
    pub fn as_f32(&self) -> Option<Vec<f32>> {
        self.to_vec::<f32>()
    }

    /// Every element converted to `f64` (bools as 0/1; f16 decoded), for comparisons.
    pub fn to_f64_lossy(&self) -> Vec<f64> {
        let b = &self.bytes;
        let sz = self.dtype.size_of();
        b.chunks_exact(sz)
            .map(|c| match self.dtype {
                DType::F32 => <f32 as Element>::from_le(c) as f64,
                DType::F64 => <f64 as Element>::from_le(c),
                DType::F16 => f16_to_f32(<u16 as Element>::from_le(c)) as f64,
                DType::I64 => <i64 as Element>::from_le(c) as f64,
                DType::I32 => <i32 as Element>::from_le(c) as f64,
                DType::I16 => <i16 as Element>::from_le(c) as f64,
                DType::I8 => <i8 as Element>::from_le(c) as f64,
                DType::U8 => c[0] as f64,
                DType::U16 => <u16 as Element>::from_le(c) as f64,
                DType::U32 => <u32 as Element>::from_le(c) as f64,
                DType::U64 => <u64 as Element>::from_le(c) as f64,
                DType::Bool => (c[0] != 0) as u8 as f64,
            })
            .collect()
    }

    /// Counts NaN and infinite values of a float tensor: `(count, first index)`.
    pub fn non_finite(&self) -> Option<(usize, usize)> {
        if !self.dtype.is_float() {
            return None;
        }
        let mut first = None;
        let count = self
            .to_f64_lossy()
            .iter()
            .enumerate()
            .filter(|(_, v)| !v.is_finite())
            .inspect(|(i, _)| {
                first.get_or_insert(*i);
            })
            .count();
        first.map(|f| (count, f))
    }

    /// Same data, another shape with the same element count.
    ///
    /// # Errors
    /// [`RuntimeError::TensorSize`] when the element counts differ.
    pub fn into_shape(self, shape: &[usize]) -> Result<Tensor> {
        Tensor::from_le_bytes(self.dtype, shape, self.bytes)
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = ((h >> 15) as u32) << 31;
    let exp = ((h >> 10) & 0x1f) as u32;
    let frac = (h & 0x3ff) as u32;
    if exp == 0 {
        // Zero and subnormals: frac · 2^-24.
        let v = frac as f32 * f32::powi(2.0, -24);
        return if sign != 0 { -v } else { v };
    }
    let bits = match exp {
        0x1f => sign | 0x7f80_0000 | (frac << 13),
        _ => sign | ((exp + 127 - 15) << 23) | (frac << 13),
    };
    f32::from_bits(bits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_element_count_is_an_error() {
        assert!(matches!(
            Tensor::new(&[2, 3], &[1f32; 5]),
            Err(RuntimeError::TensorSize {
                expected: 6,
                got: 5,
                ..
            })
        ));
    }

    #[test]
    fn typed_roundtrip() {
        let t = Tensor::new(&[3], &[1i64, -2, 3]).expect("tensor");
        assert_eq!(t.to_vec::<i64>(), Some(vec![1, -2, 3]));
        assert_eq!(t.as_f32(), None);
    }

    #[test]
    fn f16_decodes() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
    }

    #[test]
    fn finds_non_finite() {
        let t = Tensor::new(&[4], &[1f32, f32::NAN, 2.0, f32::INFINITY]).expect("tensor");
        assert_eq!(t.non_finite(), Some((2, 1)));
    }
}
