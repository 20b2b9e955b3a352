//! The snapshot object: the index, the ordering state that goes with it, and the stream
//! sequence both cover.
//!
//! Layout: `KVRSNAP1`, stream sequence (u64 LE), length of the ordering state (u32 LE), the
//! ordering state (JSON), then the index's own snapshot (`kvroute-index` format).

use crate::sequencer::Sequencer;

const MAGIC: &[u8; 8] = b"KVRSNAP1";

/// Why stored snapshot bytes were not usable.
#[derive(Debug, thiserror::Error)]
pub(crate) enum CheckpointError {
    #[error("not a kvroute-events snapshot (or a newer format)")]
    NotASnapshot,
    #[error("snapshot truncated")]
    Truncated,
    #[error("snapshot ordering state unreadable: {0}")]
    State(#[source] serde_json::Error),
}

/// A decoded snapshot.
pub(crate) struct Checkpoint<'a> {
    pub(crate) stream_sequence: u64,
    pub(crate) sequencer: Sequencer,
    pub(crate) index: &'a [u8],
}

/// Encodes a snapshot.
pub(crate) fn encode(stream_sequence: u64, sequencer: &Sequencer, index: &[u8]) -> Vec<u8> {
    // Serializing the ordering state cannot fail: plain maps and integers.
    let state = serde_json::to_vec(sequencer).unwrap_or_default();
    let mut out = Vec::with_capacity(MAGIC.len() + 12 + state.len() + index.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&stream_sequence.to_le_bytes());
    out.extend_from_slice(&(state.len() as u32).to_le_bytes());
    out.extend_from_slice(&state);
    out.extend_from_slice(index);
    out
}

/// Decodes a snapshot (the index part is checked when the index restores it).
pub(crate) fn decode(bytes: &[u8]) -> Result<Checkpoint<'_>, CheckpointError> {
    let rest = bytes
        .strip_prefix(MAGIC)
        .ok_or(CheckpointError::NotASnapshot)?;
    let (sequence, rest) = rest
        .split_first_chunk::<8>()
        .ok_or(CheckpointError::Truncated)?;
    let (len, rest) = rest
        .split_first_chunk::<4>()
        .ok_or(CheckpointError::Truncated)?;
    let len = u32::from_le_bytes(*len) as usize;
    if rest.len() < len {
        return Err(CheckpointError::Truncated);
    }
    let (state, index) = rest.split_at(len);
    Ok(Checkpoint {
        stream_sequence: u64::from_le_bytes(*sequence),
        sequencer: serde_json::from_slice(state).map_err(CheckpointError::State)?,
        index,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let bytes = encode(42, &Sequencer::default(), b"index");
        let back = decode(&bytes).unwrap();
        assert_eq!(back.stream_sequence, 42);
        assert_eq!(back.index, b"index");
        assert!(matches!(
            decode(b"garbage"),
            Err(CheckpointError::NotASnapshot)
        ));
        assert!(matches!(
            decode(&bytes[..12]),
            Err(CheckpointError::Truncated)
        ));
        let mut bad = bytes.clone();
        bad[20] = b'!';
        assert!(matches!(decode(&bad), Err(CheckpointError::State(_))));
    }
}
