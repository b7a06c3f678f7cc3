/** The error class of every error the client itself raises (`code` names the cause). */
export class WhispeerError extends Error {
  constructor(code, message) {
    super(message);
    this.name = 'WhispeerError';
    this.code = code;
  }
}
