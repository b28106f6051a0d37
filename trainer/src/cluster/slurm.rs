//! The Slurm launcher: one sbatch script per dependency level of a [`JobPlan`], written into
//! `cross_validate/slurm/` of the results folder (readable: a user may edit and resubmit
//! them), submitted as job arrays chained with `--dependency=afterok`.
//!
//! Each array task runs one `nnseg` command in the background and forwards SIGUSR1 (Slurm's
//! warning `--signal=B:USR1@GRACE` before the time limit) and SIGTERM (preemption,
//! `scontrol requeue`) to it as SIGTERM; the training writes `checkpoint_latest` and exits
//! with [`STOPPED_EXIT_CODE`], upon which the task requeues itself. Trainings always run with
//! `--c`, so a requeued task continues where it stopped.

use super::jobs::{Job, JobPlan};
use super::{io_err, ClusterError};
use crate::checkpoint::CheckpointKind;
use crate::train::STOPPED_EXIT_CODE;
use datasets::ResultsDir;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::Command;

/// sbatch settings and what the scripts need to run `nnseg`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SlurmOptions {
    /// The `nnseg` executable (an absolute path the compute nodes can reach).
    pub program: PathBuf,
    /// Environment exported by the scripts (`nnUNet_raw`, `nnUNet_preprocessed`,
    /// `nnUNet_results`).
    pub env: Vec<(String, String)>,
    pub partition: Option<String>,
    pub account: Option<String>,
    /// `--time` (`HH:MM:SS`, `D-HH:MM:SS`, ...).
    pub time: Option<String>,
    /// `--mem` (`32G`, ...).
    pub mem: Option<String>,
    pub cpus_per_task: Option<usize>,
    /// At most this many tasks of an array at once (`--array=0-N%MAX`).
    pub max_parallel: Option<usize>,
    /// One GPU per job (`--gres=gpu:1`, trainings on `--device cuda`).
    pub gpu: bool,
    /// Seconds between the warning signal and the time limit (`--signal=B:USR1@GRACE`).
    pub grace_s: u64,
}

/// One written script.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LevelScript {
    /// 0-based dependency level.
    pub level: usize,
    pub script: PathBuf,
    /// The jobs of the array, by task index.
    pub jobs: Vec<String>,
    /// The array job id once submitted.
    #[serde(default)]
    pub job_id: Option<String>,
}

/// `cross_validate/slurm/`.
pub fn slurm_dir(results: &ResultsDir) -> PathBuf {
    results.cross_validate().join("slurm")
}

/// `cross_validate/slurm/submitted.json`: the scripts and their job ids.
pub fn record_file(results: &ResultsDir) -> PathBuf {
    slurm_dir(results).join("submitted.json")
}

/// Single-quotes `s` for bash.
fn quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-./:=,+%@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

fn task_args(job: &Job, gpu: bool) -> Vec<String> {
    let mut args = job.args.clone();
    if gpu
        && matches!(
            job.kind,
            super::JobKind::Train { .. } | super::JobKind::Predict
        )
    {
        args.extend(["--device".to_string(), "cuda".to_string()]);
    }
    args
}

fn sbatch_lines(level: usize, jobs: &[Job], results: &ResultsDir, o: &SlurmOptions) -> Vec<String> {
    let name = results
        .path()
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let logs = results.cross_validate().join("logs");
    let max = o.max_parallel.map(|m| format!("%{m}")).unwrap_or_default();
    let mut l = vec![
        format!("#SBATCH --job-name=nnseg_{name}_L{level}"),
        format!("#SBATCH --array=0-{}{max}", jobs.len().saturating_sub(1)),
        format!("#SBATCH --output={}/slurm_%x_%A_%a.out", logs.display()),
        "#SBATCH --open-mode=append".into(),
        "#SBATCH --requeue".into(),
        format!("#SBATCH --signal=B:USR1@{}", o.grace_s),
    ];
    let opt = |flag: &str, v: &Option<String>| v.as_ref().map(|v| format!("#SBATCH --{flag}={v}"));
    l.extend(opt("partition", &o.partition));
    l.extend(opt("account", &o.account));
    l.extend(opt("time", &o.time));
    l.extend(opt("mem", &o.mem));
    l.extend(opt(
        "cpus-per-task",
        &o.cpus_per_task.map(|c| c.to_string()),
    ));
    if o.gpu {
        l.push("#SBATCH --gres=gpu:1".into());
    }
    l
}

