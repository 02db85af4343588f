//! `vmbeam`: entry point; parses the command line and runs the command.

use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{CommandFactory, Parser};
use vmbeam::cli::{Cli, Command};
use vmbeam::follow::{self, Followed};
use vmbeam_vmm::api;
use vmbeam_vmm::control::inspect::Inspection;
use vmbeam_vmm::control::jobs::JobView;
use vmbeam_vmm::migration::rejuvenate::{Mode, Report};
use vmbeam_vmm::vmm::Status;

/// Calls the API; a non-2xx answer becomes its error sentence.
fn api_call(sock: &Path, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
    let (code, body) = api::call(sock, method, path, body).map_err(|e| e.to_string())?;
    if (200..300).contains(&code) {
        Ok(body)
    } else {
        Err(vmbeam::error_of(&body))
    }
}

/// Prints an API reply: raw JSON with `--json`, else for a person.
fn show<T: serde::de::DeserializeOwned>(
    body: &str,
    json: bool,
    what: &str,
    print: fn(&T),
) -> Result<(), String> {
    if json {
        println!("{body}");
    } else {
        let v: T = serde_json::from_str(body).map_err(|e| format!("bad {what}: {e}"))?;
        print(&v);
    }
    Ok(())
}

/// Starts a job with `POST path`, then follows it (or, with `detach`,
/// prints its number and returns).
fn run_job(sock: &Path, path: &str, body: &str, json: bool, detach: bool) -> Result<(), String> {
    if !detach {
        follow::catch_sigint();
    }
    let reply = api_call(sock, "POST", path, Some(body))?;
    let job: JobView = serde_json::from_str(&reply).map_err(|e| format!("bad job reply: {e}"))?;
    if detach {
        if json {
            println!("{reply}");
        } else {
            println!("job {} started", job.id);
        }
        return Ok(());
    }
    match follow::follow(sock, job)? {
        Followed::Ended(Ok(r)) => {
            let text = serde_json::to_string(&r).map_err(|e| e.to_string())?;
            show::<Report>(&text, json, "report", vmbeam::demo::print_report)
        }
        Followed::Ended(Err(e)) => Err(e),
        Followed::Detached(_) => Ok(()),
    }
}

