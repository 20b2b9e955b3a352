//! The routing decision: which worker serves a request.

use kvroute_protocol::WorkerId;
use serde::Serialize;

/// Weights of the routing cost.
///
/// `cost(worker) = prefill_weight * new_blocks(worker) + load(worker)`, where `new_blocks` is
/// what the worker must prefill (`prompt_blocks - overlap_blocks`) and
/// `load = pending_prefill_blocks + decode_weight * active_requests + active_blocks_weight *
/// active_blocks`. Every term is in blocks, so an idle cluster routes purely on the cache while
/// load weighs in continuously as it builds up (a hot shared prefix spreads once one worker's
/// queue costs more than recomputing the prefix elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CostConfig {
    /// Weight of the blocks a worker would have to prefill.
    pub prefill_weight: f64,
    /// Blocks-equivalent of one in-flight request (decode work).
    pub decode_weight: f64,
    /// Weight of the KV blocks in-flight requests hold (their whole prompts, cached or not).
    /// 0 by default: counting every held block the way Dynamo's router does outweighs the credit
    /// for a short shared prefix and costs cache reuse on a nearly idle cluster; raise it when
    /// workers run short of KV memory rather than of compute.
    pub active_blocks_weight: f64,
    /// 0 picks the lowest cost (random among ties); above 0, samples workers with
    /// probability proportional to `exp(-cost / (temperature * prompt_blocks))`.
    pub temperature: f64,
}

impl Default for CostConfig {
    /// Prefill weight 3, decode weight 1, held blocks not counted, no temperature.
    ///
    /// A prefill weight of 3 rather than 1 is measured in docs/routing-quality.md: on
    /// Mooncake's conversation trace it keeps 0.98 of the ideal cache reuse at the trace's
    /// pace and 0.89 at 8 times its pace (against 0.95 and 0.74), with lower mean TTFT under
    /// load and TTFT within 2% when idle; it also keeps more reuse with several router replicas.
    fn default() -> Self {
        Self {
            prefill_weight: 3.0,
            decode_weight: 1.0,
            active_blocks_weight: 0.0,
            temperature: 0.0,
        }
    }
}

impl CostConfig {
    /// Sets the prefill weight.
    pub fn with_prefill_weight(mut self, weight: f64) -> Self {
        self.prefill_weight = weight;
        self
    }

    /// Sets the per-request decode weight.
    pub fn with_decode_weight(mut self, weight: f64) -> Self {
        self.decode_weight = weight;
        self
    }

    /// Sets the weight of the KV blocks held by in-flight requests.
    pub fn with_active_blocks_weight(mut self, weight: f64) -> Self {
        self.active_blocks_weight = weight;
        self
    }

    /// Sets the softmax temperature (0: deterministic lowest cost).
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = temperature;
        self
    }
}

/// What the router knows about one eligible worker for one request.
///
/// Built with [`CandidateInput::idle`] and the `with_*` setters, or from the registry with
/// [`Eligible::candidate`](crate::Eligible::candidate), which fills in the worker's live load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CandidateInput {
    /// The worker.
    pub worker: WorkerId,
    /// Leading prompt blocks it holds.
    pub overlap_blocks: usize,
    /// Uncached prompt blocks of its requests that have not produced a first token yet.
    pub pending_prefill_blocks: u64,
    /// Its in-flight requests.
    pub active_requests: u64,
    /// KV blocks its in-flight requests hold (their whole prompts).
    pub active_blocks: u64,
}

impl CandidateInput {
    /// A worker with no load that holds `overlap_blocks` leading blocks of the prompt.
    pub fn idle(worker: WorkerId, overlap_blocks: usize) -> Self {
        Self {
            worker,
            overlap_blocks,
            pending_prefill_blocks: 0,
            active_requests: 0,
            active_blocks: 0,
        }
    }

    /// Sets the uncached blocks of its requests still prefilling.
    pub fn with_pending_prefill_blocks(mut self, blocks: u64) -> Self {
        self.pending_prefill_blocks = blocks;
        self
    }

    /// Sets its in-flight requests.
    pub fn with_active_requests(mut self, requests: u64) -> Self {
        self.active_requests = requests;
        self
    }

    /// Sets the KV blocks its in-flight requests hold.
    pub fn with_active_blocks(mut self, blocks: u64) -> Self {
        self.active_blocks = blocks;
        self
    }
}

