//! The deterministic simulation of the sagas, run over many seeds (see
//! `redpacket_saga_worker::simulation`).
//!
//! `RP_SIM_SEEDS` sets how many seeds run (default [`DEFAULT_SEEDS`], sized for CI);
//! `RP_SIM_FIRST_SEED` where they start; `RP_SIM_SEED` runs that one seed alone and prints its
//! whole trace, which replays a failure step for step.

use redpacket_saga_worker::simulation::{Options, run_seed, run_seeds};

/// Seeds a CI run covers: about 100 s on the two-core CI machine, 150 s when it is busy.
const DEFAULT_SEEDS: u64 = 1500;
/// Trace lines shown with a failure in a run of many seeds.
const TRACE_TAIL: usize = 80;
/// Threads the seeds share: the CI machine has two cores.
const THREADS: usize = 2;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().map(|value| {
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name} must be a number, not `{value}`"))
    })
}

#[test]
fn simulation() {
    let options = Options::default();
    if let Some(seed) = env_u64("RP_SIM_SEED") {
        match run_seed(seed, &options) {
            Ok(report) => {
                for line in &report.trace {
                    println!("{line}");
                }
                println!("seed {seed}: {} steps, every invariant held", report.steps);
            }
            Err(failure) => panic!("{}", failure.describe(usize::MAX)),
        }
        return;
    }
    let first = env_u64("RP_SIM_FIRST_SEED").unwrap_or(0);
    let seeds = env_u64("RP_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    match run_seeds(first..first + seeds, THREADS, &options) {
        Ok(summary) => println!(
            "{} seeds from {first}: {} steps in {:.1?}, every invariant held",
            summary.seeds, summary.steps, summary.elapsed
        ),
        Err(failure) => panic!("{}", failure.describe(TRACE_TAIL)),
    }
}

#[test]
fn simulation_replays_a_seed_step_for_step() {
    let options = Options::default();
    for seed in [3, 17, 101, 4242, 90_001] {
        let first = run_seed(seed, &options).map_err(|f| f.describe(TRACE_TAIL));
        let second = run_seed(seed, &options).map_err(|f| f.describe(TRACE_TAIL));
        let (first, second) = (first.unwrap(), second.unwrap());
        assert!(
            first.steps > 50,
            "seed {seed} ran only {} steps",
            first.steps
        );
        assert_eq!(
            first.trace, second.trace,
            "seed {seed} ran differently twice"
        );
    }
}

/// Seeds within which the planted bug must be found.
const PLANTED_BUG_SEEDS: u64 = 300;

#[test]
fn simulation_finds_a_planted_unfenced_write() {
    let options = Options {
        planted_unfenced_writes: true,
        ..Options::default()
    };
    let failure = (0..PLANTED_BUG_SEEDS)
        .find_map(|seed| run_seed(seed, &options).err())
        .unwrap_or_else(|| {
            panic!("{PLANTED_BUG_SEEDS} seeds did not catch saga rows written without their fence")
        });
    assert!(
        failure.violation.contains("stale fence"),
        "the planted bug was caught as something else:\n{}",
        failure.describe(40)
    );
    println!("{}", failure.describe(20));
}
