//! Flags and environment variables that override a [`ServerConfig`]: each is `None` unless
//! given, so the effective configuration is defaults < file < environment < flags.
//!
//! Environment variables are `KVROUTE_`-prefixed; the unprefixed names of earlier releases
//! (`MODEL`, `WORKERS`, ...) still work as aliases ([`apply_env_aliases`]).

use anyhow::{bail, Context, Result};
use clap::builder::BoolishValueParser;
use clap::Args;
use kvroute_gateway::{
    ApiKeyConfig, AuthConfig, EventsSource, LimitsConfig, ModelConfig, NatsConfig, PolicyName,
    RoutingConfig, ServerConfig, TimeoutsConfig, WorkerConfig,
};
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::PathBuf;

/// (prefixed name, alias of earlier releases).
const ENV_ALIASES: &[(&str, &str)] = &[
    ("KVROUTE_MODEL", "MODEL"),
    ("KVROUTE_MODEL_DIR", "MODEL_DIR"),
    ("KVROUTE_BLOCK_SIZE", "BLOCK_SIZE"),
    ("KVROUTE_MAX_PROMPT_TOKENS", "MAX_PROMPT_TOKENS"),
    ("KVROUTE_PREFILL_WEIGHT", "PREFILL_WEIGHT"),
    ("KVROUTE_DECODE_WEIGHT", "DECODE_WEIGHT"),
    ("KVROUTE_ACTIVE_BLOCKS_WEIGHT", "ACTIVE_BLOCKS_WEIGHT"),
    ("KVROUTE_ROUTER_TEMPERATURE", "ROUTER_TEMPERATURE"),
    ("KVROUTE_NATS_URL", "NATS_URL"),
    ("KVROUTE_NAMESPACE", "NAMESPACE"),
    ("KVROUTE_COMPONENT", "COMPONENT"),
    ("KVROUTE_ENDPOINT", "ENDPOINT"),
    ("KVROUTE_REGISTRATION_TTL_SECS", "REGISTRATION_TTL_SECS"),
    ("KVROUTE_API_PORT", "API_PORT"),
    ("KVROUTE_WORKERS", "WORKERS"),
    ("KVROUTE_EVENT_WIRE", "EVENT_WIRE"),
    ("KVROUTE_NO_DISCOVERY", "NO_DISCOVERY"),
    ("KVROUTE_NO_KV_EVENTS", "NO_KV_EVENTS"),
    ("KVROUTE_APPROXIMATE_TTL_SECS", "APPROXIMATE_TTL_SECS"),
    ("KVROUTE_DRAIN_TIMEOUT_SECS", "DRAIN_TIMEOUT_SECS"),
    ("KVROUTE_NUM_WORKERS", "NUM_WORKERS"),
    ("KVROUTE_WORKER_ID", "WORKER_ID"),
    ("KVROUTE_ADVERTISE_URL", "ADVERTISE_URL"),
];

/// Copies each alias's value to its prefixed name when only the alias is set. Called first
/// thing in `main`, before any thread exists.
pub fn apply_env_aliases() {
    for (name, alias) in ENV_ALIASES {
        if std::env::var_os(name).is_none() {
            if let Some(value) = std::env::var_os(alias) {
                std::env::set_var(name, value);
            }
        }
    }
}

/// A help text ending in the default taken from [`ServerConfig::default`].
fn with_default(text: &str, value: impl Display) -> String {
    format!("{text} [default: {value}]")
}

fn defaults() -> ServerConfig {
    ServerConfig::default()
}

/// The model served and how its prompts are tokenized.
#[derive(Args, Clone, Debug, Default)]
pub struct ModelFlags {
    #[arg(long, env = "KVROUTE_MODEL", help = with_default("The model name served", defaults().model.name))]
    model: Option<String>,
    /// A Hugging Face model directory (tokenizer.json, chat template, config.json); without
    /// it the bundled Qwen2-VL tokenizer and template are used.
    #[arg(long, env = "KVROUTE_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    #[arg(long, env = "KVROUTE_BLOCK_SIZE", help = with_default("Tokens per KV block (router and workers must agree)", defaults().model.block_size))]
    block_size: Option<u32>,
    #[arg(long, env = "KVROUTE_MAX_PROMPT_TOKENS", help = with_default("Longest prompt accepted, in tokens after image expansion; longer ones get a 400", defaults().model.max_prompt_tokens))]
    max_prompt_tokens: Option<usize>,
}

