//! What a worker announces about itself when it registers with the routers.

use crate::{ProtocolError, WorkerId};
use serde::{Deserialize, Serialize};

/// A worker's registration: the value it keeps fresh in the registration bucket (JSON).
///
/// ```
/// use kvroute_protocol::{WorkerId, WorkerRecord};
///
/// let record = WorkerRecord::new(WorkerId(3), "http://10.0.0.3:8000").with_block_size(32);
/// let json = record.to_json();
/// assert_eq!(json, r#"{"worker_id":3,"url":"http://10.0.0.3:8000","block_size":32}"#);
/// assert_eq!(WorkerRecord::from_json(json.as_bytes())?, record);
/// # Ok::<(), kvroute_protocol::ProtocolError>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct WorkerRecord {
    /// The id its KV events carry.
    pub worker_id: WorkerId,
    /// Its OpenAI-compatible base URL, e.g. `http://10.0.0.5:8000`.
    pub url: String,
    /// The model it serves, when it says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Tokens per KV block it hashes with, when it says: a router with another block size
    /// would never find its blocks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block_size: Option<u32>,
}

impl WorkerRecord {
    /// A record for `worker_id` serving at `url`.
    pub fn new(worker_id: WorkerId, url: impl Into<String>) -> Self {
        Self {
            worker_id,
            url: url.into(),
            model: None,
            block_size: None,
        }
    }

    /// Sets the model served.
    pub fn with_model(mut self, model: impl Into<String>) -> Self {
        self.model = Some(model.into());
        self
    }

    /// Sets the KV block size.
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        self.block_size = Some(block_size);
        self
    }

    /// Reads a record.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        serde_json::from_slice(bytes).map_err(ProtocolError::WorkerRecord)
    }

    /// Writes the record.
    pub fn to_json(&self) -> String {
        // A struct of strings and integers always serializes.
        serde_json::to_string(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_ignored_and_bad_records_are_errors() {
        let record = WorkerRecord::from_json(
            br#"{"worker_id":18446744073709551615,"url":"http://a:1","model":"m","extra":true}"#,
        )
        .unwrap();
        assert_eq!(record.worker_id, WorkerId(u64::MAX));
        assert_eq!(record.model.as_deref(), Some("m"));
        for bad in [
            &b"{}"[..],
            b"[1]",
            b"{\"worker_id\":-1,\"url\":\"x\"}",
            b"\xff",
        ] {
            assert!(
                matches!(
                    WorkerRecord::from_json(bad),
                    Err(ProtocolError::WorkerRecord(_))
                ),
                "{bad:?}"
            );
        }
    }
}
