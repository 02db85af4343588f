//! Where console output goes: the terminal (one prefix per line) or one log
//! file per console in a directory.
//!
//! A console is keyed by name — a host VM line or a nested guest — not by
//! the VM object that currently produces it, so a nested guest keeps its
//! console across any number of moves between guest hypervisors.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use crate::sync::{Rank, RankedMutex};

/// Where consoles are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleTarget {
    /// Standard output, each line prefixed with `[name] `.
    Terminal,
    /// `DIR/<name>.log`, one file per console.
    Dir(PathBuf),
    /// Discarded (tests that only read files of their own, benchmarks).
    Off,
}

/// One named console.
#[derive(Debug)]
pub struct Console {
    name: String,
    file: RankedMutex<Option<File>>,
    target: ConsoleTarget,
    lines: AtomicU64,
}

impl Console {
    /// Writes one line (without its newline).
    pub fn write_line(&self, line: &[u8]) {
        let clean: String = String::from_utf8_lossy(line)
            .chars()
            .map(|c| if c.is_control() && c != '\t' { '.' } else { c })
            .collect();
        self.lines.fetch_add(1, Ordering::Relaxed);
        match &self.target {
            ConsoleTarget::Terminal => {
                let out = std::io::stdout();
                let mut out = out.lock();
                let _ = writeln!(out, "[{}] {}", self.name, clean);
                let _ = out.flush();
            }
            ConsoleTarget::Dir(_) => {
                if let Some(f) = self.file.lock().unwrap().as_mut() {
                    let _ = writeln!(f, "{clean}");
                    let _ = f.flush();
                }
            }
            ConsoleTarget::Off => {}
        }
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }
}

/// Errors of console set-up.
#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    /// The directory or file cannot be created.
    #[error("cannot open console file {path}: {source}")]
    Open {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
}

/// Hands out consoles by name.
///
/// The hub does not keep a console alive: whoever writes to it does (a
/// host VM's UART, a nested guest's record). When the last holder is gone
/// the console's file is closed, so a line of host VMs that is rejuvenated
/// again and again (console `hv0-g1`, `hv0-g2`, ...) holds one console
/// file, not one per generation. Asking again for a closed console's name
/// reopens its file for appending.
#[derive(Debug)]
pub struct ConsoleHub {
    target: ConsoleTarget,
    consoles: RankedMutex<HashMap<String, Weak<Console>>>,
}

impl ConsoleHub {
    /// A hub writing to `target`; creates the directory if needed.
    pub fn new(target: ConsoleTarget) -> Result<ConsoleHub, ConsoleError> {
        if let ConsoleTarget::Dir(d) = &target {
            std::fs::create_dir_all(d).map_err(|source| ConsoleError::Open {
                path: d.clone(),
                source,
            })?;
        }
        Ok(ConsoleHub {
            target,
            consoles: RankedMutex::new(Rank::ConsoleHub, HashMap::new()),
        })
    }

    /// The console called `name`, created on first use.
    pub fn get(&self, name: &str) -> Result<Arc<Console>, ConsoleError> {
        let mut map = self.consoles.lock().unwrap();
        if let Some(c) = map.get(name).and_then(Weak::upgrade) {
            return Ok(c);
        }
        map.retain(|_, c| c.strong_count() > 0);
        let file = match &self.target {
            ConsoleTarget::Dir(d) => {
                let path = d.join(format!("{name}.log"));
                Some(
                    OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&path)
                        .map_err(|source| ConsoleError::Open { path, source })?,
                )
            }
            _ => None,
        };
        let c = Arc::new(Console {
            name: name.to_string(),
            file: RankedMutex::new(Rank::Console, file),
            target: self.target.clone(),
            lines: AtomicU64::new(0),
        });
        map.insert(name.to_string(), Arc::downgrade(&c));
        Ok(c)
    }
}

/// A byte stream (the host VM's UART) cut into console lines.
pub struct LineWriter {
    console: Arc<Console>,
    buf: Vec<u8>,
}

impl LineWriter {
    /// Writes lines to `console`.
    pub fn new(console: Arc<Console>) -> Self {
        LineWriter {
            console,
            buf: Vec::new(),
        }
    }
}

impl LineWriter {
    /// The console written to.
    pub fn console(&self) -> Arc<Console> {
        self.console.clone()
    }
}

impl Write for LineWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for &b in data {
            if b == b'\n' || self.buf.len() >= 512 {
                self.console.write_line(&self.buf);
                self.buf.clear();
            } else if b != b'\r' {
                self.buf.push(b);
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if !self.buf.is_empty() {
            self.console.write_line(&self.buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consoles_live_as_long_as_their_holders() {
        let dir = std::env::temp_dir().join(format!("vmbeam-console-{}", std::process::id()));
        let hub = ConsoleHub::new(ConsoleTarget::Dir(dir.clone())).unwrap();
        let a = hub.get("hv0-g1").unwrap();
        assert!(Arc::ptr_eq(&a, &hub.get("hv0-g1").unwrap()));
        a.write_line(b"first");
        drop(a);
        // Gone with its last holder; a new generation's console replaces it.
        let b = hub.get("hv0-g2").unwrap();
        assert_eq!(hub.consoles.lock().unwrap().len(), 1);
        // The same name again appends to the same file.
        let a = hub.get("hv0-g1").unwrap();
        a.write_line(b"second");
        let text = std::fs::read_to_string(dir.join("hv0-g1.log")).unwrap();
        assert_eq!(text, "first\nsecond\n");
        drop((a, b));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
