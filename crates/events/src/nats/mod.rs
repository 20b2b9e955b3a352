//! NATS: connection, stream provisioning, subjects; the publisher and source live in
//! submodules.

mod consume;
mod membership;
mod publish;
mod replicas;

pub use consume::{NatsSource, NatsSourceConfig, SnapshotSettings, StreamWire};
pub use membership::{
    ensure_bucket, watch_members, LeftReason, MembershipChange, MembershipSettings, Registration,
};
pub(crate) use publish::NatsSender;
pub use publish::{NatsPublishConfig, NatsPublisher};
pub use replicas::{
    join_replicas, ReplicaLoadReceiver, ReplicaLoadSender, ReplicaSendError, ReplicaSyncSettings,
};

use async_nats::jetstream::{self, stream};
use std::time::Duration;

/// Errors setting up NATS (connecting, provisioning the stream).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NatsError {
    /// The server could not be reached or refused the connection.
    #[error("connecting to NATS: {0}")]
    Connect(#[source] async_nats::Error),
    /// The stream could not be created, read or brought to the settings.
    #[error("JetStream stream {stream}: {source}")]
    Stream {
        /// The stream's name.
        stream: String,
        /// What failed.
        #[source]
        source: async_nats::Error,
    },
    /// An existing stream is unusable for these settings and was left alone (it is never
    /// deleted: other consumers may use it).
    #[error("JetStream stream {stream} exists but {problem}; left unchanged")]
    Incompatible {
        /// The stream's name.
        stream: String,
        /// What does not fit.
        problem: String,
    },
    /// The worker registration bucket could not be opened, created or written.
    #[error("JetStream KV bucket {bucket}: {source}")]
    Bucket {
        /// The bucket's name.
        bucket: String,
        /// What failed.
        #[source]
        source: async_nats::Error,
    },
    /// Subscribing to the control subject failed.
    #[error("subscribing to {subject}: {source}")]
    Subscribe {
        /// The subject.
        subject: String,
        /// What failed.
        #[source]
        source: async_nats::Error,
    },
}

/// The event stream and its subjects. One stream serves every namespace and component; each
/// (namespace, component) has its own subjects inside it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamSettings {
    /// The JetStream stream's name.
    pub stream: String,
    /// Events go to `{subject_prefix}.{namespace}.{component}.{worker_id}`; the stream holds
    /// `{subject_prefix}.>`.
    pub subject_prefix: String,
    /// Full-state requests go (NATS core) to `{control_prefix}.{namespace}.{component}.{worker_id}`,
    /// or `.all` for every worker.
    pub control_prefix: String,
    /// The deployment's namespace (percent-encoded into one subject token).
    pub namespace: String,
    /// The component (model pool) inside the namespace (percent-encoded likewise).
    pub component: String,
    /// Messages older than this are discarded.
    pub max_age: Duration,
    /// The stream keeps at most this many bytes, discarding the oldest messages.
    pub max_bytes: i64,
    /// Replicas of the stream in a NATS cluster (1 on a single server).
    pub replicas: usize,
    /// How long the server remembers message ids to drop republished duplicates.
    pub duplicate_window: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            stream: "KVROUTE_KV_EVENTS".into(),
            subject_prefix: "kvroute.kv_events".into(),
            control_prefix: "kvroute.kv_control".into(),
            namespace: "default".into(),
            component: "backend".into(),
            max_age: Duration::from_secs(3600),
            max_bytes: 1 << 30,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
        }
    }
}

impl StreamSettings {
    /// These settings for `namespace` and `component`.
    pub fn for_component(mut self, namespace: &str, component: &str) -> Self {
        self.namespace = namespace.into();
        self.component = component.into();
        self
    }

    /// These settings with another stream name and subject prefixes (tests, side-by-side
    /// deployments).
    pub fn with_names(mut self, stream: &str, subject_prefix: &str, control_prefix: &str) -> Self {
        self.stream = stream.into();
        self.subject_prefix = subject_prefix.into();
        self.control_prefix = control_prefix.into();
        self
    }

    fn component_path(&self, prefix: &str) -> String {
        format!(
            "{prefix}.{}.{}",
            subject_token(&self.namespace),
            subject_token(&self.component)
        )
    }

    /// The subject a worker's events go to.
    pub fn event_subject(&self, worker_id: kvroute_protocol::WorkerId) -> String {
        format!("{}.{worker_id}", self.component_path(&self.subject_prefix))
    }

    /// The subjects of this component's events (a consumer filter).
    pub fn event_filter(&self) -> String {
        format!("{}.*", self.component_path(&self.subject_prefix))
    }

    /// The subject full-state requests for `worker_id` (`None`: every worker) go to.
    pub fn control_subject(&self, worker_id: Option<kvroute_protocol::WorkerId>) -> String {
        let path = self.component_path(&self.control_prefix);
        match worker_id {
            Some(worker_id) => format!("{path}.{worker_id}"),
            None => format!("{path}.all"),
        }
    }

