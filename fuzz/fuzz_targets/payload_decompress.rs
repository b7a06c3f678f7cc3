//! The body codecs (§4.6) on arbitrary payloads: an AEAD-protected envelope's mutations
//! never reach decompression, so this target feeds the decoders directly. Every input must
//! be refused or decompress within the cap; none may panic or allocate beyond the cap.
//! Codec 3 (zstd with a dictionary, §4.6.1) decodes with a held dictionary: its id is
//! written over the start of the payload half the time, so the frame parser is reached.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use whispeer_protocol::compress::{decompress_dict, CODEC_ZSTD_DICT};
use whispeer_protocol::{Dictionaries, Dictionary};

fn dicts() -> &'static (Dictionaries, Dictionary) {
    static D: OnceLock<(Dictionaries, Dictionary)> = OnceLock::new();
    D.get_or_init(|| {
        let d = Dictionary::new(
            b"{\"device\":\"th-0001\",\"room\":\"kitchen\",\"celsius\":21.5,\"ok\":true}".repeat(4),
        )
        .unwrap();
        let mut set = Dictionaries::new();
        set.insert(d.clone());
        (set, d)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&codec, payload)) = data.split_first() else {
        return;
    };
    const CAP: usize = 1 << 16;
    let (set, d) = dicts();
    let codec = codec % 5;
    let mut p = payload.to_vec();
    if codec == CODEC_ZSTD_DICT && p.len() >= 16 && p[0] & 1 == 0 {
        p[..16].copy_from_slice(&d.id().0);
    }
    if let Ok(out) = decompress_dict(codec, &p, CAP, set) {
        assert!(out.len() <= CAP);
    }
});
