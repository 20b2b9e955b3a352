//! The one EXIF tag routing needs: Orientation (0x0112) in IFD0 of a TIFF structure.

/// EXIF orientation, as HF transformers applies it when loading an image
/// (`PIL.ImageOps.exif_transpose`).
///
/// Values 1 to 8 as in the EXIF specification. Values 5 to 8 transpose the image, so the
/// served width and height are the stored height and width.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Orientation(u8);

impl Default for Orientation {
    fn default() -> Self {
        Self::NORMAL
    }
}

impl Orientation {
    /// No transformation (EXIF value 1), also used for missing or invalid tags, which Pillow
    /// ignores.
    pub const NORMAL: Orientation = Orientation(1);

    /// The orientation for an EXIF value; anything outside 1..=8 is [`Orientation::NORMAL`].
    pub const fn from_exif(value: u16) -> Self {
        match value {
            1..=8 => Orientation(value as u8),
            _ => Self::NORMAL,
        }
    }

    /// The EXIF value, 1..=8.
    pub const fn exif_value(self) -> u8 {
        self.0
    }

    /// Whether applying the orientation swaps width and height (EXIF 5, 6, 7, 8).
    pub const fn swaps_dimensions(self) -> bool {
        matches!(self.0, 5..=8)
    }

    pub(crate) fn to_image_rs(self) -> image::metadata::Orientation {
        image::metadata::Orientation::from_exif(self.exif_value())
            .unwrap_or(image::metadata::Orientation::NoTransforms)
    }
}

/// Reads Orientation from IFD0 of a TIFF structure (the payload of a JPEG `Exif\0\0` APP1
/// segment after those six bytes). Any malformation yields `None`, never an error: Pillow
/// loads such images untransposed.
pub(crate) fn tiff_orientation(tiff: &[u8]) -> Option<Orientation> {
    let big_endian = match tiff.get(..4)? {
        [b'I', b'I', 42, 0] => false,
        [b'M', b'M', 0, 42] => true,
        _ => return None,
    };
    let u16_at = |at: usize| -> Option<u16> {
        let b: [u8; 2] = tiff.get(at..at.checked_add(2)?)?.try_into().ok()?;
        Some(if big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    };
    let u32_at = |at: usize| -> Option<u32> {
        let b: [u8; 4] = tiff.get(at..at.checked_add(4)?)?.try_into().ok()?;
        Some(if big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    };
    let ifd = usize::try_from(u32_at(4)?).ok()?;
    let entries = u16_at(ifd)?;
    for entry in 0..usize::from(entries) {
        let at = ifd.checked_add(2)?.checked_add(entry.checked_mul(12)?)?;
        if u16_at(at)? != 0x0112 {
            continue;
        }
        // Type SHORT (3), count 1: the value sits in the first two bytes of the value field.
        if u16_at(at + 2)? != 3 || u32_at(at + 4)? != 1 {
            return None;
        }
        return Some(Orientation::from_exif(u16_at(at + 8)?));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiff(big_endian: bool, value: u16) -> Vec<u8> {
        let mut out = Vec::new();
        let u16b = |v: u16| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        let u32b = |v: u32| {
            if big_endian {
                v.to_be_bytes()
            } else {
                v.to_le_bytes()
            }
        };
        out.extend_from_slice(if big_endian { b"MM\0*" } else { b"II*\0" });
        out.extend_from_slice(&u32b(8));
        out.extend_from_slice(&u16b(2));
        // An unrelated tag first, then Orientation.
        out.extend_from_slice(&u16b(0x010F));
        out.extend_from_slice(&u16b(2));
        out.extend_from_slice(&u32b(4));
        out.extend_from_slice(b"abc\0");
        out.extend_from_slice(&u16b(0x0112));
        out.extend_from_slice(&u16b(3));
        out.extend_from_slice(&u32b(1));
        out.extend_from_slice(&u16b(value));
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&u32b(0));
        out
    }

    #[test]
    fn reads_both_byte_orders() {
        for be in [false, true] {
            for value in 1..=8u16 {
                let orientation = tiff_orientation(&tiff(be, value)).unwrap();
                assert_eq!(u16::from(orientation.exif_value()), value);
                assert_eq!(orientation.swaps_dimensions(), value >= 5);
            }
        }
    }

    #[test]
    fn invalid_values_and_garbage_mean_normal_or_none() {
        assert_eq!(tiff_orientation(&tiff(false, 9)), Some(Orientation::NORMAL));
        assert_eq!(tiff_orientation(b"II*\0\xff\xff\xff\xff"), None);
        assert_eq!(tiff_orientation(b""), None);
        let full = tiff(true, 6);
        for cut in 0..full.len() {
            let _ = tiff_orientation(&full[..cut]);
        }
    }
}
