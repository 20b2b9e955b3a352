//! Media id throughput.
#![allow(missing_docs, clippy::expect_used)]
fn main() {}
