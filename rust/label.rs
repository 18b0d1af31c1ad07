//! Connected-component labelling of voxel sets stored as runs.
//!
//! A voxel set over an `nx x ny x nz` box is kept as maximal runs `[start, end)`
//! along the last axis, one list per row `(x, y)` that has any, rows in raster
//! order. Two runs touch under 26-connectivity when their rows differ by at most
//! one in x and in y and their z ranges, widened by one voxel, overlap. With
//! `nx == 1` this is 8-connectivity on a plane. Union-find works on runs, not
//! voxels, so the cost is the number of runs (and of rows that have them), and
//! the voxels themselves are touched only by whoever builds the runs.
//!
//! Labels are numbered in raster order (x, then y, then z) of each component's
//! first voxel, as `scipy.ndimage.label` numbers them.

use std::ops::Range;

/// Runs along the last axis of an `nx x ny x (…)` box, in raster order. Only
/// rows that have runs are stored, so memory and time follow the runs, not
/// the `nx * ny` rows of the box.
#[derive(Debug, Clone, Default)]
pub struct Runs {
    /// The rows that have runs, `(x, y)`, in raster order.
    row_xy: Vec<(u32, u32)>,
    /// Runs of the `k`-th row that has runs are `row_start[k]..row_start[k + 1]`.
    row_start: Vec<u32>,
    pub start: Vec<u32>,
    pub end: Vec<u32>,
}

impl Runs {
    /// Start collecting runs for an `nx x ny` set of rows (both below 2^32).
    pub fn builder(nx: usize, ny: usize) -> RunsBuilder {
        debug_assert!(nx <= u32::MAX as usize && ny <= u32::MAX as usize);
        RunsBuilder {
            runs: Runs::default(),
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

    /// How many rows have runs.
    pub fn row_count(&self) -> usize {
        self.row_xy.len()
    }

    /// Every row that has runs: `(x, y, runs)`, in raster order.
    pub fn rows(&self) -> impl Iterator<Item = (usize, usize, Range<usize>)> + '_ {
        self.row_xy
            .iter()
            .zip(self.row_start.windows(2))
            .map(|(&(x, y), w)| (x as usize, y as usize, w[0] as usize..w[1] as usize))
    }

    #[inline]
    fn row_range(&self, k: usize) -> Range<usize> {
        self.row_start[k] as usize..self.row_start[k + 1] as usize
    }

    /// Label the runs: runs that touch (26-connectivity) share a label. Memory
    /// is 4 bytes per run and 4 per label; `Over::Memory` if it cannot be had.
    pub fn label(&self) -> Result<Labels, Over> {
        Ok(self.label_until(&mut |_| true)?.expect("never stopped"))
    }

    /// [`Runs::label`], telling `go_on` the work done (in runs) every few
    /// thousand runs; `None` as soon as it says stop.
    pub fn label_until(
        &self,
        go_on: &mut dyn FnMut(usize) -> bool,
    ) -> Result<Option<Labels>, Over> {
        const EVERY: usize = 1 << 16;
        let n = self.len();
        let mut parent: Vec<u32> = Vec::new();
        parent.try_reserve_exact(n).map_err(|_| Over::Memory(n))?;
        for from in (0..n).step_by(EVERY) {
            parent.extend(from as u32..(from + EVERY).min(n) as u32);
            if !go_on(EVERY) {
                return Ok(None);
            }
        }
        // Rows are in raster order, so the rows of slice x - 1 that can touch
        // row (x, y), (x - 1, y - 1..=y + 1), start at a cursor that only moves on.
        let mut below = 0usize;
        let mut pairs = Vec::new();
        let mut work = 0;
        for k in 0..self.row_xy.len() {
            let (x, y) = self.row_xy[k];
            let here = self.row_range(k);
            work += here.len() + 1;
            if work >= EVERY {
                if !go_on(work) {
                    return Ok(None);
                }
                work = 0;
            }
            if y > 0 && k > 0 && self.row_xy[k - 1] == (x, y - 1) {
                self.join(&mut parent, &mut pairs, here.clone(), self.row_range(k - 1));
            }
            if x > 0 {
                let first = (x - 1, y.saturating_sub(1));
                while self.row_xy[below] < first {
                    below += 1;
                }
                let mut j = below;
                while self.row_xy[j].0 == x - 1 && self.row_xy[j].1 <= y + 1 {
                    self.join(&mut parent, &mut pairs, here.clone(), self.row_range(j));
                    j += 1;
                }
            }
        }
        // Every root is the first run of its component and a run's parent
        // comes before it: in run order, a root opens the next label and
        // any other run takes its parent's, already known. In place, and
        // without branching on which (as likely as not, in noise).
        let mut labels = 0;
        for (c, chunk) in parent.chunks(EVERY).enumerate() {
            let from = c * EVERY;
            labels += chunk
                .iter()
                .enumerate()
                .filter(|&(i, &p)| p as usize == from + i)
                .count();
            if !go_on(EVERY) {
                return Ok(None);
            }
        }
        let mut first_run: Vec<u32> = filled(labels + 1, 0)?;
        let mut of_run = parent;
        let mut next = 0usize;
        for i in 0..n {
            if i % EVERY == EVERY - 1 && !go_on(EVERY) {
                return Ok(None);
            }
            let p = of_run[i] as usize;
            let root = p == i;
            of_run[i] = if root { next as u32 } else { of_run[p] };
            first_run[next] = i as u32;
            next += root as usize;
        }
        first_run.truncate(labels);
        Ok(Some(Labels { of_run, first_run }))
    }

    /// Union every pair of touching runs between two rows (both sorted by z):
    /// runs `a` of this row and the earlier runs `b`. The pairs are found
    /// without branching on them (which branch is taken is data: mostly
    /// mispredicted), then joined.
    #[inline(always)]
    fn join(
        &self,
        parent: &mut [u32],
        pairs: &mut Vec<(u32, u32)>,
        a: Range<usize>,
        b: Range<usize>,
    ) {
        let (a0, b0) = (a.start, b.start);
        if a.len() == 1 && b.len() == 1 {
            // one run each, the rule in a crystal
            if self.start[a0] <= self.end[b0] && self.start[b0] <= self.end[a0] {
                union(parent, b0 as u32, a0 as u32);
            }
            return;
        }
        let (sa, ea) = (&self.start[a.clone()], &self.end[a]);
        let (sb, eb) = (&self.start[b.clone()], &self.end[b]);
        if pairs.len() < sa.len() + sb.len() {
            pairs.resize(sa.len() + sb.len(), (0, 0));
        }
        let (mut i, mut j, mut n) = (0, 0, 0);
        while i < sa.len() && j < sb.len() {
            // [s, e) widened by one voxel meets [s', e') when s <= e' and s' <= e
            pairs[n] = ((b0 + j) as u32, (a0 + i) as u32);
            n += ((sa[i] <= eb[j]) & (sb[j] <= ea[i])) as usize;
            // on past whichever ends first (b on a tie)
            let past_a = ea[i] < eb[j];
            i += past_a as usize;
            j += !past_a as usize;
        }
        for &(p, q) in &pairs[..n] {
            union(parent, p, q);
        }
    }
}

/// Collects runs row by row in raster order.
pub struct RunsBuilder {
    runs: Runs,
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

/// Room for `more` items in `v`, growing it by at least `grow` at a time;
/// false if the memory cannot be had.
#[inline]
fn make_room<T>(v: &mut Vec<T>, more: usize, grow: usize) -> bool {
    v.capacity() - v.len() >= more || v.try_reserve(more.max(grow)).is_ok()
}

impl RunsBuilder {
    /// Take at most `limit` runs (and never more than `u32` indices reach).
    pub fn with_limit(mut self, limit: usize) -> RunsBuilder {
        self.limit = limit.min(u32::MAX as usize);
        self
    }

