//! The server's one typed configuration: every setting, its default, and the TOML file form.
//!
//! `kvroute serve` and `kvroute demo` build a [`ServerConfig`] from defaults, an optional file
//! and their flags, then hand it to [`Server::builder`](crate::Server::builder). The defaults
//! live here and nowhere else; `kvroute config example` prints [`ServerConfig::example_toml`].

use kvroute_dispatch::{
    BreakerConfig, CostConfig, ForwardConfig, KvAware, LeastLoaded, Random, RoundRobin,
    RoutingPolicy, Worker,
};
use kvroute_events::{MembershipSettings, ReplicaSyncSettings, StreamSettings};
use kvroute_preprocess::{ModelFiles, PreprocessConfig, PreprocessError, Preprocessor};
use kvroute_protocol::WorkerId;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Everything a kvroute server needs to start. Every field has a default, so a file only
/// names what it changes.
///
/// ```
/// use kvroute_gateway::{EventsSource, ServerConfig};
///
/// let config = ServerConfig::from_toml_str(
///     r#"
///     listen = "127.0.0.1:9000"
///     [model]
///     block_size = 16
///     [[workers]]
///     id = 1
///     url = "http://10.0.0.5:8000"
///     [events]
///     source = "none"
///     "#,
/// )?;
/// assert_eq!(config.model.block_size, 16);
/// assert_eq!(config.events.source, EventsSource::None);
/// assert_eq!(config.nats.url, "nats://127.0.0.1:4222"); // a default
/// config.validate()?;
/// # Ok::<(), kvroute_gateway::ConfigError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Where the gateway listens.
    pub listen: SocketAddr,
    /// Seconds in-flight requests may take to finish after a shutdown signal; streams still
    /// open after it are cut.
    pub drain_timeout_secs: u64,
    /// The model served and how its prompts are tokenized.
    pub model: ModelConfig,
    /// How a worker is chosen.
    pub routing: RoutingConfig,
    /// When a failing worker is taken out of rotation.
    pub breaker: BreakerSettings,
    /// Workers known without registration (each also keeps coming from NATS discovery when
    /// that is on).
    pub workers: Vec<WorkerConfig>,
    /// Where the index's KV events come from.
    pub events: EventsConfig,
    /// The NATS deployment: event stream, worker registrations, snapshots.
    pub nats: NatsConfig,
    /// What one client can make the server hold or compute.
    pub limits: LimitsConfig,
    /// How long a worker may take.
    pub timeouts: TimeoutsConfig,
    /// API keys, tenants and what the responses reveal.
    pub auth: AuthConfig,
    /// Sharing load with the other replicas of this router (over NATS).
    pub replica_sync: ReplicaSyncConfig,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8000)),
            drain_timeout_secs: 30,
            model: ModelConfig::default(),
            routing: RoutingConfig::default(),
            breaker: BreakerSettings::default(),
            workers: Vec::new(),
            events: EventsConfig::default(),
            nats: NatsConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            auth: AuthConfig::default(),
            replica_sync: ReplicaSyncConfig::default(),
        }
    }
}

/// What one client can make the server hold or compute: connections, bytes, time, and the
/// preprocessing pool (tokenization and image work run there, off the async runtime).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct LimitsConfig {
    /// Open client connections; one more is accepted and closed at once.
    pub max_connections: usize,
    /// Largest request head (request line and headers), in bytes (at least 8192).
    pub max_header_bytes: usize,
    /// Largest request body, in bytes (base64 images make bodies large).
    pub max_body_bytes: usize,
    /// Seconds a client has to send a request's headers.
    pub header_read_timeout_secs: u64,
    /// Seconds a client has to send a request's whole body.
    pub body_read_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight and no byte moving.
    pub idle_timeout_secs: u64,
    /// Requests served on one connection before it is closed (the client reconnects).
    pub max_requests_per_connection: u64,
    /// Threads that tokenize and process images (0: one per core).
    pub preprocess_threads: usize,
    /// Requests waiting for a preprocessing thread; more are refused with 503 and
    /// `retry-after`.
    pub preprocess_queue: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_header_bytes: 64 << 10,
            max_body_bytes: 32 << 20,
            header_read_timeout_secs: 10,
            body_read_timeout_secs: 60,
            idle_timeout_secs: 75,
            max_requests_per_connection: 10_000,
            preprocess_threads: 0,
            preprocess_queue: 256,
        }
    }
}

impl LimitsConfig {
    /// The accept loop's limits.
    pub fn connection_limits(&self) -> crate::ConnectionLimits {
        crate::ConnectionLimits::default()
            .with_max_connections(self.max_connections)
            .with_max_header_bytes(self.max_header_bytes)
            .with_header_read_timeout(Duration::from_secs(self.header_read_timeout_secs))
            .with_idle_timeout(Duration::from_secs(self.idle_timeout_secs))
            .with_max_requests_per_connection(self.max_requests_per_connection)
    }

    /// Preprocessing threads: the configured number, or one per core.
    pub fn preprocess_threads(&self) -> usize {
        match self.preprocess_threads {
            0 => std::thread::available_parallelism().map_or(2, usize::from),
            threads => threads,
        }
    }
}

