//! The composition root: one [`ServerConfig`] in, a running server out.
//!
//! [`Server::builder`] assembles what `kvroute serve` runs (preprocessor, index, event
//! sources and their ingestors, worker registry, NATS discovery, the gateway and its accept
//! loop) and returns a [`Server`] handle: its address, readiness, stats, reload and graceful
//! shutdown. Embedders add their own middleware around the request handler and their own
//! routing policy; tests start real servers in-process.

use crate::accept::serve_http_with;
use crate::body::GatewayBody;
use crate::config::{ApiKeyConfig, ConfigError, EventsSource, RoutingConfig, ServerConfig};
use crate::discovery::follow_membership;
use crate::handler::{Gateway, GatewayConfig, GatewayError, MetricsRender};
use http::{Request, Response};
use hyper::body::Incoming;
use kvroute_dispatch::{Registry, RoutingPolicy, SharedPolicy};
use kvroute_events::{
    in_process_bus, DynamoSource, EngineEndpoint, EngineSource, EngineSourceConfig, InProcessBus,
    IngestConfig, IngestError, IngestStats, Ingestor, NatsError, NatsSource, NatsSourceConfig,
    SnapshotSettings,
};
use kvroute_index::{Index, IndexConfig, IndexStats, SharedIndex};
use kvroute_preprocess::{PreprocessError, Preprocessor};
use kvroute_protocol::WorkerId;
use metrics::counter;
use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// A response in the making, as middleware returns it.
pub type ResponseFuture = Pin<Box<dyn Future<Output = Response<GatewayBody>> + Send>>;

type Middleware = Arc<dyn Fn(Request<Incoming>, Next) -> ResponseFuture + Send + Sync>;
type PolicyFactory = Arc<dyn Fn(&RoutingConfig) -> Box<dyn RoutingPolicy> + Send + Sync>;

/// The rest of the handler chain, given to each middleware: [`Next::run`] passes the request
/// on (eventually to [`Gateway::handle`]).
pub struct Next {
    gateway: Gateway,
    chain: Arc<[Middleware]>,
    position: usize,
}

impl Next {
    /// Hands `request` to the next middleware, or to the gateway after the last one.
    pub fn run(self, request: Request<Incoming>) -> ResponseFuture {
        match self.chain.get(self.position).cloned() {
            Some(middleware) => middleware(
                request,
                Next {
                    position: self.position + 1,
                    ..self
                },
            ),
            None => Box::pin(async move { self.gateway.handle(request).await }),
        }
    }

