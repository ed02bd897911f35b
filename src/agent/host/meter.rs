//! Write activity of one protected disk: what the guest wrote since the agent started,
//! and in the last few whole seconds. The manager turns the window into the throughput
//! and IOPS it shows per disk and per VPG.
//!
//! Whole-second slots, so a report is the same however often it is asked for (the
//! heartbeat, the admin endpoint and a test may all read it) and costs nothing per
//! write beyond two additions.

use crate::proto::agent::WriteActivity;

/// Whole seconds the window covers (the second in progress is not counted: it would
/// read low until it ends).
pub const WINDOW_SECS: u64 = 5;
const SLOTS: usize = WINDOW_SECS as usize + 1;

#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    second: i64,
    writes: u64,
    bytes: u64,
}

/// See the module documentation. Time comes from the caller (ms since the epoch).
#[derive(Debug, Clone, Default)]
pub struct WriteMeter {
    writes_total: u64,
    bytes_total: u64,
    /// Slot `second % SLOTS` holds that second's writes, or an older second's (stale).
    slots: [Slot; SLOTS],
}

impl WriteMeter {
    /// One write from the guest: `bytes` of data (0 for zeroing and trimming, which
    /// carry none).
    pub fn record(&mut self, now_ms: i64, bytes: u64) {
        self.writes_total += 1;
        self.bytes_total += bytes;
        let second = now_ms.div_euclid(1000);
        let slot = &mut self.slots[slot_of(second)];
        if slot.second != second {
            *slot = Slot {
                second,
                writes: 0,
                bytes: 0,
            };
        }
        slot.writes += 1;
        slot.bytes += bytes;
    }

    /// Totals, and the writes of the [`WINDOW_SECS`] whole seconds before `now_ms`.
    pub fn activity(&self, now_ms: i64) -> WriteActivity {
        let now = now_ms.div_euclid(1000);
        let first = now - WINDOW_SECS as i64;
        let (writes, bytes) = self
            .slots
            .iter()
            .filter(|s| s.second >= first && s.second < now)
            .fold((0, 0), |(w, b), s| (w + s.writes, b + s.bytes));
        WriteActivity {
            writes_total: self.writes_total,
            bytes_total: self.bytes_total,
            window_ms: WINDOW_SECS * 1000,
            window_writes: writes,
            window_bytes: bytes,
        }
    }
}

fn slot_of(second: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..SLOTS.
    usize::try_from(second.rem_euclid(SLOTS as i64)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_790_000_000_000;

    /// A timeline in time order (the meter is fed by a clock that moves forward).
    enum Step {
        Write(i64, u64),
        /// At this time: window writes, window bytes, total writes.
        Check(i64, u64, u64, u64),
    }

    #[test]
    fn window_holds_the_last_whole_seconds_only() {
        use Step::*;
        let timeline = [
            Write(0, 4096),
            Check(500, 0, 0, 1), // second 0 still in progress
            Write(999, 4096),
            Check(1_000, 2, 8192, 2), // second 0 complete
            Write(3_500, 65536),
            Check(5_999, 3, 8192 + 65536, 3), // seconds 0..=4
            Check(6_000, 1, 65536, 3),        // second 0 left the window
            Write(6_000, 512),                // reuses second 0's slot
            Check(6_999, 1, 65536, 4),        // second 6 in progress
            Check(7_000, 2, 65536 + 512, 4),  // seconds 2..=6
            Check(9_000, 1, 512, 4),          // seconds 4..=8
            Check(60_000, 0, 0, 4),           // long quiet
        ];
        let mut m = WriteMeter::default();
        for step in timeline {
            match step {
                Write(t, bytes) => m.record(T0 + t, bytes),
                Check(t, writes, bytes, total) => {
                    let a = m.activity(T0 + t);
                    assert_eq!(
                        (a.window_writes, a.window_bytes, a.writes_total),
                        (writes, bytes, total),
                        "at +{t}"
                    );
                    assert_eq!(a.window_ms, WINDOW_SECS * 1000);
                }
            }
        }
    }

    #[test]
    fn a_slot_reused_after_a_lap_starts_from_zero() {
        let mut m = WriteMeter::default();
        m.record(T0, 1000);
        // SLOTS seconds later the same slot is reused: the old second must not add up.
        let later = T0 + SLOTS as i64 * 1000;
        m.record(later, 10);
        let a = m.activity(later + 1000);
        assert_eq!((a.window_writes, a.window_bytes), (1, 10));
    }

    #[test]
    fn rates_follow_from_the_window() {
        let mut m = WriteMeter::default();
        for s in 0..WINDOW_SECS as i64 {
            for _ in 0..10 {
                m.record(T0 + s * 1000, 1 << 20);
            }
        }
        let a = m.activity(T0 + WINDOW_SECS as i64 * 1000);
        assert_eq!(a.writes_per_sec(), 10.0);
        assert_eq!(a.bytes_per_sec(), f64::from(1u32 << 20) * 10.0);
    }
}
