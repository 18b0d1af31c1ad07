//! The spot finder: a rule, a detector's mask and trusted range, spot size
//! limits; frames in (arrays, or bitshuffle-LZ4 chunks decoded here), spots
//! out, frames in parallel on scoped threads, each with its own buffers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::bslz4;
use crate::error::{InputError, Result};
use crate::spots::{label, SpotFilter, Spots};
use crate::strong::{fast_path, strong_pixels, strong_pixels_of_rows, Frame, Pixel, Rows, Rule, Strong, Valid};

/// What a finder is built from.
#[derive(Clone, Debug, Default)]
pub struct Finder {
    pub rule: Rule,
    pub limits: SpotFilter,
    /// True = good, `height * width` of them, row after row.
    pub mask: Option<Vec<bool>>,
    /// The mask's `(height, width)`: frames must have it.
    pub shape: Option<(usize, usize)>,
    /// Values above this are not valid (the detector's saturation, say).
    pub trusted_max: Option<f64>,
}

impl Finder {
    pub fn new(
        rule: Rule,
        limits: SpotFilter,
        mask: Option<(Vec<bool>, usize, usize)>,
        trusted_max: Option<f64>,
    ) -> Result<Finder> {
        rule.check()?;
        if limits.min_size == 0 {
            return Err(InputError::new("min_spot_size must be at least 1"));
        }
        if let Some(max) = limits.max_size {
            if max < limits.min_size {
                return Err(InputError::new(format!(
                    "max_spot_size {max} is below min_spot_size {}",
                    limits.min_size
                )));
            }
        }
        if let Some(d) = limits.max_separation {
            if !(d.is_finite() && d >= 0.0) {
                return Err(InputError::new(format!("max_separation must be a finite number >= 0, not {d}")));
            }
        }
        if let Some(t) = trusted_max {
            if t.is_nan() {
                return Err(InputError::new("trusted_max is NaN"));
            }
        }
        let (mask, shape) = match mask {
            None => (None, None),
            Some((m, h, w)) => {
                if h == 0 || w == 0 || m.len() != h * w {
                    return Err(InputError::new(format!("a mask of {h} x {w} pixels with {} values", m.len())));
                }
                (Some(m), Some((h, w)))
            }
        };
        Ok(Finder { rule, limits, mask, shape, trusted_max })
    }

    fn check_shape(&self, height: usize, width: usize) -> Result<()> {
        match self.shape {
            Some((h, w)) if (h, w) != (height, width) => Err(InputError::new(format!(
                "the image is {height} x {width} pixels, the mask {h} x {w}"
            ))),
            _ => Ok(()),
        }
    }

    /// The strong pixels of a frame.
    pub fn strong<T: Pixel>(&self, frame: &Frame<T>) -> Result<Strong> {
        self.check_shape(frame.height, frame.width)?;
        let valid = Valid::new(self.mask.as_deref(), self.trusted_max);
        let mut out = Strong::default();
        strong_pixels(frame, &valid, &self.rule, &mut out)?;
        Ok(out)
    }

    /// The spots of a frame.
    pub fn find<T: Pixel>(&self, frame: &Frame<T>) -> Result<Spots> {
        let strong = self.strong(frame)?;
        Ok(label(&strong, frame.width, self.limits))
    }

    /// The spots of every frame, `threads` at a time (0: one per core), in order.
    pub fn find_many<T: Pixel>(&self, frames: &[Frame<T>], threads: usize) -> Vec<Result<Spots>> {
        in_parallel(frames.len(), threads, || (), |_, i| self.find(&frames[i]))
    }

