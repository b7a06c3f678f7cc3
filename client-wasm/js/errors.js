/** The error class of every error the client itself raises (`code` names the cause). */
export class WhispeerError extends Error {
  constructor(code, message, details) {
    super(message);
    this.name = 'WhispeerError';
    this.code = code;
    // TYPE_MISMATCH: `topic`, `expected` (the topic's tag), `found` (the content type or tag).
    if (details) Object.assign(this, details);
  }
}
