//! Progress of a long-running operation, shared between the thread doing it
//! and whoever watches (the API, the CLI): a phase, bytes and guests done
//! out of a total, and a cancel flag the operation checks between steps.
//! Plain atomics, so reading it never waits for the operation.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

/// What the operation is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Not started.
    Idle = 0,
    /// Connecting, checking the peer.
    Connect = 1,
    /// Copying memory while the guests run.
    Live = 2,
    /// Guests paused, the rest is copied.
    Paused = 3,
    /// Guests run on the destination; memory is still arriving (post-copy).
    PostCopy = 4,
    /// Waiting for the destination's verdict or start.
    Commit = 5,
    /// Finished.
    Done = 6,
    /// Failed or cancelled.
    Failed = 7,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Connect,
            2 => Phase::Live,
            3 => Phase::Paused,
            4 => Phase::PostCopy,
            5 => Phase::Commit,
            6 => Phase::Done,
            7 => Phase::Failed,
            _ => Phase::Idle,
        }
    }
}

/// Shared progress (wrap in an `Arc`).
#[derive(Debug, Default)]
pub struct Progress {
    phase: AtomicU8,
    /// Bytes done.
    pub bytes_done: AtomicU64,
    /// Bytes to do (may grow while memory is dirtied).
    pub bytes_total: AtomicU64,
    /// Guests done.
    pub guests_done: AtomicU64,
    /// Guests to do.
    pub guests_total: AtomicU64,
    cancel: AtomicBool,
}

/// A point-in-time copy of [`Progress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Phase.
    pub phase: Phase,
    /// Bytes done.
    pub bytes_done: u64,
    /// Bytes to do.
    pub bytes_total: u64,
    /// Guests done.
    pub guests_done: u64,
    /// Guests to do.
    pub guests_total: u64,
    /// Cancel was asked for.
    pub cancel_requested: bool,
}

impl Progress {
    /// Sets the phase.
    pub fn set_phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }
    /// The phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::Relaxed))
    }
    /// Adds to the bytes done.
    pub fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }
    /// Asks the operation to stop at its next check.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }
    /// True once cancel was asked for.
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }
    /// A copy of the current values.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase(),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            guests_done: self.guests_done.load(Ordering::Relaxed),
            guests_total: self.guests_total.load(Ordering::Relaxed),
            cancel_requested: self.cancelled(),
        }
    }
}