    /// The spots of bitshuffle-LZ4 chunks of `height x width` frames of `T`,
    /// decoded and searched `threads` at a time, in order. A chunk that cannot
    /// be decoded is an error for that frame alone.
    pub fn find_chunks<T: Pixel>(
        &self,
        chunks: &[&[u8]],
        height: usize,
        width: usize,
        threads: usize,
    ) -> Vec<Result<Spots>> {
        if let Err(e) = self.check_shape(height, width) {
            return chunks.iter().map(|_| Err(e.clone())).collect();
        }
        // what Frame::new checks of a frame's shape, for frames never whole in memory
        let bad = if height == 0 || width == 0 {
            Some(format!("an empty image ({height} x {width} pixels)"))
        } else if height.checked_mul(width).is_none_or(|n| n > u32::MAX as usize) {
            Some(format!("an image of {height} x {width} pixels is more than 2^32"))
        } else {
            None
        };
        if let Some(e) = bad {
            return chunks.iter().map(|_| Err(InputError::new(e.clone()))).collect();
        }
        if fast_path::<T>(&self.rule) {
            // each chunk decoded a few rows ahead of the search, into a ring
            // of rows that stays in the cache: the frame is never in memory
            let fresh = || (Vec::<T>::new(), Vec::<T>::new(), Vec::<u8>::new());
            let bands = self.bands(chunks.len(), threads, height);
            if bands == 1 {
                // a frame a thread, labelled in its thread too
                return in_parallel(chunks.len(), threads, fresh, |buffers, i| {
                    Ok(label(&self.strong_in_band(chunks[i], height, width, (0, height), buffers)?, width, self.limits))
                });
            }
            // fewer frames than threads: each in bands of rows, a band to a thread
            let band = |b: usize| (height * b / bands, height * (b + 1) / bands);
            let mut found = in_parallel(chunks.len() * bands, threads, fresh, |buffers, u| {
                self.strong_in_band(chunks[u / bands], height, width, band(u % bands), buffers)
            })
            .into_iter();
            return (0..chunks.len())
                .map(|_| {
                    let parts: Vec<Result<Strong>> = found.by_ref().take(bands).collect();
                    let mut strong = Strong::default();
                    for part in parts {
                        let part = part?;
                        strong.index.extend(part.index);
                        strong.value.extend(part.value);
                    }
                    Ok(label(&strong, width, self.limits))
                })
                .collect();
        }
        let fresh = || (vec![T::ZERO; height * width], Vec::new());
        in_parallel(chunks.len(), threads, fresh, |(frame, scratch), i| {
            decode_frame(chunks[i], frame, scratch)?;
            self.find(&Frame::new(frame, height, width)?)
        })
    }
}

impl Finder {
    /// [`Finder::find_chunks`] of chunks that lie in `file`, at `extents`
    /// (each chunk's first byte and length): the chunks read first, in
    /// parallel (positioned reads: no file position is shared), so no caller
    /// copies them, then searched. A chunk that cannot be read is an error
    /// for that frame alone.
    #[cfg(unix)]
    pub fn find_chunks_at<T: Pixel>(
        &self,
        file: &std::fs::File,
        extents: &[(u64, usize)],
        height: usize,
        width: usize,
        threads: usize,
    ) -> Vec<Result<Spots>> {
        use std::os::unix::fs::FileExt;
        let read = in_parallel(extents.len(), threads, || (), |_, i| {
            let (at, n) = extents[i];
            let mut chunk = vec![0u8; n];
            file.read_exact_at(&mut chunk, at)
                .map(|_| chunk)
                .map_err(|e| InputError::new(format!("its chunk ({n} bytes at byte {at}) cannot be read: {e}")))
        });
        let chunks: Vec<&[u8]> = read.iter().filter_map(|r| r.as_deref().ok()).collect();
        let mut found = self.find_chunks::<T>(&chunks, height, width, threads).into_iter();
        read.into_iter()
            .map(|r| r.and_then(|_| found.next().expect("a result for every chunk read")))
            .collect()
    }
}

/// Rows a band of a frame's search has at least (beside the rows around it).
const BAND_ROWS: usize = 64;

impl Finder {
    /// Bands of rows to search each of `frames` frames in on `threads`
    /// threads: one each when there are frames enough for every thread.
    fn bands(&self, frames: usize, threads: usize, height: usize) -> usize {
        let threads = thread_count(threads);
        if frames == 0 || frames >= threads {
            return 1;
        }
        threads.div_ceil(frames).min(height / (BAND_ROWS + 2 * self.rule.kernel.1)).max(1)
    }

