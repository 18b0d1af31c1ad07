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

/// Decode `chunk` of elements `elem_size` bytes wide into `out` (exactly the
/// uncompressed size). `scratch` is reused between calls.
pub fn decode_into(chunk: &[u8], elem_size: usize, out: &mut [u8], scratch: &mut Vec<u8>) -> Result<(), ChunkError> {
    let total = uncompressed_size(chunk)?;
    if total != out.len() as u64 {
        return err(format!("the chunk holds {total} bytes, the frame needs {}", out.len()));
    }
    if !matches!(elem_size, 1 | 2 | 4 | 8) || out.len() % elem_size != 0 {
        return err(format!("elements of {elem_size} bytes cannot fill {} bytes", out.len()));
    }
    let block_bytes = be32(&chunk[8..12]) as usize;
    let block = block_bytes / elem_size;
    if block == 0 || block % 8 != 0 || block_bytes % elem_size != 0 {
        return err(format!("a block size of {block_bytes} bytes is not a multiple of 8 elements of {elem_size} bytes"));
    }
    let n = out.len() / elem_size;
    let mut at = 12usize;
    let mut start = 0usize; // element
    let last = {
        let rest = n % block;
        rest - rest % 8
    };
    let blocks = (0..n / block).map(|_| block).chain((last > 0).then_some(last));
    for size in blocks {
        let bytes = size * elem_size;
        if chunk.len() < at + 4 {
            return err(format!("the chunk ends inside the block at element {start} (byte {at})"));
        }
        let packed = be32(&chunk[at..at + 4]) as usize;
        at += 4;
        let Some(lz4) = chunk.get(at..at + packed) else {
            return err(format!(
                "the block at element {start} says {packed} bytes, the chunk has {} left",
                chunk.len() - at
            ));
        };
        scratch.resize(bytes, 0);
        match lz4_flex::block::decompress_into(lz4, &mut scratch[..bytes]) {
            Ok(got) if got == bytes => {}
            Ok(got) => return err(format!("the block at element {start} inflates to {got} bytes, not {bytes}")),
            Err(e) => return err(format!("the block at element {start} is not LZ4: {e}")),
        }
        untranspose(&scratch[..bytes], size, elem_size, &mut out[start * elem_size..start * elem_size + bytes]);
        at += packed;
        start += size;
    }
    let left = (n - start) * elem_size;
    match chunk.get(at..at + left) {
        Some(raw) if at + left == chunk.len() => out[start * elem_size..].copy_from_slice(raw),
        Some(_) => return err(format!("{} bytes follow the last block", chunk.len() - at - left)),
        None => return err(format!("the chunk ends before its last {left} uncompressed bytes")),
    }
    Ok(())
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
fn untranspose(planes: &[u8], n: usize, elem_size: usize, out: &mut [u8]) {
    let row = n / 8; // bytes in a bit row
    for j in 0..elem_size {
        let rows: [&[u8]; 8] = std::array::from_fn(|b| &planes[(j * 8 + b) * row..(j * 8 + b + 1) * row]);
        for q in 0..row {
            let x = u64::from_le_bytes(std::array::from_fn(|b| rows[b][q]));
            let base = 8 * q * elem_size + j;
            if x == 0 {
                for i in 0..8 {
                    out[base + i * elem_size] = 0;
                }
                continue;
            }
            let t = transpose8(x).to_le_bytes();
            for i in 0..8 {
                out[base + i * elem_size] = t[i];
            }
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
    fn a_bit_lands_where_bitshuffle_puts_it() {
        // element 9 of 16, byte 1, bit 3: row 1*8+3, byte 9/8 = 1, bit 9%8 = 1
        let mut data = vec![0u8; 16 * 2];
        data[9 * 2 + 1] = 1 << 3;
        let mut planes = vec![0u8; 32];
        planes[(8 + 3) * 2 + 1] = 1 << 1;
        let mut out = vec![0u8; 32];
        untranspose(&planes, 16, 2, &mut out);
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
