//! A fast path for `RouterEvent` JSON: a writer that produces exactly serde's bytes, and a
//! reader for exactly that layout.
//!
//! Events travel as JSON by the million (a worker's stores and evictions), so encoding and
//! decoding them through serde's generic machinery was a large share of the event pipeline's
//! CPU (docs/benchmarks.md, "kvroute-events"). The writer appends literal keys and formats
//! integers directly; the reader walks the same layout byte by byte with no intermediate
//! allocation. The serde implementations stay the reference: the writer's output is
//! byte-identical to `serde_json`'s, and the reader only accepts what serde would parse to the
//! same value. Anything else (whitespace, another field order, unknown or optional fields this
//! path does not handle, malformed input) makes the reader answer `None`, and the caller parses
//! with serde, which either succeeds or reports the error. Property tests check both claims.

use crate::event::{
    BlockExtraInfo, BlockMmObjectInfo, KvCacheEvent, KvCacheEventData, KvCacheRemoveData,
    KvCacheStoreData, KvCacheStoredBlockData, ResidencyDomain, RouterEvent, StorageTier,
};
use crate::ids::{BlockHash, DpRank, MediaId, SequenceHash, WorkerId};
use serde::Serialize;

impl RouterEvent {
    /// Appends the event's JSON to `out`: the same bytes as [`RouterEvent::to_json`]
    /// (Dynamo's layout), written without going through serde for everything but the rare
    /// free-form fields.
    ///
    /// ```
    /// use kvroute_protocol::{DpRank, KvCacheEvent, KvCacheEventData, RouterEvent, WorkerId};
    ///
    /// let event = RouterEvent::new(
    ///     WorkerId(7),
    ///     KvCacheEvent { event_id: 44, data: KvCacheEventData::Cleared, dp_rank: DpRank(0) },
    /// );
    /// let mut out = Vec::new();
    /// event.write_json(&mut out);
    /// assert_eq!(out, event.to_json().as_bytes());
    /// ```
    pub fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"worker_id\":");
        write_u64(out, self.worker_id.0);
        out.extend_from_slice(b",\"storage_tier\":");
        out.extend_from_slice(match self.storage_tier {
            StorageTier::Device => b"\"device\"".as_slice(),
            StorageTier::HostPinned => b"\"host_pinned\"",
            StorageTier::Disk => b"\"disk\"",
            StorageTier::External => b"\"external\"",
        });
        if let Some(domain) = &self.residency_domain {
            out.extend_from_slice(b",\"residency_domain\":");
            match domain {
                ResidencyDomain::Worker => out.extend_from_slice(b"\"worker\""),
                ResidencyDomain::CacheOwner => out.extend_from_slice(b"\"cache_owner\""),
                ResidencyDomain::Unknown(name) => write_serde(out, name),
                ResidencyDomain::Invalid => out.extend_from_slice(b"null"),
            }
        }
        out.extend_from_slice(b",\"event\":{\"event_id\":");
        write_u64(out, self.event.event_id);
        out.extend_from_slice(b",\"data\":");
        match &self.event.data {
            KvCacheEventData::Stored(store) => write_store(out, store),
            KvCacheEventData::Removed(removed) => {
                out.extend_from_slice(b"{\"removed\":{\"block_hashes\":[");
                for (i, hash) in removed.block_hashes.iter().enumerate() {
                    if i > 0 {
                        out.push(b',');
                    }
                    write_u64(out, hash.0);
                }
                out.extend_from_slice(b"]}}");
            }
            KvCacheEventData::Cleared => out.extend_from_slice(b"\"cleared\""),
        }
        out.extend_from_slice(b",\"dp_rank\":");
        write_u64(out, self.event.dp_rank.0.into());
        out.push(b'}');
        if let Some(source) = &self.state_source {
            out.extend_from_slice(b",\"state_source\":");
            write_serde(out, source);
        }
        if let Some(session) = &self.session_id {
            out.extend_from_slice(b",\"session_id\":");
            write_serde(out, session);
        }
        out.push(b'}');
    }
}

