//! `loadtest <scenario> --host URL ...`: drives a running red-packet system through its public
//! gateway (seckill, browse, mixed, soak), then waits for the saga worker to drain and verifies
//! the system's invariants. Exit status: 0 when every check passed, 2 when one failed, 3 when
//! none failed but some reads of the verification gave up after the retry bound (the system
//! kept answering 429/503/504), 1 when the run itself failed. See `loadtest --help` and
//! `loadtest <scenario> --help`.

use std::process::ExitCode;

use clap::Parser;
use loadtest::harness::{self, cli::Cli, verify::Outcome};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    redpacket_common::telemetry::install_crypto_provider();
    match harness::run(cli).await {
        Ok(Outcome::Pass) => ExitCode::SUCCESS,
        Ok(Outcome::Fail) => ExitCode::from(2),
        Ok(Outcome::Incomplete) => ExitCode::from(3),
        Err(err) => {
            eprintln!("loadtest: {err:#}");
            ExitCode::from(1)
        }
    }
}
