//! Where console output goes: the terminal (one prefix per line) or one log
//! file per console in a directory.
//!
//! A console is keyed by name — a host VM line or a nested guest — not by
//! the VM object that currently produces it, so a nested guest keeps its
//! console across any number of moves between guest hypervisors, and a host
//! VM line keeps one file across its generations: `DIR/<guest>.log` for a
//! nested guest, `DIR/<line>.l1.log` for the guest hypervisors of a line,
//! each line of the latter tagged with the generation that wrote it
//! (`[g2] …`; during a rejuvenation the aged and the fresh one interleave).
//! Nested guest names cannot end in `.l1`, so the two never share a file.
//!
//! Every console is bounded, whoever writes to it: at most
//! [`CONSOLE_RATE`] bytes per second (a token bucket of [`CONSOLE_BURST`]
//! bytes, one per generation, so an aged guest hypervisor's flood does not
//! silence its successor), and a log file is rotated at
//! [`CONSOLE_FILE_CAP`] bytes (one old file, `<name>.log.1`, is kept). Lines
//! over the rate are dropped and counted; a notice line says when dropping
//! starts and how much was lost.

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
    /// `DIR/<guest>.log` per nested guest, `DIR/<line>.l1.log` per host VM line.
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
/// What a host VM line's console file name ends in (before `.log`).
pub const L1_SUFFIX: &str = ".l1";

/// A console file, shared by the consoles that write to it.
#[derive(Debug)]
struct Sink {
    file: Option<File>,
    path: Option<PathBuf>,
    file_bytes: u64,
}

/// A console's rate budget.
#[derive(Debug)]
struct Budget {
    tokens: u64,
    refilled: Instant,
    dropping: u64,
}

/// One named console.
#[derive(Debug)]
pub struct Console {
    name: String,
    /// Written before each line in the file (`[g2] ` for a guest hypervisor).
    tag: String,
    budget: RankedMutex<Budget>,
    sink: Arc<RankedMutex<Sink>>,
    target: ConsoleTarget,
    lines: AtomicU64,
    dropped_bytes: AtomicU64,
}

impl Console {
    /// Writes one line (without its newline). Returns false if the line
    /// was dropped because the console is over its rate.
    pub fn write_line(&self, line: &[u8]) -> bool {
        let cost = line.len() as u64 + 1;
        let mut b = self.budget.lock().unwrap();
        let now = Instant::now();
        let earned = now.duration_since(b.refilled).as_micros() as u64 * CONSOLE_RATE / 1_000_000;
        if earned > 0 {
            b.tokens = (b.tokens + earned).min(CONSOLE_BURST);
            b.refilled = now;
        }
        if b.tokens < cost {
            self.dropped_bytes.fetch_add(cost, Ordering::Relaxed);
            if b.dropping == 0 {
                let note = format!(
                    "[vmbeam] console over {} KiB/s: dropping output",
                    CONSOLE_RATE >> 10
                );
                b.tokens = b.tokens.saturating_sub(note.len() as u64 + 1);
                self.emit(&note);
            }
            b.dropping += cost;
            return false;
        }
        b.tokens -= cost;
        if b.dropping > 0 {
            let note = format!("[vmbeam] {} bytes of console output dropped", b.dropping);
            b.dropping = 0;
            b.tokens = b.tokens.saturating_sub(note.len() as u64 + 1);
            self.emit(&note);
        }
        let clean: String = String::from_utf8_lossy(line)
            .chars()
            .map(|c| if c.is_control() && c != '\t' { '.' } else { c })
            .collect();
        self.emit(&clean);
        self.lines.fetch_add(1, Ordering::Relaxed);
        true
    }

    fn emit(&self, clean: &str) {
        match &self.target {
            ConsoleTarget::Terminal => {
                let o = std::io::stdout();
                let mut o = o.lock();
                let _ = writeln!(o, "[{}] {}", self.name, clean);
                let _ = o.flush();
            }
            ConsoleTarget::Dir(_) => {
                let len = (self.tag.len() + clean.len()) as u64 + 1;
                let mut out = self.sink.lock().unwrap();
                if out.file_bytes + len > CONSOLE_FILE_CAP {
                    rotate(&mut out);
                }
                if let Some(f) = out.file.as_mut() {
                    let _ = writeln!(f, "{}{clean}", self.tag);
                    let _ = f.flush();
                    out.file_bytes += len;
                }
            }
            ConsoleTarget::Off => {}
        }
    }

    /// The console's name (`l2-0`, or `hv0/g2` for a guest hypervisor).
    pub fn name(&self) -> &str {
        &self.name
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
fn rotate(out: &mut Sink) {
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

/// The hub's maps: consoles by name, files by file name.
#[derive(Debug, Default)]
struct Registry {
    consoles: HashMap<String, Weak<Console>>,
    sinks: HashMap<String, Weak<RankedMutex<Sink>>>,
}

/// Hands out consoles by name.
///
/// The hub does not keep a console alive: whoever writes to it does (a
/// host VM's UART, a nested guest's record). When the last holder of a
/// file is gone the file is closed, so a line of host VMs that is
/// rejuvenated again and again (consoles `hv0/g1`, `hv0/g2`, ...) holds one
/// open file, `hv0.l1.log`, not one per generation. Asking again for a
/// closed console reopens its file for appending.
#[derive(Debug)]
pub struct ConsoleHub {
    target: ConsoleTarget,
    registry: RankedMutex<Registry>,
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
            registry: RankedMutex::new(Rank::ConsoleHub, Registry::default()),
        })
    }