    /// The gateway at the end of the chain (its registry, configuration).
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }
}

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// The configuration is unusable.
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    /// The model's tokenizer or chat template could not be loaded.
    #[error("loading the model: {0}")]
    Model(#[from] PreprocessError),
    /// NATS could not be reached or provisioned.
    #[error("{what} on {url} (is nats-server running there with JetStream, -js?): {source}")]
    Nats {
        /// What was being done.
        what: &'static str,
        /// The server.
        url: String,
        /// What failed.
        source: NatsError,
    },
    /// The listen address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The gateway refused its settings.
    #[error(transparent)]
    Gateway(#[from] GatewayError),
    /// An ingestion task failed.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The accept loop failed.
    #[error("serving: {0}")]
    Serve(std::io::Error),
}

/// Builds a [`Server`] from a [`ServerConfig`] (see [`Server::builder`]).
#[must_use]
pub struct ServerBuilder {
    config: ServerConfig,
    metrics: Option<MetricsRender>,
    policy: PolicyFactory,
    middleware: Vec<Middleware>,
    listener: Option<TcpListener>,
}

impl ServerBuilder {
    /// Serves `/metrics` with `render` (e.g. a Prometheus recorder's).
    pub fn metrics(mut self, render: MetricsRender) -> Self {
        self.metrics = Some(render);
        self
    }

    /// Routes with the policy `factory` makes from the routing settings, instead of the
    /// configured built-in one; called at start and on every reload that changes them.
    pub fn policy(
        mut self,
        factory: impl Fn(&RoutingConfig) -> Box<dyn RoutingPolicy> + Send + Sync + 'static,
    ) -> Self {
        self.policy = Arc::new(factory);
        self
    }

    /// Wraps the request handler: `middleware` sees every request first and calls
    /// [`Next::run`] to pass it on (or answers itself). The first added runs first.
    pub fn middleware<F, Fut>(mut self, middleware: F) -> Self
    where
        F: Fn(Request<Incoming>, Next) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<GatewayBody>> + Send + 'static,
    {
        self.middleware.push(Arc::new(move |request, next| {
            Box::pin(middleware(request, next))
        }));
        self
    }

    /// Serves on `listener` instead of binding the configured address (tests bind port 0).
    pub fn listener(mut self, listener: TcpListener) -> Self {
        self.listener = Some(listener);
        self
    }

    /// Starts everything and returns once the gateway accepts connections (it may not be
    /// ready yet: see [`Server::is_ready`]). Must be called inside a multi-threaded Tokio
    /// runtime.
    pub async fn start(self) -> Result<Server, ServerError> {
        let config = self.config;
        config.validate()?;
        let preprocessor = Arc::new(config.model.load_preprocessor()?);
        let index = SharedIndex::new(Index::new(
            IndexConfig::default()
                .with_routed_ttl(Duration::from_secs(config.events.approximate_ttl_secs)),
        ));
        let registry = Registry::new(config.breaker.breaker());
        for worker in &config.workers {
            registry.upsert(worker.worker()?);
        }
        let uses_nats = config.events.source.uses_nats()
            || config.discovers_workers()
            || config.replica_sync.enabled;
        let nats = match uses_nats {
            true => Some(connect(&config).await?),
            false => None,
        };
        let (ingestor, bus) = spawn_ingestor(&config, nats.as_ref(), &index).await?;
        let mut tasks = Vec::new();
        if let (Some(client), true) = (&nats, config.discovers_workers()) {
            tasks.push(
                follow_registrations(&config, client, &registry, &index, ingestor.as_ref()).await?,
            );
        }

        let replica_sync = match (&nats, config.replica_sync.enabled) {
            (Some(client), true) => Some(spawn_replica_sync(&config, client, &registry).await?),
            _ => None,
        };

        let policy = SharedPolicy::from_box((self.policy)(&config.routing));
        let api_keys = config.auth.load_keys()?;
        let mut gateway_config = GatewayConfig::new(&config.model.name, config.model.block_size)
            .with_policy(policy.clone())
            .with_approximate(config.events.source == EventsSource::None)
            .with_limits(&config.limits)
            .with_forward(config.timeouts.forward())
            .with_api_keys(api_keys.clone())
            .with_routing_headers(config.auth.routing_headers);
        if let Some(render) = self.metrics {
            gateway_config = gateway_config.with_metrics(render);
        }
        let caught_up = ingestor.as_ref().map(Ingestor::readiness);
        let gateway = Gateway::new(
            gateway_config,
            Arc::clone(&preprocessor),
            index.clone(),
            registry.clone(),
            move || caught_up.as_ref().is_none_or(|ready| *ready.borrow()),
        )?;

        let listener = match self.listener {
            Some(listener) => listener,
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|source| ServerError::Bind {
                    addr: config.listen,
                    source,
                })?,
        };
        let local_addr = listener.local_addr().map_err(ServerError::Serve)?;
        let (stop, stopped) = watch::channel(false);
        let chain: Arc<[Middleware]> = self.middleware.into();
        let handler_gateway = gateway.clone();
        let accept = tokio::spawn(serve_http_with(
            listener,
            wait_for(stopped),
            None,
            config.limits.connection_limits(),
            move |request| {
                Next {
                    gateway: handler_gateway.clone(),
                    chain: Arc::clone(&chain),
                    position: 0,
                }
                .run(request)
            },
        ));
        tracing::info!(%local_addr, source = ?config.events.source, "kvroute server started");
        Ok(Server {
            local_addr,
            gateway,
            index,
            registry,
            preprocessor,
            ingestor,
            bus,
            policy,
            policy_factory: self.policy,
            config: Mutex::new(config),
            api_keys: Mutex::new(api_keys),
            stop,
            accept,
            tasks,
            replica_sync,
        })
    }
}

