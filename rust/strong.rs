//! Strong pixels: DIALS's dispersion threshold, pixel for pixel.
//!
//! The rule is DIALS's `DispersionThreshold` (and `DispersionExtendedThreshold`,
//! `dials/algorithms/image/threshold/local.h`): over the box of
//! `(2k+1) x (2k+1)` pixels around a pixel, clipped at the frame's edges, `m`
//! counts the *valid* pixels below 2^24, `x` sums them and `y` sums their
//! squares; the decision is made in double precision in DIALS's own order of
//! operations. DIALS builds summed-area tables of the whole frame (24 bytes a
//! pixel, sums rounded once they pass 2^53); here the box sums are kept per
//! column over a window of rows and slid along each row, exactly (integers for
//! integer frames), so the extra memory is a few rows, not the frame.
//!
//! Most pixels are decided by `m*v - x > sigma_strong * sqrt(x*m)` alone, which
//! needs only `m` and `x`; the sum of squares is taken over the box only for
//! the few that pass it (work sized to the answer).

use std::ops::{Add, Sub};

use crate::error::{InputError, Result};

/// Pixel values at or above this are left out of the box sums (DIALS's `BIG`).
pub const BIG: f64 = 16_777_216.0;

/// The kind of number a frame holds, as the rule needs to see it.
pub trait Pixel: Copy + PartialOrd + Send + Sync + 'static {
    /// A sum of values over a box: exact for integer frames.
    type X: Acc;
    /// A sum of squares over a box.
    type Y: Acc;
    /// numpy's name for it, for messages.
    const DTYPE: &'static str;
    const ZERO: Self;
    const MAX: Self;
    /// The largest value below 2^24 (the box sums take values up to it).
    const BELOW_BIG: Self;
    fn f64(self) -> f64;
    fn x(self) -> Self::X;
    fn y(self) -> Self::Y;
    /// The largest value not above `t`, or None when every value is.
    fn at_most(t: f64) -> Option<Self>;
    fn is_nan(self) -> bool {
        false
    }
    /// Integer pixels take the fast path (exact `u32` box sums, an `f32` filter).
    const INTEGER: bool;
    /// A type with negative values (the fast path's AVX2 loads widen by sign).
    const SIGNED: bool = false;
    /// The value as `f32` (for the filter) and, for integers in the box, as `u32`.
    fn f32(self) -> f32;
    fn small(self) -> u32;
    /// The smallest value of this type above `t`: `v > t` iff `v >= above(t)`.
    fn above(t: f64) -> Option<Self>;
}

/// A running sum.
pub trait Acc: Copy + Default + Send + Sync + Add<Output = Self> + Sub<Output = Self> + 'static {
    fn f64(self) -> f64;
}

impl Acc for u64 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
}
impl Acc for f64 {
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
}

macro_rules! integer_pixel {
    ($t:ty, $name:literal, $below_big:expr) => {
        impl Pixel for $t {
            // u64: a box of more than 256 pixels below 2^24 sums past 2^32
            // (kernel_size 8 is 289; dispersion_extended's wider box at 6)
            type X = u64;
            type Y = u64;
            const DTYPE: &'static str = $name;
            const ZERO: Self = 0;
            const MAX: Self = <$t>::MAX;
            const BELOW_BIG: Self = $below_big;
            #[inline(always)]
            fn f64(self) -> f64 {
                self as f64
            }
            #[inline(always)]
            fn x(self) -> u64 {
                self as u64
            }
            #[inline(always)]
            fn y(self) -> u64 {
                (self as u64) * (self as u64)
            }
            const INTEGER: bool = true;
            const SIGNED: bool = <$t>::MIN != 0;
            #[inline(always)]
            fn f32(self) -> f32 {
                self as f32
            }
            #[inline(always)]
            fn small(self) -> u32 {
                self as u32
            }
            fn above(t: f64) -> Option<Self> {
                let next = t.floor() + 1.0;
                if next > <$t>::MAX as f64 {
                    None
                } else if next < <$t>::MIN as f64 {
                    Some(<$t>::MIN)
                } else {
                    Some(next as $t)
                }
            }
            fn at_most(t: f64) -> Option<Self> {
                if t < 0.0 {
                    None
                } else if t >= <$t>::MAX as f64 {
                    Some(<$t>::MAX)
                } else {
                    Some(t.floor() as $t)
                }
            }
        }
    };
}

integer_pixel!(u8, "uint8", u8::MAX);
integer_pixel!(u16, "uint16", u16::MAX);
integer_pixel!(i16, "int16", i16::MAX);
integer_pixel!(u32, "uint32", (1 << 24) - 1);
integer_pixel!(i32, "int32", (1 << 24) - 1);

impl Pixel for f32 {
    type X = f64;
    type Y = f64;
    const DTYPE: &'static str = "float32";
    const ZERO: Self = 0.0;
    const MAX: Self = f32::INFINITY;
    const BELOW_BIG: Self = 16_777_215.0; // the float below 2^24
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn x(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn y(self) -> f64 {
        (self as f64) * (self as f64)
    }
    fn at_most(t: f64) -> Option<Self> {
        let f = t as f32; // rounds to nearest: step down when that was up
        Some(if (f as f64) > t { f.next_down() } else { f })
    }
    fn is_nan(self) -> bool {
        self.is_nan()
    }
    const INTEGER: bool = false;
    fn f32(self) -> f32 {
        self as f32
    }
    fn small(self) -> u32 {
        0
    }
    fn above(_: f64) -> Option<Self> {
        None
    }
}

impl Pixel for f64 {
    type X = f64;
    type Y = f64;
    const DTYPE: &'static str = "float64";
    const ZERO: Self = 0.0;
    const MAX: Self = f64::INFINITY;
    const BELOW_BIG: Self = 16_777_216.0f64.next_down();
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn x(self) -> f64 {
        self
    }
    #[inline(always)]
    fn y(self) -> f64 {
        self * self
    }
    fn at_most(t: f64) -> Option<Self> {
        Some(t)
    }
    fn is_nan(self) -> bool {
        self.is_nan()
    }
    const INTEGER: bool = false;
    fn f32(self) -> f32 {
        self as f32
    }
    fn small(self) -> u32 {
        0
    }
    fn above(_: f64) -> Option<Self> {
        None
    }
}

/// Which of DIALS's dispersion rules.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algorithm {
    /// `dispersion`: what Diamond's per-image analysis runs.
    Dispersion,
    /// `dispersion_extended`: DIALS's default in `dials.find_spots`.
    DispersionExtended,
}

impl Algorithm {
    pub fn parse(name: &str) -> Result<Algorithm> {
        match name {
            "dispersion" => Ok(Algorithm::Dispersion),
            "dispersion_extended" => Ok(Algorithm::DispersionExtended),
            other => Err(InputError::new(format!(
                "algorithm must be \"dispersion\" or \"dispersion_extended\", not {:?}",
                crate::error::excerpt(other)
            ))),
        }
    }
}

/// The rule's parameters, checked.
#[derive(Clone, Debug, PartialEq)]
pub struct Rule {
    pub algorithm: Algorithm,
    /// Half sizes of the box: along a row (x) and down a column (y).
    pub kernel: (usize, usize),
    pub sigma_background: f64,
    pub sigma_strong: f64,
    pub global_threshold: f64,
    pub min_local: u32,
    /// None: DIALS's no-gain formulas (gain given, even 1, uses the others).
    pub gain: Option<f64>,
}

impl Default for Rule {
    fn default() -> Rule {
        Rule {
            algorithm: Algorithm::Dispersion,
            kernel: (3, 3),
            sigma_background: 6.0,
            sigma_strong: 3.0,
            global_threshold: 0.0,
            min_local: 2,
            gain: None,
        }
    }
}

impl Rule {
    /// The parameters as DIALS checks them, with messages that name the bad one.
    pub fn check(&self) -> Result<()> {
        let (kx, ky) = self.kernel;
        if kx == 0 || ky == 0 || kx > 100 || ky > 100 {
            return Err(InputError::new(format!("kernel_size must be 1..100 on each axis, not {:?}", (kx, ky))));
        }
        for (name, v) in [
            ("sigma_background", self.sigma_background),
            ("sigma_strong", self.sigma_strong),
            ("global_threshold", self.global_threshold),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(InputError::new(format!("{name} must be a finite number >= 0, not {v}")));
            }
        }
        let boxed = (2 * kx + 1) * (2 * ky + 1);
        if self.min_local < 2 || self.min_local as usize > boxed {
            return Err(InputError::new(format!(
                "min_local must be 2..{boxed} (the pixels of a {}x{} box), not {}",
                2 * kx + 1,
                2 * ky + 1,
                self.min_local
            )));
        }
        if let Some(g) = self.gain {
            if !(g.is_finite() && g > 0.0) {
                return Err(InputError::new(format!("gain must be a finite number > 0, not {g}")));
            }
        }
        Ok(())
    }

    /// DIALS's decision for a pixel of value `v` whose box holds `m`, `x`, `y`
    /// (valid, `m >= min_local`, `x >= 0`, `v > global_threshold` already known).
    #[inline]
    fn dispersion_and_signal(&self, m: f64, x: f64, y: f64, v: f64) -> bool {
        self.dispersion(m, x, y) && {
            let b = m * v - x;
            let d = match self.gain {
                None => self.sigma_strong * (x * m).sqrt(),
                Some(g) => self.sigma_strong * (g * x * m).sqrt(),
            };
            b > d
        }
    }

    /// DIALS's index-of-dispersion test alone.
    #[inline]
    fn dispersion(&self, m: f64, x: f64, y: f64) -> bool {
        match self.gain {
            None => {
                let a = m * y - x * x - x * (m - 1.0);
                let c = x * self.sigma_background * (2.0 * (m - 1.0)).sqrt();
                a > c
            }
            Some(g) => {
                let a = m * y - x * x;
                let c = g * x * (m - 1.0 + self.sigma_background * (2.0 * (m - 1.0)).sqrt());
                a > c
            }
        }
    }
}

