//! A fixed-size bit set with fast run scanning, for per-layer allocation summaries: one bit per
//! block, built while a table is validated at open, so that `map` answers "not allocated here"
//! (and finds where the run ends) without touching the table on disk.

#[derive(Debug, Clone, Default)]
pub struct BitSet {
    words: Box<[u64]>,
    len: u64,
}

impl BitSet {
    pub fn new(len: u64) -> Self {
        BitSet { words: vec![0u64; len.div_ceil(64) as usize].into_boxed_slice(), len }
    }

    pub fn len(&self) -> u64 {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn set(&mut self, i: u64) {
        debug_assert!(i < self.len);
        self.words[(i / 64) as usize] |= 1 << (i % 64);
    }

    pub fn get(&self, i: u64) -> bool {
        i < self.len && self.words[(i / 64) as usize] & (1 << (i % 64)) != 0
    }

    /// Number of consecutive bits equal to `value` from `i` on, at most `max`, not past the end.
    pub fn run_len(&self, i: u64, max: u64, value: bool) -> u64 {
        let end = i.saturating_add(max).min(self.len);
        let mut j = i;
        while j < end {
            let w = self.words[(j / 64) as usize];
            let w = if value { !w } else { w } >> (j % 64);
            // `w` now has a 1 where the run breaks.
            let room = 64 - j % 64;
            let step = if w == 0 { room } else { (w.trailing_zeros() as u64).min(room) };
            j += step;
            if step < room {
                break;
            }
        }
        j.min(end) - i
    }

    /// Number of set bits.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| w.count_ones() as u64).sum()
    }
}

/// Bit order of an on-disk sector bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitOrder {
    /// Bit 7 of byte 0 is sector 0 (VHD).
    MsbFirst,
    /// Bit 0 of byte 0 is sector 0 (VHDX).
    LsbFirst,
}

/// In an on-disk sector bitmap: the value of bit `first` and the length of the run of equal bits
/// starting there, looking at most at bit `limit - 1`. Whole bytes of the run are skipped at once.
pub fn bitmap_run(bitmap: &[u8], first: u64, limit: u64, order: BitOrder) -> (bool, u64) {
    let bit = |i: u64| {
        let b = bitmap[(i / 8) as usize];
        match order {
            BitOrder::MsbFirst => b & (0x80 >> (i % 8)) != 0,
            BitOrder::LsbFirst => (b >> (i % 8)) & 1 != 0,
        }
    };
    let v = bit(first);
    let full = if v { 0xFF } else { 0x00 };
    let mut i = first + 1;
    while i < limit {
        if i.is_multiple_of(8) && i + 8 <= limit && bitmap[(i / 8) as usize] == full {
            i += 8;
        } else if bit(i) == v {
            i += 1;
        } else {
            break;
        }
    }
    (v, i - first)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmap_runs_in_both_bit_orders() {
        let msb = [0b1110_0000u8, 0xFF, 0x00];
        assert_eq!(bitmap_run(&msb, 0, 24, BitOrder::MsbFirst), (true, 3));
        assert_eq!(bitmap_run(&msb, 3, 24, BitOrder::MsbFirst), (false, 5));
        assert_eq!(bitmap_run(&msb, 8, 24, BitOrder::MsbFirst), (true, 8));
        assert_eq!(bitmap_run(&msb, 16, 20, BitOrder::MsbFirst), (false, 4));
        let lsb = [0b0000_0111u8, 0xFF, 0x00];
        assert_eq!(bitmap_run(&lsb, 0, 24, BitOrder::LsbFirst), (true, 3));
        assert_eq!(bitmap_run(&lsb, 3, 24, BitOrder::LsbFirst), (false, 5));
        assert_eq!(bitmap_run(&lsb, 8, 24, BitOrder::LsbFirst), (true, 8));
        assert_eq!(bitmap_run(&lsb, 16, 20, BitOrder::LsbFirst), (false, 4));
    }

    #[test]
    fn runs_cross_words_and_stop_at_limits() {
        let mut b = BitSet::new(300);
        for i in [3, 64, 65, 200] {
            b.set(i);
        }
        assert!(b.get(64) && !b.get(63) && !b.get(1000));
        assert_eq!(b.run_len(0, 300, false), 3);
        assert_eq!(b.run_len(4, 300, false), 60);
        assert_eq!(b.run_len(64, 300, true), 2);
        assert_eq!(b.run_len(66, 300, false), 134);
        assert_eq!(b.run_len(66, 10, false), 10);
        assert_eq!(b.run_len(201, 1000, false), 99);
        assert_eq!(b.count(), 4);
        // Against a naive model.
        let model: Vec<bool> = (0..300).map(|i| b.get(i)).collect();
        for start in 0..300u64 {
            for v in [false, true] {
                let naive = model[start as usize..].iter().take_while(|&&x| x == v).count() as u64;
                assert_eq!(b.run_len(start, 300, v), naive, "start {start} value {v}");
            }
        }
    }
}
