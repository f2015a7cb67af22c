//! Identifiers for runs and completions: a prefix and 24 hex digits, unpredictable enough
//! not to be guessed from one another (seeded from the OS), unique within a database.

use std::io::Read;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};

static STATE: LazyLock<AtomicU64> = LazyLock::new(|| {
    let mut seed = [0u8; 8];
    let from_os = std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .is_ok();
    let mut s = u64::from_le_bytes(seed);
    if !from_os {
        s = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id()).rotate_left(32);
    }
    AtomicU64::new(s)
});

/// splitmix64: a bijective mix of a counter, so ids never repeat within one seed.
fn next() -> u64 {
    let mut z = STATE
        .fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed)
        .wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// `prefix` followed by 24 hex digits (the time in ms, then 56 random bits), so ids sort
/// roughly by creation.
pub fn new_id(prefix: &str) -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    format!("{prefix}{:010x}{:014x}", ms & 0xff_ffff_ffff, next() >> 8)
}

/// A one-time code of `len` characters an operator can read out and type: no 0/O, 1/I/L.
pub fn code(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut out = String::with_capacity(len);
    let mut bits = next();
    for i in 0..len {
        if i % 10 == 9 {
            bits = next();
        }
        out.push(char::from(
            ALPHABET[(bits % ALPHABET.len() as u64) as usize],
        ));
        bits /= ALPHABET.len() as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn codes_are_readable_and_differ() {
        let a = super::code(8);
        assert_eq!(a.len(), 8);
        assert!(
            a.bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        );
        assert!(!a.contains(['0', 'O', '1', 'I', 'L']));
        assert_ne!(a, super::code(8));
    }

    #[test]
    fn ids_are_distinct_and_shaped() {
        let a = super::new_id("run_");
        let b = super::new_id("run_");
        assert_ne!(a, b);
        assert_eq!(a.len(), 4 + 24);
        assert!(a[4..].chars().all(|c| c.is_ascii_hexdigit()));
    }
}
