//! Connected-component labelling of voxel sets stored as runs.
//!
//! A voxel set over an `nx x ny x nz` box is kept as maximal runs `[start, end)`
//! along the last axis, one list per row `(x, y)`, rows in raster order. Two runs
//! touch under 26-connectivity when their rows differ by at most one in x and in y
//! and their z ranges, widened by one voxel, overlap. With `nx == 1` this is
//! 8-connectivity on a plane. Union-find works on runs, not voxels, so the cost is
//! the number of rows plus the number of runs, and the voxels themselves are
//! touched only by whoever builds the runs.
//!
//! Labels are numbered in raster order (x, then y, then z) of each component's
//! first voxel, as `scipy.ndimage.label` numbers them.

use std::ops::Range;

/// Runs along the last axis of an `nx x ny x (…)` box, in raster order.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    ny: usize,
    /// Runs of row `r = x * ny + y` are `row_start[r]..row_start[r + 1]`.
    row_start: Vec<u32>,
    pub start: Vec<u32>,
    pub end: Vec<u32>,
}

impl Runs {
    /// Start collecting runs for an `nx x ny` set of rows, at most `limit` of them.
    pub fn builder(nx: usize, ny: usize) -> RunsBuilder {
        RunsBuilder {
            runs: Runs {
                ny,
                row_start: Vec::with_capacity(nx * ny + 1),
                ..Runs::default()
            },
            rows: nx * ny,
            limit: u32::MAX as usize,
            over: None,
        }
    }

    pub fn len(&self) -> usize {
        self.start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.start.is_empty()
    }

    /// Every row that has runs: `(x, y, runs)`, in raster order.
    pub fn rows(&self) -> impl Iterator<Item = (usize, usize, Range<usize>)> + '_ {
        self.row_start
            .windows(2)
            .enumerate()
            .filter(|(_, w)| w[0] < w[1])
            .map(|(r, w)| (r / self.ny, r % self.ny, w[0] as usize..w[1] as usize))
    }

    #[inline]
    fn row_range(&self, x: usize, y: usize) -> Range<usize> {
        let r = x * self.ny + y;
        self.row_start[r] as usize..self.row_start[r + 1] as usize
    }

    /// Label the runs: runs that touch (26-connectivity) share a label. Memory
    /// is 16 bytes per run; `Over::Memory` if it cannot be had.
    pub fn label(&self) -> Result<Labels, Over> {
        let n = self.len();
        let mut parent: Vec<u32> = filled(n, 0)?;
        for (i, p) in parent.iter_mut().enumerate() {
            *p = i as u32;
        }
        let nx = (self.row_start.len() - 1).checked_div(self.ny).unwrap_or(0);
        for x in 0..nx {
            for y in 0..self.ny {
                let here = self.row_range(x, y);
                if here.is_empty() {
                    continue;
                }
                if y > 0 {
                    self.join(&mut parent, here.clone(), self.row_range(x, y - 1));
                }
                if x > 0 {
                    for yy in y.saturating_sub(1)..=(y + 1).min(self.ny - 1) {
                        self.join(&mut parent, here.clone(), self.row_range(x - 1, yy));
                    }
                }
            }
        }
        let mut label_of_root = filled(n, u32::MAX)?;
        let mut of_run = filled(n, 0)?;
        let mut labels = 0u32;
        for (i, label) in of_run.iter_mut().enumerate() {
            let root = find(&mut parent, i as u32) as usize;
            if label_of_root[root] == u32::MAX {
                label_of_root[root] = labels;
                labels += 1;
            }
            *label = label_of_root[root];
        }
        drop(label_of_root);
        let mut first_run = parent; // reused: its n slots hold the labels' first runs
        first_run.truncate(labels as usize);
        let mut next = 0u32;
        for (i, &l) in of_run.iter().enumerate() {
            if l == next {
                first_run[l as usize] = i as u32;
                next += 1;
            }
        }
        Ok(Labels { of_run, first_run })
    }

    /// Union every pair of touching runs between two rows (both sorted by z).
    fn join(&self, parent: &mut [u32], a: Range<usize>, b: Range<usize>) {
        let (mut i, mut j) = (a.start, b.start);
        while i < a.end && j < b.end {
            if self.start[i] > self.end[j] {
                j += 1;
            } else if self.start[j] > self.end[i] {
                i += 1;
            } else {
                union(parent, i as u32, j as u32);
                if self.end[i] < self.end[j] {
                    i += 1;
                } else {
                    j += 1;
                }
            }
        }
    }
}

