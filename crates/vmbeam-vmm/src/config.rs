//! What an operator asks for: sizes, counts, workloads, consoles; parsed and
//! checked here so that every bad value gets one clear sentence before any
//! VM is built.

use std::path::PathBuf;
use std::str::FromStr;

use vmbeam_abi::layout;

/// Errors in configuration values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A size could not be parsed.
    #[error(
        "invalid size '{0}': use a number with an optional K, M, G or T suffix (e.g. 64M, 4G)"
    )]
    BadSize(String),
    /// A workload name is unknown.
    #[error("unknown workload '{0}': choose memtouch, ticker, blkcheck or netecho")]
    BadWorkload(String),
    /// A value is out of range.
    #[error("{0}")]
    Range(String),
}

/// Checks a host VM line name: 1 to 16 bytes (it is written into the boot
/// information's name field) of `[A-Za-z0-9_-]`. The one rule for
/// `vmbeam run --name`, `Vmm::start` and a host VM arriving
/// by migration.
pub fn check_line_name(name: &str) -> Result<(), ConfigError> {
    crate::host::names::check_line_name(name).map_err(ConfigError::Range)
}

/// Parses `--duration`: seconds (a non-negative number), or `inf` /
/// `forever` for no limit (`None`). A limit too large to represent is no
/// limit either.
pub fn parse_run_duration(s: &str) -> Result<Option<std::time::Duration>, ConfigError> {
    let t = s.trim();
    if matches!(t, "inf" | "infinity" | "forever") {
        return Ok(None);
    }
    let bad = || {
        ConfigError::Range(format!(
            "invalid duration '{}': give seconds (e.g. 30 or 2.5), or 'inf' to run until stopped",
            s.escape_debug()
        ))
    };
    let secs: f64 = t.parse().map_err(|_| bad())?;
    if secs.is_nan() || secs < 0.0 {
        return Err(bad());
    }
    Ok(std::time::Duration::try_from_secs_f64(secs).ok())
}

/// Parses `64M`, `4G`, `512k`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, ConfigError> {
    crate::base::size::parse_size(s).ok_or_else(|| ConfigError::BadSize(s.to_string()))
}

/// A nested workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    /// Memory verifier.
    Memtouch,
    /// Timestamp printer.
    Ticker,
    /// Writes, reads back and verifies its virtio disk.
    Blkcheck,
    /// Echo services on its virtio network card.
    Netecho,
}

impl FromStr for Workload {
    type Err = ConfigError;
    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s.trim() {
            "memtouch" => Ok(Workload::Memtouch),
            "ticker" => Ok(Workload::Ticker),
            "blkcheck" => Ok(Workload::Blkcheck),
            "netecho" => Ok(Workload::Netecho),
            other => Err(ConfigError::BadWorkload(other.to_string())),
        }
    }
}

impl Workload {
    /// ABI kind.
    pub fn kind(&self) -> u32 {
        match self {
            Workload::Memtouch => vmbeam_abi::boot::workload::MEMTOUCH,
            Workload::Ticker => vmbeam_abi::boot::workload::TICKER,
            Workload::Blkcheck => vmbeam_abi::boot::workload::BLKCHECK,
            Workload::Netecho => vmbeam_abi::boot::workload::NETECHO,
        }
    }
    /// Name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Workload::Memtouch => "memtouch",
            Workload::Ticker => "ticker",
            Workload::Blkcheck => "blkcheck",
            Workload::Netecho => "netecho",
        }
    }
}

/// Parses `memtouch,ticker`.
pub fn parse_workloads(s: &str) -> Result<Vec<Workload>, ConfigError> {
    s.split(',').map(Workload::from_str).collect()
}

/// Configuration of `vmbeam run`.
#[derive(Debug, Clone)]
pub struct VmmConfig {
    /// Guest hypervisor RAM.
    pub ram: u64,
    /// Nested pool; `None` = sized for the nested guests.
    pub pool: Option<u64>,
    /// vCPUs of each host VM.
    pub vcpus: u32,
    /// Nested guests to start.
    pub nested: u32,
    /// RAM of each nested guest.
    pub nested_mem: u64,
    /// Workloads, assigned round-robin.
    pub workloads: Vec<Workload>,
    /// Consoles directory; `None` = terminal.
    pub console_dir: Option<PathBuf>,
    /// Discard consoles.
    pub quiet: bool,
    /// memtouch: rounds before halting (0 = forever); ticker: ticks before a deliberate fault.
    pub workload_param: u64,
    /// Time slice, µs.
    pub slice_us: u32,
    /// Aging injector: pool pages each guest hypervisor leaks per nested
    /// RUN (0 = off). Successors get the same setting.
    pub age_leak_pages: u32,
    /// Second workload parameter (blkcheck: bit 0 = wait for interrupts).
    pub workload_param1: u64,
    /// Device backends bound to nested guest names (`--disk`, `--net`).
    pub devices: Vec<crate::devices::binding::Binding>,
}

