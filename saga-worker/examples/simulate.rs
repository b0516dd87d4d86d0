//! Runs the deterministic simulation of the sagas over many seeds, or replays one.
//!
//! ```text
//! cargo run --release -p redpacket-saga-worker --example simulate -- --seeds 100000
//! cargo run -p redpacket-saga-worker --example simulate -- --seed 1234     # its whole trace
//! ```
//!
//! Options: `--seeds N` (default 1000), `--from S` (the first seed, default 0), `--threads T`
//! (default: the cores), `--seed S` (one seed, with its trace), `--planted` (the saga store
//! with the planted unfenced write, to see the simulation catch it).

use std::process::ExitCode;

use redpacket_saga_worker::simulation::{Options, run_seed, run_seeds};

fn main() -> ExitCode {
    let mut seeds = 1000;
    let mut from = 0;
    let mut one = None;
    let mut threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut number = |name: &str| -> u64 {
            let value = args.next().unwrap_or_default();
            value.parse().unwrap_or_else(|_| {
                eprintln!("{name} takes a number, not `{value}`");
                std::process::exit(2)
            })
        };
        match arg.as_str() {
            "--seeds" => seeds = number("--seeds"),
            "--from" => from = number("--from"),
            "--seed" => one = Some(number("--seed")),
            "--threads" => threads = usize::try_from(number("--threads")).unwrap_or(1),
            "--planted" => options.planted_unfenced_writes = true,
            other => {
                eprintln!(
                    "unknown argument `{other}`; use --seeds N, --from S, --threads T, --seed S, --planted"
                );
                return ExitCode::from(2);
            }
        }
    }
    if let Some(seed) = one {
        return match run_seed(seed, &options) {
            Ok(report) => {
                for line in &report.trace {
                    println!("{line}");
                }
                println!("seed {seed}: {} steps, every invariant held", report.steps);
                ExitCode::SUCCESS
            }
            Err(failure) => {
                println!("{}", failure.describe(usize::MAX));
                ExitCode::FAILURE
            }
        };
    }
    match run_seeds(from..from.saturating_add(seeds), threads, &options) {
        Ok(summary) => {
            println!(
                "{} seeds from {from}: {} steps in {:.1?} on {threads} threads, every invariant held",
                summary.seeds, summary.steps, summary.elapsed
            );
            ExitCode::SUCCESS
        }
        Err(failure) => {
            println!("{}", failure.describe(80));
            ExitCode::FAILURE
        }
    }
}
