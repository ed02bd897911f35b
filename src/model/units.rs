//! Sizes and durations in the words operators read in alert and event messages:
//! binary units (`38.3 MiB`) and the largest whole-ish time unit (`4 min`, `1.5 h`).
//! Programs read the exact numbers from the API fields, never from these strings.

use std::fmt;

/// A byte count, shown in binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bytes(pub u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut v = self.0 as f64;
        let mut i = 0;
        while v >= 1024.0 && i < UNITS.len() - 1 {
            v /= 1024.0;
            i += 1;
        }
        if i == 0 || v >= 100.0 || v.fract() == 0.0 {
            write!(f, "{v:.0} {}", UNITS[i])
        } else {
            write!(f, "{v:.1} {}", UNITS[i])
        }
    }
}

/// A duration in whole seconds, shown in the largest unit that keeps it readable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Secs(pub u64);

impl fmt::Display for Secs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0;
        let one = |v: f64, unit: &str, f: &mut fmt::Formatter<'_>| {
            if v.fract() == 0.0 || v >= 10.0 {
                write!(f, "{v:.0} {unit}")
            } else {
                write!(f, "{v:.1} {unit}")
            }
        };
        match s {
            0..120 => write!(f, "{s} s"),
            120..7200 => one(s as f64 / 60.0, "min", f),
            7200..172_800 => one(s as f64 / 3600.0, "h", f),
            _ => one(s as f64 / 86_400.0, "days", f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes() {
        let table = [
            (0, "0 B"),
            (1023, "1023 B"),
            (1024, "1 KiB"),
            (1536, "1.5 KiB"),
            (1 << 20, "1 MiB"),
            (40_154_272, "38.3 MiB"),
            (150 * (1 << 30), "150 GiB"),
            (75 * (1 << 30) / 100 * 100, "75 GiB"),
            (u64::MAX, "16384 PiB"),
        ];
        for (n, want) in table {
            assert_eq!(Bytes(n).to_string(), want, "{n}");
        }
    }

    #[test]
    fn secs() {
        let table = [
            (0, "0 s"),
            (119, "119 s"),
            (120, "2 min"),
            (150, "2.5 min"),
            (3600, "60 min"),
            (7200, "2 h"),
            (86_400, "24 h"),
            (172_800, "2 days"),
            (30 * 86_400, "30 days"),
        ];
        for (n, want) in table {
            assert_eq!(Secs(n).to_string(), want, "{n}");
        }
    }
}