/// The sbatch script of one level (see the module documentation).
pub fn sbatch_script(
    (level, levels): (usize, usize),
    jobs: &[Job],
    results: &ResultsDir,
    o: &SlurmOptions,
) -> String {
    let mut s = vec![
        "#!/bin/bash".to_string(),
        format!(
            "# Written by `nnseg cross_validate`: dependency level {} of {levels}, {} job(s), one \
             array task each.",
            level + 1,
            jobs.len()
        ),
        "# Resubmit after editing with `sbatch [--dependency=afterok:JOBID] THIS_FILE`."
            .to_string(),
    ];
    s.extend(sbatch_lines(level, jobs, results, o));
    s.push(String::new());
    s.push("set -u".into());
    for (k, v) in &o.env {
        s.push(format!("export {k}={}", quote(v)));
    }
    s.push(format!("NNSEG={}", quote(&o.program.display().to_string())));
    s.push(format!(
        "LOGS={}",
        quote(&results.cross_validate().join("logs").display().to_string())
    ));
    s.push("NAMES=(".into());
    s.extend(jobs.iter().map(|j| format!("  {}", quote(&j.name))));
    s.push(")".into());
    s.push("# one line of nnseg arguments per array task".into());
    s.push("ARGS=(".into());
    for j in jobs {
        let line: Vec<String> = task_args(j, o.gpu).iter().map(|a| quote(a)).collect();
        s.push(format!("  {}", quote(&line.join(" "))));
    }
    s.push(")".into());
    s.push(TASK_BODY.replace("{STOPPED}", &STOPPED_EXIT_CODE.to_string()));
    s.join("\n")
}

/// Runs the array task's command; forwards USR1/TERM; requeues after a graceful stop.
const TASK_BODY: &str = r#"
TASK=${SLURM_ARRAY_TASK_ID:-0}
NAME=${NAMES[$TASK]}
eval "set -- ${ARGS[$TASK]}"
mkdir -p "$LOGS"
echo "=== nnseg $* (slurm job ${SLURM_JOB_ID:-?}, task $TASK, restart ${SLURM_RESTART_COUNT:-0}, $(date -u +%FT%TZ))" >> "$LOGS/$NAME.log"
"$NNSEG" "$@" >> "$LOGS/$NAME.log" 2>&1 &
PID=$!
# the time-limit warning (USR1) and a preemption (TERM) both ask nnseg for a graceful stop
trap 'kill -TERM $PID 2>/dev/null' USR1 TERM
STATUS=0
wait $PID || STATUS=$?
while kill -0 $PID 2>/dev/null; do
  STATUS=0
  wait $PID || STATUS=$?
done
if [ "$STATUS" -eq {STOPPED} ]; then
  echo "nnseg stopped gracefully (checkpoint_latest written); requeueing" >> "$LOGS/$NAME.log"
  scontrol requeue "${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID}_${TASK}"
fi
exit $STATUS
"#;

/// Writes the level scripts into [`slurm_dir`].
pub fn write_scripts(
    plan: &JobPlan,
    results: &ResultsDir,
    o: &SlurmOptions,
) -> Result<Vec<LevelScript>, ClusterError> {
    let dir = slurm_dir(results);
    // Slurm opens `--output` in the logs folder before the script runs: it must exist
    let logs = results.cross_validate().join("logs");
    for d in [&dir, &logs] {
        std::fs::create_dir_all(d).map_err(io_err(d))?;
    }
    let levels = plan.levels.len();
    let mut out = Vec::new();
    for (level, jobs) in plan.levels.iter().enumerate() {
        let script = dir.join(format!("level_{level}.sbatch"));
        let text = sbatch_script((level, levels), jobs, results, o);
        std::fs::write(&script, text).map_err(io_err(&script))?;
        out.push(LevelScript {
            level,
            script,
            jobs: jobs.iter().map(|j| j.name.clone()).collect(),
            job_id: None,
        });
    }
    Ok(out)
}

/// The sbatch command of a script, after the array job `after` if any.
pub fn sbatch_command(script: &Path, after: Option<&str>) -> Vec<String> {
    let mut c = vec!["sbatch".to_string(), "--parsable".to_string()];
    if let Some(id) = after {
        c.push(format!("--dependency=afterok:{id}"));
    }
    c.push(script.display().to_string());
    c
}

/// The job id in `sbatch --parsable`'s output (`123` or `123;cluster`).
pub fn parse_sbatch_output(command: &str, output: &str) -> Result<String, ClusterError> {
    let id = output.trim().split(';').next().unwrap_or("").trim();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        return Err(ClusterError::JobId {
            command: command.to_string(),
            output: output.trim().to_string(),
        });
    }
    Ok(id.to_string())
}

fn run_command(argv: &[String]) -> Result<String, ClusterError> {
    let command = argv.join(" ");
    let out = Command::new(&argv[0])
        .args(&argv[1..])
        .output()
        .map_err(|source| ClusterError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(ClusterError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).to_string())
}

