//! The rejuvenation policy: when L0 replaces a guest hypervisor on its own.
//!
//! A guest hypervisor ages: it leaks pool memory, collects errors, runs for
//! a long time. L0 sees this in the health counters L1 reports (OP_HEALTH)
//! and in the host VM's uptime, and the operator chooses a policy:
//!
//! - `--rejuvenate-when "free<10%"`: the free fraction of the nested pool in
//!   L1's last health report fell below 10 % (`free<64M`: below 64 MiB);
//! - `--rejuvenate-every 30s`: the current guest hypervisor has run that long;
//! - neither: manual only (`vmbeam rejuvenate`), the default.
//!
//! Both may be given; the policy fires when either holds. This module only
//! parses and decides ([`Policy::decide`] is a pure function of an
//! [`Observation`]); `vmbeam run` polls it and runs the rejuvenation on a
//! worker thread. A generation younger than [`MIN_AGE`] is never replaced
//! automatically, and after a failed rejuvenation [`Backoff`] spaces out
//! the retries, so a policy that cannot succeed does not spin.

use std::str::FromStr;
use std::time::{Duration, Instant};

use crate::base::size::parse_size;

/// A generation must be this old before the policy may replace it.
pub const MIN_AGE: Duration = Duration::from_secs(2);
/// Shortest `--rejuvenate-every`.
pub const MIN_EVERY: Duration = Duration::from_secs(1);

/// Errors in a policy value; each says what to write instead.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    /// The condition is not `free<…`.
    #[error("invalid rejuvenation condition '{0}': write free<PERCENT% or free<SIZE, e.g. free<10% or free<64M")]
    BadCondition(String),
    /// The threshold is out of range.
    #[error("invalid rejuvenation condition '{text}': {why}")]
    BadThreshold {
        /// What was given.
        text: String,
        /// Why it is refused.
        why: String,
    },
    /// A duration could not be parsed.
    #[error("invalid duration '{0}': use a number with a unit ms, s, m or h, e.g. 30s or 5m")]
    BadDuration(String),
    /// `--rejuvenate-every` is too short.
    #[error("--rejuvenate-every {0} is too short: it must be at least 1s")]
    TooShort(String),
    /// The condition holds for every possible health report.
    #[error("the rejuvenation condition {cond} always holds with a {pool_mib} MiB nested pool; choose a threshold below the pool size")]
    AlwaysTrue {
        /// The condition.
        cond: String,
        /// Pool size in MiB.
        pool_mib: u64,
    },
}

/// When free pool memory is too low.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Condition {
    /// Free fraction of the pool below this percentage (0 < p < 100).
    FreeBelowPercent(f64),
    /// Free pool bytes below this.
    FreeBelowBytes(u64),
}

impl FromStr for Condition {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let text = s.trim();
        let bad = || PolicyError::BadCondition(s.to_string());
        let threshold = |why: &str| PolicyError::BadThreshold {
            text: s.to_string(),
            why: why.to_string(),
        };
        let (lhs, rhs) = text.split_once('<').ok_or_else(bad)?;
        if !lhs.trim().eq_ignore_ascii_case("free") || rhs.starts_with('=') {
            return Err(bad());
        }
        let rhs = rhs.trim();
        if let Some(p) = rhs.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !p.is_finite() || p <= 0.0 || p >= 100.0 {
                return Err(threshold("the percentage must be above 0 and below 100"));
            }
            Ok(Condition::FreeBelowPercent(p))
        } else {
            let b = parse_size(rhs).ok_or_else(bad)?;
            if b == 0 {
                return Err(threshold("the size must be above 0"));
            }
            Ok(Condition::FreeBelowBytes(b))
        }
    }
}

impl std::fmt::Display for Condition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Condition::FreeBelowPercent(p) => write!(f, "free<{p}%"),
            Condition::FreeBelowBytes(b) => write!(f, "free<{}", fmt_size(*b)),
        }
    }
}

/// `64M`, `1G`, `512K` or a byte count.
fn fmt_size(b: u64) -> String {
    for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
        if b >= 1 << shift && b.is_multiple_of(1 << shift) {
            return format!("{}{unit}", b >> shift);
        }
    }
    b.to_string()
}

