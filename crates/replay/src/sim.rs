//! The replay engine: requests routed by the real index and routing code to simulated
//! workers, in virtual time.

use crate::report::{summarize, ReplayReport, RequestRecord};
use crate::workload::Workload;
use kvroute_dispatch::{CandidateInput, LoadGuard, Registry, RoutingPolicy, Worker};
use kvroute_index::{Index, IndexConfig};
use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheStoredBlockData, ReplicaLoad,
    RouterEvent, SequenceHash, WorkerId, WorkerLoad,
};
use kvroute_sim::{BlockPool, WorkerModel};
use serde::Serialize;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::time::Instant;

/// A replay's cluster and clock.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ReplayConfig {
    /// Simulated workers (ids 1 to `workers`).
    pub workers: usize,
    /// Every worker's behaviour.
    pub model: WorkerModel,
    /// Arrival times are divided by this (2: the trace twice as fast).
    pub speedup: f64,
    /// With several routers ([`replay_replicas`]): how late each sees the others' load
    /// changes, in virtual microseconds (`None`: never, each knows only its own requests).
    pub sync_delay_us: Option<u64>,
}

impl Default for ReplayConfig {
    /// 16 default workers at the trace's own pace.
    fn default() -> Self {
        Self {
            workers: 16,
            model: WorkerModel::default(),
            speedup: 1.0,
            sync_delay_us: None,
        }
    }
}

impl ReplayConfig {
    /// Sets the number of workers.
    pub fn with_workers(mut self, workers: usize) -> Self {
        self.workers = workers;
        self
    }

    /// Sets the workers' behaviour.
    pub fn with_model(mut self, model: WorkerModel) -> Self {
        self.model = model;
        self
    }

    /// Sets the arrival speed-up.
    pub fn with_speedup(mut self, speedup: f64) -> Self {
        self.speedup = speedup;
        self
    }

    /// Sets how late routers see each other's load (`None`: never).
    pub fn with_sync_delay_us(mut self, delay: Option<u64>) -> Self {
        self.sync_delay_us = delay;
        self
    }
}

/// A replay that cannot run.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// Zero workers or routers, zero concurrency, or a speed or speed-up that is not a positive
    /// number.
    #[error("invalid replay configuration: {0}")]
    Config(&'static str),
    /// The policy returned no worker, or one that is not in the cluster.
    #[error("policy {policy} chose {chosen:?}, which is not one of the workers")]
    BadChoice {
        /// The policy's name.
        policy: String,
        /// What it chose.
        chosen: Option<WorkerId>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    /// A worker finished a request's prefill: first token.
    PrefillDone,
    /// A request's last token.
    Finished,
    /// A router's load report reaches the other routers.
    Sync,
}

struct InFlight {
    router: usize,
    worker: usize,
    guard: LoadGuard,
}

/// One router: its own view of the workers' load, and the policy it routes with.
struct Router<'p> {
    registry: Registry,
    policy: &'p mut dyn RoutingPolicy,
    /// Load reports sent so far.
    seq: u64,
}

#[derive(Default)]
struct SimWorker {
    pool: BlockPool,
    running: usize,
    waiting: VecDeque<usize>,
    prefill_queue: VecDeque<usize>,
    prefilling: bool,
    next_event_id: u64,
}

struct Engine<'a, 'p> {
    workload: &'a Workload,
    config: ReplayConfig,
    keys: kvroute_dispatch::PrefixKeys,
    index: Index,
    routers: Vec<Router<'p>>,
    /// Load reports in transit, by the index their `Sync` step carries: (sender, report).
    reports: Vec<Option<(usize, ReplicaLoad)>>,
    wall: Instant,
    workers: Vec<SimWorker>,
    inflight: Vec<Option<InFlight>>,
    records: Vec<RequestRecord>,
    steps: BinaryHeap<Reverse<(u64, Step, usize)>>,
    now: u64,
}

