//! Routing policies: the strategy that picks a worker, behind one trait.
//!
//! [`KvAware`] is kvroute's own policy (the cost of [`decide`]); [`RoundRobin`], [`Random`] and
//! [`LeastLoaded`] are the baselines every comparison needs, and [`KvAware::text_only`] is what
//! a router that ignores media does. Users add their own by implementing [`RoutingPolicy`].

use crate::cost::{decide, Candidate, CandidateInput, CostConfig, Decision, TieBreaker};
use kvroute_protocol::WorkerId;
use std::sync::{Arc, Mutex, MutexGuard};

/// Which block keys the caller should look prefixes up with for a policy.
///
/// A policy never sees hashes (this crate does not know about them); it only says whether the
/// overlaps it is given should come from keys that include each block's media ids, as the
/// engine's own cache does, or from keys over the text tokens alone, as routers that ignore
/// media compute them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PrefixKeys {
    /// Keys over tokens and media ids (what kvroute and the engine hash).
    #[default]
    WithMedia,
    /// Keys over tokens only: two prompts with the same text and different images look alike.
    TextOnly,
}

/// A routing strategy.
///
/// The caller gives every eligible worker's [`CandidateInput`] (overlap in blocks, load), in
/// any order; the policy returns the chosen worker's decision row (what
/// [`Eligible::start_request`](crate::Eligible::start_request) counts), or `None` when there is
/// no candidate. Policies that do not score workers return the [`decision_row`] of their pick. Policies may keep state (a round-robin cursor, a random generator) and must be
/// deterministic for a given seed so that replays can be reproduced.
///
/// ```
/// use kvroute_dispatch::{decision_row, Candidate, CandidateInput, RoutingPolicy};
/// use kvroute_protocol::WorkerId;
///
/// /// Always the worker with the smallest id.
/// struct Lowest;
///
/// impl RoutingPolicy for Lowest {
///     fn name(&self) -> &str {
///         "lowest-id"
///     }
///     fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate> {
///         let lowest = candidates.iter().min_by_key(|c| c.worker)?;
///         decision_row(prompt_blocks, *lowest)
///     }
/// }
///
/// let idle = |id| CandidateInput::idle(WorkerId(id), 0);
/// assert_eq!(Lowest.choose(4, &[idle(3), idle(2)]).unwrap().worker, WorkerId(2));
/// ```
pub trait RoutingPolicy: Send {
    /// A short name for reports (`kv-aware`, `round-robin`, ...).
    fn name(&self) -> &str;

    /// The keys the overlaps given to [`RoutingPolicy::choose`] should be computed with.
    fn prefix_keys(&self) -> PrefixKeys {
        PrefixKeys::WithMedia
    }

    /// Picks a worker for a request of `prompt_blocks` full blocks.
    fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate>;

    /// The whole decision table: the chosen worker's row first, then every other candidate in
    /// the order to fall back on (what a dry run shows and the gateway retries in). By default
    /// the others follow in the order of the default [`CostConfig`]; policies that score every
    /// candidate return their own order.
    fn decide(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Decision {
        let Some(chosen) = self.choose(prompt_blocks, candidates) else {
            return Decision::without_candidates(prompt_blocks);
        };
        let others = candidates
            .iter()
            .copied()
            .filter(|c| c.worker != chosen.worker);
        let mut table = std::iter::once(chosen).collect::<Vec<_>>();
        if let Some(rest) = decide(
            prompt_blocks,
            others,
            &CostConfig::default(),
            &mut TieBreaker::with_seed(0),
        ) {
            table.extend(rest.table);
        }
        Decision {
            prompt_blocks,
            table,
        }
    }
}

/// A policy that several tasks share and that can be replaced while they use it (a
/// configuration reload). Cheap to clone; one short lock per decision.
///
/// ```
/// use kvroute_dispatch::{CandidateInput, CostConfig, KvAware, RoundRobin, SharedPolicy};
/// use kvroute_protocol::WorkerId;
///
/// let policy = SharedPolicy::new(KvAware::new(CostConfig::default(), 1));
/// let candidates = [CandidateInput::idle(WorkerId(1), 0), CandidateInput::idle(WorkerId(2), 5)];
/// assert_eq!(policy.decide(8, &candidates).chosen().unwrap().worker, WorkerId(2));
/// policy.replace(Box::new(RoundRobin::new()));
/// assert_eq!(policy.name(), "round-robin");
/// assert_eq!(policy.decide(8, &candidates).table.len(), 2);
/// ```
#[derive(Clone)]
pub struct SharedPolicy(Arc<Mutex<Box<dyn RoutingPolicy>>>);

impl SharedPolicy {
    /// Shares `policy`.
    pub fn new(policy: impl RoutingPolicy + 'static) -> Self {
        Self::from_box(Box::new(policy))
    }

