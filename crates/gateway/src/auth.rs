//! API keys: who may call, in which cache namespace, how much at once and how often.

use crate::config::ApiKeyConfig;
use http::HeaderMap;
use kvroute_blockhash::{BlockHasher, HashError};
use kvroute_events::CACHE_SALT_PREFIX;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// A tenant: its name, the `cache_salt` forwarded for it and the hasher of its cache
/// namespace.
pub(crate) struct Tenant {
    pub(crate) name: Arc<str>,
    /// The name in Dynamo's tagged form (`dynamo-cache-salt:NAME`): the engine salts its
    /// prefix cache with it as with any string, and its KV events (vLLM's `extra_keys`,
    /// SGLang's `cache_salt`) then name the namespace the request was hashed in, which an
    /// untagged salt could not (docs/hashing.md).
    pub(crate) salt: Arc<str>,
    pub(crate) hasher: BlockHasher,
}

/// Who is calling, as far as routing cares. Holds the key's concurrency slot until dropped.
pub(crate) struct Caller {
    pub(crate) tenant: Option<Arc<Tenant>>,
    _slot: Option<OwnedSemaphorePermit>,
}

/// Why a request was refused before any work.
#[derive(Debug, PartialEq)]
pub(crate) enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A key no one was given.
    Wrong,
    /// A valid key that may not use this endpoint.
    NotAdmin,
    /// The key's requests in flight are at its limit.
    Concurrency,
    /// The key's request rate is at its limit; retry after this many seconds.
    Rate(u64),
}

impl Refusal {
    /// The metric label.
    pub(crate) fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "auth_missing",
            Self::Wrong => "auth_invalid",
            Self::NotAdmin => "auth_not_admin",
            Self::Concurrency => "key_concurrency",
            Self::Rate(_) => "key_rate",
        }
    }
}

struct Key {
    /// Keys are compared by their BLAKE3 digests: `blake3::Hash` compares in constant time,
    /// and a digest that matched says nothing about the key's bytes.
    digest: blake3::Hash,
    tenant: Option<Arc<Tenant>>,
    admin: bool,
    concurrency: Option<Arc<Semaphore>>,
    rate: Option<Mutex<Bucket>>,
}

/// A token bucket of one minute's requests, refilled continuously.
struct Bucket {
    per_minute: f64,
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// Takes one token, or says in how many seconds one will be there.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        let refill = now.duration_since(self.at).as_secs_f64() * self.per_minute / 60.0;
        self.tokens = (self.tokens + refill).min(self.per_minute);
        self.at = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - self.tokens) * 60.0 / self.per_minute;
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

/// The configured keys. Without any, every request is let in, to every endpoint (an open
/// gateway).
pub(crate) struct ApiKeys {
    keys: Vec<Key>,
}

impl ApiKeys {
    /// `keys`, with each tenant's hasher for `block_size`-token blocks.
    pub(crate) fn new(keys: &[ApiKeyConfig], block_size: u32) -> Result<Self, HashError> {
        let mut tenants: Vec<Arc<Tenant>> = Vec::new();
        let mut built = Vec::with_capacity(keys.len());
        for key in keys {
            let tenant = match &key.tenant {
                None => None,
                Some(name) => match tenants.iter().find(|t| &*t.name == name) {
                    Some(tenant) => Some(Arc::clone(tenant)),
                    None => {
                        let tenant = Arc::new(Tenant {
                            name: name.as_str().into(),
                            salt: format!("{CACHE_SALT_PREFIX}{name}").into(),
                            hasher: BlockHasher::builder(block_size)
                                .cache_namespace(name)
                                .build()?,
                        });
                        tenants.push(Arc::clone(&tenant));
                        Some(tenant)
                    }
                },
            };
            built.push(Key {
                digest: blake3::hash(key.key.as_bytes()),
                tenant,
                admin: key.admin,
                concurrency: key
                    .max_concurrent
                    .map(|n| Arc::new(Semaphore::new(n as usize))),
                rate: key.requests_per_minute.map(|n| {
                    Mutex::new(Bucket {
                        per_minute: f64::from(n),
                        tokens: f64::from(n),
                        at: Instant::now(),
                    })
                }),
            });
        }
        Ok(Self { keys: built })
    }

