// Seeded randomness for the fuzz tests: one generator and one seed convention, so that any
// failure names its seed and QVD_FUZZ_SEED=N replays exactly that run.

/** mulberry32: small, fast, and the same sequence for the same seed everywhere. */
export function seededRng(seed: number) {
  let a = seed >>> 0;
  const next = () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  const int = (n: number) => Math.floor(next() * n);
  const pick = <T>(xs: readonly T[]): T => xs[int(xs.length)]!;
  return { next, int, pick, chance: (p: number) => next() < p };
}
export type Rng = ReturnType<typeof seededRng>;

/** The run's seed: QVD_FUZZ_SEED, else the file's own default; printed with how to replay it. */
export function fuzzSeed(label: string, fallback: number): number {
  const seed = Number(process.env.QVD_FUZZ_SEED ?? fallback) >>> 0;
  console.log(`${label} fuzz seed: ${seed} (QVD_FUZZ_SEED=${seed} replays this run)`);
  return seed;
}
