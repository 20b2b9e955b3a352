//! The one-pass borrowed parse held against a reference model: the parse into a
//! `serde_json::Value` that `ChatRequest` used before, on generated bodies of every shape
//! (wrong types, missing members, escapes, any member order).

use super::*;
use proptest::prelude::*;

/// What the reference gives for a body: the typed fields, or the error's message and param.
#[derive(Debug, PartialEq)]
struct Parsed {
    model: String,
    stream: bool,
    max_tokens: Option<u64>,
    /// (message, part, url, uuid)
    images: Vec<(usize, usize, String, Option<String>)>,
    /// (message, part, url, uuid)
    videos: Vec<(usize, usize, String, Option<String>)>,
    template_messages: Vec<Value>,
    add_generation_prompt: bool,
    template_kwargs: Map<String, Value>,
}

type Outcome = Result<Parsed, (String, Option<String>)>;

fn outcome(result: Result<ChatRequest<'_>, PreprocessError>) -> Outcome {
    match result {
        Ok(request) => Ok(Parsed {
            model: request.model,
            stream: request.stream,
            max_tokens: request.max_tokens,
            images: request.images.into_iter().map(tuple).collect(),
            videos: request.videos.into_iter().map(tuple).collect(),
            template_messages: request.template_messages,
            add_generation_prompt: request.add_generation_prompt,
            template_kwargs: request.template_kwargs,
        }),
        Err(PreprocessError::InvalidRequest { message, param }) => Err((message, param)),
        Err(other) => Err((other.to_string(), None)),
    }
}

fn tuple(part: ImagePart<'_>) -> (usize, usize, String, Option<String>) {
    (part.message, part.part, part.url.into_owned(), part.uuid)
}

/// The reference: parse into a `Value`, then validate it as `ChatRequest` did before the
/// borrowed parse (but for `image_url` members on parts that are not images, which the
/// template no longer sees).
fn reference(body: &[u8]) -> Outcome {
    let body = parse_object(body).map_err(|e| match e {
        PreprocessError::InvalidRequest { message, param } => (message, param),
        other => (other.to_string(), None),
    })?;
    let err = |e: PreprocessError| match e {
        PreprocessError::InvalidRequest { message, param } => (message, param),
        other => (other.to_string(), None),
    };
    let model = required_str(&body, "model").map_err(err)?.to_owned();
    let stream = optional_bool(&body, "stream")
        .map_err(err)?
        .unwrap_or(false);
    let max_tokens = match optional_u64(&body, "max_completion_tokens").map_err(err)? {
        Some(n) => Some(n),
        None => optional_u64(&body, "max_tokens").map_err(err)?,
    };
    let add_generation_prompt = optional_bool(&body, "add_generation_prompt")
        .map_err(err)?
        .unwrap_or(true);
    let template_kwargs = match body.get("chat_template_kwargs") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(kwargs)) => kwargs.clone(),
        Some(_) => return Err(err(invalid("must be an object", "chat_template_kwargs"))),
    };
    let messages = match body.get("messages") {
        Some(Value::Array(messages)) if !messages.is_empty() => messages,
        Some(Value::Array(_)) => return Err(err(invalid("must not be empty", "messages"))),
        Some(_) => return Err(err(invalid("must be an array of messages", "messages"))),
        None => return Err(err(invalid("is required", "messages"))),
    };
    let mut media = Images::default();
    let mut template_messages = Vec::new();
    for (index, message) in messages.iter().enumerate() {
        template_messages.push(reference_message(index, message, &mut media).map_err(err)?);
    }
    Ok(Parsed {
        model,
        stream,
        max_tokens,
        images: media.images,
        videos: media.videos,
        template_messages,
        add_generation_prompt,
        template_kwargs,
    })
}

#[derive(Default)]
struct Images {
    images: Vec<(usize, usize, String, Option<String>)>,
    videos: Vec<(usize, usize, String, Option<String>)>,
}

fn reference_message(
    index: usize,
    message: &Value,
    images: &mut Images,
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
    let mut out = message.clone();
    match message.get("content") {
        Some(Value::String(_)) => {}
        None | Some(Value::Null) if role == Role::Assistant => {}
        None | Some(Value::Null) => {
            return Err(invalid("is required", &format!("{path}.content")));
        }
        Some(Value::Array(parts)) => {
            let mut template_parts = Vec::new();
            for (part_index, part) in parts.iter().enumerate() {
                let part_path = format!("{path}.content[{part_index}]");
                template_parts.push(reference_part(index, part_index, &part_path, part, images)?);
            }
            out.insert("content".to_owned(), Value::Array(template_parts));
        }
        Some(_) => {
            return Err(invalid(
                "must be a string or an array of content parts",
                &format!("{path}.content"),
            ))
        }
    }
    Ok(Value::Object(out))
}

