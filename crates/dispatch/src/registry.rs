//! The workers the router may send to, their load and their health.

use crate::{Candidate, CandidateInput};
use kvroute_protocol::{ReplicaLoad, WorkerId, WorkerLoad};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

/// A worker: an OpenAI-compatible HTTP endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Worker {
    /// The id its KV events carry.
    pub id: WorkerId,
    /// Base URL, e.g. `http://10.0.0.5:8000` (paths such as `/v1/chat/completions` are appended).
    pub url: String,
}

/// A worker URL that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("worker URL {url:?} is not an http://host[:port] base URL")]
pub struct InvalidWorkerUrl {
    /// The URL given.
    pub url: String,
}

impl Worker {
    /// A worker with `id` at `url`, an `http://host[:port]` base URL (a trailing slash is
    /// dropped; HTTPS to workers is not supported).
    pub fn new(id: WorkerId, url: impl Into<String>) -> Result<Self, InvalidWorkerUrl> {
        let mut url = url.into();
        while url.ends_with('/') {
            url.pop();
        }
        let valid = url
            .parse::<http::Uri>()
            .is_ok_and(|uri| uri.scheme_str() == Some("http") && uri.host().is_some());
        if valid {
            Ok(Self { id, url })
        } else {
            Err(InvalidWorkerUrl { url })
        }
    }
}

/// When a worker is taken out of rotation and for how long.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub failure_threshold: u32,
    /// How long an open circuit keeps the worker out before one trial request.
    pub cooldown: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_threshold: 3,
            cooldown: Duration::from_secs(5),
        }
    }
}

impl BreakerConfig {
    /// Sets how many failures in a row open the circuit.
    pub fn with_failure_threshold(mut self, failures: u32) -> Self {
        self.failure_threshold = failures.max(1);
        self
    }

    /// Sets how long an open circuit keeps a worker out.
    pub fn with_cooldown(mut self, cooldown: Duration) -> Self {
        self.cooldown = cooldown;
        self
    }
}

#[derive(Debug, Default)]
struct Breaker {
    consecutive_failures: u32,
    open_until: Option<Instant>,
}

/// Live state of one worker.
#[derive(Debug)]
struct WorkerState {
    worker: Worker,
    /// This router's own load on the worker.
    active_requests: AtomicU64,
    pending_prefill_blocks: AtomicU64,
    active_blocks: AtomicU64,
    /// The other replicas' load on it, summed ([`Registry::apply_replica_load`]).
    remote: RemoteLoad,
    breaker: Mutex<Breaker>,
}

#[derive(Debug, Default)]
struct RemoteLoad {
    active_requests: AtomicU64,
    pending_prefill_blocks: AtomicU64,
    active_blocks: AtomicU64,
}

impl RemoteLoad {
    fn set(&self, total: WorkerLoad) {
        self.active_requests
            .store(total.active_requests, Ordering::Relaxed);
        self.pending_prefill_blocks
            .store(total.pending_prefill_blocks, Ordering::Relaxed);
        self.active_blocks
            .store(total.active_blocks, Ordering::Relaxed);
    }
}

/// What the other router replicas last reported, per replica name.
#[derive(Debug, Default)]
struct Replicas {
    by_name: HashMap<String, Replica>,
}

#[derive(Debug)]
struct Replica {
    incarnation: u64,
    seq: u64,
    last_seen: Instant,
    loads: HashMap<WorkerId, WorkerLoad>,
}

impl Replicas {
    /// Every replica's load on `worker`, summed.
    fn total(&self, worker: WorkerId) -> WorkerLoad {
        let mut total = WorkerLoad::idle(worker);
        for load in self.by_name.values().filter_map(|r| r.loads.get(&worker)) {
            total.active_requests = total.active_requests.saturating_add(load.active_requests);
            total.pending_prefill_blocks = total
                .pending_prefill_blocks
                .saturating_add(load.pending_prefill_blocks);
            total.active_blocks = total.active_blocks.saturating_add(load.active_blocks);
        }
        total
    }
}

/// What [`Registry::apply_replica_load`] did with a report.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ReplicaReport {
    /// Its loads now count.
    Applied,
    /// A replica not heard from before (or since it expired).
    Joined,
    /// A new incarnation of a known replica: its previous life's loads were dropped.
    Restarted,
    /// From an older incarnation, or not newer than a report already applied: ignored.
    Stale,
    /// The replica said it is stopping: its load was dropped.
    Left,
}