/// A frame: `height` rows of `width` pixels, row after row.
#[derive(Clone, Copy, Debug)]
pub struct Frame<'a, T> {
    pub data: &'a [T],
    pub height: usize,
    pub width: usize,
}

impl<'a, T: Pixel> Frame<'a, T> {
    pub fn new(data: &'a [T], height: usize, width: usize) -> Result<Self> {
        if height == 0 || width == 0 {
            return Err(InputError::new(format!("an empty image ({height} x {width} pixels)")));
        }
        if height.checked_mul(width) != Some(data.len()) {
            return Err(InputError::new(format!(
                "an image of {height} x {width} pixels needs {} values, not {}",
                height.saturating_mul(width),
                data.len()
            )));
        }
        if data.len() > u32::MAX as usize {
            return Err(InputError::new(format!("an image of {} pixels is more than 2^32", data.len())));
        }
        if let Some(at) = data.iter().position(|v| v.is_nan()) {
            return Err(InputError::new(format!(
                "the image holds NaN at row {}, column {}",
                at / width,
                at % width
            )));
        }
        Ok(Frame { data, height, width })
    }

    #[inline(always)]
    fn row(&self, r: usize) -> &'a [T] {
        &self.data[r * self.width..(r + 1) * self.width]
    }
}

/// The rows of a frame as the fast path reads them: all in memory (an
/// array), or made as the window of rows reaches them (a chunk decoded into
/// a ring of rows, the frame never whole in memory).
pub trait Rows<T> {
    fn height(&self) -> usize;
    fn width(&self) -> usize;
    /// Make the rows up to `r` readable; those more than a window's height
    /// (`2ky + 1` rows) before it may go.
    fn reach(&mut self, r: usize) -> Result<()>;
    /// Row `r`, reached and not gone.
    fn row(&self, r: usize) -> &[T];
    /// Whether rows not reached yet are in memory already (worth a prefetch).
    fn resident(&self) -> bool {
        false
    }
}

impl<T: Pixel> Rows<T> for Frame<'_, T> {
    fn height(&self) -> usize {
        self.height
    }
    fn width(&self) -> usize {
        self.width
    }
    fn reach(&mut self, _: usize) -> Result<()> {
        Ok(())
    }
    #[inline(always)]
    fn row(&self, r: usize) -> &[T] {
        Frame::row(self, r)
    }
    fn resident(&self) -> bool {
        true
    }
}

/// Which pixels count, for one frame type: the mask, and the values a valid
/// pixel may hold (0 up to the trusted maximum) and those the box sums take.
#[derive(Clone, Copy)]
pub struct Valid<'a, T> {
    /// True = good; None = all good. Same length as the frame.
    mask: Option<&'a [bool]>,
    /// Valid values are `0..=valid_max`; None: nothing is valid.
    valid_max: Option<T>,
    /// Values the box sums take are `0..=box_max` (below 2^24 too).
    box_max: Option<T>,
}

impl<'a, T: Pixel> Valid<'a, T> {
    pub fn new(mask: Option<&'a [bool]>, trusted_max: Option<f64>) -> Self {
        let valid_max = match trusted_max {
            None => Some(T::MAX),
            Some(t) => T::at_most(t),
        };
        let box_max = valid_max.map(|v| if v < T::BELOW_BIG { v } else { T::BELOW_BIG });
        Valid { mask, valid_max, box_max }
    }

    #[inline(always)]
    fn valid(&self, v: T, good: bool) -> bool {
        match self.valid_max {
            Some(max) => good && v >= T::ZERO && v <= max,
            None => false,
        }
    }

    #[inline(always)]
    fn in_box(&self, v: T, good: bool) -> bool {
        match self.box_max {
            Some(max) => good && v >= T::ZERO && v <= max,
            None => false,
        }
    }
}

/// The strong pixels of a frame, in raster order: flat index `row * width + column`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Strong {
    pub index: Vec<u32>,
    pub value: Vec<f64>,
}

impl Strong {
    pub fn len(&self) -> usize {
        self.index.len()
    }
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }
    fn push(&mut self, at: usize, v: f64) {
        self.index.push(at as u32);
        self.value.push(v);
    }
}

/// A count and a sum over a box.
#[derive(Clone, Copy, Default)]
struct Mx<X> {
    m: u32,
    x: X,
}
impl<X: Acc> Add for Mx<X> {
    type Output = Self;
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Mx { m: self.m + o.m, x: self.x + o.x }
    }
}
impl<X: Acc> Sub for Mx<X> {
    type Output = Self;
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Mx { m: self.m - o.m, x: self.x - o.x }
    }
}

/// A count, a sum and a sum of squares over a box.
#[derive(Clone, Copy, Default)]
struct Mxy<X, Y> {
    m: u32,
    x: X,
    y: Y,
}
impl<X: Acc, Y: Acc> Add for Mxy<X, Y> {
    type Output = Self;
    #[inline(always)]
    fn add(self, o: Self) -> Self {
        Mxy { m: self.m + o.m, x: self.x + o.x, y: self.y + o.y }
    }
}
impl<X: Acc, Y: Acc> Sub for Mxy<X, Y> {
    type Output = Self;
    #[inline(always)]
    fn sub(self, o: Self) -> Self {
        Mxy { m: self.m - o.m, x: self.x - o.x, y: self.y - o.y }
    }
}

/// Sums of `term(row, column)` over the box of half sizes `(kx, ky)` around
/// every pixel, clipped at the edges, handed to `each(row, sums)` row by row.
/// Column sums over the window of rows are kept and slid along the row: each
/// pixel's term is taken twice (entering and leaving the window), the memory
/// is two rows of sums.
fn box_rows<A, F, G>(height: usize, width: usize, (kx, ky): (usize, usize), term: F, mut each: G)
where
    A: Copy + Default + Add<Output = A> + Sub<Output = A>,
    F: Fn(usize, usize) -> A,
    G: FnMut(usize, &[A]),
{
    let mut column = vec![A::default(); width];
    let mut sums = vec![A::default(); width];
    for r in 0..ky.min(height) {
        for (c, s) in column.iter_mut().enumerate() {
            *s = *s + term(r, c);
        }
    }
    for r in 0..height {
        if r + ky < height {
            for (c, s) in column.iter_mut().enumerate() {
                *s = *s + term(r + ky, c);
            }
        }
        if r > ky {
            for (c, s) in column.iter_mut().enumerate() {
                *s = *s - term(r - ky - 1, c);
            }
        }
        slide(&column, kx, &mut sums);
        each(r, &sums);
    }
}

/// `sums[c]` = the sum of `column[c-k ..= c+k]`, clipped.
#[inline]
fn slide<A: Copy + Default + Add<Output = A> + Sub<Output = A>>(column: &[A], k: usize, sums: &mut [A]) {
    let w = column.len();
    let mut s = A::default();
    for &v in &column[..k.min(w)] {
        s = s + v;
    }
    for c in 0..w {
        if c + k < w {
            s = s + column[c + k];
        }
        if c > k {
            s = s - column[c - k - 1];
        }
        sums[c] = s;
    }
}

/// The strong pixels of a frame by `rule`, appended to `out`.
pub fn strong_pixels<T: Pixel>(frame: &Frame<T>, valid: &Valid<T>, rule: &Rule, out: &mut Strong) -> Result<()> {
    if let Some(mask) = valid.mask {
        if mask.len() != frame.data.len() {
            return Err(InputError::new(format!(
                "the mask has {} pixels and the image {}",
                mask.len(),
                frame.data.len()
            )));
        }
    }
    rule.check()?;
    match rule.algorithm {
        _ if fast_path::<T>(rule) => fast::dispersion(&mut frame.clone(), valid, rule, out)?,
        Algorithm::Dispersion => dispersion(frame, valid, rule, out),
        Algorithm::DispersionExtended => dispersion_extended(frame, valid, rule, out),
    }
    Ok(())
}

/// Whether `rule` on frames of `T` takes the fast path (which reads the
/// frame row by row, so [`strong_pixels_of_rows`] can take its rows).
pub fn fast_path<T: Pixel>(rule: &Rule) -> bool {
    rule.algorithm == Algorithm::Dispersion && T::INTEGER && (2 * rule.kernel.0 + 1) * (2 * rule.kernel.1 + 1) <= fast::MAX_BOX
}

/// [`strong_pixels`] of rows made as they are reached, where
/// [`fast_path`] holds; `mask` as in [`strong_pixels`].
pub fn strong_pixels_of_rows<T: Pixel, R: Rows<T> + ?Sized>(frame: &mut R, valid: &Valid<T>, rule: &Rule, out: &mut Strong) -> Result<()> {
    if let Some(mask) = valid.mask {
        if mask.len() != frame.height() * frame.width() {
            return Err(InputError::new(format!(
                "the mask has {} pixels and the image {}",
                mask.len(),
                frame.height() * frame.width()
            )));
        }
    }
    rule.check()?;
    assert!(fast_path::<T>(rule), "rows are read by the fast path only");
    fast::dispersion(frame, valid, rule, out)
}