/// A running kvroute server.
///
/// ```no_run
/// use kvroute_gateway::{Server, ServerConfig, WorkerConfig};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = ServerConfig::default();
/// config.listen = "127.0.0.1:0".parse()?;
/// config.workers.push(WorkerConfig::new(1, "http://127.0.0.1:8001"));
/// config.nats.discovery = false;
/// let server = Server::builder(config).start().await?;
/// println!("listening on {}", server.local_addr());
/// server.shutdown().await?;
/// # Ok(())
/// # }
/// ```
pub struct Server {
    local_addr: SocketAddr,
    gateway: Gateway,
    index: SharedIndex,
    registry: Registry,
    preprocessor: Arc<Preprocessor>,
    ingestor: Option<Ingestor>,
    bus: Option<InProcessBus>,
    policy: SharedPolicy,
    policy_factory: PolicyFactory,
    config: Mutex<ServerConfig>,
    /// The keys in effect (the keys file's as last read).
    api_keys: Mutex<Vec<ApiKeyConfig>>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<std::io::Result<()>>,
    tasks: Vec<JoinHandle<()>>,
    /// Stopped after the drain, so that the other replicas count this one's requests until
    /// they are done.
    replica_sync: Option<(watch::Sender<bool>, JoinHandle<()>)>,
}

/// What a server has done so far.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct ServerStats {
    /// The index's size.
    pub index: IndexStats,
    /// The event ingestion's counters (`None` without KV events).
    pub ingest: Option<IngestStats>,
    /// Workers in the registry.
    pub workers: usize,
}

/// What a reload changed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReloadReport {
    /// Settings now in effect.
    pub applied: Vec<&'static str>,
    /// Settings that differ from the running ones but take effect only after a restart.
    pub needs_restart: Vec<&'static str>,
}

