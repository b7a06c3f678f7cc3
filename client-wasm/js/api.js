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

export { Client, Subscription, TypedTopic, WhispeerError, float, toKeyring } from './client.js';
export { Identity, TreeKey, Grant, Keyring, OpenedInvite, ClientCore, openInvite, encodeValue, decodeValue, version };

const WEEK_MS = 7 * 24 * 3600 * 1000;

/**
 * Seals `grant` to the holder of `recipientPublicId` (`wsid1…`), signed by `inviter`.
 * The invite (`wsinv1…`) expires after `ttlMs` (default 7 days).
 */
export function sealInvite(grant, inviter, recipientPublicId, options = {}) {
  return sealInviteRaw(grant, inviter, recipientPublicId, options.ttlMs ?? WEEK_MS);
}
