//! Three-dimensional X-ray centring from two grids that share x.
//! See `docs/algorithm.md`, "3D centring".
//!
//! The volume `V[x, y, z] = xy[x, y] * xz[x, z]` is never stored, nor scanned.
//! Row `(x, y)` of it is `xz[x, :]` scaled by `a = xy[x, y]`, so the exact
//! float threshold of the spec is one integer cut-off on `xz[x, :]` that
//! depends only on `a`: the row keeps `{z : xz[x, z] >= cut(a)}`, and these
//! sets are nested as the cut-off varies. For each `x` (single-sample pins):
//!
//! * a slice whose best product misses the threshold is skipped with one
//!   compare, and within a slice a row whose `a` is below the least passing
//!   `a` with one compare;
//! * the distinct cut-offs of the passing rows are the slice's *levels*,
//!   highest first. The `z` that clear the lowest are bucketed, in z order, by
//!   the level at which they join, and each level's runs are the previous
//!   level's runs merged with its new `z`, each run carrying the z of its
//!   first maximum (the spec's tie rule). Each passing row takes the runs of
//!   its level.
//!
//! Per-run sums are `xy[x, y]` times prefix-sum differences of `xz[x, :]` and
//! `z * xz[x, :]`, exact integers (i64 when no sum can reach 2^63, i128
//! otherwise). Time is the input read once, plus `ny + nz`
//! per slice with passing rows, plus the runs; memory is the input plus a few
//! words per run. Multi-sample pins, whose cut-offs depend on each region's
//! own maximum, scan the rows of their regions as runs along z instead.

use std::borrow::Cow;
use std::ops::Range;

use crate::error::{InputError, Result};
use crate::grid::Grid;
use crate::label::{filled, Labels, Over, Runs, RunsBuilder};
use crate::wells::Wells;

/// Parameters of a 3D centring.
#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    /// Keep voxels with `v >= threshold * max` (max of the voxel's region).
    pub threshold: f64,
    /// Grid cells with `count < threshold_absolute` become 0 first.
    pub threshold_absolute: f64,
    /// The sample on the pin (single-sample pins).
    pub sample_id: Option<i64>,
    /// The wells of a multi-sample pin; empty for a single-sample pin.
    pub wells: Wells,
    /// The most runs (stretches of kept voxels along z) a centring may hold.
    /// Memory beyond the inputs is ~12 bytes per run when rows share their
    /// cut-offs, at most ~100 when every row has its own, plus ~280 per
    /// separate region (its statistics and its result), and a region has at
    /// least one run.
    pub max_runs: usize,
}

/// The default of [`Params::max_runs`]: 2^21 runs; ~200 MB for the runs at
/// the very most, and ~600 MB at the very most, results included, when every
/// run is a region.
pub const MAX_RUNS: usize = 1 << 21;

/// Work done between two asks whether to go on (a few ms): a unit is one
/// count read or compared (~0.2 ns), a run made, labelled or summed is
/// [`RUN_WORK`] units (~5-10 ns).
const CHECK_EVERY: usize = 1 << 24;
const RUN_WORK: usize = 32;

/// Why a centring stopped without a result.
#[derive(Debug, Clone, PartialEq)]
pub enum Halt {
    /// Input it cannot work with, or more runs than `max_runs`.
    Input(InputError),
    /// The caller's `keep_going` said stop.
    Interrupted,
    /// Memory for the runs could not be had.
    OutOfMemory(String),
}

impl From<InputError> for Halt {
    fn from(e: InputError) -> Halt {
        Halt::Input(e)
    }
}

/// The halt for a builder that stopped taking runs.
fn over(o: Over) -> Halt {
    match o {
        Over::Limit(limit) => Halt::Input(InputError::new(format!(
            "the thresholded volume splits into more than {limit} runs (stretches of voxels along z), the \
             limit max_runs; memory grows ~12-100 bytes per run: raise max_runs, or check the counts"
        ))),
        Over::Memory(n) => Halt::OutOfMemory(format!("no memory for more than {n} runs of voxels")),
    }
}

/// Work done, and the caller asked every [`CHECK_EVERY`] units whether to go on.
struct Progress<'a> {
    scanned: usize,
    keep_going: &'a mut dyn FnMut() -> bool,
}

impl Progress<'_> {
    /// Count `voxels` scanned; after a row, check the builder and the caller.
    #[inline]
    fn row(&mut self, voxels: usize, builder: &RunsBuilder) -> std::result::Result<(), Halt> {
        if let Some(o) = builder.over {
            return Err(over(o));
        }
        self.tick(voxels)
    }

    /// Count `work` done (counts, or runs); ask the caller now and then.
    #[inline]
    fn tick(&mut self, work: usize) -> std::result::Result<(), Halt> {
        self.scanned += work;
        if self.scanned >= CHECK_EVERY {
            self.scanned = 0;
            if !(self.keep_going)() {
                return Err(Halt::Interrupted);
            }
        }
        Ok(())
    }
}

impl Default for Params {
    fn default() -> Self {
        Params {
            threshold: 0.25,
            threshold_absolute: 0.0,
            sample_id: None,
            wells: Wells::default(),
            max_runs: MAX_RUNS,
        }
    }
}

/// One diffracting region. Coordinates are in grid boxes; counts are exact
/// integers carried as floats, as in the wire format.
#[derive(Debug, Clone, PartialEq)]
pub struct Xrc3d {
    pub centre_of_mass: [f64; 3],
    pub max_voxel: [i64; 3],
    pub max_count: f64,
    pub n_voxels: i64,
    pub total_count: f64,
    pub sample_id: Option<i64>,
    /// Half-open: `[[min x, min y, min z], [max x + 1, max y + 1, max z + 1]]`.
    pub bounding_box: [[i64; 3]; 2],
}

/// Largest extent of one axis, and of the whole volume. Within these bounds the
/// i128 sums of `coordinate * value` cannot overflow (2^40 * 2^20 * 2^63 < 2^127).
const MAX_AXIS: usize = 1 << 20;
const MAX_VOXELS: u128 = 1 << 40;

/// Centre the two grids `xy` (`nx x ny`) and `xz` (`nx x nz`). Results are
/// sorted by `total_count`, largest first, ties in label order.
pub fn centre_3d(xy: &Grid<i64>, xz: &Grid<i64>, params: &Params) -> Result<Vec<Xrc3d>> {
    centre_3d_with(xy, xz, params, &mut || true).map_err(|h| match h {
        Halt::Input(e) => e,
        Halt::Interrupted => InputError::new("interrupted"),
        Halt::OutOfMemory(m) => InputError::new(m),
    })
}