    fn stream_config(&self) -> stream::Config {
        stream::Config {
            name: self.stream.clone(),
            subjects: vec![format!("{}.>", self.subject_prefix)],
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            storage: stream::StorageType::File,
            max_age: self.max_age,
            max_bytes: self.max_bytes,
            num_replicas: self.replicas,
            duplicate_window: self.duplicate_window,
            ..Default::default()
        }
    }
}

/// One subject token from any string, as Dynamo encodes its names: every byte outside
/// `[A-Za-z0-9_-]` becomes `%XX`.
pub fn subject_token(name: &str) -> String {
    escape_token(name, '%')
}

/// `name` with every byte outside `[A-Za-z0-9_-]` written as `{marker}XX` (hex).
pub(crate) fn escape_token(name: &str, marker: char) -> String {
    let mut out = String::with_capacity(name.len());
    for byte in name.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'_' || byte == b'-' {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("{marker}{byte:02X}"));
        }
    }
    out
}

/// Connects to `url` the way this crate expects: reconnecting forever with a short capped
/// delay, and retrying the initial connection in the background (so a process may start
/// before its NATS server). `url` may list several servers of a cluster, comma-separated
/// (`nats://n1:4222,nats://n2:4222`): any one that is up will do.
pub async fn connect(url: &str) -> Result<async_nats::Client, NatsError> {
    let servers = url
        .split(',')
        .map(|server| server.trim().parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| NatsError::Connect(e.into()))?;
    async_nats::ConnectOptions::new()
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(|attempts| {
            Duration::from_millis(50 * (attempts.min(20) as u64)).max(Duration::from_millis(50))
        })
        .connect(servers)
        .await
        .map_err(|e| NatsError::Connect(e.into()))
}

/// Creates the stream, or checks an existing one and brings its retention limits to
/// `settings` (never deleting it, never changing its storage type).
pub async fn ensure_stream(
    js: &jetstream::Context,
    settings: &StreamSettings,
) -> Result<stream::Stream, NatsError> {
    let wanted = settings.stream_config();
    let error = |source: async_nats::Error| NatsError::Stream {
        stream: settings.stream.clone(),
        source,
    };
    let mut stream = match js.get_or_create_stream(wanted.clone()).await {
        Ok(stream) => stream,
        // Several processes starting together race between the lookup and the create; the
        // loser's create fails (nats-server 2.9 says "subjects overlap"), yet the stream exists.
        Err(create_error) => match js.get_stream(&settings.stream).await {
            Ok(stream) => stream,
            Err(_) => return Err(error(create_error.into())),
        },
    };
    let current = stream
        .info()
        .await
        .map_err(|e| error(e.into()))?
        .config
        .clone();
    if current.storage != wanted.storage {
        return Err(NatsError::Incompatible {
            stream: settings.stream.clone(),
            problem: format!("uses {:?} storage", current.storage),
        });
    }
    if !current.subjects.iter().any(|s| wanted.subjects.contains(s)) {
        return Err(NatsError::Incompatible {
            stream: settings.stream.clone(),
            problem: format!("holds subjects {:?}", current.subjects),
        });
    }
    let drifted = current.max_age != wanted.max_age
        || current.max_bytes != wanted.max_bytes
        || current.duplicate_window != wanted.duplicate_window
        || current.num_replicas != wanted.num_replicas;
    if drifted {
        tracing::info!(stream = %settings.stream, "updating the stream's retention limits");
        let updated = stream::Config {
            max_age: wanted.max_age,
            max_bytes: wanted.max_bytes,
            duplicate_window: wanted.duplicate_window,
            num_replicas: wanted.num_replicas,
            ..current
        };
        js.update_stream(updated)
            .await
            .map_err(|e| error(e.into()))?;
        stream = js
            .get_stream(&settings.stream)
            .await
            .map_err(|e| error(e.into()))?;
    }
    Ok(stream)
}

/// Waits `delay` and returns the next, doubled and capped, delay.
pub(crate) async fn backoff(delay: Duration, cap: Duration) -> Duration {
    tokio::time::sleep(delay).await;
    (delay * 2).min(cap)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_protocol::WorkerId;

    #[test]
    fn subjects_encode_names_into_single_tokens() {
        assert_eq!(subject_token("my ns.v1/α"), "my%20ns%2Ev1%2F%CE%B1");
        let settings = StreamSettings::default().for_component("prod.eu", "llama");
        assert_eq!(
            settings.event_subject(WorkerId(7)),
            "kvroute.kv_events.prod%2Eeu.llama.7"
        );
        assert_eq!(
            settings.event_filter(),
            "kvroute.kv_events.prod%2Eeu.llama.*"
        );
        assert_eq!(
            settings.control_subject(None),
            "kvroute.kv_control.prod%2Eeu.llama.all"
        );
    }
}
