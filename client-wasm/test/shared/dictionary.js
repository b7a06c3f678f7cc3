// A raw-content zstd dictionary (codec 3, PROTOCOL §4.6.1) — what telemetry readings have in
// common — and a reading it compresses below zstd alone, so a topic with
// `compression: 'zstd-dict:<id>'` really seals it with codec 3. Shared by the Node and
// Chromium dictionary and invite tests (the page imports it too).
export const dictBytes = new TextEncoder().encode(
  '{"device":"th-0000","room":"kitchen","celsius":21.50,"humidity":40,"battery":99,"ok":true}'.repeat(8),
);

export const reading = { device: 'th-0042', room: 'kitchen', celsius: 21.5, humidity: 44, battery: 97, ok: true };
