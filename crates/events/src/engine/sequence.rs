//! Ordering of one engine publisher's batches by their sequence numbers.

/// What a batch's sequence number means for the publisher's stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// The first batch seen: everything before it is unknown (fetch it from `0` if the
    /// engine still buffers it).
    First,
    /// The next batch in order.
    Next,
    /// Already applied.
    Duplicate,
    /// Batches from `from` on were missed.
    Gap { from: u64 },
    /// A new publisher process: its numbering started over.
    Restart,
}

/// The sequence state of one publisher (one engine cache).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RankOrder {
    next: Option<u64>,
    reconnected: bool,
}

impl RankOrder {
    /// Classifies `seq` without changing the state.
    pub(crate) fn classify(&self, seq: u64) -> Arrival {
        match self.next {
            None => Arrival::First,
            Some(next) if seq == next => Arrival::Next,
            // A reconnection that does not continue exactly where the stream was may be a new
            // process that already published some batches: only a fresh start is safe.
            Some(_) if self.reconnected => Arrival::Restart,
            Some(_) if seq == 0 => Arrival::Restart,
            Some(next) if seq < next => Arrival::Duplicate,
            Some(next) => Arrival::Gap { from: next },
        }
    }

    /// Records that `seq` was applied.
    pub(crate) fn applied(&mut self, seq: u64) {
        self.next = Some(seq.wrapping_add(1));
        self.reconnected = false;
    }

    /// Whether the subscription was renewed since the last batch applied.
    pub(crate) fn is_reconnected(&self) -> bool {
        self.reconnected
    }

    /// The renewed subscription continues the same publisher (checked through replay).
    pub(crate) fn continued(&mut self) {
        self.reconnected = false;
    }

    /// Starts over: the next batch is judged as a first one.
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    /// The subscription lost its connection and made a new one.
    pub(crate) fn reconnected(&mut self) {
        self.reconnected = self.next.is_some();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrivals_are_classified() {
        let mut order = RankOrder::default();
        assert_eq!(order.classify(5), Arrival::First);
        order.applied(5);
        assert_eq!(order.classify(6), Arrival::Next);
        assert_eq!(order.classify(4), Arrival::Duplicate);
        assert_eq!(order.classify(9), Arrival::Gap { from: 6 });
        assert_eq!(order.classify(0), Arrival::Restart);
        order.reconnected();
        assert_eq!(order.classify(6), Arrival::Next);
        assert_eq!(order.classify(7), Arrival::Restart);
        assert_eq!(order.classify(3), Arrival::Restart);
        order.applied(6);
        assert_eq!(order.classify(3), Arrival::Duplicate);
        order.reset();
        assert_eq!(order.classify(3), Arrival::First);
    }
}
