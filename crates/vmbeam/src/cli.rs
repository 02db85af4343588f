//! Command-line interface of `vmbeam` (clap).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use vmbeam_vmm::config::{parse_size, ConfigError, VmmConfig, Workload};
use vmbeam_vmm::control::inspect::{parse_number, InspectError};
use vmbeam_vmm::control::policy::{parse_duration, Condition, PolicyError};
use vmbeam_vmm::devices::binding::{self, BindError, Binding};
use vmbeam_vmm::migration::rejuvenate::Mode;

/// Default API socket path.
pub fn default_socket() -> PathBuf {
    // SAFETY: getuid has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    PathBuf::from(format!("/tmp/vmbeam-{uid}.sock"))
}

/// vmbeam: run guest hypervisors in host VMs and rejuvenate them by moving
/// their nested guests to a fresh guest hypervisor without copying memory.
#[derive(Debug, Parser)]
#[command(name = "vmbeam", version, about)]
pub struct Cli {
    /// More log output on stderr (-v: debug, -vv: trace); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
// Parsed once per process; boxing `run`'s options would buy nothing.
#[allow(clippy::large_enum_variant)]
pub enum Command {
    /// Boot a host VM with the guest hypervisor and its nested guests, and serve the API.
    Run(RunArgs),
    /// Run, rejuvenate and report on the embedded default guests, self-contained.
    Demo(DemoArgs),
    /// Rejuvenate a running host VM (client of `vmbeam run`'s API).
    Rejuvenate(RejuvenateArgs),
    /// Move a whole host VM (guest hypervisor and nested guests) to another
    /// vmbeam started with `run --listen`, by pre-copy over TCP.
    Migrate(MigrateArgs),
    /// Show host VMs and their nested guests (client of the API).
    Status(StatusArgs),
    /// Read a nested guest's memory and registers without pausing it (client of the API).
    Inspect(InspectArgs),
    /// Stop a running `vmbeam run` and wait until it has exited (client of the API).
    Shutdown(SockArg),
    /// Show the jobs (rejuvenations, migrations) of a `vmbeam run`, or one of them.
    Jobs(JobsArgs),
    /// Cancel a running job: the rejuvenation or migration rolls back.
    Cancel(CancelArgs),
    /// Check that a `vmbeam run` answers: version, pid, features.
    Ping(SockArg),
    /// Print a shell completion script.
    Completions(CompletionsArgs),
    /// Print the man page (roff).
    Man,
}

/// How nested memory moves in a rejuvenation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ModeArg {
    /// Map the guests' pages into the successor; nothing is copied.
    ZeroCopy,
    /// Copy the guests' memory while they are paused.
    Copy,
    /// Copy while the guests run (dirty logging), then the rest paused.
    Precopy,
}

impl From<ModeArg> for Mode {
    fn from(m: ModeArg) -> Mode {
        match m {
            ModeArg::ZeroCopy => Mode::ZeroCopy,
            ModeArg::Copy => Mode::Copy,
            ModeArg::Precopy => Mode::Precopy,
        }
    }
}

