//! Grids of per-image counts: acquisition order to the `A[x][y]` layout.
//!
//! See `docs/algorithm.md`, "Inputs". A grid is stored row-major as `data[x * ny + y]`.

use crate::error::{InputError, Result};

/// The direction of the fast axis of a grid scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Orientation {
    /// Lines run along x; the line number is y.
    Horizontal,
    /// Lines run along y; the line number is x.
    Vertical,
}

impl Orientation {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "horizontal" => Ok(Orientation::Horizontal),
            "vertical" => Ok(Orientation::Vertical),
            other => Err(InputError::new(format!(
                "orientation: expected \"horizontal\" or \"vertical\", got {other:?}"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Orientation::Horizontal => "horizontal",
            Orientation::Vertical => "vertical",
        }
    }
}

/// How the images of a grid scan were taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scan {
    pub steps_x: usize,
    pub steps_y: usize,
    pub snaked: bool,
    pub orientation: Orientation,
}

impl Scan {
    pub fn new(
        steps_x: usize,
        steps_y: usize,
        snaked: bool,
        orientation: Orientation,
    ) -> Result<Self> {
        if steps_x == 0 || steps_y == 0 {
            return Err(InputError::new(format!(
                "empty grid: steps_x={steps_x}, steps_y={steps_y}; both must be at least 1"
            )));
        }
        if steps_x
            .checked_mul(steps_y)
            .is_none_or(|n| n > u32::MAX as usize)
        {
            return Err(InputError::new(format!(
                "grid too large: {steps_x} x {steps_y} images"
            )));
        }
        Ok(Scan {
            steps_x,
            steps_y,
            snaked,
            orientation,
        })
    }

    pub fn image_count(&self) -> usize {
        self.steps_x * self.steps_y
    }

    /// The grid cell `(x, y)` of the 0-based acquisition index `i`.
    pub fn cell(&self, i: usize) -> (usize, usize) {
        match self.orientation {
            Orientation::Horizontal => {
                let (line, k) = (i / self.steps_x, i % self.steps_x);
                let x = if self.snaked && line % 2 == 1 {
                    self.steps_x - 1 - k
                } else {
                    k
                };
                (x, line)
            }
            Orientation::Vertical => {
                let (line, k) = (i / self.steps_y, i % self.steps_y);
                let y = if self.snaked && line % 2 == 1 {
                    self.steps_y - 1 - k
                } else {
                    k
                };
                (line, y)
            }
        }
    }

    /// Lay out counts given in acquisition order as `A[x][y]`.
    pub fn reshape<T: Copy + Default>(&self, counts: &[T]) -> Result<Grid<T>> {
        if counts.len() != self.image_count() {
            return Err(InputError::new(format!(
                "counts: expected {} values for a {} x {} grid, got {}",
                self.image_count(),
                self.steps_x,
                self.steps_y,
                counts.len()
            )));
        }
        let mut data = vec![T::default(); counts.len()];
        for (i, &c) in counts.iter().enumerate() {
            let (x, y) = self.cell(i);
            data[x * self.steps_y + y] = c;
        }
        Ok(Grid {
            nx: self.steps_x,
            ny: self.steps_y,
            data,
        })
    }
}

/// A two-dimensional grid `A[x][j]`, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grid<T> {
    pub nx: usize,
    pub ny: usize,
    pub data: Vec<T>,
}

impl<T: Copy> Grid<T> {
    pub fn new(nx: usize, ny: usize, data: Vec<T>) -> Result<Self> {
        if nx == 0 || ny == 0 {
            return Err(InputError::new(format!("empty grid: shape ({nx}, {ny})")));
        }
        if nx.checked_mul(ny) != Some(data.len()) {
            return Err(InputError::new(format!(
                "grid of shape ({nx}, {ny}) needs {} values, got {}",
                nx.saturating_mul(ny),
                data.len()
            )));
        }
        Ok(Grid { nx, ny, data })
    }

    #[inline]
    pub fn row(&self, x: usize) -> &[T] {
        &self.data[x * self.ny..(x + 1) * self.ny]
    }

    #[inline]
    pub fn get(&self, x: usize, y: usize) -> T {
        self.data[x * self.ny + y]
    }
}

impl Grid<i64> {
    /// Counts are spot counts: never negative. `name` says which grid in the error.
    pub fn check_counts(&self, name: &str) -> Result<()> {
        match self.data.iter().position(|&c| c < 0) {
            None => Ok(()),
            Some(i) => Err(InputError::new(format!(
                "{name}: negative count {} at [{}, {}]",
                self.data[i],
                i / self.ny,
                i % self.ny
            ))),
        }
    }

    pub fn max(&self) -> i64 {
        self.data.iter().copied().max().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(sx: usize, sy: usize, snaked: bool, o: Orientation) -> Scan {
        Scan::new(sx, sy, snaked, o).unwrap()
    }

    #[test]
    fn horizontal_unsnaked_fills_rows_of_x() {
        let g = scan(3, 2, false, Orientation::Horizontal)
            .reshape(&[0, 1, 2, 3, 4, 5])
            .unwrap();
        // A[x][y] = i where i = y*3 + x
        assert_eq!(g.data, vec![0, 3, 1, 4, 2, 5]);
    }

    #[test]
    fn horizontal_snaked_reverses_odd_lines() {
        let s = scan(3, 2, true, Orientation::Horizontal);
        assert_eq!(s.cell(3), (2, 1));
        assert_eq!(s.cell(5), (0, 1));
        let g = s.reshape(&[0, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(g.data, vec![0, 5, 1, 4, 2, 3]);
    }

    #[test]
    fn vertical_snaked_reverses_odd_columns() {
        let s = scan(2, 3, true, Orientation::Vertical);
        assert_eq!(s.cell(0), (0, 0));
        assert_eq!(s.cell(3), (1, 2));
        assert_eq!(s.cell(5), (1, 0));
        let g = s.reshape(&[0, 1, 2, 3, 4, 5]).unwrap();
        assert_eq!(g.data, vec![0, 1, 2, 5, 4, 3]);
    }

    #[test]
    fn wrong_length_and_empty_are_errors() {
        let e = scan(3, 2, false, Orientation::Horizontal)
            .reshape(&[1i64; 5])
            .unwrap_err();
        assert!(e.0.contains("expected 6 values"), "{e}");
        assert!(Scan::new(0, 3, false, Orientation::Vertical).is_err());
        assert!(Orientation::parse("diagonal")
            .unwrap_err()
            .0
            .contains("diagonal"));
    }

    #[test]
    fn negative_counts_are_named() {
        let g = Grid::new(2, 2, vec![0i64, 1, -4, 2]).unwrap();
        let e = g.check_counts("xy").unwrap_err();
        assert_eq!(e.0, "xy: negative count -4 at [1, 0]");
    }
}