/// [`centre_3d`], asking `keep_going` now and then (every few ms of
/// work) whether to go on, and telling running out of memory apart.
pub fn centre_3d_with(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    params: &Params,
    keep_going: &mut dyn FnMut() -> bool,
) -> std::result::Result<Vec<Xrc3d>, Halt> {
    let mut progress = Progress {
        scanned: 0,
        keep_going,
    };
    let checked = check(xy, xz, params, &mut progress)?;
    let Some(keep_from) = checked.keep_from else {
        return Ok(Vec::new()); // threshold_absolute cuts every count
    };
    let (a_max, b_max) = checked.maxima();
    let max = (0..xy.nx).map(|x| a_max[x] * b_max[x]).max().unwrap_or(0);
    let narrow = sums_fit_i64(xy.nx, xy.ny, xz.ny, max);
    if params.wells.is_multi_sample() {
        let (xy, xz) = (cut(xy, keep_from), cut(xz, keep_from));
        let (runs, region_of_run) = kept_runs_per_region(&xy, &xz, params, &mut progress)?;
        let labels = label(&runs, &mut progress)?;
        let mut first_region: Vec<u32> = Vec::new();
        first_region
            .try_reserve_exact(labels.count())
            .map_err(|_| over(Over::Memory(runs.len())))?;
        first_region.extend(labels.first_run.iter().map(|&i| region_of_run[i as usize]));
        let region = Some(&first_region[..]);
        if narrow {
            let stats = accumulate_scanning::<i64>(&xy, &xz, &runs, &labels, &mut progress)?;
            results(&stats, region, params)
        } else {
            let stats = accumulate_scanning::<i128>(&xy, &xz, &runs, &labels, &mut progress)?;
            results(&stats, region, params)
        }
    } else {
        let kept = kept_runs_whole_volume(xy, xz, &checked, keep_from, params, &mut progress)?;
        let labels = label(&kept.runs, &mut progress)?;
        if narrow {
            let stats = accumulate::<i64>(xy, xz, &kept, &labels, &mut progress)?;
            results(&stats, None, params)
        } else {
            let stats = accumulate::<i128>(xy, xz, &kept, &labels, &mut progress)?;
            results(&stats, None, params)
        }
    }
}

/// Label `runs`, asking the caller now and then whether to go on.
fn label(runs: &Runs, progress: &mut Progress) -> std::result::Result<Labels, Halt> {
    runs.label_until(&mut |work| progress.tick(work * RUN_WORK).is_ok())
        .map_err(over)?
        .ok_or(Halt::Interrupted)
}

/// What the centring needs of its inputs, once they are checked.
struct Checked {
    /// Counts below this become 0 (`threshold_absolute`); `None`: all do.
    keep_from: Option<i64>,
    /// Per x, the largest count of `xy[x, :]`, then per x that of `xz[x, :]`,
    /// after the cut.
    maxima: Vec<i64>,
}

impl Checked {
    /// The largest counts of the rows of `xy`, and of the rows of `xz`.
    fn maxima(&self) -> (&[i64], &[i64]) {
        self.maxima.split_at(self.maxima.len() / 2)
    }
}

/// Check the inputs, and read each once for its rows' largest counts.
fn check(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    params: &Params,
    progress: &mut Progress,
) -> std::result::Result<Checked, Halt> {
    if xy.nx != xz.nx {
        return Err(InputError::new(format!(
            "xy and xz must share x: xy has nx={}, xz has nx={}",
            xy.nx, xz.nx
        ))
        .into());
    }
    if xy.data.is_empty() || xz.data.is_empty() {
        return Err(InputError::new("empty grid: xy and xz need at least one cell each").into());
    }
    if !params.threshold.is_finite() {
        return Err(InputError::new(format!(
            "threshold must be a finite number, got {}",
            params.threshold
        ))
        .into());
    }
    if !params.threshold_absolute.is_finite() {
        return Err(InputError::new(format!(
            "threshold_absolute must be a finite number, got {}",
            params.threshold_absolute
        ))
        .into());
    }
    for &(name, n) in &[("nx", xy.nx), ("ny", xy.ny), ("nz", xz.ny)] {
        if n > MAX_AXIS {
            return Err(
                InputError::new(format!("grid too large: {name}={n} exceeds {MAX_AXIS}")).into(),
            );
        }
    }
    if (xy.nx as u128) * (xy.ny as u128) * (xz.ny as u128) > MAX_VOXELS {
        return Err(InputError::new("grid too large: more than 2^40 voxels").into());
    }
    let keep_from = least_count(params.threshold_absolute);
    let mut maxima = vec![0i64; 2 * xy.nx];
    let (a_max, b_max) = maxima.split_at_mut(xy.nx);
    row_maxima(xy, "xy", keep_from, a_max, progress)?;
    row_maxima(xz, "xz", keep_from, b_max, progress)?;
    let (a, b) = (
        a_max.iter().copied().max().unwrap_or(0),
        b_max.iter().copied().max().unwrap_or(0),
    );
    if a.checked_mul(b).is_none() {
        return Err(InputError::new(format!(
            "counts too large: {a} * {b} overflows a 64-bit integer"
        ))
        .into());
    }
    Ok(Checked { keep_from, maxima })
}

/// The least count `c >= 0` with `float(c) >= threshold_absolute`: a count
/// is cut to 0 exactly when it is below this. `None` when no count reaches it.
fn least_count(threshold_absolute: f64) -> Option<i64> {
    if threshold_absolute <= 0.0 {
        return Some(0);
    }
    if (i64::MAX as f64) < threshold_absolute {
        return None;
    }
    let (mut fails, mut ok) = (0i64, i64::MAX);
    while ok - fails > 1 {
        let mid = fails + (ok - fails) / 2;
        if mid as f64 >= threshold_absolute {
            ok = mid;
        } else {
            fails = mid;
        }
    }
    Some(ok)
}

/// Per row, the largest count once counts below `keep_from` are cut; a
/// negative count is an error naming the grid.
fn row_maxima(
    g: &Grid<i64>,
    name: &str,
    keep_from: Option<i64>,
    maxima: &mut [i64],
    progress: &mut Progress,
) -> std::result::Result<(), Halt> {
    let mut any = 0i64;
    // A block of rows at a time, ~2^16 counts, between asks whether to go on.
    let block = (1 << 16) / g.ny.max(1) + 1;
    for (rows, out) in g.data.chunks(block * g.ny).zip(maxima.chunks_mut(block)) {
        any |= maxima_and_or(rows, g.ny, out);
        progress.tick(rows.len())?;
    }
    if any < 0 {
        g.check_counts(name)?;
    }
    for m in maxima.iter_mut() {
        *m = match keep_from {
            Some(k) if *m >= k => *m,
            _ => 0,
        };
    }
    Ok(())
}