fn reference_part(
    message: usize,
    part_index: usize,
    path: &str,
    part: &Value,
    images: &mut Images,
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
            Some(Value::String(_)) => {
                let mut part = part.clone();
                part.shift_remove("image_url");
                part.shift_remove("video_url");
                Ok(Value::Object(part))
            }
            _ => Err(invalid("must be a string", &format!("{path}.text"))),
        },
        key @ ("image_url" | "video_url") => {
            let url = match part.get(key) {
                Some(Value::Object(image)) => match image.get("url") {
                    Some(Value::String(url)) => url.clone(),
                    _ => return Err(invalid("must be a string", &format!("{path}.{key}.url"))),
                },
                Some(Value::String(url)) => url.clone(),
                _ => {
                    return Err(invalid(
                        "must be an object with a url",
                        &format!("{path}.{key}"),
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
            if key == "image_url" {
                images.images.push((message, part_index, url, uuid));
                Ok(serde_json::json!({"type": "image"}))
            } else {
                images.videos.push((message, part_index, url, uuid));
                Ok(serde_json::json!({"type": "video"}))
            }
        }
        other => Err(invalid(
            &format!(
                "has unsupported content part type {other:?} (supported: text, image_url, video_url)"
            ),
            &format!("{path}.type"),
        )),
    }
}

/// Short strings with characters JSON escapes (quote, backslash, newline) and non-ASCII.
fn text() -> impl Strategy<Value = String> {
    proptest::string::string_regex("[a-c\"\\\\\n é/:;,=+]{0,6}").expect("regex")
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        (0u64..3).prop_map(Value::from),
        Just(Value::from(-1)),
        text().prop_map(Value::String),
    ]
}

/// An object from optional members, in a shuffled order.
fn object(members: Vec<(&'static str, BoxedStrategy<Option<Value>>)>) -> BoxedStrategy<Value> {
    let (keys, values): (Vec<_>, Vec<_>) = members.into_iter().unzip();
    (values, any::<proptest::sample::Index>())
        .prop_flat_map(move |(values, _)| {
            let entries: Vec<(String, Value)> = keys
                .iter()
                .zip(values)
                .filter_map(|(key, value)| Some(((*key).to_owned(), value?)))
                .collect();
            Just(entries).prop_shuffle()
        })
        .prop_map(|entries| Value::Object(entries.into_iter().collect()))
        .boxed()
}

fn maybe(value: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    proptest::option::weighted(0.97, value).boxed()
}

fn sometimes(value: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Option<Value>> {
    proptest::option::weighted(0.3, value).boxed()
}

/// Mostly `valid`, now and then any scalar.
fn mostly(valid: impl Strategy<Value = Value> + 'static) -> BoxedStrategy<Value> {
    prop_oneof![30 => valid, 1 => scalar()].boxed()
}

fn part() -> BoxedStrategy<Value> {
    let url = mostly(text().prop_map(|t| Value::String(format!("data:image/png;base64,{t}"))));
    let image_url = prop_oneof![
        6 => object(vec![("url", maybe(url.clone())), ("detail", sometimes(scalar()))]),
        1 => url,
    ];
    let part = object(vec![
        (
            "type",
            maybe(mostly(prop_oneof![
                Just(Value::from("image_url")),
                Just(Value::from("video_url")),
                Just(Value::from("text")),
            ])),
        ),
        ("text", maybe(mostly(text().prop_map(Value::String)))),
        ("image_url", maybe(image_url.clone())),
        ("video_url", sometimes(image_url)),
        (
            "uuid",
            sometimes(prop_oneof![
                3 => text().prop_map(Value::String),
                1 => scalar(),
            ]),
        ),
    ]);
    mostly(part)
}

fn message() -> BoxedStrategy<Value> {
    let role = mostly(prop_oneof![
        12 => Just(Value::from("user")),
        4 => Just(Value::from("assistant")),
        1 => Just(Value::from("wizard")),
    ]);
    let content = prop_oneof![
        2 => text().prop_map(Value::String),
        6 => proptest::collection::vec(part(), 0..4).prop_map(Value::Array),
        1 => scalar(),
    ];
    let message = object(vec![
        ("role", maybe(role)),
        ("content", maybe(content)),
        ("name", sometimes(text().prop_map(Value::String))),
    ]);
    mostly(message)
}

fn body() -> BoxedStrategy<Value> {
    let messages = prop_oneof![
        12 => proptest::collection::vec(message(), 1..4).prop_map(Value::Array),
        1 => Just(Value::Array(Vec::new())),
        1 => scalar(),
    ];
    let kwargs = mostly(Just(serde_json::json!({"add_vision_id": true})));
    object(vec![
        ("model", maybe(mostly(Just(Value::from("m"))))),
        ("messages", maybe(messages)),
        (
            "stream",
            sometimes(mostly(any::<bool>().prop_map(Value::Bool))),
        ),
        (
            "max_tokens",
            sometimes(mostly((0u64..9).prop_map(Value::from))),
        ),
        ("chat_template_kwargs", sometimes(kwargs)),
        ("temperature", sometimes(scalar())),
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(1024))]

    #[test]
    fn the_borrowed_parse_agrees_with_the_value_parse(
        body in body(),
        pretty in any::<bool>(),
        escape_type in any::<bool>(),
    ) {
        let mut text = if pretty {
            serde_json::to_string_pretty(&body)
        } else {
            serde_json::to_string(&body)
        }
        .expect("serializable");
        if escape_type {
            // A key with an escape: `"type"` spelled `"\u0074ype"`.
            text = text.replace("\"type\"", "\"\\u0074ype\"");
        }
        let parsed = ChatRequest::from_json(text.as_bytes());
        // Each insertion point takes a new member in the right part and leaves valid JSON.
        if let Ok(request) = &parsed {
            for image in request.images.iter().chain(&request.videos) {
                let Some(at) = image.insert_at else {
                    continue;
                };
                let spliced = format!("{}\"uuid\":\"x\",{}", &text[..at], &text[at..]);
                let spliced: Value = serde_json::from_str(&spliced).expect("valid JSON");
                prop_assert_eq!(
                    &spliced["messages"][image.message]["content"][image.part]["uuid"],
                    "x"
                );
            }
            for image in request.images.iter().chain(&request.videos) {
                let part = &body["messages"][image.message]["content"][image.part];
                let first = part.as_object().and_then(|part| part.keys().next());
                let escaped_first = escape_type && first.is_some_and(|key| key == "type");
                prop_assert_eq!(
                    image.insert_at.is_some(),
                    part.get("uuid").is_none() && !escaped_first
                );
            }
        }
        prop_assert_eq!(outcome(parsed), reference(text.as_bytes()));
    }
}
