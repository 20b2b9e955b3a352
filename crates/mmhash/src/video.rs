//! Videos: what an MP4 file's header says (frame count, frame rate, coded size), read without
//! decoding a frame, and how many visual tokens a Qwen-VL model gives the frames vLLM samples.
//!
//! The engine decodes the video to count and sample frames. With vLLM's default loader (OpenCV
//! over FFmpeg), the frame count is the stream's `nb_frames`, which FFmpeg's MP4 demuxer takes
//! from the sample size box (`stsz`), and the frame size is the decoder's, which for the codecs
//! of MP4 files is the sample entry's `width` x `height`, swapped when the track matrix turns
//! the picture a quarter (OpenCV turns frames upright). Anything that would make the decoder
//! disagree with the header (fragmented files, other transforms, other containers) is refused
//! rather than guessed.

use crate::error::{TokenError, VideoError};
use crate::tokens::SmartResize;

/// What the header of a video says.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub struct VideoInfo {
    /// Frame width as decoded and turned upright.
    pub width: u32,
    /// Frame height as decoded and turned upright.
    pub height: u32,
    /// Frames of the first video track (`stsz` sample count).
    pub frames: u64,
    /// Seconds: the track's media duration over its timescale.
    pub duration: f64,
}

impl VideoInfo {
    /// Frames per second (frames over duration), `None` for a zero duration.
    pub fn fps(&self) -> Option<f64> {
        (self.duration > 0.0).then(|| self.frames as f64 / self.duration)
    }
}

/// Reads the header of an MP4 (ISO base media) file: the first video track's coded size,
/// frame count and duration.
///
/// ```
/// # fn mp4() -> Vec<u8> { include_bytes!("../tests/fixtures/videos/bars_320x240_30f.mp4").to_vec() }
/// let info = kvroute_mmhash::probe_video(&mp4())?;
/// assert_eq!((info.width, info.height, info.frames), (320, 240, 30));
/// # Ok::<(), kvroute_mmhash::VideoError>(())
/// ```
pub fn probe_video(bytes: &[u8]) -> Result<VideoInfo, VideoError> {
    // An MP4 file opens with its file type box.
    if bytes.get(4..8) != Some(b"ftyp") {
        return Err(VideoError::NotMp4);
    }
    let mut moov = None;
    for item in Boxes::new(bytes) {
        let (kind, body) = item?;
        match &kind {
            b"moov" => moov = Some(body),
            b"moof" => return Err(VideoError::Unsupported("fragmented MP4")),
            _ => {}
        }
    }
    let moov = moov.ok_or(VideoError::Malformed("no moov box"))?;
    for item in Boxes::new(moov) {
        let (kind, trak) = item?;
        if &kind == b"trak" {
            if let Some(info) = video_track(trak)? {
                return Ok(info);
            }
        }
    }
    Err(VideoError::Malformed("no video track"))
}

/// The track's info when it is a video track.
fn video_track(trak: &[u8]) -> Result<Option<VideoInfo>, VideoError> {
    let mdia = child(trak, b"mdia")?.ok_or(VideoError::Malformed("trak without mdia"))?;
    let hdlr = child(mdia, b"hdlr")?.ok_or(VideoError::Malformed("mdia without hdlr"))?;
    if hdlr.get(8..12) != Some(b"vide") {
        return Ok(None);
    }
    let tkhd = child(trak, b"tkhd")?.ok_or(VideoError::Malformed("trak without tkhd"))?;
    // The matrix follows creation/modification times, track id, a reserved word, duration
    // (32-bit fields in version 0, 64-bit times and duration in version 1), 8 reserved bytes,
    // layer, alternate group, volume and 2 reserved bytes.
    let matrix_at = match tkhd.first() {
        Some(0) => 4 + 20 + 16,
        Some(1) => 4 + 32 + 16,
        _ => return Err(VideoError::Malformed("tkhd version")),
    };
    let matrix = tkhd
        .get(matrix_at..matrix_at + 36)
        .ok_or(VideoError::Malformed("short tkhd"))?;
    // FFmpeg reads a rotation from the matrix's a, b, c, d (the translation does not matter)
    // and OpenCV turns the frames upright: a quarter turn swaps width and height. Anything
    // else (a flip, a scale, a skew) is refused.
    const ONE: u32 = 0x1_0000;
    const MINUS_ONE: u32 = ONE.wrapping_neg();
    let at = |i: usize| be32(matrix, i * 4);
    if (at(2), at(5), at(8)) != (Some(0), Some(0), Some(0x4000_0000)) {
        return Err(VideoError::Unsupported("a perspective track matrix"));
    }
    let quarter_turn = match (at(0), at(1), at(3), at(4)) {
        (Some(ONE), Some(0), Some(0), Some(ONE))
        | (Some(MINUS_ONE), Some(0), Some(0), Some(MINUS_ONE)) => false,
        (Some(0), Some(ONE), Some(MINUS_ONE), Some(0))
        | (Some(0), Some(MINUS_ONE), Some(ONE), Some(0)) => true,
        _ => {
            return Err(VideoError::Unsupported(
                "a track matrix other than a rotation by quarter turns",
            ))
        }
    };
    let mdhd = child(mdia, b"mdhd")?.ok_or(VideoError::Malformed("mdia without mdhd"))?;
    let (timescale, duration) = match mdhd.first() {
        Some(0) => (be32(mdhd, 12), be32(mdhd, 16).map(u64::from)),
        Some(1) => (be32(mdhd, 20), be64(mdhd, 24)),
        _ => return Err(VideoError::Malformed("mdhd version")),
    };
    let (Some(timescale), Some(duration)) = (timescale, duration) else {
        return Err(VideoError::Malformed("short mdhd"));
    };
    if timescale == 0 {
        return Err(VideoError::Malformed("zero timescale"));
    }
    let stbl = child(mdia, b"minf")?
        .map(|minf| child(minf, b"stbl"))
        .transpose()?
        .flatten()
        .ok_or(VideoError::Malformed("no stbl"))?;
    let stsz = child(stbl, b"stsz")?.ok_or(VideoError::Malformed("no stsz"))?;
    let frames = be32(stsz, 8).ok_or(VideoError::Malformed("short stsz"))?;
    let stsd = child(stbl, b"stsd")?.ok_or(VideoError::Malformed("no stsd"))?;
    // stsd: version/flags, entry count, then the first sample entry (a box): size, format,
    // 6 reserved bytes, data reference index, 16 bytes of pre-defined and reserved fields,
    // then width and height (16 bits each).
    let (Some(width), Some(height)) = (be16(stsd, 8 + 32), be16(stsd, 8 + 34)) else {
        return Err(VideoError::Malformed("short stsd"));
    };
    if frames == 0 || width == 0 || height == 0 {
        return Err(VideoError::Unsupported(
            "no frames or no size in the header (fragmented or empty track)",
        ));
    }
    let (width, height) = if quarter_turn {
        (height, width)
    } else {
        (width, height)
    };
    Ok(Some(VideoInfo {
        width: u32::from(width),
        height: u32::from(height),
        frames: u64::from(frames),
        duration: duration as f64 / f64::from(timescale),
    }))
}

