//! Image formats, recognised by their magic bytes.

use std::fmt;

/// An image container format kvroute-mmhash understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImageFormat {
    /// PNG (`89 50 4E 47 0D 0A 1A 0A`).
    Png,
    /// JPEG / JFIF / EXIF (`FF D8 FF`).
    Jpeg,
    /// GIF 87a or 89a.
    Gif,
    /// WebP (`RIFF....WEBP`), lossy, lossless or extended.
    WebP,
    /// Windows bitmap (`BM`).
    Bmp,
}

const PNG_SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";

impl ImageFormat {
    /// Every supported format.
    pub const ALL: [ImageFormat; 5] = [Self::Png, Self::Jpeg, Self::Gif, Self::WebP, Self::Bmp];

    /// Recognises the format from the first bytes of the file, whatever name or type it was
    /// given. `None` when no supported signature matches.
    ///
    /// ```
    /// use kvroute_mmhash::ImageFormat;
    ///
    /// assert_eq!(ImageFormat::sniff(b"\x89PNG\r\n\x1a\n...."), Some(ImageFormat::Png));
    /// assert_eq!(ImageFormat::sniff(b"hello"), None);
    /// ```
    pub fn sniff(bytes: &[u8]) -> Option<Self> {
        if bytes.starts_with(PNG_SIGNATURE) {
            Some(Self::Png)
        } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
            Some(Self::Jpeg)
        } else if bytes.starts_with(b"GIF87a") || bytes.starts_with(b"GIF89a") {
            Some(Self::Gif)
        } else if bytes.len() >= 12 && bytes.starts_with(b"RIFF") && &bytes[8..12] == b"WEBP" {
            Some(Self::WebP)
        } else if bytes.starts_with(b"BM") {
            Some(Self::Bmp)
        } else {
            None
        }
    }

    /// The format a MIME type names (`image/png`, `image/jpeg`, ...), case-insensitive and
    /// ignoring parameters such as `; charset=...`. `None` for any other type.
    pub fn from_mime(mime: &str) -> Option<Self> {
        let essence = mime.split(';').next().unwrap_or_default().trim();
        let essence = essence.to_ascii_lowercase();
        match essence.as_str() {
            "image/png" | "image/apng" => Some(Self::Png),
            "image/jpeg" | "image/jpg" | "image/pjpeg" => Some(Self::Jpeg),
            "image/gif" => Some(Self::Gif),
            "image/webp" => Some(Self::WebP),
            "image/bmp" | "image/x-bmp" | "image/x-ms-bmp" => Some(Self::Bmp),
            _ => None,
        }
    }

    /// The canonical MIME type.
    pub const fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::Gif => "image/gif",
            Self::WebP => "image/webp",
            Self::Bmp => "image/bmp",
        }
    }

    /// The name Pillow gives the format (`PNG`, `JPEG`, `GIF`, `WEBP`, `BMP`).
    pub const fn name(self) -> &'static str {
        match self {
            Self::Png => "PNG",
            Self::Jpeg => "JPEG",
            Self::Gif => "GIF",
            Self::WebP => "WEBP",
            Self::Bmp => "BMP",
        }
    }

    pub(crate) const fn to_image_rs(self) -> image::ImageFormat {
        match self {
            Self::Png => image::ImageFormat::Png,
            Self::Jpeg => image::ImageFormat::Jpeg,
            Self::Gif => image::ImageFormat::Gif,
            Self::WebP => image::ImageFormat::WebP,
            Self::Bmp => image::ImageFormat::Bmp,
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a declared content type (a data URL's media type, an HTTP `Content-Type`) is a
/// claim about the format at all. Absent, empty and `application/octet-stream` claim nothing.
pub(crate) fn declares_a_type(mime: Option<&str>) -> Option<&str> {
    let mime = mime?.trim();
    let essence = mime.split(';').next().unwrap_or_default().trim();
    if essence.is_empty() || essence.eq_ignore_ascii_case("application/octet-stream") {
        None
    } else {
        Some(mime)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mime_round_trip() {
        for format in ImageFormat::ALL {
            assert_eq!(ImageFormat::from_mime(format.mime()), Some(format));
        }
        assert_eq!(
            ImageFormat::from_mime("Image/JPEG; q=1"),
            Some(ImageFormat::Jpeg)
        );
        assert_eq!(ImageFormat::from_mime("image/tiff"), None);
    }

    #[test]
    fn octet_stream_claims_nothing() {
        assert_eq!(declares_a_type(Some("application/octet-stream")), None);
        assert_eq!(declares_a_type(Some("  ")), None);
        assert_eq!(declares_a_type(Some("image/png")), Some("image/png"));
    }
}
