// The public API, shared by the Node and browser entry points (which initialise the wasm
// module first).
import {
  Identity,
  TreeKey,
  Grant,
  Keyring,
  OpenedInvite,
  ClientCore,
  sealInvite as sealInviteRaw,
  openInvite,
  encodeValue,
  decodeValue,
  version,
} from '../pkg/whispeer_wasm.js';
import './message.js'; // ClientCore.prototype.openEnvelope

export { Client, Subscription, TypedTopic, WhispeerError, float, toKeyring } from './client.js';
export { Identity, TreeKey, Grant, Keyring, OpenedInvite, ClientCore, openInvite, encodeValue, decodeValue, version };

const WEEK_MS = 7 * 24 * 3600 * 1000;

/**
 * Seals `grant` to the holder of `recipientPublicId` (`wsid1…`), signed by `inviter`.
 * The invite (`wsinv1…`) expires after `ttlMs` (default 7 days). `dictionaries`: the zstd
 * dictionaries the granted topics are compressed with, to travel in the invite (PROTOCOL
 * §7) — a Keyring (all it holds) or an array of `wsdict1…` strings / Uint8Arrays.
 */
export function sealInvite(grant, inviter, recipientPublicId, options = {}) {
  const d = options.dictionaries ?? [];
  const dicts = d instanceof Keyring ? d.toDictionaryStrings() : Array.isArray(d) ? d : [d];
  return sealInviteRaw(grant, inviter, recipientPublicId, options.ttlMs ?? WEEK_MS, dicts);
}