/// `vmbeam jobs`.
#[derive(Debug, Args)]
pub struct JobsArgs {
    /// API socket.
    #[command(flatten)]
    pub sock: SockArg,
    /// Only this job.
    pub id: Option<u64>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmbeam cancel`.
#[derive(Debug, Args)]
pub struct CancelArgs {
    /// API socket.
    #[command(flatten)]
    pub sock: SockArg,
    /// Job to cancel.
    pub id: u64,
    /// Return at once instead of waiting for the rollback.
    #[arg(long)]
    pub no_wait: bool,
}

/// `vmbeam completions`.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// Shell.
    pub shell: clap_complete::Shell,
}

/// Options shared by `run` and `demo` that shape the VMs.
#[derive(Debug, Args, Clone)]
pub struct VmArgs {
    /// RAM of the guest hypervisor (e.g. 32M).
    #[arg(long, default_value = "32M", value_parser = size)]
    pub mem: u64,
    /// Nested-memory pool of the host VM (default: enough for the nested guests).
    #[arg(long, value_parser = size)]
    pub pool: Option<u64>,
    /// vCPUs of the host VM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Number of nested guests.
    #[arg(long, default_value_t = 2)]
    pub nested: u32,
    /// RAM of each nested guest (e.g. 64M, 4G).
    #[arg(long, default_value = "16M", value_parser = size)]
    pub nested_mem: u64,
    /// Nested workloads, assigned round-robin (memtouch, ticker, blkcheck, netecho).
    #[arg(long, default_value = "memtouch,ticker", value_delimiter = ',', value_parser = workload)]
    pub workload: Vec<Workload>,
    /// memtouch, blkcheck: rounds before it halts (0 = forever); netecho: IPv4 address in bits 0-31 and prefix length in bits 32-39 (0 = 10.0.2.15/24); ticker: ticks before it faults on purpose (0 = never; with bit 63 set the fault is an AVX instruction).
    #[arg(long, default_value_t = 0)]
    pub workload_param: u64,
    /// Second workload parameter: blkcheck waits for its disk's interrupts (in hlt) instead of polling when bit 0 is set.
    #[arg(long, default_value_t = 0)]
    pub workload_param1: u64,
    /// Write consoles to DIR instead of the terminal: DIR/<guest>.log per
    /// nested guest, DIR/<line>.l1.log per host VM line (all generations).
    #[arg(long)]
    pub console_dir: Option<PathBuf>,
    /// Load this guest hypervisor ELF instead of the embedded one.
    #[arg(long)]
    pub hypervisor: Option<PathBuf>,
    /// Time slice of a nested vCPU run, in microseconds.
    #[arg(long, default_value_t = 10_000)]
    pub slice_us: u32,
    /// Aging injector: each guest hypervisor leaks this many 4 KiB pages of its
    /// nested pool per nested run it issues (0 = off).
    #[arg(long, value_name = "PAGES_PER_OP", default_value_t = 0)]
    pub age_leak: u32,
    /// Bind a raw disk image to a nested guest: GUEST=PATH[,ro] (repeatable).
    #[arg(long = "disk", value_name = "GUEST=PATH[,ro]", value_parser = disk)]
    pub disks: Vec<Binding>,
    /// Bind an existing TAP to a nested guest: GUEST=tap:NAME[,mac=MAC] (repeatable).
    #[arg(long = "net", value_name = "GUEST=tap:NAME[,mac=MAC]", value_parser = net)]
    pub nets: Vec<Binding>,
}

fn disk(s: &str) -> Result<Binding, BindError> {
    binding::parse_disk(s)
}

fn net(s: &str) -> Result<Binding, BindError> {
    binding::parse_net(s)
}

impl VmArgs {
    /// The VMM configuration these options describe.
    pub fn config(&self, quiet: bool) -> VmmConfig {
        VmmConfig {
            ram: self.mem,
            pool: self.pool,
            vcpus: self.vcpus,
            nested: self.nested,
            nested_mem: self.nested_mem,
            workloads: self.workload.clone(),
            console_dir: self.console_dir.clone(),
            quiet,
            workload_param: self.workload_param,
            workload_param1: self.workload_param1,
            slice_us: self.slice_us,
            age_leak_pages: self.age_leak,
            devices: self.disks.iter().chain(&self.nets).cloned().collect(),
        }
    }
}

/// `vmbeam run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// VM options.
    #[command(flatten)]
    pub vm: VmArgs,
    /// Control API socket.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Exit cleanly after this many seconds (`inf`: run until stopped).
    #[arg(long, value_name = "SECONDS", value_parser = run_duration)]
    pub duration: Option<RunLimit>,
    /// Name of the host VM: 1 to 16 of `[A-Za-z0-9_-]`.
    #[arg(long, default_value = "hv0", value_parser = line_name)]
    pub name: String,
    /// Receive host VMs migrated from another vmbeam on this TCP address
    /// (HOST:PORT) instead of booting one.
    #[arg(long)]
    pub listen: Option<String>,
    /// Mutual TLS for `--listen`: a directory with ca.pem (the CA senders
    /// must be signed by), cert.pem and key.pem (this host's).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Allow `--listen` on a non-loopback address without `--tls-dir`
    /// (anyone who reaches the port can then make this host run a VM).
    #[arg(long)]
    pub insecure_listen: bool,
    /// Keep the memory of host VMs that migrate away from here for this
    /// long (e.g. 10m; at most half of host memory in all), so that their
    /// return sends only the pages that changed.
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub keep_for: Option<Duration>,
    /// Rejuvenate automatically when the nested pool in the guest hypervisor's
    /// last health report is low: free<PERCENT% or free<SIZE (e.g. "free<10%", "free<64M").
    #[arg(long, value_name = "CONDITION", value_parser = condition)]
    pub rejuvenate_when: Option<Condition>,
    /// Rejuvenate automatically when the guest hypervisor has run this long (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = duration)]
    pub rejuvenate_every: Option<Duration>,
    /// Append rejuvenation reports, policy decisions and failures to PATH, one JSON object per line.
    #[arg(long, value_name = "PATH")]
    pub events: Option<PathBuf>,
    /// Write the log to PATH (appending) instead of stderr.
    #[arg(long, value_name = "PATH")]
    pub log_file: Option<PathBuf>,
}

