//! The workers the router may send to, their load and their health.

use crate::{Candidate, CandidateInput};
use kvroute_protocol::WorkerId;
use serde::Serialize;
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
    active_requests: AtomicU64,
    pending_prefill_blocks: AtomicU64,
    active_blocks: AtomicU64,
    breaker: Mutex<Breaker>,
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

/// The set of workers. Cheap to clone (shared).
#[derive(Clone, Debug, Default)]
pub struct Registry {
    workers: Arc<RwLock<Vec<Arc<WorkerState>>>>,
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

    /// In-flight requests.
    pub fn active_requests(&self) -> u64 {
        self.state.active_requests.load(Ordering::Relaxed)
    }

    /// Uncached blocks of in-flight requests that are still prefilling.
    pub fn pending_prefill_blocks(&self) -> u64 {
        self.state.pending_prefill_blocks.load(Ordering::Relaxed)
    }

    /// KV blocks its in-flight requests hold (their whole prompts).
    pub fn active_blocks(&self) -> u64 {
        self.state.active_blocks.load(Ordering::Relaxed)
    }

    /// The routing input for this worker: `overlap_blocks` it holds and its live load.
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
            breaker,
        }
    }

    /// Adds a worker, or replaces the one with the same id (a restarted worker).
    pub fn upsert(&self, worker: Worker) {
        let state = Arc::new(WorkerState {
            worker,
            active_requests: AtomicU64::new(0),
            pending_prefill_blocks: AtomicU64::new(0),
            active_blocks: AtomicU64::new(0),
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
