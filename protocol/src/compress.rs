//! The body's `codec` (PROTOCOL.md §4.6): how the payload is stored, and decompressing it
//! under a hard output cap. Contexts (zstd's) live in [`crate::Sealer`] and
//! [`crate::Opener`]; this module holds the wire rules.
//!
//! | codec | payload |
//! | --- | --- |
//! | 0 | as is |
//! | 1 | one zstd frame with Frame_Content_Size |
//! | 2 | `u32be(uncompressed_len) ‖ LZ4 block` |
//!
//! Codec 2 writes its own size prefix, **big-endian** like every other integer of the
//! protocol (not `lz4_flex::compress_prepend_size`, which writes it little-endian), so a
//! receiver can check the declared size against its cap before allocating.

use crate::error_keys::{BodyError, SealError};

/// `codec = 0`: stored as is.
pub const CODEC_NONE: u8 = 0;
/// `codec = 1`: one zstd frame with its content size.
pub const CODEC_ZSTD: u8 = 1;
/// `codec = 2`: `u32be(uncompressed_len) ‖ LZ4 block`.
pub const CODEC_LZ4: u8 = 2;
/// Length of codec 2's size prefix.
pub const LZ4_SIZE_LEN: usize = 4;

/// Codec 2: compresses `data` as `u32be(len) ‖ LZ4 block` (lz4_flex, pure safe Rust).
pub fn lz4_compress(data: &[u8]) -> Result<Vec<u8>, SealError> {
    let len = u32::try_from(data.len())
        .map_err(|_| SealError::Compression("LZ4 payload above 4 GiB".into()))?;
    let mut out = vec![0u8; LZ4_SIZE_LEN + lz4_flex::block::get_maximum_output_size(data.len())];
    out[..LZ4_SIZE_LEN].copy_from_slice(&len.to_be_bytes());
    let n = lz4_flex::block::compress_into(data, &mut out[LZ4_SIZE_LEN..])
        .map_err(|e| SealError::Compression(e.to_string()))?;
    out.truncate(LZ4_SIZE_LEN + n);
    Ok(out)
}

/// Codec 2, receiving: reads the declared size, refuses it above `max` *before allocating*,
/// decompresses into exactly that many bytes, and refuses a block that fails to decode or
/// yields another number of bytes.
pub fn lz4_decompress(payload: &[u8], max: usize) -> Result<Vec<u8>, BodyError> {
    let (size, block) =
        payload
            .split_first_chunk::<LZ4_SIZE_LEN>()
            .ok_or(BodyError::Decompression(
                "LZ4 payload shorter than its size prefix",
            ))?;
    let declared = u32::from_be_bytes(*size);
    if u64::from(declared) > max as u64 {
        return Err(BodyError::PayloadTooLarge {
            declared: declared.into(),
            max,
        });
    }
    let mut out = vec![0u8; declared as usize];
    let n = lz4_flex::block::decompress_into(block, &mut out).map_err(|_| {
        BodyError::Decompression("LZ4 block does not decode into the declared size")
    })?;
    if n != out.len() {
        return Err(BodyError::Decompression(
            "LZ4 block decodes to fewer bytes than declared",
        ));
    }
    Ok(out)
}

/// Codec 1, receiving: the frame's declared content size, read without decompressing;
/// refused when absent or above `max`.
pub fn zstd_declared_size(payload: &[u8], max: usize) -> Result<usize, BodyError> {
    let declared = zstd::zstd_safe::get_frame_content_size(payload)
        .map_err(|_| BodyError::Decompression("zstd frame header unreadable"))?
        .ok_or(BodyError::Decompression("zstd frame without content size"))?;
    if declared > max as u64 {
        return Err(BodyError::PayloadTooLarge { declared, max });
    }
    Ok(declared as usize)
}