/// `vmbeam demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// VM options.
    #[command(flatten)]
    pub vm: VmArgs,
    /// How nested memory moves.
    #[arg(long, value_enum, default_value_t = ModeArg::ZeroCopy)]
    pub mode: ModeArg,
    /// How many rejuvenations in a row.
    #[arg(long, default_value_t = 1)]
    pub rejuvenations: u32,
    /// Batch handover: each guest moves on its own (zero-copy only).
    #[arg(long)]
    pub batch: bool,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmbeam rejuvenate`.
#[derive(Debug, Args)]
pub struct RejuvenateArgs {
    /// API socket.
    #[command(flatten)]
    pub sock: SockArg,
    /// Host VM to rejuvenate (default: the first).
    #[arg(long)]
    pub vm: Option<String>,
    /// How nested memory moves.
    #[arg(long, value_enum, default_value_t = ModeArg::ZeroCopy)]
    pub mode: ModeArg,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start the rejuvenation and return at once with its job number.
    #[arg(long)]
    pub detach: bool,
    /// Skip hashing guests before and after.
    #[arg(long)]
    pub no_verify: bool,
    /// Batch handover: each guest moves on its own (zero-copy only).
    #[arg(long)]
    pub batch: bool,
    /// Pre-copy: downtime budget in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Inject a fault (testing): reject-first, crash-before-adopt, crash-after-first, hang-at-boot, aged-crash-after-first, flip-byte-before-verify, crash-after-moves (batch).
    #[arg(long)]
    pub fault: Option<String>,
}

/// `vmbeam migrate`.
#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// API socket.
    #[command(flatten)]
    pub sock: SockArg,
    /// Destination: tcp://HOST:PORT of a `vmbeam run --listen`.
    #[arg(long)]
    pub to: String,
    /// Host VM to move (default: the first).
    #[arg(long)]
    pub vm: Option<String>,
    /// Downtime budget of the pre-copy, in milliseconds.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// precopy: send the memory, then switch; postcopy: switch at once,
    /// the memory follows (pages the VM touches first come first).
    #[arg(long, value_enum, default_value_t = MigrateMode::Precopy)]
    pub mode: MigrateMode,
    /// Mutual TLS: a directory with ca.pem (the CA the destination must be
    /// signed by), cert.pem and key.pem (this host's).
    #[arg(long, value_name = "DIR")]
    pub tls_dir: Option<PathBuf>,
    /// Print the full report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Start the migration and return at once with its job number.
    #[arg(long)]
    pub detach: bool,
}

/// How `vmbeam migrate` moves the memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MigrateMode {
    /// Memory first, then the switch (downtime bounded by --downtime-ms).
    Precopy,
    /// The switch first; pages follow on demand and in the background.
    Postcopy,
}

impl MigrateMode {
    /// The API's name.
    pub fn api_name(self) -> &'static str {
        match self {
            MigrateMode::Precopy => "precopy",
            MigrateMode::Postcopy => "postcopy",
        }
    }
}

/// `vmbeam status`.
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// API socket.
    #[command(flatten)]
    pub sock: SockArg,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

/// `vmbeam inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// API socket.
    #[command(flatten)]
    pub sock: SockArg,
    /// Nested guest (e.g. l2-0).
    pub name: String,
    /// Read LEN bytes (at most 64 KiB) at nested guest-physical address GPA,
    /// each decimal or 0x-hex; without it only the registers are shown.
    #[arg(long, num_args = 2, value_names = ["GPA", "LEN"], value_parser = number)]
    pub read: Option<Vec<u64>>,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

