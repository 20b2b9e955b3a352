//! OpenAI request bodies: validated views over the client's JSON, which is kept whole for
//! forwarding.

use crate::error::PreprocessError;
use serde_json::{Map, Value};

/// A role in a chat conversation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Role {
    /// Instructions from the deployer.
    System,
    /// OpenAI's newer name for system instructions.
    Developer,
    /// The end user.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
    /// A function's result (the deprecated form of `tool`).
    Function,
}

impl Role {
    fn parse(role: &str) -> Option<Self> {
        Some(match role {
            "system" => Self::System,
            "developer" => Self::Developer,
            "user" => Self::User,
            "assistant" => Self::Assistant,
            "tool" => Self::Tool,
            "function" => Self::Function,
            _ => return None,
        })
    }
}

/// One image part of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImagePart {
    /// Index of the message that holds the image.
    pub message: usize,
    /// Index of the part within the message content.
    pub part: usize,
    /// `data:` URL or http(s) URL.
    pub url: String,
    /// The client's own identity for the image (vLLM's `uuid` on the part), if any.
    pub uuid: Option<String>,
}

impl ImagePart {
    /// The JSON path of the part, for error messages (`messages[1].content[0]`).
    pub fn param(&self) -> String {
        format!("messages[{}].content[{}]", self.message, self.part)
    }
}

/// A validated chat completion request.
///
/// The whole body is kept (`body`) so the gateway forwards every field it does not interpret,
/// unchanged; the typed fields are what routing needs.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ChatRequest {
    /// The request body as received.
    pub body: Map<String, Value>,
    /// `model`.
    pub model: String,
    /// `stream`.
    pub stream: bool,
    /// `max_completion_tokens`, or the older `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Every image part, in conversation order.
    pub images: Vec<ImagePart>,
    /// The messages as the chat template sees them: image parts become `{"type": "image"}`
    /// (what HF templates expect), text parts stay, other keys pass through.
    pub template_messages: Vec<Value>,
    /// `add_generation_prompt` (a vLLM extension; default true).
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs` (a vLLM extension), e.g. `{"add_vision_id": true}`.
    pub template_kwargs: Map<String, Value>,
}

impl ChatRequest {
    /// Parses and validates a `/v1/chat/completions` body.
    ///
    /// ```
    /// use kvroute_preprocess::ChatRequest;
    ///
    /// let body = br#"{"model": "m", "messages": [{"role": "user", "content": [
    ///     {"type": "text", "text": "What is this?"},
    ///     {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]}"#;
    /// let request = ChatRequest::from_json(body)?;
    /// assert_eq!(request.images.len(), 1);
    /// assert_eq!(request.images[0].param(), "messages[0].content[1]");
    /// # Ok::<(), kvroute_preprocess::PreprocessError>(())
    /// ```
    pub fn from_json(bytes: &[u8]) -> Result<Self, PreprocessError> {
        let body = parse_object(bytes)?;
        let model = required_str(&body, "model")?.to_owned();
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let max_tokens = match optional_u64(&body, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => optional_u64(&body, "max_tokens")?,
        };
        let add_generation_prompt = optional_bool(&body, "add_generation_prompt")?.unwrap_or(true);
        let template_kwargs = match body.get("chat_template_kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(kwargs)) => kwargs.clone(),
            Some(_) => return Err(invalid("must be an object", "chat_template_kwargs")),
        };

        let messages = match body.get("messages") {
            Some(Value::Array(messages)) if !messages.is_empty() => messages,
            Some(Value::Array(_)) => return Err(invalid("must not be empty", "messages")),
            Some(_) => return Err(invalid("must be an array of messages", "messages")),
            None => return Err(invalid("is required", "messages")),
        };
        let mut images = Vec::new();
        let mut template_messages = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            template_messages.push(template_message(index, message, &mut images)?);
        }
        Ok(Self {
            body,
            model,
            stream,
            max_tokens,
            images,
            template_messages,
            add_generation_prompt,
            template_kwargs,
        })
    }
}

fn template_message(
    index: usize,
    message: &Value,
    images: &mut Vec<ImagePart>,
) -> Result<Value, PreprocessError> {
    let path = format!("messages[{index}]");
    let Value::Object(message) = message else {
        return Err(invalid("must be an object", &path));
    };
    let role = match message.get("role") {
        Some(Value::String(role)) => Role::parse(role).ok_or_else(|| {
            invalid(
                &format!("has unknown role {role:?} (expected system, developer, user, assistant, tool or function)"),
                &format!("{path}.role"),
            )
        })?,
        Some(_) => return Err(invalid("must be a string", &format!("{path}.role"))),
        None => return Err(invalid("is required", &format!("{path}.role"))),
    };
    let mut template_content = match message.get("content") {
        Some(Value::String(_)) => None,
        None | Some(Value::Null) if role == Role::Assistant => None,
        None | Some(Value::Null) => {
            return Err(invalid("is required", &format!("{path}.content")));
        }
        Some(Value::Array(parts)) => {
            let mut template_parts = Vec::with_capacity(parts.len());
            for (part_index, part) in parts.iter().enumerate() {
                let part_path = format!("{path}.content[{part_index}]");
                template_parts.push(template_part(index, part_index, &part_path, part, images)?);
            }
            Some(Value::Array(template_parts))
        }
        Some(_) => {
            return Err(invalid(
                "must be a string or an array of content parts",
                &format!("{path}.content"),
            ))
        }
    };
    // Copy the message field by field: cloning it whole would copy every base64 image in it.
    let out: Map<String, Value> = message
        .iter()
        .map(|(key, value)| {
            let value = match key.as_str() {
                "content" => template_content.take().unwrap_or_else(|| value.clone()),
                _ => value.clone(),
            };
            (key.clone(), value)
        })
        .collect();
    Ok(Value::Object(out))
}

