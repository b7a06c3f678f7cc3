//! Hard limits shared by every party. They bound allocation on untrusted input, and they are
//! part of the wire contract (see `docs/PROTOCOL.md`, "Limits").

/// Most levels a topic or filter may have (and so most tokens in a routing path).
pub const MAX_LEVELS: usize = 32;
/// Most bytes in one topic segment.
pub const MAX_SEGMENT_LEN: usize = 255;
/// Most bytes in a whole topic name (segments plus separators).
pub const MAX_TOPIC_LEN: usize = 1024;
/// Length of a key id and of a topic token.
pub const TOKEN_LEN: usize = 16;
/// Default largest frame a peer accepts (the TCP length prefix and WebSocket message size).
pub const DEFAULT_MAX_FRAME: usize = 1024 * 1024;
/// Absolute ceiling for any configured `max_frame`.
pub const MAX_FRAME_CEILING: usize = 64 * 1024 * 1024;
/// Largest frame a relay must accept before its handshake with the client completes
/// (`Welcome` sent): `Hello` and `Auth` are small (the largest valid `Hello` is under 2.5 KiB),
/// and without this cap a stranger who has not proved an account could make the relay
/// buffer a partial `max_frame` (up to 64 MiB) per connection until the hello timeout.
pub const HANDSHAKE_MAX_FRAME: usize = 4096;
/// Most sequence numbers in one `Ack` frame.
pub const MAX_ACKS_PER_FRAME: usize = 4096;
/// Most bytes in any text field of a frame (error messages, names).
pub const MAX_TEXT_LEN: usize = 1024;
/// Most entries in a CBOR map or array inside a frame.
pub const MAX_CBOR_ITEMS: usize = 64;
/// Deepest nesting of CBOR containers a decoder will skip through.
pub const MAX_CBOR_DEPTH: usize = 8;
/// Most bytes in a content type string.
pub const MAX_CONTENT_TYPE_LEN: usize = 255;
/// Default cap on a decompressed payload (a compression bomb stops here).
pub const DEFAULT_MAX_PAYLOAD: usize = 16 * 1024 * 1024;
