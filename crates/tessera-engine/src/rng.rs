//! A small deterministic random generator: kernel checks draw inputs from it, sampling draws
//! tokens from it, and a seed replays either.

/// xorshift64*: small, fast, and the same sequence on every platform.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15 | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u32) -> u32 {
        (self.next_u64() % u64::from(n)) as u32
    }

    /// Uniform in [lo, hi), never exactly zero.
    pub fn uniform(&mut self, lo: f32, hi: f32) -> f32 {
        loop {
            let unit = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
            let v = lo + (hi - lo) * unit;
            if v != 0.0 {
                return v;
            }
        }
    }

    pub fn vec(&mut self, n: usize, lo: f32, hi: f32) -> Vec<f32> {
        (0..n).map(|_| self.uniform(lo, hi)).collect()
    }

    /// Uniform in [0, 1), with 53 bits.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}
