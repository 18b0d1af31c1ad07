//! zocalo-xrc core: X-ray centring over grid scans, exactly as Diamond's Zocalo
//! service computes it (`docs/algorithm.md`), with no Python in sight.
//! The PyO3 bindings live in one module behind the `python` feature.

pub mod centre2d;
pub mod centre3d;
pub mod error;
pub mod grid;
pub mod json;
pub mod label;
pub mod pia;
pub mod pyrepr;
pub mod wells;
pub mod wire;

#[cfg(feature = "python")]
mod python;

pub use centre2d::{centre_2d, Found2d, Snapshot, Xrc2d};
pub use centre3d::{centre_3d, Params, Xrc3d};
pub use error::InputError;
pub use grid::{Grid, Orientation, Scan};
pub use wells::{well_limits, Wells};
