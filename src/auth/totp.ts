// TOTP second factor (RFC 6238: HMAC-SHA1, 6 digits, 30 s steps, one step of leeway either
// way). As the original clients send it, the code is the last 6 characters of the password.
import { createHmac, randomBytes, timingSafeEqual } from "node:crypto";

export const TOTP_DIGITS = 6;
export const TOTP_STEP_S = 30;
/** Steps accepted before and after the current one. */
export const TOTP_LEEWAY = 1;

const B32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";

export function base32Encode(buf: Uint8Array): string {
  let bits = 0;
  let value = 0;
  let out = "";
  for (const byte of buf) {
    value = (value << 8) | byte;
    bits += 8;
    while (bits >= 5) {
      out += B32[(value >>> (bits - 5)) & 31];
      bits -= 5;
    }
  }
  if (bits > 0) out += B32[(value << (5 - bits)) & 31];
  return out;
}

/** Decodes base32 (case, spaces and `=` padding ignored); throws on other characters. */
export function base32Decode(s: string): Buffer {
  const clean = s.replace(/[\s=]/g, "").toUpperCase();
  let bits = 0;
  let value = 0;
  const out: number[] = [];
  for (const ch of clean) {
    const v = B32.indexOf(ch);
    if (v < 0) throw new Error("invalid base32 secret");
    value = ((value << 5) | v) & 0xffff;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

/** A new random secret: 160 bits, base32 (32 characters). */
export function newTotpSecret(): string {
  return base32Encode(randomBytes(20));
}

/** HOTP (RFC 4226) value of a counter. */
export function hotp(key: Uint8Array, counter: number): string {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const mac = createHmac("sha1", key).update(msg).digest();
  const off = mac[mac.length - 1]! & 0x0f;
  const bin = ((mac[off]! & 0x7f) << 24) | (mac[off + 1]! << 16) | (mac[off + 2]! << 8) | mac[off + 3]!;
  return String(bin % 10 ** TOTP_DIGITS).padStart(TOTP_DIGITS, "0");
}

/** The code of a base32 secret at a time (ms since the epoch). */
export function totpCode(secret: string, nowMs = Date.now()): string {
  return hotp(base32Decode(secret), Math.floor(nowMs / 1000 / TOTP_STEP_S));
}

/** Whether `code` is the secret's code for the current step or one step before or after. */
export function verifyTotp(secret: string, code: string, nowMs = Date.now()): boolean {
  if (!/^\d{6}$/.test(code)) return false;
  let key: Buffer;
  try {
    key = base32Decode(secret);
  } catch {
    return false;
  }
  if (key.length === 0) return false;
  const step = Math.floor(nowMs / 1000 / TOTP_STEP_S);
  let ok = false;
  for (let d = -TOTP_LEEWAY; d <= TOTP_LEEWAY; d++) {
    // Compare every candidate in constant time; no early exit.
    if (timingSafeEqual(Buffer.from(hotp(key, step + d)), Buffer.from(code))) ok = true;
  }
  return ok;
}

/** Splits "password123456" into the password and the appended code (undefined when too short). */
export function splitTotpPassword(password: string): { password: string; code: string } | undefined {
  if (password.length <= TOTP_DIGITS) return undefined;
  return { password: password.slice(0, -TOTP_DIGITS), code: password.slice(-TOTP_DIGITS) };
}

/** otpauth:// URI for authenticator apps (Key URI Format). */
export function otpauthUri(secret: string, account: string, issuer: string): string {
  const label = encodeURIComponent(issuer) + ":" + encodeURIComponent(account);
  const q = new URLSearchParams({
    secret,
    issuer,
    algorithm: "SHA1",
    digits: String(TOTP_DIGITS),
    period: String(TOTP_STEP_S),
  });
  return `otpauth://totp/${label}?${q.toString()}`;
}
