//! OpenAI's error body, which every kvroute HTTP error uses.

use serde::{Deserialize, Serialize};

/// `{"error": {"message": ..., "type": ..., "param": ..., "code": ...}}`, as OpenAI's API and
/// vLLM return it, so clients' error handling works unchanged.
///
/// ```
/// use kvroute_protocol::ErrorBody;
///
/// let body = ErrorBody::invalid_request("messages is required", Some("messages"), "missing_field");
/// assert_eq!(
///     serde_json::to_string(&body)?,
///     r#"{"error":{"message":"messages is required","type":"invalid_request_error","param":"messages","code":"missing_field"}}"#
/// );
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// The inside of an [`ErrorBody`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    /// What went wrong, for people.
    pub message: String,
    /// The class: `invalid_request_error` for 4xx caused by the request, `server_error` ...
    #[serde(rename = "type")]
    pub kind: String,
    /// The request field at fault (`messages[1].content[0]`), when there is one.
    pub param: Option<String>,
    /// A stable machine-readable code.
    pub code: Option<String>,
}

impl ErrorBody {
    /// An `invalid_request_error` (HTTP 400).
    pub fn invalid_request(message: impl Into<String>, param: Option<&str>, code: &str) -> Self {
        Self::new("invalid_request_error", message, param, code)
    }

    /// An error of any `type`.
    pub fn new(kind: &str, message: impl Into<String>, param: Option<&str>, code: &str) -> Self {
        Self {
            error: ErrorDetail {
                message: message.into(),
                kind: kind.to_owned(),
                param: param.map(str::to_owned),
                code: Some(code.to_owned()),
            },
        }
    }
}
