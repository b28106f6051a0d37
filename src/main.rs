//! The `nnseg` binary: parses arguments, resolves folders from flags and nnU-Net's
//! environment variables, installs logging, wires the library crates, prints errors.

#[cfg(unix)]
mod alloc;
mod cli;
#[cfg(unix)]
mod runtime_env;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::Parser;
use datasets::{ModelDir, ModelId, NnUnetPaths, PredictionDir, PreprocessedDir, RawDataset};
use plans::{DatasetJson, Fingerprint, Plans};

use cli::{Cli, Command, DatasetIds, FingerprintOpts, PathArgs, PlannerOpts, PreprocessOpts};

/// mimalloc keeps freed buffers for reuse; with glibc's allocator every gradient buffer
/// Candle's autograd allocates is page-faulted in again (2-3x slower backward passes). Large
/// buffers bypass it (see `alloc`).
#[cfg(unix)]
#[global_allocator]
static GLOBAL: alloc::NnsegAlloc = alloc::NnsegAlloc;
#[cfg(not(unix))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    #[cfg(unix)]
    runtime_env::reexec_with_runtime_options();
    let cli = Cli::parse_from(cli::normalize_args(std::env::args()));
    install_logging(cli.verbose);
    // NNSEG_ISA=avx2: the convolution GEMMs run the AVX2/FMA kernels on an AVX-512 host
    if let Ok(v) = std::env::var("NNSEG_ISA") {
        architectures::ops::set_gemm_isa(architectures::ops::parse_isa(&v));
    }
    if let Err(e) = run(cli) {
        eprintln!("error: {}", error_chain(&e));
        std::process::exit(1);
    }
}

/// The error and its causes, skipping causes whose text the message already contains
/// (library errors often embed their source's text).
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if msg.contains(&text) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&text);
    }
    msg
}

fn install_logging(verbose: bool) {
    use tracing_subscriber::EnvFilter;
    // --verbose wins over RUST_LOG (as flags win over nnU-Net's variables)
    let filter = if verbose {
        EnvFilter::new("debug")
    } else {
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"))
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .without_time()
        .init();
}

/// Flags win over nnU-Net's environment variables.
fn resolve_paths(args: &PathArgs) -> NnUnetPaths {
    let env = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    NnUnetPaths {
        raw: args.raw.clone().or_else(|| env("nnUNet_raw")),
        preprocessed: args
            .preprocessed
            .clone()
            .or_else(|| env("nnUNet_preprocessed")),
        results: args.results.clone().or_else(|| env("nnUNet_results")),
    }
}

fn run(cli: Cli) -> Result<()> {
    let paths = resolve_paths(&cli.paths);
    match cli.command {
        Command::ExportModelToZip(a) => cmd_export_model_to_zip(&paths, a)?,
        Command::InstallPretrainedModelFromZip(a) => {
            cmd_install_pretrained_model_from_zip(&paths, a)?
        }
        Command::DownloadPretrainedModelByUrl(a) => {
            cmd_download_pretrained_model_by_url(&paths, a)?
        }
        Command::ConvertMsdDataset(a) => cmd_convert_msd_dataset(&paths, a)?,
        Command::ConvertOldNnunetDataset(a) => cmd_convert_old_nnunet_dataset(&paths, a)?,
        Command::MovePlansBetweenDatasets(a) => cmd_move_plans_between_datasets(&paths, a)?,
        Command::MakeDemoDataset(a) => cmd_make_demo_dataset(&paths, a)?,
        Command::ShowNetwork(a) => show_network(&paths, &a)?,
        Command::BenchTrain(a) => bench_train(&a)?,
        Command::Doctor(a) => std::process::exit(doctor(&a)),
        Command::PlotOverlayPngs(a) => cmd_plot_overlay_pngs(&paths, a)?,
        Command::Train(a) => exit_unless_zero(train(&paths, &a)?),
        Command::CrossValidate(a) => exit_unless_zero(cross_validate(&paths, &a)?),
        Command::Predict(a) => predict(&paths, &a)?,
        Command::PredictFromModelFolder(a) => predict_from_modelfolder(&a)?,
        Command::Ensemble(a) => cmd_ensemble(a)?,
        Command::EvaluateFolder(a) => cmd_evaluate_folder(a)?,
        Command::EvaluateSimple(a) => cmd_evaluate_simple(a)?,
        Command::AccumulateCrossvalResults(a) => accumulate_crossval(&paths, &a)?,
        Command::DeterminePostprocessing(a) => cmd_determine_postprocessing(a)?,
        Command::ApplyPostprocessing(a) => cmd_apply_postprocessing(a)?,
        Command::FindBestConfiguration(a) => find_best(&paths, &a)?,
        Command::ImportNnunetModel(a) if a.folder.extension().is_some_and(|e| e == "zip") => {
            let imported = trainer::sharing::import_nnunet_zip(
                &a.folder,
                paths.results_root()?,
                &a.checkpoint,
            )?;
            anyhow::ensure!(
                !imported.is_empty(),
                "{}: no fold in the zip has {}",
                a.folder.display(),
                a.checkpoint
            );
            for f in &imported {
                println!(
                    "imported {} fold {}\n  {}",
                    f.model_folder.display(),
                    f.fold,
                    f.weights.display()
                );
            }
        }
        Command::PredictBestConfiguration(a) => predict_best(&paths, &a)?,
        Command::ImportNnunetModel(a) => {
            let t = Instant::now();
            let model = trainer::import::import_nnunet_model(&a.folder, &a.fold, &a.checkpoint)?;
            let out = a
                .output
                .clone()
                .unwrap_or_else(|| ModelDir::at(&a.folder).fold(&a.fold));
            let (weights, meta) = model.save(&out)?;
            println!(
                "imported {} ({} {}, {} parameters, {} alias keys dropped) in {:.2} s\n  {}\n  {}",
                model.checkpoint.display(),
                model.plans.dataset_name,
                model.configuration_name,
                model.parameter_count,
                model.dropped_keys,
                t.elapsed().as_secs_f64(),
                weights.display(),
                meta.display()
            );
        }
        Command::ExtractFingerprint(a) => {
            for id in ids(&a.ids)? {
                fingerprint_step(&paths, id, &a.fingerprint)?;
            }
        }
        Command::PlanExperiment(a) => {
            for id in ids(&a.ids)? {
                plan_step(&paths, id, &a.planner)?;
            }
        }
        Command::Preprocess(a) => {
            for id in ids(&a.ids)? {
                preprocess_step(&paths, id, &a.plans_name, &a.preprocess)?;
            }
        }
        Command::PlanAndPreprocess(a) => {
            for id in ids(&a.ids)? {
                let t = Instant::now();
                fingerprint_step(&paths, id, &a.fingerprint)?;
                let plans_name = plan_step(&paths, id, &a.planner)?;
                if !a.no_pp {
                    preprocess_step(&paths, id, &plans_name, &a.preprocess)?;
                }
                tracing::info!(
                    "dataset {id:03}: done in {:.1} s",
                    t.elapsed().as_secs_f64()
                );
            }
        }
    }
    Ok(())
}

fn cmd_export_model_to_zip(paths: &NnUnetPaths, a: cli::ExportZipArgs) -> Result<()> {
    let name = datasets::dataset_name_from_arg(paths, &a.dataset)?;
    let req = trainer::sharing::ExportRequest {
        results: paths.results_dir(&name)?,
        configurations: a.configurations,
        trainer: a.trainer,
        plans: a.plans,
        folds: a.folds,
        checkpoints: a.checkpoints,
        strict: !a.not_strict,
        export_crossval_predictions: a.exp_cv_preds,
        output: a.output.clone(),
    };
    let s = trainer::sharing::export_model_to_zip(&req)?;
    println!(
        "{}: {} ({} files, {:.1} MB) -> {}",
        name,
        s.configurations.join(", "),
        s.files,
        s.bytes as f64 / 1e6,
        a.output.display()
    );
    Ok(())
}

fn cmd_install_pretrained_model_from_zip(
    paths: &NnUnetPaths,
    a: cli::InstallZipArgs,
) -> Result<()> {
    let installed = trainer::sharing::install_model_from_zip(&a.zip, paths.results_root()?)?;
    print_installed(&installed);
    Ok(())
}

fn cmd_download_pretrained_model_by_url(paths: &NnUnetPaths, a: cli::DownloadArgs) -> Result<()> {
    let bar = download_bar();
    let progress = |done: u64, total: Option<u64>| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    };
    let req = trainer::sharing::DownloadRequest {
        url: &a.url,
        sha256: a.sha256.as_deref(),
        progress: &progress,
    };
    let installed = trainer::sharing::download_and_install(&req, paths.results_root()?)?;
    bar.finish_and_clear();
    print_installed(&installed);
    Ok(())
}

