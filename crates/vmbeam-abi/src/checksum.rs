//! The memory pattern and checksum that L0 and the workloads compute alike.
//!
//! L0 fills nested memory with a seeded pattern at host speed and hashes
//! whole guests to prove a move kept every byte; a workload verifies samples
//! of the same pattern and reports checksums of what it wrote. Both sides
//! must agree bit for bit, so the functions live here.

/// The pattern word stored at guest-physical address `gpa` (8-byte aligned) for `seed`.
#[inline]
pub fn pattern_word(seed: u64, gpa: u64) -> u64 {
    let mut x = gpa ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Initial value of a running checksum.
pub const CHECKSUM_INIT: u64 = 0xcbf2_9ce4_8422_2325;

/// Folds one 64-bit word into a running checksum (order-sensitive).
#[inline]
pub fn fold(sum: u64, word: u64) -> u64 {
    (sum ^ word)
        .wrapping_mul(0x0000_0100_0000_01b3)
        .rotate_left(29)
}

/// Checksum of a run of words.
pub fn checksum_words(words: &[u64]) -> u64 {
    words.iter().fold(CHECKSUM_INIT, |s, &w| fold(s, w))
}

/// Checksum of bytes (length a multiple of 8; a tail is folded zero-padded).
pub fn checksum_bytes(bytes: &[u8]) -> u64 {
    let mut sum = CHECKSUM_INIT;
    let mut chunks = bytes.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        sum = fold(sum, u64::from_le_bytes(w));
    }
    let rem = chunks.remainder();
    if !rem.is_empty() {
        let mut w = [0u8; 8];
        w[..rem.len()].copy_from_slice(rem);
        sum = fold(sum, u64::from_le_bytes(w));
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_differs_by_seed_and_address() {
        assert_ne!(pattern_word(1, 0), pattern_word(2, 0));
        assert_ne!(pattern_word(1, 0), pattern_word(1, 8));
        assert_eq!(pattern_word(7, 0x1000), pattern_word(7, 0x1000));
    }

    #[test]
    fn checksum_words_matches_bytes() {
        let words = [1u64, 2, 3, 0xdead_beef];
        let mut bytes = [0u8; 32];
        for (i, w) in words.iter().enumerate() {
            bytes[i * 8..i * 8 + 8].copy_from_slice(&w.to_le_bytes());
        }
        assert_eq!(checksum_words(&words), checksum_bytes(&bytes));
        assert_ne!(checksum_words(&[1, 2]), checksum_words(&[2, 1]));
    }
}
