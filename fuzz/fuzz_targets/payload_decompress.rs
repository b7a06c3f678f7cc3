//! The body codecs (§4.6) on arbitrary payloads: an AEAD-protected envelope's mutations
//! never reach decompression, so this target feeds the decoders directly. Every input must
//! be refused or decompress within the cap; none may panic or allocate beyond the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use whispeer_protocol::compress::decompress;

fuzz_target!(|data: &[u8]| {
    let Some((&codec, payload)) = data.split_first() else {
        return;
    };
    const CAP: usize = 1 << 16;
    if let Ok(out) = decompress(codec % 4, payload, CAP) {
        assert!(out.len() <= CAP);
    }
});
