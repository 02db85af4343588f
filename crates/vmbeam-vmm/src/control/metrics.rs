//! Metrics in the Prometheus text exposition format (version 0.0.4) for
//! `GET /api/v1/metrics`: counters the VMM keeps as operations end
//! (rejuvenations, rollbacks, migrations, bytes moved, a histogram of guest
//! downtime) and values read from the status tree at scrape time
//! (hypercalls and nested exits per host VM, the guest hypervisor's last
//! health report).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::control::status::Status;
use crate::migration::rejuvenate::{RejuvenateError, Report};

/// Upper bounds (seconds) of the downtime histogram's buckets.
pub const DOWNTIME_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Counters kept as operations end.
#[derive(Debug, Default)]
pub struct Counters {
    rejuvenations_ok: AtomicU64,
    rejuvenations_failed: AtomicU64,
    rollbacks: AtomicU64,
    rescues: AtomicU64,
    migrations_ok: AtomicU64,
    migrations_failed: AtomicU64,
    bytes_copied: AtomicU64,
    bytes_sent: AtomicU64,
    downtime_buckets: [AtomicU64; DOWNTIME_BUCKETS.len()],
    downtime_count: AtomicU64,
    downtime_sum_us: AtomicU64,
}

impl Counters {
    fn downtimes(&self, r: &Report) {
        for g in r.guests.iter().filter(|g| g.running_after) {
            let s = g.downtime_us as f64 / 1e6;
            for (i, le) in DOWNTIME_BUCKETS.iter().enumerate() {
                if s <= *le {
                    self.downtime_buckets[i].fetch_add(1, Ordering::Relaxed);
                }
            }
            self.downtime_count.fetch_add(1, Ordering::Relaxed);
            self.downtime_sum_us
                .fetch_add(g.downtime_us, Ordering::Relaxed);
        }
    }

