//! zocalo-xrc core: X-ray centring over grid scans, exactly as Diamond's Zocalo
//! service computes it (`docs/algorithm.md`), with no Python in sight.
//! Spot finding (DIALS's dispersion rule, 4-connected spots, bitshuffle-LZ4
//! frames) is here too: `strong`, `spots`, `bslz4`, `finder`.
//! The PyO3 bindings live in one module behind the `python` feature.

pub mod bslz4;
pub mod centre2d;
pub mod centre3d;
pub mod error;
pub mod finder;
pub mod grid;
pub mod json;
pub mod label;
pub mod pia;
pub mod pyrepr;
pub mod spots;
pub mod strong;
pub mod wells;
pub mod wire;

#[cfg(feature = "python")]
mod python;

pub use centre2d::{centre_2d, Found2d, Snapshot, Xrc2d};
pub use centre3d::{centre_3d, Params, Xrc3d};
pub use error::InputError;
pub use grid::{Grid, Orientation, Scan};
pub use wells::{well_limits, Wells};
