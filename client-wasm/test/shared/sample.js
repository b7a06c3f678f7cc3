// The interop value set: mirrors `whispeer_tests::Sample::expected(i)` (tests/src/lib.rs).
// Rust u128/i128/u64 beyond 2^53 are bigints; ByteBuf is a Uint8Array; BTreeMap<u32, _> is
// a Map; unit enum variants are strings, others single-key objects.
export function sample(i) {
  const even = i % 2 === 0;
  return {
    i,
    name: `sample ${i}`,
    temp: 21.5 + i,
    neg: -1000 - i,
    big: (1n << 100n) + BigInt(i),
    small_big: (1n << 60n) + BigInt(i),
    neg_big: -(1n << 70n) - BigInt(i),
    raw: new Uint8Array([0, 1, 2, 255, i & 255]),
    list: [1, 2, 3, i],
    tags: { a: -1, b: i },
    by_id: new Map([
      [1, 'one'],
      [2, 'two'],
    ]),
    nested: { ok: even, note: even ? 'even' : null },
    kind: i % 3 === 0 ? 'Unit' : i % 3 === 1 ? { New: i } : { Struct: { x: -5 } },
    tuple: [7, 'seven'],
    nothing: null,
    blob: 'whispeer '.repeat(40),
  };
}