/// The body of the first child box of `kind`.
fn child<'a>(parent: &'a [u8], kind: &[u8; 4]) -> Result<Option<&'a [u8]>, VideoError> {
    for item in Boxes::new(parent) {
        let (found, body) = item?;
        if &found == kind {
            return Ok(Some(body));
        }
    }
    Ok(None)
}

/// The boxes of a byte range, in order: `(type, body)`.
struct Boxes<'a> {
    rest: &'a [u8],
}

impl<'a> Boxes<'a> {
    fn new(bytes: &'a [u8]) -> Self {
        Self { rest: bytes }
    }
}

impl<'a> Iterator for Boxes<'a> {
    type Item = Result<([u8; 4], &'a [u8]), VideoError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let size = be32(self.rest, 0).ok_or(VideoError::Malformed("short box header"))?;
            let kind: [u8; 4] = self
                .rest
                .get(4..8)
                .and_then(|k| k.try_into().ok())
                .ok_or(VideoError::Malformed("short box header"))?;
            let (header, size) = match size {
                0 => (8, self.rest.len() as u64),
                1 => (
                    16,
                    be64(self.rest, 8).ok_or(VideoError::Malformed("short box header"))?,
                ),
                size => (8, u64::from(size)),
            };
            let size = usize::try_from(size)
                .ok()
                .filter(|&size| size >= header && size <= self.rest.len())
                .ok_or(VideoError::Malformed("box larger than its parent"))?;
            let body = &self.rest[header..size];
            self.rest = &self.rest[size..];
            Ok((kind, body))
        })();
        if parsed.is_err() {
            self.rest = &[];
        }
        Some(parsed)
    }
}

fn be16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}

fn be32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

fn be64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// How the engine picks frames.
#[derive(Clone, Copy, Debug, PartialEq)]
#[non_exhaustive]
pub enum FrameSampling {
    /// vLLM's video loader: `num_frames` frames spread evenly over the video (`np.linspace`),
    /// or every frame of a shorter one (`--media-io-kwargs '{"video": {"num_frames": N}}'`,
    /// default 32).
    Uniform {
        /// Frames kept at most.
        num_frames: u64,
    },
    /// The Hugging Face Qwen-VL video processor's `sample_frames` at `fps` frames per second
    /// (vLLM with `num_frames: -1`, and `do_sample_frames` with `fps` in
    /// `mm_processor_kwargs`).
    Fps {
        /// Frames per second sampled.
        fps: f64,
        /// `min_frames` (4).
        min_frames: u64,
        /// `max_frames` (768).
        max_frames: u64,
    },
}

impl FrameSampling {
    /// vLLM's default: 32 frames.
    pub const VLLM_DEFAULT: FrameSampling = FrameSampling::Uniform { num_frames: 32 };

