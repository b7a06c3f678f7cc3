//! The body's `codec` (PROTOCOL.md §4.6): how the payload is stored, and decompressing it
//! under a hard output cap. Contexts (zstd's) live in [`crate::Sealer`] and
//! [`crate::Opener`]; this module holds the wire rules.
//!
//! | codec | payload |
//! | --- | --- |
//! | 0 | as is |
//! | 1 | one zstd frame with Frame_Content_Size |
//! | 2 | `u32be(uncompressed_len) ‖ LZ4 block` |
//! | 3 | `dict_id[16] ‖ one zstd frame` compressed with that dictionary ([`crate::dict`]) |
//!
//! Codec 2 writes its own size prefix, **big-endian** like every other integer of the
//! protocol (not `lz4_flex::compress_prepend_size`, which writes it little-endian), so a
//! receiver can check the declared size against its cap before allocating.

use crate::dict::{DictId, Dictionaries, Dictionary, DICT_ID_LEN};
use crate::error_keys::{BodyError, SealError};

/// `codec = 0`: stored as is.
pub const CODEC_NONE: u8 = 0;
/// `codec = 1`: one zstd frame with its content size.
pub const CODEC_ZSTD: u8 = 1;
/// `codec = 2`: `u32be(uncompressed_len) ‖ LZ4 block`.
pub const CODEC_LZ4: u8 = 2;
/// `codec = 3`: `dict_id[16] ‖ one zstd frame` compressed with the dictionary of that id.
pub const CODEC_ZSTD_DICT: u8 = 3;
/// The highest codec value defined.
pub const CODEC_MAX: u8 = CODEC_ZSTD_DICT;
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

/// Codec 3: splits `dict_id ‖ frame`.
pub fn zstd_dict_parts(payload: &[u8]) -> Result<(DictId, &[u8]), BodyError> {
    let (id, frame) =
        payload
            .split_first_chunk::<DICT_ID_LEN>()
            .ok_or(BodyError::Decompression(
                "codec 3 payload shorter than its dictionary id",
            ))?;
    Ok((DictId(*id), frame))
}

/// Codec 3, receiving, before decompressing: the frame must not carry a Dictionary_ID
/// field (the body's id names the dictionary), and its declared content size must be
/// present and within `max`.
fn zstd_dict_frame_size(frame: &[u8], max: usize) -> Result<usize, BodyError> {
    // Magic_Number (4 bytes), then Frame_Header_Descriptor: bits 0-1 = Dictionary_ID_flag.
    match frame.get(4) {
        Some(fhd) if frame.starts_with(&ZSTD_FRAME_MAGIC) && fhd & 0x03 != 0 => {
            return Err(BodyError::Decompression(
                "codec 3 zstd frame carries a Dictionary_ID field",
            ))
        }
        _ => {}
    }
    zstd_declared_size(frame, max)
}

/// zstd's frame magic number as it appears in the bytes (RFC 8878 §3.1.1).
const ZSTD_FRAME_MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];

/// Decompresses a body's payload per its `codec` with the cap `max` (§4.6), with fresh
/// contexts and no dictionaries (codec 3 fails with [`BodyError::MissingDictionary`]): for
/// tools and checkers; [`crate::Opener`] reuses its own.
pub fn decompress(codec: u8, payload: &[u8], max: usize) -> Result<Vec<u8>, BodyError> {
    decompress_dict(codec, payload, max, &Dictionaries::new())
}

/// [`decompress`] with these dictionaries for codec 3.
pub fn decompress_dict(
    codec: u8,
    payload: &[u8],
    max: usize,
    dicts: &Dictionaries,
) -> Result<Vec<u8>, BodyError> {
    Decompressors::new()?.decompress(codec, payload, max, |id| dicts.get(id))
}

/// How many dictionary contexts an [`Decompressors`] keeps (each holds its dictionary
/// digested; a miss rebuilds one).
const DICT_CONTEXTS: usize = 4;

/// Decompression contexts reused across messages: zstd's plain one, and one per recently
/// used dictionary.
pub(crate) struct Decompressors {
    zstd: zstd::bulk::Decompressor<'static>,
    /// Most recently used first.
    dict: Vec<(DictId, zstd::bulk::Decompressor<'static>)>,
}

impl Decompressors {
    pub(crate) fn new() -> Result<Self, BodyError> {
        Ok(Decompressors {
            zstd: zstd::bulk::Decompressor::new()
                .map_err(|_| BodyError::Decompression("zstd context"))?,
            dict: Vec::new(),
        })
    }