/// Replays `workload` on the cluster of `config`, routing with `policy`; `progress` is called
/// with (finished requests, total) every 1% of the way.
///
/// Routing goes through kvroute's own code: block keys are looked up in a
/// [`kvroute_index::Index`] fed by the simulated workers' KV events, and load comes from a
/// [`kvroute_dispatch::Registry`] (in-flight requests, blocks still prefilling). Time is
/// virtual: a one-hour trace replays in about a second.
///
/// ```
/// use kvroute_dispatch::{CostConfig, KvAware, RoundRobin};
/// use kvroute_replay::{replay, ReplayConfig, TraceRequest, Workload};
///
/// // Three conversations of three turns, each turn extending the previous prompt.
/// let turn = |t, conv: u64, turns: u64| TraceRequest {
///     timestamp: t,
///     input_length: 4 * turns,
///     output_length: 4,
///     hash_ids: (0..turns).map(|i| conv * 100 + i).collect(),
///     media_ids: vec![],
/// };
/// let trace: Vec<_> = (1..=3).flat_map(|n| (1..=3).map(move |c| turn(n * 1000, c, n))).collect();
/// let workload = Workload::from_trace(&trace, 4, 4)?;
/// let config = ReplayConfig::default().with_workers(2);
///
/// let ours = replay(&workload, &config, &mut KvAware::new(CostConfig::default(), 1), &mut |_, _| {})?;
/// let rr = replay(&workload, &config, &mut RoundRobin::new(), &mut |_, _| {})?;
/// assert_eq!(ours.summary.hit_rate, workload.ideal().hit_rate());
/// assert!(ours.summary.hit_rate > rr.summary.hit_rate);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn replay(
    workload: &Workload,
    config: &ReplayConfig,
    policy: &mut dyn RoutingPolicy,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ReplayReport, ReplayError> {
    run(workload, config, vec![policy], progress)
}

/// Replays `workload` as [`replay`] does, with one router replica per policy taking turns on
/// arrivals (request `i` goes through router `i % policies.len()`). Each router has its own
/// [`kvroute_dispatch::Registry`], so it knows the load of its own requests; with
/// `config.sync_delay_us` set it also receives the others' load reports
/// ([`kvroute_protocol::ReplicaLoad`], folded in by [`Registry::apply_replica_load`]) that many
/// microseconds after each change, as replicas publishing over NATS do. They share one index:
/// every replica reads the same event stream.
///
/// ```
/// use kvroute_dispatch::RoutingPolicy;
/// use kvroute_replay::{replay_replicas, PolicyName, ReplayConfig, TraceRequest, Workload};
///
/// let request = |t, ids: &[u64]| TraceRequest {
///     timestamp: t, input_length: 512 * ids.len() as u64, output_length: 20,
///     hash_ids: ids.to_vec(), media_ids: vec![],
/// };
/// let trace: Vec<_> = (0..40).map(|i| request(i * 10, &[i % 4, 100 + i])).collect();
/// let workload = Workload::from_trace(&trace, 512, 512)?;
/// let config = ReplayConfig::default().with_workers(4).with_sync_delay_us(Some(1_000));
/// let mut routers: Vec<Box<dyn RoutingPolicy>> =
///     (0..2).map(|seed| PolicyName::KvAware.build(Default::default(), seed)).collect();
/// let report = replay_replicas(&workload, &config, &mut routers, &mut |_, _| {})?;
/// assert_eq!(report.summary.replicas, 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn replay_replicas(
    workload: &Workload,
    config: &ReplayConfig,
    policies: &mut [Box<dyn RoutingPolicy>],
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ReplayReport, ReplayError> {
    let policies = policies
        .iter_mut()
        .map(|p| -> &mut dyn RoutingPolicy { p.as_mut() })
        .collect();
    run(workload, config, policies, progress)
}