    /// The strong pixels of rows `r0..r1` of a chunk's frame (flat indices
    /// into the whole frame): the rows from `ky` before to `ky` after them
    /// decoded (the blocks before passed over), and searched as a frame of
    /// their own, which gives the same boxes for the rows inside. The band
    /// that ends the frame checks the chunk ends with it.
    fn strong_in_band<T: Pixel>(
        &self,
        chunk: &[u8],
        height: usize,
        width: usize,
        (r0, r1): (usize, usize),
        (ring, piece, scratch): &mut (Vec<T>, Vec<T>, Vec<u8>),
    ) -> Result<Strong> {
        let ky = self.rule.kernel.1;
        let (lo, hi) = (r0.saturating_sub(ky), (r1 + ky).min(height));
        let rows = DecodedRows::new(chunk, height, width, ky, lo, ring, piece, scratch)?;
        let mut band = Band { rows, lo, hi };
        let valid = Valid::new(self.mask.as_deref().map(|m| &m[lo * width..hi * width]), self.trusted_max);
        let mut strong = Strong::default();
        strong_pixels_of_rows(&mut band, &valid, &self.rule, &mut strong)?;
        if hi == height {
            band.rows.finish()?;
        }
        if (lo, hi) != (r0, r1) {
            // only the band's own rows, as indices into the frame
            let (first, last) = (((r0 - lo) * width) as u32, ((r1 - lo) * width) as u32);
            let (a, b) = (strong.index.partition_point(|&i| i < first), strong.index.partition_point(|&i| i < last));
            strong.index.truncate(b);
            strong.index.drain(..a);
            strong.value.truncate(b);
            strong.value.drain(..a);
        }
        let offset = (lo * width) as u32;
        strong.index.iter_mut().for_each(|i| *i += offset);
        Ok(strong)
    }
}

/// Rows `lo..hi` of a frame's rows, as a frame of their own.
struct Band<R> {
    rows: R,
    lo: usize,
    hi: usize,
}

impl<T, R: Rows<T>> Rows<T> for Band<R> {
    fn height(&self) -> usize {
        self.hi - self.lo
    }
    fn width(&self) -> usize {
        self.rows.width()
    }
    fn reach(&mut self, r: usize) -> Result<()> {
        self.rows.reach(self.lo + r)
    }
    #[inline(always)]
    fn row(&self, r: usize) -> &[T] {
        self.rows.row(self.lo + r)
    }
    fn resident(&self) -> bool {
        self.rows.resident()
    }
}

/// The rows of a bitshuffle-LZ4 chunk, decoded as the search reaches them
/// into a ring of rows (row `r` in slot `r % slots`, the ring one run of
/// memory): a piece of the chunk (a block) goes straight into the ring, or,
/// when it would run past the ring's end, by way of `piece`.
struct DecodedRows<'a, T> {
    reader: bslz4::Reader<'a>,
    height: usize,
    width: usize,
    slots: usize,
    ring: &'a mut Vec<T>,
    piece: &'a mut Vec<T>,
    scratch: &'a mut Vec<u8>,
    /// Elements of the frame decoded (or, before the first row, passed over).
    decoded: usize,
}

impl<'a, T: Pixel> DecodedRows<'a, T> {
    /// Rows from `first` on (the blocks before it passed over).
    #[allow(clippy::too_many_arguments)]
    fn new(
        chunk: &'a [u8],
        height: usize,
        width: usize,
        ky: usize,
        first: usize,
        ring: &'a mut Vec<T>,
        piece: &'a mut Vec<T>,
        scratch: &'a mut Vec<u8>,
    ) -> Result<Self> {
        let n = height * width;
        let fail = |e: bslz4::ChunkError| InputError::new(e.0);
        let mut reader = bslz4::Reader::new(chunk, std::mem::size_of::<T>(), n * std::mem::size_of::<T>()).map_err(fail)?;
        let decoded = reader.skip_to(first * width).map_err(fail)?;
        // the rows in use (2ky + 1 around the row searched, the next) and those
        // a piece decoded to reach the last of them may run on into
        let slots = (2 * ky + 3 + reader.block().div_ceil(width)).min(height);
        ring.resize(slots * width, T::ZERO);
        Ok(DecodedRows { reader, height, width, slots, ring, piece, scratch, decoded })
    }