/// How long a worker may take. Timeouts waiting for a worker never count against its
/// circuit breaker: a long generation is slow, not broken.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct TimeoutsConfig {
    /// Milliseconds to open a TCP connection to a worker (then the next worker is tried).
    pub connect_ms: u64,
    /// Seconds to wait for a worker's response headers. A non-streaming response's headers
    /// come with the whole generation: raise this for long non-streaming generations.
    pub first_byte_secs: u64,
    /// Seconds a streamed response may stay silent (0: no limit).
    pub stream_idle_secs: u64,
    /// Seconds a whole request may take, stream included (0: no limit).
    pub total_secs: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        let forward = ForwardConfig::default();
        let secs = |timeout: Option<Duration>| timeout.map_or(0, |t| t.as_secs());
        Self {
            connect_ms: u64::try_from(forward.connect_timeout.as_millis()).unwrap_or(u64::MAX),
            first_byte_secs: forward.first_byte_timeout.as_secs(),
            stream_idle_secs: secs(forward.stream_idle_timeout),
            total_secs: secs(forward.total_timeout),
        }
    }
}

impl TimeoutsConfig {
    /// The forwarder's settings.
    pub fn forward(&self) -> ForwardConfig {
        let optional = |secs: u64| (secs > 0).then(|| Duration::from_secs(secs));
        ForwardConfig::default()
            .with_connect_timeout(Duration::from_millis(self.connect_ms))
            .with_first_byte_timeout(Duration::from_secs(self.first_byte_secs))
            .with_stream_idle_timeout(optional(self.stream_idle_secs))
            .with_total_timeout(optional(self.total_secs))
    }
}

/// API keys, tenants, and what responses reveal about the cache.
///
/// Without keys the gateway is open (for a trusted network only). With keys, every endpoint
/// but `/health` and `/ready` needs one, and `/metrics` and `/v1/route` need an admin key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct AuthConfig {
    /// Keys given in this file.
    pub keys: Vec<ApiKeyConfig>,
    /// A TOML file of more keys (`[[keys]]` tables, as here); read again on reload.
    pub keys_file: Option<PathBuf>,
    /// Send `x-kvroute-overlap-blocks` and `x-kvroute-predicted-cached-tokens`: they say
    /// whether a prompt's prefix is cached, which reveals other clients' prompts within a
    /// cache namespace. Off unless the clients trust each other (or each has its own tenant).
    pub routing_headers: bool,
}

/// One API key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct ApiKeyConfig {
    /// The bearer token clients send (`Authorization: Bearer KEY`).
    pub key: String,
    /// The tenant the key belongs to: its requests are hashed in their own cache namespace
    /// and forwarded with `cache_salt` set to it, so tenants neither share nor probe each
    /// other's cached prefixes. Keys without a tenant share the default namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// May read `/metrics` and `/v1/route`.
    #[serde(default)]
    pub admin: bool,
    /// Requests in flight at once with this key (more get 429).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent: Option<u32>,
    /// Requests per minute with this key (more get 429 with `retry-after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
}

impl std::fmt::Debug for ApiKeyConfig {
    /// Never prints the key itself (configurations are logged and printed).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyConfig")
            .field("key", &"<redacted>")
            .field("tenant", &self.tenant)
            .field("admin", &self.admin)
            .field("max_concurrent", &self.max_concurrent)
            .field("requests_per_minute", &self.requests_per_minute)
            .finish()
    }
}

impl ApiKeyConfig {
    /// A key of no tenant, not admin, without limits.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            tenant: None,
            admin: false,
            max_concurrent: None,
            requests_per_minute: None,
        }
    }

    /// An admin key.
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    /// The key's tenant.
    pub fn with_tenant(mut self, tenant: impl Into<String>) -> Self {
        self.tenant = Some(tenant.into());
        self
    }
}

/// The keys file's form.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<ApiKeyConfig>,
}

impl AuthConfig {
    /// Every key: those of this section, then the keys file's; checked (non-empty, no key
    /// twice, no empty tenant).
    pub fn load_keys(&self) -> Result<Vec<ApiKeyConfig>, ConfigError> {
        let mut keys = self.keys.clone();
        if let Some(path) = &self.keys_file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.clone(),
                source,
            })?;
            let file: KeysFile = toml::from_str(&text)?;
            keys.extend(file.keys);
        }
        let invalid = |why: String| ConfigError::Invalid {
            field: "auth.keys",
            why,
        };
        let mut seen = HashSet::new();
        for (n, key) in keys.iter().enumerate() {
            if key.key.trim().is_empty() || key.key.chars().any(char::is_whitespace) {
                return Err(invalid(format!("key {n} is empty or contains spaces")));
            }
            if !seen.insert(key.key.as_str()) {
                return Err(invalid(format!("key {n} is given twice")));
            }
            if key.tenant.as_deref().is_some_and(str::is_empty) {
                return Err(invalid(format!("key {n} has an empty tenant")));
            }
            if key.max_concurrent == Some(0) || key.requests_per_minute == Some(0) {
                return Err(invalid(format!("key {n}: limits must be at least 1")));
            }
        }
        Ok(keys)
    }
}