    /// How many runs so far.
    pub fn len(&self) -> usize {
        self.runs.start.len()
    }

    pub fn is_empty(&self) -> bool {
        self.runs.start.is_empty()
    }

    /// Room for `runs` more runs in `rows` more rows, taken now, exactly:
    /// false if that is over the limit or the memory cannot be had (then
    /// `over` says which).
    pub fn reserve(&mut self, runs: usize, rows: usize) -> bool {
        if self.over.is_some() {
            return false;
        }
        let n = self.runs.start.len();
        if n + runs > self.limit {
            self.over = Some(Over::Limit(self.limit));
            return false;
        }
        let r = &mut self.runs;
        if r.start.try_reserve_exact(runs).is_err()
            || r.end.try_reserve_exact(runs).is_err()
            || r.row_xy.try_reserve_exact(rows).is_err()
            || r.row_start.try_reserve_exact(rows + 1).is_err()
        {
            self.over = Some(Over::Memory(n));
            return false;
        }
        true
    }

    /// Room for `more` runs, or why there is none (then `over` says so).
    #[inline]
    fn room(&mut self, more: usize) -> bool {
        if self.over.is_some() {
            return false;
        }
        let n = self.runs.start.len();
        if n + more > self.limit {
            self.over = Some(Over::Limit(self.limit));
            return false;
        }
        let grow = n.clamp(1024, 1 << 24);
        // both, each on its own: one may have grown when the other could not
        if !make_room(&mut self.runs.start, more, grow)
            || !make_room(&mut self.runs.end, more, grow)
        {
            self.over = Some(Over::Memory(n));
            return false;
        }
        true
    }

