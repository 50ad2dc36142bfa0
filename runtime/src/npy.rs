//! `.npy` and `.npz` files (numpy's formats), for model inputs, outputs and references.

use std::io::Read;
use std::path::Path;

use crate::error::{Result, RuntimeError};
use crate::tensor::{DType, Tensor};

const MAGIC: &[u8] = b"\x93NUMPY";
/// Refuse headers bigger than this before allocating for them.
const MAX_HEADER: usize = 1 << 16;

fn bad(msg: impl Into<String>) -> RuntimeError {
    RuntimeError::Npy(msg.into())
}

fn descr_dtype(descr: &str) -> Result<DType> {
    let (order, code) = descr.split_at(1.min(descr.len()));
    if order == ">" && !code.ends_with('1') {
        return Err(bad(format!("big-endian dtype `{descr}` is not supported")));
    }
    Ok(match code {
        "f4" => DType::F32,
        "f8" => DType::F64,
        "f2" => DType::F16,
        "i8" => DType::I64,
        "i4" => DType::I32,
        "i2" => DType::I16,
        "i1" => DType::I8,
        "u1" => DType::U8,
        "u2" => DType::U16,
        "u4" => DType::U32,
        "u8" => DType::U64,
        "b1" => DType::Bool,
        _ => return Err(bad(format!("unsupported dtype `{descr}`"))),
    })
}

fn dtype_descr(d: DType) -> &'static str {
    match d {
        DType::F32 => "<f4",
        DType::F64 => "<f8",
        DType::F16 => "<f2",
        DType::I64 => "<i8",
        DType::I32 => "<i4",
        DType::I16 => "<i2",
        DType::I8 => "|i1",
        DType::U8 => "|u1",
        DType::U16 => "<u2",
        DType::U32 => "<u4",
        DType::U64 => "<u8",
        DType::Bool => "|b1",
    }
}

/// The value of `'key': value` in numpy's header dict (a Python literal).
fn header_field<'a>(header: &'a str, key: &str) -> Result<&'a str> {
    let pat = format!("'{key}':");
    let start = header
        .find(&pat)
        .ok_or_else(|| bad(format!("header has no `{key}`")))?;
    Ok(header[start + pat.len()..].trim_start())
}

fn parse_header(header: &str) -> Result<(DType, Vec<usize>)> {
    let descr = header_field(header, "descr")?;
    let descr = descr
        .strip_prefix('\'')
        .and_then(|d| d.split('\'').next())
        .ok_or_else(|| bad("malformed descr"))?;
    let dtype = descr_dtype(descr)?;
    if header_field(header, "fortran_order")?.starts_with("True") {
        return Err(bad(
            "Fortran-ordered arrays are not supported; save with C order",
        ));
    }
    let shape = header_field(header, "shape")?;
    let inner = shape
        .strip_prefix('(')
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("malformed shape"))?;
    let dims = inner
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| bad(format!("bad dimension `{s}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((dtype, dims))
}

/// Decodes a `.npy` byte buffer.
///
/// # Errors
/// [`RuntimeError::Npy`] for a bad magic, header, dtype, Fortran order or truncated data.
pub fn decode(bytes: &[u8]) -> Result<Tensor> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        return Err(bad("not a .npy file (bad magic)"));
    }
    let (hlen, hstart) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (
            u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
            12,
        ),
        v => return Err(bad(format!("unsupported .npy version {v}"))),
    };
    if hlen > MAX_HEADER || bytes.len() < hstart + hlen {
        return Err(bad("truncated or oversized header"));
    }
    let header =
        std::str::from_utf8(&bytes[hstart..hstart + hlen]).map_err(|_| bad("header not UTF-8"))?;
    let (dtype, shape) = parse_header(header)?;
    let data = &bytes[hstart + hlen..];
    let n = shape
        .iter()
        .try_fold(1usize, |a, &d| a.checked_mul(d))
        .and_then(|n| n.checked_mul(dtype.size_of()))
        .ok_or_else(|| bad("shape overflows"))?;
    if data.len() != n {
        return Err(bad(format!(
            "data is {} bytes, shape {shape:?} needs {n}",
            data.len()
        )));
    }
    Tensor::from_le_bytes(dtype, &shape, data.to_vec())
}