/// The model served.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ModelConfig {
    /// The model name served (`/v1/models`).
    pub name: String,
    /// A Hugging Face model directory (tokenizer.json, chat template, config.json); without
    /// it the bundled Qwen2-VL tokenizer and template are used.
    pub dir: Option<PathBuf>,
    /// Tokens per KV block (router and workers must agree).
    pub block_size: u32,
    /// Longest prompt accepted, in tokens after image expansion; longer ones get a 400.
    pub max_prompt_tokens: usize,
}

impl ModelConfig {
    /// The preprocessor of the model directory, or of the bundled Qwen2-VL.
    pub fn load_preprocessor(&self) -> Result<Preprocessor, PreprocessError> {
        let files = match &self.dir {
            Some(dir) => ModelFiles::from_dir(dir)?,
            None => ModelFiles::bundled_qwen2_vl()?,
        };
        let settings = PreprocessConfig::default().with_max_prompt_tokens(self.max_prompt_tokens);
        Preprocessor::new(&files, settings)
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            name: "Qwen/Qwen2-VL-2B-Instruct".to_owned(),
            dir: None,
            block_size: 32,
            max_prompt_tokens: 131_072,
        }
    }
}

/// The routing policy and the weights of kvroute's cost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct RoutingConfig {
    /// Which policy picks the worker.
    pub policy: PolicyName,
    /// Weight of the blocks a worker would have to prefill.
    pub prefill_weight: f64,
    /// Blocks-equivalent of one in-flight request.
    pub decode_weight: f64,
    /// Weight of the KV blocks in-flight requests hold (raise it when workers run short of
    /// KV memory).
    pub active_blocks_weight: f64,
    /// Softmax temperature over costs (0: always the lowest cost, ties at random).
    pub temperature: f64,
}

impl Default for RoutingConfig {
    fn default() -> Self {
        let cost = CostConfig::default();
        Self {
            policy: PolicyName::KvAware,
            prefill_weight: cost.prefill_weight,
            decode_weight: cost.decode_weight,
            active_blocks_weight: cost.active_blocks_weight,
            temperature: cost.temperature,
        }
    }
}

impl RoutingConfig {
    /// The cost weights.
    pub fn cost(&self) -> CostConfig {
        CostConfig::default()
            .with_prefill_weight(self.prefill_weight)
            .with_decode_weight(self.decode_weight)
            .with_active_blocks_weight(self.active_blocks_weight)
            .with_temperature(self.temperature)
    }

    /// A new instance of the configured built-in policy.
    pub fn policy(&self) -> Box<dyn RoutingPolicy> {
        let seed = fastrand_seed();
        match self.policy {
            PolicyName::KvAware => Box::new(KvAware::unseeded(self.cost())),
            PolicyName::TextOnly => Box::new(KvAware::text_only(self.cost(), seed)),
            PolicyName::LeastLoaded => Box::new(LeastLoaded::new(self.cost(), seed)),
            PolicyName::RoundRobin => Box::new(RoundRobin::new()),
            PolicyName::Random => Box::new(Random::new(seed)),
        }
    }
}

/// A seed that differs between processes (replicas must not break ties alike).
fn fastrand_seed() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::process::id())
}

/// The built-in routing policies.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum PolicyName {
    /// kvroute's cost: prefill blocks saved by the cache against load.
    #[default]
    KvAware,
    /// The same cost over text-only prefixes (what routers that ignore images do; for
    /// comparisons).
    TextOnly,
    /// The least loaded worker, ignoring the cache.
    LeastLoaded,
    /// Each worker in turn.
    RoundRobin,
    /// A uniformly random worker.
    Random,
}

impl PolicyName {
    /// Every policy, for help texts.
    pub const ALL: [PolicyName; 5] = [
        Self::KvAware,
        Self::TextOnly,
        Self::LeastLoaded,
        Self::RoundRobin,
        Self::Random,
    ];

    /// The name used in files and flags.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::KvAware => "kv-aware",
            Self::TextOnly => "text-only",
            Self::LeastLoaded => "least-loaded",
            Self::RoundRobin => "round-robin",
            Self::Random => "random",
        }
    }
}

impl std::str::FromStr for PolicyName {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|policy| policy.as_str() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|p| p.as_str()).collect();
                format!("unknown policy {name:?} (one of {})", names.join(", "))
            })
    }
}

/// The circuit breaker.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerSettings {
    /// Consecutive failures that take a worker out of rotation.
    pub failures: u32,
    /// Seconds a failed worker stays out of rotation before a trial request.
    pub cooldown_secs: u64,
}

impl Default for BreakerSettings {
    fn default() -> Self {
        let breaker = BreakerConfig::default();
        Self {
            failures: breaker.failure_threshold,
            cooldown_secs: breaker.cooldown.as_secs(),
        }
    }
}