/// Decompresses a body's payload per its `codec` with the cap `max` (§4.6), with a fresh
/// zstd context: for tools and checkers; [`crate::Opener`] reuses its own.
pub fn decompress(codec: u8, payload: &[u8], max: usize) -> Result<Vec<u8>, BodyError> {
    let mut ctx =
        zstd::bulk::Decompressor::new().map_err(|_| BodyError::Decompression("zstd context"))?;
    decompress_with(&mut ctx, codec, payload, max)
}

/// [`decompress`] with a caller's zstd context.
pub(crate) fn decompress_with(
    zstd: &mut zstd::bulk::Decompressor<'static>,
    codec: u8,
    payload: &[u8],
    max: usize,
) -> Result<Vec<u8>, BodyError> {
    match codec {
        CODEC_NONE => {
            if payload.len() > max {
                return Err(BodyError::PayloadTooLarge {
                    declared: payload.len() as u64,
                    max,
                });
            }
            Ok(payload.to_vec())
        }
        CODEC_ZSTD => {
            let declared = zstd_declared_size(payload, max)?;
            let out = zstd
                .decompress(payload, declared)
                .map_err(|_| BodyError::Decompression("zstd frame does not decode"))?;
            if out.len() != declared {
                return Err(BodyError::Decompression(
                    "zstd frame decodes to another size than declared",
                ));
            }
            Ok(out)
        }
        CODEC_LZ4 => lz4_decompress(payload, max),
        _ => Err(BodyError::UnsupportedCodec(codec)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lz4_roundtrip_and_big_endian_prefix() {
        let data = b"{\"temp\":21.5,\"room\":\"kitchen\"}".repeat(20);
        let c = lz4_compress(&data).unwrap();
        assert_eq!(&c[..4], &(data.len() as u32).to_be_bytes());
        assert!(c.len() < data.len());
        assert_eq!(lz4_decompress(&c, 1 << 20).unwrap(), data);
        assert_eq!(decompress(CODEC_LZ4, &c, 1 << 20).unwrap(), data);
        // Exactly the cap passes, one byte less refuses before allocating.
        assert!(lz4_decompress(&c, data.len()).is_ok());
        assert_eq!(
            lz4_decompress(&c, data.len() - 1),
            Err(BodyError::PayloadTooLarge {
                declared: data.len() as u64,
                max: data.len() - 1
            })
        );
        // Empty input round-trips.
        assert_eq!(lz4_decompress(&lz4_compress(&[]).unwrap(), 0).unwrap(), b"");
    }

    #[test]
    fn lz4_bad_payloads_are_refused_without_panicking() {
        let data = b"abcabcabcabcabcabcabcabcabcabcabcabcabcabc".repeat(8);
        let c = lz4_compress(&data).unwrap();
        // Declared size one more or one less than the block's output.
        for d in [data.len() + 1, data.len() - 1] {
            let mut v = c.clone();
            v[..4].copy_from_slice(&(d as u32).to_be_bytes());
            assert!(lz4_decompress(&v, 1 << 20).is_err(), "declared {d}");
        }
        // Every truncation and every single-byte change: an error or (for a change that
        // keeps the block valid) the declared size, never a panic.
        for cut in 0..c.len() {
            assert!(lz4_decompress(&c[..cut], 1 << 20).is_err(), "cut {cut}");
        }
        for i in 4..c.len() {
            for x in [0x01u8, 0x80, 0xff] {
                let mut v = c.clone();
                v[i] ^= x;
                if let Ok(out) = lz4_decompress(&v, 1 << 20) {
                    assert_eq!(out.len(), data.len());
                }
            }
        }
        // A 4 GiB declaration is refused by the cap, not by a failed allocation.
        assert!(matches!(
            lz4_decompress(&[0xff, 0xff, 0xff, 0xff, 0x00], 16 << 20),
            Err(BodyError::PayloadTooLarge { .. })
        ));
        assert_eq!(decompress(9, b"", 10), Err(BodyError::UnsupportedCodec(9)));
    }
}
