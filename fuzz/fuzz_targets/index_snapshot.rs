//! The index snapshot a router restores from the NATS object store at start-up (written by
//! another router, readable by anyone with write access to the bucket). Restoring must refuse
//! malformed bytes with a typed error, and what restores must snapshot to bytes that restore to
//! the same index.

#![no_main]

use kvroute_index::{Index, IndexConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Ok(index) = Index::restore(bytes, IndexConfig::default()) else {
        return;
    };
    let snapshot = index.snapshot();
    let again =
        Index::restore(&snapshot, IndexConfig::default()).expect("a written snapshot restores");
    assert_eq!(again.snapshot(), snapshot);
});