impl ModelFlags {
    pub fn apply(&self, model: &mut ModelConfig) {
        set(&mut model.name, &self.model);
        if self.model_dir.is_some() {
            model.dir.clone_from(&self.model_dir);
        }
        set(&mut model.block_size, &self.block_size);
        set(&mut model.max_prompt_tokens, &self.max_prompt_tokens);
    }

    /// The model settings these flags give over the defaults.
    pub fn config(&self) -> ModelConfig {
        let mut model = ModelConfig::default();
        self.apply(&mut model);
        model
    }
}

/// The routing policy and the weights of its cost.
#[derive(Args, Clone, Debug, Default)]
pub struct RoutingFlags {
    #[arg(long, env = "KVROUTE_POLICY", help = with_default("The routing policy: kv-aware, text-only, least-loaded, round-robin or random", defaults().routing.policy.as_str()))]
    policy: Option<PolicyName>,
    #[arg(long, env = "KVROUTE_PREFILL_WEIGHT", help = with_default("Weight of the blocks a worker would have to prefill", defaults().routing.prefill_weight))]
    prefill_weight: Option<f64>,
    #[arg(long, env = "KVROUTE_DECODE_WEIGHT", help = with_default("Blocks-equivalent of one in-flight request", defaults().routing.decode_weight))]
    decode_weight: Option<f64>,
    #[arg(long, env = "KVROUTE_ACTIVE_BLOCKS_WEIGHT", help = with_default("Weight of the KV blocks in-flight requests hold (raise it when workers run short of KV memory)", defaults().routing.active_blocks_weight))]
    active_blocks_weight: Option<f64>,
    #[arg(long, env = "KVROUTE_ROUTER_TEMPERATURE", help = with_default("Softmax temperature over costs (0: always the lowest cost, ties at random)", defaults().routing.temperature))]
    temperature: Option<f64>,
}

impl RoutingFlags {
    fn apply(&self, routing: &mut RoutingConfig) {
        set(&mut routing.policy, &self.policy);
        set(&mut routing.prefill_weight, &self.prefill_weight);
        set(&mut routing.decode_weight, &self.decode_weight);
        set(
            &mut routing.active_blocks_weight,
            &self.active_blocks_weight,
        );
        set(&mut routing.temperature, &self.temperature);
    }
}

/// Where KV events and registrations travel on NATS.
#[derive(Args, Clone, Debug, Default)]
pub struct NatsFlags {
    #[arg(long, env = "KVROUTE_NATS_URL", help = with_default("The NATS server (JetStream enabled)", defaults().nats.url))]
    nats_url: Option<String>,
    #[arg(long, env = "KVROUTE_NAMESPACE", help = with_default("The deployment's namespace", defaults().nats.namespace))]
    namespace: Option<String>,
    #[arg(long, env = "KVROUTE_COMPONENT", help = with_default("The component (worker pool) inside the namespace", defaults().nats.component))]
    component: Option<String>,
    #[arg(long, env = "KVROUTE_REGISTRATION_TTL_SECS", help = with_default("Seconds a worker registration lives without a heartbeat (workers refresh theirs every third of it)", defaults().nats.registration_ttl_secs))]
    registration_ttl_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_NATS_REPLICAS", help = with_default("Copies of the event stream, registration bucket and snapshot store in a NATS cluster (3 on a 3-node cluster)", defaults().nats.replicas))]
    nats_replicas: Option<usize>,
}

