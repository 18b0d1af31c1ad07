//! Bitshuffle-LZ4 chunks (HDF5 filter 32008) as the Eiger and Odin write
//! them, decoded without libhdf5.
//!
//! A chunk is a header, the uncompressed size in bytes (u64, big-endian) and
//! the block size in bytes (u32, big-endian), then, block after block, a
//! compressed length (u32, big-endian) and an LZ4 block. Each block holds
//! `block` elements bit-transposed: for byte `j` of an element and bit `b`
//! of that byte, a row of `block / 8` bytes whose byte `q` bit `i` is that
//! bit of element `8q + i`. A last partial block has its size rounded down
//! to a multiple of 8 elements; the elements left over (fewer than 8) follow
//! uncompressed. Each block is inflated into a buffer that stays in the L1
//! cache and transposed from there straight into the frame.
//!
//! Both steps are written for speed: the LZ4 blocks are inflated here (the
//! long matches of detector frames, runs of zero bits, are filled or copied
//! 16, 32 or 64 bytes at a time, where a general decoder goes byte by byte),
//! and the bits are put back with SSE2 or AVX2, eight bit rows at a time, or
//! with AVX-512 and GFNI, 64 bytes of eight rows at a time (an 8x8 bit
//! transpose is one instruction). Which, the CPU decides at run time; all
//! give the same bytes. A
//! [`Reader`] hands the blocks out one by one, for a search that takes a
//! frame's rows as they are decoded.

use std::fmt;

/// A chunk that cannot be what the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError(pub String);

impl fmt::Display for ChunkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ChunkError {}

fn err<T>(what: String) -> Result<T, ChunkError> {
    Err(ChunkError(what))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// The uncompressed size a chunk's header states, in bytes.
pub fn uncompressed_size(chunk: &[u8]) -> Result<u64, ChunkError> {
    if chunk.len() < 12 {
        return err(format!("a bitshuffle-LZ4 chunk of {} bytes is shorter than its 12-byte header", chunk.len()));
    }
    Ok(u64::from_be_bytes(chunk[..8].try_into().unwrap()))
}

/// The instructions the decoder uses: the plain ones of every CPU (SSE2 on
/// x86_64), AVX2, or AVX-512 (F, BW, VBMI) with GFNI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Isa {
    Plain,
    Avx2,
    Avx512,
}

impl Isa {
    /// The fastest this CPU has.
    fn best() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            if has!("avx2") {
                let avx512 = has!("avx512f") && has!("avx512bw") && has!("avx512vbmi") && has!("gfni");
                return if avx512 { Isa::Avx512 } else { Isa::Avx2 };
            }
        }
        Isa::Plain
    }
}

/// Decode `chunk` of elements `elem_size` bytes wide into `out` (exactly the
/// uncompressed size). `scratch` is reused between calls.
pub fn decode_into(chunk: &[u8], elem_size: usize, out: &mut [u8], scratch: &mut Vec<u8>) -> Result<(), ChunkError> {
    decode_with(Isa::best(), chunk, elem_size, out, scratch)
}

fn decode_with(isa: Isa, chunk: &[u8], elem_size: usize, out: &mut [u8], scratch: &mut Vec<u8>) -> Result<(), ChunkError> {
    let mut reader = Reader::new(chunk, elem_size, out.len())?;
    reader.isa = isa;
    let mut at = 0;
    while let Some(n) = reader.next_piece() {
        let bytes = n * elem_size;
        reader.decode_piece(&mut out[at..at + bytes], scratch)?;
        at += bytes;
    }
    Ok(())
}

/// A chunk decoded piece by piece, in order: its blocks, then the elements
/// left over, raw (so that a caller may use a frame's first rows while its
/// next are inflated into the cache, the frame never whole in memory).
pub struct Reader<'a> {
    chunk: &'a [u8],
    elem_size: usize,
    /// Elements in the chunk, in a block, in the partial block after the whole ones.
    n: usize,
    block: usize,
    last: usize,
    /// The next block's length is at byte `at`; `start` elements are done.
    at: usize,
    start: usize,
    done: bool,
    isa: Isa,
}

impl<'a> Reader<'a> {
    /// A reader of `chunk`, which must hold `bytes` bytes of elements
    /// `elem_size` bytes wide.
    pub fn new(chunk: &'a [u8], elem_size: usize, bytes: usize) -> Result<Reader<'a>, ChunkError> {
        let total = uncompressed_size(chunk)?;
        if total != bytes as u64 {
            return err(format!("the chunk holds {total} bytes, the frame needs {bytes}"));
        }
        if !matches!(elem_size, 1 | 2 | 4 | 8) || bytes % elem_size != 0 {
            return err(format!("elements of {elem_size} bytes cannot fill {bytes} bytes"));
        }
        let block_bytes = be32(&chunk[8..12]) as usize;
        let block = block_bytes / elem_size;
        if block == 0 || block % 8 != 0 || block_bytes % elem_size != 0 {
            return err(format!("a block size of {block_bytes} bytes is not a multiple of 8 elements of {elem_size} bytes"));
        }
        let n = bytes / elem_size;
        let rest = n % block;
        Ok(Reader { chunk, elem_size, n, block, last: rest - rest % 8, at: 12, start: 0, done: false, isa: Isa::best() })
    }

    /// The next piece: its elements, and whether it is a compressed block.
    fn piece(&self) -> Option<(usize, bool)> {
        if self.done {
            None
        } else if self.n - self.start >= self.block {
            Some((self.block, true))
        } else if self.last > 0 && self.start == self.n - self.n % self.block {
            Some((self.last, true))
        } else {
            // the raw rest, fewer than 8 (also when none: the chunk must end there)
            Some((self.n - self.start, false))
        }
    }

    /// Elements in a block (the last may hold fewer).
    pub fn block(&self) -> usize {
        self.block
    }

    /// How many elements the next piece holds; None when the chunk is done.
    pub fn next_piece(&self) -> Option<usize> {
        self.piece().map(|(n, _)| n)
    }

    /// Pass over the whole blocks that end at or before element `e`
    /// without decoding them (only their lengths are read); returns the
    /// element the next piece starts at.
    pub fn skip_to(&mut self, e: usize) -> Result<usize, ChunkError> {
        while matches!(self.piece(), Some((size, true)) if size == self.block && self.start + size <= e) {
            let (chunk, at) = (self.chunk, self.at);
            let packed = match chunk.get(at..at + 4) {
                Some(b) => be32(b) as usize,
                None => return err(format!("the chunk ends inside the block at element {} (byte {at})", self.start)),
            };
            if chunk.len() < at + 4 + packed {
                return err(format!("the block at element {} says {packed} bytes, the chunk has {} left", self.start, chunk.len() - at - 4));
            }
            self.at = at + 4 + packed;
            self.start += self.block;
        }
        Ok(self.start)
    }

    /// Decode the next piece into `out`, exactly its elements' bytes.
    pub fn decode_piece(&mut self, out: &mut [u8], scratch: &mut Vec<u8>) -> Result<(), ChunkError> {
        let Some((size, compressed)) = self.piece() else { return err("the chunk is already decoded".into()) };
        let (chunk, start, at) = (self.chunk, self.start, self.at);
        let bytes = size * self.elem_size;
        assert_eq!(out.len(), bytes);
        if compressed {
            if chunk.len() < at + 4 {
                return err(format!("the chunk ends inside the block at element {start} (byte {at})"));
            }
            let packed = be32(&chunk[at..at + 4]) as usize;
            let Some(lz4) = chunk.get(at + 4..at + 4 + packed) else {
                return err(format!(
                    "the block at element {start} says {packed} bytes, the chunk has {} left",
                    chunk.len() - at - 4
                ));
            };
            scratch.resize(bytes + SLACK, 0);
            if let Err(e) = inflate(self.isa, lz4, scratch, bytes) {
                return err(format!("the block at element {start} is not LZ4: {e}"));
            }
            untranspose(self.isa, &scratch[..bytes], size, self.elem_size, out);
            self.at = at + 4 + packed;
        } else {
            match chunk.get(at..at + bytes) {
                Some(raw) if at + bytes == chunk.len() => out.copy_from_slice(raw),
                Some(_) => return err(format!("{} bytes follow the last block", chunk.len() - at - bytes)),
                None => return err(format!("the chunk ends before its last {bytes} uncompressed bytes")),
            }
            self.at = chunk.len();
            self.done = true;
        }
        self.start = start + size;
        Ok(())
    }
}

/// Bytes an inflated block needs past its end: copies go up to 64 bytes at a time.
const SLACK: usize = 64;

/// Inflate the LZ4 block `src` into exactly `out[..size]` (`out` is at least
/// `size + SLACK` long; the bytes after `size` are overwritten). Every read
/// and write is checked against the block's bounds before it is made, so a
/// corrupt block is an error, never a read or write outside `src` or `out`.
fn inflate(isa: Isa, src: &[u8], out: &mut [u8], size: usize) -> Result<(), &'static str> {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: Isa::best() found the CPU's instructions (or a test did)
        Isa::Avx512 => return unsafe { inflate_avx512(src, out, size) },
        Isa::Avx2 => return unsafe { inflate_avx2(src, out, size) },
        Isa::Plain => {}
    }
    inflate_any::<Narrow>(src, out, size)
}

