//! A generated KV event workload shaped like production chat traces, shared by the criterion
//! benches and the peer comparison (`#[path]`-included, so it is not a bench target itself).
//!
//! Requests are conversations: a system prompt (48 of them, 16 to 384 blocks, Zipf-like
//! popularity, so the popular ones end up on every worker) followed by turns of 16 to 1024
//! blocks, up to 512 to 8192 blocks per conversation. A conversation sticks to a home worker
//! (85% of its turns) as a cache-aware router would make it. Each request makes its worker
//! store the blocks it did not hold yet, as one `stored` event continuing the last block it
//! held. Sequence hashes chain the block contents exactly as Dynamo's do (kvroute-blockhash).

use kvroute_blockhash::sequence_hash;
use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData,
    RouterEvent, SequenceHash, WorkerId,
};
use std::collections::HashSet;

/// A request's blocks: content hashes and sequence hashes.
#[derive(Clone, Debug, Default)]
pub struct Sequence {
    pub blocks: Vec<BlockHash>,
    pub hashes: Vec<SequenceHash>,
}

impl Sequence {
    fn push(&mut self, block: BlockHash) {
        let hash = sequence_hash(self.hashes.last().copied(), block);
        self.blocks.push(block);
        self.hashes.push(hash);
    }

    fn prefix(&self, len: usize) -> Sequence {
        Sequence {
            blocks: self.blocks[..len].to_vec(),
            hashes: self.hashes[..len].to_vec(),
        }
    }
}

pub struct Workload {
    pub workers: u64,
    pub events: Vec<RouterEvent>,
    /// (worker, block) entries once every event is applied.
    pub entries: u64,
    pub conversations: Vec<Sequence>,
}

/// A reproducible xorshift stream.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}

fn stored(
    worker: u64,
    event_id: u64,
    parent: Option<SequenceHash>,
    seq: &Sequence,
    from: usize,
) -> RouterEvent {
    RouterEvent::new(
        WorkerId(worker),
        KvCacheEvent {
            event_id,
            dp_rank: DpRank(0),
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent,
                start_position: None,
                blocks: seq.blocks[from..]
                    .iter()
                    .zip(&seq.hashes[from..])
                    .map(|(&tokens_hash, &block_hash)| KvCacheStoredBlockData {
                        block_hash,
                        tokens_hash,
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        },
    )
}

/// Events of `workers` workers until they hold `target_entries` (worker, block) entries.
pub fn generate(workers: u64, target_entries: u64, seed: u64) -> Workload {
    let mut rng = Rng::new(seed);
    let prompts: Vec<Sequence> = (0..48)
        .map(|_| {
            let mut s = Sequence::default();
            for _ in 0..rng.range(16, 384) {
                s.push(BlockHash(rng.next()));
            }
            s
        })
        .collect();
    let mut held: Vec<HashSet<SequenceHash>> = vec![HashSet::new(); workers as usize];
    let mut active: Vec<(Sequence, u64, usize)> = Vec::new(); // (sequence, home, max len)
    let mut finished = Vec::new();
    let mut events = Vec::new();
    let mut entries = 0u64;
    while entries < target_entries {
        if active.len() < 64 {
            // Zipf-like: squaring a uniform draw favours the first prompts.
            let u = rng.below(1 << 16) as f64 / 65536.0;
            let prompt = &prompts[((u * u) * prompts.len() as f64) as usize];
            let max = rng.range(512, 8192) as usize;
            active.push((prompt.clone(), rng.below(workers), max));
        }
        let pick = rng.below(active.len() as u64) as usize;
        let (seq, home, max) = &mut active[pick];
        for _ in 0..rng.range(16, 1024) {
            seq.push(BlockHash(rng.next()));
        }
        let worker = if rng.below(100) < 85 {
            *home
        } else {
            rng.below(workers)
        };
        let set = &mut held[worker as usize];
        let from = seq.hashes.iter().take_while(|h| set.contains(h)).count();
        let parent = from.checked_sub(1).map(|i| seq.hashes[i]);
        set.extend(seq.hashes[from..].iter().copied());
        entries += (seq.hashes.len() - from) as u64;
        events.push(stored(worker, events.len() as u64, parent, seq, from));
        if seq.hashes.len() >= *max {
            finished.push(active.swap_remove(pick).0);
        }
    }
    finished.extend(active.into_iter().map(|(s, _, _)| s));
    Workload {
        workers,
        events,
        entries,
        conversations: finished,
    }
}

/// `count` requests of exactly `len` blocks: the next turn of a random conversation (its
/// cached prefix, up to 7/8 of the request, then new blocks), one in ten entirely new.
pub fn queries(workload: &Workload, len: usize, count: usize, seed: u64) -> Vec<Sequence> {
    let mut rng = Rng::new(seed);
    (0..count)
        .map(|_| {
            let mut q = if rng.below(10) == 0 {
                Sequence::default()
            } else {
                let conv = &workload.conversations
                    [rng.below(workload.conversations.len() as u64) as usize];
                conv.prefix(conv.hashes.len().min(len - len / 8))
            };
            while q.hashes.len() < len {
                q.push(BlockHash(rng.next()));
            }
            q
        })
        .collect()
}

/// The same stores one block per event, each continuing the block before it: what an engine
/// publishes while decoding, a block completing every few steps. The index ends up the same.
#[allow(dead_code)] // the concurrency example includes this file and does not use it
pub fn per_block(events: &[RouterEvent]) -> Vec<RouterEvent> {
    let mut out = Vec::new();
    for event in events {
        let KvCacheEventData::Stored(store) = &event.event.data else {
            out.push(event.clone());
            continue;
        };
        let mut parent = store.parent_hash;
        for block in &store.blocks {
            out.push(RouterEvent::new(
                event.worker_id,
                KvCacheEvent {
                    event_id: out.len() as u64,
                    dp_rank: event.event.dp_rank,
                    data: KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent,
                        start_position: None,
                        blocks: vec![block.clone()],
                    }),
                },
            ));
            parent = Some(block.block_hash);
        }
    }
    out
}
