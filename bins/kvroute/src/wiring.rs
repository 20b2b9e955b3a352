//! Wiring shared by the server commands: model loading, the gateway over an ingestor, the NATS
//! flags, signals.

use anyhow::{Context, Result};
use clap::Args;
use kvroute_dispatch::{CostConfig, Registry};
use kvroute_events::{Ingestor, MembershipSettings, StreamSettings};
use kvroute_gateway::{Gateway, GatewayConfig};
use kvroute_index::SharedIndex;
use kvroute_preprocess::{ModelFiles, PreprocessConfig, Preprocessor};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// The model served and where its tokenizer and chat template come from.
#[derive(Args, Clone, Debug)]
pub struct ModelArgs {
    /// The model name served.
    #[arg(long, env = "MODEL", default_value = "Qwen/Qwen2-VL-2B-Instruct")]
    pub model: String,
    /// A Hugging Face model directory (tokenizer.json, chat template, config.json); without
    /// it the bundled Qwen2-VL tokenizer and template are used.
    #[arg(long, env = "MODEL_DIR")]
    pub model_dir: Option<PathBuf>,
    /// Tokens per KV block (router and workers must agree).
    #[arg(long, env = "BLOCK_SIZE", default_value_t = 32)]
    pub block_size: u32,
    /// Longest prompt accepted, in tokens after image expansion (a body of many small images
    /// can expand to millions of visual tokens); longer ones get a 400.
    #[arg(long, env = "MAX_PROMPT_TOKENS", default_value_t = 131_072)]
    pub max_prompt_tokens: usize,
}

impl ModelArgs {
    /// The preprocessor of the model directory, or of the bundled Qwen2-VL.
    pub fn preprocessor(&self) -> Result<Arc<Preprocessor>> {
        let files = match &self.model_dir {
            Some(dir) => ModelFiles::from_dir(dir)
                .with_context(|| format!("reading the model directory {}", dir.display()))?,
            None => ModelFiles::bundled_qwen2_vl()?,
        };
        let config = PreprocessConfig::default().with_max_prompt_tokens(self.max_prompt_tokens);
        Ok(Arc::new(Preprocessor::new(&files, config)?))
    }
}

/// The weights of the routing cost (`kvroute_dispatch::CostConfig`).
#[derive(Args, Clone, Debug)]
pub struct RoutingArgs {
    /// Weight of the blocks a worker would have to prefill.
    #[arg(long, env = "PREFILL_WEIGHT", default_value_t = 1.0)]
    pub prefill_weight: f64,
    /// Blocks-equivalent of one in-flight request.
    #[arg(long, env = "DECODE_WEIGHT", default_value_t = 1.0)]
    pub decode_weight: f64,
    /// Weight of the KV blocks in-flight requests hold (raise it when workers run short of KV
    /// memory).
    #[arg(long, env = "ACTIVE_BLOCKS_WEIGHT", default_value_t = 0.0)]
    pub active_blocks_weight: f64,
    /// Softmax temperature over costs (0: always the lowest cost, ties at random).
    #[arg(long, env = "ROUTER_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f64,
}

impl RoutingArgs {
    /// The cost weights.
    pub fn cost(&self) -> Result<CostConfig> {
        let weights = [
            ("--prefill-weight", self.prefill_weight),
            ("--decode-weight", self.decode_weight),
            ("--active-blocks-weight", self.active_blocks_weight),
            ("--temperature", self.temperature),
        ];
        for (flag, value) in weights {
            if !(value.is_finite() && value >= 0.0) {
                anyhow::bail!("{flag} must be a finite number >= 0, not {value}");
            }
        }
        Ok(CostConfig::default()
            .with_prefill_weight(self.prefill_weight)
            .with_decode_weight(self.decode_weight)
            .with_active_blocks_weight(self.active_blocks_weight)
            .with_temperature(self.temperature))
    }
}

/// Where KV events travel on NATS.
#[derive(Args, Clone, Debug)]
pub struct NatsArgs {
    /// The NATS server (JetStream enabled).
    #[arg(long, env = "NATS_URL", default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
    /// The deployment's namespace.
    #[arg(long, env = "NAMESPACE", default_value = "default")]
    pub namespace: String,
    /// The component (worker pool) inside the namespace.
    #[arg(long, env = "COMPONENT", default_value = "trtllm")]
    pub component: String,
    /// Seconds a worker registration lives without a heartbeat (workers refresh theirs every
    /// third of it; routers drop a worker not heard from for this long).
    #[arg(long, env = "REGISTRATION_TTL_SECS", default_value_t = 10)]
    pub registration_ttl_secs: u64,
}

impl NatsArgs {
    /// The event stream's settings for this namespace and component.
    pub fn stream(&self) -> StreamSettings {
        StreamSettings::default().for_component(&self.namespace, &self.component)
    }

    /// Where workers of this namespace and component register.
    pub fn membership(&self) -> MembershipSettings {
        MembershipSettings::default()
            .for_component(&self.namespace, &self.component)
            .with_ttl(Duration::from_secs(self.registration_ttl_secs))
    }

    /// The worker registration bucket, created when absent.
    pub async fn registration_bucket(
        &self,
        client: &async_nats::Client,
    ) -> Result<async_nats::jetstream::kv::Store> {
        let js = async_nats::jetstream::new(client.clone());
        kvroute_events::ensure_bucket(&js, &self.membership())
            .await
            .with_context(|| {
                format!(
                    "opening the worker registration bucket on {} (is nats-server running there with JetStream, -js?)",
                    self.nats_url
                )
            })
    }

    /// A client that reconnects forever.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        kvroute_events::connect(&self.nats_url)
            .await
            .with_context(|| format!("connecting to NATS at {}", self.nats_url))
    }
}

/// Binds `addr`, saying which flag changes it when it is taken.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr} (use --listen to pick another address)"))
}

/// A gateway whose `/ready` follows `ingestor` catching up (always caught up without one).
pub fn gateway(
    config: GatewayConfig,
    preprocessor: Arc<Preprocessor>,
    index: SharedIndex,
    registry: Registry,
    ingestor: Option<&Ingestor>,
) -> Result<Gateway> {
    let caught_up = ingestor.map(Ingestor::readiness);
    Ok(Gateway::new(
        config,
        preprocessor,
        index,
        registry,
        move || caught_up.as_ref().is_none_or(|ready| *ready.borrow()),
    )?)
}

/// Serves `gateway` until Ctrl-C or SIGTERM, then drains in-flight requests for at most
/// `drain_timeout` (streams still open after it are cut).
pub async fn serve_until_signal(
    gateway: Gateway,
    listener: TcpListener,
    drain_timeout: Duration,
) -> Result<()> {
    let (signalled, mut on_signal) = tokio::sync::watch::channel(false);
    let shutdown = async move {
        shutdown_signal().await;
        let _ = signalled.send(true);
    };
    let deadline = async move {
        let _ = on_signal.wait_for(|signalled| *signalled).await;
        tokio::time::sleep(drain_timeout).await;
    };
    tokio::select! {
        served = gateway.serve(listener, shutdown) => Ok(served?),
        () = deadline => {
            eprintln!("kvroute: in-flight requests still open after {drain_timeout:?}; stopping anyway");
            Ok(())
        }
    }
}

/// Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    println!("shutting down: draining in-flight requests");
}
