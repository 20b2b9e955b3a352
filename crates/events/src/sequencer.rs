//! Event-id bookkeeping per (worker, dp rank, incarnation): what is applied, what is a
//! duplicate, what is a gap, which incarnation is current. Shared by every source.

use crate::stats::{Counter, Counters};
use crate::{ResyncReason, ResyncRequest};
use kvroute_index::{SharedIndex, WorkerKey};
use kvroute_protocol::{DpRank, KvCacheEventData, RouterEvent, WorkerId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Where one (worker, dp rank) stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
enum RankState {
    /// Every event up to `next - 1` was applied; `next` is expected.
    InSync { next: u64 },
    /// A gap dropped the cache's entries; everything is skipped until a `cleared` event with
    /// an id above `last_seen` starts a full state.
    Awaiting {
        last_seen: u64,
        #[serde(skip)]
        requested_at: Option<Instant>,
    },
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct WorkerState {
    /// The current incarnation; `None` for sources without incarnations (Dynamo's own wire).
    incarnation: Option<u64>,
    ranks: BTreeMap<DpRank, RankState>,
}

/// What to do with one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Verdict {
    /// Apply it: it is the next one expected (or the source cannot resend).
    Apply,
    /// Skip it: a duplicate, or the cache awaits its full state.
    Skip,
    /// Skip it and ask the worker for its full state.
    Resync(ResyncReason),
}

impl WorkerState {
    /// Takes a batch of `incarnation`: `false` for a stale one (to be skipped); a newer one
    /// drops the worker's entries and everything known about its ranks.
    fn enter(
        &mut self,
        worker_id: WorkerId,
        incarnation: Option<u64>,
        index: &SharedIndex,
        counters: &Counters,
    ) -> bool {
        match (incarnation, self.incarnation) {
            (Some(new), Some(current)) if new < current => return false,
            (Some(new), Some(current)) if new > current => {
                tracing::info!(%worker_id, old = current, new, "worker restarted: dropping its entries");
                counters.inc(Counter::incarnation_changes);
                index.remove_worker(worker_id);
                self.ranks.clear();
            }
            _ => {}
        }
        self.incarnation = incarnation;
        true
    }

    /// Judges one event against its rank's state (counting what it finds). Only an
    /// awaiting rank's state changes here; the caller records applied events and resyncs.
    fn judge(
        &mut self,
        worker_id: WorkerId,
        event: &RouterEvent,
        fenced: bool,
        counters: &Counters,
    ) -> Verdict {
        let (dp_rank, id) = (event.event.dp_rank, event.event.event_id);
        let cleared = matches!(event.event.data, KvCacheEventData::Cleared);
        match self.ranks.get_mut(&dp_rank) {
            None if id == 0 || cleared || !fenced => Verdict::Apply,
            None => {
                // The stream no longer holds this cache's beginning.
                counters.inc(Counter::gaps);
                Verdict::Resync(ResyncReason::MissedStart)
            }
            Some(RankState::InSync { next }) if id == *next => Verdict::Apply,
            Some(RankState::InSync { next }) if id < *next => {
                counters.inc(Counter::duplicates);
                if fenced {
                    Verdict::Skip
                } else {
                    Verdict::Apply
                }
            }
            Some(RankState::InSync { next }) => {
                counters.inc(Counter::gaps);
                tracing::warn!(%worker_id, %dp_rank, expected = *next, got = id, "event gap");
                // A `cleared` starts over from nothing: nothing missed can matter.
                if !fenced || cleared {
                    Verdict::Apply
                } else {
                    Verdict::Resync(ResyncReason::Gap)
                }
            }
            Some(RankState::Awaiting { last_seen, .. }) if cleared && id > *last_seen => {
                counters.inc(Counter::resyncs_completed);
                tracing::info!(%worker_id, %dp_rank, "full state arrived: back in order");
                Verdict::Apply
            }
            Some(RankState::Awaiting { last_seen, .. }) => {
                counters.inc(Counter::awaiting_resync);
                *last_seen = (*last_seen).max(id);
                Verdict::Skip
            }
        }
    }
}

/// The ordering state of every (worker, dp rank) an ingestor has seen. Serializable so a
/// snapshot carries it together with the index it describes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Sequencer {
    workers: BTreeMap<WorkerId, WorkerState>,
}

/// Events of one batch that passed the checks, applied to the index in order before any
/// removal so the index sees exactly the stream's order.
struct Pending<'a> {
    events: Vec<&'a RouterEvent>,
}

impl<'a> Pending<'a> {
    fn flush(&mut self, index: &SharedIndex, counters: &Counters) {
        if self.events.is_empty() {
            return;
        }
        let applied = self.events.len() as u64;
        let skips = index.apply_events(self.events.drain(..));
        // Counted once the index holds them, so a reader of the counter that waits for N
        // events sees all N in the index.
        counters.add(Counter::events_applied, applied);
        counters.add(Counter::index_skips, skips.len() as u64);
        for skip in skips {
            tracing::debug!(%skip, "index skipped an event");
        }
    }
}