fn cmd_convert_msd_dataset(paths: &NnUnetPaths, a: cli::ConvertMsdArgs) -> Result<()> {
    let c = datasets::convert::MsdConversion {
        source: a.input,
        overwrite_id: a.overwrite_id,
        num_processes: a.num_processes,
    };
    let done = datasets::convert::convert_msd_dataset(&c, paths)?;
    print_converted(&done);
    Ok(())
}

fn cmd_convert_old_nnunet_dataset(paths: &NnUnetPaths, a: cli::ConvertOldArgs) -> Result<()> {
    let done = datasets::convert::convert_old_nnunet_dataset(
        &a.input_folder,
        &a.output_dataset_name,
        paths,
    )?;
    print_converted(&done);
    Ok(())
}

fn cmd_move_plans_between_datasets(paths: &NnUnetPaths, a: cli::MovePlansArgs) -> Result<()> {
    let req = planner::move_plans::MovePlans {
        source: a.source,
        target: a.target,
        source_plans: a.source_plans,
        target_plans: a.target_plans,
    };
    let out = planner::move_plans::move_plans_between_datasets(&req, paths)?;
    println!("plans written to {}", out.display());
    Ok(())
}

fn cmd_make_demo_dataset(paths: &NnUnetPaths, a: cli::DemoArgs) -> Result<()> {
    let raw = paths
        .raw
        .clone()
        .context("nnUNet_raw is not set: set the environment variable or pass --raw DIR")?;
    std::fs::create_dir_all(&raw)
        .with_context(|| format!("cannot create raw folder {}", raw.display()))?;
    let t = Instant::now();
    let written = datasets::demo::make_demo_datasets(&raw, a.seed)?;
    for f in &written {
        println!("wrote {}", f.display());
    }
    tracing::info!(
        "demo datasets written in {:.2} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn cmd_plot_overlay_pngs(paths: &NnUnetPaths, a: cli::OverlayArgs) -> Result<()> {
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let ds = open_raw(paths, id)?;
    let opts = datasets::overlay::OverlayOptions {
        slice: if a.slice == "most_foreground" {
            datasets::overlay::SliceChoice::MostForeground
        } else {
            datasets::overlay::SliceChoice::Middle
        },
        num_workers: a.num_processes.unwrap_or(0),
    };
    let files = datasets::overlay::plot_overlay_pngs(&ds, &a.output, &opts)?;
    println!(
        "{}: {} overlay PNGs in {}",
        ds.name,
        files.len(),
        a.output.display()
    );
    Ok(())
}

fn cmd_ensemble(a: cli::EnsembleArgs) -> Result<()> {
    // an unfinished input may lack even its dataset.json: name the real problem
    for input in &a.inputs {
        trainer::predict::outputs::ensure_complete(input)?;
    }
    let dj = PredictionDir::new(&a.inputs[0]).dataset_json();
    let ds = DatasetJson::load(&dj).with_context(|| {
        format!(
            "{} has no dataset.json (was it written by nnseg predict?)",
            a.inputs[0].display()
        )
    })?;
    let mut opts = trainer::evaluation::EnsembleOptions::from_dataset_json(&ds, a.np);
    opts.save_probabilities = a.save_npz;
    let n = trainer::evaluation::ensemble_folders(&a.inputs, &a.output, &opts)?;
    println!("ensembled {n} cases into {}", a.output.display());
    Ok(())
}

fn cmd_evaluate_folder(a: cli::EvaluateArgs) -> Result<()> {
    let ds = DatasetJson::load(&a.dataset_json)?;
    let mut opts = trainer::evaluation::EvaluateOptions::from_dataset_json(&ds, a.np);
    opts.output_file = a.output.clone();
    opts.chill = a.chill;
    let summary = trainer::evaluation::evaluate_folder(&a.reference, &a.prediction, &opts)?;
    print_summary(&summary);
    Ok(())
}

fn cmd_evaluate_simple(a: cli::EvaluateSimpleArgs) -> Result<()> {
    let opts = trainer::evaluation::SimpleEvaluateOptions {
        labels: a.labels.clone(),
        ignore_label: a.ignore_label,
        file_ending: a.file_ending.clone(),
        output_file: a.output.clone(),
        num_workers: a.np,
        chill: a.chill,
    };
    let summary = trainer::evaluation::evaluate_simple(&a.reference, &a.prediction, &opts)?;
    print_summary(&summary);
    Ok(())
}

fn cmd_determine_postprocessing(a: cli::DeterminePpArgs) -> Result<()> {
    let dj = a
        .dataset_json
        .clone()
        .unwrap_or_else(|| PredictionDir::new(&a.input).dataset_json());
    let ds = DatasetJson::load(&dj).with_context(|| {
        format!(
            "dataset.json for {} (pass -dataset_json)",
            a.input.display()
        )
    })?;
    let mut evaluate = trainer::evaluation::EvaluateOptions::from_dataset_json(&ds, a.np);
    // nnU-Net evaluates here with compute_metrics_on_folder's default chill=True: the
    // predictions of some folds are judged on their cases only
    evaluate.chill = true;
    let opts = trainer::evaluation::PostprocessOptions {
        evaluate,
        keep_postprocessed: !a.remove_postprocessed,
    };
    let pp = trainer::evaluation::determine_postprocessing(&a.input, &a.reference, &opts)?;
    println!(
        "{} postprocessing step(s) kept; written to {}",
        pp.steps.len(),
        a.input.join("postprocessing.json").display()
    );
    Ok(())
}

fn cmd_apply_postprocessing(a: cli::ApplyPpArgs) -> Result<()> {
    let dj = a
        .dataset_json
        .clone()
        .unwrap_or_else(|| PredictionDir::new(&a.input).dataset_json());
    let ds = DatasetJson::load(&dj)?;
    let n = trainer::evaluation::apply_postprocessing(
        &a.input,
        &a.output,
        &a.pp_file,
        &ds.file_ending,
        a.np,
    )?;
    let out = PredictionDir::new(&a.output);
    ds.save(&out.dataset_json())?;
    if let Some(p) = &a.plans_json {
        Plans::load(p)?.save(&out.plans_json())?;
    }
    println!("postprocessed {n} cases into {}", a.output.display());
    Ok(())
}

/// `nnseg doctor`: opens the device, runs the checks, prints the table or one JSON object;
/// returns the exit code (0 passed, 1 a check failed, 2 device or library unavailable).
fn doctor(a: &cli::DoctorArgs) -> i32 {
    use trainer::doctor::{render_text, run_doctor, DoctorOptions, DoctorReport};
    let report = match pick_device(&a.device) {
        Ok(device) => {
            let opts = DoctorOptions {
                networks: !a.no_networks,
                ..DoctorOptions::default()
            };
            run_doctor(&device, &opts)
        }
        Err(e) => DoctorReport::unavailable(&a.device, doctor_device_error(&a.device, &e)),
    };
    if a.json {
        match serde_json::to_string(&report) {
            Ok(s) => println!("{s}"),
            Err(e) => {
                eprintln!("error: cannot serialise the doctor report: {e}");
                return 1;
            }
        }
        if let Some(e) = &report.error {
            eprintln!("error: {e}");
        }
    } else if !report.device.available {
        // nothing ran: the one-line reason is the whole output
        eprintln!(
            "error: {}",
            report.error.as_deref().unwrap_or("device unavailable")
        );
    } else {
        // the text ends with the error line, if any
        print!("{}", render_text(&report));
    }
    report.exit_code()
}

/// A byte progress bar on stderr when it is a terminal.
fn download_bar() -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(0);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "download [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn print_installed(installed: &trainer::sharing::Installed) {
    println!("installed {} files", installed.files);
    for m in &installed.model_folders {
        println!("  {}", m.display());
    }
}

