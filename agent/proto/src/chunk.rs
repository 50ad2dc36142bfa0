//! Chunking of large objects (bundles, global models, large updates).
//!
//! The sender publishes a [`ChunkManifest`] (sha256 of the whole, total length, chunk size and
//! count) inside a signed message, then every chunk as its own signed envelope of kind
//! [`crate::Kind::Chunk`] carrying a [`Chunk`]. Chunks are retained on topics that name the object
//! and the index, so a receiver that lost its connection subscribes again to the missing indices
//! only. A receiver bounds the manifest ([`ChunkManifest::validate`]) before reserving anything,
//! checks each chunk's index and length, and accepts the object only if the whole hashes to the
//! manifest's sha256.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// Describes a chunked object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChunkManifest {
    pub sha256: [u8; 32],
    pub total_len: u64,
    pub chunk_size: u32,
    pub chunk_count: u32,
}

/// One piece of an object: `data` is bytes `[index * chunk_size, ...)` of the object whose hash is
/// `object`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk<'a> {
    pub object: [u8; 32],
    pub index: u32,
    pub data: &'a [u8],
}

/// sha256 of `data` (ring).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

impl ChunkManifest {
    /// The manifest of `data` cut into `chunk_size`-byte pieces (an empty object has no chunks).
    pub fn of(data: &[u8], chunk_size: u32) -> Result<Self, ProtoError> {
        if chunk_size == 0 {
            return Err(ProtoError::BadManifest);
        }
        let count = data.len().div_ceil(chunk_size as usize);
        Ok(Self {
            sha256: sha256(data),
            total_len: data.len() as u64,
            chunk_size,
            chunk_count: u32::try_from(count).map_err(|_| ProtoError::BadManifest)?,
        })
    }

    /// Checks internal consistency and the receiver's bounds, before anything is reserved.
    pub fn validate(&self, max_total: u64, max_chunk: u32) -> Result<(), ProtoError> {
        let consistent = self.chunk_size > 0
            && u64::from(self.chunk_count) == self.total_len.div_ceil(u64::from(self.chunk_size));
        if !consistent || self.total_len > max_total || self.chunk_size > max_chunk {
            return Err(ProtoError::BadManifest);
        }
        Ok(())
    }

    /// Byte range of chunk `index` within the object.
    pub fn range(&self, index: u32) -> Result<core::ops::Range<u64>, ProtoError> {
        if index >= self.chunk_count {
            return Err(ProtoError::BadChunk { index });
        }
        let start = u64::from(index) * u64::from(self.chunk_size);
        Ok(start..(start + u64::from(self.chunk_size)).min(self.total_len))
    }

    /// Checks that `chunk` belongs to this object and has the right length for its index.
    pub fn check(&self, chunk: &Chunk<'_>) -> Result<(), ProtoError> {
        if chunk.object != self.sha256 {
            return Err(ProtoError::BadChunk { index: chunk.index });
        }
        let r = self.range(chunk.index)?;
        if chunk.data.len() as u64 != r.end - r.start {
            return Err(ProtoError::BadChunk { index: chunk.index });
        }
        Ok(())
    }

    /// The chunks of `data` (which must be the object this manifest describes).
    pub fn split<'d>(&self, data: &'d [u8]) -> impl Iterator<Item = Chunk<'d>> + 'd {
        let object = self.sha256;
        data.chunks(self.chunk_size.max(1) as usize)
            .enumerate()
            .map(move |(i, c)| Chunk {
                object,
                index: i as u32,
                data: c,
            })
    }
}

/// Reassembles an object in memory, chunk by chunk in any order, with duplicates ignored.
#[cfg(feature = "alloc")]
#[derive(Debug, Clone)]
pub struct Assembly {
    manifest: ChunkManifest,
    data: alloc::vec::Vec<u8>,
    have: alloc::vec::Vec<bool>,
    missing: u32,
}

#[cfg(feature = "alloc")]
impl Assembly {
    /// Starts a reassembly after [`ChunkManifest::validate`] with the receiver's bounds.
    pub fn new(
        manifest: ChunkManifest,
        max_total: u64,
        max_chunk: u32,
    ) -> Result<Self, ProtoError> {
        manifest.validate(max_total, max_chunk)?;
        let len = usize::try_from(manifest.total_len).map_err(|_| ProtoError::BadManifest)?;
        Ok(Self {
            manifest,
            data: alloc::vec![0; len],
            have: alloc::vec![false; manifest.chunk_count as usize],
            missing: manifest.chunk_count,
        })
    }

