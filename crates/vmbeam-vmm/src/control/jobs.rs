//! Long operations (rejuvenations, migrations) started through the API run
//! as jobs: a numbered entry that reports the operation's progress while it
//! runs, can be cancelled (the operation rolls back to the state before
//! it), and keeps its report or error once it ended.
//!
//! The table is bounded: it keeps every running job (at most one, since
//! rejuvenations and migrations exclude each other) and the last
//! [`FINISHED_KEPT`] finished ones.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::base::progress::{Phase, Progress, Snapshot};
use crate::control::events::unix_ms;
use crate::migration::rejuvenate::Report;

/// Finished jobs kept for `GET /api/v1/jobs/{id}`.
pub const FINISHED_KEPT: usize = 16;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum JobKind {
    /// A rejuvenation.
    Rejuvenate,
    /// A migration to another host.
    Migrate,
}

/// One job.
#[derive(Debug)]
pub struct Job {
    /// Its number (from 1, never reused while vmbeam runs).
    pub id: u64,
    /// What it does.
    pub kind: JobKind,
    /// Host VM line it works on.
    pub vm: String,
    /// Its progress and cancel flag, shared with the operation.
    pub progress: Arc<Progress>,
    started_at_ms: u64,
    outcome: Mutex<Option<Result<Report, JobError>>>,
}

/// How a job failed: the sentence, and the HTTP status a synchronous
/// request for the same operation answers with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobError {
    /// HTTP status (500 for a failed operation, 409, 404, …).
    pub code: u16,
    /// One sentence.
    pub message: String,
}

/// A job as the API shows it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct JobView {
    /// Number.
    pub id: u64,
    /// `rejuvenate` or `migrate`.
    pub kind: JobKind,
    /// Host VM line.
    pub vm: String,
    /// Milliseconds since the Unix epoch when it was accepted.
    pub started_at_ms: u64,
    /// Progress now.
    #[serde(flatten)]
    pub progress: Snapshot,
    /// The report, once done.
    pub report: Option<Report>,
    /// The error, once failed or cancelled.
    pub error: Option<String>,
}

impl Job {
    /// Records how the operation ended and moves to its final phase.
    pub fn finish(&self, outcome: Result<Report, JobError>) {
        let phase = match &outcome {
            Ok(_) => Phase::Done,
            Err(_) if self.progress.is_cancelled() => Phase::Cancelled,
            Err(_) => Phase::Failed,
        };
        *self.outcome.lock().unwrap() = Some(outcome);
        self.progress.set_phase(phase);
    }

    /// The API's view of it.
    pub fn view(&self) -> JobView {
        let outcome = self.outcome.lock().unwrap().clone();
        let (report, error) = match outcome {
            Some(Ok(r)) => (Some(r), None),
            Some(Err(e)) => (None, Some(e.message)),
            None => (None, None),
        };
        let mut progress = self.progress.snapshot();
        // The operation may mark its own end before the job has its
        // outcome: the job is final only with the outcome recorded, so a
        // final phase always comes with its report or error.
        if outcome_missing(&report, &error) && progress.phase.is_final() {
            progress.phase = match progress.phase {
                Phase::Done => Phase::Committing,
                _ => Phase::RollingBack,
            };
        }
        JobView {
            id: self.id,
            kind: self.kind,
            vm: self.vm.clone(),
            started_at_ms: self.started_at_ms,
            progress,
            report,
            error,
        }
    }

    /// How it ended, once it has.
    pub fn outcome(&self) -> Option<Result<Report, JobError>> {
        self.outcome.lock().unwrap().clone()
    }

    /// True once the operation ended.
    pub fn is_finished(&self) -> bool {
        self.outcome.lock().unwrap().is_some()
    }
}

fn outcome_missing(report: &Option<Report>, error: &Option<String>) -> bool {
    report.is_none() && error.is_none()
}

/// The job table.
#[derive(Debug, Default)]
pub struct Jobs {
    next: AtomicU64,
    list: Mutex<VecDeque<Arc<Job>>>,
}

impl Jobs {
    /// Adds a new job in phase `queued`.
    pub fn add(&self, kind: JobKind, vm: &str) -> Arc<Job> {
        let job = Arc::new(Job {
            id: self.next.fetch_add(1, Ordering::SeqCst) + 1,
            kind,
            vm: vm.to_string(),
            progress: Progress::new(),
            started_at_ms: unix_ms(),
            outcome: Mutex::new(None),
        });
        let mut list = self.list.lock().unwrap();
        list.push_back(job.clone());
        // Drop the oldest finished jobs beyond the bound (running ones stay).
        while list.iter().filter(|j| j.is_finished()).count() > FINISHED_KEPT {
            if let Some(i) = list.iter().position(|j| j.is_finished()) {
                list.remove(i);
            }
        }
        job
    }

    /// Job `id`, if kept.
    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.list
            .lock()
            .unwrap()
            .iter()
            .find(|j| j.id == id)
            .cloned()
    }

    /// Every kept job, oldest first.
    pub fn all(&self) -> Vec<Arc<Job>> {
        self.list.lock().unwrap().iter().cloned().collect()
    }

    /// Jobs still running.
    pub fn running(&self) -> Vec<Arc<Job>> {
        self.all()
            .into_iter()
            .filter(|j| !j.is_finished())
            .collect()
    }

    /// Asks every running job to cancel (shutdown); returns how many.
    pub fn cancel_all(&self) -> usize {
        let running = self.running();
        for j in &running {
            j.progress.cancel();
        }
        running.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_keeps_running_jobs_and_a_bounded_history() {
        let jobs = Jobs::default();
        let running = jobs.add(JobKind::Migrate, "hv0");
        for _ in 0..FINISHED_KEPT + 5 {
            jobs.add(JobKind::Rejuvenate, "hv0").finish(Err(JobError {
                code: 500,
                message: "boom".into(),
            }));
        }
        // The running job, FINISHED_KEPT finished ones, and the newest
        // finished one, trimmed at the next add.
        assert_eq!(jobs.all().len(), FINISHED_KEPT + 2);
        assert!(
            jobs.get(running.id).is_some(),
            "a running job is never dropped"
        );
        assert_eq!(jobs.running().len(), 1);
        assert_eq!(jobs.cancel_all(), 1);
        running.finish(Err(JobError {
            code: 500,
            message: "cancelled".into(),
        }));
        let v = running.view();
        assert_eq!(v.progress.phase, Phase::Cancelled);
        assert_eq!(v.error.as_deref(), Some("cancelled"));
        assert!(jobs.get(2).is_none(), "the oldest finished jobs go first");
        // A final phase set by the operation is not shown before the outcome.
        let j = jobs.add(JobKind::Migrate, "hv0");
        j.progress.set_phase(Phase::Cancelled);
        assert_eq!(j.view().progress.phase, Phase::RollingBack);
        j.progress.set_phase(Phase::Done);
        assert_eq!(j.view().progress.phase, Phase::Committing);
    }
}
