//! Where image bytes come from: `data:` URLs, raw bytes, http(s) URLs.

use crate::error::{ImageError, MediaError};

/// An OpenAI `image_url.url` value, classified.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ImageSource<'a> {
    /// A `data:` URL, base64-decoded.
    Data {
        /// The declared media type (`image/png`), if the URL names one.
        mime: Option<&'a str>,
        /// The decoded bytes.
        bytes: Vec<u8>,
    },
    /// An `http://` or `https://` URL, to be fetched under a [`FetchPolicy`](crate::FetchPolicy).
    Remote(&'a str),
}

impl<'a> ImageSource<'a> {
    /// Classifies `url`, decoding a `data:` URL (which must be base64) into at most
    /// `max_bytes` bytes. The size is checked before decoding, so an oversized data URL
    /// allocates nothing.
    ///
    /// ```
    /// use kvroute_mmhash::ImageSource;
    ///
    /// let source = ImageSource::parse("data:image/gif;base64,R0lGODlh", 1 << 20)?;
    /// assert_eq!(source, ImageSource::Data { mime: Some("image/gif"), bytes: b"GIF89a".to_vec() });
    /// assert!(matches!(ImageSource::parse("https://example.com/a.png", 1 << 20)?, ImageSource::Remote(_)));
    /// # Ok::<(), kvroute_mmhash::MediaError>(())
    /// ```
    pub fn parse(url: &'a str, max_bytes: u64) -> Result<Self, MediaError> {
        let url = url.trim();
        let scheme_end = url.find(':').ok_or_else(|| invalid("no URL scheme"))?;
        let scheme = &url[..scheme_end];
        if scheme.eq_ignore_ascii_case("data") {
            let rest = &url[scheme_end + 1..];
            let comma = rest
                .find(',')
                .ok_or_else(|| invalid("data URL without a comma"))?;
            let (meta, payload) = (&rest[..comma], &rest[comma + 1..]);
            let Some(mime) = meta.strip_suffix(";base64") else {
                return Err(invalid("data URL is not base64"));
            };
            let mime = mime.split(';').next().filter(|m| !m.is_empty());
            let bytes = decode_base64(payload, max_bytes)?;
            Ok(Self::Data { mime, bytes })
        } else if scheme.eq_ignore_ascii_case("http") || scheme.eq_ignore_ascii_case("https") {
            Ok(Self::Remote(url))
        } else {
            Err(invalid("scheme is not data, http or https"))
        }
    }
}

fn invalid(what: &str) -> MediaError {
    MediaError::InvalidSource(what.to_owned())
}

/// Standard-alphabet base64 with optional padding; ASCII whitespace (line breaks some clients
/// insert) is skipped.
fn decode_base64(payload: &str, max_bytes: u64) -> Result<Vec<u8>, MediaError> {
    let is_space = |b: &u8| b.is_ascii_whitespace();
    // Every 4 characters decode to 3 bytes, less up to 2 for padding.
    let decoded_at_least = |chars: u64| (chars.div_ceil(4) * 3).saturating_sub(2);
    // Whitespace only lengthens the payload, so counting the significant characters (a pass
    // over a payload of megabytes) is needed only when the raw length is over the limit.
    if decoded_at_least(payload.len() as u64) > max_bytes {
        let significant = payload.bytes().filter(|b| !is_space(b)).count() as u64;
        if decoded_at_least(significant) > max_bytes {
            return Err(ImageError::TooManyBytes {
                len: decoded_at_least(significant),
                max_bytes,
            }
            .into());
        }
    }
    // Most clients send no whitespace: decode the payload as it is, and only when that fails
    // because of whitespace, again without it.
    let bytes = base64_standard(payload.as_bytes()).or_else(|()| {
        if payload.bytes().any(|b| is_space(&b)) {
            let significant: Vec<u8> = payload.bytes().filter(|b| !is_space(b)).collect();
            base64_standard(&significant)
        } else {
            Err(())
        }
    });
    let bytes = bytes.map_err(|()| invalid("bad base64 in data URL"))?;
    if bytes.len() as u64 > max_bytes {
        return Err(ImageError::TooManyBytes {
            len: bytes.len() as u64,
            max_bytes,
        }
        .into());
    }
    Ok(bytes)
}