/// Asks `vmbeam run` to stop and waits until it has removed its socket and
/// its process has exited, so that `shutdown && run` on the same socket works.
fn shutdown(sock: &Path) -> Result<(), String> {
    let pid = api_call(sock, "GET", "/api/v1/vmm.ping", None)
        .ok()
        .and_then(|b| serde_json::from_str::<api::Ping>(&b).ok())
        .map(|p| p.pid);
    api_call(sock, "PUT", "/api/v1/vmm.shutdown", None)?;
    // vmbeam run waits for a running job to roll back or finish first.
    let deadline = Instant::now() + Duration::from_secs(180);
    let alive = |pid: u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, r)| !r.starts_with('Z')))
            .unwrap_or(false)
    };
    while sock.exists() || pid.is_some_and(alive) {
        if Instant::now() >= deadline {
            return Err(format!(
                "vmbeam run was asked to stop but has not exited within 180 s (socket {})",
                sock.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

fn jobs(a: &vmbeam::cli::JobsArgs) -> Result<(), String> {
    let sock = a.sock.path();
    let list: Vec<JobView> = match a.id {
        Some(id) => {
            let b = api_call(&sock, "GET", &format!("/api/v1/jobs/{id}"), None)?;
            if a.json {
                println!("{b}");
                return Ok(());
            }
            vec![serde_json::from_str(&b).map_err(|e| format!("bad job reply: {e}"))?]
        }
        None => {
            let b = api_call(&sock, "GET", "/api/v1/jobs", None)?;
            if a.json {
                println!("{b}");
                return Ok(());
            }
            serde_json::from_str(&b).map_err(|e| format!("bad jobs reply: {e}"))?
        }
    };
    if list.is_empty() {
        println!("no jobs");
    }
    for j in &list {
        println!("{}", follow::describe(j));
        if let Some(e) = &j.error {
            println!("  error: {e}");
        }
        if let Some(r) = &j.report {
            println!(
                "  {} generation {} -> {} in {:.1} ms",
                r.vm, r.from_generation, r.to_generation, r.total_ms
            );
        }
    }
    Ok(())
}

fn cancel(a: &vmbeam::cli::CancelArgs) -> Result<(), String> {
    let sock = a.sock.path();
    if !a.no_wait {
        follow::catch_sigint();
    }
    let b = api_call(&sock, "DELETE", &format!("/api/v1/jobs/{}", a.id), None)?;
    let job: JobView = serde_json::from_str(&b).map_err(|e| format!("bad job reply: {e}"))?;
    if job.progress.phase.is_final() {
        println!("{}", follow::describe(&job));
        return Ok(());
    }
    if a.no_wait {
        println!("cancel of job {} requested", a.id);
        return Ok(());
    }
    match follow::follow(&sock, job)? {
        Followed::Ended(Ok(_)) => Err(format!(
            "job {} finished before the cancel took effect",
            a.id
        )),
        Followed::Ended(Err(e)) => {
            println!("job {} cancelled: {e}", a.id);
            Ok(())
        }
        Followed::Detached(_) => Ok(()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (server, log_file) = match &cli.command {
        Command::Run(a) => (true, a.log_file.as_deref()),
        Command::Demo(_) => (true, None),
        _ => (false, None),
    };
    if let Err(e) = vmbeam::logging::init(cli.verbose, server, log_file) {
        eprintln!("vmbeam: error: {e}");
        return ExitCode::FAILURE;
    }
    let res: Result<(), String> = match &cli.command {
        Command::Run(a) => vmbeam::run::run(a).map_err(|e| e.to_string()),
        Command::Demo(a) => match vmbeam::demo::demo(a) {
            Ok(true) => Ok(()),
            Ok(false) => Err("demo checks failed".into()),
            Err(e) => Err(e.to_string()),
        },
        Command::Status(a) => api_call(&a.sock.path(), "GET", "/api/v1/status", None)
            .and_then(|b| show::<Status>(&b, a.json, "status reply", vmbeam::demo::print_status)),
        Command::Rejuvenate(a) => {
            let body = serde_json::json!({
                "vm": a.vm,
                "mode": Mode::from(a.mode),
                "verify": !a.no_verify,
                "batch": a.batch,
                "downtime_ms": a.downtime_ms,
            });
            let mut body = body;
            if let Some(f) = &a.fault {
                body["fault"] = f.clone().into();
            }
            run_job(
                &a.sock.path(),
                "/api/v1/rejuvenate",
                &body.to_string(),
                a.json,
                a.detach,
            )
        }
        Command::Inspect(a) => a
            .range()
            .map_err(|e| e.to_string())
            .and_then(|(gpa, len)| {
                let body = serde_json::json!({ "guest": a.name, "gpa": gpa, "len": len });
                api_call(
                    &a.sock.path(),
                    "POST",
                    "/api/v1/inspect",
                    Some(&body.to_string()),
                )
            })
            .and_then(|b| {
                show::<Inspection>(&b, a.json, "inspect reply", vmbeam::demo::print_inspection)
            }),
        Command::Migrate(a) => {
            // The source vmbeam loads the files: give it a path that does not
            // depend on this shell's directory.
            let tls = a
                .tls_dir
                .as_ref()
                .map(|d| std::path::absolute(d).unwrap_or_else(|_| d.clone()));
            let body = serde_json::json!({
                "vm": a.vm, "to": a.to, "downtime_ms": a.downtime_ms, "tls_dir": tls,
                "mode": a.mode.api_name()
            })
            .to_string();
            run_job(&a.sock.path(), "/api/v1/migrate", &body, a.json, a.detach)
        }
        Command::Shutdown(a) => shutdown(&a.path()),
        Command::Jobs(a) => jobs(a),
        Command::Cancel(a) => cancel(a),
        Command::Ping(a) => api_call(&a.path(), "GET", "/api/v1/vmm.ping", None).map(|b| {
            println!("{b}");
        }),
        Command::Completions(a) => {
            let mut cmd = Cli::command();
            clap_complete::generate(a.shell, &mut cmd, "vmbeam", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(|e| e.to_string()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmbeam: error: {e}");
            ExitCode::FAILURE
        }
    }
}