    /// Frames the engine keeps from `info`'s video, before padding to whole temporal patches.
    pub fn frames(&self, info: &VideoInfo, temporal_patch: u64) -> Result<u64, TokenError> {
        let total = info.frames;
        match *self {
            Self::Uniform { num_frames } => Ok(total.min(num_frames)),
            Self::Fps {
                fps,
                min_frames,
                max_frames,
            } => {
                let video_fps = info.fps().ok_or(TokenError::Degenerate("zero duration"))?;
                let patch = temporal_patch.max(1) as f64;
                // transformers' Qwen2VLVideoProcessor.sample_frames, in its order.
                let max = (max_frames.min(total) as f64 / patch).floor() * patch;
                let wanted = total as f64 / video_fps * fps;
                let clamped = wanted.max(min_frames as f64).min(max).min(total as f64);
                let frames = (clamped / patch).floor() * patch;
                // NaN (an infinite fps times a zero) fails this test too.
                if frames.is_nan() || frames < 1.0 {
                    return Err(TokenError::Degenerate("no frame sampled"));
                }
                Ok(frames as u64)
            }
        }
    }
}

/// Visual tokens of a Qwen2-VL / Qwen2.5-VL video: frames resized like images (with the video
/// processor's pixel limits), grouped by `temporal_patch` (the last frame repeated to fill the
/// last group), `(h'/factor) * (w'/factor)` tokens per group.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct QwenVideo {
    /// Per-frame resize: the video processor's `min_pixels` / `max_pixels`.
    pub resize: SmartResize,
    /// Frames per temporal patch (2).
    pub temporal_patch: u64,
    /// How the engine picks frames.
    pub sampling: FrameSampling,
}

impl QwenVideo {
    /// Qwen2-VL / Qwen2.5-VL with the pixel limits of the checkpoint's
    /// `preprocessor_config.json` (which transformers' video processor loads when the
    /// checkpoint has no `video_preprocessor_config.json`) and vLLM's default sampling.
    pub const QWEN2_VL: QwenVideo = QwenVideo {
        resize: SmartResize::QWEN2_VL,
        temporal_patch: 2,
        sampling: FrameSampling::VLLM_DEFAULT,
    };

    /// Visual tokens of the video `info` describes.
    ///
    /// ```
    /// use kvroute_mmhash::{probe_video, QwenVideo};
    /// # fn mp4() -> Vec<u8> { include_bytes!("../tests/fixtures/videos/bars_320x240_30f.mp4").to_vec() }
    ///
    /// // 30 frames (under 32: all kept) in 15 groups of 2; 320x240 resizes to 308x252: 11x9.
    /// assert_eq!(QwenVideo::QWEN2_VL.tokens(&probe_video(&mp4())?)?, 15 * 11 * 9);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn tokens(&self, info: &VideoInfo) -> Result<u64, TokenError> {
        let frames = self.sampling.frames(info, self.temporal_patch)?;
        let groups = frames.div_ceil(self.temporal_patch.max(1));
        let per_group = u64::from(self.resize.tokens(info.width, info.height)?);
        groups.checked_mul(per_group).ok_or(TokenError::Overflow)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(frames: u64, duration: f64) -> VideoInfo {
        VideoInfo {
            width: 640,
            height: 360,
            frames,
            duration,
        }
    }

    #[test]
    fn uniform_sampling_keeps_at_most_num_frames() {
        let sampling = FrameSampling::VLLM_DEFAULT;
        assert_eq!(sampling.frames(&info(300, 10.0), 2).unwrap(), 32);
        assert_eq!(sampling.frames(&info(31, 1.0), 2).unwrap(), 31);
    }

    #[test]
    fn fps_sampling_follows_transformers() {
        let sampling = FrameSampling::Fps {
            fps: 2.0,
            min_frames: 4,
            max_frames: 768,
        };
        // 10 s at 30 fps: 20 frames.
        assert_eq!(sampling.frames(&info(300, 10.0), 2).unwrap(), 20);
        // 1 s: 2 frames wanted, raised to min_frames.
        assert_eq!(sampling.frames(&info(30, 1.0), 2).unwrap(), 4);
        // 3 frames in all: floor(3 / 2) * 2.
        assert_eq!(sampling.frames(&info(3, 1.0), 2).unwrap(), 2);
        assert!(sampling.frames(&info(1, 1.0), 2).is_err());
        assert!(sampling.frames(&info(10, 0.0), 2).is_err());
    }

    #[test]
    fn odd_frame_counts_pad_the_last_group() {
        let video = QwenVideo::QWEN2_VL;
        let per_group = u64::from(SmartResize::QWEN2_VL.tokens(640, 360).unwrap());
        assert_eq!(video.tokens(&info(31, 1.0)).unwrap(), 16 * per_group);
    }

    #[test]
    fn broken_headers_are_errors() {
        assert_eq!(probe_video(b""), Err(VideoError::NotMp4));
        assert!(probe_video(b"\0\0\0\x10ftypisom\0\0\0\0").is_err());
        // A box claiming more than the file holds.
        assert!(probe_video(b"\0\0\0\x08ftyp\0\0\x10\0moov").is_err());
    }
}