impl BreakerSettings {
    /// The registry's breaker.
    pub fn breaker(&self) -> BreakerConfig {
        BreakerConfig::default()
            .with_failure_threshold(self.failures)
            .with_cooldown(Duration::from_secs(self.cooldown_secs))
    }
}

/// One statically configured worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct WorkerConfig {
    /// The id its KV events carry.
    pub id: u64,
    /// Its OpenAI base URL (`http://host:port`).
    pub url: String,
    /// With `events.source = "engines"`: the engine's own ZeroMQ KV event endpoint
    /// (`tcp://host:5557`, vLLM's and SGLang's `--kv-events-config` `endpoint`; its replay
    /// socket is expected on the next port unless `events_replay` says otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<String>,
    /// The engine's replay endpoint (`replay_endpoint`), when it is not `events`' port + 1:
    /// with several data-parallel ranks it cannot be, as rank `r` publishes on port + `r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_replay: Option<String>,
    /// The engine's data-parallel ranks (vLLM's `--data-parallel-size`, SGLang's attention DP):
    /// rank `r` publishes on `events`' port + `r` and replays on `events_replay`'s + `r`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dp_ranks: Option<u32>,
}

impl WorkerConfig {
    /// Worker `id` at `url`.
    pub fn new(id: u64, url: impl Into<String>) -> Self {
        Self {
            id,
            url: url.into(),
            events: None,
            events_replay: None,
            dp_ranks: None,
        }
    }

    /// This worker with its engine's KV event endpoint.
    pub fn with_events(mut self, endpoint: impl Into<String>) -> Self {
        self.events = Some(endpoint.into());
        self
    }

    /// Parses `ID=tcp://HOST:PORT` (the `--worker-events` form): the worker id and its
    /// engine's KV event endpoint.
    pub fn parse_events(spec: &str) -> Result<(u64, String), ConfigError> {
        let invalid = |why: String| ConfigError::Invalid {
            field: "workers.events",
            why,
        };
        let (id, endpoint) = spec.split_once('=').ok_or_else(|| {
            invalid(format!(
                "{spec:?} is not ID=ENDPOINT (e.g. 1=tcp://10.0.0.5:5557)"
            ))
        })?;
        let id = id
            .trim()
            .parse()
            .map_err(|_| invalid(format!("worker id {id:?} is not an unsigned integer")))?;
        Ok((id, endpoint.trim().to_owned()))
    }

    /// Parses `ID=URL` (the flag and environment form).
    pub fn parse(spec: &str) -> Result<Self, ConfigError> {
        let invalid = |why: String| ConfigError::Invalid {
            field: "workers",
            why,
        };
        let (id, url) = spec.split_once('=').ok_or_else(|| {
            invalid(format!(
                "{spec:?} is not ID=URL (e.g. 1=http://10.0.0.5:8000)"
            ))
        })?;
        let id = id
            .trim()
            .parse()
            .map_err(|_| invalid(format!("worker id {id:?} is not an unsigned integer")))?;
        Ok(Self::new(id, url.trim()))
    }

    /// The registry's worker.
    pub fn worker(&self) -> Result<Worker, ConfigError> {
        Worker::new(WorkerId(self.id), &self.url).map_err(|error| ConfigError::Invalid {
            field: "workers",
            why: format!("worker {}: {error}", self.id),
        })
    }
}

/// Where KV events come from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct EventsConfig {
    /// The fleet's event source.
    pub source: EventsSource,
    /// With `source = "none"`: seconds a routed request's blocks count as cached on the
    /// worker that served it.
    pub approximate_ttl_secs: u64,
    /// Keep index snapshots in the JetStream object store (`source = "kvroute"`), so a
    /// restart replays only the stream's tail.
    pub snapshots: bool,
    /// Seconds between snapshots while events arrive (one is also written on shutdown).
    pub snapshot_interval_secs: u64,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            source: EventsSource::Kvroute,
            approximate_ttl_secs: 120,
            snapshots: true,
            snapshot_interval_secs: 60,
        }
    }
}

/// The fleet's KV event source.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum EventsSource {
    /// kvroute's JetStream stream (`kvroute worker-sim` publishes there).
    #[default]
    Kvroute,
    /// Dynamo 1.6 workers' NATS core subjects
    /// (`namespace.{ns}.component.{comp}.endpoint.{ep}.kv-events`).
    Dynamo,
    /// An in-process bus (`kvroute demo`: workers in the same process, no NATS).
    InProcess,
    /// Each worker's engine publishes its own KV events over ZeroMQ (vLLM, SGLang;
    /// `kvroute worker-sim --event-wire vllm`): read from every listed worker's `events`
    /// endpoint, re-hashed with `model.block_size` (a worker whose events show another block
    /// size is refused). No NATS: the workers are the listed ones (no discovery).
    Engines,
    /// No events: caches are predicted from routing (approximate mode).
    None,
}

impl EventsSource {
    /// Whether this source needs a NATS server.
    pub fn uses_nats(self) -> bool {
        matches!(self, Self::Kvroute | Self::Dynamo)
    }
}