impl NatsFlags {
    fn apply(&self, nats: &mut NatsConfig) {
        set(&mut nats.url, &self.nats_url);
        set(&mut nats.namespace, &self.namespace);
        set(&mut nats.component, &self.component);
        set(&mut nats.registration_ttl_secs, &self.registration_ttl_secs);
        set(&mut nats.replicas, &self.nats_replicas);
    }

    /// The NATS settings these flags give over the defaults.
    pub fn config(&self) -> NatsConfig {
        let mut nats = NatsConfig::default();
        self.apply(&mut nats);
        nats
    }
}

/// What one client can make the server hold or compute.
#[derive(Args, Clone, Debug, Default)]
pub struct LimitsFlags {
    #[arg(long, env = "KVROUTE_MAX_CONNECTIONS", help = with_default("Open client connections; one more is accepted and closed at once", defaults().limits.max_connections))]
    max_connections: Option<usize>,
    #[arg(long, env = "KVROUTE_MAX_HEADER_BYTES", help = with_default("Largest request head in bytes (at least 8192)", defaults().limits.max_header_bytes))]
    max_header_bytes: Option<usize>,
    #[arg(long, env = "KVROUTE_MAX_BODY_BYTES", help = with_default("Largest request body in bytes", defaults().limits.max_body_bytes))]
    max_body_bytes: Option<usize>,
    #[arg(long, env = "KVROUTE_HEADER_READ_TIMEOUT_SECS", help = with_default("Seconds a client has to send a request's headers", defaults().limits.header_read_timeout_secs))]
    header_read_timeout_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_BODY_READ_TIMEOUT_SECS", help = with_default("Seconds a client has to send a request's body", defaults().limits.body_read_timeout_secs))]
    body_read_timeout_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_IDLE_TIMEOUT_SECS", help = with_default("Seconds a connection may stay open with no request in flight", defaults().limits.idle_timeout_secs))]
    idle_timeout_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_MAX_REQUESTS_PER_CONNECTION", help = with_default("Requests served on one connection before it is closed", defaults().limits.max_requests_per_connection))]
    max_requests_per_connection: Option<u64>,
    #[arg(long, env = "KVROUTE_PREPROCESS_THREADS", help = with_default("Threads that tokenize and process images (0: one per core)", defaults().limits.preprocess_threads))]
    preprocess_threads: Option<usize>,
    #[arg(long, env = "KVROUTE_PREPROCESS_QUEUE", help = with_default("Requests that may wait for a preprocessing thread (more get 503)", defaults().limits.preprocess_queue))]
    preprocess_queue: Option<usize>,
}

impl LimitsFlags {
    fn apply(&self, limits: &mut LimitsConfig) {
        set(&mut limits.max_connections, &self.max_connections);
        set(&mut limits.max_header_bytes, &self.max_header_bytes);
        set(&mut limits.max_body_bytes, &self.max_body_bytes);
        set(
            &mut limits.header_read_timeout_secs,
            &self.header_read_timeout_secs,
        );
        set(
            &mut limits.body_read_timeout_secs,
            &self.body_read_timeout_secs,
        );
        set(&mut limits.idle_timeout_secs, &self.idle_timeout_secs);
        set(
            &mut limits.max_requests_per_connection,
            &self.max_requests_per_connection,
        );
        set(&mut limits.preprocess_threads, &self.preprocess_threads);
        set(&mut limits.preprocess_queue, &self.preprocess_queue);
    }
}

/// How long a worker may take.
#[derive(Args, Clone, Debug, Default)]
pub struct TimeoutsFlags {
    #[arg(long, env = "KVROUTE_CONNECT_TIMEOUT_MS", help = with_default("Milliseconds to connect to a worker", defaults().timeouts.connect_ms))]
    connect_timeout_ms: Option<u64>,
    #[arg(long, env = "KVROUTE_FIRST_BYTE_TIMEOUT_SECS", help = with_default("Seconds to wait for a worker's response headers (a non-streaming response's come with the whole generation)", defaults().timeouts.first_byte_secs))]
    first_byte_timeout_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_STREAM_IDLE_TIMEOUT_SECS", help = with_default("Seconds a streamed response may stay silent (0: no limit)", defaults().timeouts.stream_idle_secs))]
    stream_idle_timeout_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_TOTAL_TIMEOUT_SECS", help = with_default("Seconds a whole request may take (0: no limit)", defaults().timeouts.total_secs))]
    total_timeout_secs: Option<u64>,
}