    /// Decode the next piece of the chunk into the ring.
    fn decode_piece(&mut self) -> Result<()> {
        let Some(n) = self.reader.next_piece() else { return Ok(()) };
        let ring = self.slots * self.width;
        let at = self.decoded % ring;
        let bytes = |v: &mut [T]| {
            // SAFETY: every Pixel type is a plain number, valid for any bytes
            unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, std::mem::size_of_val(v)) }
        };
        let fail = |e: bslz4::ChunkError| InputError::new(e.0);
        if at + n <= ring {
            self.reader.decode_piece(bytes(&mut self.ring[at..at + n]), self.scratch).map_err(fail)?;
        } else {
            self.piece.resize(n, T::ZERO);
            self.reader.decode_piece(bytes(&mut self.piece[..]), self.scratch).map_err(fail)?;
            let (a, b) = self.piece.split_at(ring - at);
            self.ring[at..].copy_from_slice(a);
            self.ring[..b.len()].copy_from_slice(b);
        }
        self.decoded += n;
        Ok(())
    }

    /// The rest of the chunk, which must end where its last elements do.
    fn finish(&mut self) -> Result<()> {
        while self.reader.next_piece().is_some() {
            self.decode_piece()?;
        }
        Ok(())
    }
}

impl<T: Pixel> Rows<T> for DecodedRows<'_, T> {
    fn height(&self) -> usize {
        self.height
    }
    fn width(&self) -> usize {
        self.width
    }
    fn reach(&mut self, r: usize) -> Result<()> {
        while self.decoded < (r + 1) * self.width {
            self.decode_piece()?;
        }
        Ok(())
    }
    #[inline(always)]
    fn row(&self, r: usize) -> &[T] {
        let at = (r % self.slots) * self.width;
        &self.ring[at..at + self.width]
    }
}

/// Decode one bitshuffle-LZ4 chunk into a frame of `T`.
pub fn decode_frame<T: Pixel>(chunk: &[u8], frame: &mut [T], scratch: &mut Vec<u8>) -> Result<()> {
    let size = std::mem::size_of::<T>();
    // SAFETY: every Pixel type is a plain number, valid for any bytes; the
    // slice covers exactly the frame's memory, which it borrows mutably.
    let bytes = unsafe { std::slice::from_raw_parts_mut(frame.as_mut_ptr() as *mut u8, std::mem::size_of_val(frame)) };
    bslz4::decode_into(chunk, size, bytes, scratch).map_err(|e| InputError::new(e.0))?;
    check_decoded(frame)
}

/// Decode one bitshuffle-LZ4 chunk into a new frame of `n` values of `T`,
/// its memory not zeroed first (the decoder writes every byte of it).
pub fn decode_new_frame<T: Pixel>(chunk: &[u8], n: usize, scratch: &mut Vec<u8>) -> Result<Vec<T>> {
    let mut frame: Vec<T> = Vec::with_capacity(n);
    let size = std::mem::size_of::<T>();
    // SAFETY: the bytes of the frame's capacity, written and never read by
    // `decode_into`, which on success has written every one of them (the
    // blocks, then the raw rest, cover `0..n * size`); only then is the
    // length set, and a Pixel is valid for any bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(frame.as_mut_ptr() as *mut u8, n * size) };
    bslz4::decode_into(chunk, size, bytes, scratch).map_err(|e| InputError::new(e.0))?;
    unsafe { frame.set_len(n) };
    check_decoded(&frame)?;
    Ok(frame)
}

fn check_decoded<T: Pixel>(frame: &[T]) -> Result<()> {
    if cfg!(target_endian = "big") {
        return Err(InputError::new("little-endian frames on a big-endian machine are not supported"));
    }
    if let Some(at) = frame.iter().position(|v| v.is_nan()) {
        return Err(InputError::new(format!("the frame holds NaN at pixel {at}")));
    }
    Ok(())
}