fn write_store(out: &mut Vec<u8>, store: &KvCacheStoreData) {
    out.extend_from_slice(b"{\"stored\":{\"parent_hash\":");
    write_optional_u64(out, store.parent_hash.map(|parent| parent.0));
    out.extend_from_slice(b",\"start_position\":");
    write_optional_u64(out, store.start_position.map(Into::into));
    out.extend_from_slice(b",\"blocks\":[");
    for (i, block) in store.blocks.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(b"{\"block_hash\":");
        write_u64(out, block.block_hash.0);
        out.extend_from_slice(b",\"tokens_hash\":");
        write_u64(out, block.tokens_hash.0);
        out.extend_from_slice(b",\"mm_extra_info\":");
        match &block.mm_extra_info {
            None => out.extend_from_slice(b"null"),
            Some(info) => {
                out.extend_from_slice(b"{\"mm_objects\":[");
                for (j, object) in info.mm_objects.iter().enumerate() {
                    if j > 0 {
                        out.push(b',');
                    }
                    out.extend_from_slice(b"{\"mm_hash\":");
                    write_u64(out, object.mm_hash.0);
                    out.extend_from_slice(b",\"offsets\":[");
                    for (k, &(start, end)) in object.offsets.iter().enumerate() {
                        if k > 0 {
                            out.push(b',');
                        }
                        out.push(b'[');
                        write_u64(out, start as u64);
                        out.push(b',');
                        write_u64(out, end as u64);
                        out.push(b']');
                    }
                    out.extend_from_slice(b"]}");
                }
                out.extend_from_slice(b"]}");
            }
        }
        out.push(b'}');
    }
    out.extend_from_slice(b"]}}");
}

#[inline]
fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

fn write_optional_u64(out: &mut Vec<u8>, value: Option<u64>) {
    match value {
        Some(value) => write_u64(out, value),
        None => out.extend_from_slice(b"null"),
    }
}

/// Free-form values (strings that may need escaping, Dynamo's opaque `state_source`) go
/// through serde_json, so their bytes are serde's by construction.
fn write_serde(out: &mut Vec<u8>, value: &impl Serialize) {
    // Writing a string or a JSON value (string keys only) into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// Reads the JSON layout [`RouterEvent::write_json`] writes, and nothing else.
///
/// Every method either consumes what it expects and returns it, or returns `None` and
/// consumes nothing of the failed item; `None` means "not in the canonical layout", *not*
/// "invalid": parse the same bytes with serde then (as [`RouterEvent::from_json`] does). A
/// value the reader returns is the value serde would have parsed. Container formats that hold
/// events (a batch of them) are read with the same primitives:
///
/// ```
/// use kvroute_protocol::{JsonReader, RouterEvent, WorkerId};
///
/// let json = br#"{"batch":[{"worker_id":7,"storage_tier":"device","event":{"event_id":1,"data":"cleared","dp_rank":0}}]}"#;
/// let mut reader = JsonReader::new(json);
/// let mut events = Vec::new();
/// reader.literal(b"{\"batch\":[").unwrap();
/// loop {
///     events.push(reader.router_event().unwrap());
///     if !reader.eat(b',') {
///         break;
///     }
/// }
/// reader.literal(b"]}").unwrap();
/// assert!(reader.is_at_end());
/// assert_eq!(events[0].worker_id, WorkerId(7));
/// ```
#[derive(Debug)]
pub struct JsonReader<'a> {
    bytes: &'a [u8],
    pos: usize,
    /// Reused between events so a store's blocks are allocated once, at their final size.
    blocks: Vec<KvCacheStoredBlockData>,
    hashes: Vec<SequenceHash>,
}

impl<'a> JsonReader<'a> {
    /// A reader at the start of `bytes`.
    pub fn new(bytes: &'a [u8]) -> Self {
        Self {
            bytes,
            pos: 0,
            blocks: Vec::new(),
            hashes: Vec::new(),
        }
    }

    /// Whether every byte was read.
    pub fn is_at_end(&self) -> bool {
        self.pos == self.bytes.len()
    }

    /// Consumes `expected` if the input continues with exactly these bytes.
    #[inline]
    pub fn literal(&mut self, expected: &[u8]) -> Option<()> {
        let end = self.pos.checked_add(expected.len())?;
        if self.bytes.get(self.pos..end)? == expected {
            self.pos = end;
            Some(())
        } else {
            None
        }
    }

