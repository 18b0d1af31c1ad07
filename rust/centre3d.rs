//! Three-dimensional X-ray centring from two grids that share x.
//! See `docs/algorithm.md`, "3D centring".
//!
//! The volume `V[x, y, z] = xy[x, y] * xz[x, z]` is never stored: every row
//! `(x, y)` of it is the row `xz[x, :]` scaled by `xy[x, y]`, so the kept voxels
//! are found row by row as runs along z, a whole row is skipped when even its
//! largest product misses the threshold, and statistics are summed per run.
//! Memory is a few words per run; time is rows plus kept voxels.

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
    /// Memory beyond the inputs is at most ~24 bytes per run plus ~280 per
    /// separate region (its statistics and its result), and a region has at
    /// least one run.
    pub max_runs: usize,
}

/// The default of [`Params::max_runs`]: 2^21 runs; ~50 MB for the runs, and
/// ~650 MB at the very most, results included, when every run is a region.
pub const MAX_RUNS: usize = 1 << 21;

/// How many voxels are scanned between two asks whether to go on (~ms of work).
const CHECK_EVERY: usize = 1 << 24;

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
             limit max_runs; memory grows ~24 bytes per run: raise max_runs, or check the counts"
        ))),
        Over::Memory(n) => Halt::OutOfMemory(format!("no memory for more than {n} runs of voxels")),
    }
}

/// Scanning work done, and the caller asked every [`CHECK_EVERY`] voxels
/// whether to go on.
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

    /// Count `work` done (voxels, or runs); ask the caller now and then.
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
/// scanning) whether to go on, and telling running out of memory apart.
pub fn centre_3d_with(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    params: &Params,
    keep_going: &mut dyn FnMut() -> bool,
) -> std::result::Result<Vec<Xrc3d>, Halt> {
    let (xy, xz) = prepare(xy, xz, params)?;
    let mut progress = Progress {
        scanned: 0,
        keep_going,
    };
    let (runs, region_of_run) = if params.wells.is_multi_sample() {
        kept_runs_per_region(&xy, &xz, params, &mut progress)?
    } else {
        (
            kept_runs_whole_volume(&xy, &xz, params, &mut progress)?,
            Vec::new(),
        )
    };
    let labels = runs.label().map_err(over)?;
    let stats = accumulate(&xy, &xz, &runs, &labels, &mut progress)?;
    // By total count, largest first; ties in label order (raster order), or on
    // a multi-sample pin by region, then label. Sort indices, not the
    // statistics. A stable sort measured fastest here (many ties); its scratch
    // space, half the indices (2 bytes per region), is the one allocation
    // that does not ask first.
    let mut order: Vec<u32> = filled(stats.len(), 0u32).map_err(over)?;
    for (i, o) in order.iter_mut().enumerate() {
        *o = i as u32;
    }
    if params.wells.is_multi_sample() {
        order.sort_by_key(|&l| (region_of_run[labels.first_run[l as usize] as usize], l));
    }
    order.sort_by_key(|&l| std::cmp::Reverse(stats[l as usize].total)); // stable
    let mut results = Vec::new();
    results
        .try_reserve_exact(order.len())
        .map_err(|_| over(Over::Memory(runs.len())))?;
    results.extend(order.iter().map(|&l| stats[l as usize].result(params)));
    Ok(results)
}

