// Deep equality for received values (objects, arrays, Map, Uint8Array, bigint), usable in
// Node and in the browser. Returns null when equal, else the path of the first difference.
export function diff(a, b, path = '$') {
  if (typeof a !== typeof b) return `${path}: ${typeof a} vs ${typeof b}`;
  if (a === null || b === null || typeof a !== 'object') {
    return Object.is(a, b) ? null : `${path}: ${String(a)} vs ${String(b)}`;
  }
  if (a instanceof Uint8Array || b instanceof Uint8Array) {
    if (!(a instanceof Uint8Array && b instanceof Uint8Array)) return `${path}: bytes vs non-bytes`;
    return a.length === b.length && a.every((x, i) => x === b[i]) ? null : `${path}: bytes differ`;
  }
  if (a instanceof Map || b instanceof Map) {
    if (!(a instanceof Map && b instanceof Map)) return `${path}: Map vs non-Map`;
    if (a.size !== b.size) return `${path}: Map sizes ${a.size} vs ${b.size}`;
    for (const [k, v] of a) {
      if (!b.has(k)) return `${path}: missing key ${String(k)}`;
      const d = diff(v, b.get(k), `${path}.get(${String(k)})`);
      if (d) return d;
    }
    return null;
  }
  if (Array.isArray(a) !== Array.isArray(b)) return `${path}: array vs non-array`;
  const ka = Object.keys(a);
  const kb = Object.keys(b);
  if (ka.length !== kb.length) return `${path}: keys ${ka} vs ${kb}`;
  for (const k of ka) {
    if (!Object.prototype.hasOwnProperty.call(b, k)) return `${path}: missing ${k}`;
    const d = diff(a[k], b[k], `${path}.${k}`);
    if (d) return d;
  }
  return null;
}
