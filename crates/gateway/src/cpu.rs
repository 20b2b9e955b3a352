//! The preprocessing budget: request parsing, chat templates, tokenization and image work run
//! on blocking threads, a bounded number at once, behind a bounded queue. The async runtime's
//! threads stay free for `/health`, `/ready`, `/metrics` and streaming, however large the
//! prompts; past the queue a request is refused at once instead of waiting.

use metrics::{counter, gauge};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;

/// Why a job did not run to completion.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum CpuError {
    /// Every thread is busy and the queue is full.
    Overloaded,
    /// The job panicked (a bug; the request gets a 500).
    Panicked,
}

/// A bounded pool over Tokio's blocking threads.
pub(crate) struct CpuPool {
    threads: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue: usize,
}

/// Counts a queued job out when it stops waiting (or its request is dropped).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let left = self.0.fetch_sub(1, Ordering::SeqCst) - 1;
        gauge!("kvroute_preprocess_queue_depth").set(left as f64);
    }
}

impl CpuPool {
    /// `threads` jobs at once, `queue` more waiting.
    pub(crate) fn new(threads: usize, queue: usize) -> Self {
        Self {
            threads: Arc::new(Semaphore::new(threads.max(1))),
            waiting: AtomicUsize::new(0),
            queue,
        }
    }

    /// Runs `job` on a blocking thread once one of the pool's slots is free.
    pub(crate) async fn run<T: Send + 'static>(
        &self,
        job: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, CpuError> {
        let slot = match Arc::clone(&self.threads).try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                let queued = self.waiting.fetch_add(1, Ordering::SeqCst);
                let waiting = Waiting(&self.waiting);
                if queued >= self.queue {
                    counter!("kvroute_preprocess_rejected_total").increment(1);
                    return Err(CpuError::Overloaded);
                }
                gauge!("kvroute_preprocess_queue_depth").set((queued + 1) as f64);
                let slot = Arc::clone(&self.threads)
                    .acquire_owned()
                    .await
                    .map_err(|_| CpuError::Overloaded)?;
                drop(waiting);
                slot
            }
        };
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            job()
        })
        .await
        .map_err(|_| CpuError::Panicked)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn past_the_queue_jobs_are_refused_at_once() {
        let pool = Arc::new(CpuPool::new(1, 1));
        let (release, released) = std::sync::mpsc::channel::<()>();
        let busy = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.run(move || released.recv().is_ok()).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let queued = tokio::spawn({
            let pool = Arc::clone(&pool);
            async move { pool.run(|| 2).await }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(pool.run(|| 3).await, Err(CpuError::Overloaded));
        release.send(()).unwrap();
        assert_eq!(busy.await.unwrap(), Ok(true));
        assert_eq!(queued.await.unwrap(), Ok(2));
        assert_eq!(pool.run(|| 4).await, Ok(4));
        assert_eq!(pool.waiting.load(Ordering::SeqCst), 0);
    }
}
