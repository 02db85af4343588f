//! `vmbeam`: entry point; parses the command line and runs the command.

use std::process::ExitCode;

use clap::Parser;
use vmbeam::cli::{Cli, Command};
use vmbeam_vmm::control::api;
use vmbeam_vmm::control::inspect::Inspection;
use vmbeam_vmm::migration::rejuvenate::Report;
use vmbeam_vmm::vmm::Status;

fn api_call(
    sock: &std::path::Path,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, String> {
    let (code, body) = api::call(sock, method, path, body).map_err(|e| e.to_string())?;
    if code == 200 {
        Ok(body)
    } else {
        let msg = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
            .unwrap_or(body);
        Err(msg)
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res: Result<(), String> = match &cli.command {
        Command::Run(a) => vmbeam::run::run(a).map_err(|e| e.to_string()),
        Command::Demo(a) => match vmbeam::demo::demo(a) {
            Ok(true) => Ok(()),
            Ok(false) => Err("demo checks failed".into()),
            Err(e) => Err(e.to_string()),
        },
        Command::Status(a) => api_call(&a.sock.path(), "GET", "/status", None)
            .and_then(|b| show::<Status>(&b, a.json, "status reply", vmbeam::demo::print_status)),
        Command::Rejuvenate(a) => {
            let body = serde_json::json!({
                "vm": a.vm,
                "mode": a.mode,
                "verify": !a.no_verify,
                "fault": a.fault,
                "downtime_ms": a.downtime_ms,
            })
            .to_string();
            api_call(&a.sock.path(), "POST", "/rejuvenate", Some(&body))
                .and_then(|b| show::<Report>(&b, a.json, "report", vmbeam::demo::print_report))
        }
        Command::Inspect(a) => a
            .range()
            .map_err(|e| e.to_string())
            .and_then(|(gpa, len)| {
                let body = serde_json::json!({ "guest": a.name, "gpa": gpa, "len": len });
                api_call(&a.sock.path(), "POST", "/inspect", Some(&body.to_string()))
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
                "vm": a.vm, "to": a.to, "downtime_ms": a.downtime_ms, "tls_dir": tls
            })
            .to_string();
            api_call(&a.sock.path(), "POST", "/migrate", Some(&body))
                .and_then(|b| show::<Report>(&b, a.json, "report", vmbeam::demo::print_report))
        }
        Command::Shutdown(a) => api_call(&a.path(), "PUT", "/shutdown", None).map(|_| ()),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vmbeam: error: {e}");
            ExitCode::FAILURE
        }
    }
}
