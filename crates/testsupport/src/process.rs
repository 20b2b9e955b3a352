//! Child processes of a test (`kvroute serve`, `worker-sim`, `nats-server`), killed and
//! reaped however the test ends, with their logs printed when it panics.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Every child process of a test, killed (SIGKILL) and reaped on drop, panics included; on a
/// panic the last lines of each one's log are printed.
#[derive(Debug)]
pub struct Processes {
    dir: tempfile::TempDir,
    children: Vec<(String, Child)>,
}

impl Default for Processes {
    fn default() -> Self {
        Self::new()
    }
}

impl Processes {
    /// No processes yet; logs and stores go to a new temporary directory.
    pub fn new() -> Self {
        Self {
            dir: tempfile::tempdir().unwrap(),
            children: Vec::new(),
        }
    }

    /// The temporary directory (for stores, configuration files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The log file of process `name`.
    pub fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }

    /// Starts `command` as `name`, its stdout and stderr into its log.
    pub fn spawn(&mut self, name: &str, command: &mut Command) {
        let log = std::fs::File::create(self.log(name)).unwrap();
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {name}: {e}"));
        self.children.push((name.to_owned(), child));
    }

    /// The process started as `name`.
    pub fn child(&mut self, name: &str) -> &mut Child {
        let found = self.children.iter_mut().find(|(n, _)| n == name);
        &mut found.unwrap_or_else(|| panic!("no process {name}")).1
    }

    /// SIGKILLs the process started as `name` and reaps it; it is no longer checked for an
    /// early exit (a test that kills a process on purpose may start it again under a new name).
    pub fn kill(&mut self, name: &str) {
        let found = self.children.iter().position(|(n, _)| n == name);
        let (_, mut child) = self
            .children
            .remove(found.unwrap_or_else(|| panic!("no process {name}")));
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Panics (with the logs) if a process exited early.
    pub fn check_alive(&mut self) {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("{name} exited early: {status}");
            }
        }
    }

    /// Waits up to 20 s until something listens on `port` of loopback, checking that every
    /// process is still alive meanwhile.
    pub async fn wait_for_port(&mut self, port: u16, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            self.check_alive();
            assert!(Instant::now() < deadline, "{what} did not come up");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Processes {
    fn drop(&mut self) {
        // The last started first: gateways and workers before the NATS servers they use.
        for (_, child) in self.children.iter_mut().rev() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            for (name, _) in &self.children {
                let log = std::fs::read_to_string(self.log(name)).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(40).collect();
                eprintln!("----- {name} (last lines) -----");
                for line in tail.iter().rev() {
                    eprintln!("{line}");
                }
            }
        }
    }
}

/// A `kvroute` command (the binary at `path`, e.g. `env!("CARGO_BIN_EXE_kvroute")`) that
/// inherits none of the developer's `KVROUTE_*` or legacy configuration variables.
pub fn kvroute_command(path: impl AsRef<std::ffi::OsStr>) -> Command {
    let mut command = Command::new(path);
    for (name, _) in std::env::vars_os() {
        let text = name.to_string_lossy();
        if text.starts_with("KVROUTE_") || LEGACY_ENV.contains(&text.as_ref()) {
            command.env_remove(&name);
        }
    }
    command.env("RUST_LOG", "info");
    command
}

/// The unprefixed environment names `kvroute` still reads as aliases.
const LEGACY_ENV: &[&str] = &[
    "MODEL",
    "MODEL_DIR",
    "BLOCK_SIZE",
    "MAX_PROMPT_TOKENS",
    "PREFILL_WEIGHT",
    "DECODE_WEIGHT",
    "ACTIVE_BLOCKS_WEIGHT",
    "ROUTER_TEMPERATURE",
    "NATS_URL",
    "NAMESPACE",
    "COMPONENT",
    "ENDPOINT",
    "REGISTRATION_TTL_SECS",
    "API_PORT",
    "WORKERS",
    "EVENT_WIRE",
    "NO_DISCOVERY",
    "NO_KV_EVENTS",
    "APPROXIMATE_TTL_SECS",
    "DRAIN_TIMEOUT_SECS",
    "NUM_WORKERS",
    "WORKER_ID",
    "ADVERTISE_URL",
];
