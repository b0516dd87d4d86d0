//! A scenario's faults: a seed picks their moments and kinds, so a failing run can be replayed
//! with the same schedule.

use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::proxy::Fault;
use crate::system::{System, restart_rabbitmq};

/// A process of the system.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Wallet,
    Campaign(usize),
    Saga(usize),
    Gateway,
}

/// One of the proxies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    GatewayToCampaign,
    SagaToWallet,
    SagaToCampaign,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// SIGKILL, then start it again after `down_for`.
    Kill {
        target: Target,
        down_for: Duration,
    },
    /// SIGKILL and leave it dead: its replica carries on.
    KillForGood(Target),
    RestartRabbitmq {
        down_for: Duration,
    },
    /// SIGKILL Redis, start it again from its append-only file after `down_for`.
    RestartRedis {
        down_for: Duration,
    },
    /// Stop PostgreSQL at once, start it again after `down_for`.
    StopPostgres {
        down_for: Duration,
    },
    /// Set a fault on a link for a while.
    Proxy {
        link: Link,
        fault: Fault,
        lasts: Duration,
    },
}

/// An action at its moment, counted from the campaign's opening.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub at: Duration,
    pub action: Action,
}

/// How long a proxy fault window waits past its time for a quiet link to carry something.
const QUIET_LINK_WAIT: Duration = Duration::from_millis(1_500);

/// The seed of a run: `RP_FAULT_SEED`, else a fresh one.
pub fn seed() -> u64 {
    match std::env::var("RP_FAULT_SEED") {
        Ok(text) => text.trim().parse().expect("RP_FAULT_SEED is a number"),
        Err(_) => rand::rng().random(),
    }
}

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// A moment in `[from_ms, to_ms)` milliseconds.
pub fn moment(rng: &mut ChaCha8Rng, from_ms: u64, to_ms: u64) -> Duration {
    Duration::from_millis(rng.random_range(from_ms..to_ms))
}

/// `count` kills of `target`, one in each equal part of `[from_ms, to_ms)` (in its first
/// half, so the restart ends inside it), each down for 0.2–2 s.
pub fn kills(
    rng: &mut ChaCha8Rng,
    target: Target,
    count: u64,
    from_ms: u64,
    to_ms: u64,
) -> Vec<Timed> {
    let span = (to_ms - from_ms) / count;
    (0..count)
        .map(|n| {
            let start = from_ms + span * n;
            Timed {
                at: moment(rng, start, start + span / 2),
                action: Action::Kill {
                    target,
                    down_for: moment(rng, 200, 2_000),
                },
            }
        })
        .collect()
}

/// What the schedule did, for the report.
#[derive(Debug, Default)]
pub struct Done {
    pub faults: u64,
    /// When the last fault ended.
    pub last_fault_end: Option<Instant>,
    pub log: Vec<String>,
    /// Each kind of proxy fault: its windows, and what it did in all of them. A kind that did
    /// nothing in two or more windows means the scenario tested less than it says (one window
    /// may fall on a link that is quiet by chance, behind an open breaker say).
    pub proxy_effects: std::collections::BTreeMap<&'static str, (u64, u64)>,
}

/// Runs the actions in order of their moments, from `origin`.
pub async fn run(system: &mut System, origin: Instant, mut plan: Vec<Timed>) -> Done {
    plan.sort_by_key(|timed| timed.at);
    let mut done = Done::default();
    for timed in plan {
        let due = origin + timed.at;
        tokio::time::sleep_until(due.into()).await;
        let started = origin.elapsed();
        match timed.action {
            Action::Kill { target, down_for } => {
                service(system, target).kill().await;
                tokio::time::sleep(down_for).await;
                service(system, target).start().await;
                done.faults += 1;
            }
            Action::KillForGood(target) => {
                service(system, target).kill().await;
                done.faults += 1;
            }
            Action::RestartRabbitmq { down_for } => {
                restart_rabbitmq(down_for).await.expect("RabbitMQ restarts");
                done.faults += 1;
            }
            Action::RestartRedis { down_for } => {
                system.redis.kill();
                tokio::time::sleep(down_for).await;
                system.redis.start_again().await;
                done.faults += 1;
            }
            Action::StopPostgres { down_for } => {
                system.postgres.stop_now().await;
                tokio::time::sleep(down_for).await;
                system.postgres.start_again().await;
                done.faults += 1;
            }
            Action::Proxy { link, fault, lasts } => {
                let proxy = match link {
                    Link::GatewayToCampaign => &system.gateway_to_campaign,
                    Link::SagaToWallet => &system.saga_to_wallet,
                    Link::SagaToCampaign => &system.saga_to_campaign,
                };
                let before = proxy.injected();
                proxy.set(fault);
                tokio::time::sleep(lasts).await;
                // A link can be quiet for a moment (the gateway's breaker open after the last
                // fault, the saga worker backing off): the window stays until its fault acted,
                // for a bounded while.
                let extended = Instant::now();
                while proxy.injected() == before && extended.elapsed() < QUIET_LINK_WAIT {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                proxy.set(Fault::Pass);
                let (windows, effect) = done.proxy_effects.entry(fault.kind()).or_default();
                *windows += 1;
                *effect += proxy.injected() - before;
            }
        }
        done.log.push(format!(
            "{:>6.2}s–{:>6.2}s {:?}",
            started.as_secs_f64(),
            origin.elapsed().as_secs_f64(),
            timed.action
        ));
        done.last_fault_end = Some(Instant::now());
    }
    done.faults += system.proxies().iter().map(|p| p.injected()).sum::<u64>();
    done
}

fn service(system: &mut System, target: Target) -> &mut crate::system::Service {
    match target {
        Target::Wallet => &mut system.wallet,
        Target::Campaign(n) => &mut system.campaigns[n],
        Target::Saga(n) => &mut system.sagas[n],
        Target::Gateway => &mut system.gateway,
    }
}
