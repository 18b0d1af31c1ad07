//! Spots: the 4-connected groups of strong pixels, as DIALS labels them in 2D.
//!
//! The strong pixels come in raster order; they are cut into runs along each
//! row, a run is joined to the runs of the row above that share a column
//! with it (union-find), and each group's size, intensity, centroid and
//! bounding box are summed. The work is sized to the strong pixels, not the
//! frame. Spots are numbered in the raster order of their first pixel (as
//! `scipy.ndimage.label` numbers them).

use crate::strong::Strong;

/// The spots of one frame, one entry per spot in every column.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Spots {
    /// How many strong pixels the frame had (in spots of any size).
    pub n_strong_pixels: usize,
    /// Pixels in each spot.
    pub size: Vec<u32>,
    /// Sum of the spot's pixel values.
    pub intensity: Vec<f64>,
    /// Value-weighted centroid `(x, y)` in pixels, a pixel's centre at `+0.5`.
    pub centroid: Vec<[f64; 2]>,
    /// `[x0, x1, y0, y1]`, half-open, as DIALS orders a bounding box.
    pub bounding_box: Vec<[u32; 4]>,
}

impl Spots {
    pub fn len(&self) -> usize {
        self.size.len()
    }
    pub fn is_empty(&self) -> bool {
        self.size.is_empty()
    }
}

/// Which spots are kept: `min_size <= size <= max_size` (None: no maximum),
/// and, with `max_separation`, those whose brightest pixel's centre is at
/// most that far from their centroid (DIALS's `PeakCentroidDistanceFilter`;
/// the first brightest pixel in raster order).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SpotFilter {
    pub min_size: u32,
    pub max_size: Option<u32>,
    pub max_separation: Option<f64>,
}

impl Default for SpotFilter {
    fn default() -> Self {
        SpotFilter { min_size: 3, max_size: Some(1000), max_separation: None }
    }
}

struct Run {
    row: u32,
    c0: u32,
    c1: u32, // exclusive
    first: usize,
}

/// What a spot sums while its runs are visited.
#[derive(Default)]
struct Sums {
    size: u32,
    sum: f64,
    sx: f64,
    sy: f64,
    bounding_box: [u32; 4],
    peak: f64,
    peak_at: [f64; 2],
}

fn find(parent: &mut [u32], mut a: u32) -> u32 {
    while parent[a as usize] != a {
        let up = parent[parent[a as usize] as usize];
        parent[a as usize] = up;
        a = up;
    }
    a
}