/// The NATS deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// The NATS server (JetStream enabled).
    pub url: String,
    /// The deployment's namespace.
    pub namespace: String,
    /// The component (worker pool) inside the namespace.
    pub component: String,
    /// The workers' endpoint name (Dynamo's subjects carry it).
    pub endpoint: String,
    /// Follow the workers that register themselves in NATS (besides `workers`).
    pub discovery: bool,
    /// Seconds a worker registration lives without a heartbeat.
    pub registration_ttl_secs: u64,
    /// Copies of the event stream, the registration bucket and the snapshot store kept by a
    /// NATS cluster (1 on a single server; 3 on a 3-node cluster survives losing a node).
    pub replicas: usize,
}

impl NatsConfig {
    /// The event stream of this namespace and component.
    pub fn stream(&self) -> StreamSettings {
        let mut stream = StreamSettings::default().for_component(&self.namespace, &self.component);
        stream.replicas = self.replicas;
        stream
    }

    /// Where workers of this namespace and component register.
    pub fn membership(&self) -> MembershipSettings {
        let mut membership = MembershipSettings::default()
            .for_component(&self.namespace, &self.component)
            .with_ttl(Duration::from_secs(self.registration_ttl_secs));
        membership.replicas = self.replicas;
        membership
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            namespace: "default".to_owned(),
            component: "trtllm".to_owned(),
            endpoint: "generate".to_owned(),
            discovery: true,
            registration_ttl_secs: 10,
            replicas: 1,
        }
    }
}

/// Load sharing between replicas of this router (several `kvroute serve` behind one load
/// balancer): each tells the others, over NATS core, the load it puts on every worker, so
/// that none routes as if its own requests were the whole fleet's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReplicaSyncConfig {
    /// Share load with the other replicas of the same namespace and component.
    pub enabled: bool,
    /// This replica's name, unique among the replicas (a pod or host name). A restarted
    /// replica with the same name replaces its previous life at once; without a name, one is
    /// drawn at random and a crashed replica's load counts until it expires.
    pub name: Option<String>,
    /// Milliseconds between reports of the loads that changed.
    pub interval_ms: u64,
    /// Milliseconds between reports of every load (a heartbeat).
    pub heartbeat_ms: u64,
    /// Milliseconds of silence after which a replica's load no longer counts.
    pub expiry_ms: u64,
}