#[inline(always)]
fn good(mask: Option<&[bool]>, at: usize) -> bool {
    match mask {
        Some(m) => m[at],
        None => true,
    }
}

/// The sums of values and of squares over the box around `(r, c)`, taken
/// pixel by pixel: only for the few pixels a filter let through.
fn box_xy<T: Pixel, R: Rows<T> + ?Sized>(frame: &R, valid: &Valid<T>, (kx, ky): (usize, usize), r: usize, c: usize) -> (T::X, T::Y) {
    let (r0, r1) = (r.saturating_sub(ky), (r + ky).min(frame.height() - 1));
    let (c0, c1) = (c.saturating_sub(kx), (c + kx).min(frame.width() - 1));
    let w = frame.width();
    let (mut x, mut y) = (T::X::default(), T::Y::default());
    for rr in r0..=r1 {
        let values = &frame.row(rr)[c0..=c1];
        for (i, &v) in values.iter().enumerate() {
            if valid.in_box(v, good(valid.mask, rr * w + c0 + i)) {
                x = x + v.x();
                y = y + v.y();
            }
        }
    }
    (x, y)
}

fn dispersion<T: Pixel>(frame: &Frame<T>, valid: &Valid<T>, rule: &Rule, out: &mut Strong) {
    let (h, w) = (frame.height, frame.width);
    let mask = valid.mask;
    let zero_x = T::X::default();
    let term = |r: usize, c: usize| {
        let at = r * w + c;
        let v = frame.data[at];
        if valid.in_box(v, good(mask, at)) {
            Mx { m: 1, x: v.x() }
        } else {
            Mx { m: 0, x: zero_x }
        }
    };
    let threshold = rule.global_threshold;
    let min_local = rule.min_local;
    // b > d, squared, with a margin far wider than the rounding of d: a pixel
    // this rejects DIALS rejects too; those it lets through are decided exactly.
    let s2 = rule.sigma_strong * rule.sigma_strong * rule.gain.unwrap_or(1.0) * (1.0 - 1e-9);
    box_rows(h, w, rule.kernel, term, |r, sums| {
        let row = frame.row(r);
        for (c, (&v, s)) in row.iter().zip(sums).enumerate() {
            let vf = v.f64();
            if !(vf > threshold) || s.m < min_local {
                continue;
            }
            let (m, x) = (s.m as f64, s.x.f64());
            let b = m * vf - x;
            if !(b > 0.0 && b * b > s2 * x * m && x >= 0.0) {
                continue;
            }
            let at = r * w + c;
            if !valid.valid(v, good(mask, at)) {
                continue;
            }
            let y = box_xy(frame, valid, rule.kernel, r, c).1.f64();
            if rule.dispersion_and_signal(m, x, y, vf) {
                out.push(at, vf);
            }
        }
    });
}

/// Integer frames, boxes of at most 63 pixels (7x7 is DIALS's): packed `u32` sums.
///
/// Row by row, in two passes over the row:
/// 1. the window of rows moves down one: the row entering has its terms
///    (packed `x`, `m`, big pixels; `y` of the small pixels) computed once
///    and kept in a ring of the `2ky+1` rows of the window, the row leaving
///    has its terms there, and the column sums take the difference;
/// 2. eight columns at a time, the box sums are the column sums added across
///    `2kx+1` columns, and two sieves in `f32` keep the pixels that may pass
///    DIALS's two tests (the second, with the sums of squares, only for a
///    group where one passed the first). Their bounds are wider than their
///    rounding: every pixel DIALS's rule takes passes them; the few that
///    pass are decided exactly.
///
/// Both passes are AVX2 intrinsics where the CPU has it (the plain code
/// otherwise, and for the last columns of a row). The rows come from a
/// [`Rows`]: a frame in memory, or a chunk decoded as the window reaches it.
///
/// Memory: the ring (`5 (2ky+1)` bytes a column) and two rows of column sums.
mod fast {
    use super::*;

    /// Pixels of at most this value are "small": their sums fit the packed
    /// column sums below (63 * 4095 < 2^18, 63 * 4095^2 < 2^30); a box with
    /// a bigger one is decided exactly.
    const SMALL: u32 = 4095;
    /// The most pixels a box may have for the packing (63 * 4095 < 2^18).
    pub(super) const MAX_BOX: usize = 63;
    /// One `u32` per column holds `x` of the small pixels (bits 0-17), `m`
    /// (bits 18-23) and the count of big pixels (bits 24-29).
    const M_ONE: u32 = 1 << 18;
    const BIG_ONE: u32 = 1 << 24;
    const X_BITS: u32 = M_ONE - 1;
    /// Columns the filter takes at a time.
    const BLOCK: usize = 64;
    /// Zero column sums either side of the row beyond the box's reach, so
    /// that vectors of sixteen may be read whole (and aligned) past its ends.
    const SPARE: usize = 16;

    /// Zeroed `u32`s of which element `at` starts a 64-byte line, with
    /// at least `front` of them before it: a vector stored there, or read,
    /// stays in one cache line.
    struct Aligned {
        v: Vec<u32>,
        at: usize,
    }

    impl Aligned {
        fn new(front: usize, len: usize, back: usize) -> Aligned {
            let v = vec![0u32; front + len + back + 15];
            let past = (v.as_ptr() as usize / 4 + front) % 16; // elements past a line's start
            Aligned { at: front + (16 - past) % 16, v }
        }

        /// The elements from `before` ahead of the aligned one on.
        fn from(&self, before: usize) -> &[u32] {
            &self.v[self.at - before..]
        }

        fn from_mut(&mut self, before: usize) -> &mut [u32] {
            &mut self.v[self.at - before..]
        }
    }

    type Row<'a, T> = Option<(&'a [T], &'a [bool])>;

    /// A pixel's terms: packed (`x` if small, 1 in `m`, 1 in big if big) and
    /// its square if small; zeros for a pixel outside the box sums.
    #[inline(always)]
    fn term<T: Pixel>(v: T, g: bool, max: T) -> (u32, u32) {
        let a = g & (v >= T::ZERO) & (v <= max);
        let x = if a { v.small() } else { 0 };
        let big = x > SMALL;
        let small = if big { 0 } else { x } & SMALL;
        let packed = small | if a { M_ONE } else { 0 } | if big { BIG_ONE } else { 0 };
        (packed, small * small)
    }

    /// The largest level: a pixel's value as the filter sees it.
    const LEVEL_MAX: u8 = 255;

    /// A pixel's level: 0 when it cannot be strong (masked, not valid, not
    /// above the threshold), else its value up to `LEVEL_MAX` (at which it
    /// is decided exactly). Every pixel that may be strong is at least 1:
    /// `above >= 1` for integer pixels, the threshold being >= 0.
    #[inline(always)]
    fn level<T: Pixel>(v: T, g: bool, above: T, valid_max: T) -> u8 {
        if g & (v >= above) & (v <= valid_max) {
            v.small().min(LEVEL_MAX as u32) as u8
        } else {
            0
        }
    }

    /// The window of rows: the packed terms of its rows (row `e` in slot
    /// `e % rows`, each slot starting a cache line; a pixel's square is that
    /// of its low bits) and their levels, and the sums of the terms down each
    /// column (column 0 starting a cache line), with zero columns either side.
    struct Window {
        rows: usize,
        kx: usize,
        /// The frame's width, and the slots' (a whole number of lines).
        w: usize,
        stride: usize,
        ring_p: Aligned,
        ring_level: Vec<u8>,
        col_p: Aligned,
        col_y: Aligned,
    }

    impl Window {
        fn new(w: usize, (kx, ky): (usize, usize)) -> Window {
            let (rows, stride, spare) = (2 * ky + 1, w.div_ceil(16) * 16, kx.max(SPARE));
            Window {
                rows,
                kx,
                w,
                stride,
                ring_p: Aligned::new(0, rows * stride, 0),
                ring_level: vec![0; rows * w],
                col_p: Aligned::new(spare, w, spare + SPARE),
                col_y: Aligned::new(spare, w, spare + SPARE),
            }
        }

        /// The slot of row `e`: its packed terms and its levels.
        #[inline(always)]
        fn slot(&mut self, e: usize) -> (&mut [u32], &mut [u8]) {
            let (w, slot) = (self.w, e % self.rows);
            (&mut self.ring_p.from_mut(0)[slot * self.stride..][..w], &mut self.ring_level[slot * w..][..w])
        }

        /// For the SIMD passes: row `e`'s slot (its terms and levels) and the
        /// column sums from column 0, `w` of each.
        #[inline(always)]
        fn raw(&mut self, e: usize) -> (*mut u32, *mut u8, *mut u32, *mut u32) {
            let w = self.w;
            let (cp, cy) = (self.col_p.from_mut(0)[..w].as_mut_ptr(), self.col_y.from_mut(0)[..w].as_mut_ptr());
            let (rp, rl) = self.slot(e);
            (rp.as_mut_ptr(), rl.as_mut_ptr(), cp, cy)
        }

        /// The column sums, from frame column `-before` on.
        fn cols(&self, before: usize) -> (&[u32], &[u32]) {
            (self.col_p.from(before), self.col_y.from(before))
        }

        /// Row `e` enters (None: past the frame's end) and row `e - rows`,
        /// whose terms are in the same slot, leaves.
        #[inline(always)]
        fn enter<T: Pixel>(&mut self, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
            self.enter_from(0, e, row, max, f)
        }