/// A worker's health as reported by [`Registry::status`].
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WorkerStatus {
    /// The worker.
    #[serde(flatten)]
    pub worker: Worker,
    /// In-flight requests.
    pub active_requests: u64,
    /// Uncached blocks of in-flight requests still prefilling.
    pub pending_prefill_blocks: u64,
    /// KV blocks in-flight requests hold (their whole prompts).
    pub active_blocks: u64,
    /// Whether requests may be sent to it now.
    pub available: bool,
    /// Failures in a row.
    pub consecutive_failures: u32,
}

/// The set of workers, with this router's load on each and, with several router replicas, the
/// load the others report ([`Registry::apply_replica_load`]). Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    workers: Arc<RwLock<Vec<Arc<WorkerState>>>>,
    /// Locked before `workers` when both are.
    replicas: Arc<Mutex<Replicas>>,
    breaker: BreakerConfig,
}

/// A worker the router may use right now, with its load.
#[derive(Clone, Debug)]
pub struct Eligible {
    state: Arc<WorkerState>,
}

impl Eligible {
    /// The worker.
    pub fn worker(&self) -> &Worker {
        &self.state.worker
    }

    /// In-flight requests, this router's and the other replicas'.
    pub fn active_requests(&self) -> u64 {
        let (local, remote) = (
            &self.state.active_requests,
            &self.state.remote.active_requests,
        );
        sum(local, remote)
    }

    /// Uncached blocks of in-flight requests that are still prefilling, this router's and the
    /// other replicas'.
    pub fn pending_prefill_blocks(&self) -> u64 {
        let state = &self.state;
        sum(
            &state.pending_prefill_blocks,
            &state.remote.pending_prefill_blocks,
        )
    }

    /// KV blocks its in-flight requests hold (their whole prompts), this router's and the
    /// other replicas'.
    pub fn active_blocks(&self) -> u64 {
        sum(&self.state.active_blocks, &self.state.remote.active_blocks)
    }

    /// The routing input for this worker: `overlap_blocks` it holds and its live load (the
    /// other replicas' included).
    pub fn candidate(&self, overlap_blocks: usize) -> CandidateInput {
        CandidateInput::idle(self.state.worker.id, overlap_blocks)
            .with_pending_prefill_blocks(self.pending_prefill_blocks())
            .with_active_requests(self.active_requests())
            .with_active_blocks(self.active_blocks())
    }

    /// Counts a request about to be sent here, with the blocks its decision row says it will
    /// prefill and hold; the guard undoes it when dropped.
    pub fn start_request(&self, row: &Candidate) -> LoadGuard {
        let prefill_blocks = row.new_blocks as u64;
        let held_blocks = (row.new_blocks + row.overlap_blocks) as u64;
        self.state.active_requests.fetch_add(1, Ordering::Relaxed);
        self.state
            .pending_prefill_blocks
            .fetch_add(prefill_blocks, Ordering::Relaxed);
        self.state
            .active_blocks
            .fetch_add(held_blocks, Ordering::Relaxed);
        LoadGuard {
            state: Arc::clone(&self.state),
            pending_prefill_blocks: prefill_blocks,
            held_blocks,
        }
    }
}

fn sum(local: &AtomicU64, remote: &AtomicU64) -> u64 {
    local
        .load(Ordering::Relaxed)
        .saturating_add(remote.load(Ordering::Relaxed))
}

/// Keeps a request counted in its worker's load until dropped.
#[derive(Debug)]
pub struct LoadGuard {
    state: Arc<WorkerState>,
    pending_prefill_blocks: u64,
    held_blocks: u64,
}

impl LoadGuard {
    /// The first token arrived: the request's prefill no longer weighs on the worker.
    pub fn prefill_done(&mut self) {
        let pending = std::mem::take(&mut self.pending_prefill_blocks);
        self.state
            .pending_prefill_blocks
            .fetch_sub(pending, Ordering::Relaxed);
    }
}

impl Drop for LoadGuard {
    fn drop(&mut self) {
        self.prefill_done();
        self.state.active_requests.fetch_sub(1, Ordering::Relaxed);
        self.state
            .active_blocks
            .fetch_sub(self.held_blocks, Ordering::Relaxed);
    }
}

