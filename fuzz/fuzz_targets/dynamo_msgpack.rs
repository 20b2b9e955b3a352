//! Dynamo's msgpack event plane: an envelope whose payload is a msgpack array of
//! `RouterEvent`s, as any process on the NATS subject can publish it. Decoding must refuse
//! malformed input with a typed error, and what decodes must encode and decode to itself.

#![no_main]

use kvroute_events::{decode_dynamo_envelope, encode_dynamo_envelope};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok((envelope, events)) = decode_dynamo_envelope(bytes) else {
        return;
    };
    let encoded = encode_dynamo_envelope(
        envelope.publisher_id,
        envelope.sequence,
        envelope.published_at,
        &events,
    );
    let (_, again) = decode_dynamo_envelope(&encoded).expect("an encoded envelope decodes");
    assert_eq!(again, events);
});
