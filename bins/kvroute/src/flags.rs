//! Flags and environment variables that override a [`ServerConfig`]: each is `None` unless
//! given, so the effective configuration is defaults < file < environment < flags.
//!
//! Environment variables are `KVROUTE_`-prefixed; the unprefixed names of earlier releases
//! (`MODEL`, `WORKERS`, ...) still work as aliases ([`apply_env_aliases`]).

use anyhow::{Context, Result};
use clap::builder::BoolishValueParser;
use clap::Args;
use kvroute_gateway::{
    EventsSource, ModelConfig, NatsConfig, PolicyName, RoutingConfig, ServerConfig, WorkerConfig,
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
}

impl NatsFlags {
    fn apply(&self, nats: &mut NatsConfig) {
        set(&mut nats.url, &self.nats_url);
        set(&mut nats.namespace, &self.namespace);
        set(&mut nats.component, &self.component);
        set(&mut nats.registration_ttl_secs, &self.registration_ttl_secs);
    }

    /// The NATS settings these flags give over the defaults.
    pub fn config(&self) -> NatsConfig {
        let mut nats = NatsConfig::default();
        self.apply(&mut nats);
        nats
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
    #[arg(long, help = with_default("Consecutive failures that take a worker out of rotation", defaults().breaker.failures))]
    breaker_failures: Option<u32>,
    #[arg(long, help = with_default("Seconds a failed worker stays out of rotation before a trial request", defaults().breaker.cooldown_secs))]
    breaker_cooldown_secs: Option<u64>,
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