/// The spots of the strong pixels of a frame `width` pixels wide.
pub fn label(strong: &Strong, width: usize, limits: SpotFilter) -> Spots {
    let w = width as u32;
    let mut runs: Vec<Run> = Vec::new();
    for (i, &at) in strong.index.iter().enumerate() {
        let (row, col) = (at / w, at % w);
        match runs.last_mut() {
            Some(run) if run.row == row && run.c1 == col => run.c1 += 1,
            _ => runs.push(Run { row, c0: col, c1: col + 1, first: i }),
        }
    }
    let mut parent: Vec<u32> = (0..runs.len() as u32).collect();
    // the runs of the row above, as a window into `runs`
    let (mut above, mut above_end) = (0usize, 0usize);
    let mut i = 0;
    while i < runs.len() {
        let row = runs[i].row;
        let mut end = i;
        while end < runs.len() && runs[end].row == row {
            end += 1;
        }
        if above_end > above && runs[above].row + 1 != row {
            above = above_end; // the previous row is not adjacent
        }
        let mut a = above;
        for j in i..end {
            while a < above_end && runs[a].c1 <= runs[j].c0 {
                a += 1;
            }
            let mut b = a;
            while b < above_end && runs[b].c0 < runs[j].c1 {
                let (ra, rb) = (find(&mut parent, b as u32), find(&mut parent, j as u32));
                if ra != rb {
                    // the earlier run stays the root: spots keep their raster order
                    let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
                    parent[hi as usize] = lo;
                }
                b += 1;
            }
            // the last run above that overlapped may overlap the next run too
            if b > a {
                a = b - 1;
            }
        }
        above = i;
        above_end = end;
        i = end;
    }
    // each root's spot, in the order of roots (raster order of first pixels)
    let mut slot = vec![u32::MAX; runs.len()];
    let mut acc: Vec<Sums> = Vec::new();
    for r in 0..runs.len() {
        let root = find(&mut parent, r as u32) as usize;
        if slot[root] == u32::MAX {
            slot[root] = acc.len() as u32;
            acc.push(Sums { bounding_box: [u32::MAX, 0, u32::MAX, 0], peak: f64::NEG_INFINITY, ..Sums::default() });
        }
        let s = &mut acc[slot[root] as usize];
        let run = &runs[r];
        for (k, col) in (run.c0..run.c1).enumerate() {
            let v = strong.value[run.first + k];
            s.size += 1;
            s.sum += v;
            s.sx += v * (col as f64 + 0.5);
            s.sy += v * (run.row as f64 + 0.5);
            // runs of one spot come in raster order, so the first brightest stays
            if v > s.peak {
                s.peak = v;
                s.peak_at = [col as f64 + 0.5, run.row as f64 + 0.5];
            }
        }
        let bb = &mut s.bounding_box;
        bb[0] = bb[0].min(run.c0);
        bb[1] = bb[1].max(run.c1);
        bb[2] = bb[2].min(run.row);
        bb[3] = bb[3].max(run.row + 1);
    }
    let mut spots = Spots { n_strong_pixels: strong.len(), ..Spots::default() };
    for s in acc {
        if s.size < limits.min_size || limits.max_size.is_some_and(|max| s.size > max) {
            continue;
        }
        let centroid = [s.sx / s.sum, s.sy / s.sum];
        if let Some(max) = limits.max_separation {
            if (centroid[0] - s.peak_at[0]).hypot(centroid[1] - s.peak_at[1]) > max {
                continue;
            }
        }
        spots.size.push(s.size);
        spots.intensity.push(s.sum);
        spots.centroid.push(centroid);
        spots.bounding_box.push(s.bounding_box);
    }
    spots
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strong_of(rows: &[&str]) -> (Strong, usize) {
        let w = rows[0].len();
        let mut s = Strong::default();
        for (r, line) in rows.iter().enumerate() {
            for (c, ch) in line.chars().enumerate() {
                if ch != '.' {
                    s.index.push((r * w + c) as u32);
                    s.value.push(ch.to_digit(10).unwrap() as f64);
                }
            }
        }
        (s, w)
    }

    const ALL: SpotFilter = SpotFilter { min_size: 1, max_size: None, max_separation: None };

    #[test]
    fn four_connected_only() {
        let (s, w) = strong_of(&["1.1", ".1.", "1.1"]);
        assert_eq!(label(&s, w, ALL).size, vec![1, 1, 1, 1, 1]);
        let (s, w) = strong_of(&["11.", ".11", "..1"]);
        assert_eq!(label(&s, w, ALL).size, vec![5]);
    }

    #[test]
    fn a_u_joins_at_the_bottom_and_keeps_raster_order() {
        let (s, w) = strong_of(&["1.1.1", "1.1.1", "111.1", "....."]);
        let spots = label(&s, w, ALL);
        assert_eq!(spots.size, vec![7, 3]);
        assert_eq!(spots.bounding_box, vec![[0, 3, 0, 3], [4, 5, 0, 3]]);
    }

    #[test]
    fn a_row_gap_separates() {
        let (s, w) = strong_of(&["11", "..", "11"]);
        assert_eq!(label(&s, w, ALL).size, vec![2, 2]);
    }

    #[test]
    fn one_run_above_joins_several_below_and_back() {
        let (s, w) = strong_of(&["11111", "1.1.1", "1...1", "11111"]);
        assert_eq!(label(&s, w, ALL).size, vec![15]);
    }

    #[test]
    fn centroid_intensity_and_sizes() {
        let (s, w) = strong_of(&["13.", "...", "..2"]);
        let spots = label(&s, w, ALL);
        assert_eq!(spots.intensity, vec![4.0, 2.0]);
        assert_eq!(spots.centroid[0], [(0.5 + 3.0 * 1.5) / 4.0, 0.5]);
        assert_eq!(spots.n_strong_pixels, 3);
        let kept = label(&s, w, SpotFilter { min_size: 2, max_size: Some(2), max_separation: None });
        assert_eq!((kept.size, kept.n_strong_pixels), (vec![2], 3));
    }

    #[test]
    fn the_peak_may_be_kept_near_the_centroid() {
        // a long faint tail pulls the centroid (76 / 20 = 3.8) 3.3 px from the bright first pixel
        let (s, w) = strong_of(&["911111111111"]);
        let centroid = label(&s, w, ALL).centroid[0][0];
        assert!((centroid - 3.8).abs() < 1e-12, "{centroid}");
        let near = |d| SpotFilter { max_separation: Some(d), ..ALL };
        assert_eq!(label(&s, w, near(3.35)).len(), 1);
        assert_eq!(label(&s, w, near(3.25)).len(), 0);
    }
}
