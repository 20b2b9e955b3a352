//! One pass over a chat request body that keeps what validation needs and borrows the large
//! strings (base64 image URLs) from the body instead of copying them.
//!
//! Every visitor here accepts any JSON type: a value of the wrong type becomes an `Other`
//! variant (drained from the input) so that validation, which runs afterwards, can name the
//! offending field exactly as it would for a parsed `Value`. The only errors raised while
//! parsing are JSON syntax errors.

use serde::de::{self, Deserialize, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};
use std::borrow::Cow;
use std::fmt;

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
        /// Every member but `image_url`.
        members: Map<String, Value>,
        image_url: Option<RawImageUrl<'a>>,
        /// The first key as it is in the body, when it has no escape.
        first_key: Option<&'a str>,
    },
    Other,
}

pub(super) enum RawImageUrl<'a> {
    /// A string, or an object whose `url` is one.
    Url(Cow<'a, str>),
    /// An object without a string `url`.
    NoUrl,
    Other,
}

/// A string borrowed from the body when it holds no escape.
struct Str<'a>(Cow<'a, str>);

/// A `url` member's value: `None` unless it is a string.
struct MaybeStr<'a>(Option<Cow<'a, str>>);

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

/// Implements `Deserialize` through `deserialize_any` and the visitor named.
macro_rules! deserialize_any_with {
    ($ty:ident, $visitor:ident) => {
        impl<'de> Deserialize<'de> for $ty<'de> {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                deserializer.deserialize_any($visitor)
            }
        }
    };
}

struct BodyVisitor;
deserialize_any_with!(RawBody, BodyVisitor);

impl<'de> Visitor<'de> for BodyVisitor {
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
                messages = Some(map.next_value()?);
            } else {
                fields.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(RawBody::Object { fields, messages })
    }
}

struct MessagesVisitor;
deserialize_any_with!(RawMessages, MessagesVisitor);

impl<'de> Visitor<'de> for MessagesVisitor {
    type Value = RawMessages<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }

    other_scalars!(RawMessages::Other);
    other_str!(RawMessages::Other);
    other_map!(RawMessages::Other);

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut messages = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(message) = seq.next_element()? {
            messages.push(message);
        }
        Ok(RawMessages::Array(messages))
    }
}

struct MessageVisitor;
deserialize_any_with!(RawMessage, MessageVisitor);

impl<'de> Visitor<'de> for MessageVisitor {
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
                content = Some(map.next_value()?);
                members.insert(key.into_owned(), Value::Null);
            } else {
                members.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(RawMessage::Object { members, content })
    }
}

struct ContentVisitor;
deserialize_any_with!(RawContent, ContentVisitor);

impl<'de> Visitor<'de> for ContentVisitor {
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
        while let Some(part) = seq.next_element()? {
            parts.push(part);
        }
        Ok(RawContent::Parts(parts))
    }
}

struct PartVisitor;
deserialize_any_with!(RawPart, PartVisitor);

impl<'de> Visitor<'de> for PartVisitor {
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
                image_url = Some(map.next_value()?);
            } else {
                members.insert(key.into_owned(), map.next_value()?);
            }
        }
        Ok(RawPart::Object {
            members,
            image_url,
            first_key,
        })
    }
}

struct ImageUrlVisitor;
deserialize_any_with!(RawImageUrl, ImageUrlVisitor);

impl<'de> Visitor<'de> for ImageUrlVisitor {
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
        let mut url = None;
        while let Some(Str(key)) = map.next_key()? {
            if key == "url" {
                url = map.next_value::<MaybeStr>()?.0;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(url.map_or(RawImageUrl::NoUrl, RawImageUrl::Url))
    }
}

struct MaybeStrVisitor;
deserialize_any_with!(MaybeStr, MaybeStrVisitor);

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