impl Registry {
    /// An empty registry whose circuit breakers use `breaker`.
    pub fn new(breaker: BreakerConfig) -> Self {
        Self {
            workers: Arc::default(),
            replicas: Arc::default(),
            breaker,
        }
    }

    /// Adds a worker, or replaces the one with the same id (a restarted worker).
    pub fn upsert(&self, worker: Worker) {
        let replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let remote = RemoteLoad::default();
        remote.set(replicas.total(worker.id));
        let state = Arc::new(WorkerState {
            worker,
            active_requests: AtomicU64::new(0),
            pending_prefill_blocks: AtomicU64::new(0),
            active_blocks: AtomicU64::new(0),
            remote,
            breaker: Mutex::default(),
        });
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        workers.retain(|w| w.worker.id != state.worker.id);
        workers.push(state);
    }

    /// Removes a worker; returns whether it was registered.
    pub fn remove(&self, id: WorkerId) -> bool {
        let mut workers = self.workers.write().unwrap_or_else(|e| e.into_inner());
        let before = workers.len();
        workers.retain(|w| w.worker.id != id);
        workers.len() != before
    }

    /// Number of registered workers.
    pub fn len(&self) -> usize {
        self.workers.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Whether no worker is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Workers that may take a request now: circuit closed, or open past its cooldown (one
    /// trial is then allowed).
    pub fn eligible(&self, now: Instant) -> Vec<Eligible> {
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        workers
            .iter()
            .filter(|w| Self::available(&w.breaker, now))
            .map(|state| Eligible {
                state: Arc::clone(state),
            })
            .collect()
    }

    fn available(breaker: &Mutex<Breaker>, now: Instant) -> bool {
        let breaker = breaker.lock().unwrap_or_else(|e| e.into_inner());
        breaker.open_until.is_none_or(|until| now >= until)
    }

    /// Records a successful response from `id`: its circuit closes.
    pub fn record_success(&self, id: WorkerId) {
        self.with_breaker(id, |breaker| *breaker = Breaker::default());
    }

    /// Records a failure of `id` (connection refused, reset, timeout, 5xx before any byte).
    /// Returns whether its circuit is now open.
    pub fn record_failure(&self, id: WorkerId, now: Instant) -> bool {
        let config = self.breaker;
        self.with_breaker(id, |breaker| {
            breaker.consecutive_failures = breaker.consecutive_failures.saturating_add(1);
            // A failed trial after the cooldown reopens at once.
            let trial_failed = breaker.open_until.is_some();
            if trial_failed || breaker.consecutive_failures >= config.failure_threshold {
                breaker.open_until = Some(now + config.cooldown);
            }
            breaker.open_until.is_some()
        })
        .unwrap_or(false)
    }

    fn with_breaker<T>(&self, id: WorkerId, f: impl FnOnce(&mut Breaker) -> T) -> Option<T> {
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        let state = workers.iter().find(|w| w.worker.id == id)?;
        let mut breaker = state.breaker.lock().unwrap_or_else(|e| e.into_inner());
        Some(f(&mut breaker))
    }

    /// This router's own load on every worker (what it reports to the other replicas).
    pub fn local_loads(&self) -> Vec<WorkerLoad> {
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        workers
            .iter()
            .map(|state| {
                WorkerLoad::idle(state.worker.id).with(
                    state.active_requests.load(Ordering::Relaxed),
                    state.pending_prefill_blocks.load(Ordering::Relaxed),
                    state.active_blocks.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Folds another router replica's load report into the workers' load, as of `now`.
    ///
    /// Reports of one replica count from its newest incarnation only; within it, a report not
    /// newer (`seq`) than one applied is ignored. Workers not registered here are remembered and
    /// count once they are. The caller skips its own reports.
    ///
    /// ```
    /// use kvroute_dispatch::{Registry, ReplicaReport, Worker};
    /// use kvroute_protocol::{ReplicaLoad, WorkerId, WorkerLoad};
    /// use std::time::{Duration, Instant};
    ///
    /// let registry = Registry::default();
    /// registry.upsert(Worker::new(WorkerId(1), "http://10.0.0.1:8000")?);
    /// let now = Instant::now();
    /// let report = ReplicaLoad::new("gw-b", 1, 0)
    ///     .with_workers(vec![WorkerLoad::idle(WorkerId(1)).with(2, 30, 64)])
    ///     .full();
    /// assert_eq!(registry.apply_replica_load(&report, now), ReplicaReport::Joined);
    /// let worker = &registry.eligible(now)[0];
    /// assert_eq!((worker.active_requests(), worker.pending_prefill_blocks()), (2, 30));
    ///
    /// // gw-b goes silent: after the expiry its load no longer counts.
    /// let expired = registry.expire_replicas(now + Duration::from_secs(10), Duration::from_secs(3));
    /// assert_eq!(expired, ["gw-b"]);
    /// assert_eq!(registry.eligible(now)[0].active_requests(), 0);
    /// # Ok::<(), kvroute_dispatch::InvalidWorkerUrl>(())
    /// ```
    pub fn apply_replica_load(&self, report: &ReplicaLoad, now: Instant) -> ReplicaReport {
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let outcome = match replicas.by_name.get(&report.replica) {
            None => ReplicaReport::Joined,
            Some(known) if report.incarnation > known.incarnation => ReplicaReport::Restarted,
            Some(known) if report.incarnation == known.incarnation && report.seq > known.seq => {
                ReplicaReport::Applied
            }
            Some(_) => return ReplicaReport::Stale,
        };
        if report.leaving {
            let mut touched = replicas
                .by_name
                .remove(&report.replica)
                .map(|gone| gone.loads.into_keys().collect())
                .unwrap_or_default();
            self.refresh_remote(&replicas, &mut touched);
            return ReplicaReport::Left;
        }
        let replica = replicas
            .by_name
            .entry(report.replica.clone())
            .or_insert_with(|| Replica {
                incarnation: report.incarnation,
                seq: report.seq,
                last_seen: now,
                loads: HashMap::new(),
            });
        let mut touched: Vec<WorkerId> = Vec::new();
        if outcome == ReplicaReport::Restarted || report.full {
            touched.extend(replica.loads.keys().copied());
            replica.loads.clear();
        }
        replica.incarnation = report.incarnation;
        replica.seq = report.seq;
        replica.last_seen = now;
        for load in &report.workers {
            touched.push(load.worker_id);
            if *load == WorkerLoad::idle(load.worker_id) {
                replica.loads.remove(&load.worker_id);
            } else {
                replica.loads.insert(load.worker_id, *load);
            }
        }
        self.refresh_remote(&replicas, &mut touched);
        outcome
    }

    /// Forgets the replicas not heard from for `ttl` before `now` (crashed, or cut off), with
    /// their load; returns their names.
    pub fn expire_replicas(&self, now: Instant, ttl: Duration) -> Vec<String> {
        let mut replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        let mut expired = Vec::new();
        let mut touched = Vec::new();
        replicas.by_name.retain(|name, replica| {
            let alive = now.saturating_duration_since(replica.last_seen) < ttl;
            if !alive {
                expired.push(name.clone());
                touched.extend(replica.loads.keys().copied());
            }
            alive
        });
        self.refresh_remote(&replicas, &mut touched);
        expired
    }

    /// Other replicas whose load counts now.
    pub fn replica_count(&self) -> usize {
        let replicas = self.replicas.lock().unwrap_or_else(|e| e.into_inner());
        replicas.by_name.len()
    }

    /// Recomputes the other replicas' summed load on `touched` workers: sums, not running
    /// deltas, so that no sequence of reports can make them drift.
    fn refresh_remote(&self, replicas: &Replicas, touched: &mut Vec<WorkerId>) {
        if touched.is_empty() {
            return;
        }
        touched.sort_unstable();
        touched.dedup();
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        let touched = |w: &&Arc<WorkerState>| touched.binary_search(&w.worker.id).is_ok();
        for state in workers.iter().filter(touched) {
            state.remote.set(replicas.total(state.worker.id));
        }
    }

    /// Every worker with its load and health.
    pub fn status(&self, now: Instant) -> Vec<WorkerStatus> {
        let workers = self.workers.read().unwrap_or_else(|e| e.into_inner());
        workers
            .iter()
            .map(|state| {
                let breaker = state.breaker.lock().unwrap_or_else(|e| e.into_inner());
                WorkerStatus {
                    worker: state.worker.clone(),
                    active_requests: state.active_requests.load(Ordering::Relaxed),
                    pending_prefill_blocks: state.pending_prefill_blocks.load(Ordering::Relaxed),
                    active_blocks: state.active_blocks.load(Ordering::Relaxed),
                    available: breaker.open_until.is_none_or(|until| now >= until),
                    consecutive_failures: breaker.consecutive_failures,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_guards_count_and_uncount() {
        let registry = Registry::new(BreakerConfig::default());
        registry.upsert(Worker::new(WorkerId(1), "http://a/").unwrap());
        let now = Instant::now();
        let worker = registry.eligible(now).remove(0);
        assert_eq!(worker.worker().url, "http://a");
        let load = |w: &Eligible| {
            let c = w.candidate(0);
            (c.active_requests, c.pending_prefill_blocks, c.active_blocks)
        };
        // 8 prompt blocks, 3 of them cached there.
        let row = crate::decide(
            8,
            [worker.candidate(3)],
            &crate::CostConfig::default(),
            &mut crate::TieBreaker::with_seed(1),
        )
        .unwrap()
        .table[0];
        let mut guard = worker.start_request(&row);
        assert_eq!(load(&worker), (1, 5, 8));
        guard.prefill_done();
        assert_eq!(load(&worker), (1, 0, 8));
        drop(guard);
        assert_eq!(load(&worker), (0, 0, 0));
    }

    #[test]
    fn the_breaker_opens_after_repeated_failures_and_allows_a_trial_after_cooldown() {
        let registry = Registry::new(BreakerConfig {
            failure_threshold: 2,
            cooldown: Duration::from_secs(10),
        });
        registry.upsert(Worker::new(WorkerId(1), "http://a").unwrap());
        let t0 = Instant::now();
        assert!(!registry.record_failure(WorkerId(1), t0));
        assert!(registry.record_failure(WorkerId(1), t0));
        assert!(registry.eligible(t0).is_empty());
        let later = t0 + Duration::from_secs(11);
        assert_eq!(registry.eligible(later).len(), 1);
        // The trial fails: out again at once.
        assert!(registry.record_failure(WorkerId(1), later));
        assert!(registry.eligible(later).is_empty());
        registry.record_success(WorkerId(1));
        assert_eq!(registry.eligible(later).len(), 1);
    }

    /// Other replicas' load, against a reference model: per replica its newest incarnation's
    /// latest report, full reports replacing, partial ones updating, silent ones expiring.
    mod replicas {
        use super::*;
        use proptest::prelude::*;

        #[derive(Debug, Clone)]
        enum Op {
            Report {
                replica: u8,
                incarnation: u64,
                seq: u64,
                full: bool,
                leaving: bool,
                loads: Vec<(u64, u64)>,
            },
            Expire {
                after_secs: u64,
            },
            Upsert(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                6 => (0u8..3, 0u64..3, 0u64..6, any::<bool>(), proptest::bool::weighted(0.15), proptest::collection::vec((1u64..5, 0u64..4), 0..4))
                    .prop_map(|(replica, incarnation, seq, full, leaving, loads)| Op::Report { replica, incarnation, seq, full, leaving, loads }),
                1 => (0u64..4).prop_map(|after_secs| Op::Expire { after_secs }),
                1 => (1u64..5).prop_map(Op::Upsert),
            ]
        }

        proptest! {
            #[test]
            fn remote_load_matches_a_reference_model(ops in proptest::collection::vec(op(), 1..40)) {
                let registry = Registry::default();
                for id in 1..=3 {
                    registry.upsert(Worker::new(WorkerId(id), "http://a").unwrap());
                }
                let t0 = Instant::now();
                let mut clock = 0u64;
                // name -> (incarnation, seq, last seen (s), worker -> requests)
                let mut model: HashMap<u8, (u64, u64, u64, HashMap<u64, u64>)> = HashMap::new();
                for op in ops {
                    clock += 1;
                    let now = t0 + Duration::from_secs(clock);
                    match op {
                        Op::Report { replica, incarnation, seq, full, leaving, loads } => {
                            let workers = loads.iter().map(|&(w, r)| WorkerLoad::idle(WorkerId(w)).with(r, 2 * r, 3 * r)).collect();
                            let mut report = ReplicaLoad::new(format!("r{replica}"), incarnation, seq).with_workers(workers);
                            report.full = full;
                            report.leaving = leaving;
                            let outcome = registry.apply_replica_load(&report, now);
                            let expected = match model.get(&replica) {
                                None => ReplicaReport::Joined,
                                Some(&(i, _, _, _)) if incarnation > i => ReplicaReport::Restarted,
                                Some(&(i, s, _, _)) if incarnation == i && seq > s => ReplicaReport::Applied,
                                Some(_) => ReplicaReport::Stale,
                            };
                            let expected = if leaving && expected != ReplicaReport::Stale {
                                ReplicaReport::Left
                            } else {
                                expected
                            };
                            prop_assert_eq!(outcome, expected);
                            if expected == ReplicaReport::Left {
                                model.remove(&replica);
                            } else if expected != ReplicaReport::Stale {
                                let entry = model.entry(replica).or_insert((incarnation, seq, clock, HashMap::new()));
                                if full || expected == ReplicaReport::Restarted {
                                    entry.3.clear();
                                }
                                *entry = (incarnation, seq, clock, std::mem::take(&mut entry.3));
                                for (w, r) in loads {
                                    entry.3.insert(w, r);
                                }
                            }
                        }
                        Op::Expire { after_secs } => {
                            let ttl = Duration::from_secs(after_secs);
                            let mut expired = registry.expire_replicas(now, ttl);
                            expired.sort();
                            let mut gone: Vec<String> = model
                                .iter()
                                .filter(|(_, m)| clock - m.2 >= after_secs)
                                .map(|(name, _)| format!("r{name}"))
                                .collect();
                            gone.sort();
                            model.retain(|_, m| clock - m.2 < after_secs);
                            prop_assert_eq!(expired, gone);
                        }
                        Op::Upsert(id) => registry.upsert(Worker::new(WorkerId(id), "http://b").unwrap()),
                    }
                    for worker in registry.eligible(now) {
                        let id = worker.worker().id.get();
                        let requests: u64 = model.values().filter_map(|m| m.3.get(&id)).sum();
                        let load = worker.candidate(0);
                        prop_assert_eq!((load.active_requests, load.pending_prefill_blocks, load.active_blocks), (requests, 2 * requests, 3 * requests));
                    }
                    prop_assert_eq!(registry.replica_count(), model.len());
                }
            }
        }

        #[test]
        fn local_and_remote_load_add_up_and_only_local_is_reported() {
            let registry = Registry::default();
            registry.upsert(Worker::new(WorkerId(1), "http://a").unwrap());
            let now = Instant::now();
            let report = ReplicaLoad::new("other", 1, 0)
                .with_workers(vec![WorkerLoad::idle(WorkerId(1)).with(5, 7, 9)]);
            registry.apply_replica_load(&report, now);
            let worker = registry.eligible(now).remove(0);
            let row = crate::decide(
                4,
                [worker.candidate(1)],
                &crate::CostConfig::default(),
                &mut crate::TieBreaker::with_seed(1),
            )
            .unwrap()
            .table[0];
            let _guard = worker.start_request(&row);
            let load = worker.candidate(0);
            assert_eq!(
                (
                    load.active_requests,
                    load.pending_prefill_blocks,
                    load.active_blocks
                ),
                (6, 10, 13)
            );
            assert_eq!(
                registry.local_loads(),
                [WorkerLoad::idle(WorkerId(1)).with(1, 3, 4)]
            );
        }
    }

    #[test]
    fn worker_urls_are_validated() {
        assert!(Worker::new(WorkerId(1), "http://10.0.0.1:8000").is_ok());
        for bad in ["", "10.0.0.1:8000", "https://a", "http://", "ftp://a"] {
            assert!(Worker::new(WorkerId(1), bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn upsert_replaces_and_remove_removes() {
        let registry = Registry::default();
        registry.upsert(Worker::new(WorkerId(1), "http://a").unwrap());
        registry.upsert(Worker::new(WorkerId(1), "http://b").unwrap());
        assert_eq!(registry.len(), 1);
        assert_eq!(registry.status(Instant::now())[0].worker.url, "http://b");
        assert!(registry.remove(WorkerId(1)));
        assert!(!registry.remove(WorkerId(1)));
        assert!(registry.is_empty());
    }
}