impl Default for ReplicaSyncConfig {
    fn default() -> Self {
        let timing = ReplicaSyncSettings::default();
        Self {
            enabled: false,
            name: None,
            interval_ms: millis(timing.interval),
            heartbeat_ms: millis(timing.heartbeat),
            expiry_ms: millis(timing.expiry),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl ReplicaSyncConfig {
    /// The subject and timing for `nats`' namespace and component.
    pub fn settings(&self, nats: &NatsConfig) -> ReplicaSyncSettings {
        ReplicaSyncSettings::default()
            .for_component(&nats.namespace, &nats.component)
            .with_timing(
                Duration::from_millis(self.interval_ms),
                Duration::from_millis(self.heartbeat_ms),
                Duration::from_millis(self.expiry_ms),
            )
    }
}

/// A configuration that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML, or a field of the wrong type or unknown name.
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    /// A field's value is unusable.
    #[error("{field}: {why}")]
    Invalid {
        /// The field, as written in the file.
        field: &'static str,
        /// What is wrong.
        why: String,
    },
}

impl ServerConfig {
    /// Parses a TOML document; missing fields take their defaults.
    pub fn from_toml_str(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    /// Reads and parses a TOML file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml_str(&text)
    }

    /// The configuration as TOML (every field, defaults included).
    pub fn to_toml(&self) -> String {
        // Every field serializes (no maps with non-string keys): this cannot fail.
        toml::to_string(self).unwrap_or_else(|error| format!("# not representable: {error}\n"))
    }

    /// Checks what parsing cannot: ranges, URLs, duplicates, combinations.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_numbers()?;
        self.validate_workers()?;
        self.auth.load_keys()?;
        self.validate_replica_sync()
    }

    /// Sizes, weights and times: in range.
    fn validate_numbers(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: String| Err(ConfigError::Invalid { field, why });
        let weights = [
            ("routing.prefill_weight", self.routing.prefill_weight),
            ("routing.decode_weight", self.routing.decode_weight),
            (
                "routing.active_blocks_weight",
                self.routing.active_blocks_weight,
            ),
            ("routing.temperature", self.routing.temperature),
        ];
        for (field, value) in weights {
            if !(value.is_finite() && value >= 0.0) {
                return invalid(field, format!("must be a finite number >= 0, not {value}"));
            }
        }
        let at_least_one = [
            ("model.block_size", u64::from(self.model.block_size)),
            (
                "model.max_prompt_tokens",
                self.model.max_prompt_tokens as u64,
            ),
            (
                "events.snapshot_interval_secs",
                self.events.snapshot_interval_secs,
            ),
            (
                "nats.registration_ttl_secs",
                self.nats.registration_ttl_secs,
            ),
            ("limits.max_connections", self.limits.max_connections as u64),
            ("limits.max_body_bytes", self.limits.max_body_bytes as u64),
            (
                "limits.header_read_timeout_secs",
                self.limits.header_read_timeout_secs,
            ),
            (
                "limits.body_read_timeout_secs",
                self.limits.body_read_timeout_secs,
            ),
            ("limits.idle_timeout_secs", self.limits.idle_timeout_secs),
            (
                "limits.max_requests_per_connection",
                self.limits.max_requests_per_connection,
            ),
            ("timeouts.connect_ms", self.timeouts.connect_ms),
            ("timeouts.first_byte_secs", self.timeouts.first_byte_secs),
        ];
        for (field, value) in at_least_one {
            if value == 0 {
                return invalid(field, "must be at least 1".into());
            }
        }
        if self.limits.max_header_bytes < MIN_HEADER_BYTES {
            return invalid(
                "limits.max_header_bytes",
                format!("must be at least {MIN_HEADER_BYTES}"),
            );
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return invalid("nats.replicas", "must be 1 to 5 (what NATS allows)".into());
        }
        Ok(())
    }

    /// Each worker valid, listed once, with an events endpoint where the source needs one.
    fn validate_workers(&self) -> Result<(), ConfigError> {
        let invalid = |why: String| {
            Err(ConfigError::Invalid {
                field: "workers",
                why,
            })
        };
        let mut ids = HashSet::new();
        for worker in &self.workers {
            worker.worker()?;
            if !ids.insert(worker.id) {
                return invalid(format!("worker id {} is given twice", worker.id));
            }
            match &worker.events {
                None if self.events.source == EventsSource::Engines => {
                    return invalid(format!(
                        "worker {}: events.source = \"engines\" needs its events endpoint",
                        worker.id
                    ));
                }
                Some(endpoint) => {
                    let ranks = worker.dp_ranks.unwrap_or(1);
                    if ranks == 0 {
                        return invalid(format!(
                            "worker {}: dp_ranks must be at least 1",
                            worker.id
                        ));
                    }
                    // Every rank's port, and by default its replay port (+1), must exist.
                    let last = match worker.events_replay {
                        None => ranks,
                        Some(_) => ranks - 1,
                    };
                    let replay = worker.events_replay.iter().map(|r| (r, ranks - 1));
                    for (endpoint, last) in std::iter::once((endpoint, last)).chain(replay) {
                        let top = endpoint
                            .strip_prefix("tcp://")
                            .and_then(|rest| rest.rsplit_once(':'))
                            .and_then(|(_, port)| port.parse::<u16>().ok())
                            .and_then(|port| u32::from(port).checked_add(last));
                        if top.is_none_or(|top| top > u32::from(u16::MAX)) {
                            return invalid(format!(
                                "worker {}: events endpoint {endpoint:?} is not tcp://HOST:PORT \
                                 (with room for {ranks} rank(s))",
                                worker.id
                            ));
                        }
                    }
                }
                None if worker.events_replay.is_some() || worker.dp_ranks.is_some() => {
                    return invalid(format!(
                        "worker {}: events_replay and dp_ranks need its events endpoint",
                        worker.id
                    ));
                }
                None => {}
            }
        }
        Ok(())
    }

    fn validate_replica_sync(&self) -> Result<(), ConfigError> {
        let invalid = |field, why: &str| {
            Err(ConfigError::Invalid {
                field,
                why: why.to_owned(),
            })
        };
        let sync = &self.replica_sync;
        if !sync.enabled {
            return Ok(());
        }
        if sync.interval_ms == 0 {
            return invalid("replica_sync.interval_ms", "must be at least 1");
        }
        if sync.heartbeat_ms < sync.interval_ms {
            return invalid("replica_sync.heartbeat_ms", "must be at least interval_ms");
        }
        if sync.expiry_ms <= sync.heartbeat_ms {
            return invalid(
                "replica_sync.expiry_ms",
                "must exceed heartbeat_ms (a live replica would expire)",
            );
        }
        if self.events.source == EventsSource::InProcess {
            return invalid(
                "replica_sync.enabled",
                "replicas share load over NATS; an in-process event bus has no NATS",
            );
        }
        if sync.name.as_deref().is_some_and(str::is_empty) {
            return invalid("replica_sync.name", "must not be empty");
        }
        Ok(())
    }

    /// Whether workers can reach the server: listed, discovered in NATS, or in the process
    /// (`events.source = "in-process"`, as `kvroute demo` adds them). An embedder that adds
    /// workers to [`Server::registry`](crate::Server::registry) itself need not check it.
    pub fn check_workers_reachable(&self) -> Result<(), ConfigError> {
        let in_process = self.events.source == EventsSource::InProcess;
        if self.workers.is_empty() && !self.discovers_workers() && !in_process {
            return Err(ConfigError::Invalid {
                field: "workers",
                why: "no workers: list some (--worker ID=URL), or turn on NATS discovery".into(),
            });
        }
        Ok(())
    }

    /// Whether the server follows NATS registrations. Not with engines' own events: a worker
    /// registered in NATS has no event endpoint to read, so only listed workers count.
    pub fn discovers_workers(&self) -> bool {
        self.nats.discovery
            && !matches!(
                self.events.source,
                EventsSource::InProcess | EventsSource::Engines
            )
    }

    /// A commented TOML file with every setting at its default.
    pub fn example_toml() -> String {
        EXAMPLE.to_owned()
    }
}

/// The smallest read buffer hyper's HTTP/1 server accepts.
pub(crate) const MIN_HEADER_BYTES: usize = 8192;

/// `kvroute config example`; a test checks it parses to the defaults.
const EXAMPLE: &str = r#"# kvroute server configuration (kvroute serve --config FILE).
# Every setting is shown at its default; delete what you do not change. Flags and
# environment variables (kvroute serve --help) override the file.

# Where the gateway listens.
listen = "0.0.0.0:8000"
# Seconds in-flight requests may take to finish after SIGTERM or Ctrl-C.
drain_timeout_secs = 30

[model]
# The model name served (/v1/models).
name = "Qwen/Qwen2-VL-2B-Instruct"
# A Hugging Face model directory (tokenizer.json, chat template, config.json); without it
# the bundled Qwen2-VL tokenizer and template are used.
# dir = "/models/Qwen2-VL-7B-Instruct"
# Tokens per KV block (router and workers must agree).
block_size = 32
# Longest prompt accepted, in tokens after image expansion.
max_prompt_tokens = 131072

[routing]
# kv-aware | text-only | least-loaded | round-robin | random
policy = "kv-aware"
# cost = prefill_weight * blocks to prefill + load, where load = blocks still prefilling
#        + decode_weight * in-flight requests + active_blocks_weight * KV blocks held.
prefill_weight = 3.0
decode_weight = 1.0
active_blocks_weight = 0.0
# Softmax temperature over costs (0: always the lowest cost, ties at random).
temperature = 0.0

[breaker]
# Consecutive failures that take a worker out of rotation.
failures = 3
# Seconds a failed worker stays out before a trial request.
cooldown_secs = 5

# Static workers (repeat the section); workers registering in NATS need not be listed.
# [[workers]]
# id = 1
# url = "http://10.0.0.5:8000"
# # With source = "engines": its engine's ZeroMQ KV event endpoint (replay on the next port).
# events = "tcp://10.0.0.5:5557"
# # The engine's replay_endpoint if not the next port, and its data-parallel ranks (rank r
# # publishes on events' port + r and replays on events_replay's port + r).
# events_replay = "tcp://10.0.0.5:6557"
# dp_ranks = 2

[events]
# kvroute (JetStream stream) | dynamo (Dynamo 1.6 NATS subjects) | engines (each listed
# worker's own vLLM/SGLang ZeroMQ events) | in-process | none
source = "kvroute"
# With source = "none": seconds a routed request's blocks count as cached.
approximate_ttl_secs = 120
# Index snapshots in the JetStream object store (source = "kvroute").
snapshots = true
snapshot_interval_secs = 60

[nats]
url = "nats://127.0.0.1:4222"
namespace = "default"
component = "trtllm"
# The workers' endpoint name (source = "dynamo").
endpoint = "generate"
# Follow workers that register themselves in NATS.
discovery = true
# Seconds a registration lives without a heartbeat.
registration_ttl_secs = 10
# Copies of the event stream, registration bucket and snapshot store in a NATS cluster
# (3 on a 3-node cluster survives losing one node).
replicas = 1

[replica_sync]
# Share load with the other kvroute replicas of this namespace and component (NATS core),
# so that each routes knowing the whole fleet's in-flight requests.
enabled = false
# This replica's name, unique among replicas (e.g. the pod name); default: random.
# name = "kvroute-0"
# Milliseconds between reports of changed loads, between full reports (heartbeat), and of
# silence before a replica's load stops counting.
interval_ms = 10
heartbeat_ms = 1000
expiry_ms = 3000

[limits]
# Open client connections; one more is accepted and closed at once.
max_connections = 4096
# Largest request head (request line and headers), in bytes (at least 8192).
max_header_bytes = 65536
# Largest request body, in bytes.
max_body_bytes = 33554432
# Seconds a client has to send a request's headers, then its whole body.
header_read_timeout_secs = 10
body_read_timeout_secs = 60
# Seconds a connection may stay open with no request in flight.
idle_timeout_secs = 75
# Requests served on one connection before it is closed.
max_requests_per_connection = 10000
# Threads that tokenize and process images (0: one per core), and requests that may wait
# for one (more are refused with 503 and retry-after).
preprocess_threads = 0
preprocess_queue = 256

[timeouts]
# Milliseconds to connect to a worker (then the next worker is tried).
connect_ms = 2000
# Seconds to wait for a worker's response headers: a non-streaming response's headers come
# with the whole generation, so raise this for long non-streaming generations.
first_byte_secs = 300
# Seconds a streamed response may stay silent, and a whole request may take (0: no limit).
# No timeout counts against a worker's circuit breaker.
stream_idle_secs = 120
total_secs = 1800

[auth]
# Without keys the gateway is open. With keys, every endpoint but /health and /ready needs
# `Authorization: Bearer KEY`, and /metrics and /v1/route need an admin key.
# keys_file = "/etc/kvroute/keys.toml"   # more [[keys]] tables; read again on SIGHUP
# Send x-kvroute-overlap-blocks and x-kvroute-predicted-cached-tokens (they reveal whether
# a prefix is cached, i.e. other clients' prompts within the same tenant).
routing_headers = false
# [[auth.keys]]
# key = "sk-..."
# tenant = "team-a"          # its own cache namespace (forwarded as cache_salt)
# admin = false              # may read /metrics and /v1/route
# max_concurrent = 16        # requests in flight (more: 429)
# requests_per_minute = 600  # (more: 429 with retry-after)
"#;

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;

