//! OpenAI request bodies: validated views over the client's JSON, which is kept whole for
//! forwarding. A chat request borrows its image URLs from the body.

#[cfg(test)]
mod reference;
mod shape;

use crate::error::PreprocessError;
use serde_json::{Map, Value};
use shape::{RawBody, RawContent, RawImageUrl, RawMessage, RawMessages, RawPart};
use std::borrow::Cow;

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

/// One image (or video) part of a message.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ImagePart<'a> {
    /// Index of the message that holds the image.
    pub message: usize,
    /// Index of the part within the message content.
    pub part: usize,
    /// `data:` URL or http(s) URL, borrowed from the body unless it holds a JSON escape.
    pub url: Cow<'a, str>,
    /// The client's own identity for the image (vLLM's `uuid` on the part), if any.
    pub uuid: Option<String>,
    /// Where a member can be added to the part's object in [`ChatRequest::body`]: the byte
    /// offset of the opening quote of the object's first key, so that inserting
    /// `"uuid":"…",` there keeps the body valid JSON. `None` when that key holds an escape
    /// (its position is unknown) or when the part already has a `uuid` member (a `null` one:
    /// a second would duplicate the key).
    pub insert_at: Option<usize>,
}

impl ImagePart<'_> {
    /// The JSON path of the part, for error messages (`messages[1].content[0]`).
    pub fn param(&self) -> String {
        format!("messages[{}].content[{}]", self.message, self.part)
    }
}

/// A validated chat completion request, borrowing from the body it was parsed from.
///
/// The body is parsed once: the large strings in it (base64 image URLs) are borrowed, not
/// copied; the typed fields are what routing needs, and the body itself is kept (`body`) so
/// that the gateway forwards every field it does not interpret, unchanged.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ChatRequest<'a> {
    /// The request body as received.
    pub body: &'a str,
    /// `model`.
    pub model: String,
    /// `stream`.
    pub stream: bool,
    /// `max_completion_tokens`, or the older `max_tokens`.
    pub max_tokens: Option<u64>,
    /// Every image part, in conversation order.
    pub images: Vec<ImagePart<'a>>,
    /// Every video part (`video_url`, as vLLM takes it), in conversation order.
    pub videos: Vec<ImagePart<'a>>,
    /// The messages as the chat template sees them: image parts become `{"type": "image"}`
    /// and video parts `{"type": "video"}` (what HF templates expect), text parts stay, other
    /// keys pass through (but for `image_url` and `video_url` members on other parts).
    pub template_messages: Vec<Value>,
    /// `add_generation_prompt` (a vLLM extension; default true).
    pub add_generation_prompt: bool,
    /// `chat_template_kwargs` (a vLLM extension), e.g. `{"add_vision_id": true}`.
    pub template_kwargs: Map<String, Value>,
    /// Every top-level member but `messages`.
    fields: Map<String, Value>,
}

impl<'a> ChatRequest<'a> {
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
    /// assert_eq!(request.images[0].url, "data:image/png;base64,AAAA");
    /// # Ok::<(), kvroute_preprocess::PreprocessError>(())
    /// ```
    pub fn from_json(bytes: &'a [u8]) -> Result<Self, PreprocessError> {
        // One UTF-8 check of the whole body, then a parse that checks no string again.
        let body = std::str::from_utf8(bytes).map_err(|error| not_json(&error))?;
        let (fields, messages) = match shape::parse(body) {
            Ok(RawBody::Object { fields, messages }) => (fields, messages),
            Ok(RawBody::Other) => return Err(not_an_object()),
            Err(error) => return Err(not_json(&error)),
        };
        let model = required_str(&fields, "model")?.to_owned();
        let stream = optional_bool(&fields, "stream")?.unwrap_or(false);
        let max_tokens = match optional_u64(&fields, "max_completion_tokens")? {
            Some(n) => Some(n),
            None => optional_u64(&fields, "max_tokens")?,
        };
        let add_generation_prompt =
            optional_bool(&fields, "add_generation_prompt")?.unwrap_or(true);
        let template_kwargs = match fields.get("chat_template_kwargs") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(kwargs)) => kwargs.clone(),
            Some(_) => return Err(invalid("must be an object", "chat_template_kwargs")),
        };

        let messages = match messages {
            Some(RawMessages::Array(messages)) if !messages.is_empty() => messages,
            Some(RawMessages::Array(_)) => return Err(invalid("must not be empty", "messages")),
            Some(RawMessages::Other) => {
                return Err(invalid("must be an array of messages", "messages"))
            }
            None => return Err(invalid("is required", "messages")),
        };
        let mut media = MediaParts::default();
        let mut template_messages = Vec::with_capacity(messages.len());
        for (index, message) in messages.into_iter().enumerate() {
            template_messages.push(template_message(body, index, message, &mut media)?);
        }
        let MediaParts { images, videos } = media;
        Ok(Self {
            body,
            model,
            stream,
            max_tokens,
            images,
            videos,
            template_messages,
            add_generation_prompt,
            template_kwargs,
            fields,
        })
    }

    /// A top-level member of the body other than `messages` (those are in
    /// [`template_messages`](Self::template_messages) and [`images`](Self::images)).
    ///
    /// ```
    /// use kvroute_preprocess::ChatRequest;
    ///
    /// let request = ChatRequest::from_json(
    ///     br#"{"model": "m", "stream_options": {"include_usage": true},
    ///          "messages": [{"role": "user", "content": "hi"}]}"#,
    /// )?;
    /// assert_eq!(request.field("stream_options").unwrap()["include_usage"], true);
    /// assert_eq!(request.field("temperature"), None);
    /// # Ok::<(), kvroute_preprocess::PreprocessError>(())
    /// ```
    pub fn field(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }
}

