//! Router replicas telling each other the load they put on workers (NATS core).

use super::{subject_token, NatsError};
use futures_util::StreamExt;
use kvroute_protocol::{ProtocolError, ReplicaLoad, WorkerLoad};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where and how often router replicas exchange load reports.
///
/// Reports go over NATS core, not JetStream: each is absolute and superseded by the next, so
/// none is worth storing, and a replica that missed some catches up at the next heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReplicaSyncSettings {
    /// Reports go to `{subject_prefix}.{namespace}.{component}`.
    pub subject_prefix: String,
    /// The deployment's namespace (percent-encoded into one subject token).
    pub namespace: String,
    /// The component (model pool) inside the namespace.
    pub component: String,
    /// How often a replica sends the loads that changed: the others see its decisions at most
    /// this much late (plus the network).
    pub interval: Duration,
    /// How often a replica sends all its loads even if nothing changed (its heartbeat).
    pub heartbeat: Duration,
    /// A replica not heard from for this long no longer counts (crashed or cut off).
    pub expiry: Duration,
}

impl Default for ReplicaSyncSettings {
    /// 10 ms between reports, a 1 s heartbeat, expiry after 3 s of silence.
    fn default() -> Self {
        Self {
            subject_prefix: "kvroute.replica_load".into(),
            namespace: "default".into(),
            component: "backend".into(),
            interval: Duration::from_millis(10),
            heartbeat: Duration::from_secs(1),
            expiry: Duration::from_secs(3),
        }
    }
}

impl ReplicaSyncSettings {
    /// These settings for `namespace` and `component`.
    pub fn for_component(mut self, namespace: &str, component: &str) -> Self {
        self.namespace = namespace.into();
        self.component = component.into();
        self
    }

    /// Sets the report interval, heartbeat and expiry.
    pub fn with_timing(
        mut self,
        interval: Duration,
        heartbeat: Duration,
        expiry: Duration,
    ) -> Self {
        self.interval = interval;
        self.heartbeat = heartbeat;
        self.expiry = expiry;
        self
    }

    /// The subject reports go to.
    pub fn subject(&self) -> String {
        format!(
            "{}.{}.{}",
            self.subject_prefix,
            subject_token(&self.namespace),
            subject_token(&self.component)
        )
    }
}

/// Joins the replicas of `settings`' component as `replica` (a name unique among them), in a
/// new incarnation (the wall clock in nanoseconds): returns the sending half and the receiving
/// half, which skips this replica's own reports.
///
/// ```no_run
/// use kvroute_events::{connect, join_replicas, ReplicaSyncSettings};
/// use kvroute_protocol::{WorkerId, WorkerLoad};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let client = connect("nats://127.0.0.1:4222").await?;
/// let (mut sender, mut receiver) =
///     join_replicas(client, &ReplicaSyncSettings::default(), "gw-a").await?;
/// sender.send(vec![WorkerLoad::idle(WorkerId(1)).with(2, 16, 40)], true).await?;
/// while let Some(report) = receiver.next().await {
///     println!("{:?}", report?);
/// }
/// # Ok(())
/// # }
/// ```
pub async fn join_replicas(
    client: async_nats::Client,
    settings: &ReplicaSyncSettings,
    replica: impl Into<String>,
) -> Result<(ReplicaLoadSender, ReplicaLoadReceiver), NatsError> {
    let subject = settings.subject();
    let subscriber = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| NatsError::Subscribe {
            subject: subject.clone(),
            source: e.into(),
        })?;
    let replica = replica.into();
    let incarnation = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let sender = ReplicaLoadSender {
        client,
        subject,
        replica: replica.clone(),
        incarnation,
        seq: 0,
    };
    let receiver = ReplicaLoadReceiver {
        subscriber,
        replica,
        incarnation,
    };
    Ok((sender, receiver))
}

/// Sends this replica's load reports.
#[derive(Debug)]
pub struct ReplicaLoadSender {
    client: async_nats::Client,
    subject: String,
    replica: String,
    incarnation: u64,
    seq: u64,
}

/// A report that could not be sent.
#[derive(Debug, thiserror::Error)]
#[error("publishing a replica load report: {0}")]
pub struct ReplicaSendError(#[source] async_nats::Error);

impl ReplicaLoadSender {
    /// The replica's name.
    pub fn replica(&self) -> &str {
        &self.replica
    }

    /// This life's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Sends `workers`' loads; `full`: they are every worker this replica has load on.
    pub async fn send(
        &mut self,
        workers: Vec<WorkerLoad>,
        full: bool,
    ) -> Result<(), ReplicaSendError> {
        let mut report = self.next_report().with_workers(workers);
        report.full = full;
        self.publish(report).await
    }

    /// Tells the other replicas this one is stopping (they drop its load at once), and waits
    /// until the server has the report.
    pub async fn leave(mut self) -> Result<(), ReplicaSendError> {
        let report = self.next_report().full().leaving();
        self.publish(report).await?;
        self.client
            .flush()
            .await
            .map_err(|e| ReplicaSendError(e.into()))
    }

    fn next_report(&mut self) -> ReplicaLoad {
        let report = ReplicaLoad::new(self.replica.clone(), self.incarnation, self.seq);
        self.seq += 1;
        report
    }

    async fn publish(&self, report: ReplicaLoad) -> Result<(), ReplicaSendError> {
        self.client
            .publish(self.subject.clone(), report.to_json().into())
            .await
            .map_err(|e| ReplicaSendError(e.into()))
    }
}

/// Receives the other replicas' load reports.
#[derive(Debug)]
pub struct ReplicaLoadReceiver {
    subscriber: async_nats::Subscriber,
    replica: String,
    incarnation: u64,
}

impl ReplicaLoadReceiver {
    /// The next report of another replica (a malformed one is an error, and the next call
    /// goes on); `None` when the subscription ends (the client closed).
    pub async fn next(&mut self) -> Option<Result<ReplicaLoad, ProtocolError>> {
        loop {
            let message = self.subscriber.next().await?;
            match ReplicaLoad::from_json(&message.payload) {
                Ok(report)
                    if report.replica == self.replica && report.incarnation == self.incarnation => {
                }
                other => return Some(other),
            }
        }
    }
}