/// Parses `30s`, `5m`, `1h`, `500ms`, `1.5m`; a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, PolicyError> {
    let t = s.trim();
    let bad = || PolicyError::BadDuration(s.to_string());
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| bad())?;
    let secs = match unit.trim() {
        "ms" => n / 1000.0,
        "" | "s" => n,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(bad()),
    };
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(bad());
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `30s`, `5m`, `1h`, `1500ms`.
pub fn fmt_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms > 0 && ms.is_multiple_of(3_600_000) {
        format!("{}h", ms / 3_600_000)
    } else if ms > 0 && ms.is_multiple_of(60_000) {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// What the policy looks at for one host VM line.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The current guest hypervisor is running (not failed or stopped).
    pub running: bool,
    /// How long the current generation has run.
    pub uptime: Duration,
    /// Its last health report, if it sent one.
    pub health: Option<PoolHealth>,
}

/// The pool counters of a health report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolHealth {
    /// `pool_free_bytes`.
    pub free_bytes: u64,
    /// `pool_used_bytes` (including leaked pages).
    pub used_bytes: u64,
}

/// A decision to rejuvenate now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Which rule fired: `free` or `every`.
    pub rule: &'static str,
    /// Why, in words (logged and kept in the retired-generation history).
    pub reason: String,
}

/// A rejuvenation policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    /// `--rejuvenate-when`.
    pub when: Option<Condition>,
    /// `--rejuvenate-every`.
    pub every: Option<Duration>,
}

impl Policy {
    /// Builds a policy from the command-line values.
    pub fn new(when: Option<Condition>, every: Option<Duration>) -> Result<Policy, PolicyError> {
        if let Some(e) = every {
            if e < MIN_EVERY {
                return Err(PolicyError::TooShort(fmt_duration(e)));
            }
        }
        Ok(Policy { when, every })
    }

    /// Parses the two command-line strings.
    pub fn parse(when: Option<&str>, every: Option<&str>) -> Result<Policy, PolicyError> {
        Policy::new(
            when.map(str::parse).transpose()?,
            every.map(parse_duration).transpose()?,
        )
    }

    /// True if only `vmbeam rejuvenate` replaces guest hypervisors.
    pub fn is_manual(&self) -> bool {
        self.when.is_none() && self.every.is_none()
    }

    /// `manual`, `free<10%`, `every 30s`, `free<10% or every 30s`.
    pub fn describe(&self) -> String {
        match (&self.when, &self.every) {
            (None, None) => "manual".into(),
            (Some(c), None) => c.to_string(),
            (None, Some(e)) => format!("every {}", fmt_duration(*e)),
            (Some(c), Some(e)) => format!("{c} or every {}", fmt_duration(*e)),
        }
    }

    /// Refuses a byte threshold that every report of a `pool_bytes` pool
    /// satisfies (it would rejuvenate forever).
    pub fn check_pool(&self, pool_bytes: u64) -> Result<(), PolicyError> {
        match self.when {
            Some(c @ Condition::FreeBelowBytes(b)) if b > pool_bytes => {
                Err(PolicyError::AlwaysTrue {
                    cond: c.to_string(),
                    pool_mib: pool_bytes >> 20,
                })
            }
            _ => Ok(()),
        }
    }

    /// Whether to rejuvenate the line observed now.
    pub fn decide(&self, obs: &Observation) -> Option<Decision> {
        if !obs.running || obs.uptime < MIN_AGE {
            return None;
        }
        if let (Some(c), Some(h)) = (self.when, obs.health) {
            let total = h.free_bytes.saturating_add(h.used_bytes);
            let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
            let fired = match c {
                Condition::FreeBelowPercent(p) => {
                    total > 0 && (h.free_bytes as f64) * 100.0 < p * total as f64
                }
                Condition::FreeBelowBytes(b) => h.free_bytes < b,
            };
            if fired {
                let pct = if total > 0 {
                    h.free_bytes as f64 * 100.0 / total as f64
                } else {
                    0.0
                };
                return Some(Decision {
                    rule: "free",
                    reason: format!(
                        "free nested pool {:.1} MiB of {:.1} MiB ({pct:.1}%) is below the threshold ({c})",
                        mib(h.free_bytes),
                        mib(total)
                    ),
                });
            }
        }
        if let Some(e) = self.every {
            if obs.uptime >= e {
                return Some(Decision {
                    rule: "every",
                    reason: format!(
                        "guest hypervisor has run {:.1} s (every {})",
                        obs.uptime.as_secs_f64(),
                        fmt_duration(e)
                    ),
                });
            }
        }
        None
    }
}

