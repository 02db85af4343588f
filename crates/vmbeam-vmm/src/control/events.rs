//! The events file of `vmbeam run --events PATH`: one JSON object per line,
//! appended as things happen, so an operator (or a test) can follow what
//! the rejuvenation policy decided and what each rejuvenation did.
//!
//! Every line has an `"event"` field naming what happened and `"time_ms"`
//! (milliseconds since the Unix epoch); the other fields depend on the
//! event (see docs/operations.md). Each line is written with one `write`
//! on a file opened for appending, so lines never interleave.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// Errors of the events file.
#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    /// The file could not be opened or created.
    #[error("cannot open the events file {path}: {source}", path = .path.display())]
    Open {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// A line could not be written.
    #[error("cannot write to the events file {path}: {source}", path = .path.display())]
    Write {
        /// Path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
}

/// An append-only JSON-lines file.
#[derive(Debug)]
pub struct EventLog {
    path: PathBuf,
    file: Mutex<File>,
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl EventLog {
    /// Opens `path` for appending, creating it (mode 0600) if needed.
    pub fn open(path: &Path) -> Result<EventLog, EventsError> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(path)
            .map_err(|source| EventsError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        Ok(EventLog {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    /// Where the events go.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line: `fields` (a JSON object; anything else is put under
    /// `"data"`) plus `"event": event` and `"time_ms"`.
    pub fn log(&self, event: &str, fields: serde_json::Value) -> Result<(), EventsError> {
        let mut obj = match fields {
            serde_json::Value::Object(m) => m,
            serde_json::Value::Null => serde_json::Map::new(),
            other => {
                let mut m = serde_json::Map::new();
                m.insert("data".into(), other);
                m
            }
        };
        obj.insert("event".into(), event.into());
        obj.insert("time_ms".into(), unix_ms().into());
        let mut line = serde_json::Value::Object(obj).to_string();
        line.push('\n');
        let mut f = self.file.lock().unwrap();
        f.write_all(line.as_bytes())
            .and_then(|()| f.flush())
            .map_err(|source| EventsError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

impl crate::l1::shared::EventSink for EventLog {
    fn event(&self, event: &str, fields: serde_json::Value) {
        if let Err(e) = self.log(event, fields) {
            eprintln!("vmbeam: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_with_an_event_field() {
        let dir = std::env::temp_dir().join(format!("vmbeam-events-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("events.jsonl");
        let _ = std::fs::remove_file(&path);
        let log = EventLog::open(&path).unwrap();
        log.log("policy", serde_json::json!({"policy": "free<10%"}))
            .unwrap();
        log.log("odd", serde_json::json!(7)).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["event"], "policy");
        assert_eq!(lines[0]["policy"], "free<10%");
        assert!(lines[0]["time_ms"].as_u64().unwrap() > 0);
        assert_eq!(lines[1]["data"], 7);
        let e = EventLog::open(Path::new("/nonexistent-dir/x.jsonl")).unwrap_err();
        assert!(e.to_string().contains("cannot open the events file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
