//! Keeping the registry's load in step with the other router replicas.

use kvroute_dispatch::{Registry, ReplicaReport};
use kvroute_events::{ReplicaLoadReceiver, ReplicaLoadSender, ReplicaSyncSettings};
use kvroute_protocol::{WorkerId, WorkerLoad};
use metrics::{counter, gauge};
use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

/// Shares this router's load with the other replicas and folds theirs into `registry`, until
/// `shutdown` completes.
///
/// Every `settings.interval` it sends the loads that changed since the last report, every
/// `settings.heartbeat` all of them, and forgets the replicas silent for `settings.expiry`
/// (their load with them). Each report received goes to
/// [`Registry::apply_replica_load`]. At shutdown it says it is leaving, so that the others
/// drop this replica's load at once rather than at expiry. Counted in
/// `kvroute_replica_reports_total{outcome}`, `kvroute_replicas_expired_total`,
/// `kvroute_replica_report_errors_total` and the `kvroute_replicas` gauge.
///
/// `sender` and `receiver` come from [`kvroute_events::join_replicas`].
///
/// ```no_run
/// use kvroute_dispatch::Registry;
/// use kvroute_events::{connect, join_replicas, ReplicaSyncSettings};
///
/// # async fn run(registry: Registry) -> Result<(), Box<dyn std::error::Error>> {
/// let settings = ReplicaSyncSettings::default().for_component("prod", "llama");
/// let (sender, receiver) = join_replicas(connect("nats://127.0.0.1:4222").await?, &settings, "gw-a").await?;
/// tokio::spawn(kvroute_gateway::sync_replicas(registry, sender, receiver, settings, std::future::pending()));
/// # Ok(())
/// # }
/// ```
pub async fn sync_replicas(
    registry: Registry,
    mut sender: ReplicaLoadSender,
    mut receiver: ReplicaLoadReceiver,
    settings: ReplicaSyncSettings,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(settings.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: HashMap<WorkerId, WorkerLoad> = HashMap::new();
    let mut next_heartbeat = Instant::now();
    let mut receiving = true;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            report = receiver.next(), if receiving => match report {
                Some(Ok(report)) => {
                    let outcome = registry.apply_replica_load(&report, Instant::now());
                    let label = match outcome {
                        ReplicaReport::Joined => {
                            tracing::info!(replica = %report.replica, "router replica joined");
                            "joined"
                        }
                        ReplicaReport::Restarted => {
                            tracing::info!(replica = %report.replica, "router replica restarted");
                            "restarted"
                        }
                        ReplicaReport::Stale => "stale",
                        ReplicaReport::Left => {
                            tracing::info!(replica = %report.replica, "router replica left");
                            "left"
                        }
                        _ => "applied",
                    };
                    counter!("kvroute_replica_reports_total", "outcome" => label).increment(1);
                }
                Some(Err(error)) => {
                    counter!("kvroute_replica_reports_total", "outcome" => "malformed").increment(1);
                    tracing::warn!(%error, "malformed replica load report");
                }
                None => {
                    tracing::warn!("replica load subscription ended; sending only");
                    receiving = false;
                }
            },
            _ = tick.tick() => {
                let now = Instant::now();
                for replica in registry.expire_replicas(now, settings.expiry) {
                    counter!("kvroute_replicas_expired_total").increment(1);
                    tracing::warn!(%replica, "router replica silent past its expiry; its load no longer counts");
                }
                gauge!("kvroute_replicas").set(registry.replica_count() as f64);
                let full = now >= next_heartbeat;
                let loads = registry.local_loads();
                let report: Vec<WorkerLoad> = if full {
                    next_heartbeat = now + settings.heartbeat;
                    loads.iter().copied().filter(|l| *l != WorkerLoad::idle(l.worker_id)).collect()
                } else {
                    let mut changed: Vec<WorkerLoad> = loads
                        .iter()
                        .copied()
                        .filter(|l| sent.get(&l.worker_id).copied().unwrap_or(WorkerLoad::idle(l.worker_id)) != *l)
                        .collect();
                    // A worker that left the registry has no load from this replica any more.
                    changed.extend(sent.keys().filter(|id| !loads.iter().any(|l| l.worker_id == **id)).map(|id| WorkerLoad::idle(*id)));
                    changed
                };
                sent = loads.into_iter().map(|l| (l.worker_id, l)).collect();
                if full || !report.is_empty() {
                    if let Err(error) = sender.send(report, full).await {
                        counter!("kvroute_replica_report_errors_total").increment(1);
                        tracing::warn!(%error, "could not send this replica's load");
                    }
                }
            }
        }
    }
    if let Err(error) = sender.leave().await {
        tracing::debug!(%error, "could not send the leaving report");
    }
}