    #[test]
    fn the_example_is_the_defaults() {
        let parsed = ServerConfig::from_toml_str(EXAMPLE).unwrap();
        assert_eq!(parsed, ServerConfig::default());
    }

    #[test]
    fn printed_configurations_parse_back() {
        let mut config = ServerConfig::default();
        config.workers.push(WorkerConfig::new(3, "http://h:1"));
        config.model.dir = Some("/m".into());
        config.routing.policy = PolicyName::RoundRobin;
        let printed = config.to_toml();
        assert_eq!(ServerConfig::from_toml_str(&printed).unwrap(), config);
    }

    #[test]
    fn mistakes_are_named() {
        let unknown = ServerConfig::from_toml_str("[model]\nblock_sise = 16").unwrap_err();
        assert!(unknown.to_string().contains("block_sise"), "{unknown}");
        let mut config = ServerConfig::default();
        config.routing.prefill_weight = f64::NAN;
        assert!(config
            .validate()
            .unwrap_err()
            .to_string()
            .contains("prefill_weight"));
        let mut config = ServerConfig {
            workers: vec![
                WorkerConfig::new(1, "http://a:1"),
                WorkerConfig::new(1, "http://b:1"),
            ],
            ..ServerConfig::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("twice"));
        config.workers = vec![WorkerConfig::new(1, "ftp://a")];
        assert!(config.validate().is_err());
        let mut config = ServerConfig::default();
        config.nats.discovery = false;
        config.validate().unwrap();
        let refused = config.check_workers_reachable().unwrap_err();
        assert!(refused.to_string().contains("no workers"));
        config.events.source = EventsSource::InProcess;
        config.check_workers_reachable().unwrap();
        assert!(WorkerConfig::parse("x=http://a:1").is_err());
        assert_eq!(
            WorkerConfig::parse(" 7 = http://a:1 ").unwrap(),
            WorkerConfig::new(7, "http://a:1")
        );
        assert!("fastest".parse::<PolicyName>().is_err());
        assert_eq!(
            "round-robin".parse::<PolicyName>(),
            Ok(PolicyName::RoundRobin)
        );
    }