fn template_part(
    message: usize,
    part_index: usize,
    path: &str,
    part: &Value,
    images: &mut Vec<ImagePart>,
) -> Result<Value, PreprocessError> {
    let Value::Object(part) = part else {
        return Err(invalid("must be an object", path));
    };
    let kind = match part.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(invalid("must be a string", &format!("{path}.type"))),
        None => return Err(invalid("is required", &format!("{path}.type"))),
    };
    match kind {
        "text" => match part.get("text") {
            Some(Value::String(_)) => Ok(Value::Object(part.clone())),
            _ => Err(invalid("must be a string", &format!("{path}.text"))),
        },
        "image_url" => {
            let url = match part.get("image_url") {
                Some(Value::Object(image)) => match image.get("url") {
                    Some(Value::String(url)) => url.clone(),
                    _ => {
                        return Err(invalid(
                            "must be a string",
                            &format!("{path}.image_url.url"),
                        ))
                    }
                },
                // Some clients send the URL directly.
                Some(Value::String(url)) => url.clone(),
                _ => {
                    return Err(invalid(
                        "must be an object with a url",
                        &format!("{path}.image_url"),
                    ))
                }
            };
            let uuid = match part.get("uuid") {
                None | Some(Value::Null) => None,
                Some(Value::String(uuid)) if !uuid.is_empty() => Some(uuid.clone()),
                Some(_) => {
                    return Err(invalid(
                        "must be a non-empty string",
                        &format!("{path}.uuid"),
                    ))
                }
            };
            images.push(ImagePart {
                message,
                part: part_index,
                url,
                uuid,
            });
            let mut placeholder = Map::new();
            placeholder.insert("type".to_owned(), Value::String("image".to_owned()));
            Ok(Value::Object(placeholder))
        }
        other => Err(invalid(
            &format!("has unsupported content part type {other:?} (supported: text, image_url)"),
            &format!("{path}.type"),
        )),
    }
}

/// What a `/v1/completions` prompt is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CompletionPrompt {
    /// Text, tokenized with the tokenizer's special tokens (BOS where the model has one).
    Text(String),
    /// Token ids, used as they are.
    Tokens(Vec<u32>),
}

/// A validated completion request.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct CompletionRequest {
    /// The request body as received.
    pub body: Map<String, Value>,
    /// `model`.
    pub model: String,
    /// `stream`.
    pub stream: bool,
    /// `max_tokens`.
    pub max_tokens: Option<u64>,
    /// `prompt`.
    pub prompt: CompletionPrompt,
}

impl CompletionRequest {
    /// Parses and validates a `/v1/completions` body: `prompt` is a string, an array of token
    /// ids, or an array holding one of those (batches of several prompts are refused: one
    /// request is routed to one worker).
    pub fn from_json(bytes: &[u8]) -> Result<Self, PreprocessError> {
        let body = parse_object(bytes)?;
        let model = required_str(&body, "model")?.to_owned();
        let stream = optional_bool(&body, "stream")?.unwrap_or(false);
        let max_tokens = optional_u64(&body, "max_tokens")?;
        let prompt = match body.get("prompt") {
            None => return Err(invalid("is required", "prompt")),
            Some(prompt) => parse_prompt(prompt, "prompt", true)?,
        };
        Ok(Self {
            body,
            model,
            stream,
            max_tokens,
            prompt,
        })
    }
}

fn parse_prompt(
    prompt: &Value,
    path: &str,
    allow_batch: bool,
) -> Result<CompletionPrompt, PreprocessError> {
    match prompt {
        Value::String(text) => Ok(CompletionPrompt::Text(text.clone())),
        Value::Array(items) if items.iter().all(Value::is_number) && !items.is_empty() => items
            .iter()
            .enumerate()
            .map(|(i, id)| {
                id.as_u64()
                    .and_then(|id| u32::try_from(id).ok())
                    .ok_or_else(|| {
                        invalid("must be a token id (0 to 2^32-1)", &format!("{path}[{i}]"))
                    })
            })
            .collect::<Result<_, _>>()
            .map(CompletionPrompt::Tokens),
        Value::Array(items) if allow_batch && items.len() == 1 => {
            parse_prompt(&items[0], &format!("{path}[0]"), false)
        }
        Value::Array(items) if allow_batch && items.len() > 1 => Err(invalid(
            "holds several prompts: send one request per prompt, each is routed on its own",
            path,
        )),
        _ => Err(invalid("must be a string or an array of token ids", path)),
    }
}