impl Server {
    /// A builder for a server with `config`.
    pub fn builder(config: ServerConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            metrics: None,
            policy: Arc::new(RoutingConfig::policy),
            middleware: Vec::new(),
            listener: None,
        }
    }

    /// Where the gateway listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The request handler.
    pub fn gateway(&self) -> &Gateway {
        &self.gateway
    }

    /// The worker registry (add or remove workers at run time).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The index of cached blocks.
    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    /// The model's preprocessor (simulated workers tokenize with the same one).
    pub fn preprocessor(&self) -> &Arc<Preprocessor> {
        &self.preprocessor
    }

    /// The in-process event bus, with `events.source = "in-process"`: in-process workers
    /// publish their KV events on it.
    pub fn in_process_bus(&self) -> Option<&InProcessBus> {
        self.bus.as_ref()
    }

    /// The routing policy in effect.
    pub fn policy(&self) -> &SharedPolicy {
        &self.policy
    }

    /// The configuration in effect (after reloads).
    pub fn config(&self) -> ServerConfig {
        self.lock_config().clone()
    }

    /// Whether the index has caught up with the events and a worker is available (what
    /// `/ready` answers).
    pub fn is_ready(&self) -> bool {
        self.ingestor.as_ref().is_none_or(Ingestor::is_caught_up)
            && !self.registry.eligible(std::time::Instant::now()).is_empty()
    }

    /// Counters of the index, the ingestion and the registry.
    pub fn stats(&self) -> ServerStats {
        ServerStats {
            index: self.index.stats(),
            ingest: self.ingestor.as_ref().map(Ingestor::stats),
            workers: self.registry.len(),
        }
    }

    /// Applies what can change without a restart (static workers, routing policy and
    /// weights, API keys: the keys file is read again) from `new`, and reports the rest.
    /// Counted in `kvroute_config_reloads_total`.
    pub fn reload(&self, new: ServerConfig) -> Result<ReloadReport, ConfigError> {
        let keys = new.validate().and_then(|()| new.auth.load_keys());
        let keys = match keys {
            Ok(keys) => keys,
            Err(error) => {
                counter!("kvroute_config_reloads_total", "result" => "invalid").increment(1);
                return Err(error);
            }
        };
        let mut current = self.lock_config();
        let mut report = ReloadReport::default();
        if new.workers != current.workers {
            let kept: BTreeSet<u64> = new.workers.iter().map(|w| w.id).collect();
            for gone in current.workers.iter().filter(|w| !kept.contains(&w.id)) {
                self.registry.remove(WorkerId(gone.id));
            }
            for worker in &new.workers {
                // Validated above.
                self.registry.upsert(worker.worker()?);
            }
            report.applied.push("workers");
        }
        if new.routing != current.routing {
            self.policy.replace((self.policy_factory)(&new.routing));
            report.applied.push("routing");
        }
        // Compared as loaded: the keys file may have changed while the configuration did not.
        let mut api_keys = self.api_keys.lock().unwrap_or_else(|e| e.into_inner());
        if keys != *api_keys && self.gateway.set_api_keys(&keys).is_ok() {
            *api_keys = keys;
            report.applied.push("auth.keys");
        }
        let restart_only = [
            ("listen", new.listen != current.listen),
            (
                "drain_timeout_secs",
                new.drain_timeout_secs != current.drain_timeout_secs,
            ),
            ("model", new.model != current.model),
            ("breaker", new.breaker != current.breaker),
            ("events", new.events != current.events),
            ("nats", new.nats != current.nats),
            ("limits", new.limits != current.limits),
            ("timeouts", new.timeouts != current.timeouts),
            (
                "auth.routing_headers",
                new.auth.routing_headers != current.auth.routing_headers,
            ),
            // The engine source subscribes to the endpoints it started with.
            (
                "workers.events",
                new.events.source == EventsSource::Engines
                    && event_endpoints(&new) != event_endpoints(&current),
            ),
        ];
        report.needs_restart = restart_only
            .into_iter()
            .filter_map(|(field, changed)| changed.then_some(field))
            .collect();
        let reloaded_workers = new.workers.clone();
        let reloaded_routing = new.routing.clone();
        current.workers = reloaded_workers;
        current.routing = reloaded_routing;
        current.auth.keys = new.auth.keys;
        current.auth.keys_file = new.auth.keys_file;
        counter!("kvroute_config_reloads_total", "result" => "ok").increment(1);
        tracing::info!(applied = ?report.applied, needs_restart = ?report.needs_restart, "configuration reloaded");
        Ok(report)
    }

    /// Stops accepting, lets in-flight requests finish for at most the configured drain
    /// timeout (then cuts them), stops ingestion (writing a final snapshot) and returns.
    pub async fn shutdown(self) -> Result<(), ServerError> {
        let drain = Duration::from_secs(self.lock_config().drain_timeout_secs);
        self.stop.send_replace(true);
        let mut accept = self.accept;
        match tokio::time::timeout(drain, &mut accept).await {
            Ok(Ok(served)) => served.map_err(ServerError::Serve)?,
            Ok(Err(join)) => return Err(ServerError::Serve(std::io::Error::other(join))),
            Err(_) => {
                tracing::warn!(
                    ?drain,
                    "in-flight requests still open after the drain timeout; cutting them"
                );
                accept.abort();
            }
        }
        for task in &self.tasks {
            task.abort();
        }
        if let Some((stop, mut task)) = self.replica_sync {
            stop.send_replace(true);
            if tokio::time::timeout(REPLICA_LEAVE_TIMEOUT, &mut task)
                .await
                .is_err()
            {
                task.abort();
            }
        }
        if let Some(ingestor) = self.ingestor {
            ingestor.shutdown().await?;
        }
        Ok(())
    }

    /// Serves until Ctrl-C or SIGTERM (then [`Server::shutdown`]); on SIGHUP, applies
    /// [`Server::reload`] to what `reload` returns (the configuration file read again).
    pub async fn run_until_signal<E: std::fmt::Display>(
        self,
        mut reload: impl FnMut() -> Result<ServerConfig, E>,
    ) -> Result<(), ServerError> {
        let mut hangups = hangups();
        let stop = stop_signal();
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => break,
                Some(()) = hangups.recv() => {
                    match reload() {
                        Ok(config) => self.log_reload(config),
                        Err(error) => {
                            counter!("kvroute_config_reloads_total", "result" => "invalid").increment(1);
                            tracing::error!(%error, "reload refused: the configuration could not be read; the running one stays");
                        }
                    }
                }
            }
        }
        tracing::info!("shutting down: draining in-flight requests");
        self.shutdown().await
    }

    fn log_reload(&self, config: ServerConfig) {
        match self.reload(config) {
            Ok(report) if !report.needs_restart.is_empty() => tracing::warn!(
                needs_restart = ?report.needs_restart,
                "reloaded; some changes take effect only after a restart"
            ),
            Ok(_) => {}
            Err(error) => {
                tracing::error!(%error, "reload refused; the running configuration stays")
            }
        }
    }

    fn lock_config(&self) -> std::sync::MutexGuard<'_, ServerConfig> {
        // Reloads replace whole fields: a panic mid-reload leaves a usable value.
        self.config
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .finish_non_exhaustive()
    }
}

