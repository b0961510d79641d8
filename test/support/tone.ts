// Sound checks for tests: a WAV of a known tone, and how much of a recording is that tone
// (Goertzel energy at the frequency against neighbouring frequencies). Recordings are raw
// s16le mono (`parec --raw --format=s16le --channels=1 --rate=44100`).

export const RATE = 44100;

/** A 16-bit mono WAV file of a sine at `freq` Hz (amplitude 0…1). */
export function sineWav(freq: number, seconds: number, amplitude = 0.4, rate = RATE): Uint8Array {
  const n = Math.round(seconds * rate);
  const buf = new ArrayBuffer(44 + n * 2);
  const v = new DataView(buf);
  const str = (o: number, s: string) => {
    for (let i = 0; i < s.length; i++) v.setUint8(o + i, s.charCodeAt(i));
  };
  str(0, "RIFF");
  v.setUint32(4, 36 + n * 2, true);
  str(8, "WAVE");
  str(12, "fmt ");
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true);
  v.setUint16(22, 1, true);
  v.setUint32(24, rate, true);
  v.setUint32(28, rate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  str(36, "data");
  v.setUint32(40, n * 2, true);
  for (let i = 0; i < n; i++)
    v.setInt16(44 + i * 2, Math.round(amplitude * 32767 * Math.sin((2 * Math.PI * freq * i) / rate)), true);
  return new Uint8Array(buf);
}

/** Raw s16le bytes as samples. */
export function samples(raw: Uint8Array): Int16Array {
  return new Int16Array(raw.buffer.slice(raw.byteOffset, raw.byteOffset + (raw.byteLength & ~1)));
}

/** Goertzel power of `freq` in `x`. */
export function goertzel(x: ArrayLike<number>, freq: number, rate = RATE): number {
  const k = 2 * Math.cos((2 * Math.PI * freq) / rate);
  let s1 = 0;
  let s2 = 0;
  for (let i = 0; i < x.length; i++) {
    const s = x[i]! + k * s1 - s2;
    s2 = s1;
    s1 = s;
  }
  return s1 * s1 + s2 * s2 - k * s1 * s2;
}

/**
 * How strongly `freq` stands out in `x`: its power divided by the largest power among
 * neighbouring frequencies (¾, ½, 1½, 2× and ±100 Hz). A clean tone gives thousands; silence or
 * noise about 1.
 */
export function toneRatio(x: ArrayLike<number>, freq: number, rate = RATE): number {
  const at = goertzel(x, freq, rate);
  const others = [freq * 0.5, freq * 0.75, freq - 100, freq + 100, freq * 1.5, freq * 2].map((f) =>
    goertzel(x, f, rate),
  );
  return at / Math.max(1, ...others);
}

/** The loudest sample (0…32767). */
export function peak(x: ArrayLike<number>): number {
  let m = 0;
  for (let i = 0; i < x.length; i++) m = Math.max(m, Math.abs(x[i]!));
  return m;
}

/**
 * Gaps in a tone: 10 ms windows between the first and the last loud sample whose peak is under
 * a fifth of the recording's peak (an underrun of the tunnel shows as such a hole); those in the
 * first `skipMs` of the sound are not counted.
 */
export function gaps(x: ArrayLike<number>, rate = RATE, skipMs = 0): number {
  return gapOffsets(x, rate).filter((ms) => ms >= skipMs).length;
}

/** Where the gaps are: milliseconds from the first loud sample. */
export function gapOffsets(x: ArrayLike<number>, rate = RATE): number[] {
  const top = peak(x);
  const loud = top / 5;
  let first = -1;
  let last = -1;
  for (let i = 0; i < x.length; i++)
    if (Math.abs(x[i]!) > loud) {
      if (first < 0) first = i;
      last = i;
    }
  if (first < 0) return [];
  const w = Math.round(rate / 100);
  const at: number[] = [];
  for (let s = first; s + w <= last; s += w) {
    let m = 0;
    for (let i = s; i < s + w; i++) m = Math.max(m, Math.abs(x[i]!));
    if (m < loud) at.push(Math.round(((s - first) * 1000) / rate));
  }
  return at;
}

/**
 * Records a PulseAudio sink's monitor (parec, s16le mono at RATE) while `during` runs, from
 * `leadMs` before it to `tailMs` after it; returns the samples.
 */
export async function recordMonitor(
  o: { server: string; sink: string; env: Record<string, string> },
  during: () => Promise<unknown>,
  t: { leadMs?: number; tailMs?: number } = {},
): Promise<Int16Array> {
  const rec = Bun.spawn(
    [
      "parec",
      "-s",
      o.server,
      "-d",
      `${o.sink}.monitor`,
      "--raw",
      "--format=s16le",
      "--channels=1",
      `--rate=${RATE}`,
      "--latency-msec=20",
    ],
    {
      env: o.env,
      stdout: "pipe",
      stderr: "pipe",
    },
  );
  const chunks: Uint8Array[] = [];
  const reading = (async () => {
    const r = (rec.stdout as ReadableStream<Uint8Array>).getReader();
    for (let x = await r.read(); !x.done; x = await r.read()) chunks.push(x.value);
  })();
  try {
    await Bun.sleep(t.leadMs ?? 200);
    await during();
    await Bun.sleep(t.tailMs ?? 500);
  } finally {
    rec.kill();
    await reading;
  }
  return samples(Buffer.concat(chunks));
}
