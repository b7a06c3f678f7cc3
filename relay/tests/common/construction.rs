//! The review's wildcard construction (relay README, "routing cost of wildcard filters"),
//! as plain levels: one definition for the integration tests (`common::wildcard`), the
//! index's unit tests and the walk bench (`cargo bench -p whispeer-relay --bench walk`),
//! which include this file by path. `None` is a `+` level, `Some(b)` the token numbered
//! `b`.
//!
//! 1,872 filters of 32 levels (all one tenant's default 32 MiB of filters holds): for
//! filter `i`, level `j < 11` is `+` if bit `j` of `i` is set, else `p_j`; levels 11..=30
//! `+`; level 31 a token [`Z`] no publish uses. A publish on `P = [p_0 .. p_31]`
//! ([`path`]) visits 41,359 index nodes and matches none of them.

/// The token no publish uses (the filters' last level).
pub const Z: u8 = 200;
/// Filters in the construction.
pub const FILTERS: u32 = 1872;

/// The levels of filter `i`.
pub fn levels(i: u32) -> Vec<Option<u8>> {
    (0..32u8)
        .map(|j| match j {
            0..=10 if i & (1 << j) != 0 => None,
            0..=10 => Some(j),
            11..=30 => None,
            _ => Some(Z),
        })
        .collect()
}

/// The path `P`'s levels.
pub fn path() -> Vec<u8> {
    (0..32).collect()
}
