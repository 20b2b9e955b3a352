//! What router replicas tell each other about the load they put on workers.

use crate::{ProtocolError, WorkerId};
use serde::{Deserialize, Serialize};

/// The load one router replica has put on one worker: its own in-flight requests there.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerLoad {
    /// The worker.
    pub worker_id: WorkerId,
    /// In-flight requests the replica sent there.
    pub active_requests: u64,
    /// Uncached blocks of those requests that have not produced a first token yet.
    pub pending_prefill_blocks: u64,
    /// KV blocks those requests hold (their whole prompts).
    pub active_blocks: u64,
}

impl WorkerLoad {
    /// No load on `worker_id`.
    pub fn idle(worker_id: WorkerId) -> Self {
        Self {
            worker_id,
            ..Self::default()
        }
    }

    /// Sets the load's three terms.
    pub fn with(
        mut self,
        active_requests: u64,
        pending_prefill_blocks: u64,
        active_blocks: u64,
    ) -> Self {
        self.active_requests = active_requests;
        self.pending_prefill_blocks = pending_prefill_blocks;
        self.active_blocks = active_blocks;
        self
    }
}

/// One router replica's load report (JSON), published for the other replicas.
///
/// Loads are absolute, not deltas: a lost or duplicated report is healed by the next one.
/// A `full` report lists every worker the replica has load on (any other is idle for it) and
/// doubles as the replica's heartbeat; other reports list only the workers whose load changed.
/// A `leaving` report is a replica's last: it stopped. A replica is `(replica, incarnation)`: a restarted replica has a new incarnation, and its
/// reports replace its previous life's; `seq` orders one incarnation's reports.
///
/// ```
/// use kvroute_protocol::{ReplicaLoad, WorkerId, WorkerLoad};
///
/// let report = ReplicaLoad::new("gw-a", 1_733_300_000_000_000_000, 7)
///     .with_workers(vec![WorkerLoad::idle(WorkerId(2)).with(3, 40, 120)]);
/// let json = report.to_json();
/// assert_eq!(
///     json,
///     r#"{"replica":"gw-a","incarnation":1733300000000000000,"seq":7,"full":false,"workers":[{"worker_id":2,"active_requests":3,"pending_prefill_blocks":40,"active_blocks":120}]}"#
/// );
/// assert_eq!(ReplicaLoad::from_json(json.as_bytes())?, report);
/// # Ok::<(), kvroute_protocol::ProtocolError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReplicaLoad {
    /// The replica's name, unique among the replicas sharing a fleet.
    pub replica: String,
    /// When this life of the replica started (nanoseconds since the Unix epoch, or any number
    /// that grows across restarts).
    pub incarnation: u64,
    /// Report number within the incarnation, from 0.
    pub seq: u64,
    /// Whether `workers` is every worker the replica has load on.
    #[serde(default)]
    pub full: bool,
    /// Loads on workers.
    #[serde(default)]
    pub workers: Vec<WorkerLoad>,
    /// The replica is stopping: forget it now rather than at expiry.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub leaving: bool,
}

impl ReplicaLoad {
    /// A report of `replica` in its `incarnation`, number `seq`, listing no worker yet.
    pub fn new(replica: impl Into<String>, incarnation: u64, seq: u64) -> Self {
        Self {
            replica: replica.into(),
            incarnation,
            seq,
            full: false,
            workers: Vec::new(),
            leaving: false,
        }
    }

    /// Sets the workers listed.
    pub fn with_workers(mut self, workers: Vec<WorkerLoad>) -> Self {
        self.workers = workers;
        self
    }

    /// Marks the report as listing every worker the replica has load on.
    pub fn full(mut self) -> Self {
        self.full = true;
        self
    }

    /// Marks the report as the replica's last.
    pub fn leaving(mut self) -> Self {
        self.leaving = true;
        self
    }

    /// Reads a report.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(bytes).map_err(ProtocolError::ReplicaLoad)
    }

    /// Writes the report.
    pub fn to_json(&self) -> String {
        // A struct of strings, integers and booleans always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn bad_reports_are_errors() {
        for bad in [
            &b""[..],
            br#"{"replica":"a","incarnation":-1,"seq":0}"#,
            br#"{"replica":"a","seq":0}"#,
            br#"{"replica":"a","incarnation":1,"seq":0,"workers":[{"worker_id":"x"}]}"#,
        ] {
            assert!(ReplicaLoad::from_json(bad).is_err(), "{bad:?}");
        }
        // Older and newer writers: missing flags default, unknown fields are ignored.
        let minimal =
            ReplicaLoad::from_json(br#"{"replica":"a","incarnation":1,"seq":0,"x":1}"#).unwrap();
        assert_eq!(minimal, ReplicaLoad::new("a", 1, 0));
    }

    proptest! {
        #[test]
        fn reports_round_trip(
            replica in "[a-z0-9-]{0,12}",
            incarnation: u64,
            seq: u64,
            full: bool,
            leaving: bool,
            loads in proptest::collection::vec((any::<u64>(), any::<u64>(), any::<u64>(), any::<u64>()), 0..5),
        ) {
            let workers = loads.into_iter().map(|(w, a, p, b)| WorkerLoad::idle(WorkerId(w)).with(a, p, b)).collect();
            let mut report = ReplicaLoad::new(replica, incarnation, seq).with_workers(workers);
            report.full = full;
            report.leaving = leaving;
            prop_assert_eq!(ReplicaLoad::from_json(report.to_json().as_bytes()).unwrap(), report);
        }
    }
}
