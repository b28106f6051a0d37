//! The local launcher: the jobs of a [`JobPlan`] as child processes of `nnseg` on this
//! machine, level after level; with GPUs one job per GPU at a time (`--device cuda:N`), on the
//! CPU one after the other. Each job's output goes to `cross_validate/logs/{job}.log` in the
//! results folder (appended to, so a rerun keeps the history).
//!
//! A job that fails keeps its level's other jobs running but the later levels do not start
//! (like Slurm's `afterok`). A requested stop sends SIGTERM to the running jobs, which write
//! `checkpoint_latest` and exit with [`STOPPED_EXIT_CODE`]; a rerun continues them (`--c`).

use super::jobs::{Job, JobKind, JobPlan};
use super::{io_err, ClusterError};
use crate::train::{StopFlag, STOPPED_EXIT_CODE};
use datasets::ResultsDir;
use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How to run the jobs here.
#[derive(Debug, Clone)]
pub struct LocalOptions {
    /// The `nnseg` executable.
    pub program: PathBuf,
    /// CUDA device indices, one job per device at a time; empty: one job at a time on the
    /// CPU.
    pub gpus: Vec<usize>,
    /// Environment given to the jobs (`nnUNet_raw`, ... as resolved by the caller).
    pub env: Vec<(String, String)>,
    pub stop: StopFlag,
    /// How often running jobs are checked.
    pub poll: Duration,
}

/// How a job ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Done,
    /// Non-zero exit (the status as text).
    Failed(String),
    /// Stopped gracefully: `checkpoint_latest` written, a rerun continues it.
    Stopped,
    /// Not started (an earlier level failed, or a stop was requested).
    NotRun,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobReport {
    pub name: String,
    pub outcome: Outcome,
    pub log: PathBuf,
}

/// The jobs' outcomes, in plan order.
#[derive(Debug, Clone, Default)]
pub struct LocalReport {
    pub jobs: Vec<JobReport>,
}

impl LocalReport {
    pub fn failed(&self) -> Vec<&JobReport> {
        self.with(|o| matches!(o, Outcome::Failed(_)))
    }
    pub fn stopped(&self) -> Vec<&JobReport> {
        self.with(|o| *o == Outcome::Stopped)
    }
    pub fn not_run(&self) -> Vec<&JobReport> {
        self.with(|o| *o == Outcome::NotRun)
    }
    fn with(&self, f: impl Fn(&Outcome) -> bool) -> Vec<&JobReport> {
        self.jobs.iter().filter(|j| f(&j.outcome)).collect()
    }
}

/// The live summary line's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// 1-based.
    pub level: usize,
    pub levels: usize,
    pub done: usize,
    pub running: usize,
    pub failed: usize,
    pub pending: usize,
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "level {}/{}: {} done, {} running, {} failed, {} pending",
            self.level, self.levels, self.done, self.running, self.failed, self.pending
        )
    }
}

struct Running<'p> {
    job: &'p Job,
    child: Child,
    gpu: Option<usize>,
}

/// The command line of `job` on `gpu` (trainings and the prediction get a device).
pub fn job_args(job: &Job, gpu: Option<usize>) -> Vec<String> {
    let mut args = job.args.clone();
    if let (JobKind::Train { .. } | JobKind::Predict, Some(g)) = (&job.kind, gpu) {
        args.extend(["--device".to_string(), format!("cuda:{g}")]);
    }
    args
}

fn spawn(
    job: &Job,
    gpu: Option<usize>,
    results: &ResultsDir,
    opts: &LocalOptions,
) -> Result<Child, ClusterError> {
    let log = results.cross_validate_log(&job.name);
    if let Some(dir) = log.parent() {
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    }
    let args = job_args(job, gpu);
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)
        .map_err(io_err(&log))?;
    use std::io::Write;
    writeln!(file, "=== nnseg {}", args.join(" ")).map_err(io_err(&log))?;
    let err = file.try_clone().map_err(io_err(&log))?;
    Command::new(&opts.program)
        .args(&args)
        .envs(opts.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .spawn()
        .map_err(|source| ClusterError::Spawn {
            command: format!("{} {}", opts.program.display(), args.join(" ")),
            source,
        })
}

