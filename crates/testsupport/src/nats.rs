//! A nats-server of the test's own, or a cluster of three: free ports, temporary stores,
//! SIGKILL and restart.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};
use tokio::process::{Child, Command};

/// The nats-server binary: `KVROUTE_NATS_SERVER`, else Debian's `/usr/sbin/nats-server`
/// (a non-root PATH may lack /usr/sbin), else `nats-server` if PATH has it.
pub fn nats_server_binary() -> Option<PathBuf> {
    if let Ok(binary) = std::env::var("KVROUTE_NATS_SERVER") {
        return Some(binary.into());
    }
    let sbin = Path::new("/usr/sbin/nats-server");
    if sbin.exists() {
        return Some(sbin.into());
    }
    let found = std::process::Command::new("nats-server")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    found.then(|| "nats-server".into())
}

/// A TCP port that was free a moment ago on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `nats-server -js` on 127.0.0.1, a free port and a temporary store; killed when
/// dropped.
pub struct NatsServer {
    /// The port it listens on.
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
    /// Cluster arguments (name, cluster port, routes) when it is a cluster node.
    cluster: Vec<String>,
}

impl NatsServer {
    /// Starts a server and waits until it accepts connections. Panics when nats-server is
    /// missing (scripts/test installs it).
    pub async fn start() -> Self {
        Self::start_with(Vec::new()).await
    }

    async fn start_with(cluster: Vec<String>) -> Self {
        let mut server = Self::stopped(free_port(), cluster);
        server.restart().await;
        server
    }

    fn stopped(port: u16, cluster: Vec<String>) -> Self {
        Self {
            port,
            store: tempfile::tempdir().unwrap(),
            child: None,
            cluster,
        }
    }

    /// `nats://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and store, and waits until it accepts.
    pub async fn restart(&mut self) {
        let binary = nats_server_binary().unwrap_or_else(|| "nats-server".into());
        let child = Command::new(&binary)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.store.path())
            .args(&self.cluster)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start {} (scripts/test installs it): {e}",
                    binary.display()
                )
            });
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "nats-server did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILL, and wait until it is gone.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.start_kill().unwrap();
            child.wait().await.unwrap();
        }
    }
}

/// Three `nats-server -js` nodes on 127.0.0.1 routed into one cluster (JetStream clustered:
/// streams, KV buckets and object stores can keep 3 replicas); each node can be killed and
/// restarted on its ports and store. Killed when dropped.
pub struct NatsCluster {
    /// The nodes.
    pub nodes: Vec<NatsServer>,
}

impl NatsCluster {
    /// Starts three nodes and waits until JetStream accepts a stream of 3 replicas.
    pub async fn start() -> Self {
        let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
        let routes = ports
            .iter()
            .map(|(_, cluster)| format!("nats://127.0.0.1:{cluster}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut nodes: Vec<NatsServer> = ports
            .iter()
            .enumerate()
            .map(|(i, &(client, cluster))| {
                let args = vec![
                    "-n".to_owned(),
                    format!("node{i}"),
                    "--cluster_name".to_owned(),
                    "kvroute-test".to_owned(),
                    "--cluster".to_owned(),
                    format!("nats://127.0.0.1:{cluster}"),
                    "--routes".to_owned(),
                    routes.clone(),
                ];
                NatsServer::stopped(client, args)
            })
            .collect();
        for node in &mut nodes {
            node.restart().await;
        }
        let cluster = Self { nodes };
        cluster.wait_for_jetstream().await;
        cluster
    }

    /// Every node's URL, comma-separated (what a client given several seeds takes).
    pub fn url(&self) -> String {
        self.nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The index of the node leading JetStream stream `stream` (a KV bucket's is
    /// `KV_{bucket}`), waiting up to 30 s for one to be elected.
    pub async fn leader_of(&self, stream: &str) -> usize {
        let mut js = async_nats::jetstream::new(self.client().await);
        // Ask often: a leaderless stream does not answer, and the default timeout is 5 s.
        js.set_timeout(Duration::from_millis(500));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut found) = js.get_stream(stream).await {
                let leader = found
                    .info()
                    .await
                    .ok()
                    .and_then(|info| info.cluster.as_ref()?.leader.clone());
                let node = leader.and_then(|name| name.strip_prefix("node")?.parse().ok());
                if let Some(node) = node {
                    return node;
                }
            }
            assert!(Instant::now() < deadline, "stream {stream} has no leader");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to 30 s until each of `streams` has a leader and every copy current (a
    /// restarted node has caught up), so that losing another node leaves a quorum of
    /// up-to-date copies.
    pub async fn wait_until_current(&self, streams: &[&str]) {
        let mut js = async_nats::jetstream::new(self.client().await);
        js.set_timeout(Duration::from_millis(500));
        let deadline = Instant::now() + Duration::from_secs(30);
        for name in streams {
            loop {
                let current = match js.get_stream(name).await {
                    Ok(mut stream) => stream.info().await.ok().and_then(|info| {
                        let cluster = info.cluster.as_ref()?;
                        let copies = cluster.replicas.len() + usize::from(cluster.leader.is_some());
                        Some(
                            copies == info.config.num_replicas
                                && cluster.replicas.iter().all(|r| r.current && !r.offline),
                        )
                    }),
                    Err(_) => None,
                };
                if current == Some(true) {
                    break;
                }
                assert!(Instant::now() < deadline, "stream {name} never caught up");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// A client of the cluster, given every node as a seed.
    async fn client(&self) -> async_nats::Client {
        let seeds: Vec<async_nats::ServerAddr> = self
            .nodes
            .iter()
            .map(|n| n.url().parse().unwrap())
            .collect();
        async_nats::connect(seeds).await.unwrap()
    }

    /// Waits until the cluster has a JetStream leader that can place 3 replicas (a new or
    /// restarted cluster elects one within seconds).
    pub async fn wait_for_jetstream(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let js = async_nats::jetstream::new(self.client().await);
        loop {
            let probe = async_nats::jetstream::stream::Config {
                name: "KVROUTE_TEST_PROBE".to_owned(),
                subjects: vec!["kvroute-test.probe".to_owned()],
                num_replicas: 3,
                storage: async_nats::jetstream::stream::StorageType::Memory,
                ..Default::default()
            };
            if js.get_or_create_stream(probe).await.is_ok() {
                let _ = js.delete_stream("KVROUTE_TEST_PROBE").await;
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the NATS cluster has no JetStream leader"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
