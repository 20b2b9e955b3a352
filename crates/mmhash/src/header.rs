//! Header-only parsing: format, dimensions, EXIF orientation and cheap integrity checks,
//! without decoding or allocating any pixel.

use crate::error::ImageError;
use crate::exif::{tiff_orientation, Orientation};
use crate::format::{declares_a_type, ImageFormat};

/// What the header of an image says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct ImageInfo {
    /// The format, from the magic bytes.
    pub format: ImageFormat,
    /// Width as served to the model: after EXIF orientation (transposing orientations swap
    /// width and height), as HF transformers' `load_image` does.
    pub width: u32,
    /// Height as served to the model, after EXIF orientation.
    pub height: u32,
    /// The EXIF orientation found (JPEG APP1, PNG `eXIf`, WebP `EXIF`), or
    /// [`Orientation::NORMAL`].
    pub orientation: Orientation,
}

impl ImageInfo {
    /// Width times height.
    pub const fn pixels(&self) -> u64 {
        self.width as u64 * self.height as u64
    }

    /// Width and height as stored in the file, before orientation.
    pub const fn stored_dimensions(&self) -> (u32, u32) {
        if self.orientation.swaps_dimensions() {
            (self.height, self.width)
        } else {
            (self.width, self.height)
        }
    }
}

/// Reads the format, dimensions and orientation of an image from its header and checks that
/// the file is complete (a PNG holds every chunk up to `IEND`, a JPEG an `EOI` after its scan,
/// a GIF every block up to its trailer, a WebP its whole RIFF chunk, a BMP its whole pixel
/// array).
///
/// This never decodes pixels nor allocates: the cost is a few dozen byte reads, independent of
/// the image size. `declared` is the content type the client or server claimed, if any; a type
/// that names another format is an error.
///
/// ```
/// use kvroute_mmhash::{probe, ImageError, ImageFormat};
///
/// // A 1x1 GIF.
/// let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
/// let info = probe(gif, Some("image/gif"))?;
/// assert_eq!((info.format, info.width, info.height), (ImageFormat::Gif, 1, 1));
/// assert!(matches!(probe(gif, Some("image/png")), Err(ImageError::FormatMismatch { .. })));
/// assert_eq!(probe(b"not an image", None), Err(ImageError::UnknownFormat));
/// # Ok::<(), ImageError>(())
/// ```
pub fn probe(bytes: &[u8], declared: Option<&str>) -> Result<ImageInfo, ImageError> {
    let format = ImageFormat::sniff(bytes).ok_or(ImageError::UnknownFormat)?;
    if let Some(declared) = declares_a_type(declared) {
        if ImageFormat::from_mime(declared) != Some(format) {
            return Err(ImageError::FormatMismatch {
                declared: declared.to_owned(),
                detected: format,
            });
        }
    }
    let reader = Reader { bytes, format };
    let (width, height, orientation) = match format {
        ImageFormat::Png => reader.png()?,
        ImageFormat::Jpeg => reader.jpeg()?,
        ImageFormat::Gif => reader.gif()?,
        ImageFormat::WebP => reader.webp()?,
        ImageFormat::Bmp => reader.bmp()?,
    };
    if width == 0 || height == 0 {
        return Err(reader.corrupt("zero width or height"));
    }
    let (width, height) = if orientation.swaps_dimensions() {
        (height, width)
    } else {
        (width, height)
    };
    Ok(ImageInfo {
        format,
        width,
        height,
        orientation,
    })
}

/// Bytes of the color table a GIF screen or image descriptor's flags announce.
fn color_table_len(flags: u8) -> usize {
    if flags & 0x80 == 0 {
        0
    } else {
        3 << ((flags & 7) + 1)
    }
}

/// Whether JPEG data from the first scan on holds an EOI marker. Entropy-coded data cannot
/// contain `FF D9` (a data `FF` is stuffed as `FF 00`), so a scan cut short has none, while
/// data some cameras append after EOI (which Pillow accepts) is allowed. The usual file ends
/// with EOI and costs one comparison.
fn has_eoi(scan: &[u8]) -> bool {
    scan.ends_with(&[0xFF, 0xD9]) || memchr::memmem::find(scan, &[0xFF, 0xD9]).is_some()
}

