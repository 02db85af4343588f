//! Where console output goes: the terminal (one prefix per line) or one log
//! file per console in a directory.
//!
//! A console is keyed by name — a host VM line or a nested guest — not by
//! the VM object that currently produces it, so a nested guest keeps its
//! console across any number of moves between guest hypervisors.
//!
//! Every console is bounded, whoever writes to it: at most
//! [`CONSOLE_RATE`] bytes per second (a token bucket of [`CONSOLE_BURST`]
//! bytes), and a log file is rotated at [`CONSOLE_FILE_CAP`] bytes (one old
//! file, `<name>.log.1`, is kept). Lines over the rate are dropped and
//! counted; a notice line says when dropping starts and how much was lost.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use crate::base::sync::{Rank, RankedMutex};

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

/// Sustained bytes per second one console accepts.
pub const CONSOLE_RATE: u64 = 64 << 10;
/// Bytes a console accepts at once after a quiet period.
pub const CONSOLE_BURST: u64 = 256 << 10;
/// Size at which a console's log file is rotated.
pub const CONSOLE_FILE_CAP: u64 = 16 << 20;

/// A console's output and its budget.
#[derive(Debug)]
struct Out {
    file: Option<File>,
    path: Option<PathBuf>,
    file_bytes: u64,
    tokens: u64,
    refilled: Instant,
    dropping: u64,
}

/// One named console.
#[derive(Debug)]
pub struct Console {
    name: String,
    out: RankedMutex<Out>,
    target: ConsoleTarget,
    lines: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Console {
    /// Writes one line (without its newline). Returns false if the line
    /// was dropped because the console is over its rate.
    pub fn write_line(&self, line: &[u8]) -> bool {
        let cost = line.len() as u64 + 1;
        let mut out = self.out.lock().unwrap();
        let now = Instant::now();
        let earned = now.duration_since(out.refilled).as_micros() as u64 * CONSOLE_RATE / 1_000_000;
        if earned > 0 {
            out.tokens = (out.tokens + earned).min(CONSOLE_BURST);
            out.refilled = now;
        }
        if out.tokens < cost {
            self.dropped_bytes.fetch_add(cost, Ordering::Relaxed);
            if out.dropping == 0 {
                let note = format!(
                    "[vmbeam] console over {} KiB/s: dropping output",
                    CONSOLE_RATE >> 10
                );
                out.tokens = out.tokens.saturating_sub(note.len() as u64 + 1);
                self.emit(&mut out, &note);
            }
            out.dropping += cost;
            return false;
        }
        out.tokens -= cost;
        if out.dropping > 0 {
            let note = format!("[vmbeam] {} bytes of console output dropped", out.dropping);
            out.dropping = 0;
            out.tokens = out.tokens.saturating_sub(note.len() as u64 + 1);
            self.emit(&mut out, &note);
        }
        let clean: String = String::from_utf8_lossy(line)
            .chars()
            .map(|c| if c.is_control() && c != '\t' { '.' } else { c })
            .collect();
        self.emit(&mut out, &clean);
        self.lines.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn emit(&self, out: &mut Out, clean: &str) {
        match &self.target {
            ConsoleTarget::Terminal => {
                let o = std::io::stdout();
                let mut o = o.lock();
                let _ = writeln!(o, "[{}] {}", self.name, clean);
                let _ = o.flush();
            }
            ConsoleTarget::Dir(_) => {
                if out.file_bytes + clean.len() as u64 + 1 > CONSOLE_FILE_CAP {
                    rotate(out);
                }
                if let Some(f) = out.file.as_mut() {
                    let _ = writeln!(f, "{clean}");
                    let _ = f.flush();
                    out.file_bytes += clean.len() as u64 + 1;
                }
            }
            ConsoleTarget::Off => {}
        }
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines.load(Ordering::Relaxed)
    }

    /// Bytes dropped so far because the console was over its rate.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped_bytes.load(Ordering::Relaxed)
    }
}

/// Moves a full log file aside (`.log.1`, replacing an older one) and
/// starts a fresh one; if that fails the console stops writing to disk.
fn rotate(out: &mut Out) {
    out.file = None;
    out.file_bytes = 0;
    let Some(path) = &out.path else { return };
    let mut old = path.clone().into_os_string();
    old.push(".1");
    let _ = std::fs::rename(path, &old);
    out.file = OpenOptions::new().create(true).append(true).open(path).ok();
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
        let (file, path) = match &self.target {
            ConsoleTarget::Dir(d) => {
                let path = d.join(format!("{name}.log"));
                let f = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .map_err(|source| ConsoleError::Open {
                        path: path.clone(),
                        source,
                    })?;
                (Some(f), Some(path))
            }
            _ => (None, None),
        };
        let file_bytes = file
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map(|m| m.len())
            .unwrap_or(0);
        let c = Arc::new(Console {
            name: name.to_string(),
            out: RankedMutex::new(
                Rank::Console,
                Out {
                    file,
                    path,
                    file_bytes,
                    tokens: CONSOLE_BURST,
                    refilled: Instant::now(),
                    dropping: 0,
                },
            ),
            target: self.target.clone(),
            lines: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
        });
        map.insert(name.to_string(), Arc::downgrade(&c));
        Ok(c)
    }
}

/// Longest line a [`LineWriter`] passes on; longer ones are cut in pieces.
pub const LINE_MAX: usize = 512;

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
            if b == b'\n' {
                self.console.write_line(&self.buf);
                self.buf.clear();
                continue;
            }
            if self.buf.len() >= LINE_MAX {
                // A long line is cut here; the byte starts the next piece.
                self.console.write_line(&self.buf);
                self.buf.clear();
            }
            if b != b'\r' {
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

    #[test]
    fn long_lines_are_cut_without_losing_a_byte() {
        let dir = std::env::temp_dir().join(format!("vmbeam-cut-{}", std::process::id()));
        let hub = ConsoleHub::new(ConsoleTarget::Dir(dir.clone())).unwrap();
        let mut w = LineWriter::new(hub.get("cut").unwrap());
        let text: Vec<u8> = (0..3 * LINE_MAX + 7)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        w.write_all(&text).unwrap();
        w.write_all(b"\n").unwrap();
        let got = std::fs::read_to_string(dir.join("cut.log")).unwrap();
        let lines: Vec<&str> = got.lines().collect();
        assert_eq!(lines.len(), 4, "{got}");
        assert!(lines[..3].iter().all(|l| l.len() == LINE_MAX));
        assert_eq!(lines.concat().as_bytes(), &text[..]);
        drop(w);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_flood_is_cut_to_the_rate_and_counted() {
        let dir = std::env::temp_dir().join(format!("vmbeam-flood-{}", std::process::id()));
        let hub = ConsoleHub::new(ConsoleTarget::Dir(dir.clone())).unwrap();
        let c = hub.get("flood").unwrap();
        let line = [b'x'; 1023];
        let t = Instant::now();
        let mut kept = 0u64;
        let mut dropped = 0u64;
        for _ in 0..2048 {
            if c.write_line(&line) {
                kept += 1024;
            } else {
                dropped += 1024;
            }
        }
        let allowed = CONSOLE_BURST + t.elapsed().as_micros() as u64 * CONSOLE_RATE / 1_000_000;
        assert!(kept <= allowed, "{kept} > {allowed}");
        assert!(dropped > 0);
        assert_eq!(c.dropped_bytes(), dropped);
        let text = std::fs::read_to_string(dir.join("flood.log")).unwrap();
        assert!(text.contains("dropping output"));
        assert!(text.len() as u64 <= allowed + 200);
        drop(c);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