/// One row of the decision table (what the dry-run endpoint returns).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Candidate {
    /// The worker.
    pub worker: WorkerId,
    /// Leading prompt blocks it holds.
    pub overlap_blocks: usize,
    /// Blocks it would prefill.
    pub new_blocks: usize,
    /// Its load in blocks.
    pub load: f64,
    /// The cost; lowest wins.
    pub cost: f64,
}

/// A routing decision with its explanation.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct Decision {
    /// Full blocks in the prompt.
    pub prompt_blocks: usize,
    /// Every eligible worker, best first (the chosen one is `table[0]`; the rest is the retry
    /// order).
    pub table: Vec<Candidate>,
}

impl Decision {
    /// The decision when no worker is eligible: an empty table.
    pub fn without_candidates(prompt_blocks: usize) -> Self {
        Self {
            prompt_blocks,
            table: Vec::new(),
        }
    }

    /// The chosen worker's row.
    pub fn chosen(&self) -> Option<&Candidate> {
        self.table.first()
    }
}

/// The random source that breaks ties between equal costs and samples with a temperature.
/// Seeded, it makes decisions reproducible (replays, tests).
#[derive(Clone, Debug)]
pub struct TieBreaker(fastrand::Rng);

impl TieBreaker {
    /// A tie-breaker seeded from the operating system's randomness.
    pub fn new() -> Self {
        Self(fastrand::Rng::new())
    }

    /// A reproducible tie-breaker.
    pub fn with_seed(seed: u64) -> Self {
        Self(fastrand::Rng::with_seed(seed))
    }
}

impl Default for TieBreaker {
    fn default() -> Self {
        Self::new()
    }
}

/// Scores every candidate and orders them, best first. `None` when there is no candidate.
///
/// ```
/// use kvroute_dispatch::{decide, CandidateInput, CostConfig, TieBreaker};
/// use kvroute_protocol::WorkerId;
///
/// let rng = &mut TieBreaker::with_seed(7);
/// // An idle cluster routes on the cache.
/// let idle = [CandidateInput::idle(WorkerId(1), 2), CandidateInput::idle(WorkerId(2), 8)];
/// let decision = decide(10, idle, &CostConfig::default(), rng).unwrap();
/// assert_eq!(decision.chosen().unwrap().worker, WorkerId(2));
///
/// // Load weighs in: 20 blocks still prefilling on worker 2 cost more than 6 blocks to
/// // recompute elsewhere at the default prefill weight of 3 (18).
/// let busy = CandidateInput::idle(WorkerId(2), 8).with_pending_prefill_blocks(20);
/// let decision = decide(10, [CandidateInput::idle(WorkerId(1), 2), busy], &CostConfig::default(), rng).unwrap();
/// assert_eq!(decision.chosen().unwrap().worker, WorkerId(1));
/// ```
pub fn decide(
    prompt_blocks: usize,
    candidates: impl IntoIterator<Item = CandidateInput>,
    config: &CostConfig,
    ties: &mut TieBreaker,
) -> Option<Decision> {
    let rng = &mut ties.0;
    let mut table: Vec<Candidate> = candidates
        .into_iter()
        .map(|c| {
            let overlap_blocks = c.overlap_blocks.min(prompt_blocks);
            let new_blocks = prompt_blocks - overlap_blocks;
            let load = c.pending_prefill_blocks as f64
                + config.decode_weight * c.active_requests as f64
                + config.active_blocks_weight * c.active_blocks as f64;
            Candidate {
                worker: c.worker,
                overlap_blocks,
                new_blocks,
                load,
                cost: config.prefill_weight * new_blocks as f64 + load,
            }
        })
        .collect();
    if table.is_empty() {
        return None;
    }
    // Shuffle first so that the stable sort below breaks ties at random: never "first worker".
    rng.shuffle(&mut table);
    table.sort_by(|a, b| a.cost.total_cmp(&b.cost));
    if config.temperature > 0.0 {
        let chosen = sample_softmax(&table, prompt_blocks, config.temperature, rng);
        table[..=chosen].rotate_right(1);
    }
    Some(Decision {
        prompt_blocks,
        table,
    })
}