impl TimeoutsFlags {
    fn apply(&self, timeouts: &mut TimeoutsConfig) {
        set(&mut timeouts.connect_ms, &self.connect_timeout_ms);
        set(&mut timeouts.first_byte_secs, &self.first_byte_timeout_secs);
        set(
            &mut timeouts.stream_idle_secs,
            &self.stream_idle_timeout_secs,
        );
        set(&mut timeouts.total_secs, &self.total_timeout_secs);
    }
}

/// API keys and what responses reveal.
#[derive(Args, Clone, Debug, Default)]
pub struct AuthFlags {
    /// An API key clients must send as `Authorization: Bearer KEY` (no tenant, not admin);
    /// repeatable, or comma-separated in KVROUTE_API_KEYS. Replaces the file's keys.
    #[arg(
        long = "api-key",
        env = "KVROUTE_API_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    api_keys: Vec<String>,
    /// An admin API key (may read /metrics and /v1/route); repeatable, or comma-separated in
    /// KVROUTE_ADMIN_KEYS. Replaces the file's keys.
    #[arg(
        long = "admin-key",
        env = "KVROUTE_ADMIN_KEYS",
        value_delimiter = ',',
        hide_env_values = true
    )]
    admin_keys: Vec<String>,
    /// A TOML file of API keys (`[[keys]]` tables with key, tenant, admin, max_concurrent,
    /// requests_per_minute); read again on SIGHUP.
    #[arg(long, env = "KVROUTE_API_KEYS_FILE")]
    api_keys_file: Option<PathBuf>,
    /// Send x-kvroute-overlap-blocks and x-kvroute-predicted-cached-tokens (they reveal
    /// whether a prompt prefix is cached).
    #[arg(long, env = "KVROUTE_ROUTING_HEADERS", value_parser = BoolishValueParser::new())]
    routing_headers: bool,
}

impl AuthFlags {
    fn apply(&self, auth: &mut AuthConfig) {
        if !self.api_keys.is_empty() || !self.admin_keys.is_empty() {
            let plain = self.api_keys.iter().map(ApiKeyConfig::new);
            let admin = self.admin_keys.iter().map(|k| ApiKeyConfig::new(k).admin());
            auth.keys = plain.chain(admin).collect();
        }
        if self.api_keys_file.is_some() {
            auth.keys_file.clone_from(&self.api_keys_file);
        }
        if self.routing_headers {
            auth.routing_headers = true;
        }
    }
}