/// The largest value of each row of `rows` (`ny` long; 0 if none is larger)
/// into `out`, and the OR of all values (negative when one is).
#[inline(always)]
fn maxima_and_or_portable(rows: &[i64], ny: usize, out: &mut [i64]) -> i64 {
    let mut any = [0i64; 8];
    for (row, m) in rows.chunks_exact(ny).zip(out.iter_mut()) {
        let mut max = [0i64; 8];
        let chunks = row.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            for k in 0..8 {
                max[k] = max[k].max(c[k]);
                any[k] |= c[k];
            }
        }
        let mut row_max = max.iter().copied().fold(0, i64::max);
        for &v in rest {
            row_max = row_max.max(v);
            any[0] |= v;
        }
        *m = row_max;
    }
    any.iter().fold(0, |a, &b| a | b)
}

/// [`maxima_and_or_portable`], with AVX2 where the processor has it.
fn maxima_and_or(rows: &[i64], ny: usize, out: &mut [i64]) -> i64 {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2, just checked.
            return unsafe { maxima_and_or_avx2(rows, ny, out) };
        }
    }
    maxima_and_or_portable(rows, ny, out)
}

/// [`maxima_and_or_portable`] in AVX2, 8 counts a step (the compiler's own
/// vectorisation of it measured twice as slow).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn maxima_and_or_avx2(rows: &[i64], ny: usize, out: &mut [i64]) -> i64 {
    use std::arch::x86_64::*;
    let mut any = _mm256_setzero_si256();
    let mut any_rest = 0i64;
    for (row, m) in rows.chunks_exact(ny).zip(out.iter_mut()) {
        let (mut m0, mut m1) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        let mut quads = row.chunks_exact(4);
        for q in quads.by_ref() {
            // SAFETY: q holds 4 i64: one unaligned 256-bit load.
            let v = unsafe { _mm256_loadu_si256(q.as_ptr().cast()) };
            m0 = _mm256_blendv_epi8(m0, v, _mm256_cmpgt_epi64(v, m0));
            any = _mm256_or_si256(any, v);
            std::mem::swap(&mut m0, &mut m1); // two chains of dependencies
        }
        let m0 = _mm256_blendv_epi8(m0, m1, _mm256_cmpgt_epi64(m1, m0));
        let mut lanes = [0i64; 4];
        // SAFETY: lanes holds 4 i64: one unaligned 256-bit store.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), m0) };
        let mut row_max = lanes.iter().copied().fold(0, i64::max);
        for &v in quads.remainder() {
            row_max = row_max.max(v);
            any_rest |= v;
        }
        *m = row_max;
    }
    let mut lanes = [0i64; 4];
    // SAFETY: as above.
    unsafe { _mm256_storeu_si256(lanes.as_mut_ptr().cast(), any) };
    lanes.iter().fold(any_rest, |a, &b| a | b)
}

/// `g` with counts below `keep_from` cut to 0, copied only if that changes it.
fn cut(g: &Grid<i64>, keep_from: i64) -> Cow<'_, Grid<i64>> {
    if keep_from <= 0 || g.data.iter().all(|&c| c >= keep_from) {
        return Cow::Borrowed(g);
    }
    Cow::Owned(Grid {
        data: g
            .data
            .iter()
            .map(|&c| if c < keep_from { 0 } else { c })
            .collect(),
        ..*g
    })
}

/// The least `b` in `1..=cap` for which `float(a * b) >= t` (DLS's
/// `float(v) >= threshold * float(max)`), if any. `a > 0`, so `float(a * b)`
/// never decreases as `b` grows and a row's threshold is one integer.
fn least_passing(a: i64, t: f64, cap: i64) -> Option<i64> {
    let passes = |b: i64| a.checked_mul(b).is_none_or(|v| v as f64 >= t);
    if cap < 1 || !passes(cap) {
        return None;
    }
    let (mut fails, mut ok) = (0, cap);
    while ok - fails > 1 {
        let mid = fails + (ok - fails) / 2;
        if passes(mid) {
            ok = mid;
        } else {
            fails = mid;
        }
    }
    Some(ok)
}

/// [`least_passing`] when `cap` is known to pass and `a * cap` fits an i64:
/// one integer division when every `a * b` up to `a * cap` is exact as a
/// float (at most 2^53), the search otherwise.
#[inline]
fn least_passing_from(a: i64, t: f64, cap: i64) -> i64 {
    debug_assert!(a >= 1 && cap >= 1 && (a * cap) as f64 >= t);
    if a * cap <= 1 << 53 {
        if t <= 1.0 {
            return 1;
        }
        // float(a * b) is a * b here, so a * b >= t is a * b >= ceil(t), and
        // ceil(t) <= a * cap <= 2^53 is exact.
        let need = t.ceil() as i64;
        return (need + a - 1) / a;
    }
    least_passing(a, t, cap).expect("cap passes")
}

/// The runs of every level of every slice with passing rows, each level's
/// in z order: `(start, end, top)`, the run `[start, end)` along z and the z
/// of its first largest value.
#[derive(Debug, Default)]
struct Pieces(Vec<(u32, u32, u32)>);

impl Pieces {
    fn len(&self) -> usize {
        self.0.len()
    }

    /// Room for `more` pieces.
    fn reserve(&mut self, more: usize) -> std::result::Result<(), Over> {
        let n = self.len();
        if self.0.capacity() - n < more {
            let grow = more.max(n.min(1 << 24));
            self.0.try_reserve(grow).map_err(|_| Over::Memory(n))?;
        }
        Ok(())
    }

    #[inline]
    fn push(&mut self, piece: (u32, u32, u32)) {
        self.0.push(piece);
    }
}

/// The kept runs of a single-sample pin, and what summing them needs.
struct Kept {
    runs: Runs,
    /// Per row that has runs, in order: `(x, y, first, end)`, its runs are
    /// `pieces[first..end]`.
    rows: Vec<(u32, u32, u32, u32)>,
    pieces: Pieces,
    /// Per slice that has runs, in order: `(x, lo, hi)`, its runs lie in `lo..hi`.
    windows: Vec<(u32, u32, u32)>,
}

/// Reusable per-slice scratch space, at most `ny + nz` entries each.
#[derive(Default)]
struct Scratch {
    /// Passing rows: `(y, cut-off)`.
    rows: Vec<(u32, i64)>,
    /// The distinct cut-offs, highest first.
    levels: Vec<i64>,
    /// The z that clear the lowest cut-off, and the level each joins at.
    joins: Vec<(u32, u32)>,
    /// Those z bucketed by level, each bucket in z order; level `j`'s bucket
    /// is `bucket[at[j]..at[j + 1]]`.
    bucket: Vec<u32>,
    at: Vec<usize>,
    next: Vec<usize>,
    /// Where each level's runs start in `pieces` (and, last, where they end).
    level_at: Vec<usize>,
}

