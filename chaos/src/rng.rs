//! A tiny seeded generator (splitmix64): the same seed gives the same fault schedule and the same
//! requests on every machine and every version, which a crate's generator does not promise.

/// splitmix64: fast, good enough for schedules, and fully determined by its seed.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    /// A generator of its own for item `index` (an operation, a fault), independent of how many
    /// numbers other items drew.
    pub(crate) fn fork(seed: u64, stream: u64, index: u64) -> Self {
        let mut rng = Self(seed ^ stream.wrapping_mul(0xA076_1D64_78BD_642F));
        rng.0 ^= rng
            .next()
            .wrapping_add(index.wrapping_mul(0xE703_7ED1_A0B4_28DB));
        rng
    }

    pub(crate) fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `low..high` (`low` when the range is empty).
    pub(crate) fn range(&mut self, low: u64, high: u64) -> u64 {
        if high <= low {
            return low;
        }
        low + self.next() % (high - low)
    }

    /// True with probability `percent` / 100.
    pub(crate) fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_gives_the_same_numbers() {
        let a: Vec<u64> = (0..5).map(|i| Rng::fork(7, 1, i).next()).collect();
        let b: Vec<u64> = (0..5).map(|i| Rng::fork(7, 1, i).next()).collect();
        let c: Vec<u64> = (0..5).map(|i| Rng::fork(8, 1, i).next()).collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
    }
}