/// Every `kvroute serve` setting that has a flag.
#[derive(Args, Clone, Debug, Default)]
pub struct ServeFlags {
    #[command(flatten)]
    nats: NatsFlags,
    #[arg(long, env = "KVROUTE_ENDPOINT", help = with_default("The workers' endpoint name (used by --event-wire dynamo)", defaults().nats.endpoint))]
    endpoint: Option<String>,
    #[command(flatten)]
    model: ModelFlags,
    #[command(flatten)]
    routing: RoutingFlags,
    #[arg(long, env = "KVROUTE_LISTEN", help = with_default("Where the gateway listens", defaults().listen))]
    listen: Option<SocketAddr>,
    /// The port listened on, on the configured address, when --listen is not given.
    #[arg(long, env = "KVROUTE_API_PORT")]
    api_port: Option<u16>,
    /// A static worker as ID=URL (the id its KV events carry, its OpenAI base URL);
    /// repeatable, or comma-separated in KVROUTE_WORKERS. Replaces the file's list. Workers
    /// that register themselves in NATS (`kvroute worker-sim` does) need not be listed.
    #[arg(long = "worker", env = "KVROUTE_WORKERS", value_name = "ID=URL", value_delimiter = ',',
          value_parser = |spec: &str| WorkerConfig::parse(spec).map_err(|e| e.to_string()))]
    workers: Vec<WorkerConfig>,
    /// A listed worker's own ZeroMQ KV event endpoint as ID=tcp://HOST:PORT (vLLM's and
    /// SGLang's `--kv-events-config` `endpoint`, replay socket on PORT+1); repeatable, or
    /// comma-separated in KVROUTE_WORKER_EVENTS. KV events then come from the engines
    /// themselves (events.source = "engines"), re-hashed with --block-size, which must be the
    /// engines' block size. No NATS then: the workers are the listed ones.
    #[arg(long = "worker-events", env = "KVROUTE_WORKER_EVENTS", value_name = "ID=ENDPOINT",
          value_delimiter = ',', conflicts_with_all = ["event_wire", "no_kv_events"],
          value_parser = |spec: &str| WorkerConfig::parse_events(spec).map_err(|e| e.to_string()))]
    worker_events: Vec<(u64, String)>,
    /// How workers publish KV events: kvroute's JetStream stream (`kvroute worker-sim`), or
    /// Dynamo 1.6 workers' NATS core subjects
    /// (`namespace.{NAMESPACE}.component.{COMPONENT}.endpoint.{ENDPOINT}.kv-events`)
    /// [default: kvroute].
    #[arg(long, env = "KVROUTE_EVENT_WIRE", value_parser = ["kvroute", "dynamo"])]
    event_wire: Option<String>,
    /// Use only the --worker list: do not follow the workers registered in NATS.
    #[arg(long, env = "KVROUTE_NO_DISCOVERY", value_parser = BoolishValueParser::new())]
    no_discovery: bool,
    /// The workers publish no KV events: predict their caches from the requests routed to
    /// them (each request's blocks count as cached there for --approximate-ttl-secs).
    #[arg(long, env = "KVROUTE_NO_KV_EVENTS", value_parser = BoolishValueParser::new())]
    no_kv_events: bool,
    #[arg(long, env = "KVROUTE_APPROXIMATE_TTL_SECS", help = with_default("How long a routed request's blocks count as cached with --no-kv-events", defaults().events.approximate_ttl_secs))]
    approximate_ttl_secs: Option<u64>,
    /// Do not keep index snapshots in the JetStream object store (every start replays the
    /// whole stream).
    #[arg(long)]
    no_snapshots: bool,
    #[arg(long, help = with_default("Seconds between index snapshots while events arrive (one is also written on shutdown)", defaults().events.snapshot_interval_secs))]
    snapshot_interval_secs: Option<u64>,
    #[arg(long, env = "KVROUTE_DRAIN_TIMEOUT_SECS", help = with_default("Seconds in-flight requests may take to finish after SIGTERM or Ctrl-C", defaults().drain_timeout_secs))]
    drain_timeout_secs: Option<u64>,
    /// Share load with the other `kvroute serve` replicas of this namespace and component over
    /// NATS, so that each routes knowing every replica's in-flight requests.
    #[arg(long, env = "KVROUTE_REPLICA_SYNC", value_parser = BoolishValueParser::new())]
    replica_sync: bool,
    /// This replica's name among the replicas, e.g. the pod name [default: random].
    #[arg(long, env = "KVROUTE_REPLICA_NAME")]
    replica_name: Option<String>,
    #[arg(long, help = with_default("Milliseconds between this replica's reports of the loads that changed", defaults().replica_sync.interval_ms))]
    replica_interval_ms: Option<u64>,
    #[arg(long, help = with_default("Milliseconds between reports of every load (the replica's heartbeat)", defaults().replica_sync.heartbeat_ms))]
    replica_heartbeat_ms: Option<u64>,
    #[arg(long, help = with_default("Milliseconds of silence after which a replica's load no longer counts", defaults().replica_sync.expiry_ms))]
    replica_expiry_ms: Option<u64>,
    #[arg(long, help = with_default("Consecutive failures that take a worker out of rotation", defaults().breaker.failures))]
    breaker_failures: Option<u32>,
    #[arg(long, help = with_default("Seconds a failed worker stays out of rotation before a trial request", defaults().breaker.cooldown_secs))]
    breaker_cooldown_secs: Option<u64>,
    #[command(flatten)]
    limits: LimitsFlags,
    #[command(flatten)]
    timeouts: TimeoutsFlags,
    #[command(flatten)]
    auth: AuthFlags,
}