fn print_converted(done: &datasets::convert::Converted) {
    println!(
        "{}: {} training and {} test cases -> {}",
        done.dataset_name,
        done.training_cases,
        done.test_cases,
        done.folder.display()
    );
}

/// One line naming what is missing when `doctor` cannot open `requested`.
fn doctor_device_error(requested: &str, e: &anyhow::Error) -> String {
    let wants_cuda = requested.trim().to_ascii_lowercase().starts_with("cuda");
    if wants_cuda && !cfg!(feature = "cuda") {
        return format!(
            "device {requested} unavailable: this nnseg build has no CUDA support (built without \
             the `cuda` feature; build the CUDA binary with scripts/build_cuda.sh)"
        );
    }
    if wants_cuda {
        return format!(
            "device {requested} unavailable: no usable NVIDIA GPU or driver ({})",
            e.root_cause()
        );
    }
    format!("device {requested} unavailable: {}", error_chain(e))
}

/// `cpu`, `cuda` or `cuda:N`; the device is chosen here, never in the libraries.
fn pick_device(s: &str) -> Result<candle_core::Device> {
    let s = s.trim().to_ascii_lowercase();
    if s == "cpu" {
        return Ok(candle_core::Device::Cpu);
    }
    let ordinal = match s.as_str() {
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .with_context(|| format!("unknown device `{s}`: use cpu, cuda or cuda:N"))?,
    };
    candle_core::Device::new_cuda(ordinal).with_context(|| {
        format!(
            "cannot use device {s}: this nnseg build has no CUDA support or no GPU {ordinal} \
             (build with scripts/build_cuda.sh, or use -device cpu)"
        )
    })
}

