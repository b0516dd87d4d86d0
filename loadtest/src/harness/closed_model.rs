//! The closed model, run by goose: `--users` goose users each repeat their scenario, sending
//! the next request when the last one answered.
//!
//! The harness turns its flags into goose arguments (goose's names: `--host`, `--users`,
//! `--hatch-rate`, `--run-time` or `--iterations`, `--report-file`, `--throttle-requests`),
//! appends whatever came after `--`, and lets goose parse them into its
//! `GooseConfiguration`. Its own defaults (no telnet or WebSocket controller: nothing listens
//! on 0.0.0.0) are set with `set_default`, so a flag after `--` still wins.

use std::sync::Arc;

use anyhow::Context;
use goose::config::GooseConfiguration;
use goose::prelude::*;
use gumdrop::Options;

use super::workload::{Ctx, Op, Transport, run_op};

/// A goose scenario of the run: its users repeat `op`.
#[derive(Debug, Clone, Copy)]
pub struct ScenarioSpec {
    pub name: &'static str,
    pub weight: usize,
    pub op: Op,
}

/// goose's arguments, in the order they were decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GooseArgs {
    pub host: String,
    pub users: usize,
    pub hatch_rate: String,
    /// `--run-time`, else `--iterations` (goose refuses both).
    pub run_time: Option<String>,
    pub iterations: Option<usize>,
    pub report_files: Vec<String>,
    pub throttle: Option<u64>,
    pub extra: Vec<String>,
}

impl GooseArgs {
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec![
            "--host".to_owned(),
            self.host.clone(),
            "--users".to_owned(),
            self.users.to_string(),
            "--hatch-rate".to_owned(),
            self.hatch_rate.clone(),
        ];
        if let Some(run_time) = &self.run_time {
            args.extend(["--run-time".to_owned(), run_time.clone()]);
        } else if let Some(iterations) = self.iterations {
            args.extend(["--iterations".to_owned(), iterations.to_string()]);
        }
        for file in &self.report_files {
            args.extend(["--report-file".to_owned(), file.clone()]);
        }
        if let Some(throttle) = self.throttle {
            args.extend(["--throttle-requests".to_owned(), throttle.to_string()]);
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// Parses the arguments as goose would; prints goose's help and exits on `-- --help`.
    pub fn configuration(&self) -> anyhow::Result<GooseConfiguration> {
        let args = self.to_args();
        let configuration = GooseConfiguration::parse_args_default(&args)
            .map_err(|err| anyhow::anyhow!("goose arguments {args:?}: {err}"))?;
        if configuration.help {
            println!("goose options (pass them after `--`):\n");
            println!("{}", GooseConfiguration::usage());
            std::process::exit(0);
        }
        Ok(configuration)
    }
}

/// Runs the scenarios with goose until the run time or the iterations are over.
pub async fn run_closed(
    ctx: Arc<Ctx>,
    args: &GooseArgs,
    scenarios: &[ScenarioSpec],
) -> anyhow::Result<GooseMetrics> {
    let configuration = args.configuration()?;
    let mut attack = *GooseAttack::initialize_with_config(configuration)?
        .set_default(GooseDefault::NoTelnet, true)?
        .set_default(GooseDefault::NoWebSocket, true)?;
    if args.iterations.is_none() {
        // Keep the ramp in goose's report too (the harness's own recorder always does).
        attack = *attack.set_default(GooseDefault::NoResetMetrics, true)?;
    }
    for spec in scenarios {
        let scenario = Scenario::new(spec.name)
            .set_weight(spec.weight)?
            .register_transaction(transaction(ctx.clone(), spec.op));
        attack = attack.register_scenario(scenario);
    }
    attack.execute().await.context("goose")
}

/// A goose transaction running one operation per call.
fn transaction(ctx: Arc<Ctx>, op: Op) -> Transaction {
    let function: TransactionFunction = Arc::new(move |user| {
        let ctx = ctx.clone();
        Box::pin(async move {
            run_op(&ctx, &mut Transport::Goose(user), op).await;
            Ok(())
        })
    });
    Transaction::new(function).set_name(op.name())
}

/// Iterations per goose user so that `users` users make `grabs` grabs between them.
pub fn iterations_for(grabs: u64, users: usize) -> usize {
    let users = u64::try_from(users.max(1)).unwrap_or(1);
    usize::try_from(grabs.div_ceil(users).max(1)).unwrap_or(usize::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> GooseArgs {
        GooseArgs {
            host: "http://127.0.0.1:8080".to_owned(),
            users: 10,
            hatch_rate: "10".to_owned(),
            run_time: None,
            iterations: Some(3),
            report_files: vec!["r.html".to_owned(), "r.md".to_owned()],
            throttle: None,
            extra: vec!["--no-granular-report".to_owned()],
        }
    }

    #[test]
    fn flags_become_a_goose_configuration() {
        let configuration = args().configuration().unwrap();
        assert_eq!(configuration.host, "http://127.0.0.1:8080");
        assert_eq!(configuration.users, Some(10));
        assert_eq!(configuration.hatch_rate.as_deref(), Some("10"));
        assert_eq!(configuration.iterations, 3);
        assert_eq!(configuration.report_file, vec!["r.html", "r.md"]);
        assert!(configuration.no_granular_report);

        let mut timed = args();
        timed.run_time = Some("30s".to_owned());
        timed.throttle = Some(500);
        let configuration = timed.configuration().unwrap();
        assert_eq!(configuration.run_time, "30s");
        assert_eq!(configuration.iterations, 0);
        assert_eq!(configuration.throttle_requests, 500);
    }

    #[test]
    fn unknown_goose_flags_are_refused() {
        let mut wrong = args();
        wrong.extra = vec!["--no-such-flag".to_owned()];
        assert!(wrong.configuration().is_err());
    }

    #[test]
    fn iterations_cover_every_grab() {
        assert_eq!(iterations_for(10_000, 64), 157);
        assert_eq!(iterations_for(64, 64), 1);
        assert_eq!(iterations_for(0, 64), 1);
        assert_eq!(iterations_for(5, 0), 5);
    }
}
