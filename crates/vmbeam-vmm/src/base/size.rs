//! Sizes as operators write them: `4096`, `64M`, `2GiB`, `16KB` (binary
//! units: K, M, G, T, with or without `iB`/`B`).

/// Parses a size in bytes; `None` if it is not one (or overflows).
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    if t.is_empty() {
        return None;
    }
    // `MiB`, `GiB`, … and `MB`, `GB` mean the same as `M`, `G` (binary).
    let unit = |r: &str| r.ends_with(|c: char| "kKmMgGtT".contains(c));
    let t = ["iB", "ib", "B", "b"]
        .iter()
        .find_map(|suf| t.strip_suffix(suf).filter(|r| unit(r)))
        .unwrap_or(t);
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return None,
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    let n: u64 = num.trim().parse().ok()?;
    n.checked_mul(mult)
}