fn exit_unless_zero(code: i32) {
    if code != 0 {
        std::process::exit(code);
    }
}

/// A stop flag set by SIGTERM, SIGINT and SIGUSR1 (Slurm's warning before the time limit);
/// a second SIGINT (Ctrl-C) exits at once.
fn stop_on_signals() -> Result<trainer::StopFlag> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let stop = trainer::StopFlag::new();
    signal_hook::flag::register_conditional_shutdown(SIGINT, 130, stop.shared())
        .context("cannot install the SIGINT handler")?;
    for sig in [SIGINT, SIGTERM, SIGUSR1] {
        signal_hook::flag::register(sig, stop.shared())
            .with_context(|| format!("cannot install the handler of signal {sig}"))?;
    }
    Ok(stop)
}

/// Returns the exit code: 0, or [`trainer::STOPPED_EXIT_CODE`] after a graceful stop.
fn train(paths: &NnUnetPaths, a: &cli::TrainArgs) -> Result<i32> {
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let pre = paths.preprocessed_dir(&name)?;
    let results = paths.results_root()?.to_path_buf();
    let fold: trainer::Fold = a
        .fold
        .parse()
        .map_err(|e| anyhow::anyhow!("fold `{}`: {e}", a.fold))?;
    let mut config = trainer::presets::get(&a.trainer)?;
    if let Some(seed) = a.seed {
        config.seed = seed;
    }
    if let Some(amp) = a.amp {
        config.amp = amp;
    }
    if let Some(n) = a.num_epochs {
        config.num_epochs = n;
    }
    if let Some(n) = a.num_iterations_per_epoch {
        config.num_iterations_per_epoch = n;
    }
    if let Some(n) = a.num_val_iterations_per_epoch {
        config.num_val_iterations_per_epoch = n;
    }
    config.growth = a.growth_options(config.growth);
    config.growth.validate()?;
    let device = pick_device(&a.device)?;
    let configuration = fit_preset(
        &pre,
        &a.plans,
        &a.configuration,
        (&a.trainer, &config),
        a.gpu_memory_target,
        true,
    )?
    .unwrap_or_else(|| a.configuration.clone());
    // -tr, -p and the configuration become the model folder's name: refuse unsafe ones
    ModelId::new(&a.trainer, &a.plans, &configuration)?;
    let mut req = trainer::TrainRequest::new(
        pre.path(),
        &results,
        &name,
        &configuration,
        fold,
        &a.trainer,
        config,
        device,
    );
    req.plans_name = a.plans.clone();
    req.continue_training = a.continue_training;
    req.validation_only = a.validation_only;
    req.export_npz = a.npz;
    req.pretrained_weights = a.pretrained_weights.clone();
    req.disable_checkpointing = a.disable_checkpointing;
    req.val_best = a.val_best;
    req.stop = stop_on_signals()?;
    let bar = EpochBar::default();
    req.progress = Some(bar.hook());
    let summary = trainer::train(&req);
    bar.clear();
    let summary = summary?;
    if let Some(stopped) = &summary.stopped {
        eprintln!("{name} {configuration} fold {}: {stopped}", a.fold);
        return Ok(trainer::STOPPED_EXIT_CODE);
    }
    tracing::info!(
        "{name} {} fold {}: {} epochs done ({} iterations this run, {:.3} s/iteration); final checkpoint {}",
        configuration,
        a.fold,
        summary.epochs_completed,
        summary.train_iterations,
        summary.mean_train_iteration_s,
        summary.final_checkpoint.display()
    );
    Ok(0)
}

/// `nnseg cross_validate`; returns the exit code (1: a job failed, 75: stopped).
fn cross_validate(paths: &NnUnetPaths, a: &cli::CrossValidateArgs) -> Result<i32> {
    use trainer::cluster::{self, slurm};
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let results = paths.results_dir(&name)?;
    if a.status {
        for s in slurm::status(&results)? {
            let state = s.slurm_state.as_deref().unwrap_or("-");
            println!(
                "{:<12} {:<11} {:<48} {}",
                s.slurm_id, state, s.name, s.results_state
            );
        }
        return Ok(0);
    }
    let pre = paths.preprocessed_dir(&name)?;
    let plans = Plans::load(&pre.plans_file(&a.plans))?;
    let (configurations, previous_stage) =
        cluster::configurations_from_plans(&plans, &a.configurations)?;
    let mut train_args = Vec::new();
    if a.npz {
        train_args.push("--npz".to_string());
    }
    for (flag, v) in [
        ("--num_epochs", a.num_epochs),
        ("--num_iterations_per_epoch", a.num_iterations_per_epoch),
        (
            "--num_val_iterations_per_epoch",
            a.num_val_iterations_per_epoch,
        ),
    ] {
        if let Some(v) = v {
            train_args.extend([flag.to_string(), v.to_string()]);
        }
    }
    let find_best = a.then.map(|_| {
        let mut extra = vec![];
        if a.disable_ensembling {
            extra.push("--disable_ensembling".to_string());
        }
        extra
    });
    let cv = cluster::CrossValidation {
        dataset: a.dataset.clone(),
        results: results.clone(),
        configurations,
        previous_stage,
        trainers: a.trainers.clone(),
        plans: a.plans.clone(),
        folds: a.folds.clone(),
        train_args,
        find_best,
        predict: a.predict.as_ref().map(|io| {
            (
                PathBuf::from(absolute(&io[0])),
                PathBuf::from(absolute(&io[1])),
            )
        }),
    };
    let plan = cluster::plan_jobs(&cv)?;
    println!(
        "{}: {} job(s) in {} level(s); {} training(s) already finished",
        name,
        plan.job_count(),
        plan.levels.len(),
        plan.finished.len()
    );
    let program = std::env::current_exe().context("cannot find the nnseg executable")?;
    let env: Vec<(String, String)> = [
        ("nnUNet_raw", &paths.raw),
        ("nnUNet_preprocessed", &paths.preprocessed),
        ("nnUNet_results", &paths.results),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|p| (k.to_string(), absolute(p))))
    .collect();
    match a.launcher {
        cli::Launcher::Slurm => {
            let opts = slurm::SlurmOptions {
                program,
                env,
                partition: a.partition.clone(),
                account: a.account.clone(),
                time: a.time.clone(),
                mem: a.mem.clone(),
                cpus_per_task: a.cpus_per_task,
                max_parallel: a.max_parallel,
                gpu: a.slurm_gpu,
                grace_s: a.grace,
            };
            let mut scripts = slurm::write_scripts(&plan, &results, &opts)?;
            let commands = slurm::submit(&mut scripts, &results, a.dry_run)?;
            for (s, c) in scripts.iter().zip(&commands) {
                let id = s.job_id.as_deref().unwrap_or("(dry run)");
                println!(
                    "level {}: {} job(s): {}  -> {id}",
                    s.level,
                    s.jobs.len(),
                    c.join(" ")
                );
            }
            Ok(0)
        }
        cli::Launcher::Local => run_local(&plan, &results, program, env, &a.gpus),
    }
}

