//! Worker registration in a NATS KV bucket: each worker keeps its [`WorkerRecord`] fresh under
//! its own key (a heartbeat), routers watch the bucket and learn who joined, who left cleanly
//! and who stopped heartbeating.
//!
//! Expiry is decided by the watcher, not by the server: nats-server 2.9 sends no marker when a
//! value ages out, so a router drops a worker whose record was not refreshed within the TTL. Only
//! time the bucket was usable counts: while the router cannot reach the bucket (disconnected, or
//! a NATS cluster re-electing the bucket's leader after a node died) workers cannot write their
//! heartbeats either, so nobody's clock runs. Before dropping a worker the router reads its key
//! from the bucket, so a watch that fell behind (its consumer lost with a node) expires no one.

use super::{backoff, escape_token, NatsError};
use async_nats::jetstream::{self, kv};
use futures_util::StreamExt;
use kvroute_protocol::{WorkerId, WorkerRecord};
use metrics::{counter, gauge};
use std::collections::HashMap;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Where workers register and how long a registration lives without a heartbeat.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MembershipSettings {
    /// The KV bucket (shared by every namespace and component).
    pub bucket: String,
    /// Keys are `{key_prefix}.{worker_id}`; routers watch `{key_prefix}.>`.
    pub key_prefix: String,
    /// A worker not heard from for this long is dropped. Workers refresh their record every
    /// third of it; the bucket keeps values this long.
    pub ttl: Duration,
    /// Replicas of the bucket in a NATS cluster.
    pub replicas: usize,
}

impl Default for MembershipSettings {
    fn default() -> Self {
        Self {
            bucket: "kvroute-workers".into(),
            key_prefix: "default.backend".into(),
            ttl: Duration::from_secs(10),
            replicas: 1,
        }
    }
}

impl MembershipSettings {
    /// Keys for the workers of `component` in `namespace` (any strings: bytes KV keys cannot
    /// hold are escaped).
    pub fn for_component(mut self, namespace: &str, component: &str) -> Self {
        self.key_prefix = format!("{}.{}", key_token(namespace), key_token(component));
        self
    }

    /// Sets the registration TTL (at least one second).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_secs(1));
        self
    }

    /// The key of `worker_id`'s record.
    pub fn key(&self, worker_id: WorkerId) -> String {
        format!("{}.{}", self.key_prefix, worker_id.get())
    }

    fn heartbeat_interval(&self) -> Duration {
        self.ttl / 3
    }

    /// After a failed heartbeat: soon, so that a bucket back from a leader election sees the
    /// record again well within the TTL.
    fn heartbeat_retry(&self) -> Duration {
        self.heartbeat_interval() / 4
    }
}

/// One KV key token from any string: KV keys cannot hold `%`, so bytes outside
/// `[A-Za-z0-9_-]` become `=XX`.
fn key_token(name: &str) -> String {
    escape_token(name, '=')
}

/// Opens the registration bucket, creating it when absent (an existing bucket is used as is).
pub async fn ensure_bucket(
    js: &jetstream::Context,
    settings: &MembershipSettings,
) -> Result<kv::Store, NatsError> {
    let error = |source: async_nats::Error| NatsError::Bucket {
        bucket: settings.bucket.clone(),
        source,
    };
    if let Ok(store) = js.get_key_value(&settings.bucket).await {
        return Ok(store);
    }
    // The bucket's stream, by the KV conventions. `Context::create_key_value` would build the
    // same, but it first reads the account info, which async-nats 0.49 cannot parse from
    // nats-server 2.9.
    let config = jetstream::stream::Config {
        name: format!("KV_{}", settings.bucket),
        description: Some("kvroute worker registrations".into()),
        subjects: vec![format!("$KV.{}.>", settings.bucket)],
        max_messages_per_subject: 1,
        max_age: settings.ttl,
        num_replicas: settings.replicas.max(1),
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: jetstream::stream::DiscardPolicy::New,
        ..Default::default()
    };
    if let Err(create_error) = js.create_stream(config).await {
        // Another process may have created it between our lookup and our create.
        return js
            .get_key_value(&settings.bucket)
            .await
            .map_err(|_| error(create_error.into()));
    }
    js.get_key_value(&settings.bucket)
        .await
        .map_err(|e| error(e.into()))
}

