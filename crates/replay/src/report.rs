//! What a replay measured.

use crate::sim::ReplayConfig;
use crate::workload::{ratio, Workload};
use kvroute_dispatch::PrefixKeys;
use kvroute_protocol::WorkerId;
use serde::Serialize;

/// One request's fate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RequestRecord {
    /// The worker it was routed to.
    pub worker: WorkerId,
    /// Full blocks of its prompt, in the router's keys.
    pub prompt_blocks: usize,
    /// Leading blocks the router believed the worker held.
    pub predicted_blocks: usize,
    /// Leading blocks the worker really held when it started the prefill.
    pub cached_blocks: usize,
    /// Tokens the worker prefilled.
    pub prefill_tokens: u64,
    /// Time to first token, virtual microseconds.
    pub ttft_us: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct Latency {
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Largest.
    pub max: f64,
}

/// The JSON summary of one replay.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct ReplaySummary {
    /// The policy's name.
    pub policy: String,
    /// The keys the policy looked prefixes up with.
    pub prefix_keys: &'static str,
    /// Requests replayed.
    pub requests: usize,
    /// Simulated workers.
    pub workers: usize,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Each worker's pool in blocks (`null`: no eviction).
    pub capacity_blocks: Option<usize>,
    /// Arrival speed-up.
    pub speedup: f64,
    /// Router replicas taking turns on arrivals (absent from the JSON when 1).
    #[serde(skip_serializing_if = "one")]
    pub replicas: usize,
    /// How late each replica saw the others' load, in virtual milliseconds (`null`: never).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sync_delay_ms: Option<f64>,
    /// Blocks served from a worker's cache over prompt blocks.
    pub hit_rate: f64,
    /// The same for one infinite cache seeing every request.
    pub ideal_hit_rate: f64,
    /// `hit_rate / ideal_hit_rate`.
    pub fraction_of_ideal: f64,
    /// Cached tokens over prompt tokens.
    pub token_hit_rate: f64,
    /// The same for one infinite cache.
    pub ideal_token_hit_rate: f64,
    /// Time to first token (virtual milliseconds).
    pub ttft_ms: Latency,
    /// Most requests sent to one worker over the mean per worker.
    pub load_imbalance: f64,
    /// Most tokens prefilled by one worker over the mean per worker.
    pub prefill_imbalance: f64,
    /// Blocks the router predicted a worker held and it did not (summed over requests).
    pub phantom_blocks: u64,
    /// Requests with at least one phantom block.
    pub requests_with_phantom_hits: u64,
    /// Blocks the router predicted were cached.
    pub predicted_blocks: u64,
    /// Blocks that were cached.
    pub cached_blocks: u64,
    /// Full prompt blocks.
    pub prompt_blocks: u64,
    /// Virtual time from the first arrival to the last token, in seconds.
    pub virtual_seconds: f64,
    /// KV events the index skipped (should be 0: the simulated workers' events are consistent).
    pub index_skipped_events: u64,
}

fn one(n: &usize) -> bool {
    *n == 1
}

/// A replay's summary and every request's record.
#[derive(Clone, Debug, PartialEq)]
pub struct ReplayReport {
    /// The figures.
    pub summary: ReplaySummary,
    /// Per request, in arrival order.
    pub requests: Vec<RequestRecord>,
}

pub(crate) fn summarize(
    policy: &str,
    keys: PrefixKeys,
    workload: &Workload,
    config: &ReplayConfig,
    requests: Vec<RequestRecord>,
    end_us: u64,
    index_skipped_events: u64,
) -> ReplayReport {
    let block_size = u64::from(workload.block_size());
    let mut per_worker_requests = vec![0u64; config.workers];
    let mut per_worker_prefill = vec![0u64; config.workers];
    let (mut predicted, mut cached, mut phantom, mut phantom_requests) = (0u64, 0u64, 0u64, 0u64);
    let mut ttft: Vec<u64> = Vec::with_capacity(requests.len());
    for record in &requests {
        let slot = (record.worker.get() as usize).saturating_sub(1);
        if let Some(count) = per_worker_requests.get_mut(slot) {
            *count += 1;
        }
        if let Some(tokens) = per_worker_prefill.get_mut(slot) {
            *tokens += record.prefill_tokens;
        }
        predicted += record.predicted_blocks as u64;
        cached += record.cached_blocks as u64;
        let missing = record.predicted_blocks.saturating_sub(record.cached_blocks) as u64;
        phantom += missing;
        phantom_requests += u64::from(missing > 0);
        ttft.push(record.ttft_us);
    }
    let ideal = workload.ideal();
    let hit_rate = ratio(cached, ideal.prompt_blocks);
    let start_us = workload
        .requests
        .first()
        .map_or(0, |r| (r.arrival_us as f64 / config.speedup) as u64);
    let summary = ReplaySummary {
        policy: policy.to_owned(),
        prefix_keys: match keys {
            PrefixKeys::TextOnly => "text-only",
            _ => "with-media",
        },
        requests: requests.len(),
        workers: config.workers,
        block_size: workload.block_size(),
        capacity_blocks: config.model.capacity_blocks,
        speedup: config.speedup,
        replicas: 1,
        sync_delay_ms: None,
        hit_rate,
        ideal_hit_rate: ideal.hit_rate(),
        fraction_of_ideal: if ideal.reused_blocks == 0 {
            1.0
        } else {
            hit_rate / ideal.hit_rate()
        },
        token_hit_rate: ratio(cached * block_size, ideal.prompt_tokens),
        ideal_token_hit_rate: ideal.token_hit_rate(),
        ttft_ms: latency(&mut ttft),
        load_imbalance: imbalance(&per_worker_requests),
        prefill_imbalance: imbalance(&per_worker_prefill),
        phantom_blocks: phantom,
        requests_with_phantom_hits: phantom_requests,
        predicted_blocks: predicted,
        cached_blocks: cached,
        prompt_blocks: ideal.prompt_blocks,
        virtual_seconds: end_us.saturating_sub(start_us) as f64 / 1e6,
        index_skipped_events,
    };
    ReplayReport { summary, requests }
}

/// Max over mean (1 when perfectly even, 0 when nothing was counted).
fn imbalance(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let mean = total as f64 / counts.len() as f64;
    counts.iter().copied().max().unwrap_or(0) as f64 / mean
}

/// Nearest-rank percentiles of microsecond samples, in milliseconds.
fn latency(samples_us: &mut [u64]) -> Latency {
    if samples_us.is_empty() {
        return Latency::default();
    }
    samples_us.sort_unstable();
    let rank = |p: f64| {
        let index = ((p * samples_us.len() as f64).ceil() as usize).clamp(1, samples_us.len()) - 1;
        samples_us[index] as f64 / 1000.0
    };
    let sum: u64 = samples_us.iter().sum();
    Latency {
        mean: sum as f64 / samples_us.len() as f64 / 1000.0,
        p50: rank(0.50),
        p90: rank(0.90),
        p99: rank(0.99),
        max: rank(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_the_nearest_rank() {
        let mut samples: Vec<u64> = (1..=100).map(|ms| ms * 1000).collect();
        let latency = latency(&mut samples);
        assert_eq!(latency.p50, 50.0);
        assert_eq!(latency.p99, 99.0);
        assert_eq!(latency.max, 100.0);
        assert_eq!(latency.mean, 50.5);
        assert_eq!(super::latency(&mut []), Latency::default());
    }

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(imbalance(&[2, 2, 2, 2]), 1.0);
        assert_eq!(imbalance(&[8, 0, 0, 0]), 4.0);
        assert_eq!(imbalance(&[0, 0]), 0.0);
    }
}
