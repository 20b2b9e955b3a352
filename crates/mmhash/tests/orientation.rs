//! EXIF orientation as HF transformers applies it (`PIL.ImageOps.exif_transpose`): real
//! fixture images given an Orientation tag in each container that carries one (JPEG APP1, PNG
//! `eXIf`, WebP `EXIF`); transposing orientations swap the served width and height, and the
//! pixels id digests the transformed picture.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{blake3_digest, probe, IdMode, MediaConfig, MediaProcessor, VisionTokenRule};

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/../../tests/fixtures/images/{name}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Big-endian TIFF with one IFD0 entry: Orientation = `value`.
fn tiff(value: u16) -> Vec<u8> {
    let mut out = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01".to_vec();
    out.extend_from_slice(&value.to_be_bytes());
    out.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The PNG with an `eXIf` chunk right after IHDR.
fn png_with_orientation(png: &[u8], value: u16) -> Vec<u8> {
    let exif = tiff(value);
    let mut chunk = (exif.len() as u32).to_be_bytes().to_vec();
    chunk.extend_from_slice(b"eXIf");
    chunk.extend_from_slice(&exif);
    chunk.extend_from_slice(&crc32(&chunk[4..]).to_be_bytes());
    let ihdr_end = 8 + 12 + 13;
    [&png[..ihdr_end], &chunk, &png[ihdr_end..]].concat()
}

/// The JPEG with an `Exif` APP1 segment right after SOI.
fn jpeg_with_orientation(jpeg: &[u8], value: u16) -> Vec<u8> {
    let mut payload = b"Exif\0\0".to_vec();
    payload.extend_from_slice(&tiff(value));
    let mut segment = vec![0xFF, 0xE1];
    segment.extend_from_slice(&(payload.len() as u16 + 2).to_be_bytes());
    segment.extend_from_slice(&payload);
    [&jpeg[..2], &segment, &jpeg[2..]].concat()
}

/// A simple (VP8L) WebP turned into an extended one (VP8X) with an `EXIF` chunk.
fn webp_with_orientation(webp: &[u8], width: u32, height: u32, value: u16) -> Vec<u8> {
    let image_chunk = &webp[12..];
    let exif = tiff(value);
    let mut body = b"WEBPVP8X".to_vec();
    body.extend_from_slice(&10u32.to_le_bytes());
    body.push(0x08); // EXIF present
    body.extend_from_slice(&[0, 0, 0]);
    body.extend_from_slice(&(width - 1).to_le_bytes()[..3]);
    body.extend_from_slice(&(height - 1).to_le_bytes()[..3]);
    body.extend_from_slice(image_chunk);
    body.extend_from_slice(b"EXIF");
    body.extend_from_slice(&(exif.len() as u32).to_le_bytes());
    body.extend_from_slice(&exif);
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

#[test]
fn transposing_orientations_swap_dimensions_in_every_container() {
    let png = |v| png_with_orientation(&fixture("coffee_tiny_40x30.png"), v);
    let jpeg = |v| jpeg_with_orientation(&fixture("rocket.jpg"), v);
    let webp = |v| webp_with_orientation(&fixture("coffee_lossless.webp"), 600, 400, v);
    type WithOrientation<'a> = &'a dyn Fn(u16) -> Vec<u8>;
    let cases: [(&str, WithOrientation, (u32, u32)); 3] = [
        ("png", &png, (40, 30)),
        ("jpeg", &jpeg, (640, 427)),
        ("webp", &webp, (600, 400)),
    ];
    let qwen = VisionTokenRule::for_model_type("qwen2_vl").unwrap();
    for (container, make, (w, h)) in &cases {
        for value in 1..=8u16 {
            let info = probe(&make(value), None).unwrap();
            let served = if value >= 5 { (*h, *w) } else { (*w, *h) };
            assert_eq!(
                (info.width, info.height),
                served,
                "{container} orientation {value}"
            );
            assert_eq!(info.stored_dimensions(), (*w, *h));
            assert_eq!(
                qwen.tokens(info.width, info.height).unwrap(),
                qwen.tokens(served.0, served.1).unwrap()
            );
        }
    }
}

#[test]
fn pixels_id_digests_the_transformed_picture() {
    let original = fixture("coffee_tiny_40x30.png");
    let rotated = png_with_orientation(&original, 6); // rotate 90 degrees clockwise
    let decoded = image::load_from_memory(&original).unwrap();
    let expected = decoded.rotate90().to_rgb8();

    let processor = MediaProcessor::new(MediaConfig::default().with_id_mode(IdMode::Pixels));
    let digest = processor.pixel_digest(&rotated, None).unwrap();
    assert_eq!((digest.width, digest.height), (30, 40));
    assert_eq!(digest.rgb8, blake3_digest(expected.as_raw()));
    // Same picture, stored the other way round: another id in pixels mode.
    assert_ne!(
        digest.media_id(),
        processor.pixel_digest(&original, None).unwrap().media_id()
    );

    // WebP and JPEG decode through the same path.
    let webp = webp_with_orientation(&fixture("coffee_lossless.webp"), 600, 400, 8);
    assert_eq!(processor.pixel_digest(&webp, None).unwrap().width, 400);
    let jpeg = jpeg_with_orientation(&fixture("rocket.jpg"), 5);
    assert_eq!(processor.pixel_digest(&jpeg, None).unwrap().height, 640);
}
