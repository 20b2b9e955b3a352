//! The server's one typed configuration: every setting, its default, and the TOML file form.
//!
//! `kvroute serve` and `kvroute demo` build a [`ServerConfig`] from defaults, an optional file
//! and their flags, then hand it to [`Server::builder`](crate::Server::builder). The defaults
//! live here and nowhere else; `kvroute config example` prints [`ServerConfig::example_toml`].

use kvroute_dispatch::{
    BreakerConfig, CostConfig, KvAware, LeastLoaded, Random, RoundRobin, RoutingPolicy, Worker,
};
use kvroute_events::{MembershipSettings, StreamSettings};
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
        }
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
}

impl WorkerConfig {
    /// Worker `id` at `url`.
    pub fn new(id: u64, url: impl Into<String>) -> Self {
        Self {
            id,
            url: url.into(),
        }
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
}

impl NatsConfig {
    /// The event stream of this namespace and component.
    pub fn stream(&self) -> StreamSettings {
        StreamSettings::default().for_component(&self.namespace, &self.component)
    }

    /// Where workers of this namespace and component register.
    pub fn membership(&self) -> MembershipSettings {
        MembershipSettings::default()
            .for_component(&self.namespace, &self.component)
            .with_ttl(Duration::from_secs(self.registration_ttl_secs))
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
        }
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
        let invalid = |field, why: String| Err(ConfigError::Invalid { field, why });
        if self.model.block_size == 0 {
            return invalid("model.block_size", "must be at least 1".into());
        }
        if self.model.max_prompt_tokens == 0 {
            return invalid("model.max_prompt_tokens", "must be at least 1".into());
        }
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
        let mut ids = HashSet::new();
        for worker in &self.workers {
            worker.worker()?;
            if !ids.insert(worker.id) {
                return invalid("workers", format!("worker id {} is given twice", worker.id));
            }
        }
        if self.events.snapshot_interval_secs == 0 {
            return invalid("events.snapshot_interval_secs", "must be at least 1".into());
        }
        if self.nats.registration_ttl_secs == 0 {
            return invalid("nats.registration_ttl_secs", "must be at least 1".into());
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

    /// Whether the server follows NATS registrations.
    pub fn discovers_workers(&self) -> bool {
        self.nats.discovery && self.events.source != EventsSource::InProcess
    }

    /// A commented TOML file with every setting at its default.
    pub fn example_toml() -> String {
        EXAMPLE.to_owned()
    }
}

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
prefill_weight = 1.0
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

[events]
# kvroute (JetStream stream) | dynamo (Dynamo 1.6 NATS subjects) | in-process | none
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
}