    /// Consumes `byte` if it comes next; says whether it did.
    #[inline]
    pub fn eat(&mut self, byte: u8) -> bool {
        let next = self.bytes.get(self.pos) == Some(&byte);
        self.pos += usize::from(next);
        next
    }

    /// An unsigned integer as serde_json reads one into a `u64`: digits without a sign, a
    /// leading zero only alone, no fraction or exponent, at most `u64::MAX`.
    #[inline]
    pub fn u64(&mut self) -> Option<u64> {
        let rest = self.bytes.get(self.pos..)?;
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        let (&first, _) = rest.split_first()?;
        let fraction_or_exponent = matches!(rest.get(digits), Some(b'.' | b'e' | b'E'));
        if digits == 0 || (first == b'0' && digits > 1) || fraction_or_exponent {
            return None;
        }
        let mut value: u64 = 0;
        for &digit in &rest[..digits] {
            value = value
                .checked_mul(10)?
                .checked_add(u64::from(digit - b'0'))?;
        }
        self.pos += digits;
        Some(value)
    }

    fn u32(&mut self) -> Option<u32> {
        let start = self.pos;
        let value = self.u64()?;
        u32::try_from(value).ok().or_else(|| {
            self.pos = start;
            None
        })
    }

    /// Runs `read`, rewinding to where it started if it answers `None`.
    #[inline]
    fn atomic<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<T> {
        let start = self.pos;
        let value = read(self);
        if value.is_none() {
            self.pos = start;
        }
        value
    }

    /// One `RouterEvent` in [`RouterEvent::write_json`]'s layout, without `state_source` or
    /// `session_id` (events carrying those take the serde path).
    pub fn router_event(&mut self) -> Option<RouterEvent> {
        self.atomic(Self::router_event_inner)
    }

