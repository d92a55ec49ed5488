//! Long API operations (rollbacks) run as jobs: the request returns a job id at once, and
//! `GET /v1/jobs/{id}` shows progress and, when finished, the result or the error.
//!
//! Jobs live in memory only; a restart forgets them (the rollback itself is journaled and
//! shows in `history`). At most [`JOBS_RUNNING_MAX`] run at once and one per group, and only
//! the newest `finished_max` finished jobs are kept.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::Serialize;
use tidemark_engine::Progress;

/// Most jobs running at once; more are refused with 409 until one finishes.
pub const JOBS_RUNNING_MAX: usize = 4;

/// What a job is doing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Still working.
    Running,
    /// Finished; `result` holds what it did.
    Done,
    /// Stopped with `error`.
    Failed,
}

/// One job. Progress is updated from the worker thread without taking the table's lock.
pub struct Job {
    id: u64,
    kind: &'static str,
    group: String,
    target: String,
    started: SystemTime,
    done_bytes: AtomicU64,
    total_bytes: AtomicU64,
    end: Mutex<Option<JobEnd>>,
}

struct JobEnd {
    finished: SystemTime,
    outcome: Result<serde_json::Value, String>,
}

/// A job as `GET /v1/jobs/{id}` shows it.
#[derive(Clone, Debug, Serialize)]
pub struct JobView {
    /// Job id.
    pub id: u64,
    /// `rollback`.
    pub kind: &'static str,
    /// The group it acts on.
    pub group: String,
    /// What it was asked to do (`seq:42`, `undo`).
    pub target: String,
    /// Running, done or failed.
    pub state: JobState,
    /// Bytes done and to do.
    pub progress: Progress,
    /// When it started (RFC 3339).
    pub started: String,
    /// When it finished (RFC 3339).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished: Option<String>,
    /// What a finished job did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    /// Why a failed job stopped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Why a job could not start.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JobError {
    /// The group already has a job running.
    #[error("group {group:?} already has job {job} running; wait for it to finish")]
    GroupBusy {
        /// The group.
        group: String,
        /// The running job's id.
        job: u64,
    },
    /// [`JOBS_RUNNING_MAX`] jobs are running.
    #[error("{JOBS_RUNNING_MAX} jobs are running already; wait for one to finish")]
    TooMany,
}

/// The table of jobs.
pub struct Jobs {
    finished_max: usize,
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    jobs: BTreeMap<u64, Arc<Job>>,
    finished: VecDeque<u64>,
}

impl Job {
    /// The job's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Record progress (called from the engine's progress callback).
    pub fn set_progress(&self, progress: Progress) {
        self.total_bytes.store(progress.total_bytes, Ordering::Relaxed);
        self.done_bytes.store(progress.done_bytes, Ordering::Relaxed);
    }

    /// The job as the API shows it.
    pub fn view(&self) -> JobView {
        let end = self.end.lock().unwrap_or_else(|p| p.into_inner());
        let (state, finished, result, error) = match &*end {
            None => (JobState::Running, None, None, None),
            Some(JobEnd { finished, outcome: Ok(value) }) => {
                (JobState::Done, Some(rfc3339(*finished)), Some(value.clone()), None)
            }
            Some(JobEnd { finished, outcome: Err(e) }) => {
                (JobState::Failed, Some(rfc3339(*finished)), None, Some(e.clone()))
            }
        };
        JobView {
            id: self.id,
            kind: self.kind,
            group: self.group.clone(),
            target: self.target.clone(),
            state,
            progress: Progress {
                done_bytes: self.done_bytes.load(Ordering::Relaxed),
                total_bytes: self.total_bytes.load(Ordering::Relaxed),
            },
            started: rfc3339(self.started),
            finished,
            result,
            error,
        }
    }

    fn is_running(&self) -> bool {
        self.end.lock().unwrap_or_else(|p| p.into_inner()).is_none()
    }
}

impl Jobs {
    /// An empty table keeping at most `finished_max` finished jobs.
    pub fn new(finished_max: usize) -> Jobs {
        Jobs {
            finished_max: finished_max.max(1),
            inner: Mutex::new(Table { next_id: 1, ..Table::default() }),
        }
    }