/// Check the inputs and return copies with `threshold_absolute` applied.
fn prepare(xy: &Grid<i64>, xz: &Grid<i64>, params: &Params) -> Result<(Grid<i64>, Grid<i64>)> {
    if xy.nx != xz.nx {
        return Err(InputError::new(format!(
            "xy and xz must share x: xy has nx={}, xz has nx={}",
            xy.nx, xz.nx
        )));
    }
    if xy.data.is_empty() || xz.data.is_empty() {
        return Err(InputError::new(
            "empty grid: xy and xz need at least one cell each",
        ));
    }
    if !params.threshold.is_finite() {
        return Err(InputError::new(format!(
            "threshold must be a finite number, got {}",
            params.threshold
        )));
    }
    if !params.threshold_absolute.is_finite() {
        return Err(InputError::new(format!(
            "threshold_absolute must be a finite number, got {}",
            params.threshold_absolute
        )));
    }
    for &(name, n) in &[("nx", xy.nx), ("ny", xy.ny), ("nz", xz.ny)] {
        if n > MAX_AXIS {
            return Err(InputError::new(format!(
                "grid too large: {name}={n} exceeds {MAX_AXIS}"
            )));
        }
    }
    if (xy.nx as u128) * (xy.ny as u128) * (xz.ny as u128) > MAX_VOXELS {
        return Err(InputError::new("grid too large: more than 2^40 voxels"));
    }
    xy.check_counts("xy")?;
    xz.check_counts("xz")?;
    let cut = |g: &Grid<i64>| Grid {
        data: g
            .data
            .iter()
            .map(|&c| {
                if (c as f64) < params.threshold_absolute {
                    0
                } else {
                    c
                }
            })
            .collect(),
        ..*g
    };
    let (xy, xz) = (cut(xy), cut(xz));
    if xy.max().checked_mul(xz.max()).is_none() {
        return Err(InputError::new(format!(
            "counts too large: {} * {} overflows a 64-bit integer",
            xy.max(),
            xz.max()
        )));
    }
    Ok((xy, xz))
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

/// Single-sample pin: one region, the whole volume.
fn kept_runs_whole_volume(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    params: &Params,
    progress: &mut Progress,
) -> std::result::Result<Runs, Halt> {
    let threshold = params.threshold;
    let (nx, ny) = (xy.nx, xy.ny);
    let row_max: Vec<i64> = (0..nx)
        .map(|x| xz.row(x).iter().copied().max().unwrap_or(0))
        .collect();
    let max = (0..nx)
        .map(|x| xy.row(x).iter().copied().max().unwrap_or(0) * row_max[x])
        .max()
        .unwrap_or(0);
    let mut builder = Runs::builder(nx, ny).with_limit(params.max_runs);
    if max == 0 {
        return Ok(builder.finish());
    }
    let t = threshold * max as f64;
    for (x, &b_max) in row_max.iter().enumerate() {
        for (y, &a) in xy.row(x).iter().enumerate() {
            if a == 0 {
                continue;
            }
            if let Some(b_min) = least_passing(a, t, b_max) {
                builder.push_at_least(x, y, xz.row(x), 0, b_min);
                progress.row(xz.ny, &builder)?;
            }
        }
    }
    Ok(builder.finish())
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
    let regions = positive.label().map_err(over)?;
    // The largest xz value of each run, once: for its region's maximum and its cut-off.
    let mut run_max = filled(positive.len(), 0i64).map_err(over)?;
    let mut region_max = filled(regions.count(), 0i64).map_err(over)?;
    for (x, y, range) in positive.rows() {
        for i in range {
            let b = &xz.row(x)[positive.start[i] as usize..positive.end[i] as usize];
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

/// `v as f64`, rounding as Python's `float(int)` does, fast when `v` fits i64.
#[inline]
fn to_f64(v: i128) -> f64 {
    match i64::try_from(v) {
        Ok(v) => v as f64,
        Err(_) => v as f64,
    }
}

/// Exact integer statistics of one label.
#[derive(Debug, Clone)]
struct Stats {
    n: i64,
    total: i128,
    moment: [i128; 3],
    max: i64,
    max_voxel: [i64; 3],
    lo: [i64; 3],
    hi: [i64; 3],
}

impl Stats {
    fn result(&self, params: &Params) -> Xrc3d {
        let w = to_f64(self.total);
        let centre_of_mass = self.moment.map(|m| to_f64(m) / w + 0.5);
        Xrc3d {
            centre_of_mass,
            max_voxel: self.max_voxel,
            max_count: self.max as f64,
            n_voxels: self.n,
            total_count: to_f64(self.total),
            sample_id: params.wells.tag(params.sample_id, centre_of_mass[0]),
            bounding_box: [self.lo, self.hi.map(|h| h + 1)],
        }
    }
}

/// One pass over the kept runs, in raster order, summing per label.
fn accumulate(
    xy: &Grid<i64>,
    xz: &Grid<i64>,
    runs: &Runs,
    labels: &Labels,
    progress: &mut Progress,
) -> std::result::Result<Vec<Stats>, Halt> {
    let mut stats: Vec<Stats> = filled(
        labels.count(),
        Stats {
            n: 0,
            total: 0,
            moment: [0; 3],
            max: -1,
            max_voxel: [0; 3],
            lo: [i64::MAX; 3],
            hi: [i64::MIN; 3],
        },
    )
    .map_err(over)?;
    for (x, y, range) in runs.rows() {
        let a = xy.get(x, y);
        for i in range {
            progress.tick(runs.end[i] as usize - runs.start[i] as usize + 16)?;
            let (start, end) = (runs.start[i] as usize, runs.end[i] as usize);
            let b = &xz.row(x)[start..end];
            let (mut sum_b, mut sum_zb) = (0i128, 0i128);
            let (mut b_max, mut z_max) = (-1i64, 0usize);
            for (k, &bz) in b.iter().enumerate() {
                sum_b += bz as i128;
                sum_zb += (start + k) as i128 * bz as i128;
                if bz > b_max {
                    b_max = bz;
                    z_max = start + k;
                }
            }
            let s = &mut stats[labels.of_run[i] as usize];
            let run_total = a as i128 * sum_b;
            s.n += (end - start) as i64;
            s.total += run_total;
            s.moment[0] += x as i128 * run_total;
            s.moment[1] += y as i128 * run_total;
            s.moment[2] += a as i128 * sum_zb;
            // Runs arrive in raster order: only a strictly larger value moves the maximum.
            if a * b_max > s.max {
                s.max = a * b_max;
                s.max_voxel = [x as i64, y as i64, z_max as i64];
            }
            let (lo, hi) = (
                [x, y, start].map(|c| c as i64),
                [x, y, end - 1].map(|c| c as i64),
            );
            for d in 0..3 {
                s.lo[d] = s.lo[d].min(lo[d]);
                s.hi[d] = s.hi[d].max(hi[d]);
            }
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