/// How many threads `threads` means: 0 is one per core.
pub fn thread_count(threads: usize) -> usize {
    if threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        threads
    }
}

/// `work(state, i)` for `i in 0..n` on up to `threads` scoped threads, each
/// with its own `state`; results in order of `i`.
fn in_parallel<S, R, F, W>(n: usize, threads: usize, fresh: F, work: W) -> Vec<R>
where
    R: Send,
    F: Fn() -> S + Sync,
    W: Fn(&mut S, usize) -> R + Sync,
{
    let threads = thread_count(threads).min(n.max(1));
    if threads <= 1 {
        let mut state = fresh();
        return (0..n).map(|i| work(&mut state, i)).collect();
    }
    let next = AtomicUsize::new(0);
    let slots: Mutex<Vec<Option<R>>> = Mutex::new((0..n).map(|_| None).collect());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                let mut state = fresh();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = work(&mut state, i);
                    slots.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(r);
                }
            });
        }
    });
    slots.into_inner().unwrap_or_else(|p| p.into_inner()).into_iter().map(|r| r.expect("every frame is done")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(h: usize, w: usize, seed: u64) -> Vec<u16> {
        let mut s = seed;
        (0..h * w)
            .map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                let (r, c) = (i / w, i % w);
                let spot = (r % 20 < 2 && c % 25 < 2) as u16 * 300;
                ((s >> 35) % 3) as u16 + spot
            })
            .collect()
    }

    #[test]
    fn many_frames_in_parallel_come_back_in_order() {
        let (h, w) = (60, 80);
        let frames: Vec<Vec<u16>> = (0..9).map(|k| frame(h, w, k)).collect();
        let views: Vec<Frame<u16>> = frames.iter().map(|f| Frame::new(f, h, w).unwrap()).collect();
        let finder = Finder::default();
        let one: Vec<Spots> = views.iter().map(|f| finder.find(f).unwrap()).collect();
        assert!(one[0].len() >= 9, "{}", one[0].len());
        for threads in [1, 2, 3, 0] {
            let many: Vec<Spots> = finder.find_many(&views, threads).into_iter().map(|r| r.unwrap()).collect();
            assert_eq!(many, one);
        }
        let bytes: Vec<Vec<u8>> = frames
            .iter()
            .map(|f| bslz4::encode(&f.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>(), 2, 4096))
            .collect();
        let chunks: Vec<&[u8]> = bytes.iter().map(|b| b.as_slice()).collect();
        let decoded: Vec<Spots> = finder.find_chunks::<u16>(&chunks, h, w, 2).into_iter().map(|r| r.unwrap()).collect();
        assert_eq!(decoded, one);
        let bad = finder.find_chunks::<u16>(&[&bytes[0][..50]], h, w, 1);
        assert!(bad[0].is_err());
        let huge = finder.find_chunks::<u16>(&chunks, 1 << 16, 1 << 16, 1);
        assert!(huge.iter().all(|r| r.as_ref().unwrap_err().0.contains("more than 2^32")));
        assert!(finder.find_chunks::<u16>(&chunks, 0, w, 1)[0].as_ref().unwrap_err().0.contains("empty"));
    }

    #[test]
    fn chunks_decoded_into_a_ring_of_rows_find_what_frames_do() {
        // the ring wraps (blocks of a row or less, of many rows), a partial
        // last block and raw elements after it, a mask, two pixel types
        let finder = Finder::default();
        for (h, w, block) in [(301, 83, 4096), (250, 200, 64), (97, 40, 8), (40, 1000, 2048), (1, 9, 8)] {
            // pixels past the packed sums' small values: boxes summed again over the rows
            let data: Vec<u16> = frame(h, w, (h * w) as u64).iter().enumerate().map(|(i, &v)| if i % 101 == 7 { v + 6000 } else { v }).collect();
            let mask: Vec<bool> = (0..h * w).map(|i| i % 37 != 5).collect();
            let masked = Finder::new(Rule::default(), SpotFilter::default(), Some((mask, h, w)), Some(200.0)).unwrap();
            for finder in [&finder, &masked] {
                let expected = finder.find(&Frame::new(&data, h, w).unwrap()).unwrap();
                let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
                let chunk = bslz4::encode(&bytes, 2, block);
                let got = finder.find_chunks::<u16>(&[&chunk], h, w, 1).remove(0).unwrap();
                assert_eq!(got, expected, "{h} x {w}, blocks of {block}");
                let wide: Vec<u32> = data.iter().map(|&v| v as u32).collect();
                let bytes: Vec<u8> = wide.iter().flat_map(|v| v.to_le_bytes()).collect();
                let got = finder.find_chunks::<u32>(&[&bslz4::encode(&bytes, 4, block)], h, w, 1).remove(0).unwrap();
                assert_eq!(got, expected, "{h} x {w}, blocks of {block}, u32");
                let mut long = chunk.clone();
                long.push(0);
                assert!(finder.find_chunks::<u16>(&[&long], h, w, 1)[0].as_ref().unwrap_err().0.contains("follow"));
            }
        }
    }

    #[test]
    fn a_frame_searched_in_bands_of_rows_finds_what_one_search_does() {
        // fewer frames than threads: each frame's rows in bands, a thread each;
        // spots across every band's edge, big pixels, a mask, a wider box
        for (h, w, block) in [(301, 83, 4096), (250, 200, 64), (400, 40, 2048)] {
            let mut data: Vec<u16> = frame(h, w, (h + w) as u64).iter().enumerate().map(|(i, &v)| if i % 101 == 7 { v + 6000 } else { v }).collect();
            for k in 2..=5 {
                for b in 1..k {
                    let edge = h * b / k;
                    for r in edge - 1..=edge + 1 {
                        data[r * w + 30..r * w + 33].fill(400);
                    }
                }
            }
            let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
            let chunk = bslz4::encode(&bytes, 2, block);
            let mask: Vec<bool> = (0..h * w).map(|i| i % 37 != 5).collect();
            let masked = Finder::new(Rule::default(), SpotFilter::default(), Some((mask, h, w)), Some(4000.0)).unwrap();
            let wide = Finder { rule: Rule { kernel: (2, 5), ..Rule::default() }, ..Finder::default() };
            for finder in [&Finder::default(), &masked, &wide] {
                let expected = finder.find(&Frame::new(&data, h, w).unwrap()).unwrap();
                assert!(expected.len() >= 10, "{} spots, {:?}", expected.len(), finder.rule);
                for threads in [2, 3, 5] {
                    assert!(finder.bands(1, threads, h) > 1);
                    let got = finder.find_chunks::<u16>(&[&chunk], h, w, threads).remove(0).unwrap();
                    assert_eq!(got, expected, "{h} x {w}, blocks of {block}, {threads} threads");
                }
                let two = finder.find_chunks::<u16>(&[&chunk, &chunk], h, w, 5);
                assert!(two.iter().all(|s| s.as_ref().unwrap() == &expected));
                // a chunk cut short: the band that reaches the cut says so, and so does the frame
                let cut = &chunk[..chunk.len() * 3 / 4];
                let found = finder.find_chunks::<u16>(&[cut, &chunk], h, w, 5);
                assert!(found[0].is_err() && found[1].as_ref().unwrap() == &expected);
            }
        }
    }

    #[test]
    fn the_mask_shape_must_match() {
        let finder = Finder::new(Rule::default(), SpotFilter::default(), Some((vec![true; 6], 2, 3)), None).unwrap();
        let data = vec![0u16; 6];
        let e = finder.find(&Frame::new(&data, 3, 2).unwrap()).unwrap_err();
        assert!(e.0.contains("3 x 2 pixels, the mask 2 x 3"), "{e}");
        assert!(Finder::new(Rule::default(), SpotFilter { min_size: 5, max_size: Some(2), max_separation: None }, None, None).is_err());
    }
}
