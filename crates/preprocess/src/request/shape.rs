//! One pass over a chat request body that keeps what validation needs and borrows the large
//! strings (base64 image URLs) from the body instead of copying them.
//!
//! Every visitor here accepts any JSON type: a value of the wrong type becomes an `Other`
//! variant (drained from the input) so that validation, which runs afterwards, can name the
//! offending field exactly as it would for a parsed `Value`. The only errors raised while
//! parsing are JSON syntax errors.
//!
//! The fast mode (`FAST = true`) reads an image's `url` member with serde_json's unvalidated
//! string scan (`memchr2` for the closing quote, a tenth of the cost of the validating scan on
//! a data URL of megabytes), checks it for control characters itself, and gives up (an error)
//! on anything else: a `url` that is not a string, or holds an escape. [`parse`] then parses
//! again in the validating mode, which accepts every type and names wrong ones in validation.

use serde::de::{
    self, Deserialize, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor,
};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

/// Parses `body` (fast mode first, validating mode if that gives up).
pub(super) fn parse(body: &str) -> Result<RawBody<'_>, serde_json::Error> {
    parse_in::<true>(body).or_else(|_| parse_in::<false>(body))
}

fn parse_in<const FAST: bool>(body: &str) -> Result<RawBody<'_>, serde_json::Error> {
    let mut deserializer = serde_json::Deserializer::from_str(body);
    let parsed = BodyVisitor::<FAST>.deserialize(&mut deserializer)?;
    deserializer.end()?;
    Ok(parsed)
}

/// The whole body.
pub(super) enum RawBody<'a> {
    Object {
        /// Every top-level member but `messages`.
        fields: Map<String, Value>,
        messages: Option<RawMessages<'a>>,
    },
    Other,
}

pub(super) enum RawMessages<'a> {
    Array(Vec<RawMessage<'a>>),
    Other,
}

pub(super) enum RawMessage<'a> {
    Object {
        /// Every member in order; `content` holds `null` until validation puts the template's
        /// content in its place.
        members: Map<String, Value>,
        /// `None` when the message has no `content` member.
        content: Option<RawContent<'a>>,
    },
    Other,
}

pub(super) enum RawContent<'a> {
    Null,
    Text(String),
    Parts(Vec<RawPart<'a>>),
    Other,
}

pub(super) enum RawPart<'a> {
    Object {
        /// Every member but `image_url` and `video_url`.
        members: Map<String, Value>,
        image_url: Option<RawImageUrl<'a>>,
        video_url: Option<RawImageUrl<'a>>,
        /// The first key as it is in the body, when it has no escape.
        first_key: Option<&'a str>,
    },
    Other,
}

pub(super) enum RawImageUrl<'a> {
    /// A string, or an object whose `url` is one.
    Url(Cow<'a, str>),
    /// An object whose `url` is a string without escapes or control characters, as it is in
    /// the body (fast mode).
    Raw(&'a [u8]),
    /// An object without a string `url`.
    NoUrl,
    Other,
}

/// A string borrowed from the body when it holds no escape.
struct Str<'a>(Cow<'a, str>);

/// A `url` member's value: `None` unless it is a string.
struct MaybeStr<'a>(Option<Cow<'a, str>>);

/// A `url` member's value in fast mode.
enum FastUrl<'a> {
    Raw(&'a [u8]),
    /// An array.
    NotString,
}

/// Visitor methods for the JSON types a visitor does not expect: each gives `$other`.
macro_rules! other_scalars {
    ($other:expr) => {
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Ok($other)
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}
macro_rules! other_str {
    ($other:expr) => {
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Ok($other)
        }
    };
}
macro_rules! other_seq {
    ($other:expr) => {
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok($other)
        }
    };
}
macro_rules! other_map {
    ($other:expr) => {
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            Ok($other)
        }
    };
}

/// Makes a mode's visitor the seed of its value, read through `deserialize_any`.
macro_rules! seed {
    ($visitor:ident) => {
        impl<'de, const FAST: bool> DeserializeSeed<'de> for $visitor<FAST> {
            type Value = <Self as Visitor<'de>>::Value;

            fn deserialize<D: Deserializer<'de>>(
                self,
                deserializer: D,
            ) -> Result<Self::Value, D::Error> {
                deserializer.deserialize_any(self)
            }
        }
    };
}

struct BodyVisitor<const FAST: bool>;
seed!(BodyVisitor);

impl<'de, const FAST: bool> Visitor<'de> for BodyVisitor<FAST> {
    type Value = RawBody<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(RawBody::Other);
    other_str!(RawBody::Other);
    other_seq!(RawBody::Other);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut fields = Map::new();
        let mut messages = None;
        while let Some(Str(key)) = map.next_key()? {
            if key == "messages" {
                messages = Some(map.next_value_seed(MessagesVisitor::<FAST>)?);
            } else {
                fields.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(RawBody::Object { fields, messages })
    }
}

struct MessagesVisitor<const FAST: bool>;
seed!(MessagesVisitor);

impl<'de, const FAST: bool> Visitor<'de> for MessagesVisitor<FAST> {
    type Value = RawMessages<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(RawMessages::Other);
    other_str!(RawMessages::Other);
    other_map!(RawMessages::Other);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(message) = seq.next_element_seed(MessageVisitor::<FAST>)? {
            messages.push(message);
        }
        Ok(RawMessages::Array(messages))
    }
}

struct MessageVisitor<const FAST: bool>;
seed!(MessageVisitor);

