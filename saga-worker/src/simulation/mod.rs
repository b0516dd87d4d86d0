//! A deterministic simulation of the sagas: the production engine (`Engine::handle`,
//! `Engine::handle_grabs`, `worker::settle`, `sweeper::sweep_once`, the saga store on SQLite)
//! driven over simulated ports by a seeded scheduler.
//!
//! Every participant (a worker handling a delivery or a batch of them, a sweeper pass) is a
//! task that parks at each port call: the wallet, the campaign service, the bus and the lease
//! store. The scheduler waits until every live participant is parked, checks every invariant,
//! then picks with its seeded generator what happens next: which parked call proceeds and how
//! (it succeeds, fails first, takes effect and loses its answer, answers late, or its worker
//! crashes there), which message is delivered (in any order, again after a lost ack or a
//! crash, duplicated), a grab, a campaign's next lifecycle move, a sweep, the clock moving, a
//! lease expiring under its holder. Only one participant runs between two hooks, so one seed
//! gives the same steps every time, and the trace of steps replays a failure exactly.
//!
//! After `chaos_steps` the faults stop and every campaign is ended; the run must then drain:
//! every message settled, every saga done, every claim credited or compensated, every ended
//! campaign settled with exactly its total less what was credited.

mod model;
mod ports;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redpacket_common::ids::SnowflakeGenerator;
use redpacket_common::lease::LeaseManager;
use redpacket_common::messages::{Envelope, SagaEvent};
use sea_orm::{ConnectOptions, Database, DatabaseConnection, EntityTrait, QuerySelect};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use self::model::{Campaign, Campaigns, Claim, ClaimStatus, Status, Wallet, check_money};
use self::ports::{
    Fault, Leases, PARTICIPANT, ParticipantId, Queue, Shared, Sim, SimBus, SimCampaign, SimClock,
    SimLeases, SimWallet, World,
};
use crate::batcher::CreditBatcher;
use crate::clients::Transfer;
use crate::engine::{Engine, Outcome};
use crate::entity::{dead_letter, saga};
use crate::store::{SagaStore, state};
use crate::worker::{WorkerStats, settle};

/// A small, stable generator (SplitMix64): the same seed gives the same numbers on every
/// platform and every version of every dependency.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound` ≥ 1).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound.max(1)
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[usize::try_from(self.below(items.len() as u64)).unwrap_or(0)]
    }
}

/// How one seed runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Steps with faults before the drain.
    pub chaos_steps: usize,
    /// Steps the drain may take at most: past it the run failed to finish.
    pub drain_steps: usize,
    /// Run the saga store with the planted bug (row updates skip the fence check).
    pub planted_unfenced_writes: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            chaos_steps: 120,
            drain_steps: 4000,
            planted_unfenced_writes: false,
        }
    }
}

/// A seed that ran to the end with every invariant held.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub steps: usize,
    pub trace: Vec<String>,
}

/// A seed that broke an invariant (or could not finish).
#[derive(Debug, Clone)]
pub struct Failure {
    pub seed: u64,
    /// Whether it ran with the planted bug (its replay needs it too).
    pub planted_unfenced_writes: bool,
    pub step: usize,
    pub violation: String,
    pub trace: Vec<String>,
}

impl Failure {
    /// The failure, the command that replays it, and the last `tail` steps of its trace.
    pub fn describe(&self, tail: usize) -> String {
        let seed = self.seed;
        let replay = if self.planted_unfenced_writes {
            format!(
                "cargo run -p redpacket-saga-worker --example simulate -- --planted --seed {seed}"
            )
        } else {
            format!(
                "RP_SIM_SEED={seed} cargo nextest run -p redpacket-saga-worker -E 'test(=simulation)' --no-capture\n  \
                 cargo run -p redpacket-saga-worker --example simulate -- --seed {seed}"
            )
        };
        let mut text = format!(
            "simulation seed {seed} broke an invariant at step {}: {}\n\
             replay it step for step:\n  {replay}\n\
             trace (last {} of {} lines):\n",
            self.step,
            self.violation,
            tail.min(self.trace.len()),
            self.trace.len()
        );
        for line in &self.trace[self.trace.len().saturating_sub(tail)..] {
            let _ = writeln!(text, "  {line}");
        }
        text
    }
}

/// Runs one seed on a runtime of its own (one thread: one participant at a time).
pub fn run_seed(seed: u64, options: &Options) -> Result<Report, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap_or_else(|err| panic!("a current-thread runtime: {err}"));
    runtime.block_on(Simulation::run(seed, options.clone()))
}

/// What a run of many seeds did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub seeds: u64,
    pub steps: usize,
    pub elapsed: Duration,
}