    pub fn manifest(&self) -> &ChunkManifest {
        &self.manifest
    }

    /// Stores a chunk; returns `true` if it was new.
    pub fn insert(&mut self, chunk: &Chunk<'_>) -> Result<bool, ProtoError> {
        self.manifest.check(chunk)?;
        let i = chunk.index as usize;
        if self.have[i] {
            return Ok(false);
        }
        let r = self.manifest.range(chunk.index)?;
        self.data[r.start as usize..r.end as usize].copy_from_slice(chunk.data);
        self.have[i] = true;
        self.missing -= 1;
        Ok(true)
    }

    /// Indices still missing, ascending.
    pub fn missing(&self) -> impl Iterator<Item = u32> + '_ {
        self.have
            .iter()
            .enumerate()
            .filter(|(_, h)| !**h)
            .map(|(i, _)| i as u32)
    }

    pub fn is_complete(&self) -> bool {
        self.missing == 0
    }

    /// The object, once complete and hashing to the manifest's sha256.
    pub fn finish(self) -> Result<alloc::vec::Vec<u8>, ProtoError> {
        if self.missing > 0 {
            return Err(ProtoError::Incomplete {
                missing: self.missing,
            });
        }
        if sha256(&self.data) != self.manifest.sha256 {
            return Err(ProtoError::HashMismatch);
        }
        Ok(self.data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_ranges() {
        let data = [5u8; 1000];
        let m = ChunkManifest::of(&data, 256).expect("manifest");
        assert_eq!(m.chunk_count, 4);
        assert_eq!(m.range(3), Ok(768..1000));
        assert_eq!(m.range(4), Err(ProtoError::BadChunk { index: 4 }));
        assert!(m.validate(1000, 256).is_ok());
        assert_eq!(m.validate(999, 256), Err(ProtoError::BadManifest));
        assert_eq!(m.validate(1000, 255), Err(ProtoError::BadManifest));
        let lying = ChunkManifest {
            chunk_count: 5,
            ..m
        };
        assert_eq!(
            lying.validate(u64::MAX, u32::MAX),
            Err(ProtoError::BadManifest)
        );
        let chunks: heapless::Vec<Chunk<'_>, 8> = m.split(&data).collect();
        assert_eq!(chunks.len(), 4);
        for c in &chunks {
            assert!(m.check(c).is_ok());
        }
        let short = Chunk {
            data: &data[..10],
            ..chunks[0]
        };
        assert_eq!(m.check(&short), Err(ProtoError::BadChunk { index: 0 }));
        assert_eq!(ChunkManifest::of(&data, 0), Err(ProtoError::BadManifest));
    }

    #[cfg(feature = "alloc")]
    #[test]
    fn assembly_any_order_with_duplicates() {
        let data: std::vec::Vec<u8> = (0..5000u32).map(|i| (i * 7) as u8).collect();
        let m = ChunkManifest::of(&data, 1024).expect("manifest");
        let chunks: std::vec::Vec<_> = m.split(&data).collect();
        let mut a = Assembly::new(m, 10_000, 4096).expect("new");
        assert_eq!(a.insert(&chunks[4]), Ok(true));
        assert_eq!(a.insert(&chunks[4]), Ok(false));
        assert_eq!(a.missing().collect::<std::vec::Vec<_>>(), [0, 1, 2, 3]);
        assert_eq!(
            a.clone().finish().err(),
            Some(ProtoError::Incomplete { missing: 4 })
        );
        for c in chunks.iter().rev() {
            a.insert(c).expect("insert");
        }
        assert_eq!(a.finish().expect("finish"), data);

        // A manifest whose hash does not match the chunks' content.
        let mut bad = data.clone();
        bad[0] ^= 1;
        let chunks: std::vec::Vec<_> = m.split(&bad).collect();
        let mut a = Assembly::new(m, 10_000, 4096).expect("new");
        for c in &chunks {
            a.insert(c).expect("insert");
        }
        assert_eq!(a.finish().err(), Some(ProtoError::HashMismatch));
        assert_eq!(
            Assembly::new(m, 100, 4096).err(),
            Some(ProtoError::BadManifest)
        );
    }
}
