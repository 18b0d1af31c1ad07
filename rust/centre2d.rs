//! Two-dimensional X-ray centring of one grid. See `docs/algorithm.md`, "2D centring".

use crate::error::{InputError, Result};
use crate::grid::Scan;
use crate::label::Runs;
use crate::wells::Wells;

/// Where the grid sits on the sample camera's snapshot.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Snapshot {
    pub dx_mm: f64,
    pub dy_mm: f64,
    pub microns_per_pixel_x: f64,
    pub microns_per_pixel_y: f64,
    pub offset_x_px: f64,
    pub offset_y_px: f64,
}

impl Snapshot {
    fn check(&self) -> Result<()> {
        for (name, v) in [
            ("dx_mm", self.dx_mm),
            ("dy_mm", self.dy_mm),
            ("snapshot_offsetXPixel", self.offset_x_px),
            ("snapshot_offsetYPixel", self.offset_y_px),
        ] {
            if !v.is_finite() {
                return Err(InputError::new(format!(
                    "{name} must be a finite number, got {v}"
                )));
            }
        }
        for (name, v) in [
            ("micronsPerPixelX", self.microns_per_pixel_x),
            ("micronsPerPixelY", self.microns_per_pixel_y),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(InputError::new(format!(
                    "{name} must be a positive number, got {v}"
                )));
            }
        }
        Ok(())
    }

    /// The size of one grid box on the snapshot, in pixels.
    pub fn box_size_px(&self) -> [f64; 2] {
        [
            1000.0 * self.dx_mm / self.microns_per_pixel_x,
            1000.0 * self.dy_mm / self.microns_per_pixel_y,
        ]
    }
}

/// The best region of a grid with any spots.
#[derive(Debug, Clone, PartialEq)]
pub struct Found2d {
    pub centre_of_mass: [f64; 2],
    pub max_voxel: [i64; 2],
    /// The largest count of the whole scan.
    pub max_count: i64,
    pub n_voxels: i64,
    pub total_count: i64,
    pub sample_id: Option<i64>,
    pub centre_x: f64,
    pub centre_y: f64,
    /// 1-based acquisition number of the first image holding `max_count`.
    pub best_image: i64,
    /// Cells of the region in raster order, as `[y, x]`.
    pub best_region: Vec<[i64; 2]>,
}

/// A 2D centring result: `found` is `None` when no image had a spot.
#[derive(Debug, Clone, PartialEq)]
pub struct Xrc2d {
    pub steps: [i64; 2],
    pub box_size_px: [f64; 2],
    pub snapshot_offset: [f64; 2],
    pub found: Option<Found2d>,
}