    /// Shares a boxed policy.
    pub fn from_box(policy: Box<dyn RoutingPolicy>) -> Self {
        Self(Arc::new(Mutex::new(policy)))
    }

    /// Puts `policy` in place of the current one for every later decision.
    pub fn replace(&self, policy: Box<dyn RoutingPolicy>) {
        *self.lock() = policy;
    }

    /// The current policy's name.
    pub fn name(&self) -> String {
        self.lock().name().to_owned()
    }

    /// The keys the current policy wants overlaps computed with.
    pub fn prefix_keys(&self) -> PrefixKeys {
        self.lock().prefix_keys()
    }

    fn lock(&self) -> MutexGuard<'_, Box<dyn RoutingPolicy>> {
        // A policy that panicked mid-decision left nothing half-written that later decisions
        // depend on for correctness.
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// [`RoutingPolicy::decide`] with the current policy.
    pub fn decide(&self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Decision {
        self.lock().decide(prompt_blocks, candidates)
    }
}

impl std::fmt::Debug for SharedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("SharedPolicy").field(&self.name()).finish()
    }
}

/// The decision row of one candidate scored alone under the default [`CostConfig`]: its
/// overlap (clamped to the prompt), the blocks it would prefill, its load and cost. What a
/// policy that does not score workers returns for its pick (always `Some`).
pub fn decision_row(prompt_blocks: usize, candidate: CandidateInput) -> Option<Candidate> {
    decide(
        prompt_blocks,
        [candidate],
        &CostConfig::default(),
        &mut TieBreaker::with_seed(0),
    )
    .and_then(|mut decision| decision.table.pop())
}

/// kvroute's policy: lowest [`decide`] cost, random among ties.
///
/// ```
/// use kvroute_dispatch::{CandidateInput, CostConfig, KvAware, RoutingPolicy};
/// use kvroute_protocol::WorkerId;
///
/// let mut policy = KvAware::new(CostConfig::default(), 7);
/// let worker = |id, overlap, active| CandidateInput::idle(WorkerId(id), overlap).with_active_requests(active);
/// let mut pick = |candidates: &[CandidateInput]| policy.choose(20, candidates).map(|row| row.worker);
/// // The cache wins while the load gap is smaller than the prefix credit (8 blocks at the
/// // default prefill weight of 3: 24).
/// assert_eq!(pick(&[worker(1, 8, 20), worker(2, 0, 0)]), Some(WorkerId(1)));
/// assert_eq!(pick(&[worker(1, 8, 25), worker(2, 0, 0)]), Some(WorkerId(2)));
/// ```
#[derive(Debug)]
pub struct KvAware {
    config: CostConfig,
    keys: PrefixKeys,
    ties: TieBreaker,
}

impl KvAware {
    /// The policy with `config`, ties broken by a generator seeded with `seed`.
    pub fn new(config: CostConfig, seed: u64) -> Self {
        Self {
            config,
            keys: PrefixKeys::WithMedia,
            ties: TieBreaker::with_seed(seed),
        }
    }