    /// Whether requests need a key.
    pub(crate) fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The caller of a request with `headers`, if its key lets it in (`admin_only`: the
    /// endpoint needs an admin key).
    pub(crate) fn authenticate(
        &self,
        headers: &HeaderMap,
        admin_only: bool,
    ) -> Result<Caller, Refusal> {
        if !self.enabled() {
            return Ok(Caller {
                tenant: None,
                _slot: None,
            });
        }
        let token = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(|value| {
                value
                    .strip_prefix("Bearer ")
                    .or_else(|| value.strip_prefix("bearer "))
            })
            .map(str::trim)
            .ok_or(Refusal::Missing)?;
        let digest = blake3::hash(token.as_bytes());
        // Every key is compared, so the time taken does not depend on which one matched.
        let mut found = None;
        for key in &self.keys {
            if key.digest == digest {
                found = Some(key);
            }
        }
        let key = found.ok_or(Refusal::Wrong)?;
        if admin_only && !key.admin {
            return Err(Refusal::NotAdmin);
        }
        let slot = match &key.concurrency {
            Some(slots) => Some(
                Arc::clone(slots)
                    .try_acquire_owned()
                    .map_err(|_| Refusal::Concurrency)?,
            ),
            None => None,
        };
        if let Some(rate) = &key.rate {
            let mut bucket = rate.lock().unwrap_or_else(|e| e.into_inner());
            bucket.take(Instant::now()).map_err(Refusal::Rate)?;
        }
        Ok(Caller {
            tenant: key.tenant.clone(),
            _slot: slot,
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use std::time::Duration;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        headers
    }

    #[test]
    fn keys_admit_their_holders_only() {
        let mut limited = ApiKeyConfig::new("k2").with_tenant("a");
        limited.max_concurrent = Some(1);
        let keys = ApiKeys::new(
            &[
                ApiKeyConfig::new("k1").admin(),
                limited,
                ApiKeyConfig::new("k3").with_tenant("a"),
            ],
            16,
        )
        .unwrap();
        assert!(keys.enabled());
        assert_eq!(
            keys.authenticate(&HeaderMap::new(), false).err(),
            Some(Refusal::Missing)
        );
        assert_eq!(
            keys.authenticate(&bearer("k4"), false).err(),
            Some(Refusal::Wrong)
        );
        assert_eq!(
            keys.authenticate(&bearer("k2"), true).err(),
            Some(Refusal::NotAdmin)
        );
        assert!(keys.authenticate(&bearer("k1"), true).is_ok());
        let held = keys.authenticate(&bearer("k2"), false).unwrap();
        assert_eq!(
            keys.authenticate(&bearer("k2"), false).err(),
            Some(Refusal::Concurrency)
        );
        // k3 shares k2's tenant (one namespace), not its slots.
        let other = keys.authenticate(&bearer("k3"), false).unwrap();
        let (a, b) = (held.tenant.clone().unwrap(), other.tenant.clone().unwrap());
        assert!(Arc::ptr_eq(&a, &b));
        assert_ne!(a.hasher.seed(), BlockHasher::new(16).unwrap().seed());
        drop(other);
        assert!(keys.authenticate(&bearer("k2"), false).is_err());
        drop(held);
        assert!(keys.authenticate(&bearer("k2"), false).is_ok());
        let open = ApiKeys::new(&[], 16).unwrap();
        assert!(open.authenticate(&HeaderMap::new(), true).is_ok());
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let start = Instant::now();
        let mut bucket = Bucket {
            per_minute: 2.0,
            tokens: 2.0,
            at: start,
        };
        assert_eq!(bucket.take(start), Ok(()));
        assert_eq!(bucket.take(start), Ok(()));
        assert_eq!(bucket.take(start), Err(30));
        assert_eq!(bucket.take(start + Duration::from_secs(15)), Err(15));
        assert_eq!(bucket.take(start + Duration::from_secs(30)), Ok(()));
    }
}
