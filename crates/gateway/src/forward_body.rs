//! The body forwarded to the engine: the client's bytes, with the media id the router hashed
//! added to each image and video part as its `uuid` (vLLM's multimodal uuid), so engine and
//! router hash the same identity, and a tenant's name as `cache_salt` (vLLM's per-request
//! prefix cache salt), so the engine keeps tenants' caches apart as the router's namespaces
//! do.

use bytes::Bytes;
use kvroute_dispatch::ForwardBody;
use kvroute_preprocess::{ChatRequest, ImagePart, Prompt};

/// `body` (the bytes `chat` was parsed from) as the engine should get it, with `salt` as its
/// `cache_salt` when the caller has a tenant. The additions are spliced into the client's
/// bytes at the places the parse noted, as chunks around them (a body of several MB of base64
/// is neither parsed again nor copied); a body where one cannot be placed that way (an escaped
/// first key, a `uuid` or `cache_salt` member already there) is re-serialized instead.
pub(crate) fn with_image_uuids(
    body: &Bytes,
    chat: &ChatRequest<'_>,
    prompt: &Prompt,
    salt: Option<&str>,
) -> ForwardBody {
    if prompt.images.is_empty() && prompt.videos.is_empty() && salt.is_none() {
        return ForwardBody::from(body.clone());
    }
    splice(body, chat, prompt, salt)
        .unwrap_or_else(|| ForwardBody::from(reserialize(chat, prompt, salt)))
}

fn splice(
    body: &Bytes,
    chat: &ChatRequest<'_>,
    prompt: &Prompt,
    salt: Option<&str>,
) -> Option<ForwardBody> {
    // The offsets are into `chat.body`, which must be these very bytes.
    if !std::ptr::eq(chat.body.as_bytes(), body.as_ref()) {
        return None;
    }
    let mut inserts: Vec<(usize, &str, &str)> = Vec::with_capacity(chat.images.len() + 1);
    if let Some(salt) = salt {
        // The client's own salt must not survive next to the tenant's (JSON parsers keep
        // the last of two equal keys).
        if chat.field("cache_salt").is_some() {
            return None;
        }
        let open = body.iter().position(|&b| b == b'{')?;
        inserts.push((open + 1, "cache_salt", salt));
    }
    for (part, uuid) in media(chat, prompt) {
        // The client named the image: the engine already gets that uuid.
        if part.uuid.is_some() {
            continue;
        }
        inserts.push((part.insert_at?, "uuid", uuid));
    }
    inserts.sort_by_key(|(at, _, _)| *at);
    let mut chunks = Vec::with_capacity(2 * inserts.len() + 1);
    let mut from = 0;
    for (at, key, value) in inserts {
        if at < from || at > body.len() {
            return None;
        }
        chunks.push(body.slice(from..at));
        let mut member = format!("\"{key}\":").into_bytes();
        serde_json::to_writer(&mut member, value).ok()?;
        member.push(b',');
        chunks.push(Bytes::from(member));
        from = at;
    }
    chunks.push(body.slice(from..));
    Some(ForwardBody::from_chunks(chunks))
}

/// Every image and video part with the uuid to forward for it.
fn media<'a>(
    chat: &'a ChatRequest<'_>,
    prompt: &'a Prompt,
) -> impl Iterator<Item = (&'a ImagePart<'a>, &'a str)> {
    let images = chat.images.iter().zip(&prompt.images);
    let videos = chat.videos.iter().zip(&prompt.videos);
    images
        .map(|(part, image)| (part, image.forward_uuid.as_str()))
        .chain(videos.map(|(part, video)| (part, video.forward_uuid.as_str())))
}