/// Orientation from EXIF data with or without the `Exif\0\0` prefix (JPEG APP1 has it, PNG
/// `eXIf` and WebP `EXIF` chunks usually not).
fn exif_orientation(exif: &[u8]) -> Option<Orientation> {
    tiff_orientation(exif.strip_prefix(b"Exif\0\0").unwrap_or(exif))
}

/// Bounds-checked little readers over the file; every out-of-range read is `Truncated`.
struct Reader<'a> {
    bytes: &'a [u8],
    format: ImageFormat,
}

type Header = (u32, u32, Orientation);

impl Reader<'_> {
    fn truncated(&self, what: &'static str) -> ImageError {
        ImageError::Truncated {
            format: self.format,
            what,
        }
    }

    fn corrupt(&self, what: &'static str) -> ImageError {
        ImageError::Corrupt {
            format: self.format,
            what,
        }
    }

    fn array<const N: usize>(&self, at: usize, what: &'static str) -> Result<[u8; N], ImageError> {
        at.checked_add(N)
            .and_then(|end| self.bytes.get(at..end))
            .and_then(|slice| slice.try_into().ok())
            .ok_or_else(|| self.truncated(what))
    }

    fn u16_be(&self, at: usize, what: &'static str) -> Result<u16, ImageError> {
        self.array(at, what).map(u16::from_be_bytes)
    }

    fn u16_le(&self, at: usize, what: &'static str) -> Result<u16, ImageError> {
        self.array(at, what).map(u16::from_le_bytes)
    }

    fn u32_be(&self, at: usize, what: &'static str) -> Result<u32, ImageError> {
        self.array(at, what).map(u32::from_be_bytes)
    }

    fn u32_le(&self, at: usize, what: &'static str) -> Result<u32, ImageError> {
        self.array(at, what).map(u32::from_le_bytes)
    }

    fn u24_le(&self, at: usize, what: &'static str) -> Result<u32, ImageError> {
        self.array::<3>(at, what)
            .map(|[a, b, c]| u32::from_le_bytes([a, b, c, 0]))
    }

    /// PNG: IHDR must be the first chunk and every chunk up to IEND must lie inside the file
    /// (bytes after IEND are ignored, as Pillow does). The orientation comes from the last
    /// `eXIf` chunk, wherever it is: Pillow reads them all before `exif_transpose`.
    fn png(&self) -> Result<Header, ImageError> {
        if self.u32_be(8, "IHDR")? != 13 || self.array::<4>(12, "IHDR")? != *b"IHDR" {
            return Err(self.corrupt("first chunk is not a 13-byte IHDR"));
        }
        let width = self.u32_be(16, "IHDR")?;
        let height = self.u32_be(20, "IHDR")?;
        if width > i32::MAX as u32 || height > i32::MAX as u32 {
            return Err(self.corrupt("dimension above 2^31 - 1"));
        }
        let mut orientation = Orientation::NORMAL;
        let mut at = 8usize;
        loop {
            let len = self.u32_be(at, "chunk before IEND")? as usize;
            let kind = self.array::<4>(at + 4, "chunk before IEND")?;
            let data = at + 8;
            let end = data.checked_add(len).and_then(|end| end.checked_add(4));
            let end = end.filter(|&end| end <= self.bytes.len());
            let end = end.ok_or_else(|| self.truncated("chunk extends past end of file"))?;
            match &kind {
                b"eXIf" => {
                    orientation =
                        exif_orientation(&self.bytes[data..data + len]).unwrap_or_default();
                }
                b"IEND" => break,
                _ => {}
            }
            at = end;
        }
        Ok((width, height, orientation))
    }

    /// JPEG: walk the marker segments from SOI to SOS, taking the frame size from SOF and the
    /// orientation from the first `Exif` APP1; an EOI (`FF D9`) must follow the scan, which is
    /// how a scan cut short is caught without decoding it.
    fn jpeg(&self) -> Result<Header, ImageError> {
        let mut at = 2;
        let mut frame = None;
        let mut exif = None;
        loop {
            if self.array::<1>(at, "marker before SOS")? != [0xFF] {
                return Err(self.corrupt("expected a marker"));
            }
            // Fill bytes: any number of 0xFF before the marker code.
            while self.array::<1>(at + 1, "marker before SOS")? == [0xFF] {
                at += 1;
            }
            let [marker] = self.array::<1>(at + 1, "marker before SOS")?;
            at += 2;
            match marker {
                // Standalone markers carry no length.
                0x01 | 0xD0..=0xD7 => continue,
                0xD8 | 0xD9 => return Err(self.corrupt("SOI or EOI before the first scan")),
                0x00 => return Err(self.corrupt("invalid marker 0xFF00 in header")),
                _ => {}
            }
            let len = usize::from(self.u16_be(at, "segment length")?);
            if len < 2 {
                return Err(self.corrupt("segment length below 2"));
            }
            let end = at + len;
            if end > self.bytes.len() {
                return Err(self.truncated("segment extends past end of file"));
            }
            let payload = &self.bytes[at + 2..end];
            match marker {
                // Pillow keeps the first Exif APP1 only.
                0xE1 if exif.is_none() && payload.starts_with(b"Exif\0\0") => exif = Some(payload),
                // SOF0..SOF15 except DHT (C4), JPG (C8) and DAC (CC).
                0xC0..=0xCF if !matches!(marker, 0xC4 | 0xC8 | 0xCC) => {
                    if payload.len() < 6 {
                        return Err(self.corrupt("SOF segment too short"));
                    }
                    let height = u32::from(u16::from_be_bytes([payload[1], payload[2]]));
                    let width = u32::from(u16::from_be_bytes([payload[3], payload[4]]));
                    frame.get_or_insert((width, height));
                }
                0xDA => {
                    at = end;
                    break;
                }
                _ => {}
            }
            at = end;
        }
        let (width, height) = frame.ok_or_else(|| self.corrupt("no SOF segment before SOS"))?;
        if !has_eoi(&self.bytes[at..]) {
            return Err(self.truncated("no EOI marker (FF D9) after the scan"));
        }
        Ok((
            width,
            height,
            exif.and_then(exif_orientation).unwrap_or_default(),
        ))
    }

    /// GIF: the logical screen size (what Pillow and image-rs report). The block structure is
    /// walked (sub-block lengths only) up to the trailer `0x3B`, which must come after at least
    /// one image; bytes after the trailer are ignored, as Pillow does.
    fn gif(&self) -> Result<Header, ImageError> {
        let width = u32::from(self.u16_le(6, "logical screen descriptor")?);
        let height = u32::from(self.u16_le(8, "logical screen descriptor")?);
        let [flags] = self.array::<1>(10, "logical screen descriptor")?;
        let mut at = 13 + color_table_len(flags);
        let mut images = 0usize;
        loop {
            let [kind] = self.array::<1>(at, "block before the trailer")?;
            at += 1;
            match kind {
                0x3B if images > 0 => break,
                0x3B => return Err(self.corrupt("no image before the trailer")),
                // Extension: a label, then data sub-blocks.
                0x21 => at = self.gif_sub_blocks(at + 1)?,
                // Image: descriptor, optional local color table, LZW code size, sub-blocks.
                0x2C => {
                    let [flags] = self.array::<1>(at + 8, "image descriptor")?;
                    at = self.gif_sub_blocks(at + 9 + color_table_len(flags) + 1)?;
                    images += 1;
                }
                _ => return Err(self.corrupt("unknown block")),
            }
        }
        Ok((width, height, Orientation::NORMAL))
    }

    /// Skips GIF data sub-blocks from `at` (each a length byte then that many bytes, ended by
    /// a zero length); returns the offset after the terminator.
    fn gif_sub_blocks(&self, mut at: usize) -> Result<usize, ImageError> {
        loop {
            let [len] = self.array::<1>(at, "data sub-block")?;
            at += 1 + usize::from(len);
            if len == 0 {
                return Ok(at);
            }
        }
    }

    /// WebP: the RIFF chunk must be complete; the size comes from the first chunk (`VP8 `
    /// lossy, `VP8L` lossless or `VP8X` extended canvas).
    fn webp(&self) -> Result<Header, ImageError> {
        let riff_len = u64::from(self.u32_le(4, "RIFF header")?);
        if riff_len + 8 > self.bytes.len() as u64 {
            return Err(self.truncated("RIFF chunk extends past end of file"));
        }
        let chunk = self.array::<4>(12, "first chunk")?;
        let chunk_len = u64::from(self.u32_le(16, "first chunk")?);
        if 20 + chunk_len > riff_len + 8 {
            return Err(self.truncated("first chunk extends past the RIFF chunk"));
        }
        let (width, height) = match &chunk {
            b"VP8 " => {
                if self.array::<3>(23, "VP8 frame header")? != [0x9D, 0x01, 0x2A] {
                    return Err(self.corrupt("VP8 start code missing"));
                }
                let width = self.u16_le(26, "VP8 frame header")? & 0x3FFF;
                let height = self.u16_le(28, "VP8 frame header")? & 0x3FFF;
                (u32::from(width), u32::from(height))
            }
            b"VP8L" => {
                if self.array::<1>(20, "VP8L header")? != [0x2F] {
                    return Err(self.corrupt("VP8L signature missing"));
                }
                let bits = self.u32_le(21, "VP8L header")?;
                ((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
            }
            b"VP8X" => {
                let width = self.u24_le(24, "VP8X header")? + 1;
                let height = self.u24_le(27, "VP8X header")? + 1;
                (width, height)
            }
            _ => return Err(self.corrupt("first chunk is not VP8, VP8L or VP8X")),
        };
        // Only the extended format carries metadata chunks; the first EXIF one counts.
        let mut orientation = Orientation::NORMAL;
        if &chunk == b"VP8X" {
            let riff_end = riff_len as usize + 8;
            let mut at = 12usize;
            while at + 8 <= riff_end {
                let kind = self.array::<4>(at, "chunk header")?;
                let len = self.u32_le(at + 4, "chunk header")? as usize;
                let data = at + 8;
                let end = data.checked_add(len).filter(|&end| end <= riff_end);
                let end = end.ok_or_else(|| self.truncated("chunk extends past the RIFF chunk"))?;
                if &kind == b"EXIF" {
                    orientation = exif_orientation(&self.bytes[data..end]).unwrap_or_default();
                    break;
                }
                // Chunks are padded to an even size.
                at = end + (len & 1);
            }
        }
        Ok((width, height, orientation))
    }

    /// BMP: BITMAPCOREHEADER or BITMAPINFOHEADER and later; an uncompressed pixel array must
    /// be present in full.
    fn bmp(&self) -> Result<Header, ImageError> {
        let pixel_offset = u64::from(self.u32_le(10, "file header")?);
        let dib_len = self.u32_le(14, "DIB header")?;
        let (width, height, bpp, compression) = if dib_len == 12 {
            let width = i64::from(self.u16_le(18, "DIB header")?);
            let height = i64::from(self.u16_le(20, "DIB header")?);
            (width, height, self.u16_le(24, "DIB header")?, 0)
        } else if dib_len >= 40 {
            let width = i64::from(self.u32_le(18, "DIB header")? as i32);
            let height = i64::from(self.u32_le(22, "DIB header")? as i32);
            (
                width,
                height,
                self.u16_le(28, "DIB header")?,
                self.u32_le(30, "DIB header")?,
            )
        } else {
            return Err(self.corrupt("unknown DIB header size"));
        };
        // A negative height means rows are stored top-down.
        let height = height.unsigned_abs();
        if width <= 0 || height > i32::MAX as u64 {
            return Err(self.corrupt("invalid dimensions"));
        }
        let width = width.unsigned_abs();
        let file_len = self.bytes.len() as u64;
        // BI_RGB (0) and BI_BITFIELDS (3) store rows of whole 32-bit words.
        let needed = if matches!(compression, 0 | 3) {
            let stride = (width * u64::from(bpp)).div_ceil(32) * 4;
            stride
                .checked_mul(height)
                .and_then(|n| n.checked_add(pixel_offset))
        } else {
            Some(pixel_offset)
        };
        if needed.is_none_or(|needed| needed > file_len) {
            return Err(self.truncated("pixel array extends past end of file"));
        }
        // Both fit in u32: width and height were read from at most 32 bits.
        Ok((width as u32, height as u32, Orientation::NORMAL))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A baseline JPEG skeleton: SOI, optional APP1 Exif, SOF0, SOS, EOI (no real scan).
    fn jpeg(width: u16, height: u16, exif_orientation: Option<u16>) -> Vec<u8> {
        let mut out = vec![0xFF, 0xD8];
        if let Some(value) = exif_orientation {
            let mut tiff = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
            tiff.extend_from_slice(&value.to_be_bytes());
            tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            let mut payload = b"Exif\0\0".to_vec();
            payload.extend_from_slice(&tiff);
            out.extend_from_slice(&[0xFF, 0xE1]);
            out.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
            out.extend_from_slice(&payload);
        }
        out.extend_from_slice(&[0xFF, 0xC0, 0, 11, 8]);
        out.extend_from_slice(&height.to_be_bytes());
        out.extend_from_slice(&width.to_be_bytes());
        out.extend_from_slice(&[1, 1, 0x11, 0]);
        out.extend_from_slice(&[0xFF, 0xDA, 0, 8, 1, 1, 0, 0, 63, 0, 0x12, 0x34, 0xFF, 0xD9]);
        out
    }

    #[test]
    fn jpeg_orientation_swaps_transposed_only() {
        for value in 1..=8 {
            let info = probe(&jpeg(30, 20, Some(value)), None).unwrap();
            let expected = if value >= 5 { (20, 30) } else { (30, 20) };
            assert_eq!((info.width, info.height), expected, "orientation {value}");
            assert_eq!(info.stored_dimensions(), (30, 20));
        }
        assert_eq!(
            probe(&jpeg(30, 20, None), None).unwrap().orientation,
            Orientation::NORMAL
        );
    }

    #[test]
    fn gif_blocks_are_walked_to_the_trailer() {
        // 1x1, global color table of 2 entries, one image.
        let gif = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;";
        assert_eq!(probe(gif, None).unwrap().width, 1);
        for cut in 0..gif.len() {
            assert!(
                probe(&gif[..cut], None).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
        let mut trailing = gif.to_vec();
        trailing.extend_from_slice(b"junk");
        assert!(probe(&trailing, None).is_ok());
        // A trailer before any image.
        assert!(matches!(
            probe(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", None),
            Err(ImageError::Corrupt { .. })
        ));
    }

    #[test]
    fn data_after_eoi_is_accepted() {
        let mut with_trailer = jpeg(30, 20, None);
        with_trailer.extend_from_slice(b"SEFT trailer written by some phones");
        assert_eq!(probe(&with_trailer, None).unwrap().width, 30);
    }

    #[test]
    fn every_prefix_of_a_jpeg_is_an_error() {
        let full = jpeg(30, 20, Some(6));
        for cut in 0..full.len() {
            assert!(
                probe(&full[..cut], None).is_err(),
                "prefix of {cut} bytes accepted"
            );
        }
    }

    #[test]
    fn bmp_and_webp_headers() {
        // 2x2 24-bit BMP, bottom-up, with a 4-byte padded row stride.
        let mut bmp = b"BM".to_vec();
        bmp.extend_from_slice(&(54u32 + 16).to_le_bytes());
        bmp.extend_from_slice(&[0; 4]);
        bmp.extend_from_slice(&54u32.to_le_bytes());
        bmp.extend_from_slice(&40u32.to_le_bytes());
        bmp.extend_from_slice(&2i32.to_le_bytes());
        bmp.extend_from_slice(&(-2i32).to_le_bytes());
        bmp.extend_from_slice(&1u16.to_le_bytes());
        bmp.extend_from_slice(&24u16.to_le_bytes());
        bmp.extend_from_slice(&[0; 24]);
        bmp.extend_from_slice(&[0; 16]);
        let info = probe(&bmp, Some("image/bmp")).unwrap();
        assert_eq!((info.width, info.height), (2, 2));
        assert!(matches!(
            probe(&bmp[..60], None),
            Err(ImageError::Truncated { .. })
        ));

        let mut webp = b"RIFF".to_vec();
        webp.extend_from_slice(&22u32.to_le_bytes());
        webp.extend_from_slice(b"WEBPVP8X");
        webp.extend_from_slice(&10u32.to_le_bytes());
        webp.extend_from_slice(&[0, 0, 0, 0, 0x1F, 0x03, 0, 0x0F, 0x02, 0]);
        let info = probe(&webp, None).unwrap();
        assert_eq!((info.width, info.height), (800, 528));
        assert!(matches!(
            probe(&webp[..25], None),
            Err(ImageError::Truncated { .. })
        ));
    }
}