    /// The policy with `config`, ties broken by a generator seeded from the operating system
    /// (what a server wants: replicas do not break ties alike).
    pub fn unseeded(config: CostConfig) -> Self {
        Self {
            config,
            keys: PrefixKeys::WithMedia,
            ties: TieBreaker::new(),
        }
    }

    /// The same cost over text-only prefixes: what a KV-aware router that ignores media does.
    pub fn text_only(config: CostConfig, seed: u64) -> Self {
        Self {
            keys: PrefixKeys::TextOnly,
            ..Self::new(config, seed)
        }
    }
}

impl RoutingPolicy for KvAware {
    fn name(&self) -> &str {
        match self.keys {
            PrefixKeys::WithMedia => "kv-aware",
            PrefixKeys::TextOnly => "text-only",
        }
    }

    fn prefix_keys(&self) -> PrefixKeys {
        self.keys
    }

    fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate> {
        RoutingPolicy::decide(self, prompt_blocks, candidates)
            .chosen()
            .copied()
    }

    fn decide(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Decision {
        decide(
            prompt_blocks,
            candidates.iter().copied(),
            &self.config,
            &mut self.ties,
        )
        .unwrap_or_else(|| Decision::without_candidates(prompt_blocks))
    }
}

/// Each worker in turn, in the order of the worker ids (so the rotation does not depend on the
/// order the caller lists candidates in).
#[derive(Debug, Default)]
pub struct RoundRobin {
    last: Option<WorkerId>,
}

impl RoundRobin {
    /// A rotation starting at the lowest worker id.
    pub fn new() -> Self {
        Self::default()
    }
}

impl RoutingPolicy for RoundRobin {
    fn name(&self) -> &str {
        "round-robin"
    }

    fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate> {
        let lowest = candidates.iter().min_by_key(|c| c.worker)?;
        let next = self
            .last
            .and_then(|last| {
                candidates
                    .iter()
                    .filter(|c| c.worker > last)
                    .min_by_key(|c| c.worker)
            })
            .unwrap_or(lowest);
        self.last = Some(next.worker);
        decision_row(prompt_blocks, *next)
    }
}

/// A uniformly random worker.
#[derive(Debug)]
pub struct Random {
    rng: fastrand::Rng,
}

impl Random {
    /// Draws from a generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: fastrand::Rng::with_seed(seed),
        }
    }
}

impl RoutingPolicy for Random {
    fn name(&self) -> &str {
        "random"
    }

    fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate> {
        if candidates.is_empty() {
            return None;
        }
        let pick = candidates[self.rng.usize(..candidates.len())];
        decision_row(prompt_blocks, pick)
    }
}

/// The worker with the least load (the load term of [`CostConfig`]: blocks still prefilling
/// plus `decode_weight` per in-flight request), ignoring the cache; random among ties.
#[derive(Debug)]
pub struct LeastLoaded {
    /// kvroute's cost with no credit for cached blocks is exactly the load.
    load_only: KvAware,
}

impl LeastLoaded {
    /// Load weighed as in `config` (its prefill weight is ignored), ties broken by a generator
    /// seeded with `seed`.
    pub fn new(config: CostConfig, seed: u64) -> Self {
        Self {
            load_only: KvAware::new(config.with_prefill_weight(0.0).with_temperature(0.0), seed),
        }
    }
}

impl RoutingPolicy for LeastLoaded {
    fn name(&self) -> &str {
        "least-loaded"
    }

    fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate> {
        self.load_only.choose(prompt_blocks, candidates)
    }

