//! Multi-sample pins: where each well lies along x, and which sample a
//! position belongs to. See `docs/algorithm.md`, "Multi-sample pins".

use std::collections::HashMap;

/// The wells of a multi-sample pin. Empty for an ordinary (single-sample) pin.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wells {
    /// Lower and upper limit of each well along x, in grid boxes (inclusive).
    pub limits: Vec<(f64, f64)>,
    /// Sample id of each well, keyed by well number (1-based).
    pub sample_ids: HashMap<i64, i64>,
}

impl Wells {
    pub fn is_multi_sample(&self) -> bool {
        !self.limits.is_empty()
    }

    /// The sample at x position `position` (grid boxes): the pin's own
    /// `sample_id` on a single-sample pin; on a multi-sample pin the sample of
    /// the first well whose limits hold it (both ends inclusive), else none.
    pub fn tag(&self, sample_id: Option<i64>, position: f64) -> Option<i64> {
        if !self.is_multi_sample() {
            return sample_id;
        }
        let k = self
            .limits
            .iter()
            .position(|&(lo, hi)| lo <= position && position <= hi)?;
        self.sample_ids.get(&(k as i64 + 1)).copied()
    }
}

/// Well limits in grid boxes for `loop_type` `multipin_{n}x{w}+{o}` (found
/// anywhere in the string) and a grid step of `dx_mm`. Any other loop type is a
/// single-sample pin: no wells.
pub fn well_limits(loop_type: &str, dx_mm: f64) -> Vec<(f64, f64)> {
    let Some((n, w, o)) = parse_multipin(loop_type) else {
        return Vec::new();
    };
    let step = dx_mm * 1000.0;
    let half = w as f64 / 2.0;
    (0..n)
        .map(|k| {
            let centre = (o + w * k) as f64;
            ((centre - half) / step, (centre + half) / step)
        })
        .collect()
}

/// `multipin_(\d+)x(\d+)\+(\d+)`, first match in the string.
fn parse_multipin(s: &str) -> Option<(i64, i64, i64)> {
    const TAG: &str = "multipin_";
    let mut rest = s;
    while let Some(at) = rest.find(TAG) {
        let tail = &rest[at + TAG.len()..];
        let parsed = (|| {
            let (n, tail) = digits(tail)?;
            let (w, tail) = digits(tail.strip_prefix('x')?)?;
            let (o, _) = digits(tail.strip_prefix('+')?)?;
            Some((n, w, o))
        })();
        if parsed.is_some() {
            return parsed;
        }
        rest = &rest[at + 1..];
    }
    None
}

fn digits(s: &str) -> Option<(i64, &str)> {
    let end = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if end == 0 {
        return None;
    }
    // Wells beyond i64 are not a pin; treat as no match rather than overflow.
    Some((s[..end].parse().ok()?, &s[end..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn six_wells_of_a_standard_pin() {
        let limits = well_limits("multipin_6x1600+1000", 0.02);
        assert_eq!(limits.len(), 6);
        // well 0: (1000 - 800) / 20 .. (1000 + 800) / 20
        assert_eq!(limits[0], (10.0, 90.0));
        assert_eq!(
            limits[5],
            (
                (1000.0 + 8000.0 - 800.0) / 20.0,
                (1000.0 + 8000.0 + 800.0) / 20.0
            )
        );
    }

    #[test]
    fn other_loop_types_have_no_wells() {
        for s in [
            "",
            "Standard",
            "multipin_",
            "multipin_6x",
            "multipin_6x1600+",
            "multipin_ax1+2",
        ] {
            assert!(well_limits(s, 0.02).is_empty(), "{s}");
        }
        assert_eq!(well_limits("a multipin_x multipin_2x10+5", 0.01).len(), 2);
    }

    #[test]
    fn tagging_is_inclusive_and_first_well_wins() {
        let wells = Wells {
            limits: vec![(0.0, 4.0), (4.0, 7.0)],
            sample_ids: [(1, 10), (2, 20)].into_iter().collect(),
        };
        assert_eq!(wells.tag(Some(5), 4.0), Some(10));
        assert_eq!(wells.tag(Some(5), 7.0), Some(20));
        assert_eq!(wells.tag(Some(5), 7.5), None);
        assert_eq!(Wells::default().tag(Some(5), 99.0), Some(5));
    }
}
