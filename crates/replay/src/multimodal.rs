//! A seeded multimodal workload: multi-turn visual question answering.
//!
//! Each session starts with one of a few shared system prompts, then a user message with one
//! or more images and a question; every later turn re-sends the whole conversation (system
//! prompt, the images, every question and answer so far) plus a new question. Some images are
//! popular and appear in many sessions; many questions are common ones ("What is in this
//! picture?"). The output is a trace in Mooncake's form: `hash_ids` are what a router that
//! ignores media sees (an image is a run of identical placeholder tokens, whatever the image),
//! and `media_ids` list for each block the images inside it, which kvroute and the engine hash.
//!
//! ```
//! use kvroute_replay::multimodal::{generate, MultimodalConfig};
//!
//! let config = MultimodalConfig::default().with_sessions(20).with_seed(3);
//! let trace = generate(&config);
//! assert_eq!(trace, generate(&config));
//! assert!(trace.iter().any(|r| r.media_ids.iter().any(|m| !m.is_empty())));
//! ```

use crate::trace::TraceRequest;
use kvroute_blockhash::BlockHasher;
use serde::Serialize;
use std::collections::HashMap;

/// The workload's shape. Ranges are inclusive.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[non_exhaustive]
pub struct MultimodalConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Conversations.
    pub sessions: usize,
    /// Tokens per trace block (replay with the same trace block size).
    pub block_size: u32,
    /// Each session has 1 to this many turns.
    pub max_turns: u32,
    /// Distinct system prompts shared by the sessions.
    pub system_prompts: usize,
    /// System prompt length range in tokens.
    pub system_prompt_tokens: (u32, u32),
    /// Each session sends 1 to this many images.
    pub max_images: u32,
    /// Visual tokens of an image, one of these (images are resized to a few resolutions).
    pub image_tokens: Vec<u32>,
    /// Popular images shared across sessions.
    pub shared_images: usize,
    /// Probability that an image of a session is one of the popular ones.
    pub shared_image_probability: f64,
    /// Common questions asked by many users.
    pub common_questions: usize,
    /// Probability that a question is a common one.
    pub common_question_probability: f64,
    /// Question length range in tokens.
    pub question_tokens: (u32, u32),
    /// Answer length range in tokens (the request's output length).
    pub answer_tokens: (u32, u32),
    /// New sessions per second (Poisson arrivals).
    pub sessions_per_second: f64,
    /// Seconds between a turn's arrival and the next one's (reading, typing).
    pub think_seconds: (f64, f64),
}

impl Default for MultimodalConfig {
    /// 400 sessions of up to 6 turns at 1 new session per second; 4 system prompts of 600 to
    /// 2,000 tokens; 1 or 2 images of 256, 576 or 1,024 visual tokens (30% from 16 popular
    /// images); 60% of the questions from 8 common ones; blocks of 64 tokens.
    fn default() -> Self {
        Self {
            seed: 0,
            sessions: 400,
            block_size: 64,
            max_turns: 6,
            system_prompts: 4,
            system_prompt_tokens: (600, 2000),
            max_images: 2,
            image_tokens: vec![256, 576, 1024],
            shared_images: 16,
            shared_image_probability: 0.3,
            common_questions: 8,
            common_question_probability: 0.6,
            question_tokens: (12, 60),
            answer_tokens: (60, 300),
            sessions_per_second: 1.0,
            think_seconds: (4.0, 20.0),
        }
    }
}

impl MultimodalConfig {
    /// Sets the seed.
    pub fn with_seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// Sets the number of sessions.
    pub fn with_sessions(mut self, sessions: usize) -> Self {
        self.sessions = sessions;
        self
    }

    /// Sets the trace block size.
    pub fn with_block_size(mut self, block_size: u32) -> Self {
        self.block_size = block_size;
        self
    }
}

#[derive(Clone, Copy, Debug)]
enum Segment {
    /// Text identified by its content (equal content, equal tokens).
    Text { content: u64, tokens: u32 },
    /// An image: `tokens` identical placeholder tokens in the text view.
    Image { media: u64, tokens: u32 },
}