    /// Register a running job on `group`, unless the group or the site is busy.
    pub fn start(&self, kind: &'static str, group: &str, target: &str) -> Result<Arc<Job>, JobError> {
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let running: Vec<&Arc<Job>> = table.jobs.values().filter(|j| j.is_running()).collect();
        if let Some(busy) = running.iter().find(|j| j.group == group) {
            return Err(JobError::GroupBusy { group: group.to_string(), job: busy.id });
        }
        if running.len() >= JOBS_RUNNING_MAX {
            return Err(JobError::TooMany);
        }
        let id = table.next_id;
        table.next_id += 1;
        let job = Arc::new(Job {
            id,
            kind,
            group: group.to_string(),
            target: target.to_string(),
            started: SystemTime::now(),
            done_bytes: AtomicU64::new(0),
            total_bytes: AtomicU64::new(0),
            end: Mutex::new(None),
        });
        table.jobs.insert(id, job.clone());
        Ok(job)
    }

    /// Mark `job` finished and forget the oldest finished jobs past the limit.
    pub fn finish(&self, job: &Job, outcome: Result<serde_json::Value, String>) {
        *job.end.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(JobEnd { finished: SystemTime::now(), outcome });
        let mut table = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        table.finished.push_back(job.id);
        while table.finished.len() > self.finished_max {
            if let Some(old) = table.finished.pop_front() {
                table.jobs.remove(&old);
            }
        }
    }

    /// A job by id.
    pub fn get(&self, id: u64) -> Option<Arc<Job>> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).jobs.get(&id).cloned()
    }

    /// How many jobs are running.
    pub fn running(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).jobs.values().filter(|j| j.is_running()).count()
    }
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_nanos(time).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_job_per_group_and_a_bounded_count() {
        let jobs = Jobs::new(8);
        let a = jobs.start("rollback", "g1", "seq:1").expect("first");
        assert_eq!(
            jobs.start("rollback", "g1", "seq:2").err(),
            Some(JobError::GroupBusy { group: "g1".into(), job: a.id() })
        );
        for n in 2..=JOBS_RUNNING_MAX {
            jobs.start("rollback", &format!("g{n}"), "latest").expect("more groups");
        }
        assert_eq!(jobs.start("rollback", "other", "latest").err(), Some(JobError::TooMany));
        jobs.finish(&a, Ok(serde_json::json!({"bytes_rewritten": 1})));
        assert_eq!(jobs.running(), JOBS_RUNNING_MAX - 1);
        let again = jobs.start("rollback", "g1", "undo").expect("group free again");
        assert_ne!(again.id(), a.id());
    }

    #[test]
    fn views_show_progress_result_and_error() {
        let jobs = Jobs::new(8);
        let job = jobs.start("rollback", "g", "seq:3").expect("start");
        job.set_progress(Progress { done_bytes: 10, total_bytes: 40 });
        let view = job.view();
        assert_eq!(view.state, JobState::Running);
        assert_eq!((view.progress.done_bytes, view.progress.total_bytes), (10, 40));
        assert!(view.result.is_none() && view.finished.is_none());
        jobs.finish(&job, Err("disk on fire".into()));
        let view = jobs.get(job.id()).expect("kept").view();
        assert_eq!(view.state, JobState::Failed);
        assert_eq!(view.error.as_deref(), Some("disk on fire"));
        assert!(view.finished.is_some());
    }

    #[test]
    fn only_the_newest_finished_jobs_are_kept() {
        let jobs = Jobs::new(2);
        let ids: Vec<u64> = (0..3)
            .map(|_| {
                let job = jobs.start("rollback", "g", "latest").expect("start");
                jobs.finish(&job, Ok(serde_json::Value::Null));
                job.id()
            })
            .collect();
        assert!(jobs.get(ids[0]).is_none());
        assert!(jobs.get(ids[1]).is_some());
        assert!(jobs.get(ids[2]).is_some());
    }
}
