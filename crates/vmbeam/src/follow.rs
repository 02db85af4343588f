//! Following a job from the command line: `vmbeam rejuvenate` and `vmbeam
//! migrate` start a job through the API and poll it until it ends, showing
//! a progress bar on a terminal (indicatif) and plain progress lines
//! otherwise. Ctrl-C asks whether to cancel the job (it rolls back) or to
//! detach from it (it goes on); without a terminal to ask on, it detaches
//! and says how to cancel.

use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use vmbeam_vmm::api;
use vmbeam_vmm::base::progress::Phase;
use vmbeam_vmm::control::jobs::JobView;
use vmbeam_vmm::migration::rejuvenate::Report;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigint(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// How following a job ended.
pub enum Followed {
    /// The job ended; its report (done) or its error (failed, cancelled).
    Ended(Result<Box<Report>, String>),
    /// The user detached; the job goes on in `vmbeam run`.
    Detached(u64),
}

/// Time between two polls of the job.
const POLL: Duration = Duration::from_millis(200);
/// Time between two plain progress lines while nothing else changes.
const LINE_EVERY: Duration = Duration::from_secs(2);
/// Longest the client follows a job (the operations' own deadlines are
/// shorter; this bounds the client if the server stops answering).
const FOLLOW_MAX: Duration = Duration::from_secs(2 * 3600);

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1u64 << 20) as f64)
}

/// One line describing the job's progress.
pub fn describe(j: &JobView) -> String {
    let p = &j.progress;
    let mut s = format!(
        "job {} ({} {}): {}",
        j.id,
        match j.kind {
            vmbeam_vmm::control::jobs::JobKind::Rejuvenate => "rejuvenate",
            vmbeam_vmm::control::jobs::JobKind::Migrate => "migrate",
        },
        j.vm,
        p.phase.as_str()
    );
    if p.bytes_total > 0 {
        s.push_str(&format!(
            ", {} of {} moved",
            mib(p.bytes_done.min(p.bytes_total)),
            mib(p.bytes_total)
        ));
    }
    if p.rounds > 0 {
        s.push_str(&format!(", round {}", p.rounds));
    }
    s.push_str(&format!(
        ", guests {}/{}, {:.1} s",
        p.guests_done,
        p.guests_total,
        p.elapsed_ms as f64 / 1000.0
    ));
    if p.cancel_requested && !p.phase.is_final() {
        s.push_str(", cancelling");
    }
    s
}

fn get_job(sock: &Path, id: u64) -> Result<JobView, String> {
    let (code, body) =
        api::call(sock, "GET", &format!("/api/v1/jobs/{id}"), None).map_err(|e| e.to_string())?;
    if code != 200 {
        return Err(crate::error_of(&body));
    }
    serde_json::from_str(&body).map_err(|e| format!("bad job reply: {e}"))
}

/// Asks on the terminal what to do after Ctrl-C; true = cancel.
fn ask_cancel(j: &JobView) -> bool {
    eprint!(
        "\nCtrl-C: cancel job {} (the {} rolls back) or detach (it goes on)? [c/d] ",
        j.id,
        match j.kind {
            vmbeam_vmm::control::jobs::JobKind::Rejuvenate => "rejuvenation",
            vmbeam_vmm::control::jobs::JobKind::Migrate => "migration",
        }
    );
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    let _ = std::io::stdin().lock().read_line(&mut line);
    line.trim().to_ascii_lowercase().starts_with('c')
}

fn how_to(id: u64, sock: &Path) -> String {
    format!(
        "job {id} goes on in vmbeam run; `vmbeam jobs {id} --api-sock {s}` shows it, `vmbeam cancel {id} --api-sock {s}` cancels it",
        s = sock.display()
    )
}

/// From now on Ctrl-C is noted, not fatal: [`follow`] then asks whether to
/// cancel or detach. Called before the request that starts a job, so a
/// Ctrl-C that comes while the job is being created is not lost with the
/// client (the job would go on with nobody told how to reach it).
pub fn catch_sigint() {
    // SAFETY: the handler only stores to an atomic (async-signal-safe).
    unsafe { libc::signal(libc::SIGINT, on_sigint as *const () as libc::sighandler_t) };
}

/// Follows job `first.id` until it ends or the user detaches. Progress
/// goes to stderr; `quiet` (JSON output) keeps it to the bar alone.
pub fn follow(sock: &Path, first: JobView) -> Result<Followed, String> {
    let id = first.id;
    catch_sigint();
    let tty = std::io::stderr().is_terminal();
    let interactive = tty && std::io::stdin().is_terminal();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new(100);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] [{bar:30}] {percent:>3}% {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        b
    });
    let started = Instant::now();
    let mut last_line = Instant::now() - LINE_EVERY;
    let mut last_phase: Option<Phase> = None;
    let mut job = first;
    let mut asked = false;
    loop {
        let p = &job.progress;
        if let Some(b) = &bar {
            // Bytes when there are bytes to move, else guests.
            let (done, total) = if p.bytes_total > 0 {
                (p.bytes_done.min(p.bytes_total), p.bytes_total)
            } else {
                (p.guests_done, p.guests_total.max(1))
            };
            b.set_length(total.max(1));
            b.set_position(done);
            b.set_message(describe(&job));
        } else if last_phase != Some(p.phase) || last_line.elapsed() >= LINE_EVERY {
            eprintln!("vmbeam: {}", describe(&job));
            last_line = Instant::now();
        }
        last_phase = Some(p.phase);
        if p.phase.is_final() {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            let res = match (job.report, job.error) {
                (Some(r), _) => Ok(Box::new(r)),
                (None, Some(e)) => Err(e),
                (None, None) => Err(format!("job {id} ended without a report")),
            };
            return Ok(Followed::Ended(res));
        }
        if INTERRUPTED.swap(false, Ordering::SeqCst) {
            let cancel = if interactive && !asked {
                asked = true;
                if let Some(b) = &bar {
                    b.suspend(|| ask_cancel(&job))
                } else {
                    ask_cancel(&job)
                }
            } else {
                false
            };
            if cancel {
                let (code, body) = api::call(sock, "DELETE", &format!("/api/v1/jobs/{id}"), None)
                    .map_err(|e| e.to_string())?;
                if code != 200 {
                    return Err(crate::error_of(&body));
                }
                eprintln!("vmbeam: cancelling job {id}; waiting for it to roll back");
            } else {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                eprintln!("vmbeam: detached: {}", how_to(id, sock));
                return Ok(Followed::Detached(id));
            }
        }
        if started.elapsed() > FOLLOW_MAX {
            return Err(format!(
                "gave up following after {} s: {}",
                FOLLOW_MAX.as_secs(),
                how_to(id, sock)
            ));
        }
        std::thread::sleep(POLL);
        job = get_job(sock, id)?;
    }
}