/// Runs `seeds` (each on its own runtime and database) on `threads` threads; the failure of
/// the lowest failing seed, if any. Which seeds run where changes nothing: each seed is
/// deterministic on its own.
pub fn run_seeds(
    seeds: std::ops::Range<u64>,
    threads: usize,
    options: &Options,
) -> Result<Summary, Box<Failure>> {
    use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
    let started = std::time::Instant::now();
    let next = AtomicU64::new(seeds.start);
    let lowest_failure = AtomicU64::new(u64::MAX);
    let steps = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let seed = next.fetch_add(1, Ordering::SeqCst);
                    if seed >= seeds.end || seed > lowest_failure.load(Ordering::SeqCst) {
                        return;
                    }
                    match run_seed(seed, options) {
                        Ok(report) => {
                            steps.fetch_add(report.steps, Ordering::SeqCst);
                        }
                        Err(failure) => {
                            lowest_failure.fetch_min(seed, Ordering::SeqCst);
                            failures
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push(failure);
                        }
                    }
                }
            });
        }
    });
    let mut failures = failures.into_inner().unwrap_or_else(|e| e.into_inner());
    failures.sort_by_key(|failure| failure.seed);
    if let Some(failure) = failures.into_iter().next() {
        return Err(Box::new(failure));
    }
    Ok(Summary {
        seeds: seeds.end - seeds.start,
        steps: steps.into_inner(),
        elapsed: started.elapsed(),
    })
}

/// The simulated time at the start (epoch ms): any fixed value.
const START_MS: i64 = 1_780_000_000_000;
const LEASE_PREFIX: &str = "sim";
const CURRENCY: &str = "CNY";

/// A saga row as the checker compares it between steps.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RowView {
    state: String,
    step: String,
    reason: Option<String>,
    fence: i64,
}

struct Simulation {
    options: Options,
    sim: Sim,
    engine: Engine,
    bus: SimBus,
    ids: Arc<SnowflakeGenerator>,
    stats: Arc<WorkerStats>,
    tasks: BTreeMap<ParticipantId, JoinHandle<()>>,
    next_participant: ParticipantId,
    sweeper: Option<ParticipantId>,
    rows: BTreeMap<String, RowView>,
    trace: Vec<String>,
    step: usize,
    next_claim: u64,
    users: Vec<String>,
}

/// What the scheduler can do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Resume,
    Deliver,
    Grab,
    Lifecycle,
    Sweep,
    Clock,
    Steal,
    Redeliver,
}

/// The schema the migrations build, as SQL: migrated once per process, then replayed into
/// each seed's fresh in-memory database (the migrations themselves take longer than a seed).
static SCHEMA: tokio::sync::OnceCell<Vec<String>> = tokio::sync::OnceCell::const_new();

async fn memory_database() -> Result<DatabaseConnection, String> {
    let mut options = ConnectOptions::new("sqlite::memory:");
    // One connection that never closes: an in-memory database lives as long as it does.
    options
        .max_connections(1)
        .min_connections(1)
        .idle_timeout(Duration::from_secs(24 * 3600))
        .max_lifetime(Duration::from_secs(24 * 3600))
        .sqlx_logging(false);
    Database::connect(options)
        .await
        .map_err(|err| format!("sqlite: {err}"))
}

async fn migrated_schema() -> Result<Vec<String>, String> {
    use redpacket_migrations::{Migrator, MigratorTrait};
    use sea_orm::{ConnectionTrait, Statement};
    let db = memory_database().await?;
    Migrator::up(&db, None)
        .await
        .map_err(|err| format!("migrations: {err}"))?;
    let rows = db
        .query_all_raw(Statement::from_string(
            db.get_database_backend(),
            // Tables before their indexes, in the order they were made.
            "SELECT sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%' \
             ORDER BY CASE type WHEN 'table' THEN 0 ELSE 1 END, rowid",
        ))
        .await
        .map_err(|err| format!("reading the schema: {err}"))?;
    rows.iter()
        .map(|row| {
            row.try_get_by_index::<String>(0)
                .map_err(|err| err.to_string())
        })
        .collect()
}

async fn saga_database() -> Result<DatabaseConnection, String> {
    use sea_orm::ConnectionTrait;
    let schema = SCHEMA.get_or_try_init(migrated_schema).await?;
    let db = memory_database().await?;
    db.execute_unprepared(&schema.join(";\n"))
        .await
        .map_err(|err| format!("schema: {err}"))?;
    Ok(db)
}