fn reserialize(chat: &ChatRequest<'_>, prompt: &Prompt, salt: Option<&str>) -> Bytes {
    let Ok(mut body) = serde_json::from_str::<serde_json::Value>(chat.body) else {
        return Bytes::copy_from_slice(chat.body.as_bytes());
    };
    if let (Some(salt), Some(fields)) = (salt, body.as_object_mut()) {
        fields.insert("cache_salt".to_owned(), salt.into());
    }
    for (part, uuid) in media(chat, prompt) {
        let slot = body
            .get_mut("messages")
            .and_then(|messages| messages.get_mut(part.message))
            .and_then(|message| message.get_mut("content"))
            .and_then(|content| content.get_mut(part.part))
            .and_then(serde_json::Value::as_object_mut);
        if let Some(slot) = slot {
            slot.insert(
                "uuid".to_owned(),
                serde_json::Value::String(uuid.to_owned()),
            );
        }
    }
    Bytes::from(serde_json::to_vec(&body).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_preprocess::{ModelFiles, PreprocessConfig, Preprocessor};
    use serde_json::Value;

    const PNG: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

    fn preprocessor() -> Preprocessor {
        Preprocessor::new(
            &ModelFiles::bundled_qwen2_vl().unwrap(),
            PreprocessConfig::default(),
        )
        .unwrap()
    }

    async fn forwarded(body: &str) -> (Value, Value) {
        salted(body, None).await
    }

    async fn salted(body: &str, salt: Option<&str>) -> (Value, Value) {
        let preprocessor = preprocessor();
        let bytes = Bytes::copy_from_slice(body.as_bytes());
        let chat = ChatRequest::from_json(&bytes).unwrap();
        let prompt = preprocessor.chat(&chat).await.unwrap();
        let spliced = with_image_uuids(&bytes, &chat, &prompt, salt);
        let reference = reserialize(&chat, &prompt, salt);
        (
            serde_json::from_slice(&collect(spliced).await).unwrap(),
            serde_json::from_slice(&reference).unwrap(),
        )
    }

    async fn collect(body: ForwardBody) -> Bytes {
        use http_body_util::BodyExt;
        match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(never) => match never {},
        }
    }

    fn image(extra: &str) -> String {
        format!(
            r#"{{"type": "image_url"{extra}, "image_url": {{"url": "data:image/png;base64,{PNG}"}}}}"#
        )
    }

    #[tokio::test]
    async fn spliced_bodies_equal_the_reserialized_ones() {
        let body = format!(
            r#"{{"model": "m", "messages": [
                {{"role": "system", "content": "be brief"}},
                {{"role": "user", "content": [{}, {{"type": "text", "text": "and"}}, {}]}},
                {{"role": "user", "content": [ {} ]}}]}}"#,
            image(""),
            image(r#", "uuid": "client-id""#),
            image(""),
        );
        let (spliced, reference) = forwarded(&body).await;
        assert_eq!(spliced, reference);
        let parts = &spliced["messages"][1]["content"];
        assert_eq!(parts[2]["uuid"], "client-id");
        assert_eq!(parts[0]["uuid"].as_str().unwrap().len(), 64);
        assert_eq!(
            spliced["messages"][2]["content"][0]["uuid"],
            parts[0]["uuid"]
        );
    }

    #[tokio::test]
    async fn video_parts_get_their_uuid_too() {
        use base64::Engine;
        let mp4 = include_bytes!("../../mmhash/tests/fixtures/videos/bars_176x144_7f.mp4");
        let video = format!(
            r#"{{"type": "video_url", "video_url": {{"url": "data:video/mp4;base64,{}"}}}}"#,
            base64::engine::general_purpose::STANDARD.encode(mp4)
        );
        let body = format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": [{video}, {}]}}]}}"#,
            image("")
        );
        let (spliced, reference) = forwarded(&body).await;
        assert_eq!(spliced, reference);
        let parts = &spliced["messages"][0]["content"];
        assert_eq!(parts[0]["uuid"].as_str().unwrap().len(), 64);
        assert_ne!(parts[0]["uuid"], parts[1]["uuid"]);
    }

    #[tokio::test]
    async fn a_tenant_salt_is_spliced_and_overrides_the_clients() {
        for (body, spliced_expected) in [
            (format!(r#" {{"model": "m", "messages": [{{"role": "user", "content": [{}]}}]}}"#, image("")), true),
            (r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}]}"#.to_owned(), true),
            (r#"{"cache_salt": "other", "model": "m", "messages": [{"role": "user", "content": "hi"}]}"#.to_owned(), false),
        ] {
            let (spliced, reference) = salted(&body, Some("team-a")).await;
            assert_eq!(spliced, reference, "{body}");
            assert_eq!(spliced["cache_salt"], "team-a", "{body}");
            let chat = ChatRequest::from_json(body.as_bytes()).unwrap();
            let prompt = preprocessor().chat(&chat).await.unwrap();
            let bytes = Bytes::copy_from_slice(body.as_bytes());
            let chat = ChatRequest::from_json(&bytes).unwrap();
            assert_eq!(splice(&bytes, &chat, &prompt, Some("t")).is_some(), spliced_expected);
        }
    }

    #[tokio::test]
    async fn offsets_into_other_bytes_are_not_used() {
        let body = format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": [{}]}}]}}"#,
            image("")
        );
        let preprocessor = preprocessor();
        let chat = ChatRequest::from_json(body.as_bytes()).unwrap();
        let prompt = preprocessor.chat(&chat).await.unwrap();
        let copy = Bytes::copy_from_slice(body.as_bytes());
        assert!(splice(&copy, &chat, &prompt, None).is_none());
        let forwarded: Value =
            serde_json::from_slice(&collect(with_image_uuids(&copy, &chat, &prompt, None)).await)
                .unwrap();
        assert_eq!(
            forwarded["messages"][0]["content"][0]["uuid"],
            prompt.images[0].forward_uuid.as_str()
        );
    }

    #[tokio::test]
    async fn an_escaped_key_after_the_first_is_still_spliced() {
        let body = format!(
            r#"{{"model": "m", "messages": [{{"role": "user", "content": [{}]}}], "\u0074emperature": 0}}"#,
            image(r#", "\u0064etail": "low""#)
        );
        let (spliced, reference) = forwarded(&body).await;
        assert_eq!(spliced, reference);
        assert_eq!(
            spliced["messages"][0]["content"][0]["uuid"]
                .as_str()
                .unwrap()
                .len(),
            64
        );
    }

    #[tokio::test]
    async fn a_part_the_splice_cannot_place_is_reserialized() {
        for part in [
            // An escaped first key: its position in the body is unknown.
            format!(
                r#"{{"\u0074ype": "image_url", "image_url": {{"url": "data:image/png;base64,{PNG}"}}}}"#
            ),
            // A null uuid: a second `uuid` key would duplicate it.
            image(r#", "uuid": null"#),
        ] {
            let body = format!(
                r#"{{"model": "m", "messages": [{{"role": "user", "content": [{}, {part}]}}]}}"#,
                image("")
            );
            let preprocessor = preprocessor();
            let bytes = Bytes::copy_from_slice(body.as_bytes());
            let chat = ChatRequest::from_json(&bytes).unwrap();
            let prompt = preprocessor.chat(&chat).await.unwrap();
            assert!(splice(&bytes, &chat, &prompt, None).is_none(), "{part}");
            let (forwarded, reference) = forwarded(&body).await;
            assert_eq!(forwarded, reference);
            let parts = &forwarded["messages"][0]["content"];
            assert_eq!(parts[0]["uuid"], parts[1]["uuid"], "{part}");
            assert_eq!(parts[1]["uuid"].as_str().unwrap().len(), 64, "{part}");
        }
    }
}
