//! A compact, versioned byte form of an index, for cold starts.
//!
//! Layout (version 1), integers LEB128 unless noted:
//!
//! ```text
//! "KVRIDX" version:u16-LE
//! caches:n   { worker_id:u64-LE dp_rank }*n
//! runs:n     { workers:k cache*k (ascending) blocks:m sequence_hash:u64-LE*m }*n
//! ```
//!
//! A run is a stretch of consecutive blocks with one set of caches, so a block held by many
//! caches is written once. Approximate-mode caches ([`Index::record_routed`]) are left out:
//! their entries are the router's guesses and expire. Match recency (the memory bound's
//! order) is not kept: a restored index starts with every run equally recent.

use crate::index::{Index, Slot, Workers};
use crate::{IndexConfig, WorkerKey};
use kvroute_protocol::{DpRank, SequenceHash, WorkerId};

const MAGIC: &[u8; 6] = b"KVRIDX";

/// The snapshot format this version writes, and the newest it reads.
pub const SNAPSHOT_VERSION: u16 = 1;

/// Why a snapshot could not be restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotError {
    /// The bytes do not start like an index snapshot.
    #[error("not a kvroute index snapshot")]
    NotASnapshot,
    /// The snapshot was written in a format this reader does not know (by a newer kvroute).
    #[error("index snapshot format {found} is not supported: this reader knows format {supported}; upgrade kvroute or rebuild the index from events")]
    UnsupportedVersion {
        /// The version in the snapshot.
        found: u16,
        /// The version this reader knows.
        supported: u16,
    },
    /// The bytes end before the snapshot does.
    #[error("index snapshot is truncated")]
    Truncated,
    /// The bytes decode but describe an impossible index.
    #[error("index snapshot is corrupt: {0}")]
    Corrupt(&'static str),
}

impl Index {
    /// The index as bytes (see the module documentation of the format).
    pub fn snapshot(&self) -> Vec<u8> {
        let mut renumber: Vec<Option<u64>> = vec![None; self.slots.len()];
        let mut caches = Vec::new();
        for (slot, info) in self.slots.iter().enumerate() {
            if let Some(info) = info.as_ref().filter(|info| !info.approximate) {
                renumber[slot] = Some(caches.len() as u64);
                caches.push(info.key);
            }
        }
        let mut out = Vec::with_capacity(16 + self.map_len() * 8);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        put_varint(&mut out, caches.len() as u64);
        for key in &caches {
            out.extend_from_slice(&key.worker_id.get().to_le_bytes());
            put_varint(&mut out, u64::from(key.dp_rank.get()));
        }
        let mut runs = Vec::new();
        let mut written = 0u64;
        let mut workers = Vec::new();
        for run in &self.runs {
            workers.clear();
            workers.extend(run.workers.iter().filter_map(|&s| renumber[s as usize]));
            if workers.is_empty() || run.hashes().is_empty() {
                continue;
            }
            put_varint(&mut runs, workers.len() as u64);
            for &w in &workers {
                put_varint(&mut runs, w);
            }
            put_varint(&mut runs, run.hashes().len() as u64);
            for hash in run.hashes() {
                runs.extend_from_slice(&hash.get().to_le_bytes());
            }
            written += 1;
        }
        put_varint(&mut out, written);
        out.extend_from_slice(&runs);
        out
    }

    /// Rebuilds an index from [`Index::snapshot`] bytes. Counters start at zero.
    pub fn restore(bytes: &[u8], config: IndexConfig) -> Result<Self, SnapshotError> {
        let mut input = Reader(bytes);
        if input.take(MAGIC.len()).ok() != Some(&MAGIC[..]) {
            return Err(SnapshotError::NotASnapshot);
        }
        let version = u16::from_le_bytes(input.array()?);
        if version != SNAPSHOT_VERSION {
            return Err(SnapshotError::UnsupportedVersion {
                found: version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let mut index = Index::new(config);
        let caches = input.count(9)?;
        for expected in 0..caches {
            let worker_id = WorkerId(u64::from_le_bytes(input.array()?));
            let dp_rank = u32::try_from(input.varint()?)
                .map_err(|_| SnapshotError::Corrupt("dp rank out of range"))?;
            let key = WorkerKey::new(worker_id, DpRank(dp_rank));
            if index.slot_for(key) as usize != expected {
                return Err(SnapshotError::Corrupt("cache listed twice"));
            }
        }
        for _ in 0..input.count(10)? {
            let count = input.count(1)?;
            let mut workers = Workers::with_capacity(count);
            for _ in 0..count {
                let slot = input.varint()?;
                if slot >= caches as u64
                    || workers.last().is_some_and(|&l: &Slot| u64::from(l) >= slot)
                {
                    return Err(SnapshotError::Corrupt(
                        "run caches not ascending known caches",
                    ));
                }
                workers.push(slot as Slot);
            }
            let blocks = input.count(8)?;
            if workers.is_empty() || blocks == 0 {
                return Err(SnapshotError::Corrupt("empty run"));
            }
            let hashes = (0..blocks)
                .map(|_| input.array().map(|b| SequenceHash(u64::from_le_bytes(b))))
                .collect::<Result<Vec<_>, _>>()?;
            index
                .insert_run(hashes, workers)
                .map_err(|_| SnapshotError::Corrupt("block listed twice"))?;
        }
        if !input.0.is_empty() {
            return Err(SnapshotError::Corrupt("trailing bytes"));
        }
        Ok(index)
    }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SnapshotError> {
        if self.0.len() < n {
            return Err(SnapshotError::Truncated);
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn varint(&mut self) -> Result<u64, SnapshotError> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let [byte] = self.array()?;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(SnapshotError::Corrupt("varint too long"))
    }

    /// A count of items that each take at least `min_bytes`: bounded by what is left, so a
    /// hostile count cannot make the reader allocate or loop far beyond the input.
    fn count(&mut self, min_bytes: usize) -> Result<usize, SnapshotError> {
        let count = self.varint()?;
        if count > (self.0.len() / min_bytes) as u64 {
            return Err(SnapshotError::Truncated);
        }
        Ok(count as usize)
    }
}