impl<'de, const FAST: bool> Visitor<'de> for MessageVisitor<FAST> {
    type Value = RawMessage<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(RawMessage::Other);
    other_str!(RawMessage::Other);
    other_seq!(RawMessage::Other);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Map::new();
        let mut content = None;
        while let Some(Str(key)) = map.next_key()? {
            if key == "content" {
                content = Some(map.next_value_seed(ContentVisitor::<FAST>)?);
                members.insert(key.into_owned(), Value::Null);
            } else {
                members.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(RawMessage::Object { members, content })
    }
}

struct ContentVisitor<const FAST: bool>;
seed!(ContentVisitor);

impl<'de, const FAST: bool> Visitor<'de> for ContentVisitor<FAST> {
    type Value = RawContent<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(RawContent::Other)
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        Ok(RawContent::Other)
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        Ok(RawContent::Other)
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        Ok(RawContent::Other)
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(RawContent::Null)
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(RawContent::Text(text.to_owned()))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(RawContent::Text(text))
    }
    other_map!(RawContent::Other);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut parts = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(part) = seq.next_element_seed(PartVisitor::<FAST>)? {
            parts.push(part);
        }
        Ok(RawContent::Parts(parts))
    }
}

struct PartVisitor<const FAST: bool>;
seed!(PartVisitor);

impl<'de, const FAST: bool> Visitor<'de> for PartVisitor<FAST> {
    type Value = RawPart<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(RawPart::Other);
    other_str!(RawPart::Other);
    other_seq!(RawPart::Other);

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut members = Map::new();
        let mut image_url = None;
        let mut video_url = None;
        let mut first_key = None;
        let mut first = true;
        while let Some(Str(key)) = map.next_key()? {
            if first {
                first = false;
                if let Cow::Borrowed(key) = key {
                    first_key = Some(key);
                }
            }
            if key == "image_url" {
                image_url = Some(map.next_value_seed(ImageUrlVisitor::<FAST>)?);
            } else if key == "video_url" {
                video_url = Some(map.next_value_seed(ImageUrlVisitor::<FAST>)?);
            } else {
                members.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(RawPart::Object {
            members,
            image_url,
            video_url,
            first_key,
        })
    }
}

struct ImageUrlVisitor<const FAST: bool>;
seed!(ImageUrlVisitor);

impl<'de, const FAST: bool> Visitor<'de> for ImageUrlVisitor<FAST> {
    type Value = RawImageUrl<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(RawImageUrl::Other);
    other_seq!(RawImageUrl::Other);

    fn visit_borrowed_str<E: de::Error>(self, url: &'de str) -> Result<Self::Value, E> {
        Ok(RawImageUrl::Url(Cow::Borrowed(url)))
    }
    fn visit_str<E: de::Error>(self, url: &str) -> Result<Self::Value, E> {
        Ok(RawImageUrl::Url(Cow::Owned(url.to_owned())))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut url = RawImageUrl::NoUrl;
        while let Some(Str(key)) = map.next_key()? {
            if key != "url" {
                map.next_value::<IgnoredAny>()?;
            } else if FAST {
                url = match map.next_value_seed(FastUrlVisitor)? {
                    FastUrl::Raw(url) => RawImageUrl::Raw(url),
                    FastUrl::NotString => RawImageUrl::NoUrl,
                };
            } else {
                url = map
                    .next_value::<MaybeStr>()?
                    .0
                    .map_or(RawImageUrl::NoUrl, RawImageUrl::Url);
            }
        }
        Ok(url)
    }
}

struct FastUrlVisitor;

impl<'de> DeserializeSeed<'de> for FastUrlVisitor {
    type Value = FastUrl<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        // A string's bytes unvalidated and unescaped (borrowed when there is no escape), an
        // array's elements, an error for the other types.
        deserializer.deserialize_bytes(self)
    }
}

impl<'de> Visitor<'de> for FastUrlVisitor {
    type Value = FastUrl<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string without escapes or an array (else the validating parse)")
    }

    fn visit_borrowed_bytes<E: de::Error>(self, url: &'de [u8]) -> Result<Self::Value, E> {
        // What the validating scan would refuse (and the rest of the body is valid UTF-8,
        // so a string between two quotes of it is too).
        // The smallest byte of each 64 (a reduction the compiler vectorizes; `any` would go
        // byte by byte).
        if url
            .chunks(64)
            .any(|chunk| chunk.iter().fold(u8::MAX, |least, &b| least.min(b)) < 0x20)
        {
            return Err(E::custom("a control character in a string"));
        }
        Ok(FastUrl::Raw(url))
    }

    other_seq!(FastUrl::NotString);
}

struct MaybeStrVisitor;

impl<'de> Deserialize<'de> for MaybeStr<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(MaybeStrVisitor)
    }
}

impl<'de> Visitor<'de> for MaybeStrVisitor {
    type Value = MaybeStr<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(MaybeStr(None));
    other_seq!(MaybeStr(None));
    other_map!(MaybeStr(None));

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(MaybeStr(Some(Cow::Borrowed(text))))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(MaybeStr(Some(Cow::Owned(text.to_owned()))))
    }
}

struct StrVisitor;

impl<'de> Deserialize<'de> for Str<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_str(StrVisitor)
    }
}

impl<'de> Visitor<'de> for StrVisitor {
    type Value = Str<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(Str(Cow::Borrowed(text)))
    }
    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        Ok(Str(Cow::Owned(text.to_owned())))
    }
    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(Str(Cow::Owned(text)))
    }
}