/// Most pages `--age-leak` may ask for per operation (one 2 MiB extent).
pub const MAX_AGE_LEAK_PAGES: u32 = (layout::EXTENT_SIZE / 4096) as u32;

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            ram: 32 << 20,
            pool: None,
            vcpus: 1,
            nested: 2,
            nested_mem: 16 << 20,
            workloads: vec![Workload::Memtouch, Workload::Ticker],
            console_dir: None,
            quiet: false,
            workload_param: 0,
            slice_us: 10_000,
            age_leak_pages: 0,
            workload_param1: 0,
            devices: Vec::new(),
        }
    }
}

impl VmmConfig {
    /// Pool size to use.
    pub fn pool_size(&self) -> u64 {
        self.pool.unwrap_or_else(|| {
            let need = self.nested as u64 * self.nested_mem + layout::EXTENT_SIZE * 2;
            need.max(64 << 20)
        })
    }

    /// Checks every value; the error says which and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let r = |m: String| Err(ConfigError::Range(m));
        if self.ram < layout::MIN_RAM
            || self.ram > layout::MAX_RAM
            || !self.ram.is_multiple_of(layout::EXTENT_SIZE)
        {
            return r(format!(
                "--mem must be a multiple of 2 MiB between {} MiB and {} MiB",
                layout::MIN_RAM >> 20,
                layout::MAX_RAM >> 20
            ));
        }
        if self.vcpus == 0 || self.vcpus > layout::MAX_VCPUS {
            return r(format!(
                "--vcpus must be between 1 and {}",
                layout::MAX_VCPUS
            ));
        }
        if self.nested as usize > vmbeam_abi::boot::MAX_NESTED {
            return r(format!(
                "--nested must be at most {}",
                vmbeam_abi::boot::MAX_NESTED
            ));
        }
        if self.nested > 0 {
            if self.nested_mem < vmbeam_abi::l2::MIN_MEM
                || !self.nested_mem.is_multiple_of(layout::EXTENT_SIZE)
            {
                return r(format!(
                    "--nested-mem must be a multiple of 2 MiB and at least {} MiB",
                    vmbeam_abi::l2::MIN_MEM >> 20
                ));
            }
            if self.nested_mem > vmbeam_abi::l2::MAX_GIB << 30 {
                return r(format!(
                    "--nested-mem must be at most {} GiB",
                    vmbeam_abi::l2::MAX_GIB
                ));
            }
        }
        let pool = self.pool_size();
        if pool > layout::MAX_POOL || !pool.is_multiple_of(layout::EXTENT_SIZE) {
            return r(format!(
                "the nested pool must be a multiple of 2 MiB up to {} GiB (asked {} MiB)",
                layout::MAX_POOL >> 30,
                pool >> 20
            ));
        }
        if self.nested as u64 * self.nested_mem > pool {
            return r(format!(
                "{} nested guests of {} MiB do not fit a {} MiB pool",
                self.nested,
                self.nested_mem >> 20,
                pool >> 20
            ));
        }
        if self.workloads.is_empty() {
            return r("at least one workload is needed".into());
        }
        if !(100..=1_000_000).contains(&self.slice_us) {
            return r("the time slice must be between 100 µs and 1 s".into());
        }
        if self.age_leak_pages > MAX_AGE_LEAK_PAGES {
            return r(format!(
                "--age-leak must be at most {MAX_AGE_LEAK_PAGES} pages (one 2 MiB extent) per operation, got {}",
                self.age_leak_pages
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_names_and_run_durations_are_checked() {
        assert!(check_line_name("hv0").is_ok());
        assert!(check_line_name("a-b_C9").is_ok());
        assert!(check_line_name(&"x".repeat(16)).is_ok());
        for bad in ["", "a b", "a/b", "a.b", "é", &"x".repeat(17)] {
            assert!(check_line_name(bad).is_err(), "{bad:?}");
        }
        use std::time::Duration;
        assert_eq!(
            parse_run_duration("2.5"),
            Ok(Some(Duration::from_millis(2500)))
        );
        assert_eq!(parse_run_duration("0"), Ok(Some(Duration::ZERO)));
        assert_eq!(parse_run_duration("inf"), Ok(None));
        assert_eq!(parse_run_duration("forever"), Ok(None));
        assert_eq!(parse_run_duration("1e300"), Ok(None));
        for bad in ["-1", "NaN", "soon", ""] {
            assert!(parse_run_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64M"), Ok(64 << 20));
        assert_eq!(parse_size("4g"), Ok(4 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64MiB"), Ok(64 << 20));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("16KB"), Ok(16 << 10));
        assert!(parse_size("16iB").is_err());
        assert!(parse_size("MiB").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn bad_configs_are_refused() {
        assert!(VmmConfig::default().validate().is_ok());
        let c = VmmConfig {
            nested_mem: 3 << 20,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = VmmConfig {
            vcpus: 0,
            ..Default::default()
        };
        assert!(c.validate().is_err());
        let c = VmmConfig {
            nested: 4,
            nested_mem: 64 << 20,
            pool: Some(64 << 20),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("do not fit"));
        assert!(parse_workloads("memtouch,bogus").is_err());
        let c = VmmConfig {
            age_leak_pages: MAX_AGE_LEAK_PAGES + 1,
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("--age-leak"));
    }
}