/// A worker's registration, refreshed in the background until [`Registration::deregister`].
///
/// Dropping it without deregistering stops the heartbeat and leaves the record to expire, as
/// a crash would.
#[derive(Debug)]
pub struct Registration {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Registration {
    /// Writes `record` under its key, then keeps it fresh every third of the TTL. Fails when
    /// the first write does (routers would never see the worker).
    pub async fn start(
        store: kv::Store,
        settings: &MembershipSettings,
        record: &WorkerRecord,
    ) -> Result<Self, NatsError> {
        let key = settings.key(record.worker_id);
        let value = bytes::Bytes::from(record.to_json());
        store
            .put(&key, value.clone())
            .await
            .map_err(|source| NatsError::Bucket {
                bucket: settings.bucket.clone(),
                source: source.into(),
            })?;
        let (stop, mut stopped) = watch::channel(false);
        let (interval, retry) = (settings.heartbeat_interval(), settings.heartbeat_retry());
        let task = tokio::spawn(async move {
            let mut failing = false;
            loop {
                tokio::select! {
                    _ = stopped.changed() => break,
                    () = tokio::time::sleep(if failing { retry } else { interval }) => {}
                }
                match store.put(&key, value.clone()).await {
                    Ok(_) => {
                        if failing {
                            tracing::info!(%key, "registration heartbeat resumed");
                        }
                        failing = false;
                    }
                    Err(error) => {
                        counter!("kvroute_registration_heartbeat_failures_total").increment(1);
                        if !failing {
                            tracing::warn!(%key, %error, "registration heartbeat failed; retrying");
                        }
                        failing = true;
                    }
                }
            }
            if let Err(error) = store.delete(&key).await {
                tracing::warn!(%key, %error, "deregistering failed; the record will expire");
            }
        });
        Ok(Self {
            stop,
            task: Some(task),
        })
    }

    /// Deletes the record so routers drop the worker at once, and stops the heartbeat.
    pub async fn deregister(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A change in the set of registered workers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum MembershipChange {
    /// A worker registered, or changed its record (a new URL after a restart).
    Joined(WorkerRecord),
    /// A worker left.
    Left {
        /// The worker.
        worker_id: WorkerId,
        /// Why.
        reason: LeftReason,
    },
}

/// Why a worker left.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum LeftReason {
    /// It deleted its record (clean shutdown).
    Deregistered,
    /// Its record was not refreshed within the TTL (crash, hang, partition).
    Expired,
}

impl LeftReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::Deregistered => "deregistered",
            Self::Expired => "expired",
        }
    }
}

/// Watches the registrations under `settings.key_prefix` and sends every change, starting with
/// one [`MembershipChange::Joined`] per worker registered now. The task survives NATS restarts
/// and failovers (it re-creates its watch) and ends when the receiver is dropped.
///
/// A worker expires once its record has gone a TTL without a refresh while the bucket was
/// usable, and a read of its key confirms it: see the module documentation.
pub fn watch_members(
    client: async_nats::Client,
    store: kv::Store,
    settings: &MembershipSettings,
) -> mpsc::Receiver<MembershipChange> {
    let (tx, rx) = mpsc::channel(256);
    let members = Members {
        filter: format!("{}.>", settings.key_prefix),
        ttl: settings.ttl,
        known: HashMap::new(),
        keys: HashMap::new(),
        malformed_logged: false,
    };
    tokio::spawn(members.run(client, store, tx));
    rx
}

/// A registered worker as a router last saw it.
struct Member {
    record: WorkerRecord,
    /// The bucket revision of the record last seen (a heartbeat is a new revision).
    revision: u64,
    /// When it was last seen, or when the clock was last held (bucket unusable).
    seen: Instant,
}