    /// Make `(x, y)` the current row, opening it if it is new. Rows come in
    /// raster order.
    #[inline]
    fn open_row(&mut self, x: usize, y: usize) -> bool {
        let key = (x as u32, y as u32);
        match self.runs.row_xy.last() {
            Some(&last) if last == key => return true,
            Some(&last) => debug_assert!(last < key, "rows out of raster order"),
            None => {}
        }
        let grow = self.runs.row_xy.len().clamp(256, 1 << 22);
        if !make_room(&mut self.runs.row_xy, 1, grow)
            || !make_room(&mut self.runs.row_start, 2, grow)
        {
            self.over = Some(Over::Memory(self.runs.start.len()));
            return false;
        }
        self.runs.row_xy.push(key);
        self.runs.row_start.push(self.runs.start.len() as u32);
        true
    }

    /// Add the run `[start, end)` to row `(x, y)`. Rows come in raster order,
    /// runs within a row in ascending order with at least one voxel between them.
    #[inline]
    pub fn push(&mut self, x: usize, y: usize, start: usize, end: usize) {
        if !self.room(1) || !self.open_row(x, y) {
            return;
        }
        debug_assert!(start < end);
        debug_assert!(
            self.runs.start.len() as u32 == *self.runs.row_start.last().unwrap()
                || (*self.runs.end.last().unwrap() as usize) < start,
            "runs in a row must be ascending and apart"
        );
        self.runs.start.push(start as u32);
        self.runs.end.push(end as u32);
    }

    /// Add the runs `[start, end)` of `runs`, ascending and apart, to row
    /// `(x, y)`, which has none yet. False if they could not all be taken
    /// (then `over` says why).
    #[inline]
    pub fn push_row(
        &mut self,
        x: usize,
        y: usize,
        runs: impl ExactSizeIterator<Item = (u32, u32)>,
    ) -> bool {
        if runs.len() == 0 {
            return true;
        }
        if !self.room(runs.len()) || !self.open_row(x, y) {
            return false;
        }
        debug_assert!(self.runs.start.len() as u32 == *self.runs.row_start.last().unwrap());
        for (start, end) in runs {
            debug_assert!(start < end);
            debug_assert!(
                self.runs.start.len() as u32 == *self.runs.row_start.last().unwrap()
                    || *self.runs.end.last().unwrap() < start,
                "runs in a row must be ascending and apart"
            );
            self.runs.start.push(start);
            self.runs.end.push(end);
        }
        true
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
        // open_row and reserve keep room for this last entry
        self.runs.row_start.push(self.runs.start.len() as u32);
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

#[inline]
fn find(parent: &mut [u32], mut i: u32) -> u32 {
    while parent[i as usize] != i {
        let grand = parent[parent[i as usize] as usize];
        parent[i as usize] = grand;
        i = grand;
    }
    i
}

#[inline]
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
        for (x, slice) in mask.iter().enumerate() {
            for (y, row) in slice.iter().enumerate() {
                let values: Vec<i64> = row.iter().map(|&m| m as i64).collect();
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
    fn only_rows_with_runs_are_kept_and_labelling_stops_when_told() {
        // 3 x 4 rows with runs in three: (0, 0) and (1, 1) touch, (2, 3) is
        // apart from (1, 1) (y differs by 2).
        let mut b = Runs::builder(3, 4);
        b.push(0, 0, 5, 7);
        b.push(1, 1, 7, 9);
        b.push(1, 1, 20, 21);
        b.push(2, 3, 8, 9);
        let runs = b.finish();
        assert_eq!(runs.row_count(), 3);
        let rows: Vec<_> = runs.rows().collect();
        assert_eq!(rows, vec![(0, 0, 0..1), (1, 1, 1..3), (2, 3, 3..4)]);
        let labels = runs.label().unwrap();
        assert_eq!(labels.of_run, vec![0, 0, 1, 2]);
        assert_eq!(labels.first_run, vec![0, 2, 3]);
        // many runs: asked now and then, and stopped
        let mut b = Runs::builder(1, 1 << 14);
        for y in 0..1 << 14 {
            b.push_row(0, y, (0..8).map(|k| (4 * k, 4 * k + 1)));
        }
        let runs = b.finish();
        let mut asked = 0;
        assert!(runs
            .label_until(&mut |_| {
                asked += 1;
                asked < 3
            })
            .unwrap()
            .is_none());
        assert_eq!(asked, 3);
        assert_eq!(runs.label().unwrap().count(), 8);
    }

    #[test]
    fn a_builder_takes_no_more_than_its_limit() {
        let mut b = Runs::builder(1, 4).with_limit(3);
        assert!(b.reserve(3, 2));
        assert!(b.push_row(0, 0, [(0, 1), (3, 4)].into_iter()));
        assert!(!b.push_row(0, 1, [(0, 1), (3, 4)].into_iter()));
        assert_eq!(b.over, Some(Over::Limit(3)));
        let mut b = Runs::builder(1, 4).with_limit(3);
        assert!(!b.reserve(4, 1));
        assert_eq!(b.over, Some(Over::Limit(3)));
    }

    #[test]
    fn empty_set_has_no_labels() {
        let runs = Runs::builder(4, 5).finish();
        assert_eq!(runs.label().unwrap().count(), 0);
    }
}