fn run(
    workload: &Workload,
    config: &ReplayConfig,
    policies: Vec<&mut dyn RoutingPolicy>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ReplayReport, ReplayError> {
    validate(config)?;
    let Some(first) = policies.first() else {
        return Err(ReplayError::Config("at least one router is needed"));
    };
    let (name, keys) = (first.name().to_owned(), first.prefix_keys());
    let replicas = policies.len();
    let mut routers = Vec::with_capacity(replicas);
    for policy in policies {
        let registry = Registry::default();
        for id in 1..=config.workers as u64 {
            let worker = Worker::new(WorkerId(id), format!("http://sim-worker-{id}"))
                .map_err(|_| ReplayError::Config("worker ids"))?;
            registry.upsert(worker);
        }
        routers.push(Router {
            registry,
            policy,
            seq: 0,
        });
    }
    let mut engine = Engine {
        workload,
        config: *config,
        keys,
        index: Index::new(IndexConfig::default()),
        routers,
        reports: Vec::new(),
        wall: Instant::now(),
        workers: (0..config.workers)
            .map(|_| SimWorker {
                pool: BlockPool::new(config.model.capacity_blocks),
                ..SimWorker::default()
            })
            .collect(),
        inflight: (0..workload.len()).map(|_| None).collect(),
        records: vec![RequestRecord::default(); workload.len()],
        steps: BinaryHeap::new(),
        now: 0,
    };
    let total = workload.len();
    let tick = (total / 100).max(1);
    let mut finished = 0;
    let mut next = 0;
    while finished < total {
        let arrival = workload
            .requests
            .get(next)
            .map(|r| (r.arrival_us as f64 / config.speedup) as u64);
        let step = engine.steps.peek().map(|Reverse(s)| *s);
        match (arrival, step) {
            // Steps due at the same time as an arrival go first (a finished request frees
            // its slot before the next one is routed).
            (Some(at), Some((time, ..))) if at < time => {
                engine.now = at;
                engine.route(next)?;
                next += 1;
            }
            (Some(at), None) => {
                engine.now = at;
                engine.route(next)?;
                next += 1;
            }
            (_, Some((time, kind, item))) => {
                engine.steps.pop();
                engine.now = time;
                match kind {
                    Step::PrefillDone => engine.prefill_done(item),
                    Step::Finished => {
                        engine.finish(item);
                        finished += 1;
                        if finished % tick == 0 || finished == total {
                            progress(finished, total);
                        }
                    }
                    Step::Sync => engine.deliver(item),
                }
            }
            (None, None) => break,
        }
    }
    let skipped = {
        let stats = engine.index.stats();
        stats.unknown_parent + stats.invalid_stores + stats.unknown_removals
    };
    let mut report = summarize(
        &name,
        engine.keys,
        workload,
        config,
        engine.records,
        engine.now,
        skipped,
    );
    report.summary.replicas = replicas;
    report.summary.sync_delay_ms = config.sync_delay_us.map(|us| us as f64 / 1000.0);
    Ok(report)
}

fn validate(config: &ReplayConfig) -> Result<(), ReplayError> {
    if config.workers == 0 {
        return Err(ReplayError::Config("at least one worker is needed"));
    }
    config
        .model
        .validate()
        .map_err(|invalid| ReplayError::Config(invalid.0))?;
    if !(config.speedup.is_finite() && config.speedup > 0.0) {
        return Err(ReplayError::Config("speed-up must be positive"));
    }
    Ok(())
}

fn micros(amount: u64, per_second: f64) -> u64 {
    (amount as f64 * 1e6 / per_second).ceil() as u64
}

impl Engine<'_, '_> {
    fn route(&mut self, request: usize) -> Result<(), ReplayError> {
        let workload = self.workload;
        let keys = workload.requests[request].keys(self.keys);
        let overlap = self.index.find_matches(keys);
        let mut by_worker: HashMap<WorkerId, usize> = HashMap::with_capacity(overlap.workers.len());
        for matched in &overlap.workers {
            let entry = by_worker.entry(matched.worker.worker_id).or_default();
            *entry = (*entry).max(matched.matched_blocks);
        }
        let router_index = request % self.routers.len();
        let router = &mut self.routers[router_index];
        // The breaker never opens here (simulated workers do not fail); any instant will do.
        let eligible = router.registry.eligible(self.wall);
        let candidates: Vec<CandidateInput> = eligible
            .iter()
            .map(|w| w.candidate(by_worker.get(&w.worker().id).copied().unwrap_or(0)))
            .collect();
        let row = router.policy.choose(keys.len(), &candidates);
        let Some((row, target)) = row.and_then(|row| {
            eligible
                .iter()
                .find(|w| w.worker().id == row.worker)
                .map(|target| (row, target))
        }) else {
            return Err(ReplayError::BadChoice {
                policy: router.policy.name().to_owned(),
                chosen: row.map(|row| row.worker),
            });
        };
        let predicted = row.overlap_blocks.min(keys.len());
        let guard = target.start_request(&row);
        let worker = (target.worker().id.get() - 1) as usize;
        self.records[request] = RequestRecord {
            worker: target.worker().id,
            prompt_blocks: keys.len(),
            predicted_blocks: predicted,
            ..RequestRecord::default()
        };
        self.inflight[request] = Some(InFlight {
            router: router_index,
            worker,
            guard,
        });
        self.report_load(router_index, worker);
        self.workers[worker].waiting.push_back(request);
        self.advance(worker);
        Ok(())
    }

    /// Sends router `from`'s load on `worker` to the other routers, if they sync.
    fn report_load(&mut self, from: usize, worker: usize) {
        let Some(delay) = self.config.sync_delay_us else {
            return;
        };
        if self.routers.len() < 2 {
            return;
        }
        let id = WorkerId(worker as u64 + 1);
        let router = &mut self.routers[from];
        let load = router
            .registry
            .local_loads()
            .into_iter()
            .find(|load| load.worker_id == id)
            .unwrap_or(WorkerLoad::idle(id));
        let report =
            ReplicaLoad::new(format!("router-{from}"), 0, router.seq).with_workers(vec![load]);
        router.seq += 1;
        if delay == 0 {
            self.apply_report(from, &report);
        } else {
            self.reports.push(Some((from, report)));
            let item = self.reports.len() - 1;
            self.steps
                .push(Reverse((self.now + delay, Step::Sync, item)));
        }
    }

    fn deliver(&mut self, item: usize) {
        if let Some((from, report)) = self.reports.get_mut(item).and_then(Option::take) {
            self.apply_report(from, &report);
        }
    }

    fn apply_report(&self, from: usize, report: &ReplicaLoad) {
        for (i, router) in self.routers.iter().enumerate() {
            if i != from {
                router.registry.apply_replica_load(report, self.wall);
            }
        }
    }

    /// Admits waiting requests and starts the next prefill if the worker is free.
    fn advance(&mut self, worker: usize) {
        let w = &mut self.workers[worker];
        while w.running < self.config.model.max_concurrency {
            let Some(request) = w.waiting.pop_front() else {
                break;
            };
            w.running += 1;
            w.prefill_queue.push_back(request);
        }
        if w.prefilling {
            return;
        }
        let Some(request) = w.prefill_queue.pop_front() else {
            return;
        };
        let workload = self.workload;
        let keyed = &workload.requests[request];
        let cached = w.pool.lookup(&keyed.media_keys);
        let cached_tokens = cached as u64 * u64::from(workload.block_size);
        // An engine computes at least the last prompt token even when all of it is cached.
        let prefill_tokens = keyed.input_tokens.saturating_sub(cached_tokens).max(1);
        let record = &mut self.records[request];
        record.cached_blocks = cached;
        record.prefill_tokens = prefill_tokens;
        w.prefilling = true;
        let done = self.now + micros(prefill_tokens, self.config.model.prefill_tokens_per_second);
        self.steps.push(Reverse((done, Step::PrefillDone, request)));
    }

    fn prefill_done(&mut self, request: usize) {
        let Some(inflight) = self.inflight[request].as_mut() else {
            return;
        };
        inflight.guard.prefill_done();
        let (router, worker) = (inflight.router, inflight.worker);
        self.report_load(router, worker);
        let workload = self.workload;
        let keyed = &workload.requests[request];
        let record = &mut self.records[request];
        record.ttft_us = self.now - (keyed.arrival_us as f64 / self.config.speedup) as u64;
        let router_keys = keyed.keys(self.keys);
        let events = self.workers[worker]
            .pool
            .store(&keyed.media_keys, router_keys)
            .into_events(|i| router_keys.get(i).copied().map(stored_block));
        let worker_id = WorkerId(worker as u64 + 1);
        for data in events {
            self.publish(worker, worker_id, data);
        }
        let decode = keyed.output_tokens.saturating_sub(1);
        let done = self.now + micros(decode, self.config.model.decode_tokens_per_second);
        self.steps.push(Reverse((done, Step::Finished, request)));
        self.workers[worker].prefilling = false;
        self.advance(worker);
    }

    fn publish(&mut self, worker: usize, worker_id: WorkerId, data: KvCacheEventData) {
        let w = &mut self.workers[worker];
        let event = RouterEvent::new(
            worker_id,
            KvCacheEvent {
                event_id: w.next_event_id,
                data,
                dp_rank: DpRank(0),
            },
        );
        w.next_event_id += 1;
        // A skipped event is counted in the index's stats and reported in the summary.
        let _ = self.index.apply_event(&event);
    }

    fn finish(&mut self, request: usize) {
        // Dropping the guard takes the request out of the worker's load.
        if let Some(inflight) = self.inflight[request].take() {
            let (router, worker) = (inflight.router, inflight.worker);
            drop(inflight);
            self.report_load(router, worker);
            self.workers[worker].running -= 1;
            self.advance(worker);
        }
    }
}

/// A stored block as the index needs it: the index keys on sequence hashes; the content hash
/// is not used for lookups, so the sequence hash stands in for it.
fn stored_block(sequence: SequenceHash) -> KvCacheStoredBlockData {
    KvCacheStoredBlockData {
        block_hash: sequence,
        tokens_hash: BlockHash(sequence.get()),
        mm_extra_info: None,
    }
}