/// What a sweep read from the bucket: `None` when the bucket could not be read (no NATS
/// connection, no stream leader, a timeout); else the current entry of each key due to expire.
type BucketRead = Option<Vec<(WorkerId, Option<kv::Entry>)>>;

struct Members {
    filter: String,
    ttl: Duration,
    known: HashMap<WorkerId, Member>,
    keys: HashMap<String, WorkerId>,
    malformed_logged: bool,
}

impl Members {
    async fn run(
        mut self,
        client: async_nats::Client,
        store: kv::Store,
        tx: mpsc::Sender<MembershipChange>,
    ) {
        let mut delay = Duration::from_millis(100);
        let mut sweep = tokio::time::interval(self.ttl / 4);
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut watch = tokio::select! {
                () = tx.closed() => return,
                watch = store.watch_with_history(&self.filter) => match watch {
                    Ok(watch) => watch,
                    Err(error) => {
                        tracing::warn!(filter = %self.filter, %error, "watching registrations failed; retrying");
                        // Unwatched is not unheard: hold the clocks until the watch is back.
                        self.hold(Instant::now());
                        delay = backoff(delay, Duration::from_secs(2)).await;
                        continue;
                    }
                },
            };
            delay = Duration::from_millis(100);
            loop {
                let changes = tokio::select! {
                    () = tx.closed() => return,
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => self.apply(&entry, Instant::now()),
                        Some(Err(error)) => {
                            tracing::warn!(%error, "registration watch failed; re-creating it");
                            break;
                        }
                        None => break,
                    },
                    _ = sweep.tick() => {
                        let now = Instant::now();
                        let read = self.read(&client, &store, now).await;
                        self.sweep(now, read)
                    }
                };
                for change in changes {
                    if tx.send(change).await.is_err() {
                        return;
                    }
                }
                gauge!("kvroute_workers_registered").set(self.known.len() as f64);
            }
        }
    }

    fn apply(&mut self, entry: &kv::Entry, now: Instant) -> Vec<MembershipChange> {
        match entry.operation {
            kv::Operation::Put => {
                let record = match WorkerRecord::from_json(&entry.value) {
                    Ok(record) => record,
                    Err(error) => {
                        counter!("kvroute_registration_malformed_total").increment(1);
                        if !std::mem::replace(&mut self.malformed_logged, true) {
                            tracing::warn!(key = %entry.key, %error, "ignoring a malformed worker record (logged once)");
                        }
                        return Vec::new();
                    }
                };
                let id = record.worker_id;
                self.keys.insert(entry.key.clone(), id);
                let changed = self
                    .known
                    .get(&id)
                    .is_none_or(|known| known.record != record);
                let member = Member {
                    record: record.clone(),
                    revision: entry.revision,
                    seen: now,
                };
                self.known.insert(id, member);
                if changed {
                    counter!("kvroute_membership_changes_total", "change" => "joined").increment(1);
                    vec![MembershipChange::Joined(record)]
                } else {
                    Vec::new()
                }
            }
            kv::Operation::Delete | kv::Operation::Purge => self
                .keys
                .remove(&entry.key)
                .and_then(|id| self.leave(id, LeftReason::Deregistered))
                .into_iter()
                .collect(),
        }
    }

    /// The workers not seen for longer than the TTL, with their keys.
    fn due(&self, now: Instant) -> Vec<(WorkerId, String)> {
        self.keys
            .iter()
            .filter(|(_, id)| {
                self.known
                    .get(id)
                    .is_some_and(|member| now.duration_since(member.seen) > self.ttl)
            })
            .map(|(key, id)| (*id, key.clone()))
            .collect()
    }

    /// Asks the bucket whether it is usable and reads the keys of the workers due to expire,
    /// both from the bucket stream's leader (the workers' heartbeats need that leader; a
    /// follower could answer from behind). Gives up after a quarter of the TTL (at least 1 s):
    /// a bucket that slow counts as unusable.
    async fn read(
        &self,
        client: &async_nats::Client,
        store: &kv::Store,
        now: Instant,
    ) -> BucketRead {
        if self.known.is_empty() {
            return Some(Vec::new());
        }
        if client.connection_state() != async_nats::connection::State::Connected {
            return None;
        }
        let due = self.due(now);
        let read = async {
            if due.is_empty() {
                store.stream.clone().info().await.ok()?;
            }
            // All at once: read one by one, many due workers on a slow link would outlast the
            // timeout and so never expire.
            let reads = due
                .into_iter()
                .map(|(id, key)| async move { Some((id, latest(store, key).await?)) });
            futures_util::future::join_all(reads)
                .await
                .into_iter()
                .collect::<Option<Vec<_>>>()
        };
        tokio::time::timeout(self.read_timeout(), read)
            .await
            .ok()
            .flatten()
    }

    /// Applies what `read` found. An unusable bucket holds every clock (no heartbeat could be
    /// written); a key that has a newer revision than the watch delivered is a heartbeat the
    /// watch missed; any other worker due leaves.
    fn sweep(&mut self, now: Instant, read: BucketRead) -> Vec<MembershipChange> {
        let Some(entries) = read else {
            self.hold(now);
            return Vec::new();
        };
        let mut changes = Vec::new();
        for (id, entry) in entries {
            let Some(member) = self.known.get(&id) else {
                continue;
            };
            if let Some(entry) = entry.filter(|e| e.revision > member.revision) {
                if entry.operation == kv::Operation::Put {
                    counter!("kvroute_registration_watch_lagged_total").increment(1);
                }
                changes.extend(self.apply(&entry, now));
                if self.known.get(&id).is_some_and(|member| member.seen == now) {
                    continue;
                }
            }
            self.keys.retain(|_, known| *known != id);
            changes.extend(self.leave(id, LeftReason::Expired));
        }
        changes
    }

    fn read_timeout(&self) -> Duration {
        (self.ttl / 4).max(Duration::from_secs(1))
    }

    /// Counts every worker as seen `now`.
    fn hold(&mut self, now: Instant) {
        for member in self.known.values_mut() {
            member.seen = now;
        }
    }

    fn leave(&mut self, worker_id: WorkerId, reason: LeftReason) -> Option<MembershipChange> {
        self.known.remove(&worker_id)?;
        counter!("kvroute_membership_changes_total", "change" => reason.as_str()).increment(1);
        Some(MembershipChange::Left { worker_id, reason })
    }
}