/// Single-sample pin: one region, the whole volume. Compiled for AVX2 too,
/// and that taken where the processor has it.
fn kept_runs_whole_volume(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    checked: &Checked,
    keep_from: i64,
    params: &Params,
    progress: &mut Progress,
) -> std::result::Result<Kept, Halt> {
    #[cfg(target_arch = "x86_64")]
    {
        #[target_feature(enable = "avx2")]
        fn avx2(
            xy: &Grid<i64>,
            xz: &Grid<i64>,
            checked: &Checked,
            keep_from: i64,
            params: &Params,
            progress: &mut Progress,
        ) -> std::result::Result<Kept, Halt> {
            kept_runs(xy, xz, checked, keep_from, params, progress)
        }
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the processor has AVX2, just checked.
            return unsafe { avx2(xy, xz, checked, keep_from, params, progress) };
        }
    }
    kept_runs(xy, xz, checked, keep_from, params, progress)
}

#[inline(always)]
fn kept_runs(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    checked: &Checked,
    keep_from: i64,
    params: &Params,
    progress: &mut Progress,
) -> std::result::Result<Kept, Halt> {
    let (nx, ny) = (xy.nx, xy.ny);
    let (a_max, b_max) = checked.maxima();
    let limit = params.max_runs.min(u32::MAX as usize);
    let no_memory = |n| over(Over::Memory(n));
    // First the levels of every slice, and which rows take which: then the
    // runs are known in number, and taken in one allocation (no copies as
    // they grow, no stretch of work without asking whether to go on).
    let mut pieces = Pieces::default();
    let mut windows: Vec<(u32, u32, u32)> = Vec::new();
    // (x, y, the row's runs in pieces: first, end)
    let mut kept_rows: Vec<(u32, u32, u32, u32)> = Vec::new();
    let mut total = 0usize;
    let max = (0..nx).map(|x| a_max[x] * b_max[x]).max().unwrap_or(0);
    let t = params.threshold * max as f64;
    let mut s = Scratch::default();
    for x in 0..nx {
        let (a_top, b_top) = (a_max[x], b_max[x]);
        if a_top == 0 || b_top == 0 || ((a_top * b_top) as f64) < t {
            continue; // not one voxel of slice x passes
        }
        // The rows that pass (a >= a_from), and their cut-offs on xz[x, :].
        let a_from = least_passing_from(b_top, t, a_top).max(keep_from);
        s.rows.clear();
        let a = xy.row(x);
        let mut last = (0, 0); // (a, cut-off) of the last passing row
        for_each_at_least(a, a_from, |y| {
            if a[y] != last.0 {
                last = (a[y], least_passing_from(a[y], t, b_top).max(keep_from));
            }
            s.rows.push((y as u32, last.1));
        });
        progress.tick(ny + s.rows.len() * RUN_WORK)?;
        levels_of(&mut s);
        let b = xz.row(x);
        let (lo, hi) = bucket_by_level(&mut s, b);
        progress.tick(b.len() + s.joins.len())?;
        // Each level's runs: the previous level's, merged with its new z.
        s.level_at.clear();
        let mut previous = 0..0;
        for j in 0..s.levels.len() {
            let here = pieces.len();
            s.level_at.push(here);
            merge_level(&mut pieces, previous, &s.bucket[s.at[j]..s.at[j + 1]], b).map_err(over)?;
            previous = here..pieces.len();
            // every level is some row's: the rows will hold at least as many runs
            if pieces.len() > limit {
                return Err(over(Over::Limit(limit)));
            }
            progress.tick((previous.len() + s.at[j + 1] - s.at[j]) * RUN_WORK)?;
        }
        s.level_at.push(pieces.len());
        windows.try_reserve(1).map_err(|_| no_memory(total))?;
        windows.push((x as u32, lo, hi));
        kept_rows
            .try_reserve(s.rows.len())
            .map_err(|_| no_memory(total))?;
        for &(y, cut) in &s.rows {
            let j = level_index(&s.levels, cut);
            let (first, end) = (s.level_at[j], s.level_at[j + 1]);
            total += end - first;
            kept_rows.push((x as u32, y, first as u32, end as u32));
        }
        if total > limit {
            return Err(over(Over::Limit(limit)));
        }
    }
    let mut builder = Runs::builder(nx, ny).with_limit(params.max_runs);
    if !builder.reserve(total, kept_rows.len()) {
        return Err(over(builder.over.unwrap_or(Over::Memory(total))));
    }
    for &(x, y, first, end) in &kept_rows {
        let (first, end) = (first as usize, end as usize);
        builder.push_row(
            x as usize,
            y as usize,
            pieces.0[first..end].iter().map(|p| (p.0, p.1)),
        );
        progress.tick((end - first) * RUN_WORK)?;
    }
    Ok(Kept {
        runs: builder.finish(),
        rows: kept_rows,
        pieces,
        windows,
    })
}

/// Call `f(k)` for every `k` with `values[k] >= min`, in order. Compares
/// 64 values into a bit mask, then visits its bits: no branch on the data.
#[inline(always)]
fn for_each_at_least(values: &[i64], min: i64, mut f: impl FnMut(usize)) {
    for (c, chunk) in values.chunks(64).enumerate() {
        let mut bits = 0u64;
        for (k, &v) in chunk.iter().enumerate() {
            bits |= ((v >= min) as u64) << k;
        }
        while bits != 0 {
            f(c * 64 + bits.trailing_zeros() as usize);
            bits &= bits - 1;
        }
    }
}

/// The distinct cut-offs of the passing rows, highest first.
#[inline(always)]
fn levels_of(s: &mut Scratch) {
    s.levels.clear();
    // Few distinct cut-offs is the rule (rows share their counts): collect
    // them directly, and sort all the rows' only when there are many.
    for &(_, cut) in &s.rows {
        if !s.levels.contains(&cut) {
            if s.levels.len() == 16 {
                s.levels.clear();
                s.levels.extend(s.rows.iter().map(|r| r.1));
                break;
            }
            s.levels.push(cut);
        }
    }
    s.levels.sort_unstable_by(|a, b| b.cmp(a));
    s.levels.dedup();
}

/// The index of the level with cut-off `cut` (levels highest first), or of
/// the first level a value `cut` clears: how many cut-offs exceed it.
#[inline(always)]
fn level_index(levels: &[i64], cut: i64) -> usize {
    if levels.len() <= 16 {
        // counted without branches: a search mispredicts at every step
        levels.iter().map(|&c| (c > cut) as usize).sum()
    } else {
        levels.partition_point(|&c| c > cut)
    }
}