        /// [`Window::enter`] in AVX2, eight columns at a time, the last few
        /// as it does them.
        ///
        /// # Safety
        /// The CPU has AVX2.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2")]
        unsafe fn enter_avx2<T: Pixel>(&mut self, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
            use std::arch::x86_64::*;
            let Some((v, g)) = row else { return self.enter_from(0, e, row, max, f) };
            let w = self.w;
            assert!(v.len() >= w && g.len() >= w);
            let (rp, rl, cp, cy) = self.raw(e);
            let (vp, gp) = (v.as_ptr(), g.as_ptr() as *const u8);
            // values as u32 lanes: a negative one (widened by sign) is above
            // every valid one, as `v >= 0` asks
            let lanes = |c: usize| match std::mem::size_of::<T>() {
                4 => _mm256_loadu_si256(vp.add(c) as *const __m256i),
                2 if T::SIGNED => _mm256_cvtepi16_epi32(_mm_loadu_si128(vp.add(c) as *const __m128i)),
                2 => _mm256_cvtepu16_epi32(_mm_loadu_si128(vp.add(c) as *const __m128i)),
                _ => _mm256_cvtepu8_epi32(_mm_loadl_epi64(vp.add(c) as *const __m128i)),
            };
            let u = |t: T| _mm256_set1_epi32(t.small() as i32);
            let (box_max, valid_max, above) = (u(max), u(f.valid_max), u(f.above));
            let (small_max, top) = (_mm256_set1_epi32(SMALL as i32), _mm256_set1_epi32(LEVEL_MAX as i32));
            let (m_one, big_one) = (_mm256_set1_epi32(M_ONE as i32), _mm256_set1_epi32(BIG_ONE as i32));
            let at_most = |v: __m256i, max: __m256i| _mm256_cmpeq_epi32(_mm256_min_epu32(v, max), v);
            let mut c = 0;
            while c + 8 <= w {
                let v = lanes(c);
                let good = _mm256_cmpgt_epi32(_mm256_cvtepu8_epi32(_mm_loadl_epi64(gp.add(c) as *const __m128i)), _mm256_setzero_si256());
                // the terms: as `term`
                let in_box = _mm256_and_si256(good, at_most(v, box_max));
                let p = _mm256_and_si256(in_box, _mm256_or_si256(m_one, _mm256_blendv_epi8(big_one, v, at_most(v, small_max))));
                let x = _mm256_and_si256(p, small_max);
                let y = _mm256_madd_epi16(x, x); // x < 2^12: its low half squared
                let old = _mm256_loadu_si256(rp.add(c) as *const __m256i);
                let ox = _mm256_and_si256(old, small_max);
                let oy = _mm256_madd_epi16(ox, ox);
                let (cpc, cyc) = (cp.add(c) as *mut __m256i, cy.add(c) as *mut __m256i);
                _mm256_storeu_si256(cpc, _mm256_add_epi32(_mm256_loadu_si256(cpc), _mm256_sub_epi32(p, old)));
                _mm256_storeu_si256(cyc, _mm256_add_epi32(_mm256_loadu_si256(cyc), _mm256_sub_epi32(y, oy)));
                _mm256_storeu_si256(rp.add(c) as *mut __m256i, p);
                // the levels: as `level`
                let can = _mm256_and_si256(_mm256_and_si256(good, at_most(v, valid_max)), _mm256_cmpeq_epi32(_mm256_max_epu32(v, above), v));
                let level = _mm256_and_si256(can, _mm256_min_epu32(v, top));
                let bytes = _mm256_packus_epi16(_mm256_packus_epi32(level, level), _mm256_setzero_si256());
                let (lo, hi) = (_mm256_castsi256_si128(bytes), _mm256_extracti128_si256::<1>(bytes));
                let eight = (_mm_cvtsi128_si32(lo) as u32 as u64) | ((_mm_cvtsi128_si32(hi) as u32 as u64) << 32);
                std::ptr::write_unaligned(rl.add(c) as *mut u64, eight);
                c += 8;
            }
            self.enter_from(c, e, row, max, f)
        }

        /// [`Window::enter`] in AVX-512, sixteen columns at a time (the
        /// tests in masks), the last few as it does them.
        ///
        /// # Safety
        /// The CPU has AVX-512 F, BW and VL.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn enter_avx512<T: Pixel>(&mut self, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
            use std::arch::x86_64::*;
            let Some((v, g)) = row else { return self.enter_from(0, e, row, max, f) };
            let w = self.w;
            assert!(v.len() >= w && g.len() >= w);
            let (rp, rl, cp, cy) = self.raw(e);
            let (vp, gp) = (v.as_ptr(), g.as_ptr() as *const u8);
            // values as u32 lanes, as enter_avx2 widens them
            let lanes = |c: usize| match std::mem::size_of::<T>() {
                4 => _mm512_loadu_si512(vp.add(c) as *const __m512i),
                2 if T::SIGNED => _mm512_cvtepi16_epi32(_mm256_loadu_si256(vp.add(c) as *const __m256i)),
                2 => _mm512_cvtepu16_epi32(_mm256_loadu_si256(vp.add(c) as *const __m256i)),
                _ => _mm512_cvtepu8_epi32(_mm_loadu_si128(vp.add(c) as *const __m128i)),
            };
            let u = |t: T| _mm512_set1_epi32(t.small() as i32);
            let (box_max, valid_max, above) = (u(max), u(f.valid_max), u(f.above));
            let (small_max, top) = (_mm512_set1_epi32(SMALL as i32), _mm512_set1_epi32(LEVEL_MAX as i32));
            let (m_one, big_one) = (_mm512_set1_epi32(M_ONE as i32), _mm512_set1_epi32(BIG_ONE as i32));
            let mut c = 0;
            while c + 16 <= w {
                let v = lanes(c);
                let gb = _mm_loadu_si128(gp.add(c) as *const __m128i);
                let good = _mm_test_epi8_mask(gb, gb);
                // the terms: as `term`
                let in_box = _mm512_mask_cmple_epu32_mask(good, v, box_max);
                let small = _mm512_cmple_epu32_mask(v, small_max);
                let p = _mm512_maskz_or_epi32(in_box, m_one, _mm512_mask_blend_epi32(small, big_one, v));
                let x = _mm512_and_si512(p, small_max);
                let y = _mm512_madd_epi16(x, x); // x < 2^12: its low half squared
                let old = _mm512_loadu_si512(rp.add(c) as *const __m512i);
                let ox = _mm512_and_si512(old, small_max);
                let oy = _mm512_madd_epi16(ox, ox);
                let (cpc, cyc) = (cp.add(c) as *mut __m512i, cy.add(c) as *mut __m512i);
                _mm512_storeu_si512(cpc, _mm512_add_epi32(_mm512_loadu_si512(cpc), _mm512_sub_epi32(p, old)));
                _mm512_storeu_si512(cyc, _mm512_add_epi32(_mm512_loadu_si512(cyc), _mm512_sub_epi32(y, oy)));
                _mm512_storeu_si512(rp.add(c) as *mut __m512i, p);
                // the levels: as `level`
                let can = _mm512_mask_cmpge_epu32_mask(_mm512_mask_cmple_epu32_mask(good, v, valid_max), v, above);
                let level = _mm512_maskz_min_epu32(can, v, top);
                _mm_storeu_si128(rl.add(c) as *mut __m128i, _mm512_cvtepi32_epi8(level));
                c += 16;
            }
            self.enter_from(c, e, row, max, f)
        }