impl Sequencer {
    /// Checks and applies the events of one worker, in order. `incarnation` is `None` for
    /// sources that have none and cannot resend (Dynamo's wire): there, gaps and duplicates
    /// are counted and every event is applied, as Dynamo's own router does. Returns the
    /// full-state resends to request.
    pub(crate) fn process(
        &mut self,
        worker_id: WorkerId,
        incarnation: Option<u64>,
        events: &[RouterEvent],
        index: &SharedIndex,
        counters: &Counters,
        now: Instant,
    ) -> Vec<ResyncRequest> {
        let state = self
            .workers
            .entry(worker_id)
            .or_insert_with(|| WorkerState {
                incarnation,
                ranks: BTreeMap::new(),
            });
        if !state.enter(worker_id, incarnation, index, counters) {
            counters.add(Counter::stale_incarnation, events.len() as u64);
            return Vec::new();
        }
        let fenced = incarnation.is_some();
        let mut pending = Pending { events: Vec::new() };
        let mut requests = Vec::new();
        for event in events {
            let (dp_rank, id) = (event.event.dp_rank, event.event.event_id);
            match state.judge(worker_id, event, fenced, counters) {
                Verdict::Apply => {
                    let next = id.wrapping_add(1);
                    state.ranks.insert(dp_rank, RankState::InSync { next });
                    pending.events.push(event);
                }
                Verdict::Skip => {}
                Verdict::Resync(reason) => {
                    if reason == ResyncReason::Gap {
                        // What came before the gap is applied, then the cache is dropped.
                        pending.flush(index, counters);
                        index.remove_worker_dp_rank(WorkerKey::new(worker_id, dp_rank));
                    }
                    Self::start_resync(&mut state.ranks, worker_id, dp_rank, id, now);
                    requests.push(ResyncRequest::new(worker_id, dp_rank, reason));
                    counters.inc(Counter::resyncs_requested);
                }
            }
        }
        pending.flush(index, counters);
        requests
    }

    /// Drops everything known about `worker_id`: its next event is judged as a first one.
    pub(crate) fn forget(&mut self, worker_id: WorkerId) {
        self.workers.remove(&worker_id);
    }

    fn start_resync(
        ranks: &mut BTreeMap<DpRank, RankState>,
        worker_id: WorkerId,
        dp_rank: DpRank,
        last_seen: u64,
        now: Instant,
    ) {
        tracing::info!(%worker_id, %dp_rank, "entries dropped; asking for the full state");
        ranks.insert(
            dp_rank,
            RankState::Awaiting {
                last_seen,
                requested_at: Some(now),
            },
        );
    }