/// Index of a row drawn with probability proportional to `exp(-cost / scale)`, the scale
/// growing with the prompt so the temperature means the same for short and long prompts.
fn sample_softmax(
    table: &[Candidate],
    prompt_blocks: usize,
    temperature: f64,
    rng: &mut fastrand::Rng,
) -> usize {
    let scale = temperature * (prompt_blocks.max(1) as f64);
    let best = table[0].cost;
    let weights: Vec<f64> = table
        .iter()
        .map(|c| (-(c.cost - best) / scale).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut draw = rng.f64() * total;
    for (i, weight) in weights.iter().enumerate() {
        if draw < *weight {
            return i;
        }
        draw -= weight;
    }
    table.len() - 1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(id: u64, overlap: usize, pending: u64, active: u64) -> CandidateInput {
        CandidateInput::idle(WorkerId(id), overlap)
            .with_pending_prefill_blocks(pending)
            .with_active_requests(active)
    }

    #[test]
    fn ties_are_broken_at_random_not_by_position() {
        let mut rng = TieBreaker::with_seed(1);
        let mut wins = [0usize; 4];
        for _ in 0..4000 {
            let decision = decide(
                16,
                (0..4).map(|id| input(id, 0, 0, 0)),
                &CostConfig::default(),
                &mut rng,
            )
            .unwrap();
            wins[decision.chosen().unwrap().worker.get() as usize] += 1;
        }
        for count in wins {
            assert!((800..1200).contains(&count), "{wins:?}");
        }
    }

    #[test]
    fn load_spreads_a_hot_prefix_continuously() {
        let config = CostConfig::default();
        let mut rng = TieBreaker::with_seed(2);
        // 30-block prompts sharing a 10-block prefix that only worker 1 holds: at prefill
        // weight 3 the prefix is worth 30 in-flight requests there.
        let pick = |active_on_1: u64, rng: &mut TieBreaker| {
            decide(
                30,
                [input(1, 10, 0, active_on_1), input(2, 0, 0, 0)],
                &config,
                rng,
            )
            .unwrap()
            .chosen()
            .unwrap()
            .worker
        };
        assert_eq!(pick(0, &mut rng), WorkerId(1));
        assert_eq!(pick(29, &mut rng), WorkerId(1));
        assert_eq!(pick(31, &mut rng), WorkerId(2));
    }

    #[test]
    fn the_table_is_ordered_for_retries_and_clamps_overlap() {
        let decision = decide(
            8,
            [input(1, 99, 0, 0), input(2, 4, 0, 0), input(3, 0, 2, 0)],
            &CostConfig::default(),
            &mut TieBreaker::with_seed(3),
        )
        .unwrap();
        let order: Vec<u64> = decision.table.iter().map(|c| c.worker.get()).collect();
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(decision.table[0].overlap_blocks, 8);
        assert_eq!(decision.table[2].cost, 3.0 * 8.0 + 2.0);
        assert!(decide(8, [], &CostConfig::default(), &mut TieBreaker::new()).is_none());
    }

    #[test]
    fn held_blocks_weigh_only_when_asked() {
        let rng = &mut TieBreaker::with_seed(5);
        // Worker 1 holds 4 of 10 blocks but its requests hold 100 blocks of KV memory.
        let inputs = [input(1, 4, 0, 0).with_active_blocks(100), input(2, 0, 0, 0)];
        let chosen = |config: &CostConfig, rng: &mut TieBreaker| {
            decide(10, inputs, config, rng)
                .unwrap()
                .chosen()
                .unwrap()
                .worker
        };
        assert_eq!(chosen(&CostConfig::default(), rng), WorkerId(1));
        let memory_bound = CostConfig::default().with_active_blocks_weight(0.3);
        assert_eq!(chosen(&memory_bound, rng), WorkerId(2));
    }

    #[test]
    fn temperature_sometimes_picks_a_worse_worker() {
        let config = CostConfig::default().with_temperature(1.0);
        let mut rng = TieBreaker::with_seed(4);
        let picks: Vec<u64> = (0..200)
            .map(|_| {
                decide(
                    10,
                    [input(1, 5, 0, 0), input(2, 0, 0, 0)],
                    &config,
                    &mut rng,
                )
                .unwrap()
                .chosen()
                .unwrap()
                .worker
                .get()
            })
            .collect();
        let ones = picks.iter().filter(|&&w| w == 1).count();
        assert!(ones > 100 && ones < 200, "{ones}");
    }
}
