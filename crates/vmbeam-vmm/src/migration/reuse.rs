//! Memory reuse for host VMs that come back (after MiyakoDori).
//!
//! A host VM that leaves this host often returns (maintenance of the other
//! host, load balancing back and forth). Instead of releasing its memory
//! when it leaves, the source can keep the image, for a bounded time and a
//! bounded total size, under a random epoch id that travels with the VM.
//! When the VM comes back citing that epoch, this host hashes the pages it
//! kept and sends the hashes; the sender sends only pages whose hash
//! differs (and SAME markers for the rest), so an idle guest's return costs
//! a small fraction of its first trip.
//!
//! What keeps a stale or foreign image from being used:
//! - an entry is used only for the same line name, the same epoch, the same
//!   region layout (kind, guest, address, size, in order), and before it
//!   expires; it is taken out of the cache when used, so it serves once;
//! - every page is compared by a 128-bit hash keyed with a fresh random seed
//!   per offer, computed independently on both ends, so a page the guest
//!   changed is sent whatever the epoch says;
//! - the usual end-to-end check still runs: the destination hashes every
//!   nested guest and the sender commits only if they equal its own.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::host::memory::Region;
use crate::migration::copy::PAGE;
use crate::migration::region_desc::{region_desc, RegionDesc};

/// A kept image.
struct Entry {
    line: String,
    epoch: u128,
    regions: Vec<Region>,
    layout: Vec<RegionDesc>,
    kept_at: Instant,
    bytes: u64,
}

/// Images of host VMs that left this host, and the epochs of VMs that
/// arrived here (to cite when they go back).
pub struct ReuseCache {
    ttl: Duration,
    max_bytes: u64,
    entries: Mutex<Vec<Entry>>,
    origins: Mutex<HashMap<String, u128>>,
    me: Weak<ReuseCache>,
}

impl std::fmt::Debug for ReuseCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReuseCache")
            .field("ttl", &self.ttl)
            .field("max_bytes", &self.max_bytes)
            .field("held_bytes", &self.held_bytes())
            .finish()
    }
}

fn same_layout(a: &[RegionDesc], b: &[RegionDesc]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| {
            x.kind == y.kind && x.guest == y.guest && x.gpa == y.gpa && x.size == y.size
        })
}

/// A fresh random 128-bit value from the kernel.
pub fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // Never zero: the time and address still differ per call.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        return t ^ ((&b as *const _ as usize as u128) << 64) | 1;
    }
    u128::from_le_bytes(b)
}

impl ReuseCache {
    /// Keeps images for `ttl`, at most `max_bytes` of host memory in all.
    pub fn new(ttl: Duration, max_bytes: u64) -> Arc<ReuseCache> {
        Arc::new_cyclic(|me| ReuseCache {
            ttl,
            max_bytes,
            entries: Mutex::new(Vec::new()),
            origins: Mutex::new(HashMap::new()),
            me: me.clone(),
        })
    }

    fn expire(&self) {
        let ttl = self.ttl;
        self.entries
            .lock()
            .unwrap()
            .retain(|e| e.kept_at.elapsed() < ttl);
    }

    /// Host memory held by kept images.
    pub fn held_bytes(&self) -> u64 {
        self.entries.lock().unwrap().iter().map(|e| e.bytes).sum()
    }

    /// Keeps `regions` of line `line` under `epoch`. Older images are
    /// dropped to stay within the size bound; an image larger than the
    /// bound is not kept (returns false, and the caller releases it).
    pub fn keep(&self, line: &str, epoch: u128, regions: Vec<Region>) -> bool {
        self.expire();
        let bytes: u64 = regions.iter().map(|r| r.file.allocated_bytes()).sum();
        if bytes > self.max_bytes || self.ttl.is_zero() {
            return false;
        }
        let layout = regions.iter().map(region_desc).collect();
        {
            let mut es = self.entries.lock().unwrap();
            es.retain(|e| e.line != line);
            while es.iter().map(|e| e.bytes).sum::<u64>() + bytes > self.max_bytes {
                es.remove(0);
            }
            es.push(Entry {
                line: line.to_string(),
                epoch,
                regions,
                layout,
                kept_at: Instant::now(),
                bytes,
            });
        }
        // Release the image when its time is up even if nothing asks.
        let me = self.me.clone();
        let ttl = self.ttl;
        let _ = std::thread::Builder::new()
            .name("vmbeam-reuse-expiry".into())
            .spawn(move || {
                std::thread::sleep(ttl);
                if let Some(c) = me.upgrade() {
                    c.expire();
                }
            });
        true
    }