async fn connect(config: &ServerConfig) -> Result<async_nats::Client, ServerError> {
    kvroute_events::connect(&config.nats.url)
        .await
        .map_err(|source| ServerError::Nats {
            what: "connecting",
            url: config.nats.url.clone(),
            source,
        })
}

/// The ingestor of the configured source, and the bus when it is in-process.
/// The listed workers' engine event endpoints, in worker id order.
fn event_endpoints(config: &ServerConfig) -> Vec<EngineEndpoint> {
    let mut endpoints: Vec<EngineEndpoint> = config
        .workers
        .iter()
        .filter_map(|w| {
            let mut endpoint = EngineEndpoint::new(WorkerId(w.id), w.events.as_deref()?);
            if let Some(replay) = &w.events_replay {
                endpoint = endpoint.with_replay(Some(replay.clone()));
            }
            Some(endpoint.with_dp_ranks(w.dp_ranks.unwrap_or(1)))
        })
        .collect();
    endpoints.sort_by_key(|e| e.worker_id);
    endpoints
}

async fn spawn_ingestor(
    config: &ServerConfig,
    nats: Option<&async_nats::Client>,
    index: &SharedIndex,
) -> Result<(Option<Ingestor>, Option<InProcessBus>), ServerError> {
    let ingest = IngestConfig::default();
    let index = index.clone();
    Ok(match (config.events.source, nats) {
        (EventsSource::None, _) => (None, None),
        (EventsSource::InProcess, _) => {
            let (bus, source) = in_process_bus(IN_PROCESS_BUS_BATCHES);
            (Some(Ingestor::spawn(source, index, ingest)), Some(bus))
        }
        (EventsSource::Kvroute, Some(client)) => {
            let stream = config.nats.stream();
            let js = async_nats::jetstream::new(client.clone());
            kvroute_events::ensure_stream(&js, &stream)
                .await
                .map_err(|source| ServerError::Nats {
                    what: "provisioning the event stream",
                    url: config.nats.url.clone(),
                    source,
                })?;
            let snapshots = config.events.snapshots.then(|| {
                let mut settings = SnapshotSettings::default();
                // One object per (namespace, component): their indexes differ.
                settings.object = format!(
                    "index-{}-{}",
                    kvroute_events::subject_token(&config.nats.namespace),
                    kvroute_events::subject_token(&config.nats.component)
                );
                settings.interval = Duration::from_secs(config.events.snapshot_interval_secs);
                settings
            });
            let source = NatsSource::new(
                client.clone(),
                NatsSourceConfig::new(stream).with_snapshots(snapshots),
            );
            (Some(Ingestor::spawn(source, index, ingest)), None)
        }
        (EventsSource::Dynamo, Some(client)) => {
            let source = DynamoSource::new(
                client.clone(),
                &config.nats.namespace,
                &config.nats.component,
                Some(&config.nats.endpoint),
            );
            (Some(Ingestor::spawn(source, index, ingest)), None)
        }
        (EventsSource::Engines, _) => {
            let workers = event_endpoints(config);
            let source =
                EngineSource::new(EngineSourceConfig::new(workers, config.model.block_size));
            (Some(Ingestor::spawn(source, index, ingest)), None)
        }
        // `start` connects whenever the source uses NATS.
        (EventsSource::Kvroute | EventsSource::Dynamo, None) => (None, None),
    })
}