/// The image and video parts found so far.
#[derive(Default)]
struct MediaParts<'a> {
    images: Vec<ImagePart<'a>>,
    videos: Vec<ImagePart<'a>>,
}

fn template_message<'a>(
    body: &'a str,
    index: usize,
    message: RawMessage<'a>,
    media: &mut MediaParts<'a>,
) -> Result<Value, PreprocessError> {
    let path = format!("messages[{index}]");
    let RawMessage::Object {
        mut members,
        content,
    } = message
    else {
        return Err(invalid("must be an object", &path));
    };
    let role = match members.get("role") {
        Some(Value::String(role)) => Role::parse(role).ok_or_else(|| {
            invalid(
                &format!("has unknown role {role:?} (expected system, developer, user, assistant, tool or function)"),
                &format!("{path}.role"),
            )
        })?,
        Some(_) => return Err(invalid("must be a string", &format!("{path}.role"))),
        None => return Err(invalid("is required", &format!("{path}.role"))),
    };
    let content = match content {
        Some(RawContent::Text(text)) => Value::String(text),
        None | Some(RawContent::Null) if role == Role::Assistant => {
            return Ok(Value::Object(members))
        }
        None | Some(RawContent::Null) => {
            return Err(invalid("is required", &format!("{path}.content")));
        }
        Some(RawContent::Parts(parts)) => {
            let mut template_parts = Vec::with_capacity(parts.len());
            for (part_index, part) in parts.into_iter().enumerate() {
                let part_path = format!("{path}.content[{part_index}]");
                template_parts.push(template_part(
                    body, index, part_index, &part_path, part, media,
                )?);
            }
            Value::Array(template_parts)
        }
        Some(RawContent::Other) => {
            return Err(invalid(
                "must be a string or an array of content parts",
                &format!("{path}.content"),
            ))
        }
    };
    // `content` is already a member (null until now): this keeps its place.
    members.insert("content".to_owned(), content);
    Ok(Value::Object(members))
}

fn template_part<'a>(
    body: &'a str,
    message: usize,
    part_index: usize,
    path: &str,
    part: RawPart<'a>,
    media: &mut MediaParts<'a>,
) -> Result<Value, PreprocessError> {
    let RawPart::Object {
        members,
        image_url,
        video_url,
        first_key,
    } = part
    else {
        return Err(invalid("must be an object", path));
    };
    let kind = match members.get("type") {
        Some(Value::String(kind)) => kind.as_str(),
        Some(_) => return Err(invalid("must be a string", &format!("{path}.type"))),
        None => return Err(invalid("is required", &format!("{path}.type"))),
    };
    let (url, key, template_type, list) = match kind {
        "text" => {
            return match members.get("text") {
                Some(Value::String(_)) => Ok(Value::Object(members)),
                _ => Err(invalid("must be a string", &format!("{path}.text"))),
            }
        }
        "image_url" => (image_url, "image_url", "image", &mut media.images),
        "video_url" => (video_url, "video_url", "video", &mut media.videos),
        other => {
            return Err(invalid(
                &format!(
                    "has unsupported content part type {other:?} (supported: text, image_url, video_url)"
                ),
                &format!("{path}.type"),
            ))
        }
    };
    let url = match url {
        Some(RawImageUrl::Url(url)) => url,
        Some(RawImageUrl::Raw(url)) => {
            Cow::Borrowed(str_in(body, url).ok_or_else(|| not_json(&"a string outside the body"))?)
        }
        Some(RawImageUrl::NoUrl) => {
            return Err(invalid("must be a string", &format!("{path}.{key}.url")))
        }
        // Some clients send the URL directly, as a string (`Url` above).
        Some(RawImageUrl::Other) | None => {
            return Err(invalid(
                "must be an object with a url",
                &format!("{path}.{key}"),
            ))
        }
    };
    let uuid = match members.get("uuid") {
        None | Some(Value::Null) => None,
        Some(Value::String(uuid)) if !uuid.is_empty() => Some(uuid.clone()),
        Some(_) => {
            return Err(invalid(
                "must be a non-empty string",
                &format!("{path}.uuid"),
            ))
        }
    };
    let insert_at = if members.contains_key("uuid") {
        None
    } else {
        first_key.and_then(|key| quote_before(body, key))
    };
    list.push(ImagePart {
        message,
        part: part_index,
        url,
        uuid,
        insert_at,
    });
    let mut placeholder = Map::new();
    placeholder.insert("type".to_owned(), Value::String(template_type.to_owned()));
    Ok(Value::Object(placeholder))
}