impl ServeFlags {
    /// Applies every flag (and environment variable) given to `config`.
    pub fn apply(&self, config: &mut ServerConfig) {
        self.nats.apply(&mut config.nats);
        set(&mut config.nats.endpoint, &self.endpoint);
        self.model.apply(&mut config.model);
        self.routing.apply(&mut config.routing);
        match (self.listen, self.api_port) {
            (Some(listen), _) => config.listen = listen,
            (None, Some(port)) => config.listen.set_port(port),
            (None, None) => {}
        }
        if !self.workers.is_empty() {
            config.workers.clone_from(&self.workers);
        }
        for (id, endpoint) in &self.worker_events {
            if let Some(worker) = config.workers.iter_mut().find(|w| w.id == *id) {
                worker.events = Some(endpoint.clone());
            }
        }
        if !self.worker_events.is_empty() {
            config.events.source = EventsSource::Engines;
        }
        match self.event_wire.as_deref() {
            Some("dynamo") => config.events.source = EventsSource::Dynamo,
            Some(_) => config.events.source = EventsSource::Kvroute,
            None => {}
        }
        if self.no_kv_events {
            config.events.source = EventsSource::None;
        }
        if self.no_discovery {
            config.nats.discovery = false;
        }
        if self.no_snapshots {
            config.events.snapshots = false;
        }
        if self.replica_sync {
            config.replica_sync.enabled = true;
        }
        if self.replica_name.is_some() {
            config.replica_sync.name.clone_from(&self.replica_name);
        }
        set(
            &mut config.replica_sync.interval_ms,
            &self.replica_interval_ms,
        );
        set(
            &mut config.replica_sync.heartbeat_ms,
            &self.replica_heartbeat_ms,
        );
        set(&mut config.replica_sync.expiry_ms, &self.replica_expiry_ms);
        set(
            &mut config.events.approximate_ttl_secs,
            &self.approximate_ttl_secs,
        );
        set(
            &mut config.events.snapshot_interval_secs,
            &self.snapshot_interval_secs,
        );
        set(&mut config.drain_timeout_secs, &self.drain_timeout_secs);
        set(&mut config.breaker.failures, &self.breaker_failures);
        set(
            &mut config.breaker.cooldown_secs,
            &self.breaker_cooldown_secs,
        );
        self.limits.apply(&mut config.limits);
        self.timeouts.apply(&mut config.timeouts);
        self.auth.apply(&mut config.auth);
    }
}

/// A configuration file and the flags over it.
#[derive(Args, Clone, Debug, Default)]
pub struct ConfigSource {
    /// A TOML configuration file (`kvroute config example` prints one with every default);
    /// flags and environment variables override it. SIGHUP reads it again.
    #[arg(long, env = "KVROUTE_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ServeFlags,
}

impl ConfigSource {
    /// Defaults, then the file, then the flags; validated.
    pub fn load(&self, base: ServerConfig) -> Result<ServerConfig> {
        let mut config = match &self.config {
            Some(path) => ServerConfig::from_file(path)
                .with_context(|| format!("in the configuration file {}", path.display()))?,
            None => base,
        };
        self.flags.apply(&mut config);
        for (id, _) in &self.flags.worker_events {
            if !config.workers.iter().any(|w| w.id == *id) {
                bail!("--worker-events names worker {id}, which no --worker ID=URL lists");
            }
        }
        config.validate()?;
        config.check_workers_reachable()?;
        Ok(config)
    }
}

fn set<T: Clone>(field: &mut T, value: &Option<T>) {
    if let Some(value) = value {
        field.clone_from(value);
    }
}