/// Centre one grid from its counts in acquisition order.
pub fn centre_2d(
    counts: &[i64],
    scan: &Scan,
    snapshot: &Snapshot,
    sample_id: Option<i64>,
    wells: &Wells,
) -> Result<Xrc2d> {
    snapshot.check()?;
    if let Some(i) = counts.iter().position(|&c| c < 0) {
        return Err(InputError::new(format!(
            "counts: negative count {} at image {}",
            counts[i],
            i + 1
        )));
    }
    if counts
        .iter()
        .try_fold(0i64, |s, &c| s.checked_add(c))
        .is_none()
    {
        return Err(InputError::new(
            "counts: the sum of all counts overflows a 64-bit integer",
        ));
    }
    let grid = scan.reshape(counts)?;
    let box_size_px = snapshot.box_size_px();
    let mut result = Xrc2d {
        steps: [scan.steps_x as i64, scan.steps_y as i64],
        box_size_px,
        snapshot_offset: [snapshot.offset_x_px, snapshot.offset_y_px],
        found: None,
    };
    let max = counts.iter().copied().max().unwrap_or(0);
    if max == 0 {
        return Ok(result);
    }
    let best_image = counts.iter().position(|&c| c == max).unwrap() as i64 + 1;

    // The transposed grid B[y][x] as one plane: rows are y, runs go along x.
    // Kept cells have 2 * count >= max, that is count >= ceil(max / 2).
    let (nx, ny) = (scan.steps_x, scan.steps_y);
    let kept_from = max / 2 + max % 2;
    let mut builder = Runs::builder(1, ny);
    let mut line = vec![0i64; nx];
    for y in 0..ny {
        for (x, c) in line.iter_mut().enumerate() {
            *c = grid.get(x, y);
        }
        builder.push_at_least(0, y, &line, 0, kept_from);
    }
    let runs = builder.finish();
    let labels = runs
        .label()
        .map_err(|_| InputError::new("no memory to label the grid's regions"))?;
    let mut cells = vec![0i64; labels.count()];
    for i in 0..runs.len() {
        cells[labels.of_run[i] as usize] += (runs.end[i] - runs.start[i]) as i64;
    }
    // Most cells; the first label wins a tie.
    let best = (0..cells.len()).fold(0, |b, l| if cells[l] > cells[b] { l } else { b }) as u32;

    let (mut sum_x, mut sum_y, mut total) = (0i64, 0i64, 0i64);
    let (mut region_max, mut max_voxel) = (-1i64, [0i64; 2]);
    let mut best_region = Vec::new();
    for (_, y, range) in runs.rows() {
        for i in range.filter(|&i| labels.of_run[i] == best) {
            for x in runs.start[i] as usize..runs.end[i] as usize {
                let c = grid.get(x, y);
                sum_x += x as i64;
                sum_y += y as i64;
                total += c;
                if c > region_max {
                    region_max = c;
                    max_voxel = [x as i64, y as i64];
                }
                best_region.push([y as i64, x as i64]);
            }
        }
    }
    let n = best_region.len() as i64;
    let (mean_x, mean_y) = (sum_x as f64 / n as f64, sum_y as f64 / n as f64);
    let centre_of_mass = [mean_x + 0.5, mean_y + 0.5];
    result.found = Some(Found2d {
        centre_of_mass,
        max_voxel,
        max_count: max,
        n_voxels: n,
        total_count: total,
        // DLS tags wells with the y mean of the transposed grid, without the +0.5.
        sample_id: wells.tag(sample_id, mean_y),
        centre_x: snapshot.offset_x_px + centre_of_mass[0] * box_size_px[0],
        centre_y: snapshot.offset_y_px + centre_of_mass[1] * box_size_px[1],
        best_image,
        best_region,
    });
    Ok(result)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::grid::Orientation;

    const SNAP: Snapshot = Snapshot {
        dx_mm: 0.01,
        dy_mm: 0.01,
        microns_per_pixel_x: 1.0,
        microns_per_pixel_y: 1.0,
        offset_x_px: 0.0,
        offset_y_px: 0.0,
    };

    #[test]
    fn global_max_outside_region_and_tie_to_first() {
        // The spec vector "global-max-outside-region".
        let scan = Scan::new(4, 3, false, Orientation::Horizontal).unwrap();
        let counts = [9, 0, 5, 5, 0, 0, 0, 0, 0, 0, 5, 5];
        let r = centre_2d(&counts, &scan, &SNAP, Some(7), &Wells::default()).unwrap();
        let f = r.found.unwrap();
        assert_eq!(f.centre_of_mass, [3.0, 0.5]);
        assert_eq!(f.max_voxel, [2, 0]);
        assert_eq!(f.max_count, 9);
        assert_eq!(f.total_count, 10);
        assert_eq!(f.best_region, vec![[0, 2], [0, 3]]);
        assert_eq!((f.centre_x, f.centre_y), (30.0, 5.0));
        assert_eq!(r.box_size_px, [10.0, 10.0]);
    }

    #[test]
    fn blank_grid_fails_with_geometry_kept() {
        let scan = Scan::new(2, 2, true, Orientation::Vertical).unwrap();
        let r = centre_2d(&[0; 4], &scan, &SNAP, Some(1), &Wells::default()).unwrap();
        assert!(r.found.is_none());
        assert_eq!(r.steps, [2, 2]);
    }

    #[test]
    fn bad_geometry_and_counts_are_named() {
        let scan = Scan::new(2, 1, false, Orientation::Horizontal).unwrap();
        let snap = Snapshot {
            microns_per_pixel_x: 0.0,
            ..SNAP
        };
        let e = centre_2d(&[1, 1], &scan, &snap, None, &Wells::default()).unwrap_err();
        assert!(e.0.contains("micronsPerPixelX"), "{e}");
        let e = centre_2d(&[1, -2], &scan, &SNAP, None, &Wells::default()).unwrap_err();
        assert_eq!(e.0, "counts: negative count -2 at image 2");
        assert!(centre_2d(&[1], &scan, &SNAP, None, &Wells::default()).is_err());
    }
}