/// Bucket the z of `b` that clear the lowest level by the level they join
/// at, each bucket in z order. Returns the z range they lie in.
#[inline(always)]
fn bucket_by_level(s: &mut Scratch, b: &[i64]) -> (u32, u32) {
    let lowest = *s.levels.last().expect("a passing row");
    let l = s.levels.len();
    s.joins.clear();
    for_each_at_least(b, lowest, |z| s.joins.push((z as u32, 0)));
    s.at.clear();
    s.at.resize(l + 1, 0);
    for join in s.joins.iter_mut() {
        let j = level_index(&s.levels, b[join.0 as usize]);
        join.1 = j as u32;
        s.at[j + 1] += 1;
    }
    for j in 0..l {
        s.at[j + 1] += s.at[j];
    }
    s.bucket.clear();
    s.bucket.resize(s.joins.len(), 0);
    if l > 1 {
        s.next.clear();
        s.next.extend_from_slice(&s.at[..l]);
        for &(z, j) in &s.joins {
            s.bucket[s.next[j as usize]] = z;
            s.next[j as usize] += 1;
        }
    } else {
        for (slot, &(z, _)) in s.bucket.iter_mut().zip(&s.joins) {
            *slot = z;
        }
    }
    let lo = s.joins.first().map_or(0, |j| j.0);
    let hi = s.joins.last().map_or(0, |j| j.0 + 1);
    (lo, hi)
}

/// Append to `pieces` the runs of the union of the runs `pieces[previous]`
/// and the single voxels `new` (both in z order, disjoint), joining runs
/// that touch; a joined run's maximum is the first of its parts' largest
/// values in z order (`b` holds the values).
#[inline(always)]
fn merge_level(
    pieces: &mut Pieces,
    previous: Range<usize>,
    new: &[u32],
    b: &[i64],
) -> std::result::Result<(), Over> {
    pieces.reserve(previous.len() + new.len())?;
    let (mut i, mut k) = (previous.start, 0);
    let mut current: Option<(u32, u32, u32)> = None;
    loop {
        let next = if i < previous.end && (k == new.len() || pieces.0[i].0 < new[k]) {
            i += 1;
            pieces.0[i - 1]
        } else if k < new.len() {
            k += 1;
            (new[k - 1], new[k - 1] + 1, new[k - 1])
        } else {
            break;
        };
        match &mut current {
            Some(c) if c.1 == next.0 => {
                c.1 = next.1;
                if b[next.2 as usize] > b[c.2 as usize] {
                    c.2 = next.2;
                }
            }
            _ => {
                if let Some(c) = current {
                    pieces.push(c);
                }
                current = Some(next);
            }
        }
    }
    if let Some(c) = current {
        pieces.push(c);
    }
    Ok(())
}

/// Multi-sample pin: regions are the 26-connected components of `V > 0`, each
/// thresholded against its own maximum. Returns the kept runs and, per kept
/// run, the label of its region.
fn kept_runs_per_region(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    params: &Params,
    progress: &mut Progress,
) -> std::result::Result<(Runs, Vec<u32>), Halt> {
    let threshold = params.threshold;
    let (nx, ny) = (xy.nx, xy.ny);
    let mut positive = Runs::builder(nx, ny).with_limit(params.max_runs);
    for x in 0..nx {
        for (y, &a) in xy.row(x).iter().enumerate() {
            if a > 0 {
                positive.push_at_least(x, y, xz.row(x), 0, 1);
                progress.row(xz.ny, &positive)?;
            }
        }
    }
    let positive = positive.finish();
    let regions = label(&positive, progress)?;
    // The largest xz value of each run, once: for its region's maximum and its cut-off.
    let mut run_max = filled(positive.len(), 0i64).map_err(over)?;
    let mut region_max = filled(regions.count(), 0i64).map_err(over)?;
    for (x, y, range) in positive.rows() {
        for i in range {
            let b = &xz.row(x)[positive.start[i] as usize..positive.end[i] as usize];
            progress.tick(b.len())?;
            run_max[i] = b.iter().copied().max().unwrap_or(0);
            let m = &mut region_max[regions.of_run[i] as usize];
            *m = (*m).max(xy.get(x, y) * run_max[i]);
        }
    }
    let mut kept = Runs::builder(nx, ny).with_limit(params.max_runs);
    let mut region_of_run = Vec::new();
    for (x, y, range) in positive.rows() {
        let a = xy.get(x, y);
        for i in range {
            let region = regions.of_run[i];
            let t = threshold * region_max[region as usize] as f64;
            if let Some(b_min) = least_passing(a, t, run_max[i]) {
                let (s, e) = (positive.start[i] as usize, positive.end[i] as usize);
                let added = kept.push_at_least(x, y, &xz.row(x)[s..e], s, b_min);
                region_of_run.extend(std::iter::repeat_n(region, added));
                progress.row(e - s, &kept)?;
            }
        }
    }
    Ok((kept.finish(), region_of_run))
}

/// Exact integers for the sums of a centring: i64 when no sum can reach
/// 2^63 (the rule), i128 otherwise.
trait Exact:
    Copy
    + Ord
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::AddAssign
    + From<i64>
{
    const ZERO: Self;
    /// `float(self)` as Python computes it (to nearest, ties to even).
    fn to_f64(self) -> f64;
    /// `self` as a u64 if the type is no wider (for a radix sort).
    fn narrow(self) -> Option<u64>;
}

impl Exact for i64 {
    const ZERO: i64 = 0;
    #[inline]
    fn to_f64(self) -> f64 {
        self as f64
    }
    #[inline]
    fn narrow(self) -> Option<u64> {
        u64::try_from(self).ok()
    }
}

impl Exact for i128 {
    const ZERO: i128 = 0;
    #[inline]
    fn narrow(self) -> Option<u64> {
        None
    }
    #[inline]
    fn to_f64(self) -> f64 {
        match i64::try_from(self) {
            Ok(v) => v as f64,
            Err(_) => wide_to_f64(self),
        }
    }
}

/// `v as f64` out of line, so that the common case above stays one instruction.
#[cold]
#[inline(never)]
fn wide_to_f64(v: i128) -> f64 {
    v as f64
}

/// Whether every sum of a centring fits an i64: a label's total is at most
/// `voxels * max`, its moments and every prefix sum at most that times the
/// longest axis.
fn sums_fit_i64(nx: usize, ny: usize, nz: usize, max: i64) -> bool {
    let axis = nx.max(ny).max(nz) as u128;
    let bound = (nx as u128) * (ny as u128) * (nz as u128) * (max.max(1) as u128);
    bound
        .checked_mul(axis)
        .is_some_and(|b| b <= i64::MAX as u128)
}

/// Exact integer statistics of one label.
#[derive(Debug, Clone)]
struct Stats<T> {
    n: i64,
    total: T,
    moment: [T; 3],
    max: i64,
    max_voxel: [u32; 3],
    lo: [u32; 3],
    hi: [u32; 3],
}

impl<T: Exact> Stats<T> {
    const EMPTY: Stats<T> = Stats {
        n: 0,
        total: T::ZERO,
        moment: [T::ZERO; 3],
        max: -1,
        max_voxel: [0; 3],
        lo: [u32::MAX; 3],
        hi: [0; 3],
    };