/// Collects runs row by row in raster order.
pub struct RunsBuilder {
    runs: Runs,
    rows: usize,
    limit: usize,
    /// Why runs stopped being taken, if they did: the builder then takes no more.
    pub over: Option<Over>,
}

/// Why a [`RunsBuilder`] stopped taking runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    /// More runs than its limit.
    Limit(usize),
    /// No memory for more.
    Memory(usize),
}

impl RunsBuilder {
    /// Take at most `limit` runs (and never more than `u32` indices reach).
    pub fn with_limit(mut self, limit: usize) -> RunsBuilder {
        self.limit = limit.min(u32::MAX as usize);
        self
    }

    /// Room for one more run, or why there is none (then `over` says so).
    #[inline]
    fn room(&mut self) -> bool {
        let n = self.runs.start.len();
        if n >= self.limit {
            self.over = Some(Over::Limit(self.limit));
            return false;
        }
        if n == self.runs.start.capacity() || n == self.runs.end.capacity() {
            let more = n.clamp(1024, 1 << 24);
            // both, each on its own: one may have grown when the other could not
            if self.runs.start.try_reserve(more).is_err()
                || self.runs.end.try_reserve(more).is_err()
            {
                self.over = Some(Over::Memory(n));
                return false;
            }
        }
        true
    }

    /// Add the run `[start, end)` to row `(x, y)`. Rows come in raster order,
    /// runs within a row in ascending order with at least one voxel between them.
    #[inline]
    pub fn push(&mut self, x: usize, y: usize, start: usize, end: usize) {
        if !self.room() {
            return;
        }
        let row = x * self.runs.ny + y;
        debug_assert!(start < end);
        debug_assert!(
            self.runs.row_start.len() <= row + 1,
            "rows out of raster order"
        );
        while self.runs.row_start.len() <= row {
            self.runs.row_start.push(self.runs.start.len() as u32);
        }
        debug_assert!(
            self.runs.start.len() as u32 == self.runs.row_start[row]
                || (*self.runs.end.last().unwrap() as usize) < start,
            "runs in a row must be ascending and apart"
        );
        self.runs.start.push(start as u32);
        self.runs.end.push(end as u32);
    }

    /// Add to row `(x, y)` the maximal runs of `z = offset + k` where
    /// `values[k] >= min`. Returns how many runs were added. The row is read 64
    /// values at a time into a bit mask, and runs are read off its bits.
    pub fn push_at_least(
        &mut self,
        x: usize,
        y: usize,
        values: &[i64],
        offset: usize,
        min: i64,
    ) -> usize {
        let mut added = 0;
        let mut open: Option<usize> = None;
        for (c, chunk) in values.chunks(64).enumerate() {
            let mut kept = 0u64;
            for (k, &v) in chunk.iter().enumerate() {
                kept |= ((v >= min) as u64) << k;
            }
            let (base, n) = (offset + c * 64, chunk.len());
            let mut pos = 0;
            while pos < n {
                match open {
                    None => {
                        let ahead = kept >> pos;
                        if ahead == 0 {
                            break;
                        }
                        pos += ahead.trailing_zeros() as usize;
                        open = Some(base + pos);
                    }
                    Some(start) => {
                        pos += ((!kept >> pos).trailing_zeros() as usize).min(n - pos);
                        if pos < n {
                            self.push(x, y, start, base + pos);
                            added += 1;
                            open = None;
                        }
                    }
                }
            }
        }
        if let Some(start) = open {
            self.push(x, y, start, offset + values.len());
            added += 1;
        }
        added
    }

    pub fn finish(mut self) -> Runs {
        while self.runs.row_start.len() <= self.rows {
            self.runs.row_start.push(self.runs.start.len() as u32);
        }
        self.runs
    }
}

/// `n` copies of `value`, or `Over::Memory` when there is no room for them.
pub fn filled<T: Clone>(n: usize, value: T) -> Result<Vec<T>, Over> {
    let mut v = Vec::new();
    v.try_reserve_exact(n).map_err(|_| Over::Memory(n))?;
    v.resize(n, value);
    Ok(v)
}

/// The component of every run, numbered in raster order of first voxels.
#[derive(Debug, Clone)]
pub struct Labels {
    /// The label of each run.
    pub of_run: Vec<u32>,
    /// The first (lowest-index) run of each label.
    pub first_run: Vec<u32>,
}

impl Labels {
    pub fn count(&self) -> usize {
        self.first_run.len()
    }
}