/// `bytes`, a slice of `body`, as the `str` it is.
fn str_in<'a>(body: &'a str, bytes: &[u8]) -> Option<&'a str> {
    let start = (bytes.as_ptr() as usize).checked_sub(body.as_ptr() as usize)?;
    body.get(start..start.checked_add(bytes.len())?)
}

/// The offset in `body` of the quote that opens `key`, a string borrowed from `body`.
fn quote_before(body: &str, key: &str) -> Option<usize> {
    let at = (key.as_ptr() as usize)
        .checked_sub(body.as_ptr() as usize)?
        .checked_sub(1)?;
    (body.as_bytes().get(at) == Some(&b'"')).then_some(at)
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
        Ok(_) => Err(not_an_object()),
        Err(error) => Err(not_json(&error)),
    }
}

fn not_an_object() -> PreprocessError {
    PreprocessError::InvalidRequest {
        message: "the request body must be a JSON object".to_owned(),
        param: None,
    }
}

fn not_json(error: &dyn std::fmt::Display) -> PreprocessError {
    PreprocessError::InvalidRequest {
        message: format!("the request body is not valid JSON: {error}"),
        param: None,
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
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":5}}]}]}"#,
                Some("messages[0].content[0].image_url.url"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":null}}]}]}"#,
                Some("messages[0].content[0].image_url.url"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":["a"]}}]}]}"#,
                Some("messages[0].content[0].image_url.url"),
            ),
            // A raw control character in a string is not JSON.
            (
                "{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"image_url\",\"image_url\":{\"url\":\"data:a\nb\"}}]}]}",
                None,
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"data:,a"}}]}]} x"#,
                None,
            ),
            ("[1,2]", None),
            ("{", None),
        ] {
            assert_eq!(error(body).1.as_deref(), param, "{body}");
        }
    }

    #[test]
    fn image_urls_are_borrowed_unless_escaped() {
        let body = r#"{"model":"m","messages":[{"role":"user","content":[
            {"type":"image_url","image_url":{"url":"data:image/png;base64,AAAA","detail":"low"}},
            {"type":"image_url","image_url":{"url":"data:image\/png;base64,AAAA"}},
            {"type":"image_url","image_url":"data:image/png;base64,AAAA"}]}]}"#;
        let request = ChatRequest::from_json(body.as_bytes()).unwrap();
        let urls: Vec<_> = request.images.iter().map(|image| &image.url).collect();
        assert!(matches!(
            urls[0],
            Cow::Borrowed("data:image/png;base64,AAAA")
        ));
        assert!(matches!(urls[1], Cow::Owned(url) if url == "data:image/png;base64,AAAA"));
        assert!(matches!(
            urls[2],
            Cow::Borrowed("data:image/png;base64,AAAA")
        ));
    }

    #[test]
    fn assistant_content_may_be_null_and_unknown_fields_are_kept() {
        let body = r#"{"model":"m","temperature":0.2,"x_custom":{"a":1},"messages":[
            {"role":"user","content":"hi"},
            {"role":"assistant","content":null,"tool_calls":[]},
            {"role":"tool","content":"42","tool_call_id":"c1"}]}"#;
        let request = ChatRequest::from_json(body.as_bytes()).unwrap();
        assert_eq!(request.field("temperature").unwrap(), 0.2);
        assert_eq!(request.field("x_custom").unwrap()["a"], 1);
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
