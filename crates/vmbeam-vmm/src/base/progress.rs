//! Progress and cancellation of one long operation (a rejuvenation, a
//! migration), shared between the thread that runs it and whoever watches
//! it (the API's job table, the CLI through the API).
//!
//! It exists so that the operations report how far they are and check
//! whether to stop without knowing who asked: the operation updates a few
//! atomics between its phases and rounds, and calls [`Progress::check`] at
//! the points where giving up still rolls back cleanly. Nothing here
//! blocks or allocates on the operation's path.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// Where a long operation is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    /// Accepted, not started yet.
    Queued,
    /// Booting the successor guest hypervisor.
    Booting,
    /// Copying (or sending) memory while the guests run.
    Precopy,
    /// Guests are handed over (paused, or being adopted).
    HandingOver,
    /// Hashing guests before and after the move.
    Verifying,
    /// Past the point of no return: the move completes.
    Committing,
    /// Rolling back after a failure or a cancel.
    RollingBack,
    /// Finished successfully.
    Done,
    /// Failed (and rolled back where it could).
    Failed,
    /// Cancelled and rolled back.
    Cancelled,
}

impl Phase {
    const ALL: [Phase; 10] = [
        Phase::Queued,
        Phase::Booting,
        Phase::Precopy,
        Phase::HandingOver,
        Phase::Verifying,
        Phase::Committing,
        Phase::RollingBack,
        Phase::Done,
        Phase::Failed,
        Phase::Cancelled,
    ];

    /// Name as in the API (`handing-over`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Booting => "booting",
            Phase::Precopy => "precopy",
            Phase::HandingOver => "handing-over",
            Phase::Verifying => "verifying",
            Phase::Committing => "committing",
            Phase::RollingBack => "rolling-back",
            Phase::Done => "done",
            Phase::Failed => "failed",
            Phase::Cancelled => "cancelled",
        }
    }

    /// True once the operation has ended, one way or the other.
    pub fn is_final(self) -> bool {
        matches!(self, Phase::Done | Phase::Failed | Phase::Cancelled)
    }

    fn index(self) -> u8 {
        Phase::ALL.iter().position(|p| *p == self).unwrap_or(0) as u8
    }
}

/// The operation was asked to stop (see [`Progress::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled on request")]
pub struct Cancelled;

/// Counters and the cancel flag of one operation. Share it as an
/// `Arc<Progress>`; every method takes `&self`.
#[derive(Debug)]
pub struct Progress {
    phase: AtomicU8,
    bytes_done: AtomicU64,
    bytes_total: AtomicU64,
    guests_done: AtomicU64,
    guests_total: AtomicU64,
    rounds: AtomicU64,
    cancel: AtomicBool,
    started: Instant,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            phase: AtomicU8::new(Phase::Queued.index()),
            bytes_done: AtomicU64::new(0),
            bytes_total: AtomicU64::new(0),
            guests_done: AtomicU64::new(0),
            guests_total: AtomicU64::new(0),
            rounds: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            started: Instant::now(),
        }
    }
}

/// A copy of the counters at one moment (what the API reports).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Snapshot {
    /// Phase.
    pub phase: Phase,
    /// Bytes copied or sent so far.
    pub bytes_done: u64,
    /// Bytes to copy or send in all (0 when nothing is copied, e.g. zero-copy).
    pub bytes_total: u64,
    /// Nested guests moved so far.
    pub guests_done: u64,
    /// Nested guests to move.
    pub guests_total: u64,
    /// Pre-copy rounds done so far.
    pub rounds: u64,
    /// Time since the operation was accepted, ms.
    pub elapsed_ms: u64,
    /// A cancel was asked for.
    pub cancel_requested: bool,
}

impl Progress {
    /// A fresh tracker in phase `queued`, its clock started now.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress::default())
    }

    /// Moves to `phase`.
    pub fn set_phase(&self, phase: Phase) {
        self.phase.store(phase.index(), Ordering::SeqCst);
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::ALL
            .get(self.phase.load(Ordering::SeqCst) as usize)
            .copied()
            .unwrap_or(Phase::Queued)
    }

    /// Sets how many bytes the operation will move in all.
    pub fn set_bytes_total(&self, n: u64) {
        self.bytes_total.store(n, Ordering::Relaxed);
    }

    /// Adds to the total (a pre-copy round found more dirty pages).
    pub fn add_bytes_total(&self, n: u64) {
        self.bytes_total.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` more bytes moved.
    pub fn add_bytes(&self, n: u64) {
        self.bytes_done.fetch_add(n, Ordering::Relaxed);
    }

    /// Sets how many guests the operation moves.
    pub fn set_guests_total(&self, n: u64) {
        self.guests_total.store(n, Ordering::Relaxed);
    }

    /// Sets how many guests have moved.
    pub fn set_guests_done(&self, n: u64) {
        self.guests_done.store(n, Ordering::Relaxed);
    }

    /// Counts one more pre-copy round.
    pub fn add_round(&self) {
        self.rounds.fetch_add(1, Ordering::Relaxed);
    }

    /// Asks the operation to stop at its next check (and roll back).
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// True once [`Progress::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::SeqCst)
    }

    /// `Err(Cancelled)` if a cancel was asked for: the operation calls this
    /// at points where it can still roll back.
    pub fn check(&self) -> Result<(), Cancelled> {
        if self.is_cancelled() {
            Err(Cancelled)
        } else {
            Ok(())
        }
    }

    /// The counters now.
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            phase: self.phase(),
            bytes_done: self.bytes_done.load(Ordering::Relaxed),
            bytes_total: self.bytes_total.load(Ordering::Relaxed),
            guests_done: self.guests_done.load(Ordering::Relaxed),
            guests_total: self.guests_total.load(Ordering::Relaxed),
            rounds: self.rounds.load(Ordering::Relaxed),
            elapsed_ms: self.started.elapsed().as_millis() as u64,
            cancel_requested: self.is_cancelled(),
        }
    }
}

/// `Ok` unless `progress` exists and was cancelled: for code whose
/// progress tracker is optional.
pub fn check(progress: Option<&Arc<Progress>>) -> Result<(), Cancelled> {
    progress.map_or(Ok(()), |p| p.check())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_round_trip_and_cancel_is_sticky() {
        let p = Progress::new();
        for ph in Phase::ALL {
            p.set_phase(ph);
            assert_eq!(p.phase(), ph);
            assert_eq!(
                serde_json::to_value(ph).unwrap().as_str().unwrap(),
                ph.as_str()
            );
        }
        p.set_bytes_total(100);
        p.add_bytes(40);
        p.add_bytes(2);
        p.set_guests_total(2);
        p.set_guests_done(1);
        p.add_round();
        let s = p.snapshot();
        assert_eq!(
            (
                s.bytes_done,
                s.bytes_total,
                s.guests_done,
                s.guests_total,
                s.rounds
            ),
            (42, 100, 1, 2, 1)
        );
        assert!(p.check().is_ok() && check(Some(&p)).is_ok() && check(None).is_ok());
        p.cancel();
        assert_eq!(p.check(), Err(Cancelled));
        assert!(check(Some(&p)).is_err() && p.snapshot().cancel_requested);
    }
}