/// [`inflate`] compiled for AVX2: a 32-byte copy is one load and one store.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn inflate_avx2(src: &[u8], out: &mut [u8], size: usize) -> Result<(), &'static str> {
    inflate_any::<Narrow>(src, out, size)
}

/// [`inflate`] with AVX-512: 64-byte copies, and a match that overlaps what
/// it writes (a short period) is its period spread over a register, stored.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
unsafe fn inflate_avx512(src: &[u8], out: &mut [u8], size: usize) -> Result<(), &'static str> {
    inflate_any::<Wide>(src, out, size)
}

/// How an inflate copies: literals `LITERALS` bytes at a time when that many
/// are there to read, matches as `copy_match`.
trait Copies {
    const LITERALS: usize;
    /// `out[d..d + len] = out[d - offset..]` byte after byte as LZ4 means it
    /// (the source may overlap what is being written), writing at most
    /// `SLACK - 1` bytes past `d + len`.
    ///
    /// # Safety
    /// `offset` in `1..=d`, and `out` valid for reads and writes up to `d + len + SLACK - 1`.
    unsafe fn copy_match(out: *mut u8, d: usize, offset: usize, len: usize);
}

/// The copies of every CPU: 16 or 32 bytes.
struct Narrow;

impl Copies for Narrow {
    const LITERALS: usize = 16;
    #[inline(always)]
    unsafe fn copy_match(out: *mut u8, d: usize, offset: usize, len: usize) {
        copy_match(out, d, offset, len)
    }
}

/// AVX-512's copies: 32-byte literals, 64-byte matches.
#[cfg(target_arch = "x86_64")]
struct Wide;

#[cfg(target_arch = "x86_64")]
impl Copies for Wide {
    const LITERALS: usize = 32;
    #[inline(always)]
    unsafe fn copy_match(out: *mut u8, d: usize, offset: usize, len: usize) {
        use std::arch::x86_64::*;
        let end = out.add(d + len);
        let mut dst = out.add(d);
        if offset >= 64 {
            // apart by 64 or more: no overlap within one copy
            while dst < end {
                _mm512_storeu_si512(dst as *mut __m512i, _mm512_loadu_si512(dst.sub(offset) as *const __m512i));
                dst = dst.add(64);
            }
            return;
        }
        // a period of `offset` bytes (read from the 64 at `dst - offset`,
        // of which only the first `offset` are indexed) repeated over 64,
        // stored every whole number of periods
        let repeat = _mm512_loadu_si512(REPEAT[offset].as_ptr() as *const __m512i);
        let period = _mm512_permutexvar_epi8(repeat, _mm512_loadu_si512(dst.sub(offset) as *const __m512i));
        let step = offset * (64 / offset);
        while dst < end {
            _mm512_storeu_si512(dst as *mut __m512i, period);
            dst = dst.add(step);
        }
    }
}

/// `REPEAT[p][k] = k % p`: the byte indices of a period of `p` over 64 bytes.
#[cfg(target_arch = "x86_64")]
static REPEAT: [[u8; 64]; 64] = {
    let mut t = [[0u8; 64]; 64];
    let mut p = 1;
    while p < 64 {
        let mut k = 0;
        while k < 64 {
            t[p][k] = (k % p) as u8;
            k += 1;
        }
        p += 1;
    }
    t
};

#[inline(always)]
fn inflate_any<C: Copies>(src: &[u8], out: &mut [u8], size: usize) -> Result<(), &'static str> {
    assert!(out.len() >= size + SLACK);
    let n = src.len();
    let (mut i, mut d) = (0usize, 0usize);
    // the length that follows a nibble of 15: bytes added up to one below 255
    let more = |i: &mut usize| -> Result<usize, &'static str> {
        let mut v = 0usize;
        loop {
            let Some(&b) = src.get(*i) else { return Err("it ends inside a length") };
            *i += 1;
            v += b as usize;
            if b != 255 {
                return Ok(v);
            }
        }
    };
    loop {
        let Some(&token) = src.get(i) else { return Err("it ends before its last literals") };
        i += 1;
        let mut lit = (token >> 4) as usize;
        if lit == 15 {
            lit += more(&mut i)?;
        }
        if lit > n - i || lit > size - d {
            return Err("literals run past the block");
        }
        if lit <= C::LITERALS && n - i >= C::LITERALS {
            // SAFETY: LITERALS bytes of src from i (checked just above), as
            // many of out from d <= size (out has SLACK >= LITERALS more), distinct buffers
            unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(i), out.as_mut_ptr().add(d), C::LITERALS) };
        } else {
            out[d..d + lit].copy_from_slice(&src[i..i + lit]);
        }
        i += lit;
        d += lit;
        if i == n {
            break;
        }
        if n - i < 2 {
            return Err("it ends inside a match offset");
        }
        let offset = u16::from_le_bytes([src[i], src[i + 1]]) as usize;
        i += 2;
        let mut len = (token & 15) as usize;
        if len == 15 {
            len += more(&mut i)?;
        }
        len += 4;
        if offset == 0 || offset > d {
            return Err("a match reaches before the block");
        }
        if len > size - d {
            return Err("a match runs past the block");
        }
        // SAFETY: the match reads from d - offset >= 0 and writes d..d+len
        // (<= size) plus less than SLACK bytes, as far as out goes
        unsafe { C::copy_match(out.as_mut_ptr(), d, offset, len) };
        d += len;
    }
    if d != size {
        return Err("it inflates to fewer bytes than the block holds");
    }
    Ok(())
}

