//! Why a request could not be preprocessed.

use kvroute_mmhash::{ExpandError, MediaError, TokenError};
use kvroute_protocol::ErrorBody;

/// Errors turning a request into token ids. Everything except [`Self::Model`] is the client's
/// doing and maps to an HTTP 400 with [`Self::to_error_body`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PreprocessError {
    /// The body is not a valid request (missing field, wrong type, unknown role, ...).
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
        /// The field at fault.
        param: Option<String>,
    },
    /// An image could not be used (undecodable, refused URL, too large, ...).
    #[error("{param}: {source}")]
    Image {
        /// The image part at fault (`messages[1].content[0]`).
        param: String,
        /// Why.
        #[source]
        source: MediaError,
    },
    /// The image's or video's visual tokens could not be counted: a size the model refuses,
    /// or a family (or video) whose count kvroute does not know
    /// ([`TokenError::Unsupported`], code `unsupported_media`).
    #[error("{param}: {source}")]
    VisualTokens {
        /// The image part at fault.
        param: String,
        /// Why.
        #[source]
        source: TokenError,
    },
    /// The chat template refused the conversation (`raise_exception`) or failed on it.
    #[error("the chat template failed on this conversation: {0}")]
    Template(String),
    /// The rendered prompt has a different number of image placeholders than the request has
    /// images (a template that drops images, or placeholder text typed by the user).
    #[error("{0}")]
    Placeholders(#[source] ExpandError),
    /// The prompt is longer than the configured limit.
    #[error("the prompt has {tokens} tokens, more than the limit of {limit}")]
    PromptTooLong {
        /// Tokens in the prompt, visual tokens included.
        tokens: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The prompt text is too long for any tokenization to fit the limit: refused before
    /// tokenizing it (no token of the vocabulary is longer than `max_token_bytes`).
    #[error("the prompt has {bytes} bytes, more than {limit} tokens can hold")]
    PromptTooLarge {
        /// Bytes of prompt text.
        bytes: usize,
        /// The configured token limit.
        limit: usize,
    },
    /// The model bundle is unusable (missing or malformed files, a template that does not
    /// compile, a tokenizer that fails). The operator's doing, not the client's.
    #[error("model: {0}")]
    Model(String),
}

impl PreprocessError {
    /// Whether the request is at fault (HTTP 400) rather than the deployment (HTTP 500).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Model(_))
    }

    /// A stable code for metrics and the error body.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidRequest { .. } => "invalid_request",
            Self::Image { .. } => "invalid_image",
            Self::VisualTokens {
                source: TokenError::Unsupported { .. },
                ..
            } => "unsupported_media",
            Self::VisualTokens { .. } => "invalid_image_size",
            Self::Template(_) => "chat_template_error",
            Self::Placeholders(_) => "image_placeholder_mismatch",
            Self::PromptTooLong { .. } | Self::PromptTooLarge { .. } => "context_length_exceeded",
            Self::Model(_) => "model_error",
        }
    }

    /// The request field at fault, if any.
    pub fn param(&self) -> Option<&str> {
        match self {
            Self::InvalidRequest { param, .. } => param.as_deref(),
            Self::Image { param, .. } | Self::VisualTokens { param, .. } => Some(param),
            Self::PromptTooLong { .. } | Self::PromptTooLarge { .. } => Some("messages"),
            _ => None,
        }
    }

    /// The OpenAI-style body to send back.
    ///
    /// ```
    /// use kvroute_preprocess::ChatRequest;
    ///
    /// let error = ChatRequest::from_json(br#"{"model": "m"}"#).unwrap_err();
    /// let body = error.to_error_body();
    /// assert_eq!(body.error.kind, "invalid_request_error");
    /// assert_eq!(body.error.param.as_deref(), Some("messages"));
    /// ```
    pub fn to_error_body(&self) -> ErrorBody {
        let kind = if self.is_client_error() {
            "invalid_request_error"
        } else {
            "server_error"
        };
        ErrorBody::new(kind, self.to_string(), self.param(), self.code())
    }
}
