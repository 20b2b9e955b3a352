//! Ingestion counters: one atomic per counter for [`IngestStats`], mirrored into the `metrics`
//! facade under the names docs/events.md lists.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($( $(#[$doc:meta])* $field:ident => $metric:literal, )*) => {
        /// What one ingestor has seen since it started; every field is also a `metrics` counter
        /// (name in docs/events.md).
        #[derive(Clone, Debug, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct IngestStats {
            $( $(#[$doc])* pub $field: u64, )*
        }

        /// One counter of [`IngestStats`].
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        #[allow(non_camel_case_types)]
        pub(crate) enum Counter {
            $( $field, )*
        }

        impl Counter {
            /// The `metrics` name of the counter.
            pub(crate) const fn metric(self) -> &'static str {
                match self {
                    $( Self::$field => $metric, )*
                }
            }
        }

        /// The live counters behind [`IngestStats`].
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $( $field: AtomicU64, )*
        }

        impl Counters {
            fn cell(&self, counter: Counter) -> &AtomicU64 {
                match counter {
                    $( Counter::$field => &self.$field, )*
                }
            }

            /// The counters now.
            pub(crate) fn snapshot(&self) -> IngestStats {
                IngestStats {
                    $( $field: self.$field.load(Ordering::Relaxed), )*
                }
            }
        }
    };
}

counters! {
    /// Batches (messages) received and decoded.
    batches => "kvroute_events_batches_total",
    /// Events applied to the index, in order (counted after the index holds them).
    events_applied => "kvroute_events_applied_total",
    /// Events whose id was already seen for their (worker, dp rank, incarnation); skipped.
    duplicates => "kvroute_events_duplicates_total",
    /// Missing event ids detected (each detection counts once, whatever the size of the gap).
    gaps => "kvroute_events_gaps_total",
    /// Events of an older incarnation of their worker; skipped.
    stale_incarnation => "kvroute_events_stale_incarnation_total",
    /// Workers seen starting a newer incarnation (their old entries were dropped).
    incarnation_changes => "kvroute_events_incarnation_changes_total",
    /// Events skipped while their (worker, dp rank) waited for a full-state resend.
    awaiting_resync => "kvroute_events_awaiting_resync_total",
    /// Full-state resends requested from workers (including repeated requests).
    resyncs_requested => "kvroute_events_resyncs_requested_total",
    /// (worker, dp rank)s that came back in order after a gap (a full state arrived).
    resyncs_completed => "kvroute_events_resyncs_completed_total",
    /// Events the index skipped wholly or partly (unknown parent, unknown removed blocks).
    index_skips => "kvroute_events_index_skips_total",
    /// Workers forgotten because they left the fleet (`IngestControl::forget_worker`): their
    /// entries were dropped.
    workers_forgotten => "kvroute_events_workers_forgotten_total",
    /// Messages that could not be decoded or were inconsistent; skipped.
    malformed => "kvroute_events_malformed_total",
    /// Snapshots written to the object store.
    snapshots_saved => "kvroute_events_snapshots_saved_total",
    /// Snapshot writes that failed (ingestion goes on).
    snapshot_failures => "kvroute_events_snapshot_failures_total",
    /// Starts that restored a snapshot and replayed only the stream's tail.
    snapshots_restored => "kvroute_events_snapshots_restored_total",
    /// Starts whose snapshot was unusable (corrupt, or its sequence no longer in the stream):
    /// the index started empty and every worker was asked for its full state.
    snapshots_unusable => "kvroute_events_snapshots_unusable_total",
    /// Gaps (or engine restarts) a replay could not fill: the cache's entries were dropped and
    /// are rebuilt from new events (engine sources).
    gaps_unhealed => "kvroute_events_gaps_unhealed_total",
    /// Engine events of a KV cache group other than full attention (sliding window, mamba);
    /// skipped.
    engine_other_group => "kvroute_events_engine_other_group_total",
    /// Engine events of another tier than the GPU pool (offloading connectors); skipped.
    engine_other_tier => "kvroute_events_engine_other_tier_total",
    /// Engine stored events continuing a block kvroute does not know; skipped.
    engine_unknown_parent => "kvroute_events_engine_unknown_parent_total",
    /// Engine events refused because the engine's block size is not kvroute's.
    engine_block_size_refused => "kvroute_events_engine_block_size_refused_total",
    /// Engine caches whose remembered blocks passed the bound: their entries were dropped.
    engine_overflows => "kvroute_events_engine_overflows_total",
    /// Times the stream consumer was recreated after the connection or the server failed, or
    /// was found stalled (the stream held events it did not deliver: its NATS node died).
    consumer_restarts => "kvroute_events_consumer_restarts_total",
}

impl Counters {
    /// Adds `n` to `counter`, here and in the `metrics` facade.
    pub(crate) fn add(&self, counter: Counter, n: u64) {
        if n > 0 {
            self.cell(counter).fetch_add(n, Ordering::Relaxed);
            metrics::counter!(counter.metric()).increment(n);
        }
    }

    /// Adds one to `counter`.
    pub(crate) fn inc(&self, counter: Counter) {
        self.add(counter, 1);
    }
}
