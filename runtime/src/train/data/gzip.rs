//! gzip (RFC 1952) decoding through the `zip` crate's DEFLATE reader.
//!
//! A gzip member and a zip entry carry the same raw DEFLATE stream (RFC 1951) and the same
//! CRC-32, so a gzip file decodes by parsing its header and trailer and handing the stream to
//! `zip`'s streaming entry reader behind a synthesised local file header. `zip` inflates (with
//! miniz_oxide, through flate2) and checks the CRC-32 at the end of the entry.

use std::io::{Cursor, Read};

use super::super::{Result, TrainError};

const FHCRC: u8 = 0x02;
const FEXTRA: u8 = 0x04;
const FNAME: u8 = 0x08;
const FCOMMENT: u8 = 0x10;

fn bad(what: impl std::fmt::Display) -> TrainError {
    TrainError::Data(format!("gzip: {what}"))
}

/// Decompresses a single-member gzip file, checking the CRC-32 and the length.
///
/// # Errors
/// [`TrainError::Data`] for a bad header, a corrupt or truncated stream, a CRC-32 or length
/// mismatch, or a member of 4 GiB or more (the trailer's length is modulo 2³²). Concatenated
/// members (`cat a.gz b.gz`) are not supported: the trailer checked is the last member's, so
/// they fail the CRC-32 or length check (unless every member is the same).
pub fn gunzip(bytes: &[u8]) -> Result<Vec<u8>> {
    let start = header_len(bytes)?;
    let end = bytes
        .len()
        .checked_sub(8)
        .filter(|&end| end >= start)
        .ok_or_else(|| bad("truncated"))?;
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let (crc, size) = (word(end), word(end + 4));
    let stream = &bytes[start..end];
    let compressed = u32::try_from(stream.len())
        .ok()
        .filter(|&n| n < u32::MAX)
        .ok_or_else(|| bad("members of 4 GiB or more are not supported"))?;
    let mut reader = Cursor::new(local_header(crc, compressed, size)).chain(stream);
    let mut entry = zip::read::read_zipfile_from_stream(&mut reader)
        .map_err(bad)?
        .ok_or_else(|| bad("no entry"))?;
    let mut out = Vec::with_capacity(size as usize);
    (&mut entry)
        .take(u64::from(size) + 1)
        .read_to_end(&mut out)
        .map_err(bad)?;
    if out.len() != size as usize {
        return Err(bad(format!(
            "{} bytes decoded, the trailer says {size}",
            out.len()
        )));
    }
    Ok(out)
}

/// The length of the member header: the fixed 10 bytes and the optional fields `FLG` announces.
fn header_len(b: &[u8]) -> Result<usize> {
    if b.len() < 10 || b[0] != 0x1f || b[1] != 0x8b {
        return Err(bad("not a gzip file"));
    }
    if b[2] != 8 {
        return Err(bad(format!(
            "compression method {} (only 8, deflate)",
            b[2]
        )));
    }
    let flags = b[3];
    if flags & 0xe0 != 0 {
        return Err(bad(format!("reserved flag bits set ({flags:#04x})")));
    }
    let mut at = 10;
    if flags & FEXTRA != 0 {
        let len = b.get(at..at + 2).ok_or_else(|| bad("truncated header"))?;
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for flag in [FNAME, FCOMMENT] {
        if flags & flag != 0 {
            let text = b.get(at..).ok_or_else(|| bad("truncated header"))?;
            at += 1 + text
                .iter()
                .position(|&c| c == 0)
                .ok_or_else(|| bad("unterminated header string"))?;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    if at > b.len() {
        return Err(bad("truncated header"));
    }
    Ok(at)
}

/// A zip local file header (APPNOTE 4.3.7) for one deflated entry named `gz`.
fn local_header(crc: u32, compressed: u32, size: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(32);
    h.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
    h.extend_from_slice(&20u16.to_le_bytes()); // version needed: 2.0 (deflate)
    h.extend_from_slice(&0u16.to_le_bytes()); // flags: sizes and CRC are in this header
    h.extend_from_slice(&8u16.to_le_bytes()); // method: deflate
    h.extend_from_slice(&0u16.to_le_bytes()); // time 00:00:00
    h.extend_from_slice(&0x21u16.to_le_bytes()); // date 1980-01-01
    h.extend_from_slice(&crc.to_le_bytes());
    h.extend_from_slice(&compressed.to_le_bytes());
    h.extend_from_slice(&size.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(b"gz");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `gzip.compress(b"hello hello hello hello\n", mtime=0)`: one fixed-Huffman block.
    const FIXED: [u8; 29] = [
        31, 139, 8, 0, 0, 0, 0, 0, 2, 3, 203, 72, 205, 201, 201, 87, 200, 64, 39, 185, 0, 0, 136,
        89, 11, 24, 0, 0, 0,
    ];

    /// A member with every optional header field and one stored block holding `abc`.
    fn stored_with_all_header_fields() -> Vec<u8> {
        let mut b = vec![
            0x1f,
            0x8b,
            8,
            FHCRC | FEXTRA | FNAME | FCOMMENT,
            0,
            0,
            0,
            0,
            0,
            255,
        ];
        b.extend_from_slice(&[3, 0, b'x', b'y', b'z']);
        b.extend_from_slice(b"name.csv\0a comment\0");
        b.extend_from_slice(&[0xaa, 0xbb]);
        b.extend_from_slice(&[0x01, 3, 0, !3, !0, b'a', b'b', b'c']);
        b.extend_from_slice(&0x3524_41c2u32.to_le_bytes()); // CRC-32 of "abc"
        b.extend_from_slice(&3u32.to_le_bytes());
        b
    }

    #[test]
    fn decodes_a_fixed_huffman_member() {
        assert_eq!(
            gunzip(&FIXED).expect("gunzip"),
            b"hello hello hello hello\n"
        );
    }

    #[test]
    fn skips_every_optional_header_field() {
        assert_eq!(
            gunzip(&stored_with_all_header_fields()).expect("gunzip"),
            b"abc"
        );
    }

    #[test]
    fn a_wrong_crc_is_an_error() {
        let mut b = FIXED.to_vec();
        b[21] ^= 1;
        let err = gunzip(&b).expect_err("bad crc");
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn a_wrong_length_is_an_error() {
        let mut b = FIXED.to_vec();
        b[25] += 1;
        assert!(gunzip(&b).is_err());
    }

    #[test]
    fn truncated_and_foreign_data_are_errors() {
        for cut in [0, 5, 10, 15, FIXED.len() - 1] {
            assert!(gunzip(&FIXED[..cut]).is_err(), "cut at {cut}");
        }
        assert!(gunzip(b"PK\x03\x04 not gzip").is_err());
        let mut other_method = FIXED.to_vec();
        other_method[2] = 7;
        assert!(gunzip(&other_method).is_err());
    }

    #[test]
    fn concatenated_members_are_an_error() {
        let mut b = FIXED.to_vec();
        b.extend_from_slice(&stored_with_all_header_fields());
        assert!(gunzip(&b).is_err());
    }
}