impl Segment {
    fn tokens(self) -> u32 {
        match self {
            Segment::Text { tokens, .. } | Segment::Image { tokens, .. } => tokens,
        }
    }
}

/// Generates the workload: requests in arrival order. The same configuration gives the same
/// trace.
pub fn generate(config: &MultimodalConfig) -> Vec<TraceRequest> {
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let range = |rng: &mut fastrand::Rng, (lo, hi): (u32, u32)| rng.u32(lo.min(hi)..=hi.max(lo));
    let image_size = |rng: &mut fastrand::Rng| {
        if config.image_tokens.is_empty() {
            256
        } else {
            config.image_tokens[rng.usize(..config.image_tokens.len())]
        }
    };
    let system: Vec<Segment> = (0..config.system_prompts)
        .map(|k| Segment::Text {
            content: 1_000 + k as u64,
            tokens: range(&mut rng, config.system_prompt_tokens),
        })
        .collect();
    let popular: Vec<Segment> = (0..config.shared_images)
        .map(|_| Segment::Image {
            media: rng.u64(..),
            tokens: image_size(&mut rng),
        })
        .collect();
    let questions: Vec<Segment> = (0..config.common_questions)
        .map(|q| Segment::Text {
            content: 2_000 + q as u64,
            tokens: range(&mut rng, config.question_tokens),
        })
        .collect();
    let mut unique_text = 1u64 << 32;
    let mut fresh = |tokens| {
        unique_text += 1;
        Segment::Text {
            content: unique_text,
            tokens,
        }
    };
    let mut ids = HashIds::new(config.block_size);
    let mut requests: Vec<TraceRequest> = Vec::new();
    let mut session_start_ms = 0.0f64;
    for _ in 0..config.sessions {
        // Exponential gaps: a Poisson process of session starts.
        let gap = -(1.0 - rng.f64()).ln() / config.sessions_per_second.max(1e-9);
        session_start_ms += gap * 1000.0;
        let mut prompt: Vec<Segment> = Vec::new();
        if !system.is_empty() {
            prompt.push(system[rng.usize(..system.len())]);
        }
        for _ in 0..rng.u32(1..=config.max_images.max(1)) {
            let image = if !popular.is_empty() && rng.f64() < config.shared_image_probability {
                popular[rng.usize(..popular.len())]
            } else {
                Segment::Image {
                    media: rng.u64(..),
                    tokens: image_size(&mut rng),
                }
            };
            prompt.push(image);
        }
        let mut at_ms = session_start_ms;
        for _ in 0..rng.u32(1..=config.max_turns.max(1)) {
            let question =
                if !questions.is_empty() && rng.f64() < config.common_question_probability {
                    questions[rng.usize(..questions.len())]
                } else {
                    fresh(range(&mut rng, config.question_tokens))
                };
            prompt.push(question);
            let answer = range(&mut rng, config.answer_tokens);
            let (hash_ids, media_ids) = ids.blocks(&prompt);
            requests.push(TraceRequest {
                timestamp: at_ms as u64,
                input_length: prompt.iter().map(|s| u64::from(s.tokens())).sum(),
                output_length: u64::from(answer),
                hash_ids,
                media_ids,
            });
            prompt.push(fresh(answer));
            let (lo, hi) = config.think_seconds;
            at_ms += (lo + rng.f64() * (hi - lo).max(0.0)) * 1000.0;
        }
    }
    requests.sort_by_key(|r| r.timestamp);
    requests
}

/// Assigns Mooncake-style prefix ids to text-view blocks: equal ids at the same position mean
/// the same text prefix.
struct HashIds {
    block_size: u32,
    hasher: Option<BlockHasher>,
    ids: HashMap<(Option<u64>, u64), u64>,
}

impl HashIds {
    fn new(block_size: u32) -> Self {
        Self {
            block_size: block_size.max(1),
            hasher: BlockHasher::new(block_size.max(1)).ok(),
            ids: HashMap::new(),
        }
    }