/// `out[d..d + len] = out[d - offset..]` byte after byte as LZ4 means it
/// (the source may overlap what is being written), in 16- or 32-byte copies
/// that may write up to 31 bytes past `d + len` (a run of one byte, a fill).
///
/// # Safety
/// `offset` in `1..=d`, and `out` valid for writes up to `d + len + 31`.
#[inline(always)]
unsafe fn copy_match(out: *mut u8, d: usize, offset: usize, len: usize) {
    let end = out.add(d + len);
    let mut dst = out.add(d);
    if offset == 1 {
        // a run of one byte (the zero bits of detector frames): a fill
        std::ptr::write_bytes(dst, *dst.sub(1), len);
        return;
    }
    if offset >= 32 {
        // apart by 32 or more: 32 bytes a copy, no overlap within one
        while dst < end {
            std::ptr::copy_nonoverlapping(dst.sub(offset), dst, 32);
            dst = dst.add(32);
        }
        return;
    }
    // copying 16 bytes from `dst - step` is right once `step >= 16` is a
    // multiple of the offset and the first `step - offset` bytes are written:
    // from there on `out[p] = out[p - offset] = out[p - step]`
    let step = if offset >= 16 { offset } else { offset * 16usize.div_ceil(offset) };
    let head = (step - offset).min(len);
    for k in 0..head {
        *dst.add(k) = *dst.add(k).sub(offset);
    }
    dst = dst.add(head);
    while dst < end {
        std::ptr::copy_nonoverlapping(dst.sub(step), dst, 16);
        dst = dst.add(16);
    }
}

/// The 8x8 bit-matrix transpose of the bytes of `x` (byte `r` bit `c` to
/// byte `c` bit `r`), as bitshuffle's `TRANS_BIT_8X8`.
#[inline(always)]
fn transpose8(mut x: u64) -> u64 {
    let t = (x ^ (x >> 7)) & 0x00AA_00AA_00AA_00AA;
    x = x ^ t ^ (t << 7);
    let t = (x ^ (x >> 14)) & 0x0000_CCCC_0000_CCCC;
    x = x ^ t ^ (t << 14);
    let t = (x ^ (x >> 28)) & 0x0000_0000_F0F0_F0F0;
    x ^ t ^ (t << 28)
}

/// Bit rows of `n` elements (`n % 8 == 0`) back into elements.
fn untranspose(isa: Isa, planes: &[u8], n: usize, elem_size: usize, out: &mut [u8]) {
    let row = n / 8; // bytes in a bit row
    assert!(planes.len() >= n * elem_size && out.len() >= n * elem_size);
    let mut done = 0; // bytes of each row done
    #[cfg(target_arch = "x86_64")]
    {
        use simd::{groups, Avx2, Sse2};
        // SAFETY (all): the lengths are asserted above; AVX-512 and AVX2
        // only where the CPU has them (Isa::best(), or a test that checked)
        if isa == Isa::Avx512 {
            done = unsafe { gfni::groups(planes, row, elem_size, out) };
        }
        if isa != Isa::Plain {
            done = unsafe { groups::<Avx2>(planes, row, elem_size, out, done) };
        }
        done = unsafe { groups::<Sse2>(planes, row, elem_size, out, done) };
    }
    for j in 0..elem_size {
        let rows: [&[u8]; 8] = std::array::from_fn(|b| &planes[(j * 8 + b) * row..(j * 8 + b + 1) * row]);
        for q in done..row {
            let x = u64::from_le_bytes(std::array::from_fn(|b| rows[b][q]));
            let t = transpose8(x).to_le_bytes();
            let base = 8 * q * elem_size + j;
            for i in 0..8 {
                out[base + i * elem_size] = t[i];
            }
        }
    }
}

/// The bit transpose in SIMD: 16 bytes of every bit row at a time (SSE2, on
/// every x86_64) or 32 (AVX2), the same code over either register.
///
/// Bit row `8j + b`, byte `q`, bit `i` is bit `b` of byte `j` of element
/// `8q + i`. The 8 rows of byte `j`, loaded as 8 vectors, are an 8x8 bit
/// matrix in each byte lane (vector `b`, bit `i`); transposed (three rounds
/// of swaps) vector `i` byte `q` is byte `j` of element `8q + i`, and
/// interleaving the vectors, then the bytes of an element, puts them in order.
#[cfg(target_arch = "x86_64")]
mod simd {
    use std::arch::x86_64::*;

    /// A SIMD register as the transpose uses it; AVX2's works in two 128-bit
    /// lanes, each doing what one SSE2 register does for its 16 bytes of rows.
    pub(super) trait Vector: Copy {
        /// Bytes of a row taken at a time.
        const WIDTH: usize;
        unsafe fn load(at: *const u8) -> Self;
        /// Store lane 0 at `at`, lane 1 (AVX2) `lane` bytes further on.
        unsafe fn store(self, at: *mut u8, lane: usize);
        unsafe fn zero() -> Self;
        unsafe fn is_zero(self) -> bool;
        unsafe fn or(self, o: Self) -> Self;
        /// Bits `p + S` of each byte of `a` and bits `p` of `c`, `p` in
        /// `keep` (those with `p & S == 0`), swapped.
        unsafe fn swap<const S: i32>(a: &mut Self, c: &mut Self, keep: u8);
        unsafe fn unpack8(self, o: Self) -> (Self, Self);
        unsafe fn unpack16(self, o: Self) -> (Self, Self);
        unsafe fn unpack32(self, o: Self) -> (Self, Self);
    }

    #[derive(Clone, Copy)]
    pub(super) struct Sse2(__m128i);
    #[derive(Clone, Copy)]
    pub(super) struct Avx2(__m256i);