    fn decide(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Decision {
        self.load_only.decide(prompt_blocks, candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: u64, overlap: usize, pending: u64, active: u64) -> CandidateInput {
        CandidateInput::idle(WorkerId(id), overlap)
            .with_pending_prefill_blocks(pending)
            .with_active_requests(active)
    }

    fn worker(row: Option<Candidate>) -> Option<WorkerId> {
        row.map(|row| row.worker)
    }

    #[test]
    fn round_robin_cycles_by_id_whatever_the_order() {
        let mut policy = RoundRobin::new();
        let candidates = [input(3, 0, 0, 0), input(1, 0, 0, 0), input(2, 9, 0, 0)];
        let picks: Vec<u64> = (0..5)
            .filter_map(|_| worker(policy.choose(4, &candidates)))
            .map(WorkerId::get)
            .collect();
        assert_eq!(picks, [1, 2, 3, 1, 2]);
        // A worker leaving does not break the rotation.
        assert_eq!(
            worker(policy.choose(4, &[input(1, 0, 0, 0), input(2, 0, 0, 0)])),
            Some(WorkerId(1))
        );
        assert_eq!(policy.choose(4, &[]), None);
        // The row is the pick's, scored alone.
        let row = RoundRobin::new().choose(4, &[input(5, 9, 2, 1)]).unwrap();
        assert_eq!(
            (row.worker, row.overlap_blocks, row.new_blocks),
            (WorkerId(5), 4, 0)
        );
        assert_eq!(row.load, 3.0);
    }

    #[test]
    fn random_is_reproducible_and_covers_every_worker() {
        let candidates: Vec<_> = (0..4).map(|id| input(id, 0, 0, 0)).collect();
        let draw = |seed| {
            let mut policy = Random::new(seed);
            (0..400)
                .filter_map(|_| worker(policy.choose(1, &candidates)))
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(5), draw(5));
        let picks = draw(5);
        for id in 0..4 {
            assert!(picks.iter().filter(|w| w.get() == id).count() > 60);
        }
        assert_eq!(Random::new(1).choose(1, &[]), None);
    }

    #[test]
    fn every_decision_table_lists_each_candidate_once_with_the_choice_first() {
        let candidates = [input(1, 0, 0, 0), input(2, 4, 0, 0), input(3, 0, 3, 0)];
        let policies: [Box<dyn RoutingPolicy>; 4] = [
            Box::new(KvAware::new(CostConfig::default(), 1)),
            Box::new(RoundRobin::new()),
            Box::new(Random::new(1)),
            Box::new(LeastLoaded::new(CostConfig::default(), 1)),
        ];
        for mut policy in policies {
            let decision = policy.decide(4, &candidates);
            let mut workers: Vec<u64> = decision.table.iter().map(|c| c.worker.get()).collect();
            assert_eq!(decision.prompt_blocks, 4);
            workers.sort_unstable();
            assert_eq!(workers, [1, 2, 3], "{}", policy.name());
            assert!(policy.decide(4, &[]).table.is_empty());
        }
        let mut round_robin = RoundRobin::new();
        assert_eq!(
            round_robin.decide(4, &candidates).table[0].worker,
            WorkerId(1)
        );
        assert_eq!(
            round_robin.decide(4, &candidates).table[0].worker,
            WorkerId(2)
        );
    }

    #[test]
    fn least_loaded_ignores_the_cache() {
        let mut policy = LeastLoaded::new(CostConfig::default(), 3);
        let candidates = [input(1, 50, 0, 2), input(2, 0, 1, 0)];
        assert_eq!(worker(policy.choose(50, &candidates)), Some(WorkerId(2)));
    }

    #[test]
    fn kv_aware_follows_the_cost_and_names_its_keys() {
        let mut policy = KvAware::new(CostConfig::default(), 3);
        assert_eq!(policy.prefix_keys(), PrefixKeys::WithMedia);
        assert_eq!(
            worker(policy.choose(10, &[input(1, 0, 0, 0), input(2, 6, 0, 0)])),
            Some(WorkerId(2))
        );
        let text = KvAware::text_only(CostConfig::default(), 3);
        assert_eq!(text.prefix_keys(), PrefixKeys::TextOnly);
        assert_eq!(text.name(), "text-only");
        assert_eq!(policy.choose(10, &[]), None);
    }
}