impl Simulation {
    async fn run(seed: u64, options: Options) -> Result<Report, Failure> {
        let planted_unfenced_writes = options.planted_unfenced_writes;
        let fail = |violation: String| Failure {
            seed,
            planted_unfenced_writes,
            step: 0,
            violation,
            trace: Vec::new(),
        };
        let db = saga_database().await.map_err(fail)?;
        let clock = Arc::new(AtomicI64::new(START_MS));
        let sim = Sim(Arc::new(Shared {
            world: Mutex::new(World {
                rng: Rng::new(seed),
                parked: BTreeMap::new(),
                live: BTreeMap::new(),
                wallet: Wallet::default(),
                campaigns: Campaigns::default(),
                queue: Queue::default(),
                leases: Leases {
                    held: BTreeMap::new(),
                    fence: 1_000,
                    grants: BTreeMap::new(),
                },
                retry_base_ms: 200,
                log: Vec::new(),
            }),
            wake: Notify::new(),
            clock: clock.clone(),
        }));
        let mut store = SagaStore::with_clock(db, Arc::new(SimClock(clock)));
        if options.planted_unfenced_writes {
            store = store.with_planted_unfenced_writes();
        }
        let wallet: Arc<dyn crate::clients::WalletApi> = Arc::new(SimWallet(sim.clone()));
        let engine = Engine {
            store,
            campaign: Arc::new(SimCampaign(sim.clone())),
            batcher: CreditBatcher::inline(wallet.clone()),
            wallet,
            leases: LeaseManager::with_store(Arc::new(SimLeases(sim.clone()))),
            lease_prefix: LEASE_PREFIX.to_owned(),
            // Real time never expires a lease here (its watchdog would renew it on a real
            // timer); the scheduler expires leases on the simulated clock instead.
            lease_ttl: Duration::from_secs(3600),
            batch: 3,
            linger: Duration::from_millis(5),
            // Nothing here fails for good: a dead letter is a finding, not an expected end.
            retry_budget: Duration::from_millis(crate::MAX_RETRY_BUDGET_MS),
            wait_max: Duration::from_millis(crate::MAX_RETRY_BUDGET_MS),
        };
        let mut simulation = Simulation {
            options,
            bus: SimBus(sim.clone()),
            sim,
            engine,
            ids: Arc::new(SnowflakeGenerator::new(1).map_err(|err| fail(err.to_string()))?),
            stats: Arc::default(),
            tasks: BTreeMap::new(),
            next_participant: 0,
            sweeper: None,
            rows: BTreeMap::new(),
            trace: Vec::new(),
            step: 0,
            next_claim: 0,
            users: Vec::new(),
        };
        let result = simulation.drive().await;
        for task in simulation.tasks.values() {
            task.abort();
        }
        result.map_err(|violation| Failure {
            seed,
            planted_unfenced_writes,
            step: simulation.step,
            violation,
            trace: std::mem::take(&mut simulation.trace),
        })?;
        Ok(Report {
            seed,
            steps: simulation.step,
            trace: simulation.trace,
        })
    }

    fn now(&self) -> i64 {
        self.sim.now_ms()
    }

    fn note(&mut self, what: String) {
        let line = format!("{:>4} t+{:>7} {what}", self.step, self.now() - START_MS);
        self.trace.push(line);
    }

    /// The campaigns, merchants and users of this seed: 2 or 3 campaigns of 2 to 4 packets;
    /// a merchant may lack the money (its funding is refused), a user may hold an account in
    /// another currency (its credits are refused and compensated).
    fn scenario(&mut self) {
        let lines = self.sim.with(|world| {
            let mut lines = Vec::new();
            let rng = &mut world.rng;
            let users = 2 + rng.below(3);
            let foreign_user = rng.chance(35).then(|| rng.below(users));
            let mut user_names = Vec::new();
            for user in 0..users {
                let name = format!("u{user}");
                if foreign_user == Some(user) {
                    // Opened in USD beforehand (the model's ledger takes it as a fact): the
                    // campaigns' CNY credits to it are refused and compensated. A top-up from
                    // `external` would make `external` a USD account and refuse every merchant's.
                    world
                        .wallet
                        .accounts
                        .insert(format!("user:{name}"), ("USD".into(), 0));
                    lines.push(format!("user {name} holds an account in USD"));
                }
                user_names.push(name);
            }
            let campaigns = 2 + world.rng.below(2);
            for number in 1..=campaigns {
                let id = number.to_string();
                let merchant = format!("m{number}");
                let packets: Vec<i64> = (0..2 + world.rng.below(3))
                    .map(|_| 1 + world.rng.below(50) as i64)
                    .collect();
                let total: i64 = packets.iter().sum();
                let short = world.rng.chance(15);
                let topup = Transfer {
                    id: format!("topup:merchant:{merchant}"),
                    debit: "external".into(),
                    credit: format!("merchant:{merchant}"),
                    amount: if short { total - 1 } else { total },
                    currency: CURRENCY.into(),
                };
                if let Err(err) = world.wallet.apply(&topup) {
                    panic!("the scenario's top-up of {merchant} was refused: {err:?}");
                }
                lines.push(format!(
                    "campaign {id}: packets {packets:?}, merchant {merchant} holds {}",
                    topup.amount
                ));
                world.campaigns.campaigns.insert(
                    id.clone(),
                    Campaign {
                        id: id.clone(),
                        merchant: merchant.clone(),
                        currency: CURRENCY.into(),
                        pool: (0..u32::try_from(packets.len()).unwrap_or(0)).collect(),
                        packets,
                        status: Status::Funding,
                        amount_refunded: None,
                    },
                );
                let envelope = Envelope::new(
                    format!("event:created:{id}"),
                    Some(format!("req-create-{id}")),
                    SagaEvent::CampaignCreated {
                        campaign_id: id.clone(),
                        merchant_id: merchant,
                        currency: CURRENCY.into(),
                        total_amount: total,
                    },
                );
                world
                    .queue
                    .push(&envelope.message_id, envelope.to_bytes(), START_MS);
            }
            (lines, user_names)
        });
        self.users = lines.1;
        for line in lines.0 {
            self.note(line);
        }
    }