/// Submits the scripts level after level, each `afterok` the previous array, and records the
/// ids in [`record_file`]. `dry_run`: returns the commands without running anything (the
/// dependency shows as `afterok:<level N>`).
pub fn submit(
    scripts: &mut [LevelScript],
    results: &ResultsDir,
    dry_run: bool,
) -> Result<Vec<Vec<String>>, ClusterError> {
    let mut commands = Vec::new();
    let mut previous: Option<String> = None;
    for s in scripts.iter_mut() {
        let argv = sbatch_command(&s.script, previous.as_deref());
        if dry_run {
            previous = Some(format!("<level {}>", s.level));
        } else {
            let id = parse_sbatch_output(&argv.join(" "), &run_command(&argv)?)?;
            s.job_id = Some(id.clone());
            previous = Some(id);
        }
        commands.push(argv);
    }
    if !dry_run {
        let path = record_file(results);
        let text = serde_json::to_string_pretty(&scripts).map_err(|e| ClusterError::Record {
            path: path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&path, text).map_err(io_err(&path))?;
    }
    Ok(commands)
}

/// Expands a Slurm id `123_4`, `123_[0-2,5%2]` or `123` into (array id, task indices).
fn expand_id(id: &str) -> (String, Vec<usize>) {
    let Some((job, tasks)) = id.split_once('_') else {
        return (id.to_string(), vec![]);
    };
    let tasks = tasks.trim_start_matches('[').trim_end_matches(']');
    let tasks = tasks.split('%').next().unwrap_or("");
    let mut out = Vec::new();
    for part in tasks.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                    out.extend(a..=b);
                }
            }
            None => out.extend(part.parse::<usize>().ok()),
        }
    }
    (job.to_string(), out)
}

/// (array id, task index, state) of `squeue -h -r -o %i|%T` / `sacct -n -P -X -o JobID,State`
/// lines.
pub fn parse_states(text: &str) -> Vec<(String, usize, String)> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut f = line.trim().split('|');
        let (Some(id), Some(state)) = (f.next(), f.next()) else {
            continue;
        };
        let (job, tasks) = expand_id(id.trim());
        // sacct's `CANCELLED by 0` → `CANCELLED`
        let state = state.split_whitespace().next().unwrap_or("").to_string();
        for t in tasks {
            out.push((job.clone(), t, state.clone()));
        }
    }
    out
}

/// One job's state in `--status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobState {
    pub name: String,
    /// `ARRAYID_TASK`.
    pub slurm_id: String,
    /// From squeue (live) or sacct; `None` when neither knows the task.
    pub slurm_state: Option<String>,
    /// From the results folder.
    pub results_state: &'static str,
}

/// What the results folder says about a job name.
fn results_state(results: &ResultsDir, name: &str) -> &'static str {
    if name == "predict_best_configuration" {
        return "see its log";
    }
    if name == "find_best_configuration" {
        return if results.inference_information().is_file() {
            "inference_information.json written"
        } else {
            "not run yet"
        };
    }
    let parsed = name
        .rsplit_once("_fold_")
        .and_then(|(m, f)| Some((datasets::ModelId::parse(m).ok()?, f)));
    let Some((model, fold)) = parsed else {
        return "unknown job";
    };
    let fold = results.model(&model).fold(fold);
    if fold.join(CheckpointKind::Final.file_name()).is_file() {
        "finished (checkpoint_final)"
    } else if fold.join(CheckpointKind::Latest.file_name()).is_file() {
        "interrupted or running (checkpoint_latest)"
    } else if fold.is_dir() {
        "started, no checkpoint yet"
    } else {
        "not started"
    }
}

/// Per-job states of the last submission: `squeue`, then `sacct` (if accounting is on), and
/// the results folder.
pub fn status(results: &ResultsDir) -> Result<Vec<JobState>, ClusterError> {
    let path = record_file(results);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let scripts: Vec<LevelScript> =
        serde_json::from_str(&text).map_err(|e| ClusterError::Record {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let ids: Vec<String> = scripts.iter().filter_map(|s| s.job_id.clone()).collect();
    let query = |argv: &[&str]| {
        let argv: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        run_command(&argv)
            .map(|t| parse_states(&t))
            .unwrap_or_default()
    };
    let joined = ids.join(",");
    let live = query(&["squeue", "-h", "-r", "-o", "%i|%T", "-j", &joined]);
    let past = query(&[
        "sacct",
        "-n",
        "-P",
        "-X",
        "-o",
        "JobID,State",
        "-j",
        &joined,
    ]);
    Ok(merge_states(&scripts, &live, &past, results))
}

/// Joins the recorded scripts with squeue's (preferred) and sacct's states.
pub fn merge_states(
    scripts: &[LevelScript],
    live: &[(String, usize, String)],
    past: &[(String, usize, String)],
    results: &ResultsDir,
) -> Vec<JobState> {
    let mut out = Vec::new();
    for s in scripts {
        let id = s.job_id.clone().unwrap_or_default();
        for (task, name) in s.jobs.iter().enumerate() {
            let find = |v: &[(String, usize, String)]| {
                v.iter()
                    .find(|(j, t, _)| *j == id && *t == task)
                    .map(|(_, _, st)| st.clone())
            };
            out.push(JobState {
                name: name.clone(),
                slurm_id: format!("{id}_{task}"),
                slurm_state: find(live).or_else(|| find(past)),
                results_state: results_state(results, name),
            });
        }
    }
    out
}

#[cfg(test)]
mod tests;