    fn dict_context(
        &mut self,
        d: &Dictionary,
    ) -> Result<&mut zstd::bulk::Decompressor<'static>, BodyError> {
        match self.dict.iter().position(|(id, _)| *id == d.id()) {
            Some(0) => {}
            Some(i) => {
                let e = self.dict.remove(i);
                self.dict.insert(0, e);
            }
            None => {
                let ctx = zstd::bulk::Decompressor::with_dictionary(d.as_bytes())
                    .map_err(|_| BodyError::Decompression("zstd dictionary context"))?;
                self.dict.truncate(DICT_CONTEXTS - 1);
                self.dict.insert(0, (d.id(), ctx));
            }
        }
        Ok(&mut self.dict[0].1)
    }

    /// Decompresses per `codec` with the cap `max`; codec 3 looks its dictionary up with
    /// `dict` (the receiver's: those of the message's tree).
    pub(crate) fn decompress<'d>(
        &mut self,
        codec: u8,
        payload: &[u8],
        max: usize,
        dict: impl FnOnce(&DictId) -> Option<&'d Dictionary>,
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
                zstd_exact(&mut self.zstd, payload, declared)
            }
            CODEC_LZ4 => lz4_decompress(payload, max),
            CODEC_ZSTD_DICT => {
                let (id, frame) = zstd_dict_parts(payload)?;
                let d = dict(&id).ok_or(BodyError::MissingDictionary(id))?;
                let declared = zstd_dict_frame_size(frame, max)?;
                let ctx = self.dict_context(d)?;
                zstd_exact(ctx, frame, declared)
            }
            _ => Err(BodyError::UnsupportedCodec(codec)),
        }
    }
}

/// Decompresses one frame into exactly `declared` bytes.
fn zstd_exact(
    ctx: &mut zstd::bulk::Decompressor<'static>,
    frame: &[u8],
    declared: usize,
) -> Result<Vec<u8>, BodyError> {
    let out = ctx
        .decompress(frame, declared)
        .map_err(|_| BodyError::Decompression("zstd frame does not decode"))?;
    if out.len() != declared {
        return Err(BodyError::Decompression(
            "zstd frame decodes to another size than declared",
        ));
    }
    Ok(out)
}

/// Codec 3, sending: `dict_id ‖ frame` from a compressor holding dictionary `id` (its
/// Dictionary_ID flag off, content size on).
pub(crate) fn zstd_dict_compress(
    ctx: &mut zstd::bulk::Compressor<'static>,
    id: &DictId,
    data: &[u8],
) -> Result<Vec<u8>, SealError> {
    let err = |e: std::io::Error| SealError::Compression(e.to_string());
    let frame = ctx.compress(data).map_err(err)?;
    let mut out = Vec::with_capacity(DICT_ID_LEN + frame.len());
    out.extend_from_slice(&id.0);
    out.extend_from_slice(&frame);
    Ok(out)
}

/// Codec 3 with a fresh context: the stored payload `dict_id ‖ frame` of `data` compressed
/// with `d` at `level` (for tools, tests and benches; [`crate::Sealer`] reuses a context).
pub fn zstd_dict_compress_once(
    d: &Dictionary,
    level: i32,
    data: &[u8],
) -> Result<Vec<u8>, SealError> {
    let mut ctx = zstd_dict_compressor(level, d)?;
    zstd_dict_compress(&mut ctx, &d.id(), data)
}