fn parse_object(bytes: &[u8]) -> Result<Map<String, Value>, PreprocessError> {
    match serde_json::from_slice(bytes) {
        Ok(Value::Object(body)) => Ok(body),
        Ok(_) => Err(PreprocessError::InvalidRequest {
            message: "the request body must be a JSON object".to_owned(),
            param: None,
        }),
        Err(error) => Err(PreprocessError::InvalidRequest {
            message: format!("the request body is not valid JSON: {error}"),
            param: None,
        }),
    }
}

fn required_str<'a>(body: &'a Map<String, Value>, key: &str) -> Result<&'a str, PreprocessError> {
    match body.get(key) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(invalid("must be a string", key)),
        None => Err(invalid("is required", key)),
    }
}

fn optional_bool(body: &Map<String, Value>, key: &str) -> Result<Option<bool>, PreprocessError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(value)) => Ok(Some(*value)),
        Some(_) => Err(invalid("must be a boolean", key)),
    }
}

fn optional_u64(body: &Map<String, Value>, key: &str) -> Result<Option<u64>, PreprocessError> {
    match body.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(value) => value
            .as_u64()
            .map(Some)
            .ok_or_else(|| invalid("must be a non-negative integer", key)),
    }
}

fn invalid(what: &str, param: &str) -> PreprocessError {
    PreprocessError::InvalidRequest {
        message: format!("{param} {what}"),
        param: Some(param.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(body: &str) -> (String, Option<String>) {
        match ChatRequest::from_json(body.as_bytes()) {
            Err(PreprocessError::InvalidRequest { message, param }) => (message, param),
            other => panic!("{body}: expected an invalid request, got {other:?}"),
        }
    }

    #[test]
    fn bad_chat_requests_name_the_offending_field() {
        for (body, param) in [
            (r#"{"model":"m"}"#, Some("messages")),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (r#"{"model":"m","messages":{}}"#, Some("messages")),
            (
                r#"{"messages":[{"role":"user","content":"hi"}]}"#,
                Some("model"),
            ),
            (
                r#"{"model":1,"messages":[{"role":"user","content":"hi"}]}"#,
                Some("model"),
            ),
            (r#"{"model":"m","messages":[1]}"#, Some("messages[0]")),
            (
                r#"{"model":"m","messages":[{"content":"hi"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"wizard","content":"hi"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"audio"}]}]}"#,
                Some("messages[0].content[0].type"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text"}]}]}"#,
                Some("messages[0].content[0].text"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{}}]}]}"#,
                Some("messages[0].content[0].image_url.url"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"x"},"uuid":7}]}]}"#,
                Some("messages[0].content[0].uuid"),
            ),
            (
                r#"{"model":"m","stream":"yes","messages":[{"role":"user","content":"hi"}]}"#,
                Some("stream"),
            ),
            (
                r#"{"model":"m","max_tokens":-1,"messages":[{"role":"user","content":"hi"}]}"#,
                Some("max_tokens"),
            ),
            ("[1,2]", None),
            ("{", None),
        ] {
            assert_eq!(error(body).1.as_deref(), param, "{body}");
        }
    }

    #[test]
    fn assistant_content_may_be_null_and_unknown_fields_are_kept() {
        let body = r#"{"model":"m","temperature":0.2,"x_custom":{"a":1},"messages":[
            {"role":"user","content":"hi"},
            {"role":"assistant","content":null,"tool_calls":[]},
            {"role":"tool","content":"42","tool_call_id":"c1"}]}"#;
        let request = ChatRequest::from_json(body.as_bytes()).unwrap();
        assert_eq!(request.body["temperature"], 0.2);
        assert_eq!(request.body["x_custom"]["a"], 1);
        assert_eq!(request.template_messages[2]["tool_call_id"], "c1");
        assert!(request.add_generation_prompt);
    }

    #[test]
    fn completion_prompts() {
        let parse = |body: &str| CompletionRequest::from_json(body.as_bytes()).map(|r| r.prompt);
        assert_eq!(
            parse(r#"{"model":"m","prompt":"hi"}"#).unwrap(),
            CompletionPrompt::Text("hi".into())
        );
        assert_eq!(
            parse(r#"{"model":"m","prompt":[1,2]}"#).unwrap(),
            CompletionPrompt::Tokens(vec![1, 2])
        );
        assert_eq!(
            parse(r#"{"model":"m","prompt":[[1,2]]}"#).unwrap(),
            CompletionPrompt::Tokens(vec![1, 2])
        );
        assert_eq!(
            parse(r#"{"model":"m","prompt":["a"]}"#).unwrap(),
            CompletionPrompt::Text("a".into())
        );
        for bad in [
            r#"{"model":"m","prompt":["a","b"]}"#,
            r#"{"model":"m","prompt":[-1]}"#,
            r#"{"model":"m","prompt":[4294967296]}"#,
            r#"{"model":"m","prompt":{}}"#,
            r#"{"model":"m","prompt":[]}"#,
            r#"{"model":"m"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
