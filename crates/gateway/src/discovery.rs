//! Keeping the worker registry in step with the workers that register themselves.

use kvroute_dispatch::{Registry, Worker};
use kvroute_events::{IngestControl, MembershipChange};
use kvroute_index::SharedIndex;
use metrics::counter;
use tokio::sync::mpsc;

/// Applies registration changes until `changes` ends: a worker that joins is added to
/// `registry` (or updated when its URL changed), one that leaves is removed from it and its
/// blocks from `index` (nobody will serve them). When `index` is kept by KV events, pass the
/// ingestor's [`IngestControl`] as `ingest`: the blocks are then dropped by the ingestor, in
/// the stream's order, which also forgets the worker's event order, so that a worker coming
/// back with its cache (after a partition) is asked for its full state rather than having its
/// next events applied on top of nothing. A worker announcing another block size than
/// `block_size`, or an unusable URL, is refused: its blocks could never match the router's.
///
/// `changes` usually comes from [`kvroute_events::watch_members`].
///
/// ```
/// use kvroute_dispatch::Registry;
/// use kvroute_events::MembershipChange;
/// use kvroute_index::{Index, IndexConfig, SharedIndex};
/// use kvroute_protocol::{WorkerId, WorkerRecord};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let registry = Registry::default();
/// let index = SharedIndex::new(Index::new(IndexConfig::default()));
/// let (tx, rx) = tokio::sync::mpsc::channel(8);
/// tx.send(MembershipChange::Joined(WorkerRecord::new(WorkerId(1), "http://10.0.0.1:8000"))).await.unwrap();
/// tx.send(MembershipChange::Joined(
///     WorkerRecord::new(WorkerId(2), "http://10.0.0.2:8000").with_block_size(16),
/// )).await.unwrap();
/// drop(tx);
/// kvroute_gateway::follow_membership(rx, registry.clone(), index, None, 32).await;
/// assert_eq!(registry.len(), 1); // worker 2 hashes 16-token blocks: refused
/// # }
/// ```
pub async fn follow_membership(
    mut changes: mpsc::Receiver<MembershipChange>,
    registry: Registry,
    index: SharedIndex,
    ingest: Option<IngestControl>,
    block_size: u32,
) {
    while let Some(change) = changes.recv().await {
        match change {
            MembershipChange::Joined(record) => {
                if let Some(theirs) = record.block_size.filter(|&b| b != block_size) {
                    counter!("kvroute_registrations_refused_total", "reason" => "block_size")
                        .increment(1);
                    tracing::warn!(
                        worker = %record.worker_id,
                        theirs,
                        ours = block_size,
                        "refusing a worker with another KV block size"
                    );
                    continue;
                }
                match Worker::new(record.worker_id, record.url) {
                    Ok(worker) => {
                        tracing::info!(worker = %worker.id, url = %worker.url, "worker joined");
                        registry.upsert(worker);
                    }
                    Err(error) => {
                        counter!("kvroute_registrations_refused_total", "reason" => "url")
                            .increment(1);
                        tracing::warn!(worker = %record.worker_id, %error, "refusing a worker");
                    }
                }
            }
            MembershipChange::Left { worker_id, reason } => {
                tracing::info!(worker = %worker_id, ?reason, "worker left");
                registry.remove(worker_id);
                match &ingest {
                    Some(ingest) => ingest.forget_worker(worker_id),
                    None => index.remove_worker(worker_id),
                }
            }
            _ => {}
        }
    }
}