/// Encodes a tensor as `.npy` (version 1.0).
pub fn encode(t: &Tensor) -> Vec<u8> {
    let dims = t.shape().iter().map(|d| d.to_string()).collect::<Vec<_>>();
    let shape = match dims.len() {
        1 => format!("({},)", dims[0]),
        _ => format!("({})", dims.join(", ")),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape}, }}",
        dtype_descr(t.dtype())
    );
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + t.as_bytes().len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(t.as_bytes());
    out
}

/// Reads a `.npy` file.
///
/// # Errors
/// [`RuntimeError::Io`] or [`RuntimeError::Npy`].
pub fn read(path: impl AsRef<Path>) -> Result<Tensor> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|e| RuntimeError::io(path, e))?;
    decode(&bytes).map_err(|e| bad(format!("{}: {e}", path.display())))
}

/// Writes a `.npy` file.
///
/// # Errors
/// [`RuntimeError::Io`].
pub fn write(path: impl AsRef<Path>, t: &Tensor) -> Result<()> {
    let path = path.as_ref();
    std::fs::write(path, encode(t)).map_err(|e| RuntimeError::io(path, e))
}

/// Reads every array of a `.npz` archive (plain or compressed), sorted by name.
///
/// # Errors
/// [`RuntimeError::Io`] or [`RuntimeError::Npy`].
pub fn read_npz(path: impl AsRef<Path>) -> Result<Vec<(String, Tensor)>> {
    let path = path.as_ref();
    let file = std::fs::File::open(path).map_err(|e| RuntimeError::io(path, e))?;
    let mut zip =
        zip::ZipArchive::new(file).map_err(|e| bad(format!("{}: {e}", path.display())))?;
    let mut out = Vec::with_capacity(zip.len());
    for i in 0..zip.len() {
        let mut entry = zip.by_index(i).map_err(|e| bad(e.to_string()))?;
        let name = entry.name().trim_end_matches(".npy").to_string();
        let mut buf = Vec::with_capacity(entry.size() as usize);
        entry
            .read_to_end(&mut buf)
            .map_err(|e| RuntimeError::io(path, e))?;
        out.push((
            name.clone(),
            decode(&buf).map_err(|e| bad(format!("{name}: {e}")))?,
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrips_every_rank() {
        for shape in [vec![], vec![3], vec![2, 3], vec![1, 2, 1, 2]] {
            let n = shape.iter().product::<usize>();
            let data: Vec<f32> = (0..n).map(|i| i as f32 * 0.5).collect();
            let t = Tensor::new(&shape, &data).expect("tensor");
            let bytes = encode(&t);
            assert_eq!(
                (bytes.len() - t.as_bytes().len()) % 64,
                0,
                "header aligned to 64"
            );
            assert_eq!(decode(&bytes).expect("decode"), t);
        }
    }

    #[test]
    fn rejects_truncated_data() {
        let t = Tensor::new(&[4], &[1i64, 2, 3, 4]).expect("tensor");
        let bytes = encode(&t);
        let err = decode(&bytes[..bytes.len() - 3]).expect_err("truncated");
        assert!(err.to_string().contains("needs 32"), "{err}");
    }

    #[test]
    fn rejects_garbage() {
        assert!(decode(b"hello world, not numpy").is_err());
        assert!(decode(&[]).is_err());
        let mut bytes = encode(&Tensor::new(&[1], &[1u8]).expect("tensor"));
        bytes[8] = 0xff;
        bytes[9] = 0xff;
        assert!(decode(&bytes).is_err());
    }

    #[test]
    fn rejects_fortran_order() {
        let t = Tensor::new(&[2, 2], &[1f32, 2., 3., 4.]).expect("tensor");
        let bytes = encode(&t);
        let s = String::from_utf8_lossy(&bytes).replace("False", "True ");
        assert!(decode(s.as_bytes()).is_err());
    }
}
