//! Counters and fixed-bucket histograms for the site's metrics endpoint: plain atomics, so the
//! crates that fill them (this one, the engine, the site's hot paths) need no metrics library,
//! and recording a value costs a few relaxed atomic adds.
//!
//! The histogram bounds are named constants, as Prometheus histograms need fixed buckets. Values
//! are whole numbers in the bound's unit (nanoseconds for latencies, bytes for sizes); the site
//! converts them to base units (seconds) when it exports them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of latency buckets, in nanoseconds: 10 us to 10 s. An NBD read here takes tens
/// of microseconds, an fdatasync about 140 us, a batch ack over a WAN tens of milliseconds.
pub const LATENCY_BUCKETS_NANOS: [u64; 19] = [
    10_000,
    25_000,
    50_000,
    100_000,
    250_000,
    500_000,
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
];

/// Upper bounds of size buckets, in bytes: 4 KiB to 16 MiB, by powers of 4.
pub const SIZE_BUCKETS_BYTES: [u64; 7] = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20];

/// A histogram over fixed bucket bounds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [u64],
    /// One count per bound (values <= that bound and > the previous one), then one for values
    /// above the last bound.
    counts: Box<[AtomicU64]>,
    /// Sum of every value observed, in the bounds' unit.
    sum: AtomicU64,
}

/// What a histogram held at one moment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HistogramSnapshot {
    /// Upper bounds of the buckets, in the histogram's unit.
    pub bounds: &'static [u64],
    /// Values in each bucket (not cumulative); one more than `bounds`, the last for values above
    /// every bound.
    pub counts: Vec<u64>,
    /// Sum of the values, in the histogram's unit.
    pub sum: u64,
}

impl HistogramSnapshot {
    /// Values observed in all.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

impl Histogram {
    /// An empty histogram over `bounds` (ascending).
    pub fn new(bounds: &'static [u64]) -> Histogram {
        assert!(bounds.windows(2).all(|w| w.first() < w.get(1)), "histogram bounds must ascend");
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    /// A latency histogram over [`LATENCY_BUCKETS_NANOS`].
    pub fn latency() -> Histogram {
        Histogram::new(&LATENCY_BUCKETS_NANOS)
    }

    /// A size histogram over [`SIZE_BUCKETS_BYTES`].
    pub fn size() -> Histogram {
        Histogram::new(&SIZE_BUCKETS_BYTES)
    }

    /// Count one value.
    pub fn observe(&self, value: u64) {
        let bucket = self.bounds.partition_point(|bound| *bound < value);
        if let Some(count) = self.counts.get(bucket) {
            count.fetch_add(1, Ordering::Relaxed);
        }
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    /// Count one duration, in nanoseconds (for histograms over [`LATENCY_BUCKETS_NANOS`]).
    pub fn observe_duration(&self, duration: Duration) {
        self.observe(u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX));
    }

    /// The counts now. Taken bucket by bucket without a lock, so a value recorded meanwhile may
    /// be in the counts and not yet in the sum; the count is the sum of the buckets, so it always
    /// agrees with them.
    pub fn snapshot(&self) -> HistogramSnapshot {
        HistogramSnapshot {
            bounds: self.bounds,
            counts: self.counts.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
            sum: self.sum.load(Ordering::Relaxed),
        }
    }
}

/// What a journal has done since it was opened, for metrics.
#[derive(Debug)]
pub struct JournalStats {
    /// Bytes of records appended (headers, payload and trailers), host writes and replicated
    /// records alike; records replayed at open are not counted.
    pub appended_bytes_total: AtomicU64,
    /// Records appended.
    pub appended_records_total: AtomicU64,
    /// Time each group commit's fdatasync took (sealed segments and the newest one), in
    /// nanoseconds; the caller, which owns the clock, records it with [`JournalStats::record_sync`].
    pub sync_duration: Histogram,
}

impl Default for JournalStats {
    fn default() -> Self {
        JournalStats {
            appended_bytes_total: AtomicU64::new(0),
            appended_records_total: AtomicU64::new(0),
            sync_duration: Histogram::latency(),
        }
    }
}

impl JournalStats {
    /// Count one appended record of `bytes` bytes.
    pub fn record_append(&self, bytes: u64) {
        self.appended_bytes_total.fetch_add(bytes, Ordering::Relaxed);
        self.appended_records_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Count `records` appended in one write of `bytes`.
    pub fn record_appends(&self, records: u64, bytes: u64) {
        self.appended_bytes_total.fetch_add(bytes, Ordering::Relaxed);
        self.appended_records_total.fetch_add(records, Ordering::Relaxed);
    }

    /// Count one fdatasync that took `duration`.
    pub fn record_sync(&self, duration: Duration) {
        self.sync_duration.observe_duration(duration);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_land_in_the_first_bucket_whose_bound_holds_them() {
        static BOUNDS: [u64; 3] = [10, 100, 1000];
        let h = Histogram::new(&BOUNDS);
        for v in [0, 10, 11, 100, 999, 1000, 1001, u64::MAX / 2] {
            h.observe(v);
        }
        let s = h.snapshot();
        assert_eq!(s.counts, vec![2, 2, 2, 2]);
        assert_eq!(s.count(), 8);
        assert_eq!(s.sum, [0, 10, 11, 100, 999, 1000, 1001, u64::MAX / 2].iter().sum::<u64>());
    }

    #[test]
    fn durations_are_counted_in_nanoseconds() {
        let h = Histogram::latency();
        h.observe_duration(Duration::from_micros(140));
        h.observe_duration(Duration::from_secs(3600));
        let s = h.snapshot();
        assert_eq!(s.counts.get(4), Some(&1), "140 us falls in the 250 us bucket");
        assert_eq!(s.counts.last(), Some(&1), "an hour is above every bound");
        assert_eq!(s.sum, 140_000 + 3_600_000_000_000);
    }
}