    impl Vector for Sse2 {
        const WIDTH: usize = 16;
        #[inline(always)]
        unsafe fn load(at: *const u8) -> Self {
            Sse2(_mm_loadu_si128(at as *const __m128i))
        }
        #[inline(always)]
        unsafe fn store(self, at: *mut u8, _: usize) {
            _mm_storeu_si128(at as *mut __m128i, self.0)
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            Sse2(_mm_setzero_si128())
        }
        #[inline(always)]
        unsafe fn is_zero(self) -> bool {
            _mm_movemask_epi8(_mm_cmpeq_epi8(self.0, _mm_setzero_si128())) == 0xFFFF
        }
        #[inline(always)]
        unsafe fn or(self, o: Self) -> Self {
            Sse2(_mm_or_si128(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn swap<const S: i32>(a: &mut Self, c: &mut Self, keep: u8) {
            let t = _mm_and_si128(_mm_xor_si128(_mm_srli_epi16::<S>(a.0), c.0), _mm_set1_epi8(keep as i8));
            c.0 = _mm_xor_si128(c.0, t);
            a.0 = _mm_xor_si128(a.0, _mm_slli_epi16::<S>(t));
        }
        #[inline(always)]
        unsafe fn unpack8(self, o: Self) -> (Self, Self) {
            (Sse2(_mm_unpacklo_epi8(self.0, o.0)), Sse2(_mm_unpackhi_epi8(self.0, o.0)))
        }
        #[inline(always)]
        unsafe fn unpack16(self, o: Self) -> (Self, Self) {
            (Sse2(_mm_unpacklo_epi16(self.0, o.0)), Sse2(_mm_unpackhi_epi16(self.0, o.0)))
        }
        #[inline(always)]
        unsafe fn unpack32(self, o: Self) -> (Self, Self) {
            (Sse2(_mm_unpacklo_epi32(self.0, o.0)), Sse2(_mm_unpackhi_epi32(self.0, o.0)))
        }
    }

    impl Vector for Avx2 {
        const WIDTH: usize = 32;
        #[inline(always)]
        unsafe fn load(at: *const u8) -> Self {
            Avx2(_mm256_loadu_si256(at as *const __m256i))
        }
        #[inline(always)]
        unsafe fn store(self, at: *mut u8, lane: usize) {
            _mm_storeu_si128(at as *mut __m128i, _mm256_castsi256_si128(self.0));
            _mm_storeu_si128(at.add(lane) as *mut __m128i, _mm256_extracti128_si256::<1>(self.0));
        }
        #[inline(always)]
        unsafe fn zero() -> Self {
            Avx2(_mm256_setzero_si256())
        }
        #[inline(always)]
        unsafe fn is_zero(self) -> bool {
            _mm256_testz_si256(self.0, self.0) == 1
        }
        #[inline(always)]
        unsafe fn or(self, o: Self) -> Self {
            Avx2(_mm256_or_si256(self.0, o.0))
        }
        #[inline(always)]
        unsafe fn swap<const S: i32>(a: &mut Self, c: &mut Self, keep: u8) {
            let t = _mm256_and_si256(_mm256_xor_si256(_mm256_srli_epi16::<S>(a.0), c.0), _mm256_set1_epi8(keep as i8));
            c.0 = _mm256_xor_si256(c.0, t);
            a.0 = _mm256_xor_si256(a.0, _mm256_slli_epi16::<S>(t));
        }
        #[inline(always)]
        unsafe fn unpack8(self, o: Self) -> (Self, Self) {
            (Avx2(_mm256_unpacklo_epi8(self.0, o.0)), Avx2(_mm256_unpackhi_epi8(self.0, o.0)))
        }
        #[inline(always)]
        unsafe fn unpack16(self, o: Self) -> (Self, Self) {
            (Avx2(_mm256_unpacklo_epi16(self.0, o.0)), Avx2(_mm256_unpackhi_epi16(self.0, o.0)))
        }
        #[inline(always)]
        unsafe fn unpack32(self, o: Self) -> (Self, Self) {
            (Avx2(_mm256_unpacklo_epi32(self.0, o.0)), Avx2(_mm256_unpackhi_epi32(self.0, o.0)))
        }
    }

    /// Byte `j` of the elements of rows' bytes `at..at + WIDTH`: per lane,
    /// 8 vectors of 16 elements in order; None when all its bits are 0.
    #[inline(always)]
    unsafe fn plane<V: Vector>(planes: *const u8, row: usize, j: usize, at: usize) -> Option<[V; 8]> {
        let mut r: [V; 8] = std::array::from_fn(|b| unsafe { V::load(planes.add((8 * j + b) * row + at)) });
        if r.iter().fold(V::zero(), |a, &v| unsafe { a.or(v) }).is_zero() {
            return None;
        }
        for b in [0, 2, 4, 6] {
            let (lo, hi) = r.split_at_mut(b + 1);
            V::swap::<1>(&mut lo[b], &mut hi[0], 0x55);
        }
        for b in [0, 1, 4, 5] {
            let (lo, hi) = r.split_at_mut(b + 1);
            V::swap::<2>(&mut lo[b], &mut hi[1], 0x33);
        }
        for b in [0, 1, 2, 3] {
            let (lo, hi) = r.split_at_mut(b + 1);
            V::swap::<4>(&mut lo[b], &mut hi[3], 0x0F);
        }
        // vector i byte q -> element 8q + i: interleave bytes, pairs, fours
        let a: [(V, V); 4] = std::array::from_fn(|k| unsafe { r[2 * k].unpack8(r[2 * k + 1]) });
        let mut e = [V::zero(); 8];
        for half in 0..2 {
            let pick = |x: (V, V)| if half == 0 { x.0 } else { x.1 };
            let (b0, b1) = pick(a[0]).unpack16(pick(a[1]));
            let (c0, c1) = pick(a[2]).unpack16(pick(a[3]));
            (e[4 * half], e[4 * half + 1]) = b0.unpack32(c0);
            (e[4 * half + 2], e[4 * half + 3]) = b1.unpack32(c1);
        }
        Some(e)
    }

    /// The elements of rows' bytes `at..at + V::WIDTH`, bytes interleaved.
    #[inline(always)]
    unsafe fn group<V: Vector, const E: usize>(planes: *const u8, row: usize, at: usize, out: *mut u8) {
        let z = [V::zero(); 8];
        let p: [[V; 8]; E] = std::array::from_fn(|j| unsafe { plane::<V>(planes, row, j, at).unwrap_or(z) });
        let out = out.add(8 * at * E);
        let lane = 128 * E; // bytes of the elements of one lane's 16 bytes of rows
        // vector k of every plane: elements 16k..16k+16 of the lane
        for k in 0..8 {
            let put = |t: usize, v: V| unsafe { v.store(out.add(16 * (E * k + t)), lane) };
            match E {
                1 => put(0, p[0][k]),
                2 => {
                    let (l, h) = p[0][k].unpack8(p[1][k]);
                    put(0, l);
                    put(1, h);
                }
                4 => {
                    let (l01, h01) = p[0][k].unpack8(p[1][k]);
                    let (l23, h23) = p[2][k].unpack8(p[3][k]);
                    let ((a, b), (c, d)) = (l01.unpack16(l23), h01.unpack16(h23));
                    for (t, v) in [a, b, c, d].into_iter().enumerate() {
                        put(t, v);
                    }
                }
                _ => {
                    let pair = |x: usize| unsafe { p[x][k].unpack8(p[x + 1][k]) };
                    let (a, b, c, d) = (pair(0), pair(2), pair(4), pair(6));
                    let (ab0, ab1) = (a.0.unpack16(b.0), a.1.unpack16(b.1));
                    let (cd0, cd1) = (c.0.unpack16(d.0), c.1.unpack16(d.1));
                    for (t, (x, y)) in [(ab0.0, cd0.0), (ab0.1, cd0.1), (ab1.0, cd1.0), (ab1.1, cd1.1)].into_iter().enumerate() {
                        let (l, h) = x.unpack32(y);
                        put(2 * t, l);
                        put(2 * t + 1, h);
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn each<V: Vector, const E: usize>(planes: *const u8, row: usize, out: *mut u8, from: usize) -> usize {
        let mut at = from;
        while at + V::WIDTH <= row {
            group::<V, E>(planes, row, at, out);
            at += V::WIDTH;
        }
        at
    }

    /// Elements from their bit rows, `V::WIDTH` bytes of each row at a time
    /// from byte `from`, as far as whole groups go; returns where it stopped.
    ///
    /// # Safety
    /// `planes` holds `8 * elem_size` rows of `row` bytes and `out` as many
    /// bytes; the CPU has `V`'s instructions.
    #[inline(always)]
    unsafe fn groups_of<V: Vector>(planes: &[u8], row: usize, elem_size: usize, out: &mut [u8], from: usize) -> usize {
        let (p, o) = (planes.as_ptr(), out.as_mut_ptr());
        match elem_size {
            1 => each::<V, 1>(p, row, o, from),
            2 => each::<V, 2>(p, row, o, from),
            4 => each::<V, 4>(p, row, o, from),
            _ => each::<V, 8>(p, row, o, from),
        }
    }

    /// [`groups_of`], compiled for the instructions of `V`.
    pub(super) unsafe fn groups<V: Compiled>(planes: &[u8], row: usize, elem_size: usize, out: &mut [u8], from: usize) -> usize {
        V::groups(planes, row, elem_size, out, from)
    }

    pub(super) trait Compiled {
        unsafe fn groups(planes: &[u8], row: usize, elem_size: usize, out: &mut [u8], from: usize) -> usize;
    }
    impl Compiled for Sse2 {
        unsafe fn groups(planes: &[u8], row: usize, elem_size: usize, out: &mut [u8], from: usize) -> usize {
            groups_of::<Sse2>(planes, row, elem_size, out, from)
        }
    }
    impl Compiled for Avx2 {
        #[target_feature(enable = "avx2")]
        unsafe fn groups(planes: &[u8], row: usize, elem_size: usize, out: &mut [u8], from: usize) -> usize {
            groups_of::<Avx2>(planes, row, elem_size, out, from)
        }
    }
}

/// The bit transpose with AVX-512 and GFNI, 64 bytes of each bit row at a time.
///
/// The 8 rows of byte `j` of the elements, 64 bytes each, are transposed as
/// bytes (three rounds of two-register byte permutes) so that each 64-bit
/// word holds byte `q` of the 8 rows, the last row first: an 8x8 bit matrix,
/// which one GF(2) affine instruction transposes into byte `j` of elements
/// `8q..8q + 8`. Interleaving the words of the planes `j` (one, two or three
/// more rounds of permutes) puts the elements' bytes in order.
#[cfg(target_arch = "x86_64")]
mod gfni {
    use std::arch::x86_64::*;

    /// A byte permute of two registers, `(a, b)` indexed as 128 bytes.
    type Index = [u8; 64];

    fn build(f: impl Fn(usize) -> usize) -> Index {
        std::array::from_fn(|n| f(n) as u8)
    }

    /// The index vectors of every round, made once.
    struct Indices {
        /// rows to words: pairs of rows' bytes, fours, eights (`[half]` each)
        rows2: [Index; 2],
        rows4: [Index; 2],
        rows8: [Index; 2],
        /// words of planes to elements: 2, 4 and 8 bytes of each
        elems2: [Index; 2],
        elems4: [Index; 2],
        elems8: [Index; 2],
    }

    fn indices() -> &'static Indices {
        static INDICES: std::sync::OnceLock<Indices> = std::sync::OnceLock::new();
        INDICES.get_or_init(|| Indices {
            // S_p = row 7 - p; A_h[2m + e] = S_e[32h + m]
            rows2: std::array::from_fn(|h| build(|n| (n % 2) * 64 + 32 * h + n / 2)),
            // B_g[4m + e] = A[2(16g + m) + e % 2] of the pair e / 2
            rows4: std::array::from_fn(|g| build(|n| (n % 4 / 2) * 64 + 2 * (16 * g + n / 4) + n % 2)),
            // X_f[8u + p] = B[4(8f + u) + p % 4] of the four p / 4
            rows8: std::array::from_fn(|f| build(|n| (n % 8 / 4) * 64 + 4 * (8 * f + n / 8) + n % 4)),
            // word u byte k of planes j = 0, 1 -> [16(u - 4h) + 2k + j]
            elems2: std::array::from_fn(|h| build(|n| (n % 2) * 64 + 8 * (4 * h + n / 16) + n % 16 / 2)),
            // pairs (2k + j) of planes 0-1, 2-3 -> [32v + 4k + j], u = 2g + v of the half
            elems4: std::array::from_fn(|g| build(|n| (n % 4 / 2) * 64 + 16 * (2 * g + n / 32) + 2 * (n % 32 / 4) + n % 2)),
            // fours (4k + j) of planes 0-3, 4-7 -> [8k + j], one word u = v of the pair
            elems8: std::array::from_fn(|v| build(|n| (n % 8 / 4) * 64 + 32 * v + 4 * (n / 8) + n % 4)),
        })
    }

    #[inline(always)]
    unsafe fn load(i: &Index) -> __m512i {
        _mm512_loadu_si512(i.as_ptr() as *const __m512i)
    }

    #[inline(always)]
    unsafe fn permute(a: __m512i, i: __m512i, b: __m512i) -> __m512i {
        _mm512_permutex2var_epi8(a, i, b)
    }

    /// The indices as registers.
    #[derive(Clone, Copy)]
    struct Regs {
        rows: [[__m512i; 2]; 3],
        elems: [[__m512i; 2]; 3],
    }

    /// The elements of rows' bytes `at..at + 64`, bytes interleaved.
    ///
    /// Per plane `j` (rows `8j..8j + 8`, S_p = row 7 - p): pairs of rows
    /// (A), fours (B) and eights (X, register `t` word `u` for
    /// `q = at + 8t + u`), each round two halves of the last; worked half by
    /// half (h, g, f) so that the registers of all planes at one `t` fit in
    /// the 32 there are. A plane whose bits are all 0 is left 0.
    #[inline(always)]
    unsafe fn group<const E: usize>(planes: *const u8, row: usize, at: usize, out: *mut u8, x: &Regs) {
        let rows = |j: usize| -> [__m512i; 8] {
            std::array::from_fn(|p| unsafe { _mm512_loadu_si512(planes.add((8 * j + 7 - p) * row + at) as *const __m512i) })
        };
        let live: [bool; E] = std::array::from_fn(|j| unsafe {
            let any = rows(j).iter().fold(_mm512_setzero_si512(), |a, &v| _mm512_or_si512(a, v));
            _mm512_test_epi64_mask(any, any) != 0
        });
        let zero = _mm512_setzero_si512();
        // the words' bits transposed: x (the matrix) times the bytes 1 << k
        let unit = _mm512_set1_epi64(0x8040_2010_0804_0201u64 as i64);
        let [r2, r4, r8] = x.rows;
        let [e2, e4, e8] = x.elems;
        for h in 0..2 {
            // A of pair c, half h
            let a: [[__m512i; 4]; E] = std::array::from_fn(|j| {
                if !live[j] {
                    return [zero; 4];
                }
                let s = rows(j);
                std::array::from_fn(|c| unsafe { permute(s[2 * c], r2[h], s[2 * c + 1]) })
            });
            for g in 0..2 {
                // B of four d, half (h, g)
                let b: [[__m512i; 2]; E] =
                    std::array::from_fn(|j| std::array::from_fn(|d| unsafe { permute(a[j][2 * d], r4[g], a[j][2 * d + 1]) }));
                for f in 0..2 {
                    let t = 4 * h + 2 * g + f;
                    // byte j of elements 8q..8q + 8 in word q
                    let y: [__m512i; E] = std::array::from_fn(|j| unsafe {
                        if live[j] {
                            _mm512_gf2p8affine_epi64_epi8::<0>(unit, permute(b[j][0], r8[f], b[j][1]))
                        } else {
                            zero
                        }
                    });
                    // elements 8(at + 8t).. : 64 E bytes
                    let o = out.add(E * 8 * (at + 8 * t)) as *mut __m512i;
                    match E {
                        1 => _mm512_storeu_si512(o, y[0]),
                        2 => {
                            for k in 0..2 {
                                _mm512_storeu_si512(o.add(k), permute(y[0], e2[k], y[1]));
                            }
                        }
                        4 => {
                            for k in 0..2 {
                                let (w01, w23) = (permute(y[0], e2[k], y[1]), permute(y[2], e2[k], y[3]));
                                for l in 0..2 {
                                    _mm512_storeu_si512(o.add(2 * k + l), permute(w01, e4[l], w23));
                                }
                            }
                        }
                        _ => {
                            for k in 0..2 {
                                let w: [__m512i; 4] = std::array::from_fn(|c| unsafe { permute(y[2 * c], e2[k], y[2 * c + 1]) });
                                for l in 0..2 {
                                    let (z0, z1) = (permute(w[0], e4[l], w[1]), permute(w[2], e4[l], w[3]));
                                    for v in 0..2 {
                                        _mm512_storeu_si512(o.add(4 * k + 2 * l + v), permute(z0, e8[v], z1));
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[inline(always)]
    unsafe fn each<const E: usize>(planes: *const u8, row: usize, out: *mut u8, x: &Regs) -> usize {
        let mut at = 0;
        while at + 64 <= row {
            group::<E>(planes, row, at, out, x);
            at += 64;
        }
        at
    }

    /// Elements from their bit rows, 64 bytes of each row at a time, as far
    /// as whole groups go; returns where it stopped.
    ///
    /// # Safety
    /// `planes` holds `8 * elem_size` rows of `row` bytes and `out` as many
    /// bytes; the CPU has AVX-512 F, BW, VBMI and GFNI.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi,gfni")]
    pub(super) unsafe fn groups(planes: &[u8], row: usize, elem_size: usize, out: &mut [u8]) -> usize {
        let i = indices();
        let pair = |r: &[Index; 2]| unsafe { [load(&r[0]), load(&r[1])] };
        let x = Regs { rows: [pair(&i.rows2), pair(&i.rows4), pair(&i.rows8)], elems: [pair(&i.elems2), pair(&i.elems4), pair(&i.elems8)] };
        let (p, o) = (planes.as_ptr(), out.as_mut_ptr());
        match elem_size {
            1 => each::<1>(p, row, o, &x),
            2 => each::<2>(p, row, o, &x),
            4 => each::<4>(p, row, o, &x),
            _ => each::<8>(p, row, o, &x),
        }
    }
}

/// Encode `data` (elements `elem_size` bytes wide) as a bitshuffle-LZ4 chunk
/// with blocks of `block` elements: the inverse of [`decode_into`], for the
/// tests and the simulated detector.
pub fn encode(data: &[u8], elem_size: usize, block: usize) -> Vec<u8> {
    assert!(block > 0 && block % 8 == 0 && data.len() % elem_size == 0);
    let n = data.len() / elem_size;
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    out.extend_from_slice(&(data.len() as u64).to_be_bytes());
    out.extend_from_slice(&((block * elem_size) as u32).to_be_bytes());
    let last = {
        let rest = n % block;
        rest - rest % 8
    };
    let mut start = 0;
    for size in (0..n / block).map(|_| block).chain((last > 0).then_some(last)) {
        let elems = &data[start * elem_size..(start + size) * elem_size];
        let row = size / 8;
        let mut planes = vec![0u8; elems.len()];
        for j in 0..elem_size {
            for q in 0..row {
                let x = u64::from_le_bytes(std::array::from_fn(|i| elems[(8 * q + i) * elem_size + j]));
                let t = transpose8(x).to_le_bytes();
                for b in 0..8 {
                    planes[(j * 8 + b) * row + q] = t[b];
                }
            }
        }
        let packed = lz4_flex::block::compress(&planes);
        out.extend_from_slice(&(packed.len() as u32).to_be_bytes());
        out.extend_from_slice(&packed);
        start += size;
    }
    out.extend_from_slice(&data[start * elem_size..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize) -> Vec<u8> {
        let mut s = 99u64;
        (0..n as u32)
            .flat_map(|i| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1);
                let v: u32 = if i % 97 == 0 { u32::MAX } else { ((s >> 40) % 7) as u32 };
                v.to_le_bytes()
            })
            .collect()
    }

    #[test]
    fn round_trips_whole_and_partial_blocks() {
        for n in [0usize, 1, 7, 8, 9, 2048, 2049, 2055, 2056, 5000] {
            let data = values(n);
            let chunk = encode(&data, 4, 2048);
            let mut out = vec![0u8; data.len()];
            decode_into(&chunk, 4, &mut out, &mut Vec::new()).unwrap();
            assert_eq!(out, data, "{n} elements");
        }
    }

    #[test]
    fn a_reader_skips_whole_blocks_and_decodes_on_from_the_next() {
        // blocks of 256 elements of 4 bytes, a partial block and a raw rest
        let data = values(5 * 256 + 100 + 5);
        let chunk = encode(&data, 4, 256);
        for e in [0usize, 1, 255, 256, 257, 1000, 5 * 256, 5 * 256 + 99, 10_000] {
            let mut reader = Reader::new(&chunk, 4, data.len()).unwrap();
            let start = reader.skip_to(e).unwrap();
            assert_eq!(start, (e / 256).min(5) * 256, "skipping to element {e}");
            let mut scratch = Vec::new();
            let mut at = start * 4;
            while let Some(n) = reader.next_piece() {
                let mut out = vec![0u8; n * 4];
                reader.decode_piece(&mut out, &mut scratch).unwrap();
                assert_eq!(out, data[at..at + n * 4], "the piece at byte {at} after skipping to element {e}");
                at += n * 4;
            }
            assert_eq!(at, data.len());
        }
        // a block's length pointing past the chunk's end is an error, not a skip
        let mut cut = chunk.clone();
        cut.truncate(12 + 4 + 10);
        let mut reader = Reader::new(&cut, 4, data.len()).unwrap();
        assert!(reader.skip_to(600).unwrap_err().0.contains("the block at element 0 says"));
    }

    /// Bytes of every kind: random, small counts, zero runs, short periods
    /// (LZ4 matches that overlap what they write).
    fn mixed(n: usize, seed: u64) -> Vec<u8> {
        let mut s = seed;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            s >> 33
        };
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let len = (next() % 700) as usize + 1;
            match next() % 4 {
                0 => out.extend((0..len).map(|_| next() as u8)),
                1 => out.extend((0..len).map(|_| (next() % 3 == 0) as u8)),
                2 => out.extend(std::iter::repeat(0).take(len)),
                _ => {
                    let period: Vec<u8> = (0..next() % 19 + 1).map(|_| next() as u8).collect();
                    out.extend(period.iter().cycle().take(len));
                }
            }
        }
        out.truncate(n);
        out
    }

    #[test]
    fn every_element_size_round_trips_through_the_simd_and_scalar_paths() {
        // rows of 16 and 32 bytes and the odd bytes after them
        for elem in [1usize, 2, 4, 8] {
            for (n, block) in [(8 * 32 * 3 + 8 * 17, 8 * 32 * 2), (8192 / elem * 3 + 40, 8192 / elem), (1000, 1000 - 1000 % 8)] {
                let data = mixed(n * elem, (n * elem) as u64);
                let chunk = encode(&data, elem, block);
                let mut out = vec![0u8; data.len()];
                decode_into(&chunk, elem, &mut out, &mut Vec::new()).unwrap();
                assert_eq!(out, data, "{elem}-byte elements, {n} of them, blocks of {block}");
            }
        }
    }

    /// The instruction sets this CPU runs, the plain ones first.
    fn isas() -> Vec<Isa> {
        match Isa::best() {
            Isa::Avx512 => vec![Isa::Plain, Isa::Avx2, Isa::Avx512],
            Isa::Avx2 => vec![Isa::Plain, Isa::Avx2],
            Isa::Plain => vec![Isa::Plain],
        }
    }

    #[test]
    fn lz4_blocks_inflate_as_lz4_flex_inflates_them() {
        for isa in isas() {
            for seed in 0..40 {
                let data = mixed(5000 + 997 * seed as usize, seed);
                let packed = lz4_flex::block::compress(&data);
                let mut out = vec![0u8; data.len() + SLACK];
                inflate(isa, &packed, &mut out, data.len()).unwrap();
                assert_eq!(&out[..data.len()], &data[..], "{isa:?}");
                assert!(inflate(isa, &packed, &mut vec![0; data.len() + SLACK + 1], data.len() + 1).is_err());
            }
        }
    }

    #[test]
    fn matches_of_every_period_inflate_the_same_on_every_path() {
        // periods 1..=140 (a register's worth and past it, where the wide
        // copy changes method at 64) of lengths 4..=600, between literals
        let mut s = 7u64;
        let mut next = move || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (s >> 33) as usize
        };
        for round in 0..6 {
            let mut data = Vec::new();
            for period in 1..=140 {
                data.extend((0..next() % 70).map(|_| next() as u8));
                let first: Vec<u8> = (0..period).map(|_| next() as u8).collect();
                let len = period + 4 + next() % (600 + 200 * round);
                data.extend(first.iter().cycle().take(len));
            }
            let packed = lz4_flex::block::compress(&data);
            for isa in isas() {
                let mut out = vec![0u8; data.len() + SLACK];
                inflate(isa, &packed, &mut out, data.len()).unwrap();
                assert!(out[..data.len()] == data[..], "{isa:?}, round {round}");
            }
        }
    }

    #[test]
    fn every_path_decodes_every_element_size_to_the_same_bytes() {
        // rows of 64 + 32 + 16 + 8 + 5 bytes (every vector width, then the
        // scalar rest), a partial last block, and up to 7 elements left raw
        for elem in [1usize, 2, 4, 8] {
            let odd = 8 * (64 * 2 + 32 + 16 + 8 + 5);
            let shapes = [
                (3 * odd + 8 * 77 + 5, odd),
                (2 * (8192 / elem) + 8 * 100 + 3, 8192 / elem),
                (8 * 64 * 3 + 7, 8 * 64),
                (7, 8 * 64),
                (8 * 9 + 1, 8 * 64),
            ];
            for (n, block) in shapes {
                let random = mixed(n * elem, (n * elem + block) as u64);
                // small counts: bytes past the first 0, but in one element of 61
                let counts: Vec<u8> = random.iter().enumerate().map(|(k, &b)| if k % elem == 0 || k / elem % 61 == 0 { b } else { 0 }).collect();
                for data in [random, counts] {
                    let chunk = encode(&data, elem, block);
                    for isa in isas() {
                        let mut out = vec![0u8; data.len()];
                        decode_with(isa, &chunk, elem, &mut out, &mut Vec::new()).unwrap();
                        assert!(out == data, "{isa:?}: {elem}-byte elements, {n} of them, blocks of {block}");
                    }
                }
            }
        }
    }

    #[test]
    fn every_path_puts_the_same_bits_back() {
        // bit rows of random bytes: no plane all 0
        for elem in [1usize, 2, 4, 8] {
            for n in [8, 8 * 16, 8 * 64, 8 * (64 * 3 + 32 + 16 + 8 + 3)] {
                let planes = mixed(n * elem, n as u64 + 3);
                let plain = {
                    let mut out = vec![0u8; n * elem];
                    untranspose(Isa::Plain, &planes, n, elem, &mut out);
                    out
                };
                for isa in isas() {
                    let mut out = vec![0u8; n * elem];
                    untranspose(isa, &planes, n, elem, &mut out);
                    assert!(out == plain, "{isa:?}: {elem}-byte elements, {n} of them");
                }
            }
        }
    }

    #[test]
    fn damaged_chunks_are_errors_or_frames_never_a_crash() {
        // and the same error, or the same frame, on every path
        let data = mixed(4 * 3000, 5);
        let chunk = encode(&data, 4, 2048);
        let mut s = 17u64;
        let decoded = |isa: Isa, bad: &[u8]| {
            let mut out = vec![0u8; data.len()];
            decode_with(isa, bad, 4, &mut out, &mut Vec::new()).map(|()| out)
        };
        for _ in 0..3000 {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let mut bad = chunk.clone();
            let at = 12 + (s >> 33) as usize % (bad.len() - 12);
            bad[at] ^= 1 << ((s >> 20) % 8);
            let plain = decoded(Isa::Plain, &bad);
            for isa in isas() {
                assert!(decoded(isa, &bad) == plain, "{isa:?}, bit flipped at byte {at}");
            }
        }
        for isa in isas() {
            for cut in (0..chunk.len()).step_by(7) {
                assert!(decoded(isa, &chunk[..cut]).is_err(), "{isa:?}, cut at {cut}");
            }
        }
    }

    #[test]
    fn a_bit_lands_where_bitshuffle_puts_it() {
        // element 9 of 16, byte 1, bit 3: row 1*8+3, byte 9/8 = 1, bit 9%8 = 1
        let mut data = vec![0u8; 16 * 2];
        data[9 * 2 + 1] = 1 << 3;
        let mut planes = vec![0u8; 32];
        planes[(8 + 3) * 2 + 1] = 1 << 1;
        let mut out = vec![0u8; 32];
        untranspose(Isa::best(), &planes, 16, 2, &mut out);
        assert_eq!(out, data);
    }

    #[test]
    fn corrupt_chunks_are_named() {
        let data = values(3003); // 3 elements left over, uncompressed at the end
        let chunk = encode(&data, 4, 2048);
        let mut out = vec![0u8; data.len()];
        let e = decode_into(&chunk[..chunk.len() - 5], 4, &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.0.contains("ends before its last 12"), "{e}");
        let e = decode_into(&[&chunk[..], &[0]].concat(), 4, &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.0.contains("1 bytes follow"), "{e}");
        let e = decode_into(&chunk[..100], 4, &mut out, &mut Vec::new()).unwrap_err();
        assert!(e.0.contains("says"), "{e}");
        let e = decode_into(&chunk, 4, &mut out[..8], &mut Vec::new()).unwrap_err();
        assert!(e.0.contains("the frame needs 8"), "{e}");
        let mut bad = chunk.clone();
        bad[16] ^= 0xFF;
        bad[17] ^= 0xFF;
        assert!(decode_into(&bad, 4, &mut out, &mut Vec::new()).is_err());
        assert!(decode_into(&chunk[..4], 4, &mut out, &mut Vec::new()).unwrap_err().0.contains("header"));
    }
}

#[cfg(test)]
mod timing {
    use super::*;
    use std::time::Instant;

    /// `BSLZ4_CHUNK=path cargo test --release timing -- --ignored --nocapture`:
    /// the LZ4 inflate and the bit untranspose of a recorded chunk, timed apart.
    #[test]
    #[ignore]
    fn time_a_recorded_chunk() {
        let Ok(path) = std::env::var("BSLZ4_CHUNK") else { return };
        let chunk = std::fs::read(&path).unwrap();
        let elem = 4;
        let bytes = uncompressed_size(&chunk).unwrap() as usize;
        let mut out = vec![0u8; bytes];
        let mut scratch = Vec::new();
        let best = |f: &mut dyn FnMut()| {
            let mut t: Vec<f64> = (0..200)
                .map(|_| {
                    let s = Instant::now();
                    f();
                    s.elapsed().as_secs_f64() * 1e3
                })
                .collect();
            t.sort_by(|a, b| a.partial_cmp(b).unwrap());
            (t[0], t[t.len() / 2])
        };
        let whole = best(&mut || decode_into(&chunk, elem, &mut out, &mut scratch).unwrap());
        for isa in [Isa::Plain, Isa::Avx2, Isa::Avx512, Isa::Avx2, Isa::Avx512] {
            let t = best(&mut || decode_with(isa, &chunk, elem, &mut out, &mut scratch).unwrap());
            println!("{path}: decoded with {isa:?} {t:.3?} ms");
        }
        // the blocks, inflated only
        let block_bytes = be32(&chunk[8..12]) as usize;
        let mut blocks = Vec::new();
        let mut at = 12;
        while at + 4 <= chunk.len() && blocks.len() < bytes / block_bytes {
            let n = be32(&chunk[at..at + 4]) as usize;
            blocks.push(&chunk[at + 4..at + 4 + n]);
            at += 4 + n;
        }
        let mut buf = vec![0u8; block_bytes + SLACK];
        let lz = best(&mut || {
            for b in &blocks {
                inflate(Isa::best(), b, &mut buf, block_bytes).unwrap();
            }
        });
        // the untranspose only, of one block's planes, as often
        inflate(Isa::best(), blocks[blocks.len() / 2], &mut buf, block_bytes).unwrap();
        let un = best(&mut || {
            for (k, o) in out.chunks_exact_mut(block_bytes).enumerate() {
                let _ = k;
                untranspose(Isa::best(), &buf[..block_bytes], block_bytes / elem, elem, o);
            }
        });
        // every block inflated (a realistic mix of planes all 0 and not)
        let mut inflated = vec![0u8; blocks.len() * block_bytes + 64];
        let base = inflated.as_ptr().align_offset(64);
        for (k, b) in blocks.iter().enumerate() {
            inflate(Isa::best(), b, &mut buf, block_bytes).unwrap();
            inflated[base + k * block_bytes..base + (k + 1) * block_bytes].copy_from_slice(&buf[..block_bytes]);
        }
        for isa in [Isa::Plain, Isa::Avx2, Isa::Avx512] {
            let mut small = vec![0u8; block_bytes + 64];
            let a = small.as_ptr().align_offset(64);
            let cached = best(&mut || {
                for k in 0..blocks.len() {
                    let planes = &inflated[base + k * block_bytes..base + (k + 1) * block_bytes];
                    untranspose(isa, planes, block_bytes / elem, elem, &mut small[a..a + block_bytes]);
                }
            });
            println!("{path}: untranspose {isa:?} of every block into one cached block {cached:.3?} ms");
        }
        let fill = best(&mut || {
            for o in out.chunks_exact_mut(block_bytes) {
                o.copy_from_slice(&buf[..block_bytes]);
            }
        });
        println!("{path}: copying the blocks out {fill:.3?} ms");
        println!("{path}: whole {whole:.3?} ms, inflate {lz:.3?} ms, untranspose {un:.3?} ms (min, median)");
    }
}