/// Decodes standard-alphabet base64 (SIMD where the CPU has it). Padding is optional, but
/// what there is must fit: `QQ`, `QQ=` and `QQ==` decode, `QUJD=` and `QQ===` do not. Unused
/// bits in the last character must be zero. The same inputs as the `base64` crate's standard
/// engine with `DecodePaddingMode::Indifferent` decode, to the same bytes (a property test
/// holds the two together).
fn base64_standard(encoded: &[u8]) -> Result<Vec<u8>, ()> {
    let pads = encoded
        .iter()
        .rev()
        .take(3)
        .take_while(|&&b| b == b'=')
        .count();
    let unpadded = &encoded[..encoded.len() - pads];
    let room = match unpadded.len() % 4 {
        0 => 0,
        2 => 2,
        3 => 1,
        _ => return Err(()),
    };
    if pads > room {
        return Err(());
    }
    base64_simd::STANDARD_NO_PAD
        .decode_to_vec(unpadded)
        .map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls() {
        assert!(matches!(
            ImageSource::parse("data:image/png,abc", 100),
            Err(MediaError::InvalidSource(_))
        ));
        assert!(matches!(
            ImageSource::parse("ftp://x/y", 100),
            Err(MediaError::InvalidSource(_))
        ));
        assert!(matches!(
            ImageSource::parse("no-scheme", 100),
            Err(MediaError::InvalidSource(_))
        ));
        assert_eq!(
            ImageSource::parse("data:;base64,R0lG\nODlh", 6).unwrap(),
            ImageSource::Data {
                mime: None,
                bytes: b"GIF89a".to_vec()
            }
        );
        assert!(matches!(
            ImageSource::parse("data:image/gif;base64,R0lGODlhR0lGODlh", 6),
            Err(MediaError::Image(ImageError::TooManyBytes { .. }))
        ));
        assert!(matches!(
            ImageSource::parse("data:image/gif;base64,R0lG!!!!", 100),
            Err(MediaError::InvalidSource(_))
        ));
        // Whitespace does not count against the limit, nor hide a bad byte.
        assert_eq!(
            ImageSource::parse("data:;base64,R0lG\r\n  \tODlh\n\n\n\n\n", 6).unwrap(),
            ImageSource::Data {
                mime: None,
                bytes: b"GIF89a".to_vec()
            }
        );
        assert!(matches!(
            ImageSource::parse("data:;base64,R0lG\nODlhR0lG", 6),
            Err(MediaError::Image(ImageError::TooManyBytes { len: 7, .. }))
        ));
        assert!(matches!(
            ImageSource::parse("data:;base64,R0lG\nOD!h", 100),
            Err(MediaError::InvalidSource(_))
        ));
    }

    /// The engine the SIMD decoder replaced, as the reference.
    fn reference(encoded: &[u8]) -> Option<Vec<u8>> {
        use base64::Engine as _;
        const ENGINE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
            &base64::alphabet::STANDARD,
            base64::engine::GeneralPurposeConfig::new()
                .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
        );
        ENGINE.decode(encoded).ok()
    }

    #[test]
    fn padding_and_trailing_bits() {
        for (encoded, decoded) in [
            ("", Some(&b""[..])),
            ("QQ", Some(b"A")),
            ("QQ=", Some(b"A")),
            ("QQ==", Some(b"A")),
            ("QUI", Some(b"AB")),
            ("QUI=", Some(b"AB")),
            ("QUJD", Some(b"ABC")),
            ("QQ===", None),
            ("QUI==", None),
            ("QUJD=", None),
            ("=", None),
            ("==", None),
            ("Q", None),
            ("Q===", None),
            ("QR==", None),
            ("QUJ=", None),
            ("QQ==QQ==", None),
            ("QU=I", None),
        ] {
            assert_eq!(
                base64_standard(encoded.as_bytes()).ok().as_deref(),
                decoded,
                "{encoded}"
            );
            assert_eq!(
                reference(encoded.as_bytes()).as_deref(),
                decoded,
                "{encoded}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn decodes_what_the_base64_crate_decodes(
            bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200),
            cut in 0usize..4,
            pads in 0usize..4,
            edit in proptest::option::of((proptest::num::usize::ANY, proptest::sample::select(
                b"AZaz09+/=-_ \n".to_vec()))),
        ) {
            use base64::Engine as _;
            let mut encoded = base64::engine::general_purpose::STANDARD_NO_PAD
                .encode(&bytes)
                .into_bytes();
            encoded.truncate(encoded.len().saturating_sub(cut));
            encoded.extend(std::iter::repeat_n(b'=', pads));
            if let Some((at, byte)) = edit {
                if !encoded.is_empty() {
                    let at = at % encoded.len();
                    encoded[at] = byte;
                }
            }
            proptest::prop_assert_eq!(base64_standard(&encoded).ok(), reference(&encoded));
        }
    }
}