impl InspectArgs {
    /// `(gpa, len)` to read; `(0, 0)` without `--read`.
    pub fn range(&self) -> Result<(u64, u64), InspectError> {
        let (gpa, len) = match self.read.as_deref() {
            Some([g, l]) => (*g, *l),
            _ => (0, 0),
        };
        vmbeam_vmm::control::inspect::check_range(gpa, len)?;
        Ok((gpa, len))
    }
}

/// The API socket option.
#[derive(Debug, Args)]
pub struct SockArg {
    /// Control API socket of a running `vmbeam run`.
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
}

impl SockArg {
    /// The socket to use.
    pub fn path(&self) -> PathBuf {
        self.api_sock.clone().unwrap_or_else(default_socket)
    }
}

/// What `--duration` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunLimit {
    /// Stop after this long.
    For(Duration),
    /// Run until stopped (`inf`, or a limit too large to represent).
    Forever,
}

impl RunLimit {
    /// The limit, if there is one.
    pub fn limit(&self) -> Option<Duration> {
        match self {
            RunLimit::For(d) => Some(*d),
            RunLimit::Forever => None,
        }
    }
}

fn run_duration(s: &str) -> Result<RunLimit, ConfigError> {
    Ok(match vmbeam_vmm::config::parse_run_duration(s)? {
        Some(d) => RunLimit::For(d),
        None => RunLimit::Forever,
    })
}

fn line_name(s: &str) -> Result<String, ConfigError> {
    vmbeam_vmm::config::check_line_name(s).map(|()| s.to_string())
}

fn size(s: &str) -> Result<u64, ConfigError> {
    parse_size(s)
}

fn condition(s: &str) -> Result<Condition, PolicyError> {
    s.parse()
}

fn duration(s: &str) -> Result<Duration, PolicyError> {
    parse_duration(s)
}

fn number(s: &str) -> Result<u64, InspectError> {
    parse_number(s)
}

fn workload(s: &str) -> Result<Workload, ConfigError> {
    s.parse()
}
#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn run(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut v = vec!["vmbeam", "run"];
        v.extend_from_slice(args);
        match Cli::try_parse_from(v)?.command {
            Command::Run(r) => Ok(r),
            _ => unreachable!("run parses as run"),
        }
    }

    #[test]
    fn run_duration_and_name_are_checked_up_front() {
        let d = |a: &str| run(&["--duration", a]).unwrap().duration;
        assert_eq!(d("inf"), Some(RunLimit::Forever));
        assert_eq!(d("1e300"), Some(RunLimit::Forever));
        assert_eq!(d("1.5"), Some(RunLimit::For(Duration::from_millis(1500))));
        assert_eq!(run(&[]).unwrap().duration, None);
        for bad in ["-3", "NaN", "later"] {
            let arg = format!("--duration={bad}");
            let e = run(&[&arg]).unwrap_err().to_string();
            assert!(e.contains("invalid duration"), "{e}");
        }
        assert_eq!(run(&["--name", "edge-1"]).unwrap().name, "edge-1");
        // The migration receiver refuses these, so `run` does too.
        for bad in ["a.b", "has space", "seventeen-chars-x", ""] {
            let arg = format!("--name={bad}");
            let e = run(&[&arg]).unwrap_err().to_string();
            assert!(e.contains("bad host VM name"), "{bad:?}: {e}");
        }
    }
}
