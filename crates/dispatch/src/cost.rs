//! The routing decision: which worker serves a request.

use kvroute_protocol::WorkerId;
use serde::Serialize;

/// Weights of the routing cost.
///
/// `cost(worker) = prefill_weight * new_blocks(worker) + load(worker)`, where `new_blocks` is
/// what the worker must prefill (`prompt_blocks - overlap_blocks`) and
/// `load = pending_prefill_blocks + decode_weight * active_requests`. Both terms are in blocks,
/// so an idle cluster routes purely on the cache while load weighs in continuously as it
/// builds up (a hot shared prefix spreads once one worker's queue costs more than recomputing
/// the prefix elsewhere).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct CostConfig {
    /// Weight of the blocks a worker would have to prefill.
    pub prefill_weight: f64,
    /// Blocks-equivalent of one in-flight request (decode work).
    pub decode_weight: f64,
    /// 0 picks the lowest cost (random among ties); above 0, samples workers with
    /// probability proportional to `exp(-cost / (temperature * prompt_blocks))`.
    pub temperature: f64,
}

impl Default for CostConfig {
    fn default() -> Self {
        Self {
            prefill_weight: 1.0,
            decode_weight: 1.0,
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

    /// Sets the softmax temperature (0: deterministic lowest cost).
    pub fn with_temperature(mut self, temperature: f64) -> Self {
        self.temperature = temperature;
        self
    }
}

/// What the router knows about one eligible worker for one request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CandidateInput {
    /// The worker.
    pub worker: WorkerId,
    /// Leading prompt blocks it holds.
    pub overlap_blocks: usize,
    /// Uncached prompt blocks of its requests that have not produced a first token yet.
    pub pending_prefill_blocks: u64,
    /// Its in-flight requests.
    pub active_requests: u64,
}

/// One row of the decision table (what the dry-run endpoint returns).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
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
pub struct Decision {
    /// Full blocks in the prompt.
    pub prompt_blocks: usize,
    /// Every eligible worker, best first (the chosen one is `table[0]`; the rest is the retry
    /// order).
    pub table: Vec<Candidate>,
}

impl Decision {
    /// The chosen worker's row.
    pub fn chosen(&self) -> Option<&Candidate> {
        self.table.first()
    }
}

/// Scores every candidate and orders them, best first. `None` when there is no candidate.
///
/// ```
/// use kvroute_dispatch::{decide, CandidateInput, CostConfig};
/// use kvroute_protocol::WorkerId;
///
/// let idle = |id, overlap| CandidateInput {
///     worker: WorkerId(id), overlap_blocks: overlap, pending_prefill_blocks: 0, active_requests: 0,
/// };
/// // An idle cluster routes on the cache.
/// let decision = decide(10, [idle(1, 2), idle(2, 8)], &CostConfig::default(), &mut fastrand::Rng::with_seed(7)).unwrap();
/// assert_eq!(decision.chosen().unwrap().worker, WorkerId(2));
/// ```
pub fn decide(
    prompt_blocks: usize,
    candidates: impl IntoIterator<Item = CandidateInput>,
    config: &CostConfig,
    rng: &mut fastrand::Rng,
) -> Option<Decision> {
    let mut table: Vec<Candidate> = candidates
        .into_iter()
        .map(|c| {
            let overlap_blocks = c.overlap_blocks.min(prompt_blocks);
            let new_blocks = prompt_blocks - overlap_blocks;
            let load =
                c.pending_prefill_blocks as f64 + config.decode_weight * c.active_requests as f64;
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
        CandidateInput {
            worker: WorkerId(id),
            overlap_blocks: overlap,
            pending_prefill_blocks: pending,
            active_requests: active,
        }
    }

    #[test]
    fn ties_are_broken_at_random_not_by_position() {
        let mut rng = fastrand::Rng::with_seed(1);
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
        let mut rng = fastrand::Rng::with_seed(2);
        // 30-block prompts sharing a 10-block prefix that only worker 1 holds.
        let pick = |active_on_1: u64, rng: &mut fastrand::Rng| {
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
        assert_eq!(pick(9, &mut rng), WorkerId(1));
        assert_eq!(pick(11, &mut rng), WorkerId(2));
    }

    #[test]
    fn the_table_is_ordered_for_retries_and_clamps_overlap() {
        let decision = decide(
            8,
            [input(1, 99, 0, 0), input(2, 4, 0, 0), input(3, 0, 2, 0)],
            &CostConfig::default(),
            &mut fastrand::Rng::with_seed(3),
        )
        .unwrap();
        let order: Vec<u64> = decision.table.iter().map(|c| c.worker.get()).collect();
        assert_eq!(order, [1, 2, 3]);
        assert_eq!(decision.table[0].overlap_blocks, 8);
        assert_eq!(decision.table[2].cost, 10.0);
        assert!(decide(8, [], &CostConfig::default(), &mut fastrand::Rng::new()).is_none());
    }

    #[test]
    fn temperature_sometimes_picks_a_worse_worker() {
        let config = CostConfig::default().with_temperature(1.0);
        let mut rng = fastrand::Rng::with_seed(4);
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
