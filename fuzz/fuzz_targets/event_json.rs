//! kvroute's JSON event wire: one `RouterEvent` (Dynamo's JSON, a worker's stream in
//! `dynamo-json` mode) and one `EventBatch` (kvroute's own stream). Both readers take a
//! hand-written fast path for the layout publishers write and fall back to serde; the fast path
//! must never panic and never disagree with serde on what it accepts.

#![no_main]

use kvroute_events::EventBatch;
use kvroute_protocol::RouterEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let event = RouterEvent::from_json(bytes).ok();
    assert_eq!(
        event,
        serde_json::from_slice::<RouterEvent>(bytes).ok(),
        "event fast path differs from serde"
    );
    if let Some(event) = event {
        let again =
            RouterEvent::from_json(event.to_json().as_bytes()).expect("a written event reads back");
        assert_eq!(again, event);
    }
    let batch = EventBatch::from_json(bytes).ok();
    assert_eq!(
        batch,
        serde_json::from_slice::<EventBatch>(bytes).ok(),
        "batch fast path differs from serde"
    );
});