/// A zstd compression context holding dictionary `d` at `level`, writing no Dictionary_ID
/// field (§4.6.1).
pub(crate) fn zstd_dict_compressor(
    level: i32,
    d: &Dictionary,
) -> Result<zstd::bulk::Compressor<'static>, SealError> {
    let err = |e: std::io::Error| SealError::Compression(e.to_string());
    let mut c = zstd::bulk::Compressor::with_dictionary(level, d.as_bytes()).map_err(err)?;
    c.set_parameter(zstd::stream::raw::CParameter::DictIdFlag(false))
        .map_err(err)?;
    c.set_parameter(zstd::stream::raw::CParameter::ContentSizeFlag(true))
        .map_err(err)?;
    Ok(c)
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

    /// What the reference accepts around the one-frame and one-block rules (PROTOCOL §4.6,
    /// "What the reference decoder accepts"): the zstd payload is decoded by libzstd's
    /// multi-frame `ZSTD_decompressDCtx` into exactly the declared size, the LZ4 block by
    /// `lz4_flex`'s safe decoder, which does not check the LZ4 end-of-block conditions.
    #[test]
    fn zstd_frames_and_lz4_block_ends_as_the_reference_decodes_them() {
        let data = b"{\"temp\":21.5,\"room\":\"kitchen\"}".repeat(20);
        let f = zstd::bulk::compress(&data, 3).unwrap();
        let empty = zstd::bulk::compress(b"", 3).unwrap();
        let one = zstd::bulk::compress(b"x", 3).unwrap();
        // A skippable frame (magic 0x184D2A50, u32le size, content).
        let skip = |n: u32| {
            let mut v = vec![0x50, 0x2a, 0x4d, 0x18];
            v.extend_from_slice(&n.to_le_bytes());
            v.extend(std::iter::repeat_n(7u8, n as usize));
            v
        };
        let zstd = |p: &[u8]| decompress(CODEC_ZSTD, p, 1 << 20).map(|v| v.len());
        assert_eq!(zstd(&f), Ok(data.len()));
        // After the frame: skippable frames and frames that decode to nothing are taken.
        assert_eq!(zstd(&[&f[..], &skip(3)].concat()), Ok(data.len()));
        assert_eq!(zstd(&[&f[..], &skip(0)].concat()), Ok(data.len()));
        assert_eq!(zstd(&[&f[..], &empty].concat()), Ok(data.len()));
        // Anything else after it is refused: a frame with content (past the declared size),
        // stray bytes (1 to 4, or 5 and more that are not a frame), a cut skippable frame.
        assert!(zstd(&[&f[..], &one].concat()).is_err());
        for n in [1, 4, 5, 12] {
            assert!(
                zstd(&[&f[..], &vec![0u8; n]].concat()).is_err(),
                "{n} bytes"
            );
        }
        assert!(zstd(&[&f[..], &skip(3)[..6]].concat()).is_err());
        // A leading skippable frame declares size 0: only what decodes to nothing follows.
        assert_eq!(zstd(&skip(3)), Ok(0));
        assert_eq!(zstd(&[&skip(3)[..], &empty].concat()), Ok(0));
        assert!(zstd(&[&skip(3)[..], &f].concat()).is_err());
        // A Content_Checksum, when present, is verified.
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.set_parameter(zstd::stream::raw::CParameter::ChecksumFlag(true))
            .unwrap();
        let mut fc = c.compress(&data).unwrap();
        assert_eq!(zstd(&fc), Ok(data.len()));
        *fc.last_mut().unwrap() ^= 1;
        assert!(zstd(&fc).is_err());

        let lz4 = |p: &[u8]| decompress(CODEC_LZ4, p, 1 << 20);
        // U = 0: exactly one token byte with a literal length of 0 (its match half unread).
        assert_eq!(lz4(&[0, 0, 0, 0, 0x00]), Ok(vec![]));
        assert_eq!(lz4(&[0, 0, 0, 0, 0x0f]), Ok(vec![]));
        assert!(lz4(&[0, 0, 0, 0]).is_err(), "an empty block");
        assert!(lz4(&[0, 0, 0, 0, 0x00, 0x00]).is_err());
        // The last sequence's match half is ignored; a block ending after a match is refused.
        assert_eq!(lz4(&[0, 0, 0, 1, 0x1f, b'a']), Ok(b"a".to_vec()));
        assert!(lz4(&[0, 0, 0, 5, 0x10, b'a', 0x01, 0x00]).is_err());
        // The end-of-block conditions (last 5 bytes literals, last match 12 bytes before the
        // end) are not checked: a match reaching the end, then an empty literal run.
        assert_eq!(
            lz4(&[0, 0, 0, 5, 0x10, b'a', 0x01, 0x00, 0x00]),
            Ok(b"aaaaa".to_vec())
        );
        // Offset 0 is refused.
        assert!(lz4(&[0, 0, 0, 5, 0x10, b'a', 0x00, 0x00, 0x00]).is_err());
    }
}