    fn router_event_inner(&mut self) -> Option<RouterEvent> {
        self.literal(b"{\"worker_id\":")?;
        let worker_id = WorkerId(self.u64()?);
        self.literal(b",\"storage_tier\":\"")?;
        let storage_tier = if self.literal(b"device\"").is_some() {
            StorageTier::Device
        } else if self.literal(b"host_pinned\"").is_some() {
            StorageTier::HostPinned
        } else if self.literal(b"disk\"").is_some() {
            StorageTier::Disk
        } else {
            self.literal(b"external\"")?;
            StorageTier::External
        };
        let residency_domain = if self.literal(b",\"residency_domain\":").is_some() {
            Some(if self.literal(b"\"worker\"").is_some() {
                ResidencyDomain::Worker
            } else if self.literal(b"\"cache_owner\"").is_some() {
                ResidencyDomain::CacheOwner
            } else {
                self.literal(b"null")?;
                ResidencyDomain::Invalid
            })
        } else {
            None
        };
        self.literal(b",\"event\":{\"event_id\":")?;
        let event_id = self.u64()?;
        self.literal(b",\"data\":")?;
        let data = if self.literal(b"\"cleared\"").is_some() {
            KvCacheEventData::Cleared
        } else if self.literal(b"{\"stored\":{\"parent_hash\":").is_some() {
            KvCacheEventData::Stored(self.store()?)
        } else {
            self.literal(b"{\"removed\":{\"block_hashes\":[")?;
            self.hashes.clear();
            if !self.eat(b']') {
                loop {
                    let hash = SequenceHash(self.u64()?);
                    self.hashes.push(hash);
                    if !self.eat(b',') {
                        break;
                    }
                }
                self.literal(b"]")?;
            }
            self.literal(b"}}")?;
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: self.hashes.as_slice().to_vec(),
            })
        };
        self.literal(b",\"dp_rank\":")?;
        let dp_rank = DpRank(self.u32()?);
        self.literal(b"}}")?;
        Some(RouterEvent {
            worker_id,
            storage_tier,
            residency_domain,
            event: KvCacheEvent {
                event_id,
                data,
                dp_rank,
            },
            state_source: None,
            session_id: None,
        })
    }

    /// The rest of a store, after `{"stored":{"parent_hash":`.
    fn store(&mut self) -> Option<KvCacheStoreData> {
        let parent_hash = self.null_or(|r| r.u64().map(SequenceHash))?;
        self.literal(b",\"start_position\":")?;
        let start_position = self.null_or(Self::u32)?;
        self.literal(b",\"blocks\":[")?;
        self.blocks.clear();
        if !self.eat(b']') {
            loop {
                self.literal(b"{\"block_hash\":")?;
                let block_hash = SequenceHash(self.u64()?);
                self.literal(b",\"tokens_hash\":")?;
                let tokens_hash = BlockHash(self.u64()?);
                self.literal(b",\"mm_extra_info\":")?;
                let mm_extra_info = self.null_or(Self::extra_info)?;
                self.literal(b"}")?;
                self.blocks.push(KvCacheStoredBlockData {
                    block_hash,
                    tokens_hash,
                    mm_extra_info,
                });
                if !self.eat(b',') {
                    break;
                }
            }
            self.literal(b"]")?;
        }
        self.literal(b"}}")?;
        Some(KvCacheStoreData {
            parent_hash,
            start_position,
            blocks: self.blocks.drain(..).collect(),
        })
    }

    /// `null` as `Some(None)`, else what `read` reads.
    fn null_or<T>(&mut self, read: impl FnOnce(&mut Self) -> Option<T>) -> Option<Option<T>> {
        if self.literal(b"null").is_some() {
            Some(None)
        } else {
            read(self).map(Some)
        }
    }

    fn extra_info(&mut self) -> Option<BlockExtraInfo> {
        self.literal(b"{\"mm_objects\":[")?;
        let mut mm_objects = Vec::new();
        if !self.eat(b']') {
            loop {
                self.literal(b"{\"mm_hash\":")?;
                let mm_hash = MediaId(self.u64()?);
                self.literal(b",\"offsets\":[")?;
                let mut offsets = Vec::new();
                if !self.eat(b']') {
                    loop {
                        self.literal(b"[")?;
                        let start = usize::try_from(self.u64()?).ok()?;
                        self.literal(b",")?;
                        let end = usize::try_from(self.u64()?).ok()?;
                        self.literal(b"]")?;
                        offsets.push((start, end));
                        if !self.eat(b',') {
                            break;
                        }
                    }
                    self.literal(b"]")?;
                }
                self.literal(b"}")?;
                mm_objects.push(BlockMmObjectInfo { mm_hash, offsets });
                if !self.eat(b',') {
                    break;
                }
            }
            self.literal(b"]")?;
        }
        self.literal(b"}")?;
        Some(BlockExtraInfo { mm_objects })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use crate::event::StateSource;
    use proptest::prelude::*;

    fn hash() -> impl Strategy<Value = u64> {
        prop_oneof![0..20u64, any::<u64>(), Just(u64::MAX), Just((1 << 53) + 1)]
    }

    fn extra_info() -> impl Strategy<Value = Option<BlockExtraInfo>> {
        let object = (
            hash(),
            proptest::collection::vec((0..64usize, 0..64usize), 0..3),
        )
            .prop_map(|(h, offsets)| BlockMmObjectInfo {
                mm_hash: MediaId(h),
                offsets,
            });
        proptest::option::of(
            proptest::collection::vec(object, 0..3)
                .prop_map(|mm_objects| BlockExtraInfo { mm_objects }),
        )
    }

    fn data() -> impl Strategy<Value = KvCacheEventData> {
        let block = (hash(), hash(), extra_info()).prop_map(|(b, t, mm_extra_info)| {
            KvCacheStoredBlockData {
                block_hash: SequenceHash(b),
                tokens_hash: BlockHash(t),
                mm_extra_info,
            }
        });
        prop_oneof![
            (
                proptest::option::of(hash()),
                proptest::option::of(any::<u32>()),
                proptest::collection::vec(block, 0..5)
            )
                .prop_map(|(parent, start, blocks)| {
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: parent.map(SequenceHash),
                        start_position: start,
                        blocks,
                    })
                }),
            proptest::collection::vec(hash(), 0..5).prop_map(|hashes| {
                KvCacheEventData::Removed(KvCacheRemoveData {
                    block_hashes: hashes.into_iter().map(SequenceHash).collect(),
                })
            }),
            Just(KvCacheEventData::Cleared),
        ]
    }

    fn event() -> impl Strategy<Value = RouterEvent> {
        let tier = prop_oneof![
            Just(StorageTier::Device),
            Just(StorageTier::HostPinned),
            Just(StorageTier::Disk),
            Just(StorageTier::External),
        ];
        let domain = proptest::option::of(prop_oneof![
            Just(ResidencyDomain::Worker),
            Just(ResidencyDomain::CacheOwner),
            Just(ResidencyDomain::Invalid),
            "[a-z\"\\\\é ]{0,6}".prop_map(ResidencyDomain::Unknown),
        ]);
        let source = proptest::option::of(prop_oneof![
            Just(serde_json::json!({"pool": "a\"b", "slot": 3})),
            Just(serde_json::json!([1, null, true])),
        ]);
        let session = proptest::option::of("[a-z\"\\\\\n]{0,6}");
        (
            hash(),
            tier,
            domain,
            (hash(), data(), any::<u32>()),
            source,
            session,
        )
            .prop_map(
                |(worker, storage_tier, residency_domain, (id, data, rank), source, session)| {
                    RouterEvent {
                        worker_id: WorkerId(worker),
                        storage_tier,
                        residency_domain,
                        event: KvCacheEvent {
                            event_id: id,
                            data,
                            dp_rank: DpRank(rank),
                        },
                        state_source: source
                            .map(|v| serde_json::from_value::<StateSource>(v).unwrap()),
                        session_id: session,
                    }
                },
            )
    }

    /// Mutations of valid JSON that stay close to the canonical layout.
    fn mutate(mut bytes: Vec<u8>, at: usize, how: u8, byte: u8) -> Vec<u8> {
        if bytes.is_empty() {
            return bytes;
        }
        let at = at % bytes.len();
        match how % 4 {
            0 => bytes[at] = byte,
            1 => bytes.insert(at, byte),
            2 => {
                bytes.remove(at);
            }
            _ => bytes.truncate(at),
        }
        bytes
    }

    proptest! {
        #[test]
        fn writes_serdes_bytes(event in event()) {
            let mut out = Vec::new();
            event.write_json(&mut out);
            prop_assert_eq!(out, serde_json::to_vec(&event).unwrap());
        }

        #[test]
        fn reads_what_it_writes_as_serde_does(event in event()) {
            let mut out = Vec::new();
            event.write_json(&mut out);
            let mut reader = JsonReader::new(&out);
            let fast = reader.router_event();
            let free_form = event.state_source.is_some() || event.session_id.is_some()
                || matches!(event.residency_domain, Some(ResidencyDomain::Unknown(_)));
            if free_form {
                prop_assert!(fast.is_none());
                prop_assert_eq!(reader.pos, 0);
            } else {
                prop_assert!(reader.is_at_end());
                prop_assert_eq!(fast.as_ref(), Some(&event));
            }
            prop_assert_eq!(RouterEvent::from_json(&out).unwrap(), event);
        }

        #[test]
        fn accepts_nothing_serde_reads_differently(
            event in event(),
            at in any::<usize>(),
            how in any::<u8>(),
            byte in prop_oneof![Just(b'0'), Just(b'9'), Just(b','), Just(b' '), Just(b'-'),
                                 Just(b'.'), Just(b'e'), Just(b'"'), Just(b'}'), Just(b']'),
                                 any::<u8>()],
        ) {
            let mut out = Vec::new();
            event.write_json(&mut out);
            let bytes = mutate(out, at, how, byte);
            let mut reader = JsonReader::new(&bytes);
            let serde = serde_json::from_slice::<RouterEvent>(&bytes).ok();
            match reader.router_event() {
                Some(fast) if reader.is_at_end() => prop_assert_eq!(Some(&fast), serde.as_ref()),
                Some(_) => {}
                None => prop_assert_eq!(reader.pos, 0),
            }
            prop_assert_eq!(RouterEvent::from_json(&bytes).ok(), serde);
        }
    }

    #[test]
    fn numbers_follow_serde_json() {
        for (text, expected) in [
            ("0", Some(0)),
            ("18446744073709551615", Some(u64::MAX)),
            ("18446744073709551616", None),
            ("01", None),
            ("-1", None),
            ("1.0", None),
            ("1e3", None),
            ("", None),
            ("x", None),
        ] {
            let mut reader = JsonReader::new(text.as_bytes());
            assert_eq!(reader.u64(), expected, "{text}");
            if expected.is_none() {
                assert_eq!(reader.pos, 0, "{text}");
            }
        }
    }
}