    /// Takes the image of `line` kept under `epoch` if it is still valid and
    /// has exactly `layout`; says why not otherwise.
    pub fn take(
        &self,
        line: &str,
        epoch: u128,
        layout: &[RegionDesc],
    ) -> Result<Vec<Region>, String> {
        self.expire();
        let mut es = self.entries.lock().unwrap();
        let Some(i) = es.iter().position(|e| e.line == line) else {
            return Err(format!("no image of {line} is kept here (or it expired)"));
        };
        if es[i].epoch != epoch {
            return Err(format!("the image of {line} kept here is of another epoch"));
        }
        if !same_layout(&es[i].layout, layout) {
            es.remove(i);
            return Err(format!("the memory layout of {line} changed since it left"));
        }
        Ok(es.remove(i).regions)
    }

    /// Remembers that `line` arrived with an image kept under `epoch` at
    /// its source.
    pub fn note_origin(&self, line: &str, epoch: u128) {
        self.origins.lock().unwrap().insert(line.to_string(), epoch);
    }

    /// The epoch to cite when `line` goes back (and forgets it).
    pub fn take_origin(&self, line: &str) -> Option<u128> {
        self.origins.lock().unwrap().remove(line)
    }
}

/// Keyed 128-bit hash of one page.
pub fn page_hash(page: &[u8], seed: u64) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(page, seed)
}

/// Hash of every page of `r` (holes hash as zero pages without being read).
pub fn region_hashes(r: &Region, seed: u64) -> Vec<u128> {
    let zero = page_hash(&[0u8; PAGE as usize], seed);
    let mut out = vec![zero; (r.size / PAGE) as usize];
    for (off, len, data) in r.file.extents(r.offset, r.size) {
        if !data {
            continue;
        }
        let start = off - r.offset;
        let mut p = start;
        while p < start + len {
            let n = (start + len - p).min(PAGE);
            // SAFETY: `[p, p+n)` is inside the region's live mapping.
            let page =
                unsafe { std::slice::from_raw_parts(r.map.as_ptr().add(p as usize), n as usize) };
            out[(p / PAGE) as usize] = page_hash(page, seed);
            p += n;
        }
    }
    out
}

/// Hashes per HASHES frame at most.
pub const HASHES_PER_FRAME: usize = 1 << 16;

/// Payload of a HASHES frame: region, first page, then 16 bytes per page.
pub fn hashes_payload(region: u32, first: u64, h: &[u128]) -> Vec<u8> {
    let mut v = Vec::with_capacity(12 + 16 * h.len());
    v.extend_from_slice(&region.to_le_bytes());
    v.extend_from_slice(&first.to_le_bytes());
    for x in h {
        v.extend_from_slice(&x.to_le_bytes());
    }
    v
}

/// Splits a HASHES payload.
pub fn parse_hashes(p: &[u8]) -> Option<(u32, u64, Vec<u128>)> {
    if p.len() < 12 || !(p.len() - 12).is_multiple_of(16) || (p.len() - 12) / 16 > HASHES_PER_FRAME
    {
        return None;
    }
    let region = u32::from_le_bytes(p[0..4].try_into().ok()?);
    let first = u64::from_le_bytes(p[4..12].try_into().ok()?);
    let h = p[12..]
        .chunks_exact(16)
        .map(|c| u128::from_le_bytes(c.try_into().unwrap_or([0; 16])))
        .collect();
    Some((region, first, h))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_round_trip_and_bad_payloads_are_refused() {
        let h = vec![1u128, 2, u128::MAX];
        let p = hashes_payload(3, 7, &h);
        assert_eq!(parse_hashes(&p), Some((3, 7, h)));
        assert!(parse_hashes(&p[..p.len() - 1]).is_none());
        assert!(parse_hashes(&[0; 5]).is_none());
        assert_ne!(page_hash(&[0; 4096], 1), page_hash(&[0; 4096], 2));
    }
}
