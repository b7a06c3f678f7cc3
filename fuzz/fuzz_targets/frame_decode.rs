//! Arbitrary bytes as a TCP stream: the incremental length-prefix decoder and the frame
//! decoder must return frames or typed errors, never panic, never allocate beyond the limit.
//! Every frame that decodes must re-encode to bytes that decode to the same frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use whispeer_protocol::{Frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // As a single frame body.
    if let Ok(f) = Frame::decode(&Bytes::copy_from_slice(data)) {
        let again = Frame::decode(&f.to_bytes()).expect("re-encoded frame decodes");
        assert_eq!(again, f);
    }
    // As a stream, fed in uneven pieces.
    let mut d = FrameDecoder::new(64 * 1024);
    for chunk in data.chunks(7) {
        d.push(chunk);
        loop {
            match d.next_decoded() {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