    /// Add the run `[start, end)` of row `(x, y)`, whose values are `a` times
    /// `xz[x, start..end]`: their sum `sum_b` and `sum_zb` (`z`-weighted), and
    /// their first largest `b_max`, at `z_max`. Runs come in raster order:
    /// only a strictly larger value moves the maximum.
    #[inline]
    fn add_run(
        &mut self,
        (x, y, a): (usize, usize, i64),
        (start, end): (usize, usize),
        sums: (T, T),
        b_max: i64,
        z_max: usize,
    ) {
        let (sum_b, sum_zb) = sums;
        let a_t = T::from(a);
        let run_total = a_t * sum_b;
        self.n += (end - start) as i64;
        self.total += run_total;
        self.moment[0] += T::from(x as i64) * run_total;
        self.moment[1] += T::from(y as i64) * run_total;
        self.moment[2] += a_t * sum_zb;
        if a * b_max > self.max {
            self.max = a * b_max;
            self.max_voxel = [x as u32, y as u32, z_max as u32];
        }
        let (lo, hi) = (
            [x, y, start].map(|c| c as u32),
            [x, y, end - 1].map(|c| c as u32),
        );
        for d in 0..3 {
            self.lo[d] = self.lo[d].min(lo[d]);
            self.hi[d] = self.hi[d].max(hi[d]);
        }
    }

    #[inline]
    fn result(&self, params: &Params) -> Xrc3d {
        let w = self.total.to_f64();
        let centre_of_mass = self.moment.map(|m| m.to_f64() / w + 0.5);
        Xrc3d {
            centre_of_mass,
            max_voxel: self.max_voxel.map(|c| c as i64),
            max_count: self.max as f64,
            n_voxels: self.n,
            total_count: w,
            sample_id: params.wells.tag(params.sample_id, centre_of_mass[0]),
            bounding_box: [self.lo.map(|c| c as i64), self.hi.map(|c| c as i64 + 1)],
        }
    }
}

/// The results, by total count, largest first; ties in label order (raster
/// order), or on a multi-sample pin by region (`first_region`: of each
/// label), then label.
fn results<T: Exact>(
    stats: &[Stats<T>],
    first_region: Option<&[u32]>,
    params: &Params,
) -> std::result::Result<Vec<Xrc3d>, Halt> {
    let no_memory = |_| over(Over::Memory(stats.len()));
    if stats.len() < 2 {
        let mut results = Vec::new();
        results.try_reserve_exact(stats.len()).map_err(no_memory)?;
        results.extend(stats.iter().map(|s| s.result(params)));
        return Ok(results);
    }
    let order: Vec<u32> = match (first_region, stats.first().and_then(|s| s.total.narrow())) {
        (None, Some(_)) => {
            // The rule: a radix sort on 64-bit totals.
            let top = stats.iter().map(|s| s.total).max().unwrap_or(T::ZERO);
            let mut keys: Vec<u64> = Vec::new();
            keys.try_reserve_exact(stats.len()).map_err(no_memory)?;
            // ascending keys: descending totals
            keys.extend(stats.iter().map(|s| (top - s.total).narrow().unwrap_or(0)));
            radix_order(&keys).map_err(no_memory)?
        }
        _ => {
            // A stable sort of (key, label) pairs, labels in order, by key:
            // its scratch space, half the pairs, is the one allocation that
            // does not ask first.
            let mut pairs: Vec<(std::cmp::Reverse<T>, u32, u32)> = Vec::new();
            pairs.try_reserve_exact(stats.len()).map_err(no_memory)?;
            pairs.extend(stats.iter().enumerate().map(|(l, s)| {
                let region = first_region.map_or(0, |r| r[l]);
                (std::cmp::Reverse(s.total), region, l as u32)
            }));
            pairs.sort_by_key(|&(total, region, _)| (total, region));
            pairs.iter().map(|p| p.2).collect()
        }
    };
    let mut results = Vec::new();
    results.try_reserve_exact(order.len()).map_err(no_memory)?;
    results.extend(order.iter().map(|&l| stats[l as usize].result(params)));
    Ok(results)
}

/// The indices of `keys` in ascending order of key, ties in index order: a
/// least-significant-digit radix sort, a byte at a time, as many bytes as the
/// largest key needs.
fn radix_order(keys: &[u64]) -> std::result::Result<Vec<u32>, std::collections::TryReserveError> {
    let n = keys.len();
    let mut order: Vec<u32> = Vec::new();
    order.try_reserve_exact(n)?;
    order.extend(0..n as u32);
    let largest = keys.iter().copied().max().unwrap_or(0);
    let bytes = (64 - largest.leading_zeros()).div_ceil(8);
    if bytes == 0 {
        return Ok(order);
    }
    let mut other: Vec<u32> = Vec::new();
    other.try_reserve_exact(n)?;
    other.resize(n, 0);
    for byte in 0..bytes {
        let digit = |i: u32| ((keys[i as usize] >> (8 * byte)) & 0xff) as usize;
        let mut at = [0usize; 256];
        for &i in &order {
            at[digit(i)] += 1;
        }
        let mut sum = 0;
        for a in at.iter_mut() {
            (*a, sum) = (sum, sum + *a);
        }
        for &i in &order {
            let d = digit(i);
            other[at[d]] = i;
            at[d] += 1;
        }
        std::mem::swap(&mut order, &mut other);
    }
    Ok(order)
}

/// One pass over the kept runs, in raster order, summing per label: O(1) per
/// run, from prefix sums of each slice's `xz[x, lo..hi]` and the first
/// maximum its level's run carries.
fn accumulate<T: Exact>(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    kept: &Kept,
    labels: &Labels,
    progress: &mut Progress,
) -> std::result::Result<Vec<Stats<T>>, Halt> {
    let runs = &kept.runs;
    let mut stats: Vec<Stats<T>> = filled(labels.count(), Stats::EMPTY).map_err(over)?;
    // sums[k] = (sum of b, sum of z * b) over z in lo..lo + k
    let mut sums: Vec<(T, T)> = Vec::new();
    let (mut windows, mut lo, mut slice) = (kept.windows.iter(), 0usize, usize::MAX);
    for (k, (x, y, range)) in runs.rows().enumerate() {
        let b = xz.row(x);
        if x != slice {
            let &(_, l, h) = windows
                .find(|w| w.0 as usize == x)
                .expect("a window per slice with runs");
            (lo, slice) = (l as usize, x);
            sums.clear();
            sums.push((T::ZERO, T::ZERO));
            let (mut s, mut q) = (T::ZERO, T::ZERO);
            for (z, &v) in b.iter().enumerate().take(h as usize).skip(lo) {
                s += T::from(v);
                q += T::from(z as i64) * T::from(v);
                sums.push((s, q));
            }
            progress.tick(h as usize - lo)?;
        }
        let a = xy.get(x, y);
        let first = kept.rows[k].2 as usize;
        for (n, i) in range.clone().enumerate() {
            let (start, end) = (runs.start[i] as usize, runs.end[i] as usize);
            let z_max = kept.pieces.0[first + n].2 as usize;
            let ((s0, q0), (s1, q1)) = (sums[start - lo], sums[end - lo]);
            stats[labels.of_run[i] as usize].add_run(
                (x, y, a),
                (start, end),
                (s1 - s0, q1 - q0),
                b[z_max],
                z_max,
            );
        }
        progress.tick(range.len() * RUN_WORK)?;
    }
    Ok(stats)
}