    async fn drive(&mut self) -> Result<(), String> {
        self.scenario();
        let mut actor: Option<ParticipantId> = None;
        loop {
            self.settle_down().await?;
            let log = self.sim.with(|world| std::mem::take(&mut world.log));
            for line in log {
                self.note(line);
            }
            self.check(actor).await?;
            actor = None;
            let chaos = self.step < self.options.chaos_steps;
            if !chaos && self.drained().await? {
                self.note("drained: every saga done, every claim and campaign settled".into());
                return Ok(());
            }
            if self.step >= self.options.chaos_steps + self.options.drain_steps {
                return Err(format!("the run did not drain within {} steps", self.step));
            }
            self.step += 1;
            let action = self.choose(chaos);
            match action {
                Action::Resume => actor = self.resume(chaos).await,
                Action::Deliver => actor = self.deliver(),
                Action::Grab => self.grab(),
                Action::Lifecycle => self.lifecycle(chaos),
                Action::Sweep => actor = Some(self.sweep()),
                Action::Clock => self.advance_clock(chaos),
                Action::Steal => self.steal(),
                Action::Redeliver => self.redeliver(),
            }
        }
    }

    /// Waits until every live participant is parked at a hook or finished. Bounded in real
    /// time only to report a participant that hangs outside any hook.
    async fn settle_down(&mut self) -> Result<(), String> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let (parked, live) = self.sim.with(|w| (w.parked.len(), w.live.len()));
            if parked == live {
                break;
            }
            if tokio::time::timeout_at(deadline, self.sim.0.wake.notified())
                .await
                .is_err()
            {
                return Err("a participant neither reached a hook nor finished".into());
            }
        }
        // Finished participants: reap their tasks (a panic in one is a finding).
        let finished: Vec<ParticipantId> = self
            .tasks
            .iter()
            .filter(|(_, task)| task.is_finished())
            .map(|(id, _)| *id)
            .collect();
        for id in finished {
            if let Some(task) = self.tasks.remove(&id)
                && let Err(err) = task.await
                && err.is_panic()
            {
                return Err(format!("participant P{id} panicked: {err}"));
            }
            if self.sweeper == Some(id) {
                self.sweeper = None;
            }
        }
        Ok(())
    }

    fn choose(&mut self, chaos: bool) -> Action {
        let now = self.now();
        let sweeping = self.sweeper.is_some();
        self.sim.with(|world| {
            let available = world
                .queue
                .messages
                .values()
                .any(|m| m.delivery.is_none() && m.available_at_ms <= now);
            let grabbable = world
                .campaigns
                .campaigns
                .values()
                .any(|c| c.status == Status::Active && !c.pool.is_empty());
            let lifecycle = world.campaigns.campaigns.values().any(|c| {
                matches!(c.status, Status::Scheduled | Status::Active)
                    || (chaos && c.status == Status::Funding)
            });
            let stealable = world
                .leases
                .held
                .values()
                .any(|h| h.participant.is_some() && h.expires_at_ms.is_none());
            let in_flight = world.queue.messages.values().any(|m| m.delivery.is_some());
            let mut weights: Vec<(Action, u64)> = Vec::new();
            if !world.parked.is_empty() {
                weights.push((Action::Resume, 60));
            }
            if available {
                weights.push((Action::Deliver, 30));
            }
            if grabbable && chaos {
                weights.push((Action::Grab, 14));
            }
            if lifecycle {
                weights.push((Action::Lifecycle, if chaos { 4 } else { 20 }));
            }
            if !sweeping {
                weights.push((Action::Sweep, if chaos { 2 } else { 1 }));
            }
            if chaos {
                weights.push((Action::Clock, 6));
                if stealable {
                    weights.push((Action::Steal, 4));
                }
                if in_flight {
                    weights.push((Action::Redeliver, 3));
                }
            } else if !available && world.parked.is_empty() && !lifecycle {
                // Nothing to run now: a sweep, or time passes until a delayed message or a
                // stall.
                return if !sweeping && world.rng.chance(50) {
                    Action::Sweep
                } else {
                    Action::Clock
                };
            }
            let total: u64 = weights.iter().map(|(_, w)| w).sum();
            let mut roll = world.rng.below(total);
            for (action, weight) in &weights {
                if roll < *weight {
                    return *action;
                }
                roll -= weight;
            }
            Action::Clock
        })
    }

    /// Lets one parked call through, with a fault in the chaos phase, or crashes its worker.
    async fn resume(&mut self, chaos: bool) -> Option<ParticipantId> {
        let (participant, parked, roll) = self.sim.with(|world| {
            let ids: Vec<ParticipantId> = world.parked.keys().copied().collect();
            let participant = world.rng.pick(&ids);
            let roll = world.rng.below(100);
            let parked = world.parked.remove(&participant);
            (participant, parked, roll)
        });
        let parked = parked?;
        let fault = match roll {
            _ if !chaos => Fault::Ok,
            0..=5 => Fault::Fail,
            6..=9 => Fault::Lost,
            10..=14 => Fault::Late,
            15..=18 => {
                self.crash(participant, &parked.call).await;
                return None;
            }
            _ => Fault::Ok,
        };
        self.note(format!("P{participant} {} -> {fault:?}", parked.call));
        let _ = parked.reply.send(fault);
        Some(participant)
    }

    /// Drops a participant at its hook, as its process dies: a worker's deliveries stay
    /// unacknowledged (the broker delivers them again), and its leases run out.
    async fn crash(&mut self, participant: ParticipantId, call: &str) {
        self.note(format!("P{participant} crashes at {call}"));
        if self.sweeper == Some(participant) {
            self.sweeper = None;
        }
        if let Some(task) = self.tasks.remove(&participant) {
            task.abort();
            let _ = task.await;
        }
        let now = self.now();
        self.sim.with(|world| {
            world.live.remove(&participant);
            world.leases.orphan(participant, now);
            for message in world.queue.messages.values_mut() {
                if message.delivery.is_some_and(|tag| tag >> 20 == participant) {
                    message.delivery = None;
                    message.available_at_ms = now + 1_000;
                }
            }
        });
    }

    fn spawn<F>(&mut self, what: String, work: F) -> ParticipantId
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.next_participant += 1;
        let participant = self.next_participant;
        self.sim
            .with(|world| world.live.insert(participant, what.clone()));
        let sim = self.sim.clone();
        let task = tokio::spawn(PARTICIPANT.scope(participant, async move {
            work.await;
            let now = sim.now_ms();
            sim.with(|world| {
                world.live.remove(&participant);
                world.leases.orphan(participant, now);
            });
            sim.0.wake.notify_one();
        }));
        self.tasks.insert(participant, task);
        participant
    }

    /// Delivers one available message (any of them: order is not kept), or, for grabs, a few
    /// together to one batch as the grab batcher gathers them.
    fn deliver(&mut self) -> Option<ParticipantId> {
        let now = self.now();
        // The participant the delivery will run as (the next spawned): its tags name it.
        let participant = self.next_participant + 1;
        let picked = self.sim.with(|world| {
            let available: Vec<u64> = world
                .queue
                .messages
                .iter()
                .filter(|(_, m)| m.delivery.is_none() && m.available_at_ms <= now)
                .map(|(seq, _)| *seq)
                .collect();
            let first = world.rng.pick(&available);
            let is_grab = |body: &[u8]| {
                Envelope::from_bytes(body)
                    .is_ok_and(|e| matches!(e.event, SagaEvent::GrabClaimed { .. }))
            };
            let mut seqs = vec![first];
            let batched = is_grab(&world.queue.messages[&first].body) && world.rng.chance(60);
            if batched {
                for seq in available {
                    if seq != first
                        && seqs.len() < 3
                        && is_grab(&world.queue.messages[&seq].body)
                        && world.rng.chance(60)
                    {
                        seqs.push(seq);
                    }
                }
            }
            let mut deliveries = Vec::new();
            for seq in seqs {
                world.queue.next_tag += 1;
                // The tag names its participant, so that a crash gives its deliveries back.
                let tag = (participant << 20) | world.queue.next_tag;
                let message = world.queue.messages.get_mut(&seq)?;
                message.delivery = Some(tag);
                deliveries.push((seq, tag, message.message_id.clone(), message.body.clone()));
            }
            Some((batched, deliveries))
        });
        let (batched, deliveries) = picked?;
        let names: Vec<String> = deliveries
            .iter()
            .map(|(seq, _, id, _)| format!("m{seq}:{id}"))
            .collect();
        let what = format!(
            "{} {}",
            if batched { "handle_grabs" } else { "handle" },
            names.join(" ")
        );
        self.note(format!("P{participant} delivered: {what}"));
        let (engine, bus, ids, stats) = (
            self.engine.clone(),
            self.bus.clone(),
            self.ids.clone(),
            self.stats.clone(),
        );
        let spawned = self.spawn(what, async move {
            let envelopes: Vec<Envelope> = deliveries
                .iter()
                .filter_map(|(_, _, _, body)| Envelope::from_bytes(body).ok())
                .collect();
            if envelopes.len() != deliveries.len() {
                return;
            }
            let outcomes = if batched {
                engine.handle_grabs(envelopes.clone()).await
            } else {
                vec![engine.handle(&envelopes[0]).await]
            };
            for (((seq, tag, _, body), envelope), outcome) in
                deliveries.iter().zip(&envelopes).zip(outcomes)
            {
                // Settled as the consumer settles it, then acknowledged.
                let kind = match &outcome {
                    Outcome::Done => "done",
                    Outcome::Retry(_) => "retry",
                    Outcome::Wait(_) => "wait",
                    Outcome::Dead(_) => "dead",
                };
                bus.0.with(|world| {
                    world.log.push(format!(
                        "P{participant} {}: {kind}",
                        envelope.event.saga_id()
                    ));
                });
                let settled =
                    settle(&engine, &bus, &ids, &stats, Some(envelope), body, outcome).await;
                if settled.is_ok() {
                    bus.ack(*seq, *tag).await;
                } else {
                    bus.nack(*seq, *tag);
                }
            }
        });
        debug_assert_eq!(spawned, participant);
        Some(participant)
    }

    /// A user grabs a packet of an active campaign: the pool gives it, the claim is pending,
    /// and its hand-off message is on the bus, in one atomic step (the grab script).
    fn grab(&mut self) {
        let now = self.now();
        self.next_claim += 1;
        let number = self.next_claim;
        let users = self.users.clone();
        let line = self.sim.with(|world| {
            let active: Vec<String> = world
                .campaigns
                .campaigns
                .values()
                .filter(|c| c.status == Status::Active && !c.pool.is_empty())
                .map(|c| c.id.clone())
                .collect();
            let campaign_id = active[usize::try_from(world.rng.below(active.len() as u64)).ok()?].clone();
            let user = users[usize::try_from(world.rng.below(users.len() as u64)).ok()?].clone();
            let campaign = world.campaigns.campaigns.get_mut(&campaign_id)?;
            let at = usize::try_from(world.rng.below(campaign.pool.len() as u64)).ok()?;
            let seq = campaign.pool.swap_remove(at);
            let amount = campaign.packets[usize::try_from(seq).ok()?];
            let claim_id = format!("{number:016x}{:016x}", campaign_id.parse::<u64>().ok()?);
            world.campaigns.claims.insert(
                claim_id.clone(),
                Claim {
                    id: claim_id.clone(),
                    campaign: campaign_id.clone(),
                    user: user.clone(),
                    seq,
                    amount,
                    grabbed_at_ms: now,
                    recorded: None,
                    returned_to_pool: false,
                },
            );
            let envelope = Envelope::new(
                format!("handoff:{claim_id}"),
                Some(format!("req-grab-{number}")),
                SagaEvent::GrabClaimed {
                    claim_id: claim_id.clone(),
                    campaign_id: campaign_id.clone(),
                    user_id: user.clone(),
                    packet_seq: seq,
                    amount,
                    currency: CURRENCY.into(),
                    grabbed_at_ms: now,
                },
            );
            world
                .queue
                .push(&envelope.message_id, envelope.to_bytes(), now);
            // The relay publishes at least once: a publish whose confirm was lost is sent again.
            let twice = world.rng.chance(15);
            if twice {
                world
                    .queue
                    .push(&envelope.message_id, envelope.to_bytes(), now);
            }
            Some(format!(
                "grab: {user} takes packet {seq} ({amount}) of campaign {campaign_id}: claim {claim_id}{}",
                if twice { ", handed off twice" } else { "" }
            ))
        });
        if let Some(line) = line {
            self.note(line);
        }
    }

    /// The campaign service's lifecycle: a funded campaign starts, an active one ends when
    /// exhausted or its time is up, one not started may be cancelled; an end puts the
    /// campaign's `campaign.ended` event on the bus (the outbox relay's message).
    fn lifecycle(&mut self, chaos: bool) {
        let now = self.now();
        let line = self.sim.with(|world| {
            let ids: Vec<String> = world.campaigns.campaigns.keys().cloned().collect();
            let id = ids[usize::try_from(world.rng.below(ids.len() as u64)).ok()?].clone();
            let roll = world.rng.below(100);
            let campaign = world.campaigns.campaigns.get_mut(&id)?;
            let next = match campaign.status {
                Status::Funding | Status::Scheduled if chaos && roll < 4 => Status::Cancelled,
                Status::Scheduled => Status::Active,
                Status::Active if campaign.pool.is_empty() => Status::Exhausted,
                Status::Active if !chaos || roll < 15 => Status::Expired,
                _ => return None,
            };
            campaign.status = next;
            if next != Status::Active {
                let envelope = Envelope::new(
                    format!("event:ended:{id}"),
                    None,
                    SagaEvent::CampaignEnded {
                        campaign_id: id.clone(),
                        merchant_id: campaign.merchant.clone(),
                        currency: campaign.currency.clone(),
                        total_amount: campaign.total(),
                    },
                );
                world
                    .queue
                    .push(&envelope.message_id, envelope.to_bytes(), now);
            }
            Some(format!("lifecycle: campaign {id} is {}", next.as_str()))
        });
        if let Some(line) = line {
            self.note(line);
        }
    }

    fn sweep(&mut self) -> ParticipantId {
        let (store, bus) = (self.engine.store.clone(), self.bus.clone());
        let participant = self.spawn("sweep".into(), async move {
            let _ = crate::sweeper::sweep_once(&store, &bus, crate::sweeper::STALL_AFTER).await;
        });
        self.sweeper = Some(participant);
        self.note(format!("P{participant} sweeps"));
        participant
    }

    fn advance_clock(&mut self, chaos: bool) {
        let now = self.now();
        let by = self.sim.with(|world| {
            if chaos {
                return 50 + world.rng.below(2_000) as i64;
            }
            // Draining: on to the next delayed message, or far enough for leases to run out
            // and for the sweeper to find what stalled.
            let next = world
                .queue
                .messages
                .values()
                .filter(|m| m.delivery.is_none())
                .map(|m| m.available_at_ms)
                .min();
            match next {
                Some(at) if at > now => at - now,
                _ => i64::try_from(crate::sweeper::STALL_AFTER.as_millis()).unwrap_or(60_000) + 1,
            }
        });
        self.sim
            .0
            .clock
            .store(now + by, std::sync::atomic::Ordering::SeqCst);
        self.note(format!("clock +{by} ms"));
    }

    /// A lease expires under a live holder (it stalled past its ttl and has not noticed): a
    /// later executor may take the saga over with a newer fence.
    fn steal(&mut self) {
        let now = self.now();
        let line = self.sim.with(|world| {
            let keys: Vec<String> = world
                .leases
                .held
                .iter()
                .filter(|(_, h)| h.participant.is_some() && h.expires_at_ms.is_none())
                .map(|(key, _)| key.clone())
                .collect();
            let key = keys[usize::try_from(world.rng.below(keys.len() as u64)).ok()?].clone();
            let holder = world.leases.held.get_mut(&key)?;
            holder.expires_at_ms = Some(now);
            Some(format!(
                "lease {key} expires under P{}",
                holder.participant.unwrap_or(0)
            ))
        });
        if let Some(line) = line {
            self.note(line);
        }
    }

    /// A delivery's channel dies while its worker runs: the broker delivers the message again
    /// (to another worker), and the first worker's acknowledgement will find nothing.
    fn redeliver(&mut self) {
        let now = self.now();
        let line = self.sim.with(|world| {
            let seqs: Vec<u64> = world
                .queue
                .messages
                .iter()
                .filter(|(_, m)| m.delivery.is_some())
                .map(|(seq, _)| *seq)
                .collect();
            let seq = world.rng.pick(&seqs);
            let message = world.queue.messages.get_mut(&seq)?;
            message.delivery = None;
            message.available_at_ms = now;
            Some(format!("m{seq} is given back unacknowledged"))
        });
        if let Some(line) = line {
            self.note(line);
        }
    }

    /// Every invariant, after every step: the money, the claims, the campaigns, no dead
    /// letter, and no saga row written by a stale fence (`actor`: the participant that ran).
    async fn check(&mut self, actor: Option<ParticipantId>) -> Result<(), String> {
        self.sim.with(|world| {
            check_money(&world.wallet, &world.campaigns)?;
            if let Some(dead) = world.queue.dead.first() {
                return Err(format!("a saga was dead-lettered: {dead}"));
            }
            Ok(())
        })?;
        // Nothing ran: nothing can have changed.
        let Some(actor) = actor else {
            return Ok(());
        };
        let rows: Vec<(String, String, String, Option<String>, i64)> = saga::Entity::find()
            .select_only()
            .columns([
                saga::Column::Id,
                saga::Column::State,
                saga::Column::Step,
                saga::Column::Reason,
                saga::Column::Fence,
            ])
            .into_tuple()
            .all(self.engine.store.db())
            .await
            .map_err(|err| format!("reading the saga rows: {err}"))?;
        let mut changed = Vec::new();
        let mut views = BTreeMap::new();
        for (id, state, step, reason, fence) in rows {
            let view = RowView {
                state,
                step,
                reason,
                fence,
            };
            if let Some(before) = self.rows.get(&id) {
                let moved = before.state != view.state
                    || before.step != view.step
                    || before.reason != view.reason;
                if moved && view.state != state::STUCK {
                    changed.push((id.clone(), before.clone(), view.clone()));
                }
                if state::is_terminal(&before.state) && view.state == state::RUNNING {
                    return Err(format!(
                        "saga {id} went from {} back to running",
                        before.state
                    ));
                }
            }
            views.insert(id, view);
        }
        self.rows = views;
        for (id, before, after) in changed {
            let key = format!("{LEASE_PREFIX}:saga:{id}");
            let fence = self
                .sim
                .with(|world| world.leases.grants.get(&(actor, key)).copied());
            let Some(fence) = fence else {
                return Err(format!(
                    "saga row {id} was written by P{actor}, which never held its lease"
                ));
            };
            if i64::try_from(fence).unwrap_or(i64::MAX) < after.fence {
                return Err(format!(
                    "saga row {id} overwritten by a stale fence: P{actor} (fence {fence}) wrote {}/{} over the row claimed by fence {} (was {}/{})",
                    after.state, after.step, after.fence, before.state, before.step
                ));
            }
        }
        Ok(())
    }

    /// After the faults: is everything finished? Also checks what "finished" must mean.
    async fn drained(&mut self) -> Result<bool, String> {
        let busy = self.sim.with(|world| {
            !world.live.is_empty()
                || !world.queue.messages.is_empty()
                || world
                    .campaigns
                    .campaigns
                    .values()
                    .any(|c| !matches!(c.status, Status::Settled | Status::Rejected))
                || world
                    .campaigns
                    .claims
                    .values()
                    .any(|c| c.recorded.is_none_or(|s| s == ClaimStatus::Pending))
        });
        if busy {
            return Ok(false);
        }
        let rows = saga::Entity::find()
            .all(self.engine.store.db())
            .await
            .map_err(|err| format!("reading the saga rows: {err}"))?;
        if rows.iter().any(|row| !state::is_terminal(&row.state)) {
            // Re-driven by the sweeper once stalled.
            return Ok(false);
        }
        let letters = dead_letter::Entity::find()
            .all(self.engine.store.db())
            .await
            .map_err(|err| format!("reading the dead letters: {err}"))?;
        if let Some(letter) = letters.first() {
            return Err(format!(
                "dead letter for {}: {}",
                letter.saga_id, letter.reason
            ));
        }
        self.sim.with(|world| {
            for claim in world.campaigns.claims.values() {
                let foreign = world
                    .wallet
                    .accounts
                    .get(&format!("user:{}", claim.user))
                    .is_some_and(|(currency, _)| currency != CURRENCY);
                let expected = if foreign {
                    ClaimStatus::Compensated
                } else {
                    ClaimStatus::Credited
                };
                if claim.recorded != Some(expected) {
                    return Err(format!(
                        "claim {} of user {} ended {:?}, not {expected:?}",
                        claim.id, claim.user, claim.recorded
                    ));
                }
                let row = rows.iter().find(|r| r.id == format!("grab:{}", claim.id));
                let row_state = if foreign {
                    state::COMPENSATED
                } else {
                    state::COMPLETED
                };
                if row.is_none_or(|r| r.state != row_state) {
                    return Err(format!(
                        "the saga of claim {} did not end {row_state}",
                        claim.id
                    ));
                }
            }
            Ok(true)
        })
    }
}