    /// `hash_ids` and `media_ids` of a prompt, one entry per block (the last may be partial).
    fn blocks(&mut self, prompt: &[Segment]) -> (Vec<u64>, Vec<Vec<u64>>) {
        let block_size = u64::from(self.block_size);
        let total: u64 = prompt.iter().map(|s| u64::from(s.tokens())).sum();
        let mut hash_ids = Vec::new();
        let mut media_ids = Vec::new();
        let mut parent = None;
        let mut start = 0u64;
        while start < total {
            let end = (start + block_size).min(total);
            // The block's text view: each piece's kind, content, offset and length.
            let mut window: Vec<u32> = Vec::new();
            let mut media: Vec<u64> = Vec::new();
            let mut offset = 0u64;
            for segment in prompt {
                let len = u64::from(segment.tokens());
                let (lo, hi) = (offset.max(start), (offset + len).min(end));
                if lo < hi {
                    match *segment {
                        Segment::Text { content, .. } => window.extend([
                            1,
                            content as u32,
                            (content >> 32) as u32,
                            (lo - offset) as u32,
                            (hi - lo) as u32,
                        ]),
                        Segment::Image { media: id, .. } => {
                            window.extend([2, (hi - lo) as u32]);
                            media.push(id);
                        }
                    }
                }
                offset += len;
                if offset >= end {
                    break;
                }
            }
            media.sort_unstable();
            media.dedup();
            let content = self
                .hasher
                .as_ref()
                .map_or(0, |h| h.hash_block(&window, &[]).get());
            let next = self.ids.len() as u64;
            let id = *self.ids.entry((parent, content)).or_insert(next);
            hash_ids.push(id);
            media_ids.push(media);
            parent = Some(id);
            start = end;
        }
        if media_ids.iter().all(Vec::is_empty) {
            media_ids.clear();
        }
        (hash_ids, media_ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_different_image_same_hash_ids_different_media() {
        let mut ids = HashIds::new(4);
        let system = Segment::Text {
            content: 1,
            tokens: 6,
        };
        let question = Segment::Text {
            content: 2,
            tokens: 3,
        };
        let image = |media| Segment::Image { media, tokens: 4 };
        let (a_ids, a_media) = ids.blocks(&[system, image(10), question]);
        let (b_ids, b_media) = ids.blocks(&[system, image(11), question]);
        assert_eq!(a_ids.len(), 4); // 13 tokens in blocks of 4
        assert_eq!(a_ids, b_ids);
        assert_eq!(a_media, [vec![], vec![10], vec![10], vec![]]);
        assert_eq!(b_media[1], [11]);
        // A different question diverges where it starts.
        let (c_ids, _) = ids.blocks(&[
            system,
            image(10),
            Segment::Text {
                content: 3,
                tokens: 3,
            },
        ]);
        assert_eq!(c_ids[..2], a_ids[..2]);
        assert_ne!(c_ids[2], a_ids[2]);
    }

    #[test]
    fn turns_extend_their_session_and_resend_its_images() {
        let config = MultimodalConfig::default().with_sessions(30).with_seed(9);
        let trace = generate(&config);
        assert!(trace.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
        for request in &trace {
            assert_eq!(
                request.hash_ids.len() as u64,
                request.input_length.div_ceil(64)
            );
            assert!(
                request.media_ids.is_empty() || request.media_ids.len() == request.hash_ids.len()
            );
        }
        // Some prompt extends an earlier one (a later turn), images included.
        let extends = trace.iter().enumerate().any(|(i, later)| {
            trace[..i].iter().any(|earlier| {
                earlier.hash_ids.len() > 2
                    && later.hash_ids.len() > earlier.hash_ids.len()
                    && later.hash_ids[..earlier.hash_ids.len() - 1]
                        == earlier.hash_ids[..earlier.hash_ids.len() - 1]
                    && later.media_ids[..earlier.hash_ids.len() - 1]
                        == earlier.media_ids[..earlier.hash_ids.len() - 1]
            })
        });
        assert!(extends);
        assert_ne!(trace, generate(&config.clone().with_seed(10)));
    }
}