fn outcome(status: std::process::ExitStatus) -> Outcome {
    match status.code() {
        Some(0) => Outcome::Done,
        Some(STOPPED_EXIT_CODE) => Outcome::Stopped,
        _ => Outcome::Failed(status.to_string()),
    }
}

fn terminate(child: &Child) {
    // SAFETY: kill(2) with a pid of our own child; no memory is involved.
    unsafe {
        libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
    }
}

/// Runs one level; appends its reports.
fn run_level(
    level: &[Job],
    (index, levels): (usize, usize),
    results: &ResultsDir,
    opts: &LocalOptions,
    reports: &mut Vec<JobReport>,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<(), ClusterError> {
    let mut pending: VecDeque<&Job> = level.iter().collect();
    let mut free: Vec<Option<usize>> = if opts.gpus.is_empty() {
        vec![None]
    } else {
        opts.gpus.iter().rev().map(|g| Some(*g)).collect()
    };
    let mut running: Vec<Running> = Vec::new();
    let mut progress = Progress {
        level: index + 1,
        levels,
        ..Progress::default()
    };
    let mut forwarded = false;
    let report = |job: &Job, outcome| JobReport {
        name: job.name.clone(),
        outcome,
        log: results.cross_validate_log(&job.name),
    };
    loop {
        let stop = opts.stop.is_requested();
        if stop && !forwarded {
            running.iter().for_each(|r| terminate(&r.child));
            reports.extend(pending.drain(..).map(|j| report(j, Outcome::NotRun)));
            forwarded = true;
        }
        while !stop && !free.is_empty() {
            let Some(job) = pending.pop_front() else {
                break;
            };
            let gpu = free.pop().flatten();
            let child = spawn(job, gpu, results, opts)?;
            running.push(Running { job, child, gpu });
        }
        let mut i = 0;
        while i < running.len() {
            let status = running[i]
                .child
                .try_wait()
                .map_err(|source| ClusterError::Io {
                    path: results.cross_validate_log(&running[i].job.name),
                    source,
                })?;
            match status {
                Some(status) => {
                    let r = running.swap_remove(i);
                    let o = outcome(status);
                    match o {
                        Outcome::Done => progress.done += 1,
                        _ => progress.failed += 1,
                    }
                    free.push(r.gpu);
                    reports.push(report(r.job, o));
                }
                None => i += 1,
            }
        }
        progress.running = running.len();
        progress.pending = pending.len();
        on_progress(&progress);
        if running.is_empty() && pending.is_empty() {
            return Ok(());
        }
        std::thread::sleep(opts.poll);
    }
}

/// Runs `plan` here (see the module documentation); `on_progress` gets the summary after
/// every check of the running jobs.
pub fn run_local(
    plan: &JobPlan,
    results: &ResultsDir,
    opts: &LocalOptions,
    on_progress: &mut dyn FnMut(&Progress),
) -> Result<LocalReport, ClusterError> {
    let mut reports = Vec::new();
    let levels = plan.levels.len();
    for (index, level) in plan.levels.iter().enumerate() {
        let blocked = reports
            .iter()
            .any(|r: &JobReport| r.outcome != Outcome::Done);
        if blocked || opts.stop.is_requested() {
            reports.extend(level.iter().map(|j| JobReport {
                name: j.name.clone(),
                outcome: Outcome::NotRun,
                log: results.cross_validate_log(&j.name),
            }));
            continue;
        }
        run_level(
            level,
            (index, levels),
            results,
            opts,
            &mut reports,
            on_progress,
        )?;
    }
    Ok(LocalReport { jobs: reports })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(name: &str, script: &str) -> Job {
        Job {
            name: name.into(),
            kind: JobKind::FindBest,
            args: vec!["-c".into(), script.into()],
        }
    }

    fn opts(gpus: Vec<usize>) -> LocalOptions {
        LocalOptions {
            program: PathBuf::from("/bin/sh"),
            gpus,
            env: vec![],
            stop: StopFlag::new(),
            poll: Duration::from_millis(10),
        }
    }

    #[test]
    fn outcomes_logs_and_later_levels_blocked_by_a_failure() {
        let tmp = tempfile::tempdir().unwrap();
        let results = ResultsDir::new(tmp.path());
        let plan = JobPlan {
            levels: vec![
                vec![
                    job("ok", "echo hello"),
                    job("bad", "exit 3"),
                    job("stopped", "exit 75"),
                ],
                vec![job("after", "echo never")],
            ],
            finished: vec![],
        };
        let mut seen = Vec::new();
        let report = run_local(&plan, &results, &opts(vec![0, 1]), &mut |p| seen.push(*p)).unwrap();
        let outcome = |n: &str| {
            report
                .jobs
                .iter()
                .find(|j| j.name == n)
                .unwrap()
                .outcome
                .clone()
        };
        assert_eq!(outcome("ok"), Outcome::Done);
        assert!(matches!(outcome("bad"), Outcome::Failed(s) if s.contains('3')));
        assert_eq!(outcome("stopped"), Outcome::Stopped);
        assert_eq!(outcome("after"), Outcome::NotRun);
        assert_eq!(report.failed().len(), 1);
        let log = std::fs::read_to_string(results.cross_validate_log("ok")).unwrap();
        assert!(
            log.contains("=== nnseg -c echo hello") && log.contains("hello\n"),
            "{log}"
        );
        assert!(!results.cross_validate_log("after").exists());
        let last = seen.last().unwrap();
        assert_eq!(
            (last.done, last.failed, last.running, last.pending),
            (1, 2, 0, 0)
        );
        assert!(
            seen.iter().all(|p| p.running <= 2),
            "at most one job per GPU"
        );
    }

    #[test]
    fn on_the_cpu_jobs_run_one_after_the_other() {
        let tmp = tempfile::tempdir().unwrap();
        let results = ResultsDir::new(tmp.path());
        let marker = tmp.path().join("running");
        let m = marker.display();
        // each job fails if another one is running
        let script = format!("test ! -e {m} && touch {m} && sleep 0.1 && rm {m}");
        let plan = JobPlan {
            levels: vec![vec![
                job("a", &script),
                job("b", &script),
                job("c", &script),
            ]],
            finished: vec![],
        };
        let report = run_local(&plan, &results, &opts(vec![]), &mut |p| {
            assert!(p.running <= 1)
        })
        .unwrap();
        assert!(
            report.jobs.iter().all(|j| j.outcome == Outcome::Done),
            "{report:?}"
        );
    }

    #[test]
    fn a_stop_terminates_running_jobs_and_starts_no_more() {
        let tmp = tempfile::tempdir().unwrap();
        let results = ResultsDir::new(tmp.path());
        let o = opts(vec![]);
        let stop = o.stop.clone();
        let plan = JobPlan {
            levels: vec![
                vec![
                    job("long", "trap 'exit 75' TERM; sleep 30 & wait"),
                    job("next", "echo no"),
                ],
                vec![job("later", "echo no")],
            ],
            finished: vec![],
        };
        let t = std::time::Instant::now();
        let report = run_local(&plan, &results, &o, &mut |p| {
            if p.running == 1 {
                std::thread::sleep(Duration::from_millis(200));
                stop.request();
            }
        })
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(20));
        assert_eq!(report.stopped().len(), 1, "{report:?}");
        assert_eq!(report.not_run().len(), 2, "{report:?}");
    }

    #[test]
    fn trainings_get_the_gpu_as_device() {
        let model = datasets::ModelId::new("T", "P", "2d").unwrap();
        let train = Job {
            name: "t".into(),
            kind: JobKind::Train {
                model,
                fold: "0".into(),
            },
            args: vec!["train".into()],
        };
        assert_eq!(job_args(&train, Some(2)), ["train", "--device", "cuda:2"]);
        assert_eq!(job_args(&train, None), ["train"]);
        assert_eq!(job_args(&job("f", "x"), Some(1)), ["-c", "x"]);
    }
}
