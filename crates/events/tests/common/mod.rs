//! Simulated workers and the reference model the ingested index must match.

#![allow(dead_code)] // each test binary uses part of it

use kvroute_events::Publisher;
use kvroute_index::{SharedIndex, WorkerKey};
use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, SequenceHash, WorkerId,
};
use std::collections::BTreeMap;

/// Prompts every worker draws from, so workers share prefixes.
pub const PROMPTS: u64 = 64;
/// Blocks per prompt.
pub const PROMPT_BLOCKS: u64 = 16;

/// The sequence hash of block `position` of prompt `prompt`.
pub fn hash(prompt: u64, position: u64) -> SequenceHash {
    SequenceHash((prompt << 20 | position).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
}

/// A worker's cache as the worker intends it: how many leading blocks of each prompt it holds.
#[derive(Clone, Debug)]
pub struct SimWorker {
    pub worker_id: WorkerId,
    pub held: BTreeMap<u64, u64>,
    rng: u64,
}

impl SimWorker {
    pub fn new(worker_id: WorkerId, seed: u64) -> Self {
        Self {
            worker_id,
            held: BTreeMap::new(),
            rng: seed.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1,
        }
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    /// The next event: mostly stores extending a prompt, sometimes evictions of a prompt's tail.
    pub fn step(&mut self) -> KvCacheEventData {
        let prompt = self.next() % PROMPTS;
        let held = self.held.get(&prompt).copied().unwrap_or(0);
        let evict = held > 0 && (held == PROMPT_BLOCKS || self.next().is_multiple_of(4));
        if evict {
            let count = (1 + self.next() % 3).min(held);
            self.held.insert(prompt, held - count);
            return KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: (held - count..held).map(|p| hash(prompt, p)).collect(),
            });
        }
        let count = (1 + self.next() % 4).min(PROMPT_BLOCKS - held);
        self.held.insert(prompt, held + count);
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: held.checked_sub(1).map(|p| hash(prompt, p)),
            start_position: None,
            blocks: (held..held + count)
                .map(|p| KvCacheStoredBlockData {
                    block_hash: hash(prompt, p),
                    tokens_hash: BlockHash(p),
                    mm_extra_info: None,
                })
                .collect(),
        })
    }

    /// Publishes `events` steps in batches of `batch`.
    pub async fn run(&mut self, publisher: &Publisher, events: usize, batch: usize) {
        let mut left = events;
        while left > 0 {
            let n = left.min(batch);
            let data: Vec<_> = (0..n).map(|_| self.step()).collect();
            publisher.publish(DpRank(0), data).await.unwrap();
            left -= n;
        }
    }
}

/// Where `index` differs from what `workers` intend, as readable lines (empty: identical).
pub fn differences(index: &SharedIndex, workers: &[SimWorker]) -> Vec<String> {
    let mut out = Vec::new();
    for prompt in 0..PROMPTS {
        let query: Vec<SequenceHash> = (0..PROMPT_BLOCKS).map(|p| hash(prompt, p)).collect();
        let overlap = index.find_matches(&query);
        let mut got: BTreeMap<WorkerKey, usize> = overlap
            .workers
            .iter()
            .map(|w| (w.worker, w.matched_blocks))
            .collect();
        for worker in workers {
            let want = worker.held.get(&prompt).copied().unwrap_or(0) as usize;
            let have = got
                .remove(&WorkerKey::new(worker.worker_id, DpRank(0)))
                .unwrap_or(0);
            if want != have {
                out.push(format!(
                    "prompt {prompt}, {}: want {want} have {have}",
                    worker.worker_id
                ));
            }
        }
        for (worker, have) in got {
            out.push(format!("prompt {prompt}, unexpected {worker}: {have}"));
        }
    }
    let want_blocks: u64 = workers.iter().flat_map(|w| w.held.values()).sum();
    let have_blocks = index.stats().blocks;
    if want_blocks != have_blocks {
        out.push(format!("blocks: want {want_blocks} have {have_blocks}"));
    }
    out
}

/// Waits (up to `secs`) until `index` matches `workers`; panics with the differences if not.
pub async fn converge(index: &SharedIndex, workers: &[SimWorker], secs: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let diff = differences(index, workers);
        if diff.is_empty() {
            return;
        }
        if std::time::Instant::now() > deadline {
            panic!("index did not converge: {:?}", &diff[..diff.len().min(10)]);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