    /// Repeats the requests of caches that have waited for a full state longer than `retry`
    /// (the worker may have missed the first request); marks them as requested now.
    pub(crate) fn due_resyncs(&mut self, now: Instant, retry: Duration) -> Vec<ResyncRequest> {
        let mut requests = Vec::new();
        for (&worker_id, state) in &mut self.workers {
            for (&dp_rank, rank) in &mut state.ranks {
                if let RankState::Awaiting { requested_at, .. } = rank {
                    let due = requested_at.is_none_or(|at| now.duration_since(at) >= retry);
                    if due {
                        *requested_at = Some(now);
                        requests.push(ResyncRequest::new(worker_id, dp_rank, ResyncReason::Retry));
                    }
                }
            }
        }
        requests
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use kvroute_index::{Index, IndexConfig};
    use kvroute_protocol::{
        BlockHash, KvCacheEvent, KvCacheStoreData, KvCacheStoredBlockData, SequenceHash,
    };

    fn store(worker: u64, id: u64, parent: Option<u64>, blocks: &[u64]) -> RouterEvent {
        RouterEvent::new(
            WorkerId(worker),
            KvCacheEvent {
                event_id: id,
                dp_rank: DpRank(0),
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: parent.map(SequenceHash),
                    start_position: None,
                    blocks: blocks
                        .iter()
                        .map(|&h| KvCacheStoredBlockData {
                            block_hash: SequenceHash(h),
                            tokens_hash: BlockHash(h),
                            mm_extra_info: None,
                        })
                        .collect(),
                }),
            },
        )
    }

    fn cleared(worker: u64, id: u64) -> RouterEvent {
        RouterEvent::new(
            WorkerId(worker),
            KvCacheEvent {
                event_id: id,
                dp_rank: DpRank(0),
                data: KvCacheEventData::Cleared,
            },
        )
    }

    struct Fixture {
        seq: Sequencer,
        index: SharedIndex,
        counters: Counters,
    }

    impl Fixture {
        fn new() -> Self {
            Self {
                seq: Sequencer::default(),
                index: SharedIndex::new(Index::new(IndexConfig::default())),
                counters: Counters::default(),
            }
        }

        fn feed(&mut self, incarnation: Option<u64>, events: &[RouterEvent]) -> Vec<ResyncRequest> {
            let worker = events[0].worker_id;
            let now = Instant::now();
            self.seq.process(
                worker,
                incarnation,
                events,
                &self.index,
                &self.counters,
                now,
            )
        }

        fn blocks(&self) -> u64 {
            self.index.stats().blocks
        }
    }

    #[test]
    fn in_order_events_apply_and_duplicates_are_skipped() {
        let mut f = Fixture::new();
        assert!(f
            .feed(
                Some(1),
                &[store(1, 0, None, &[1, 2]), store(1, 1, Some(2), &[3])]
            )
            .is_empty());
        assert!(f
            .feed(
                Some(1),
                &[store(1, 1, Some(2), &[3]), store(1, 0, None, &[9])]
            )
            .is_empty());
        let stats = f.counters.snapshot();
        assert_eq!(
            (stats.events_applied, stats.duplicates, stats.gaps),
            (2, 2, 0)
        );
        assert_eq!(f.blocks(), 3);
    }

    #[test]
    fn a_gap_drops_the_cache_and_waits_for_a_full_state() {
        let mut f = Fixture::new();
        f.feed(Some(1), &[store(1, 0, None, &[1, 2])]);
        let requests = f.feed(
            Some(1),
            &[store(1, 2, Some(2), &[3]), store(1, 3, Some(3), &[4])],
        );
        assert_eq!(
            requests,
            vec![ResyncRequest::new(
                WorkerId(1),
                DpRank(0),
                ResyncReason::Gap
            )]
        );
        assert_eq!(f.blocks(), 0);
        // A stale cleared (id not above what was seen) does not end the wait.
        f.feed(Some(1), &[cleared(1, 3), store(1, 4, None, &[5])]);
        assert_eq!(f.blocks(), 0);
        // The full state: cleared + stores, with the next ids.
        f.feed(Some(1), &[cleared(1, 5), store(1, 6, None, &[1, 2, 3])]);
        assert_eq!(f.blocks(), 3);
        let stats = f.counters.snapshot();
        assert_eq!(stats.gaps, 1);
        assert_eq!(stats.resyncs_requested, 1);
        assert_eq!(stats.resyncs_completed, 1);
        assert_eq!(stats.awaiting_resync, 3);
    }

    #[test]
    fn a_gap_ending_in_cleared_needs_no_resend() {
        let mut f = Fixture::new();
        f.feed(Some(1), &[store(1, 0, None, &[1, 2])]);
        assert!(f
            .feed(Some(1), &[cleared(1, 5), store(1, 6, None, &[7])])
            .is_empty());
        assert_eq!(f.blocks(), 1);
        assert_eq!(f.counters.snapshot().gaps, 1);
    }

    #[test]
    fn a_missed_start_asks_for_the_full_state() {
        let mut f = Fixture::new();
        let requests = f.feed(Some(1), &[store(1, 40, None, &[1])]);
        assert_eq!(requests[0].reason, ResyncReason::MissedStart);
        assert_eq!(f.blocks(), 0);
    }

    #[test]
    fn a_new_incarnation_replaces_the_old_and_the_old_is_fenced_off() {
        let mut f = Fixture::new();
        f.feed(Some(1), &[store(1, 0, None, &[1, 2, 3])]);
        f.feed(Some(2), &[store(1, 0, None, &[8])]);
        assert_eq!(f.blocks(), 1);
        f.feed(Some(1), &[store(1, 1, Some(3), &[4])]);
        assert_eq!(f.blocks(), 1);
        let stats = f.counters.snapshot();
        assert_eq!((stats.incarnation_changes, stats.stale_incarnation), (1, 1));
    }

    #[test]
    fn unfenced_sources_count_but_apply_everything() {
        let mut f = Fixture::new();
        assert!(f
            .feed(None, &[store(1, 5, None, &[1]), store(1, 9, Some(1), &[2])])
            .is_empty());
        f.feed(None, &[store(1, 3, None, &[7])]);
        assert_eq!(f.blocks(), 3);
        let stats = f.counters.snapshot();
        assert_eq!((stats.gaps, stats.duplicates), (1, 1));
    }

    #[test]
    fn waiting_caches_are_asked_again_after_the_retry_interval() {
        let mut f = Fixture::new();
        f.feed(Some(1), &[store(1, 3, None, &[1])]);
        let now = Instant::now();
        assert!(f.seq.due_resyncs(now, Duration::from_secs(60)).is_empty());
        let later = now + Duration::from_secs(61);
        assert_eq!(f.seq.due_resyncs(later, Duration::from_secs(60)).len(), 1);
        assert!(f.seq.due_resyncs(later, Duration::from_secs(60)).is_empty());
    }

    #[test]
    fn state_round_trips_through_json() {
        let mut f = Fixture::new();
        f.feed(Some(1), &[store(1, 0, None, &[1])]);
        f.feed(Some(7), &[store(2, 4, None, &[1])]);
        let json = serde_json::to_vec(&f.seq).unwrap();
        let back: Sequencer = serde_json::from_slice(&json).unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), json);
    }
}