/// Why a generation was replaced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// `vmbeam rejuvenate` / `POST /rejuvenate` / library call.
    Manual,
    /// The policy fired.
    Policy {
        /// [`Decision::reason`].
        reason: String,
    },
}

impl Trigger {
    /// `manual` or `policy`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Trigger::Manual => "manual",
            Trigger::Policy { .. } => "policy",
        }
    }

    /// The policy's reason, if any.
    pub fn detail(&self) -> Option<&str> {
        match self {
            Trigger::Manual => None,
            Trigger::Policy { reason } => Some(reason),
        }
    }
}

/// Spaces out automatic retries after failures: 5 s, then doubling up to 5 min.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Option<Instant>,
    delay: Duration,
}

impl Backoff {
    /// First wait after a failure.
    pub const FIRST: Duration = Duration::from_secs(5);
    /// Longest wait.
    pub const MAX: Duration = Duration::from_secs(300);

    /// No failure yet.
    pub fn new() -> Backoff {
        Backoff {
            next: None,
            delay: Self::FIRST,
        }
    }

    /// May the policy act at `now`?
    pub fn ready(&self, now: Instant) -> bool {
        self.next.is_none_or(|t| now >= t)
    }

    /// A rejuvenation failed at `now`; returns how long to wait.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let wait = self.delay;
        self.next = Some(now + wait);
        self.delay = (self.delay * 2).min(Self::MAX);
        wait
    }

    /// A rejuvenation succeeded: no waiting any more.
    pub fn succeeded(&mut self) {
        self.next = None;
        self.delay = Self::FIRST;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn conditions_parse() {
        assert_eq!(
            "free<10%".parse::<Condition>(),
            Ok(Condition::FreeBelowPercent(10.0))
        );
        assert_eq!(
            " Free < 2.5 % ".parse::<Condition>(),
            Ok(Condition::FreeBelowPercent(2.5))
        );
        assert_eq!(
            "free<64M".parse::<Condition>(),
            Ok(Condition::FreeBelowBytes(64 * MIB))
        );
        assert_eq!(
            "free<1g".parse::<Condition>(),
            Ok(Condition::FreeBelowBytes(1 << 30))
        );
        assert_eq!(
            "free<4096".parse::<Condition>(),
            Ok(Condition::FreeBelowBytes(4096))
        );
        assert_eq!(Condition::FreeBelowPercent(10.0).to_string(), "free<10%");
        assert_eq!(Condition::FreeBelowBytes(64 * MIB).to_string(), "free<64M");
        assert_eq!(Condition::FreeBelowBytes(1000).to_string(), "free<1000");
    }

    #[test]
    fn bad_conditions_say_what_to_write() {
        for bad in [
            "",
            "free",
            "used<10%",
            "free>10%",
            "free<=10%",
            "free<ten%",
            "free<12Q",
        ] {
            let e = bad.parse::<Condition>().unwrap_err();
            assert_eq!(e, PolicyError::BadCondition(bad.into()), "{bad}");
            assert!(
                e.to_string().contains("write free<PERCENT% or free<SIZE"),
                "{e}"
            );
        }
        for bad in ["free<0%", "free<100%", "free<250%", "free<-1%", "free<0"] {
            let e = bad.parse::<Condition>().unwrap_err();
            assert!(matches!(e, PolicyError::BadThreshold { .. }), "{bad}: {e}");
        }
        assert!("free<0%"
            .parse::<Condition>()
            .unwrap_err()
            .to_string()
            .contains("above 0 and below 100"));
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("1.5m"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("42"), Ok(Duration::from_secs(42)));
        for bad in ["", "s", "5x", "-5s", "5 days", "1e3s", "."] {
            let e = parse_duration(bad).unwrap_err();
            assert!(
                e.to_string().contains("use a number with a unit"),
                "{bad}: {e}"
            );
        }
        assert_eq!(fmt_duration(Duration::from_secs(300)), "5m");
        assert_eq!(fmt_duration(Duration::from_secs(30)), "30s");
        assert_eq!(fmt_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(fmt_duration(Duration::from_secs(7200)), "2h");
    }

    #[test]
    fn policies_parse_and_describe() {
        let p = Policy::parse(None, None).unwrap();
        assert!(p.is_manual());
        assert_eq!(p.describe(), "manual");
        let p = Policy::parse(Some("free<10%"), Some("5m")).unwrap();
        assert!(!p.is_manual());
        assert_eq!(p.describe(), "free<10% or every 5m");
        assert_eq!(
            Policy::parse(None, Some("30s")).unwrap().describe(),
            "every 30s"
        );
        let e = Policy::parse(None, Some("500ms")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "--rejuvenate-every 500ms is too short: it must be at least 1s"
        );
        assert!(Policy::parse(Some("bogus"), None).is_err());
        let p = Policy::parse(Some("free<128M"), None).unwrap();
        let e = p.check_pool(64 * MIB).unwrap_err();
        assert!(
            e.to_string()
                .contains("always holds with a 64 MiB nested pool"),
            "{e}"
        );
        assert!(p.check_pool(256 * MIB).is_ok());
        assert!(Policy::parse(Some("free<10%"), None)
            .unwrap()
            .check_pool(MIB)
            .is_ok());
    }

    fn obs(secs: u64, free: u64, used: u64) -> Observation {
        Observation {
            running: true,
            uptime: Duration::from_secs(secs),
            health: Some(PoolHealth {
                free_bytes: free,
                used_bytes: used,
            }),
        }
    }

    #[test]
    fn decisions() {
        let p = Policy::parse(Some("free<10%"), None).unwrap();
        assert_eq!(p.decide(&obs(10, 32 * MIB, 32 * MIB)), None);
        let d = p.decide(&obs(10, 6 * MIB, 58 * MIB)).unwrap();
        assert_eq!(d.rule, "free");
        assert!(d.reason.contains("(9.4%)"), "{}", d.reason);
        assert!(d.reason.contains("free<10%"), "{}", d.reason);
        // Exactly at the threshold does not fire.
        assert_eq!(p.decide(&obs(10, 10 * MIB, 90 * MIB)), None);
        // Too young, not running, no report yet, empty pool report: never.
        assert_eq!(p.decide(&obs(1, 0, 64 * MIB)), None);
        let mut o = obs(10, 0, 64 * MIB);
        o.running = false;
        assert_eq!(p.decide(&o), None);
        o.running = true;
        o.health = None;
        assert_eq!(p.decide(&o), None);
        assert_eq!(p.decide(&obs(10, 0, 0)), None);

        let p = Policy::parse(Some("free<64M"), None).unwrap();
        assert!(p.decide(&obs(10, 63 * MIB, 100 * MIB)).is_some());
        assert_eq!(p.decide(&obs(10, 64 * MIB, 100 * MIB)), None);

        let p = Policy::parse(None, Some("30s")).unwrap();
        assert_eq!(p.decide(&obs(29, 0, 64 * MIB)), None);
        let d = p.decide(&obs(30, 64 * MIB, 0)).unwrap();
        assert_eq!(d.rule, "every");
        // `every` needs no health report.
        let o = Observation {
            running: true,
            uptime: Duration::from_secs(31),
            health: None,
        };
        assert!(p.decide(&o).is_some());

        let p = Policy::parse(Some("free<10%"), Some("1m")).unwrap();
        assert_eq!(p.decide(&obs(10, 1, 64 * MIB)).unwrap().rule, "free");
        assert_eq!(
            p.decide(&obs(60, 32 * MIB, 32 * MIB)).unwrap().rule,
            "every"
        );
        assert_eq!(Policy::default().decide(&obs(1000, 0, 64 * MIB)), None);
    }

    #[test]
    fn backoff_doubles_and_resets() {
        let mut b = Backoff::new();
        let t = Instant::now();
        assert!(b.ready(t));
        assert_eq!(b.failed(t), Duration::from_secs(5));
        assert!(!b.ready(t + Duration::from_secs(4)));
        assert!(b.ready(t + Duration::from_secs(5)));
        assert_eq!(b.failed(t), Duration::from_secs(10));
        for _ in 0..10 {
            b.failed(t);
        }
        assert_eq!(b.failed(t), Backoff::MAX);
        b.succeeded();
        assert!(b.ready(t));
        assert_eq!(b.failed(t), Backoff::FIRST);
    }

    #[test]
    fn triggers_name_themselves() {
        assert_eq!(Trigger::Manual.as_str(), "manual");
        assert_eq!(Trigger::Manual.detail(), None);
        let t = Trigger::Policy { reason: "x".into() };
        assert_eq!(t.as_str(), "policy");
        assert_eq!(t.detail(), Some("x"));
    }
}