/// One pass over the kept runs, in raster order, summing per label by
/// reading each run's values (multi-sample pins).
fn accumulate_scanning<T: Exact>(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    runs: &Runs,
    labels: &Labels,
    progress: &mut Progress,
) -> std::result::Result<Vec<Stats<T>>, Halt> {
    let mut stats: Vec<Stats<T>> = filled(labels.count(), Stats::EMPTY).map_err(over)?;
    for (x, y, range) in runs.rows() {
        let a = xy.get(x, y);
        for i in range {
            progress.tick(runs.end[i] as usize - runs.start[i] as usize + 16)?;
            let (start, end) = (runs.start[i] as usize, runs.end[i] as usize);
            let b = &xz.row(x)[start..end];
            let (mut sum_b, mut sum_zb) = (T::ZERO, T::ZERO);
            let (mut b_max, mut z_max) = (-1i64, 0usize);
            for (k, &bz) in b.iter().enumerate() {
                sum_b += T::from(bz);
                sum_zb += T::from((start + k) as i64) * T::from(bz);
                if bz > b_max {
                    b_max = bz;
                    z_max = start + k;
                }
            }
            stats[labels.of_run[i] as usize].add_run(
                (x, y, a),
                (start, end),
                (sum_b, sum_zb),
                b_max,
                z_max,
            );
        }
    }
    Ok(stats)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grid(rows: &[&[i64]]) -> Grid<i64> {
        Grid::new(
            rows.len(),
            rows[0].len(),
            rows.iter().flat_map(|r| r.iter().copied()).collect(),
        )
        .unwrap()
    }

    #[test]
    fn single_voxel() {
        let r = centre_3d(&grid(&[&[0, 3]]), &grid(&[&[2, 0, 0]]), &Params::default()).unwrap();
        assert_eq!(
            r,
            vec![Xrc3d {
                centre_of_mass: [0.5, 1.5, 0.5],
                max_voxel: [0, 1, 0],
                max_count: 6.0,
                n_voxels: 1,
                total_count: 6.0,
                sample_id: None,
                bounding_box: [[0, 1, 0], [1, 2, 1]],
            }]
        );
    }

    #[test]
    fn weighted_centre_is_exact() {
        // Row x=0: values 1*[1, 3] -> z centre (0*1 + 1*3)/4 = 0.75
        let r = centre_3d(&grid(&[&[1]]), &grid(&[&[1, 3]]), &Params::default()).unwrap();
        assert_eq!(r[0].centre_of_mass, [0.5, 0.5, 1.25]);
        assert_eq!(r[0].total_count, 4.0);
        assert_eq!(r[0].max_voxel, [0, 0, 1]);
    }

    #[test]
    fn zero_threshold_never_keeps_zero_voxels() {
        let p = Params {
            threshold: 0.0,
            ..Params::default()
        };
        let r = centre_3d(&grid(&[&[1, 0, 1]]), &grid(&[&[1]]), &p).unwrap();
        assert_eq!(r.len(), 2);
        assert!(r.iter().all(|x| x.n_voxels == 1));
    }

    #[test]
    fn absolute_threshold_cuts_cells_first() {
        let p = Params {
            threshold_absolute: 3.0,
            ..Params::default()
        };
        let r = centre_3d(&grid(&[&[2, 4]]), &grid(&[&[5]]), &p).unwrap();
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].max_voxel, [0, 1, 0]);
    }

    #[test]
    fn least_passing_is_the_exact_float_cutoff() {
        for a in 1..50i64 {
            for &t in &[0.0, -1.0, 0.5, 7.0, 10.25, 99.0, 1e6] {
                let want = (1..=60).find(|&b| (a * b) as f64 >= t);
                assert_eq!(least_passing(a, t, 60), want, "a={a} t={t}");
            }
        }
        // Near 2^53 float(a*b) rounds; the cutoff follows the rounded value.
        let a = (1i64 << 53) + 1;
        let t = (a as f64) * 2.0;
        assert_eq!(
            least_passing(a, t, 4),
            (1..=4).find(|&b| (a * b) as f64 >= t)
        );
        assert_eq!(least_passing(i64::MAX, 1e30, 3), Some(2)); // overflow counts as passing
    }

    #[test]
    fn bad_inputs_are_named() {
        let e = centre_3d(&grid(&[&[1], &[1]]), &grid(&[&[1]]), &Params::default()).unwrap_err();
        assert!(e.0.contains("nx=2") && e.0.contains("nx=1"), "{e}");
        let e = centre_3d(&grid(&[&[-1]]), &grid(&[&[1]]), &Params::default()).unwrap_err();
        assert!(e.0.starts_with("xy: negative count -1"), "{e}");
        let p = Params {
            threshold: f64::NAN,
            ..Params::default()
        };
        assert!(centre_3d(&grid(&[&[1]]), &grid(&[&[1]]), &p)
            .unwrap_err()
            .0
            .contains("threshold"));
        let e = centre_3d(&grid(&[&[i64::MAX]]), &grid(&[&[2]]), &Params::default()).unwrap_err();
        assert!(e.0.contains("overflows"), "{e}");
    }

    /// The spec the plain way: the dense volume, cut, thresholded against its
    /// maximum, labelled by flood fill (26-connectivity) in raster order.
    fn dense(
        xy: &Grid<i64>,
        xz: &Grid<i64>,
        threshold: f64,
        threshold_absolute: f64,
    ) -> Vec<Xrc3d> {
        let (nx, ny, nz) = (xy.nx, xy.ny, xz.ny);
        let cut = |c: i64| {
            if (c as f64) < threshold_absolute {
                0
            } else {
                c
            }
        };
        let v = |x: usize, y: usize, z: usize| cut(xy.get(x, y)) * cut(xz.get(x, z));
        let mut max = 0;
        for x in 0..nx {
            for y in 0..ny {
                for z in 0..nz {
                    max = max.max(v(x, y, z));
                }
            }
        }
        if max == 0 {
            return Vec::new();
        }
        let t = threshold * max as f64;
        let kept = |x: usize, y: usize, z: usize| v(x, y, z) > 0 && v(x, y, z) as f64 >= t;
        let mut label = vec![usize::MAX; nx * ny * nz];
        let at = |x: usize, y: usize, z: usize| (x * ny + y) * nz + z;
        let mut stats: Vec<Stats<i128>> = Vec::new();
        for x in 0..nx {
            for y in 0..ny {
                for z in 0..nz {
                    if !kept(x, y, z) || label[at(x, y, z)] != usize::MAX {
                        continue;
                    }
                    let l = stats.len();
                    stats.push(Stats::EMPTY);
                    label[at(x, y, z)] = l;
                    let mut stack = vec![(x, y, z)];
                    while let Some((x, y, z)) = stack.pop() {
                        for dx in -1i64..=1 {
                            for dy in -1i64..=1 {
                                for dz in -1i64..=1 {
                                    let (i, j, k) = (x as i64 + dx, y as i64 + dy, z as i64 + dz);
                                    if i < 0
                                        || j < 0
                                        || k < 0
                                        || i >= nx as i64
                                        || j >= ny as i64
                                        || k >= nz as i64
                                    {
                                        continue;
                                    }
                                    let (i, j, k) = (i as usize, j as usize, k as usize);
                                    if kept(i, j, k) && label[at(i, j, k)] == usize::MAX {
                                        label[at(i, j, k)] = l;
                                        stack.push((i, j, k));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        // statistics voxel by voxel, in raster order
        for x in 0..nx {
            for y in 0..ny {
                for z in 0..nz {
                    let l = label[at(x, y, z)];
                    if l != usize::MAX {
                        let b = cut(xz.get(x, z));
                        stats[l].add_run(
                            (x, y, cut(xy.get(x, y))),
                            (z, z + 1),
                            (b as i128, z as i128 * b as i128),
                            b,
                            z,
                        );
                    }
                }
            }
        }
        let mut order: Vec<usize> = (0..stats.len()).collect();
        order.sort_by_key(|&l| std::cmp::Reverse(stats[l].total));
        order
            .iter()
            .map(|&l| stats[l].result(&Params::default()))
            .collect()
    }

    /// A small deterministic generator (xorshift64*).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }

        /// Counts of one of several kinds: mostly zeros and ties, smooth
        /// peaks, wide ranges, and values whose products pass 2^53.
        fn grid(&mut self, nx: usize, n: usize, kind: u64) -> Grid<i64> {
            let peak = 1 + self.below(n as u64) as i64;
            let data = (0..nx * n)
                .map(|i| match kind {
                    0 => [0, 0, 0, 1, 2, 3][self.below(6) as usize],
                    1 => self.below(5) as i64,
                    2 => {
                        let d = (i % n) as i64 - peak;
                        (200 - 9 * d * d).max(0) + self.below(3) as i64
                    }
                    3 => self.below(1_000_000) as i64 * (self.below(2) as i64),
                    _ => (1 << 27) + self.below(1 << 20) as i64 * (self.below(3) as i64),
                })
                .collect();
            Grid::new(nx, n, data).unwrap()
        }
    }

    #[test]
    fn matches_the_dense_volume_on_random_grids() {
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let thresholds = [0.25, 0.0, 0.05, 0.5, 0.9, 1.0, 0.3333, -1.0];
        for case in 0..3000 {
            let nx = 1 + rng.below(5) as usize;
            let ny = 1 + rng.below(9) as usize;
            // many rows of one slice, runs across 64-value words, nz not a multiple of 64
            let nz = [1, 2, 7, 63, 64, 65, 100, 129, 150][rng.below(9) as usize];
            let (kind_xy, kind_xz) = (rng.below(5), rng.below(5));
            let (xy, xz) = (rng.grid(nx, ny, kind_xy), rng.grid(nx, nz, kind_xz));
            let params = Params {
                threshold: thresholds[rng.below(thresholds.len() as u64) as usize],
                threshold_absolute: [0.0, 0.0, 1.0, 2.5, 3.0][rng.below(5) as usize],
                ..Params::default()
            };
            let want = dense(&xy, &xz, params.threshold, params.threshold_absolute);
            let got = centre_3d(&xy, &xz, &params).unwrap();
            assert_eq!(got, want, "case {case}: {xy:?} {xz:?} {params:?}");
        }
    }

    #[test]
    fn a_slice_with_many_levels_and_long_runs() {
        // Every row its own cut-off (more than 16 levels), runs that merge
        // level after level across 64-value words, equal maxima within a run.
        let ny = 40;
        let xy = Grid::new(
            2,
            ny,
            (0..2 * ny as i64).map(|i| 1 + i % ny as i64).collect(),
        )
        .unwrap();
        let nz = 300;
        let b: Vec<i64> = (0..2 * nz as i64)
            .map(|i| {
                let z = i % nz as i64;
                [40 - (z - 70).abs() / 3, 40 - (z - 200).abs() / 4, 0]
                    .into_iter()
                    .max()
                    .unwrap()
                    .max(0)
            })
            .collect();
        let xz = Grid::new(2, nz, b).unwrap();
        for threshold in [0.0, 0.01, 0.1, 0.25, 0.5, 0.99] {
            let p = Params {
                threshold,
                ..Params::default()
            };
            assert_eq!(
                centre_3d(&xy, &xz, &p).unwrap(),
                dense(&xy, &xz, threshold, 0.0),
                "{threshold}"
            );
        }
    }

    #[test]
    fn max_runs_still_limits_and_interruptions_still_come() {
        // 1 x 64 x 2000: a run at every other z of every row.
        let xy = Grid::new(1, 64, vec![1; 64]).unwrap();
        let xz = Grid::new(1, 2000, (0..2000).map(|z| (z % 2 == 0) as i64).collect()).unwrap();
        let p = Params {
            max_runs: 64 * 1000,
            ..Params::default()
        };
        assert_eq!(centre_3d(&xy, &xz, &p).unwrap().len(), 1000);
        let p = Params {
            max_runs: 64 * 1000 - 1,
            ..Params::default()
        };
        let e = centre_3d(&xy, &xz, &p).unwrap_err();
        assert!(e.0.contains("max_runs"), "{e}");
        // asked now and then; stopping when told
        let xy = Grid::new(1, 4096, vec![1; 4096]).unwrap();
        let xz = Grid::new(1, 4096, (0..4096).map(|z| (z % 2 == 0) as i64).collect()).unwrap();
        let mut asked = 0;
        let p = Params {
            max_runs: 1 << 23,
            ..Params::default()
        };
        let r = centre_3d_with(&xy, &xz, &p, &mut || {
            asked += 1;
            false
        });
        assert_eq!(r, Err(Halt::Interrupted));
        assert_eq!(asked, 1);
    }

    #[test]
    fn does_not_modify_inputs_and_handles_empty() {
        let (xy, xz) = (grid(&[&[0, 0]]), grid(&[&[0]]));
        assert!(centre_3d(&xy, &xz, &Params::default()).unwrap().is_empty());
        let xy = grid(&[&[1, 9]]);
        let p = Params {
            threshold_absolute: 5.0,
            ..Params::default()
        };
        centre_3d(&xy, &grid(&[&[9]]), &p).unwrap();
        assert_eq!(xy.data, vec![1, 9]);
    }
}