        /// [`Window::enter`] of columns `from..`.
        #[inline(always)]
        fn enter_from<T: Pixel>(&mut self, from: usize, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
            let w = self.w;
            let (cp, cy) = (&mut self.col_p.from_mut(0)[..w], &mut self.col_y.from_mut(0)[..w]);
            let slot = e % self.rows;
            let rp = &mut self.ring_p.from_mut(0)[slot * self.stride..][..w];
            let rl = &mut self.ring_level[slot * w..][..w];
            match row {
                Some((v, g)) => {
                    let (v, g) = (&v[..w], &g[..w]);
                    for c in from..w {
                        let (p, y) = term(v[c], g[c], max);
                        let old = rp[c] & SMALL;
                        cp[c] = cp[c].wrapping_add(p).wrapping_sub(rp[c]);
                        cy[c] = cy[c].wrapping_add(y).wrapping_sub(old * old);
                        rp[c] = p;
                        rl[c] = level(v[c], g[c], f.above, f.valid_max);
                    }
                }
                None => {
                    for c in 0..w {
                        let old = rp[c] & SMALL;
                        cp[c] = cp[c].wrapping_sub(rp[c]);
                        cy[c] = cy[c].wrapping_sub(old * old);
                        rp[c] = 0;
                    }
                    rl.fill(0);
                }
            }
        }
    }

    impl Window {
        /// The levels of row `r` (entered, not left).
        fn levels(&self, r: usize, w: usize) -> &[u8] {
            let slot = (r % self.rows) * w;
            &self.ring_level[slot..slot + w]
        }
    }

    struct Filter<T> {
        above: T,
        valid_max: T,
        min_local: u32,
        gain: f32,
        /// sigma_strong^2 * gain, a little less
        s2: f32,
        /// 2 * (sigma_background * gain)^2, a little less
        b2: f32,
    }

    impl<T: Pixel> Filter<T> {
        /// May the pixel be strong? The first of two sieves, branch-free, in
        /// `f32`, with bounds wider than the rounding: a pixel DIALS's rule
        /// takes always passes both. This one needs only `m` and `x`, and
        /// lets through some 1.5% of a background of 0.5 counts a pixel.
        #[inline(always)]
        fn may_signal(&self, level: u8, packed: u32) -> bool {
            let (x, m, big) = (packed & X_BITS, (packed >> 18) & 63, packed >> 24);
            // a box with a big pixel, or a pixel at the top level, is decided exactly
            let exact = (big > 0) | (level == LEVEL_MAX);
            // all below 2^31 (signed conversions are one instruction); levels
            // below 255 and small pixels make m*v and x exact in f32
            let (mf, xf, vf) = ((m as i32) as f32, (x as i32) as f32, (level as i32) as f32);
            // the signal: b = m*v - x > sigma_strong * sqrt(g*x*m)
            let b = mf * vf - xf;
            let signal = (b > 0.0) & (b * b > self.s2 * xf * mf);
            (level > 0) & (m >= self.min_local) & (exact | signal)
        }

        /// The second sieve, for the pixels the first let through: may the
        /// box pass the dispersion test `m*y - x*x - g*x*(m-1) >
        /// g*x*sigma_b*sqrt(2*(m-1))`?
        #[inline(always)]
        fn may_disperse(&self, level: u8, packed: u32, ys: u32) -> bool {
            let (x, m, big) = (packed & X_BITS, (packed >> 18) & 63, packed >> 24);
            let exact = (big > 0) | (level == LEVEL_MAX);
            let (mf, xf, yf) = ((m as i32) as f32, (x as i32) as f32, (ys as i32) as f32);
            let (t1, t2, t3) = (mf * yf, xf * xf, self.gain * xf * (mf - 1.0));
            let a = (t1 - t2 - t3) + (t1 + t2 + t3) * 3e-7;
            exact | ((a > 0.0) & (a * a > self.b2 * t2 * (mf - 1.0)))
        }
    }

    /// The box sums of columns `c0..c0 + BLOCK` and the filter's flags for
    /// them (`n` of them at the row's end): `TAPS` columns across the box
    /// (0: `taps`, known at run time only).
    #[inline(always)]
    fn block<T: Pixel, const TAPS: usize>(
        f: &Filter<T>,
        win: &Window,
        taps: usize,
        levels: &[u8],
        c0: usize,
        n: usize,
        sums: &mut ([u32; BLOCK], [u32; BLOCK]),
        flags: &mut [u8; BLOCK],
    ) {
        let taps = if TAPS == 0 { taps } else { TAPS };
        let (bp, by) = sums;
        // column c of the frame is col[kx + c]: the box around it is col[c..c + taps]
        let (cp, cy) = win.cols(win.kx);
        let (cp, cy) = (&cp[c0..c0 + n + taps - 1], &cy[c0..c0 + n + taps - 1]);
        if n == BLOCK {
            let levels = &levels[c0..c0 + BLOCK];
            let cp = &cp[..BLOCK + taps - 1];
            for i in 0..BLOCK {
                let mut p = 0u32;
                for d in 0..taps {
                    p = p.wrapping_add(cp[i + d]);
                }
                bp[i] = p;
            }
            for i in 0..BLOCK {
                flags[i] = f.may_signal(levels[i], bp[i]) as u8;
            }
            // the sums of squares only where the first sieve let a pixel through
            for k in (0..BLOCK).step_by(8) {
                if u64::from_ne_bytes(flags[k..k + 8].try_into().expect("8 flags")) != 0 {
                    for i in k..k + 8 {
                        let y = (0..taps).fold(0u32, |s, d| s.wrapping_add(cy[i + d]));
                        by[i] = y;
                        flags[i] &= f.may_disperse(levels[i], bp[i], y) as u8;
                    }
                }
            }
        } else {
            for i in 0..n {
                let (mut p, mut y) = (0u32, 0u32);
                for d in 0..taps {
                    p = p.wrapping_add(cp[i + d]);
                    y = y.wrapping_add(cy[i + d]);
                }
                bp[i] = p;
                by[i] = y;
                flags[i] = (f.may_signal(levels[c0 + i], p) && f.may_disperse(levels[c0 + i], p, y)) as u8;
            }
            flags[n..].fill(0);
        }
    }

    /// A pixel that passed both sieves: its column, packed box sums and box
    /// sum of squares (of the small pixels), for the exact decision.
    type Candidate<'e> = &'e mut dyn FnMut(usize, u32, u32);

    /// The sieves over columns `from..` of a row, handing each pixel that
    /// passes them to `each`; `TAPS` as in [`block`].
    #[inline(always)]
    fn filter_row<T: Pixel, const TAPS: usize>(
        f: &Filter<T>,
        win: &Window,
        taps: usize,
        levels: &[u8],
        from: usize,
        next: Row<T>,
        each: Candidate,
    ) {
        let mut sums = ([0u32; BLOCK], [0u32; BLOCK]);
        let mut flags = [0u8; BLOCK];
        let w = levels.len();
        for c0 in (from..w).step_by(BLOCK) {
            prefetch(next, c0);
            block::<T, TAPS>(f, win, taps, levels, c0, BLOCK.min(w - c0), &mut sums, &mut flags);
            let any = flags.chunks_exact(8).fold(0u64, |a, e| a | u64::from_ne_bytes(e.try_into().expect("8 flags")));
            if any != 0 {
                for (i, _) in flags.iter().enumerate().filter(|(_, &b)| b != 0) {
                    each(c0 + i, sums.0[i], sums.1[i]);
                }
            }
        }
    }

    /// The sieves of [`Filter`] in AVX2, eight columns at a time, over as
    /// many whole groups of eight as the row has; returns where it stopped.
    /// The same `f32` operations in the same order as `may_signal` and
    /// `may_disperse` (no fused multiply-adds; `b*|b|` for `b > 0 & b*b`),
    /// so the same pixels pass, but for those of level 0 in a box decided
    /// exactly, which `each` leaves out. The sums of squares are taken only
    /// for a group where one passed the first sieve; the next row's lines
    /// are asked for once every `BLOCK` columns.
    ///
    /// # Safety
    /// The CPU has AVX2.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn sieve_avx2<T: Pixel, const TAPS: usize>(
        f: &Filter<T>,
        win: &Window,
        taps: usize,
        levels: &[u8],
        next: Row<T>,
        each: Candidate,
    ) -> usize {
        use std::arch::x86_64::*;
        let taps = if TAPS == 0 { taps } else { TAPS };
        let w = levels.len();
        // column c's box is col[c..c + taps], read 8 columns at a time
        let (cp, cy) = win.cols(win.kx);
        assert!(cp.len() >= w + taps - 1 && cy.len() >= w + taps - 1);
        let (cp, cy, lv) = (cp.as_ptr(), cy.as_ptr(), levels.as_ptr());
        let sum = |col: *const u32, c0: usize| {
            let mut s = _mm256_loadu_si256(col.add(c0) as *const __m256i);
            for d in 1..taps {
                s = _mm256_add_epi32(s, _mm256_loadu_si256(col.add(c0 + d) as *const __m256i));
            }
            s
        };
        let x_bits = _mm256_set1_epi32(X_BITS as i32);
        let m_bits = _mm256_set1_epi32(63);
        let no_big = _mm256_set1_epi32((BIG_ONE - 1) as i32);
        let below_min_local = _mm256_set1_epi32(f.min_local as i32 - 1);
        let top = _mm256_set1_epi32(LEVEL_MAX as i32);
        let (zero, one, abs) = (_mm256_setzero_ps(), _mm256_set1_ps(1.0), _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX)));
        let (s2, b2, gain, slack) = (_mm256_set1_ps(f.s2), _mm256_set1_ps(f.b2), _mm256_set1_ps(f.gain), _mm256_set1_ps(3e-7));
        let gt = |a: __m256, b: __m256| _mm256_cmp_ps::<_CMP_GT_OQ>(a, b);
        let mut c0 = 0;
        let whole = w - w % 8;
        while c0 < whole {
            prefetch(next, c0);
            let stop = (c0 + BLOCK).min(whole);
            while c0 < stop {
                let p = sum(cp, c0);
                let level = _mm256_cvtepu8_epi32(_mm_loadl_epi64(lv.add(c0) as *const __m128i));
                let m = _mm256_and_si256(_mm256_srli_epi32::<18>(p), m_bits);
                let (mf, xf, vf) = (_mm256_cvtepi32_ps(m), _mm256_cvtepi32_ps(_mm256_and_si256(p, x_bits)), _mm256_cvtepi32_ps(level));
                // may_signal: b > 0 and b*b > s2*x*m as b*|b| > s2*x*m (a level
                // of 0 has b = -x <= 0: never a signal)
                let b = _mm256_sub_ps(_mm256_mul_ps(mf, vf), xf);
                let signal = gt(_mm256_mul_ps(b, _mm256_and_ps(b, abs)), _mm256_mul_ps(_mm256_mul_ps(s2, xf), mf));
                // a box with a big pixel or a pixel at the top level is decided
                // exactly (`each` leaves out the pixels of level 0)
                let exact = _mm256_or_si256(_mm256_cmpgt_epi32(p, no_big), _mm256_cmpeq_epi32(level, top));
                let pass = _mm256_and_si256(_mm256_cmpgt_epi32(m, below_min_local), _mm256_or_si256(exact, _mm256_castps_si256(signal)));
                let mut hits = _mm256_movemask_ps(_mm256_castsi256_ps(pass)) as u32;
                if hits != 0 {
                    // may_disperse
                    let y = sum(cy, c0);
                    let yf = _mm256_cvtepi32_ps(y);
                    let m1 = _mm256_sub_ps(mf, one);
                    let (t1, t2, t3) = (_mm256_mul_ps(mf, yf), _mm256_mul_ps(xf, xf), _mm256_mul_ps(_mm256_mul_ps(gain, xf), m1));
                    let a = _mm256_add_ps(
                        _mm256_sub_ps(_mm256_sub_ps(t1, t2), t3),
                        _mm256_mul_ps(_mm256_add_ps(_mm256_add_ps(t1, t2), t3), slack),
                    );
                    let disperse = _mm256_and_ps(gt(a, zero), gt(_mm256_mul_ps(a, a), _mm256_mul_ps(_mm256_mul_ps(b2, t2), m1)));
                    hits &= _mm256_movemask_ps(_mm256_or_ps(_mm256_castsi256_ps(exact), disperse)) as u32;
                    let (mut ps, mut ys) = ([0u32; 8], [0u32; 8]);
                    _mm256_storeu_si256(ps.as_mut_ptr() as *mut __m256i, p);
                    _mm256_storeu_si256(ys.as_mut_ptr() as *mut __m256i, y);
                    while hits != 0 {
                        let i = hits.trailing_zeros() as usize;
                        each(c0 + i, ps[i], ys[i]);
                        hits &= hits - 1;
                    }
                }
                c0 += 8;
            }
        }
        c0
    }

    /// [`sieve_avx2`] in AVX-512, sixteen columns at a time, the tests in
    /// masks: the same `f32` operations in the same order, so the same pixels
    /// pass; returns where it stopped.
    ///
    /// # Safety
    /// The CPU has AVX-512 F, BW and VL.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn sieve_avx512<T: Pixel, const TAPS: usize>(
        f: &Filter<T>,
        win: &Window,
        taps: usize,
        levels: &[u8],
        next: Row<T>,
        each: Candidate,
    ) -> usize {
        use std::arch::x86_64::*;
        let taps = if TAPS == 0 { taps } else { TAPS };
        let w = levels.len();
        // the sums of columns c0 - 16.. from three aligned reads: a box's
        // columns are shifts of them across each other (a read at each offset
        // would cross a cache line), or for a box wider than 31 such reads
        let (kx, spare) = (taps / 2, (taps / 2).max(SPARE));
        let (cp, cy) = win.cols(spare);
        assert!(cp.len() >= w + 2 * spare && cy.len() >= w + 2 * spare);
        let (cp, cy, lv) = (cp.as_ptr(), cy.as_ptr(), levels.as_ptr());
        let sum = |col: *const u32, c0: usize| {
            // frame column c0 + at (at >= -spare)
            let read = |at: isize| _mm512_loadu_si512(col.add(c0 + spare).offset(at) as *const __m512i);
            let (a, b, c) = (read(-16), read(0), read(16));
            let mut s = b;
            if kx < 16 {
                // columns t either side: lanes 16 - t.. of a then b, and t.. of b then c
                macro_rules! either_side {
                    ($($t:literal)*) => {$(
                        if $t <= kx {
                            s = _mm512_add_epi32(s, _mm512_add_epi32(_mm512_alignr_epi32::<{ 16 - $t }>(b, a), _mm512_alignr_epi32::<$t>(c, b)));
                        }
                    )*};
                }
                either_side!(1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
            } else {
                for t in 1..=kx as isize {
                    s = _mm512_add_epi32(s, _mm512_add_epi32(read(-t), read(t)));
                }
            }
            s
        };
        let x_bits = _mm512_set1_epi32(X_BITS as i32);
        let m_bits = _mm512_set1_epi32(63);
        let no_big = _mm512_set1_epi32((BIG_ONE - 1) as i32);
        let below_min_local = _mm512_set1_epi32(f.min_local as i32 - 1);
        let top = _mm512_set1_epi32(LEVEL_MAX as i32);
        let (zero, one) = (_mm512_setzero_ps(), _mm512_set1_ps(1.0));
        let (s2, b2, gain, slack) = (_mm512_set1_ps(f.s2), _mm512_set1_ps(f.b2), _mm512_set1_ps(f.gain), _mm512_set1_ps(3e-7));
        let gt = |a: __m512, b: __m512| _mm512_cmp_ps_mask::<_CMP_GT_OQ>(a, b);
        let mut c0 = 0;
        let whole = w - w % 16;
        while c0 < whole {
            prefetch(next, c0);
            let stop = (c0 + BLOCK).min(whole);
            while c0 < stop {
                let p = sum(cp, c0);
                let level = _mm512_cvtepu8_epi32(_mm_loadu_si128(lv.add(c0) as *const __m128i));
                let m = _mm512_and_si512(_mm512_srli_epi32::<18>(p), m_bits);
                let (mf, xf, vf) = (_mm512_cvtepi32_ps(m), _mm512_cvtepi32_ps(_mm512_and_si512(p, x_bits)), _mm512_cvtepi32_ps(level));
                let b = _mm512_sub_ps(_mm512_mul_ps(mf, vf), xf);
                let signal = gt(_mm512_mul_ps(b, _mm512_abs_ps(b)), _mm512_mul_ps(_mm512_mul_ps(s2, xf), mf));
                let exact = _mm512_cmpgt_epi32_mask(p, no_big) | _mm512_cmpeq_epi32_mask(level, top);
                let pass = _mm512_cmpgt_epi32_mask(m, below_min_local) & (exact | signal);
                if pass != 0 {
                    let y = sum(cy, c0);
                    let yf = _mm512_cvtepi32_ps(y);
                    let m1 = _mm512_sub_ps(mf, one);
                    let (t1, t2, t3) = (_mm512_mul_ps(mf, yf), _mm512_mul_ps(xf, xf), _mm512_mul_ps(_mm512_mul_ps(gain, xf), m1));
                    let a = _mm512_add_ps(
                        _mm512_sub_ps(_mm512_sub_ps(t1, t2), t3),
                        _mm512_mul_ps(_mm512_add_ps(_mm512_add_ps(t1, t2), t3), slack),
                    );
                    let disperse = gt(a, zero) & gt(_mm512_mul_ps(a, a), _mm512_mul_ps(_mm512_mul_ps(b2, t2), m1));
                    let mut hits = (pass & (exact | disperse)) as u32;
                    let (mut ps, mut ys) = ([0u32; 16], [0u32; 16]);
                    _mm512_storeu_si512(ps.as_mut_ptr() as *mut __m512i, p);
                    _mm512_storeu_si512(ys.as_mut_ptr() as *mut __m512i, y);
                    while hits != 0 {
                        let i = hits.trailing_zeros() as usize;
                        each(c0 + i, ps[i], ys[i]);
                        hits &= hits - 1;
                    }
                }
                c0 += 16;
            }
        }
        c0
    }

    /// Ask for the lines of columns `c0..c0 + BLOCK` of the row entering
    /// next, so that they come from memory while this row is filtered (the
    /// pass that moves the window is otherwise bound by reading the frame).
    #[inline(always)]
    fn prefetch<T>(next: Row<T>, c0: usize) {
        #[cfg(target_arch = "x86_64")]
        if let Some((v, g)) = next {
            use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
            let end = (c0 + BLOCK).min(v.len());
            if c0 < end {
                let (v, g) = (&v[c0..end], &g[c0..end]);
                let bytes = v.as_ptr() as *const i8;
                // SAFETY: a prefetch of addresses inside the slices; it never faults
                unsafe {
                    for at in (0..std::mem::size_of_val(v)).step_by(64) {
                        _mm_prefetch::<_MM_HINT_T0>(bytes.add(at));
                    }
                    _mm_prefetch::<_MM_HINT_T0>(g.as_ptr() as *const i8);
                    _mm_prefetch::<_MM_HINT_T0>(g.as_ptr().add(g.len() - 1) as *const i8);
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (next, c0);
    }

    /// The two passes over a row, compiled for the CPU found at run time.
    struct Kernels<T: 'static> {
        enter: unsafe fn(&mut Window, usize, Row<T>, T, &Filter<T>),
        filter: unsafe fn(&Filter<T>, &Window, &[u8], Row<T>, Candidate),
    }

    fn enter<T: Pixel>(win: &mut Window, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
        win.enter(e, row, max, f)
    }
    fn filter<T: Pixel>(f: &Filter<T>, win: &Window, levels: &[u8], next: Row<T>, each: Candidate) {
        let taps = 2 * win.kx + 1;
        match taps {
            3 => filter_row::<T, 3>(f, win, taps, levels, 0, next, each),
            5 => filter_row::<T, 5>(f, win, taps, levels, 0, next, each),
            7 => filter_row::<T, 7>(f, win, taps, levels, 0, next, each),
            _ => filter_row::<T, 0>(f, win, taps, levels, 0, next, each),
        }
    }
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn enter_avx2<T: Pixel>(win: &mut Window, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
        // SAFETY: this function runs only where the CPU has AVX2
        unsafe { win.enter_avx2(e, row, max, f) }
    }
    /// The row in groups of eight in AVX2, the last few columns as [`filter`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    fn filter_avx2<T: Pixel>(f: &Filter<T>, win: &Window, levels: &[u8], next: Row<T>, each: Candidate) {
        let taps = 2 * win.kx + 1;
        // SAFETY: this function runs only where the CPU has AVX2
        unsafe {
            let done = match taps {
                3 => sieve_avx2::<T, 3>(f, win, taps, levels, next, each),
                5 => sieve_avx2::<T, 5>(f, win, taps, levels, next, each),
                7 => sieve_avx2::<T, 7>(f, win, taps, levels, next, each),
                _ => sieve_avx2::<T, 0>(f, win, taps, levels, next, each),
            };
            filter_row::<T, 0>(f, win, taps, levels, done, next, each)
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn enter_avx512<T: Pixel>(win: &mut Window, e: usize, row: Row<T>, max: T, f: &Filter<T>) {
        // SAFETY: this function runs only where the CPU has AVX-512 F, BW and VL
        unsafe { win.enter_avx512(e, row, max, f) }
    }
    /// The row in groups of sixteen in AVX-512, the last few columns as [`filter`].
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    fn filter_avx512<T: Pixel>(f: &Filter<T>, win: &Window, levels: &[u8], next: Row<T>, each: Candidate) {
        let taps = 2 * win.kx + 1;
        // SAFETY: this function runs only where the CPU has AVX-512 F, BW and VL
        unsafe {
            let done = match taps {
                3 => sieve_avx512::<T, 3>(f, win, taps, levels, next, each),
                5 => sieve_avx512::<T, 5>(f, win, taps, levels, next, each),
                7 => sieve_avx512::<T, 7>(f, win, taps, levels, next, each),
                _ => sieve_avx512::<T, 0>(f, win, taps, levels, next, each),
            };
            filter_row::<T, 0>(f, win, taps, levels, done, next, each)
        }
    }

    /// Every set of the two passes this CPU runs, the widest first: the
    /// first is the one used, the others are there for the tests to compare.
    fn kernel_sets<T: Pixel>() -> Vec<(&'static str, Kernels<T>)> {
        let mut sets = vec![];
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx512f") && has!("avx512bw") && has!("avx512vl") {
                sets.push(("avx512", Kernels { enter: enter_avx512::<T>, filter: filter_avx512::<T> }));
            }
            if has!("avx2") {
                sets.push(("avx2", Kernels { enter: enter_avx2::<T>, filter: filter_avx2::<T> }));
            }
        }
        sets.push(("plain", Kernels { enter: enter::<T>, filter: filter::<T> }));
        sets
    }

    /// The widest set of the two passes this CPU runs.
    fn kernels<T: Pixel>() -> Kernels<T> {
        kernel_sets::<T>().swap_remove(0).1
    }

    pub(super) fn dispersion<T: Pixel, R: Rows<T> + ?Sized>(frame: &mut R, valid: &Valid<T>, rule: &Rule, out: &mut Strong) -> Result<()> {
        dispersion_with(&kernels::<T>(), frame, valid, rule, out)
    }

    fn dispersion_with<T: Pixel, R: Rows<T> + ?Sized>(
        k: &Kernels<T>,
        frame: &mut R,
        valid: &Valid<T>,
        rule: &Rule,
        out: &mut Strong,
    ) -> Result<()> {
        let (h, w) = (frame.height(), frame.width());
        let (Some(box_max), Some(valid_max)) = (valid.box_max, valid.valid_max) else { return Ok(()) };
        let Some(above) = T::above(rule.global_threshold) else { return Ok(()) };
        let ky = rule.kernel.1;
        let g = rule.gain.unwrap_or(1.0);
        let f = Filter {
            above,
            valid_max,
            min_local: rule.min_local,
            gain: g as f32,
            s2: (rule.sigma_strong * rule.sigma_strong * g * (1.0 - 1e-5)) as f32,
            b2: (2.0 * (rule.sigma_background * g).powi(2) * (1.0 - 1e-5)) as f32,
        };
        let all_good = vec![true; if valid.mask.is_none() { w } else { 0 }];
        let good = |r: usize| -> &[bool] {
            match valid.mask {
                Some(m) => &m[r * w..(r + 1) * w],
                None => &all_good[..],
            }
        };
        let mut win = Window::new(w, rule.kernel);
        // SAFETY (each call below): `kernels` chose code this CPU runs
        for e in 0..ky.min(h) {
            frame.reach(e)?;
            unsafe { (k.enter)(&mut win, e, Some((frame.row(e), good(e))), box_max, &f) };
        }
        for r in 0..h {
            let e = r + ky;
            if e < h {
                frame.reach(e)?;
            }
            unsafe { (k.enter)(&mut win, e, (e < h).then(|| (frame.row(e), good(e))), box_max, &f) };
            let frame = &*frame;
            let values = frame.row(r);
            let levels = win.levels(r, w);
            let mut candidates = |c: usize, p: u32, ys: u32| {
                // not valid or not above the threshold (a sieve may let these
                // through to be decided exactly)
                if levels[c] == 0 {
                    return;
                }
                let at = r * w + c;
                let (m, big) = ((p >> 18) & 63, p >> 24);
                let v = values[c].f64();
                // the box sums of the big pixels are taken over the box again
                let (x, y) = if big == 0 {
                    ((p & X_BITS) as f64, ys as f64)
                } else {
                    let (x, y) = box_xy(frame, valid, rule.kernel, r, c);
                    (x.f64(), y.f64())
                };
                if rule.dispersion_and_signal(m as f64, x, y, v) {
                    out.push(at, v);
                }
            };
            let next = (e + 1 < h && frame.resident()).then(|| (frame.row(e + 1), good(e + 1)));
            unsafe { (k.filter)(&f, &win, levels, next, &mut candidates) };
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// A frame of `T` with background, spots, big and masked-off values
        /// and pixels above the trusted maximum, every kind the passes treat apart.
        fn frame<T: Pixel + TryFrom<u32>>(h: usize, w: usize, seed: u64, top: u32) -> Vec<T> {
            let mut s = seed;
            (0..h * w)
                .map(|i| {
                    s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    let r = (s >> 33) as u32;
                    let v = match r % 97 {
                        0 => top,                     // saturated or above the trusted maximum
                        1..=3 => 200 + r % 3000,      // a bright pixel
                        4 => 5000 + r % 60000,        // big: decided exactly
                        _ => (r >> 8) % 4,            // background
                    };
                    let (row, c) = (i / w, i % w);
                    let spot = if (row % 11 == 5) && (c % 13 == 6) { 300 } else { 0 };
                    T::try_from(v.saturating_add(spot).min(top)).ok().unwrap_or(T::ZERO)
                })
                .collect()
        }

        fn every_set_finds<T: Pixel + TryFrom<u32>>(top: u32) {
            let mut found = 0;
            for (h, w) in [(9, 1), (13, 15), (17, 16), (21, 33), (40, 67), (30, 130)] {
                let data = frame::<T>(h, w, (h * 131 + w) as u64, top);
                let mask: Vec<bool> = (0..h * w).map(|i| i % 29 != 3).collect();
                // boxes up to 63 pixels: the widest (kx 15 and 20) reach past a vector of sixteen columns
                for (kernel, min_local, gain) in [((3, 3), 2, None), ((1, 2), 3, Some(1.5)), ((2, 1), 2, None), ((4, 3), 5, None), ((15, 0), 2, None), ((20, 0), 3, None)] {
                    let rule = Rule { kernel, min_local, gain, ..Rule::default() };
                    for mask in [None, Some(&mask[..])] {
                        for trusted in [None, Some(4000.0)] {
                            let valid = Valid::new(mask, trusted);
                            let mut plain = Strong::default();
                            super::super::dispersion(&Frame::new(&data, h, w).unwrap(), &valid, &rule, &mut plain);
                            found += plain.len();
                            for (name, k) in kernel_sets::<T>() {
                                let mut out = Strong::default();
                                dispersion_with(&k, &mut Frame::new(&data, h, w).unwrap(), &valid, &rule, &mut out).unwrap();
                                assert_eq!(out, plain, "{name}, {} {h} x {w}, {rule:?}, mask {}, trusted {trusted:?}", T::DTYPE, mask.is_some());
                            }
                        }
                    }
                }
            }
            assert!(found > 100, "{}: {found} strong pixels in all", T::DTYPE);
        }

        #[test]
        fn every_set_of_passes_finds_what_the_general_rule_does() {
            every_set_finds::<u32>(u32::MAX);
            every_set_finds::<i32>(i32::MAX as u32);
            every_set_finds::<u16>(u16::MAX as u32);
            every_set_finds::<i16>(i16::MAX as u32);
            every_set_finds::<u8>(u8::MAX as u32);
            let names: Vec<_> = kernel_sets::<u32>().iter().map(|(name, _)| *name).collect();
            eprintln!("sets of passes on this CPU: {names:?}");
            assert_eq!(names.last(), Some(&"plain"));
        }
    }
}

/// Flags of `dispersion_extended`, one byte a pixel.
const NOT_BACKGROUND: u8 = 1;
const ERODED: u8 = 2;

fn dispersion_extended<T: Pixel>(frame: &Frame<T>, valid: &Valid<T>, rule: &Rule, out: &mut Strong) {
    let (h, w) = (frame.height, frame.width);
    let mask = valid.mask;
    let mut flags = vec![0u8; h * w];
    // 1. the dispersion test alone; masked (invalid) pixels count as not background
    let term = |r: usize, c: usize| {
        let at = r * w + c;
        let v = frame.data[at];
        if valid.in_box(v, good(mask, at)) {
            Mxy { m: 1, x: v.x(), y: v.y() }
        } else {
            Mxy::default()
        }
    };
    box_rows(h, w, rule.kernel, term, |r, sums| {
        for (c, s) in sums.iter().enumerate() {
            let at = r * w + c;
            let not_background = if !valid.valid(frame.data[at], good(mask, at)) {
                true
            } else {
                let (m, x, y) = (s.m as f64, s.x.f64(), s.y.f64());
                s.m >= rule.min_local && x >= 0.0 && rule.dispersion(m, x, y)
            };
            if not_background {
                flags[at] = NOT_BACKGROUND;
            }
        }
    });
    // 2. erode: a valid pixel is kept out of the background when no background
    // pixel is within Chebyshev distance min(kernel) - 1 (outside the frame is
    // not background), as DIALS's chebyshev_distance >= min(kernel) says
    let e = rule.kernel.0.min(rule.kernel.1) - 1;
    let mut eroded = vec![false; h * w];
    let background = |r: usize, c: usize| (flags[r * w + c] & NOT_BACKGROUND == 0) as u32;
    box_rows(h, w, (e, e), background, |r, sums| {
        for (c, &n) in sums.iter().enumerate() {
            let at = r * w + c;
            eroded[at] = n == 0 && valid.valid(frame.data[at], good(mask, at));
        }
    });
    for (f, &e) in flags.iter_mut().zip(&eroded) {
        if e {
            *f |= ERODED;
        }
    }
    drop(eroded);
    // 3. the signal test against the mean of a wider box over the background
    let wide = (rule.kernel.0 + 2, rule.kernel.1 + 2);
    let zero_x = T::X::default();
    let term = |r: usize, c: usize| {
        let at = r * w + c;
        let v = frame.data[at];
        if flags[at] & ERODED == 0 && valid.in_box(v, good(mask, at)) {
            Mx { m: 1, x: v.x() }
        } else {
            Mx { m: 0, x: zero_x }
        }
    };
    let g = rule.gain;
    box_rows(h, w, wide, term, |r, sums| {
        let row = frame.row(r);
        for (c, (&v, s)) in row.iter().zip(sums).enumerate() {
            let at = r * w + c;
            if flags[at] & ERODED == 0 {
                continue;
            }
            let (m, x, vf) = (s.m as f64, s.x.f64(), v.f64());
            if x >= 0.0 && vf > rule.global_threshold {
                let mean = if s.m >= 2 { x / m } else { 0.0 };
                let spread = match g {
                    None => mean.sqrt(),
                    Some(g) => (g * mean).sqrt(),
                };
                if vf >= mean + rule.sigma_strong * spread {
                    out.push(at, vf);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rule written out with plain loops over the box, for every pixel.
    fn by_hand(data: &[u32], h: usize, w: usize, rule: &Rule) -> Vec<u32> {
        let (kx, ky) = rule.kernel;
        let mut strong = vec![];
        for r in 0..h {
            for c in 0..w {
                let (mut m, mut x, mut y) = (0u32, 0u64, 0u64);
                for rr in r.saturating_sub(ky)..=(r + ky).min(h - 1) {
                    for cc in c.saturating_sub(kx)..=(c + kx).min(w - 1) {
                        let v = data[rr * w + cc] as u64;
                        if v < 1 << 24 {
                            m += 1;
                            x += v;
                            y += v * v;
                        }
                    }
                }
                let v = data[r * w + c] as f64;
                if m >= rule.min_local && v > rule.global_threshold && rule.dispersion_and_signal(m as f64, x as f64, y as f64, v) {
                    strong.push((r * w + c) as u32);
                }
            }
        }
        strong
    }

    fn frame(h: usize, w: usize, seed: u64) -> Vec<u32> {
        let mut s = seed;
        (0..h * w)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let noise = ((s >> 33) % 4) as u32;
                let (r, c) = (i / w, i % w);
                let spot = if (r as i64 - 9).abs() <= 1 && (c as i64 - 12).abs() <= 1 { 200 } else { 0 };
                noise + spot + if i == 5 { 1 << 25 } else { 0 }
            })
            .collect()
    }

    #[test]
    fn the_box_sums_slide_exactly() {
        let (h, w) = (23, 31);
        let data = frame(h, w, 7);
        let rule = Rule::default();
        let mut out = Strong::default();
        strong_pixels(&Frame::new(&data, h, w).unwrap(), &Valid::new(None, None), &rule, &mut out).unwrap();
        assert_eq!(out.index, by_hand(&data, h, w, &rule));
        assert!(out.index.contains(&(9 * w as u32 + 12)));
    }

    #[test]
    fn sums_of_big_boxes_of_values_near_2_to_the_24_do_not_wrap() {
        // 17x17 = 289 pixels below 2^24 sum past 2^32: the general path's sums
        let (h, w) = (40, 45);
        let mut s = 5u64;
        let data: Vec<u32> = (0..h * w)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                (1 << 24) - 1 - ((s >> 33) as u32 % (1 << 22))
            })
            .collect();
        for kernel in [(8, 8), (8, 3), (3, 8)] {
            let rule = Rule { kernel, ..Rule::default() };
            let mut out = Strong::default();
            strong_pixels(&Frame::new(&data, h, w).unwrap(), &Valid::new(None, None), &rule, &mut out).unwrap();
            let expected = by_hand(&data, h, w, &rule);
            assert!(!expected.is_empty() && expected.len() < h * w, "{}", expected.len());
            assert_eq!(out.index, expected, "kernel {kernel:?}");
        }
    }

    #[test]
    fn every_integer_type_finds_what_its_values_as_32_bits_do() {
        // the fast path widens u8, u16 and i16 (by sign: negatives not valid) to u32 lanes
        let (h, w) = (37, 45);
        let data = frame(h, w, 11);
        let mask: Vec<bool> = (0..h * w).map(|i| i % 23 != 4).collect();
        let rule = Rule::default();
        let strong = |f: &dyn Fn(&mut Strong, &Option<&[bool]>)| {
            let mut out = Strong::default();
            f(&mut out, &Some(&mask));
            let masked = out.index.clone();
            out = Strong::default();
            f(&mut out, &None);
            (masked, out.index)
        };
        let of = |d: &[u32], m: &Option<&[bool]>, out: &mut Strong| {
            strong_pixels(&Frame::new(d, h, w).unwrap(), &Valid::new(*m, Some(250.0)), &rule, out).unwrap()
        };
        let small: Vec<u32> = data.iter().map(|&v| v.min(255)).collect();
        let expected = strong(&|out, m| of(&small, m, out));
        assert!(!expected.1.is_empty());
        let bytes: Vec<u8> = small.iter().map(|&v| v as u8).collect();
        assert_eq!(strong(&|out, m| strong_pixels(&Frame::new(&bytes, h, w).unwrap(), &Valid::new(*m, Some(250.0)), &rule, out).unwrap()), expected);
        let words: Vec<u16> = small.iter().map(|&v| v as u16).collect();
        assert_eq!(strong(&|out, m| strong_pixels(&Frame::new(&words, h, w).unwrap(), &Valid::new(*m, Some(250.0)), &rule, out).unwrap()), expected);
        let signed: Vec<i32> = small.iter().enumerate().map(|(i, &v)| if i % 7 == 3 { -1 - (i % 3) as i32 } else { v as i32 }).collect();
        let expected = strong(&|out, m| strong_pixels(&Frame::new(&signed, h, w).unwrap(), &Valid::new(*m, Some(250.0)), &rule, out).unwrap());
        assert!(!expected.1.is_empty());
        let short: Vec<i16> = signed.iter().map(|&v| v as i16).collect();
        assert_eq!(strong(&|out, m| strong_pixels(&Frame::new(&short, h, w).unwrap(), &Valid::new(*m, Some(250.0)), &rule, out).unwrap()), expected);
    }

    #[test]
    fn narrow_frames_clip_the_box() {
        for (h, w) in [(1, 1), (1, 9), (9, 1), (2, 3), (7, 7), (8, 3)] {
            let data = frame(h, w, (h * 31 + w) as u64);
            let rule = Rule::default();
            let mut out = Strong::default();
            strong_pixels(&Frame::new(&data, h, w).unwrap(), &Valid::new(None, None), &rule, &mut out).unwrap();
            assert_eq!(out.index, by_hand(&data, h, w, &rule), "{h} x {w}");
        }
    }

    #[test]
    fn bad_input_is_named() {
        assert!(Frame::<u16>::new(&[], 0, 0).unwrap_err().0.contains("empty"));
        assert!(Frame::new(&[1.0f32, f32::NAN], 1, 2).unwrap_err().0.contains("NaN at row 0, column 1"));
        let rule = Rule { min_local: 1, ..Rule::default() };
        assert!(rule.check().unwrap_err().0.contains("min_local"));
        let rule = Rule { sigma_strong: f64::NAN, ..Rule::default() };
        assert!(rule.check().unwrap_err().0.contains("sigma_strong"));
    }

    #[test]
    fn trusted_maximum_and_mask_make_pixels_invalid() {
        let (h, w) = (12, 12);
        let mut data = frame(h, w, 3);
        data[0] = u32::MAX;
        let mask: Vec<bool> = (0..h * w).map(|i| i != 9 * w + 12).collect();
        let v = Valid::<u32>::new(Some(&mask), Some(1000.0));
        assert!(!v.valid(u32::MAX, true));
        assert!(v.valid(1000, true) && !v.valid(1001, true) && !v.valid(5, false));
        assert!(!Valid::<i32>::new(None, None).valid(-1, true));
        assert!(<f32 as Pixel>::at_most(0.1).unwrap() as f64 <= 0.1);
    }
}