fn absolute(p: &std::path::Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

fn run_local(
    plan: &trainer::cluster::JobPlan,
    results: &datasets::ResultsDir,
    program: PathBuf,
    env: Vec<(String, String)>,
    gpus: &[usize],
) -> Result<i32> {
    use trainer::cluster::local;
    let opts = local::LocalOptions {
        program,
        gpus: gpus.to_vec(),
        env,
        stop: stop_on_signals()?,
        poll: std::time::Duration::from_millis(500),
    };
    let tty = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut last = None;
    let report = local::run_local(plan, results, &opts, &mut |p| {
        if last != Some(*p) {
            if tty {
                eprint!("\r\x1b[2K[cross_validate] {p}");
            } else {
                eprintln!("[cross_validate] {p}");
            }
            last = Some(*p);
        }
    })?;
    if tty {
        eprintln!();
    }
    for j in &report.jobs {
        println!("{:<60} {:?}  (log: {})", j.name, j.outcome, j.log.display());
    }
    let failed = report.failed();
    if !failed.is_empty() {
        eprintln!("error: {} job(s) failed:", failed.len());
        for j in failed {
            eprintln!("  {} (log: {})", j.name, j.log.display());
        }
        return Ok(1);
    }
    if !report.stopped().is_empty() || !report.not_run().is_empty() {
        eprintln!("stopped: rerun the same command to continue");
        return Ok(trainer::STOPPED_EXIT_CODE);
    }
    Ok(0)
}

fn predict(paths: &NnUnetPaths, a: &cli::PredictArgs) -> Result<()> {
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let model_id = ModelId::new(&a.trainer, &a.plans, &a.configuration)?;
    let model = paths.results_dir(&name)?.model(&model_id);
    if !model.path().is_dir() {
        bail!(
            "no trained model at {} (train it with `nnseg train {id} {} FOLD -tr {} -p {}`)",
            model.path().display(),
            a.configuration,
            a.trainer,
            a.plans
        );
    }
    predict_with_model(&a.input, &a.output, model.path(), &a.options)
}

fn predict_from_modelfolder(a: &cli::PredictFromModelFolderArgs) -> Result<()> {
    if !a.model_folder.is_dir() {
        bail!("-m {}: no such model folder", a.model_folder.display());
    }
    predict_with_model(&a.input, &a.output, &a.model_folder, &a.options)
}

fn predict_with_model(
    input: &Path,
    output: &Path,
    model_folder: &Path,
    o: &cli::PredictOptions,
) -> Result<()> {
    let folds = o
        .folds
        .iter()
        .map(|f| {
            f.parse::<trainer::Fold>()
                .map_err(|e| anyhow::anyhow!("fold `{f}`: {e}"))
        })
        .collect::<Result<Vec<_>>>()?;
    let mut req = trainer::predict::PredictRequest::new(
        input,
        output,
        model_folder,
        folds,
        pick_device(&o.device)?,
    );
    req.checkpoint_name = o.checkpoint.clone();
    req.step_size = o.step_size;
    req.disable_tta = o.disable_tta;
    req.save_probabilities = o.save_probabilities;
    req.num_workers = o.npp.max(1);
    req.num_export_workers = o.nps.max(1);
    req.amp = o.amp;
    req.prev_stage_predictions = o.prev_stage_predictions.clone();
    req.batch_inputs = o.batch_tiles.map(|n| n as usize);
    req.accumulation = o.accumulate;
    if let Some(gb) = o.max_memory_gb.filter(|gb| !(gb.is_finite() && *gb > 0.0)) {
        bail!("--max_memory_gb {gb}: give a positive number of GB");
    }
    req.max_memory = o.max_memory_gb.map(|gb| (gb * 1e9) as u64);
    req.on_device = !o.not_on_device;
    req.part = trainer::predict::Part::new(o.part_id, o.num_parts)?;
    req.continue_prediction = o.continue_prediction;
    let t = Instant::now();
    let report = trainer::predict::predict_from_raw_folder(&req)?;
    tracing::info!(
        "predicted {} cases into {} in {:.1} s",
        report.outputs.len(),
        output.display(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn predict_best(paths: &NnUnetPaths, a: &cli::PredictBestArgs) -> Result<()> {
    use trainer::cluster::recommended::{predict_recommended, RecommendedPrediction};
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let n = predict_recommended(&RecommendedPrediction {
        results: paths.results_dir(&name)?,
        input: a.input.clone(),
        output: a.output.clone(),
        device: pick_device(&a.device)?,
        num_workers: a.npp,
    })?;
    println!(
        "predicted and postprocessed {n} cases into {}",
        a.output.display()
    );
    Ok(())
}

fn print_summary(summary: &trainer::evaluation::Summary) {
    for (k, m) in &summary.mean {
        println!("class {k}: Dice {:.4}  IoU {:.4}", m.dice, m.iou);
    }
    println!("foreground mean Dice: {:.4}", summary.foreground_mean.dice);
}

fn accumulate_crossval(paths: &NnUnetPaths, a: &cli::AccumulateArgs) -> Result<()> {
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let model_id = ModelId::new(&a.trainer, &a.plans, &a.configuration)?;
    let model = paths.results_dir(&name)?.model(&model_id);
    if !model.path().is_dir() {
        bail!("no trained model at {}", model.path().display());
    }
    let opts = trainer::evaluation::CrossvalOptions {
        model,
        folds: a.folds.clone(),
        output: a.output.clone(),
        reference_folder: paths.preprocessed_dir(&name)?.gt_segmentations(),
        num_workers: a.np,
    };
    let (merged, summary) = trainer::evaluation::accumulate_crossval_results(&opts)?;
    println!(
        "{} cases of folds {} merged into {}",
        summary.metric_per_case.len(),
        a.folds.join(" "),
        merged.display()
    );
    print_summary(&summary);
    Ok(())
}

fn find_best(paths: &NnUnetPaths, a: &cli::FindBestArgs) -> Result<()> {
    use trainer::evaluation::BestConfigOptions;
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let results = paths.results_dir(&name)?;
    let pre = paths.preprocessed_dir(&name)?;
    let models = trainer::evaluation::find_trained_models(
        &pre,
        &results,
        &a.trainers,
        &a.plans,
        &a.configurations,
    )?;
    let result = trainer::evaluation::find_best_configuration(&BestConfigOptions {
        dataset_name: name.clone(),
        results,
        models,
        folds: a.folds.clone(),
        allow_ensembling: !a.disable_ensembling,
        num_workers: a.np,
        dataset_json: DatasetJson::load(&pre.dataset_json())?,
        preprocessed: pre,
    })?;
    for m in &result.messages {
        tracing::info!("{m}");
    }
    for (model, _, dice) in &result.all_results {
        println!("{model}: foreground mean Dice {dice:.4}");
    }
    println!(
        "best: {} (Dice {:.4}, after postprocessing {:.4})\n\n{}",
        result.best, result.score_pre_pp, result.score_post_pp, result.instructions
    );
    Ok(())
}

/// For a trainer preset that swaps the network: fits it to the configuration under the GPU
/// memory budget (see `planner::fit::fit_into_plans`), prints the report and returns the
/// fitted configuration's name if it had to be fitted (`write`: also written into the plans).
fn fit_preset(
    pre: &PreprocessedDir,
    plans_name: &str,
    configuration: &str,
    (preset, config): (&str, &trainer::TrainerConfig),
    gpu_memory_target: Option<f64>,
    write: bool,
) -> Result<Option<String>> {
    if config.network_override.is_none() {
        return Ok(None);
    }
    let registry = architectures::registry::Registry::default();
    let resolve = |base: &plans::ArchitectureSpec| config.network_spec(base, &registry);
    let outcome = planner::fit::fit_into_plans(&planner::fit::FitIntoPlans {
        registry: &registry,
        dataset: pre,
        plans_name,
        configuration,
        network: planner::fit::PresetNetwork {
            name: preset,
            resolve: &resolve,
            kwargs: &config.network_kwargs,
            deep_supervision: config.enable_deep_supervision,
        },
        gpu_memory_target_gb: gpu_memory_target,
        write,
    })?;
    println!("{outcome}");
    Ok(outcome.fitted_name)
}

fn parse_stages(s: &str, what: &str) -> Result<Vec<Vec<usize>>> {
    s.split(';')
        .map(|st| {
            st.split(',')
                .map(|v| {
                    v.trim()
                        .parse::<usize>()
                        .with_context(|| format!("{what} `{s}`: `{v}` is not a number"))
                })
                .collect()
        })
        .collect()
}

fn bench_train(a: &cli::BenchTrainArgs) -> Result<()> {
    let mut o = trainer::bench::BenchTrainOptions::preset(&a.config).unwrap_or_else(|| {
        let mut o =
            trainer::bench::BenchTrainOptions::preset("3d_fullres").expect("built-in preset");
        o.config = a.config.clone();
        o
    });
    if let Some(p) = &a.patch {
        o.patch = p.clone();
    }
    if let Some(b) = a.batch_size {
        o.batch_size = b;
    }
    if let Some(f) = &a.features {
        o.features = f.clone();
    }
    if let Some(s) = &a.strides {
        o.strides = Some(parse_stages(s, "--strides")?);
    }
    if let Some(k) = &a.kernels {
        o.kernels = Some(parse_stages(k, "--kernels")?);
    }
    if let Some(tr) = &a.trainer {
        let cfg = trainer::presets::get(tr)?;
        if let Some(net) = cfg.network_override {
            o.network = Some((net, cfg.network_kwargs));
        }
    }
    o.in_channels = a.in_channels;
    o.num_classes = a.num_classes;
    o.iters = a.iters;
    o.warmup = a.warmup;
    o.amp = a.amp;
    let device = pick_device(&a.device)?;
    let r = trainer::bench::bench_train(&o, &device)
        .with_context(|| format!("bench_train {}", a.config))?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "{} ({}) on {}, {}: patch {:?} batch {} features {:?}, {} params: {:.3} s/step (median of {}; min {:.3}; fwd {:.3}, bwd {:.3}, clip+step {:.3}), loss {:.4}{}",
            r.config, r.network, r.device, r.precision, r.patch, r.batch_size, r.features, r.params,
            r.step_s_median, r.iters, r.step_s_min, r.fwd_s, r.bwd_s, r.opt_s, r.loss,
            r.peak_gpu_memory_bytes
                .map(|b| format!(", peak GPU memory {:.2} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn show_network(paths: &NnUnetPaths, a: &cli::ShowNetworkArgs) -> Result<()> {
    let id = datasets::parse_dataset_id(&a.dataset)?;
    let name = datasets::dataset_name_from_id(paths, id)?;
    let pre = paths.preprocessed_dir(&name)?;
    let (plans, cfg) = Plans::load_configuration(&pre.plans_file(&a.plans), &a.configuration)?;
    let ds = DatasetJson::load(&pre.dataset_json())?;
    let patch = a.patch.clone().unwrap_or_else(|| cfg.patch_size.clone());
    let mut spec = cfg.architecture.clone();
    let registry = architectures::registry::Registry::default();
    let mut deep_supervision = true;
    if let Some(tr) = &a.trainer {
        let config = trainer::presets::get(tr)?;
        deep_supervision = config.enable_deep_supervision;
        spec = config.network_spec(&cfg.architecture, &registry)?;
        fit_preset(
            &pre,
            &a.plans,
            &a.configuration,
            (tr, &config),
            a.gpu_memory_target,
            false,
        )?;
    }
    let io = architectures::network::NetworkIo::for_configuration(&cfg, &ds, deep_supervision);
    let summary = architectures::summary::network_summary_with(
        &registry,
        &spec,
        &io,
        &patch,
        cfg.batch_size,
    )?;
    println!(
        "{} / {} / {}: {}",
        plans.dataset_name, plans.plans_name, a.configuration, summary.network_class_name
    );
    println!("{}", summary.table);
    Ok(())
}

fn ids(ids: &DatasetIds) -> Result<Vec<u32>> {
    let all = ids.all();
    if all.is_empty() {
        bail!("no dataset id given (e.g. `nnseg plan_and_preprocess 990` or `-d 990`)");
    }
    all.iter()
        .map(|s| Ok(datasets::parse_dataset_id(s)?))
        .collect()
}

fn open_raw(paths: &NnUnetPaths, id: u32) -> Result<RawDataset> {
    let folder = paths.raw_dataset_folder(id)?;
    Ok(RawDataset::open(&folder)?)
}

/// Extracts (or reuses) the fingerprint and copies dataset.json next to it.
fn fingerprint_step(paths: &NnUnetPaths, id: u32, opts: &FingerprintOpts) -> Result<()> {
    let ds = open_raw(paths, id)?;
    let out = paths.preprocessed_dir(&ds.name)?;
    std::fs::create_dir_all(out.path())
        .with_context(|| format!("cannot create preprocessed folder {}", out.path().display()))?;
    if opts.verify_dataset_integrity {
        let t = Instant::now();
        let report = datasets::verify::verify_dataset_integrity(&ds, opts.npfp)?;
        for w in &report.warnings {
            tracing::warn!("{w}");
        }
        tracing::info!(
            "{}: dataset integrity verified ({} cases, {:.1} s)",
            ds.name,
            ds.cases.len(),
            t.elapsed().as_secs_f64()
        );
    }
    ds.json.save(&out.dataset_json())?;
    let fp_path = out.fingerprint();
    if fp_path.exists() && !opts.clean {
        // Validate the existing file so a corrupt one is reported now, not at planning.
        Fingerprint::load(&fp_path)?;
        tracing::info!(
            "{}: using existing fingerprint {} (--clean to recompute)",
            ds.name,
            fp_path.display()
        );
        return Ok(());
    }
    let t = Instant::now();
    let (bar, hook) = progress_bar(ds.cases.len(), &format!("{} fingerprint", ds.name));
    let fp = preprocessing::fingerprint::extract_fingerprint_with_progress(&ds, opts.npfp, &hook);
    bar.finish_and_clear();
    let fp = fp?;
    fp.save(&fp_path)?;
    tracing::info!(
        "{}: fingerprint of {} cases in {:.2} s -> {}",
        ds.name,
        ds.cases.len(),
        t.elapsed().as_secs_f64(),
        fp_path.display()
    );
    Ok(())
}

fn planner_options(opts: &PlannerOpts) -> Result<planner::PlannerOptions> {
    let kind = planner::PlannerKind::from_name(&opts.pl).with_context(|| {
        let known: Vec<&str> = planner::PlannerKind::ALL
            .iter()
            .map(|k| k.cli_name())
            .collect();
        format!(
            "unknown planner `-pl {}`; known planners: {}",
            opts.pl,
            known.join(", ")
        )
    })?;
    Ok(planner::PlannerOptions {
        kind,
        gpu_memory_target_gb: opts.gpu_memory_target,
        overwrite_target_spacing: opts.overwrite_target_spacing.clone(),
        overwrite_plans_name: opts.overwrite_plans_name.clone(),
    })
}

/// Plans from the stored fingerprint; returns the plans identifier written.
fn plan_step(paths: &NnUnetPaths, id: u32, opts: &PlannerOpts) -> Result<String> {
    let name = datasets::dataset_name_from_id(paths, id)?;
    let pre = paths.preprocessed_dir(&name)?;
    let fp_path = pre.fingerprint();
    if !fp_path.exists() {
        bail!(
            "{} not found: run `nnseg extract_fingerprint {id}` first",
            fp_path.display()
        );
    }
    let fp = Fingerprint::load(&fp_path)?;
    let dj_path = pre.dataset_json();
    let ds_json = if dj_path.exists() {
        DatasetJson::load(&dj_path)?
    } else {
        open_raw(paths, id)?.json
    };
    let plans = planner::plan_experiment(&name, &ds_json, &fp, &planner_options(opts)?)?;
    let out = pre.plans_file(&plans.plans_name);
    planner::save_plans_merging(&plans, &out)?;
    for cfg_name in plans.configuration_names() {
        let c = plans.configuration(&cfg_name)?;
        tracing::info!(
            "{name} {cfg_name}: spacing {:?}, patch {:?}, batch {}, {} stages",
            c.spacing,
            c.patch_size,
            c.batch_size,
            c.architecture
                .arch_kwargs
                .get("n_stages")
                .and_then(|v| v.as_u64())
                .unwrap_or(0)
        );
    }
    tracing::info!("{name}: plans written to {}", out.display());
    Ok(plans.plans_name.clone())
}

fn preprocess_step(
    paths: &NnUnetPaths,
    id: u32,
    plans_name: &str,
    opts: &PreprocessOpts,
) -> Result<()> {
    let ds = open_raw(paths, id)?;
    let pre = paths.preprocessed_dir(&ds.name)?;
    let plans_path = pre.plans_file(plans_name);
    let plans = Plans::load(&plans_path)?;
    if !opts.np.is_empty() && opts.np.len() != 1 && opts.np.len() != opts.configurations.len() {
        bail!(
            "-np takes one number or one per configuration ({} configurations: {:?}), got {:?}",
            opts.configurations.len(),
            opts.configurations,
            opts.np
        );
    }
    let available = plans.configuration_names();
    for (i, cfg) in opts.configurations.iter().enumerate() {
        if !available.contains(cfg) {
            tracing::info!(
                "{}: configuration {cfg} is not in {} (available: {}), skipping",
                ds.name,
                plans_path.display(),
                available.join(", ")
            );
            continue;
        }
        let np = match opts.np.len() {
            0 => default_np(cfg),
            1 => opts.np[0],
            _ => opts.np[i],
        };
        let t = Instant::now();
        let (bar, hook) = progress_bar(ds.cases.len(), &format!("{} {cfg}", ds.name));
        let report = preprocessing::preprocessor::preprocess_dataset(
            &ds,
            &plans,
            cfg,
            &pre,
            &preprocessing::preprocessor::PreprocessOptions {
                num_workers: np,
                verbose: false,
                progress: Some(hook),
                incremental: opts.incremental,
            },
        );
        bar.finish_and_clear();
        let report = report?;
        let secs = t.elapsed().as_secs_f64();
        tracing::info!(
            "{} {cfg}: preprocessed {} cases with {np} workers in {secs:.2} s ({:.3} s/case)",
            ds.name,
            report.cases.len(),
            secs / report.cases.len().max(1) as f64
        );
        if opts.incremental {
            tracing::info!(
                "{} {cfg}: --incremental: {} unchanged cases reused",
                ds.name,
                report.reused.len()
            );
        }
    }
    preprocessing::preprocessor::copy_gt_segmentations(&ds, &pre)?;
    Ok(())
}

/// A progress bar on stderr (hidden when stderr is not a terminal) and the hook that
/// advances it from worker threads.
fn progress_bar(len: usize, msg: &str) -> (indicatif::ProgressBar, preprocessing::ProgressHook) {
    use std::io::IsTerminal;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(len as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:30}] {pos}/{len} cases, {elapsed} elapsed, eta {eta}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(msg.to_string());
    let b = bar.clone();
    (bar, preprocessing::ProgressHook::new(move |_| b.inc(1)))
}

/// A per-epoch training progress bar on stderr (only when stderr is a terminal): iterations,
/// loss, seconds per iteration and the fold's ETA. The log lines go to stdout and the log file
/// between the bars, as in nnU-Net.
#[derive(Clone, Default)]
struct EpochBar(std::sync::Arc<std::sync::Mutex<Option<indicatif::ProgressBar>>>);

impl EpochBar {
    fn hook(&self) -> trainer::train::ProgressHook {
        use std::io::IsTerminal;
        let this = self.clone();
        let visible = std::io::stderr().is_terminal();
        trainer::train::ProgressHook::new(move |e| {
            if visible {
                this.update(e)
            }
        })
    }

    fn update(&self, e: &trainer::TrainProgress) {
        use trainer::TrainProgress as P;
        let Ok(mut slot) = self.0.lock() else { return };
        match *e {
            P::EpochStart {
                epoch,
                num_epochs,
                iterations,
            } => {
                let bar = indicatif::ProgressBar::new(iterations as u64);
                if let Ok(style) = indicatif::ProgressStyle::with_template(
                    "{prefix} [{wide_bar}] {pos}/{len} it | {msg}",
                ) {
                    bar.set_style(style.progress_chars("=> "));
                }
                bar.set_prefix(format!("epoch {}/{num_epochs}", epoch + 1));
                *slot = Some(bar);
            }
            P::Iteration(it) => {
                if let Some(bar) = slot.as_ref() {
                    bar.set_message(format!(
                        "loss {:.4} | {:.2} s/it | fold ETA {}",
                        it.loss,
                        it.seconds_per_iteration,
                        clock(it.fold_eta_s)
                    ));
                    bar.set_position(it.done as u64);
                }
            }
            P::Validation { iterations, .. } => {
                if let Some(bar) = slot.as_ref() {
                    bar.set_message(format!("validating ({iterations} it)"));
                }
            }
            P::EpochEnd { .. } => {
                if let Some(bar) = slot.take() {
                    bar.finish_and_clear();
                }
            }
        }
    }

    fn clear(&self) {
        if let Some(bar) = self.0.lock().ok().and_then(|mut s| s.take()) {
            bar.finish_and_clear();
        }
    }
}

/// `h:mm:ss` (or `m:ss` under an hour) for a number of seconds.
fn clock(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (h, m, s) = (s / 3600, s / 60 % 60, s % 60);
    if h > 0 {
        format!("{h}:{m:02}:{s:02}")
    } else {
        format!("{m}:{s:02}")
    }
}

/// nnU-Net's default `-np` per configuration, capped at the machine's cores.
fn default_np(cfg: &str) -> usize {
    let n = match cfg {
        "2d" | "3d_lowres" => 8,
        _ => 4,
    };
    let cores = std::thread::available_parallelism()
        .map(|c| c.get())
        .unwrap_or(1);
    n.min(cores)
}
