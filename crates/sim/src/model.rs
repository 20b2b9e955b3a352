//! How a simulated engine behaves, shared by the HTTP worker and replay's virtual-time workers.

use serde::Serialize;

/// How a simulated worker behaves, in real time ([`crate::SimWorker`]) or in virtual time
/// (`kvroute-replay`).
///
/// A worker admits up to `max_concurrency` requests (the rest wait in arrival order), prefills
/// admitted requests one at a time (uncached tokens only: the leading blocks its pool holds are
/// free), then decodes each admitted request independently at `decode_tokens_per_second`. Its
/// pool keeps `capacity_blocks` blocks with least-recently-used eviction ([`crate::BlockPool`])
/// and reports what it stores and evicts as KV events, as an engine does.
///
/// ```
/// use kvroute_sim::WorkerModel;
///
/// let model = WorkerModel::default().with_capacity_blocks(Some(4096)).with_speeds(5_000.0, 50.0);
/// assert_eq!(model.capacity_blocks, Some(4096));
/// assert_eq!(model.max_concurrency, 64);
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct WorkerModel {
    /// KV pool size in blocks; `None`: no eviction.
    pub capacity_blocks: Option<usize>,
    /// Prefill speed in uncached prompt tokens per second.
    pub prefill_tokens_per_second: f64,
    /// Decode speed of one request in generated tokens per second.
    pub decode_tokens_per_second: f64,
    /// Requests a worker runs at once.
    pub max_concurrency: usize,
}

impl Default for WorkerModel {
    /// No eviction, 20,000 prefill tokens/s, 100 decode tokens/s, 64 requests at once.
    fn default() -> Self {
        Self {
            capacity_blocks: None,
            prefill_tokens_per_second: 20_000.0,
            decode_tokens_per_second: 100.0,
            max_concurrency: 64,
        }
    }
}

impl WorkerModel {
    /// Sets the pool size (`None`: no eviction).
    pub fn with_capacity_blocks(mut self, blocks: Option<usize>) -> Self {
        self.capacity_blocks = blocks;
        self
    }

    /// Sets prefill and decode speeds.
    pub fn with_speeds(
        mut self,
        prefill_tokens_per_second: f64,
        decode_tokens_per_second: f64,
    ) -> Self {
        self.prefill_tokens_per_second = prefill_tokens_per_second;
        self.decode_tokens_per_second = decode_tokens_per_second;
        self
    }

    /// Sets how many requests a worker runs at once.
    pub fn with_max_concurrency(mut self, requests: usize) -> Self {
        self.max_concurrency = requests;
        self
    }

    /// Why the model cannot be simulated, if it cannot: zero concurrency, or a speed that is
    /// not a positive number (durations would be infinite or undefined).
    pub fn validate(&self) -> Result<(), InvalidModel> {
        // Infinite speeds are allowed: that step takes no time.
        let positive = |x: f64| x > 0.0;
        if self.max_concurrency == 0 {
            return Err(InvalidModel("max_concurrency must be at least 1"));
        }
        if !positive(self.prefill_tokens_per_second) || !positive(self.decode_tokens_per_second) {
            return Err(InvalidModel("speeds must be positive"));
        }
        Ok(())
    }
}

/// A [`WorkerModel`] that cannot be simulated.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid worker model: {0}")]
pub struct InvalidModel(pub &'static str);