    /// Counts a rejuvenation's outcome: its report, or why it failed
    /// (`None`: refused before it began, e.g. busy or an unknown line,
    /// which is not a rejuvenation).
    pub fn rejuvenation(&self, res: Result<&Report, Option<&RejuvenateError>>) {
        match res {
            Ok(r) => {
                self.rejuvenations_ok.fetch_add(1, Ordering::Relaxed);
                self.bytes_copied
                    .fetch_add(r.bytes_copied, Ordering::Relaxed);
                if r.rescued.is_some() {
                    self.rescues.fetch_add(1, Ordering::Relaxed);
                }
                self.downtimes(r);
            }
            Err(Some(e)) => {
                self.rejuvenations_failed.fetch_add(1, Ordering::Relaxed);
                if matches!(e, RejuvenateError::RolledBack { .. }) {
                    self.rollbacks.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(None) => {}
        }
    }

    /// Counts a migration's outcome.
    pub fn migration<E>(&self, res: &Result<Report, E>) {
        match res {
            Ok(r) => {
                self.migrations_ok.fetch_add(1, Ordering::Relaxed);
                self.bytes_sent.fetch_add(r.bytes_copied, Ordering::Relaxed);
                self.downtimes(r);
            }
            Err(_) => {
                self.migrations_failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Escapes a label value (backslash, double quote, newline).
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders every metric: `c`'s counters and what `status` shows now.
pub fn render(c: &Counters, status: &Status, jobs_running: usize) -> String {
    let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let mut o = String::new();
    family(
        &mut o,
        "vmbeam_rejuvenations_total",
        "counter",
        "Rejuvenations that ended, by result.",
    );
    let _ = writeln!(
        o,
        "vmbeam_rejuvenations_total{{result=\"ok\"}} {}",
        get(&c.rejuvenations_ok)
    );
    let _ = writeln!(
        o,
        "vmbeam_rejuvenations_total{{result=\"failed\"}} {}",
        get(&c.rejuvenations_failed)
    );
    family(
        &mut o,
        "vmbeam_rollbacks_total",
        "counter",
        "Rejuvenations rolled back (every guest stayed with the aged guest hypervisor).",
    );
    let _ = writeln!(o, "vmbeam_rollbacks_total {}", get(&c.rollbacks));
    family(
        &mut o,
        "vmbeam_rescues_total",
        "counter",
        "Rejuvenations L0 finished because the aged guest hypervisor died mid-way.",
    );
    let _ = writeln!(o, "vmbeam_rescues_total {}", get(&c.rescues));
    family(
        &mut o,
        "vmbeam_migrations_total",
        "counter",
        "Migrations to another host that ended, by result.",
    );
    let _ = writeln!(
        o,
        "vmbeam_migrations_total{{result=\"ok\"}} {}",
        get(&c.migrations_ok)
    );
    let _ = writeln!(
        o,
        "vmbeam_migrations_total{{result=\"failed\"}} {}",
        get(&c.migrations_failed)
    );
    family(
        &mut o,
        "vmbeam_copied_bytes_total",
        "counter",
        "Guest memory bytes copied by L0 in rejuvenations (0 for zero-copy).",
    );
    let _ = writeln!(o, "vmbeam_copied_bytes_total {}", get(&c.bytes_copied));
    family(
        &mut o,
        "vmbeam_sent_bytes_total",
        "counter",
        "Guest memory bytes sent to other hosts by migrations.",
    );
    let _ = writeln!(o, "vmbeam_sent_bytes_total {}", get(&c.bytes_sent));
    family(
        &mut o,
        "vmbeam_guest_downtime_seconds",
        "histogram",
        "Downtime of each nested guest moved by a rejuvenation or migration.",
    );
    for (i, le) in DOWNTIME_BUCKETS.iter().enumerate() {
        let _ = writeln!(
            o,
            "vmbeam_guest_downtime_seconds_bucket{{le=\"{le}\"}} {}",
            get(&c.downtime_buckets[i])
        );
    }
    let _ = writeln!(
        o,
        "vmbeam_guest_downtime_seconds_bucket{{le=\"+Inf\"}} {}",
        get(&c.downtime_count)
    );
    let _ = writeln!(
        o,
        "vmbeam_guest_downtime_seconds_sum {}",
        get(&c.downtime_sum_us) as f64 / 1e6
    );
    let _ = writeln!(
        o,
        "vmbeam_guest_downtime_seconds_count {}",
        get(&c.downtime_count)
    );
    family(
        &mut o,
        "vmbeam_jobs_running",
        "gauge",
        "Rejuvenation or migration jobs running now.",
    );
    let _ = writeln!(o, "vmbeam_jobs_running {jobs_running}");

    family(
        &mut o,
        "vmbeam_host_vm_generation",
        "gauge",
        "Generation of the guest hypervisor serving each line.",
    );
    for v in &status.host_vms {
        let _ = writeln!(
            o,
            "vmbeam_host_vm_generation{{vm=\"{}\"}} {}",
            label(&v.name),
            v.generation
        );
    }
    family(
        &mut o,
        "vmbeam_host_vm_running",
        "gauge",
        "1 if the line's host VM runs, else 0.",
    );
    for v in &status.host_vms {
        let _ = writeln!(
            o,
            "vmbeam_host_vm_running{{vm=\"{}\"}} {}",
            label(&v.name),
            u8::from(v.status == "running")
        );
    }
    family(
        &mut o,
        "vmbeam_hypercalls_total",
        "counter",
        "Hypercalls served for the current host VM of each line (restarts at each generation).",
    );
    for v in &status.host_vms {
        let _ = writeln!(
            o,
            "vmbeam_hypercalls_total{{vm=\"{}\",generation=\"{}\"}} {}",
            label(&v.name),
            v.generation,
            v.hypercalls
        );
    }
    family(&mut o, "vmbeam_nested_exits_total", "counter", "Exits of nested guests returned to the guest hypervisor, per host VM (restarts at each generation).");
    for v in &status.host_vms {
        let exits: u64 = v.nested.iter().map(|n| n.exits).sum();
        let _ = writeln!(
            o,
            "vmbeam_nested_exits_total{{vm=\"{}\",generation=\"{}\"}} {exits}",
            label(&v.name),
            v.generation
        );
    }
    family(
        &mut o,
        "vmbeam_nested_guests",
        "gauge",
        "Nested guests under each line's host VM.",
    );
    for v in &status.host_vms {
        let _ = writeln!(
            o,
            "vmbeam_nested_guests{{vm=\"{}\"}} {}",
            label(&v.name),
            v.nested.len()
        );
    }
    family(
        &mut o,
        "vmbeam_l1_health",
        "gauge",
        "The guest hypervisor's last health report, one series per field.",
    );
    for v in &status.host_vms {
        for (k, val) in &v.health {
            let _ = writeln!(
                o,
                "vmbeam_l1_health{{vm=\"{}\",field=\"{}\"}} {val}",
                label(&v.name),
                label(k)
            );
        }
    }
    family(
        &mut o,
        "vmbeam_l1_health_reports_total",
        "counter",
        "Health reports received from the current guest hypervisor of each line.",
    );
    for v in &status.host_vms {
        let _ = writeln!(
            o,
            "vmbeam_l1_health_reports_total{{vm=\"{}\",generation=\"{}\"}} {}",
            label(&v.name),
            v.generation,
            v.health_reports
        );
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_escaped() {
        assert_eq!(label("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn empty_status_renders_every_family_once() {
        let s = Status {
            version: "x".into(),
            policy: "manual".into(),
            host_vms: Vec::new(),
            jobs: Vec::new(),
        };
        let text = render(&Counters::default(), &s, 0);
        assert_eq!(
            text.matches("# TYPE vmbeam_rejuvenations_total counter")
                .count(),
            1
        );
        assert!(text.contains("vmbeam_guest_downtime_seconds_bucket{le=\"+Inf\"} 0\n"));
    }
}
