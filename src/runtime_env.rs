//! Process-wide runtime options set before anything starts (unix). Shared by the binary and
//! the benchmarks (`benches/conv.rs` includes this file), so both run with the same settings.

/// Process-wide runtime options the binary sets before anything starts, by re-executing itself
/// once with them in the environment (both libraries read them when they initialise, mimalloc
/// even before `main`). A value the user set explicitly is respected.
///
/// - `MIMALLOC_PURGE_DELAY=-1`: mimalloc returns freed memory to the OS after a delay
///   ("purging"); a training step frees and reallocates the same large buffers every iteration,
///   so the kernel zeroes fresh pages again and again (18% of a step in `perf`). With purging off
///   a 2D demo training step is ~20% faster at the same peak RSS.
/// - `CANDLE_NUM_THREADS=1`: the heavy ops (convolutions, norms, activations, losses) are ours
///   and run on rayon's pool; Candle's own element-wise ops (gradient accumulation adds, casts)
///   run on a second, spin-waiting thread pool that competes with rayon for the same cores. On
///   2 cores its barrier spin was 14-37% of a 2D training step; single-threaded, those
///   memory-bound ops cost less than the synchronisation.
const RUNTIME_ENV: [(&str, &str); 2] =
    [("MIMALLOC_PURGE_DELAY", "-1"), ("CANDLE_NUM_THREADS", "1")];

pub fn reexec_with_runtime_options() {
    use std::os::unix::process::CommandExt;
    let missing: Vec<(&str, &str)> = RUNTIME_ENV
        .into_iter()
        .filter(|(k, _)| std::env::var_os(k).is_none())
        .collect();
    if missing.is_empty() {
        return;
    }
    if let Ok(exe) = std::env::current_exe() {
        let err = std::process::Command::new(exe)
            .args(std::env::args_os().skip(1))
            .envs(missing.iter().copied())
            .exec();
        // exec only returns on failure: carry on in this process with the defaults
        eprintln!("note: could not re-execute with {missing:?} ({err}); continuing");
    }
}