/// Batches the in-process bus holds before publishers wait.
const IN_PROCESS_BUS_BATCHES: usize = 4096;

async fn follow_registrations(
    config: &ServerConfig,
    client: &async_nats::Client,
    registry: &Registry,
    index: &SharedIndex,
    ingestor: Option<&Ingestor>,
) -> Result<JoinHandle<()>, ServerError> {
    let membership = config.nats.membership();
    let js = async_nats::jetstream::new(client.clone());
    let store = kvroute_events::ensure_bucket(&js, &membership)
        .await
        .map_err(|source| ServerError::Nats {
            what: "opening the worker registration bucket",
            url: config.nats.url.clone(),
            source,
        })?;
    let changes = kvroute_events::watch_members(client.clone(), store, &membership);
    Ok(tokio::spawn(follow_membership(
        changes,
        registry.clone(),
        index.clone(),
        ingestor.map(Ingestor::control),
        config.model.block_size,
    )))
}

/// How long a stopping server waits for its leaving report to reach NATS.
const REPLICA_LEAVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Joins the other replicas and spawns the load sharing; returns its stop switch and task.
async fn spawn_replica_sync(
    config: &ServerConfig,
    client: &async_nats::Client,
    registry: &Registry,
) -> Result<(watch::Sender<bool>, JoinHandle<()>), ServerError> {
    let settings = config.replica_sync.settings(&config.nats);
    let name = config
        .replica_sync
        .name
        .clone()
        .unwrap_or_else(|| format!("kvroute-{:016x}", fastrand::u64(..)));
    let (sender, receiver) = kvroute_events::join_replicas(client.clone(), &settings, &name)
        .await
        .map_err(|source| ServerError::Nats {
            what: "joining the router replicas",
            url: config.nats.url.clone(),
            source,
        })?;
    tracing::info!(replica = %name, subject = %settings.subject(), "sharing load with the other replicas");
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(crate::sync_replicas(
        registry.clone(),
        sender,
        receiver,
        settings,
        wait_for(stopped),
    ));
    Ok((stop, task))
}

async fn wait_for(mut stopped: watch::Receiver<bool>) {
    // An error means the sender is gone: stop too.
    let _ = stopped.wait_for(|stop| *stop).await;
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
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
}

/// One message per SIGHUP (none where there are no such signals).
fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    #[cfg(unix)]
    if let Ok(mut signal) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        tokio::spawn(async move {
            while signal.recv().await.is_some() {
                if tx.send(()).await.is_err() {
                    break;
                }
            }
        });
    }
    #[cfg(not(unix))]
    drop(tx);
    rx
}