    #[test]
    fn engine_event_endpoints() {
        let toml = "[events]\nsource = \"engines\"\n[[workers]]\nid = 1\nurl = \"http://a:8000\"\nevents = \"tcp://a:5557\"\n";
        let mut config = ServerConfig::from_toml_str(toml).unwrap();
        assert_eq!(
            config.workers,
            vec![WorkerConfig::new(1, "http://a:8000").with_events("tcp://a:5557")]
        );
        config.validate().unwrap();
        assert!(!config.discovers_workers());
        assert_eq!(
            ServerConfig::from_toml_str(&config.to_toml()).unwrap(),
            config
        );
        for bad in ["a:5557", "tcp://a", "tcp://a:port", "tcp://a:65535"] {
            config.workers[0].events = Some(bad.into());
            let refused = config.validate().unwrap_err().to_string();
            assert!(refused.contains("tcp://HOST:PORT"), "{bad}: {refused}");
        }
        // Two ranks: 5557 and 5558 publish, so the replay socket must be elsewhere.
        config.workers[0].events = Some("tcp://a:65534".into());
        config.workers[0].dp_ranks = Some(2);
        assert!(config.validate().is_err(), "rank 1 would replay on 65536");
        config.workers[0].events_replay = Some("tcp://a:6557".into());
        config.validate().unwrap();
        assert_eq!(
            ServerConfig::from_toml_str(&config.to_toml()).unwrap(),
            config
        );
        config.workers[0].dp_ranks = Some(0);
        assert!(config.validate().is_err());
        config.workers[0].dp_ranks = Some(u32::MAX);
        assert!(config.validate().is_err());
        config.workers[0].events = None;
        config.events.source = EventsSource::None;
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("need its events endpoint"), "{refused}");
        config.events.source = EventsSource::Engines;
        config.workers[0].events_replay = None;
        config.workers[0].dp_ranks = None;
        let refused = config.validate().unwrap_err().to_string();
        assert!(refused.contains("needs its events endpoint"), "{refused}");
        assert_eq!(
            WorkerConfig::parse_events(" 2 = tcp://b:5557").unwrap(),
            (2, "tcp://b:5557".to_owned())
        );
        assert!(WorkerConfig::parse_events("tcp://b:5557").is_err());
        assert!(WorkerConfig::parse_events("b=tcp://b:5557").is_err());
    }
}