fn find(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let grand = parent[parent[i as usize] as usize];
        parent[i as usize] = grand;
        i = grand;
    }
    i
}

fn union(parent: &mut [u32], a: u32, b: u32) {
    let (ra, rb) = (find(parent, a), find(parent, b));
    if ra != rb {
        let (lo, hi) = if ra < rb { (ra, rb) } else { (rb, ra) };
        parent[hi as usize] = lo;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Label a dense boolean volume `mask[x][y][z]` through runs; return the label
    /// (1-based, 0 = background) of each voxel, as scipy would.
    fn label_dense(mask: &[Vec<Vec<bool>>]) -> Vec<Vec<Vec<u32>>> {
        let (nx, ny, nz) = (mask.len(), mask[0].len(), mask[0][0].len());
        let mut b = Runs::builder(nx, ny);
        for x in 0..nx {
            for y in 0..ny {
                let values: Vec<i64> = mask[x][y].iter().map(|&m| m as i64).collect();
                b.push_at_least(x, y, &values, 0, 1);
            }
        }
        let runs = b.finish();
        let labels = runs.label().unwrap();
        let mut out = vec![vec![vec![0; nz]; ny]; nx];
        for (x, y, range) in runs.rows() {
            for i in range {
                for z in runs.start[i]..runs.end[i] {
                    out[x][y][z as usize] = labels.of_run[i] + 1;
                }
            }
        }
        out
    }

    fn parse(rows: &[&str]) -> Vec<Vec<Vec<bool>>> {
        // One x-slice: rows are y, characters are z.
        vec![rows
            .iter()
            .map(|r| r.chars().map(|c| c == '#').collect())
            .collect()]
    }

    #[test]
    fn corners_touch_in_a_plane() {
        let l = label_dense(&parse(&["#..#", ".#..", "...."]));
        assert_eq!(
            l[0],
            vec![vec![1, 0, 0, 2], vec![0, 1, 0, 0], vec![0, 0, 0, 0]]
        );
    }

    #[test]
    fn runs_one_voxel_apart_in_a_row_stay_apart() {
        let l = label_dense(&parse(&["##.##"]));
        assert_eq!(l[0][0], vec![1, 1, 0, 2, 2]);
    }

    #[test]
    fn labels_follow_raster_order_of_first_voxel() {
        // A U shape: the right arm starts first in raster order but joins later.
        let l = label_dense(&parse(&["...#", "#..#", "####"]));
        assert!(l[0].iter().flatten().all(|&v| v <= 1));
        let l = label_dense(&parse(&["..#.", "#...", "#..."]));
        assert_eq!(l[0][0][2], 1);
        assert_eq!(l[0][1][0], 2);
    }

    #[test]
    fn diagonal_neighbours_across_slices() {
        let mut m = vec![vec![vec![false; 4]; 3]; 3];
        m[0][0][0] = true;
        m[1][1][1] = true;
        m[2][2][2] = true;
        m[0][0][3] = true; // two or more apart from all the others
        let l = label_dense(&m);
        assert_eq!(l[0][0][0], 1);
        assert_eq!(l[1][1][1], 1);
        assert_eq!(l[2][2][2], 1);
        assert_eq!(l[0][0][3], 2);
    }

    #[test]
    fn y_plus_one_in_previous_slice_touches() {
        let mut m = vec![vec![vec![false; 2]; 3]; 2];
        m[0][2][1] = true;
        m[1][1][0] = true;
        let l = label_dense(&m);
        assert_eq!(l[0][2][1], 1);
        assert_eq!(l[1][1][0], 1);
    }

    #[test]
    fn runs_across_64_value_chunks() {
        let mut values = vec![0i64; 200];
        for z in (0..3).chain(60..70).chain(127..129).chain(190..200) {
            values[z] = 5;
        }
        values[64] = 0; // splits 60..70 at the chunk boundary
        let mut b = Runs::builder(1, 1);
        assert_eq!(b.push_at_least(0, 0, &values, 10, 5), 5);
        let runs = b.finish();
        let got: Vec<(u32, u32)> = runs
            .start
            .iter()
            .copied()
            .zip(runs.end.iter().copied())
            .collect();
        assert_eq!(
            got,
            vec![(10, 13), (70, 74), (75, 80), (137, 139), (200, 210)]
        );
    }

    #[test]
    fn empty_set_has_no_labels() {
        let runs = Runs::builder(4, 5).finish();
        assert_eq!(runs.label().unwrap().count(), 0);
    }
}