    /// The console of nested guest `name` (`DIR/<name>.log`), created on
    /// first use.
    pub fn get(&self, name: &str) -> Result<Arc<Console>, ConsoleError> {
        self.console(name, name, String::new())
    }

    /// The console of generation `generation` of host VM line `line`:
    /// `DIR/<line>.l1.log`, shared with the line's other generations, each
    /// line of it tagged `[g<generation>] `.
    pub fn get_l1(&self, line: &str, generation: u32) -> Result<Arc<Console>, ConsoleError> {
        self.console(
            &format!("{line}/g{generation}"),
            &format!("{line}{L1_SUFFIX}"),
            format!("[g{generation}] "),
        )
    }

    fn console(&self, name: &str, file: &str, tag: String) -> Result<Arc<Console>, ConsoleError> {
        let mut reg = self.registry.lock().unwrap();
        if let Some(c) = reg.consoles.get(name).and_then(Weak::upgrade) {
            return Ok(c);
        }
        reg.consoles.retain(|_, c| c.strong_count() > 0);
        reg.sinks.retain(|_, s| s.strong_count() > 0);
        let sink = match reg.sinks.get(file).and_then(Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = Arc::new(RankedMutex::new(Rank::ConsoleFile, self.open(file)?));
                reg.sinks.insert(file.to_string(), Arc::downgrade(&s));
                s
            }
        };
        let c = Arc::new(Console {
            name: name.to_string(),
            tag,
            budget: RankedMutex::new(
                Rank::Console,
                Budget {
                    tokens: CONSOLE_BURST,
                    refilled: Instant::now(),
                    dropping: 0,
                },
            ),
            sink,
            target: self.target.clone(),
            lines: AtomicU64::new(0),
            dropped_bytes: AtomicU64::new(0),
        });
        reg.consoles.insert(name.to_string(), Arc::downgrade(&c));
        Ok(c)
    }

    fn open(&self, file: &str) -> Result<Sink, ConsoleError> {
        let ConsoleTarget::Dir(d) = &self.target else {
            return Ok(Sink {
                file: None,
                path: None,
                file_bytes: 0,
            });
        };
        let path = d.join(format!("{file}.log"));
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|source| ConsoleError::Open {
                path: path.clone(),
                source,
            })?;
        let file_bytes = f.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Sink {
            file: Some(f),
            path: Some(path),
            file_bytes,
        })
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
        let a = hub.get("l2-0").unwrap();
        assert!(Arc::ptr_eq(&a, &hub.get("l2-0").unwrap()));
        a.write_line(b"first");
        drop(a);
        let b = hub.get("l2-1").unwrap();
        assert_eq!(hub.registry.lock().unwrap().consoles.len(), 1);
        // The same name again appends to the same file.
        let a = hub.get("l2-0").unwrap();
        a.write_line(b"second");
        let text = std::fs::read_to_string(dir.join("l2-0.log")).unwrap();
        assert_eq!(text, "first\nsecond\n");
        drop((a, b));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_host_vm_line_keeps_one_file_across_generations() {
        let dir = std::env::temp_dir().join(format!("vmbeam-l1-{}", std::process::id()));
        let hub = ConsoleHub::new(ConsoleTarget::Dir(dir.clone())).unwrap();
        let g1 = hub.get_l1("hv0", 1).unwrap();
        g1.write_line(b"aged");
        let g2 = hub.get_l1("hv0", 2).unwrap();
        assert!(Arc::ptr_eq(&g1.sink, &g2.sink));
        g2.write_line(b"fresh");
        g1.write_line(b"last words");
        drop(g1);
        let g3 = hub.get_l1("hv0", 3).unwrap();
        g3.write_line(b"third");
        drop((g2, g3));
        // A later generation after every holder is gone appends too.
        hub.get_l1("hv0", 4).unwrap().write_line(b"fourth");
        let text = std::fs::read_to_string(dir.join("hv0.l1.log")).unwrap();
        assert_eq!(
            text,
            "[g1] aged\n[g2] fresh\n[g1] last words\n[g3] third\n[g4] fourth\n"
        );
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn generations_have_budgets_of_their_own() {
        let dir = std::env::temp_dir().join(format!("vmbeam-l1b-{}", std::process::id()));
        let hub = ConsoleHub::new(ConsoleTarget::Dir(dir.clone())).unwrap();
        let aged = hub.get_l1("hv0", 1).unwrap();
        let fresh = hub.get_l1("hv0", 2).unwrap();
        let line = [b'x'; 1023];
        while aged.write_line(&line) {}
        assert!(fresh.write_line(b"still heard"));
        let text = std::fs::read_to_string(dir.join("hv0.l1.log")).unwrap();
        assert!(text.ends_with("[g2] still heard\n"));
        drop((aged, fresh));
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