/// The latest entry of `key` as the bucket stream's leader has it: `Some(None)` when the key
/// has none (never written, or aged out), `None` when the leader did not answer.
async fn latest(store: &kv::Store, key: String) -> Option<Option<kv::Entry>> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let subject = format!("{}{key}", store.prefix);
    let message = match store.stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message,
        Err(error) if error.kind() == LastRawMessageErrorKind::NoMessageFound => return Some(None),
        Err(_) => return None,
    };
    let operation = message
        .headers
        .get("KV-Operation")
        .and_then(|op| op.as_str().parse().ok())
        .unwrap_or(kv::Operation::Put);
    Some(Some(kv::Entry {
        bucket: store.name.clone(),
        key,
        value: message.payload,
        revision: message.sequence,
        delta: 0,
        created: message.time,
        operation,
        seen_current: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_what_kv_keys_cannot_hold() {
        let settings = MembershipSettings::default().for_component("prod.eu", "vl m");
        assert_eq!(settings.key(WorkerId(7)), "prod=2Eeu.vl=20m.7");
    }

    fn members() -> Members {
        Members {
            filter: "a.b.>".into(),
            ttl: Duration::from_secs(3),
            known: HashMap::new(),
            keys: HashMap::new(),
            malformed_logged: false,
        }
    }

    fn entry(key: &str, value: &str, operation: kv::Operation) -> kv::Entry {
        kv::Entry {
            bucket: "b".into(),
            key: key.into(),
            value: bytes::Bytes::copy_from_slice(value.as_bytes()),
            revision: 1,
            delta: 0,
            created: time::OffsetDateTime::UNIX_EPOCH,
            operation,
            seen_current: true,
        }
    }

    #[test]
    fn heartbeats_are_silent_changes_and_leaves_are_reported() {
        let mut members = members();
        let t0 = Instant::now();
        let put = |url: &str| {
            entry(
                "a.b.1",
                &WorkerRecord::new(WorkerId(1), url).to_json(),
                kv::Operation::Put,
            )
        };
        assert!(matches!(
            members.apply(&put("http://x:1"), t0)[..],
            [MembershipChange::Joined(_)]
        ));
        assert!(members.apply(&put("http://x:1"), t0).is_empty());
        assert!(matches!(
            members.apply(&put("http://x:2"), t0)[..],
            [MembershipChange::Joined(_)]
        ));
        assert!(members
            .apply(&entry("a.b.9", "not json", kv::Operation::Put), t0)
            .is_empty());
        assert_eq!(
            members.apply(&entry("a.b.1", "", kv::Operation::Delete), t0),
            [MembershipChange::Left {
                worker_id: WorkerId(1),
                reason: LeftReason::Deregistered
            }]
        );
        assert!(members
            .apply(&entry("a.b.1", "", kv::Operation::Delete), t0)
            .is_empty());
    }

    #[test]
    fn silence_expires_but_not_while_the_bucket_is_unusable() {
        let mut members = members();
        let t0 = Instant::now();
        let record = WorkerRecord::new(WorkerId(2), "http://y:1").to_json();
        let put = entry("a.b.2", &record, kv::Operation::Put);
        members.apply(&put, t0);
        let late = t0 + Duration::from_secs(5);
        assert_eq!(members.due(late), [(WorkerId(2), "a.b.2".to_owned())]);
        // No leader: nobody could heartbeat, so the clock restarts.
        assert!(members.sweep(late, None).is_empty());
        assert!(members.due(late + Duration::from_secs(2)).is_empty());
        let later = late + Duration::from_secs(4);
        assert_eq!(
            members.sweep(later, Some(vec![(WorkerId(2), Some(put))])),
            [MembershipChange::Left {
                worker_id: WorkerId(2),
                reason: LeftReason::Expired
            }]
        );
        assert!(members.keys.is_empty());
    }

    #[test]
    fn a_heartbeat_the_watch_missed_is_read_from_the_bucket() {
        let mut members = members();
        let t0 = Instant::now();
        let record = WorkerRecord::new(WorkerId(3), "http://z:1").to_json();
        let mut put = entry("a.b.3", &record, kv::Operation::Put);
        members.apply(&put, t0);
        put.revision = 7;
        let late = t0 + Duration::from_secs(4);
        assert!(members
            .sweep(late, Some(vec![(WorkerId(3), Some(put.clone()))]))
            .is_empty());
        assert!(members.due(late + Duration::from_secs(2)).is_empty());
        // Aged out of the bucket: gone.
        let later = late + Duration::from_secs(4);
        assert_eq!(
            members.sweep(later, Some(vec![(WorkerId(3), None)])),
            [MembershipChange::Left {
                worker_id: WorkerId(3),
                reason: LeftReason::Expired
            }]
        );
        // A deletion the watch missed is a deregistration.
        members.apply(&put, later);
        let mut deleted = entry("a.b.3", "", kv::Operation::Delete);
        deleted.revision = 8;
        let last = later + Duration::from_secs(4);
        assert_eq!(
            members.sweep(last, Some(vec![(WorkerId(3), Some(deleted))])),
            [MembershipChange::Left {
                worker_id: WorkerId(3),
                reason: LeftReason::Deregistered
            }]
        );
        assert!(members.known.is_empty() && members.keys.is_empty());
    }
}
