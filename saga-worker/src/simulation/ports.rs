//! The ports the production code calls, played by the simulation: the wallet, the campaign
//! service, the bus, the lease store and the clock. Every call parks its caller at a hook
//! until the scheduler lets it through, with the fault the scheduler chose.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use redpacket_common::ids::Clock;
use redpacket_common::lease::{LeaseError, LeaseStore};
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;

use super::Rng;
use super::model::{Campaigns, Wallet};
use crate::broker::BrokerError;
use crate::bus::{Bus, Handler};
use crate::clients::{CampaignApi, StepError, Transfer, WalletApi};

/// A participant: one worker handling a delivery, or one sweeper pass.
pub(crate) type ParticipantId = u64;

tokio::task_local! {
    /// The participant a task runs for: its port calls park under this id.
    pub(crate) static PARTICIPANT: ParticipantId;
}

/// What the scheduler lets a parked call do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Fault {
    /// Proceed and answer.
    Ok,
    /// Fail before anything happened (a refused connection).
    Fail,
    /// Happen, then lose the answer (a timeout after the commit).
    Lost,
    /// Happen, then answer only after others ran (the caller parks again for its answer).
    Late,
}

/// A call waiting at its hook.
pub(crate) struct Parked {
    pub call: String,
    pub reply: oneshot::Sender<Fault>,
}

/// A message on the simulated bus.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    pub message_id: String,
    pub body: Vec<u8>,
    pub available_at_ms: i64,
    /// The delivery tag of the delivery that holds it, unacknowledged.
    pub delivery: Option<u64>,
}

/// The bus: the work queue (retry levels are delays before `work`) and the dead list.
#[derive(Debug, Default)]
pub(crate) struct Queue {
    pub messages: BTreeMap<u64, Message>,
    pub next_seq: u64,
    pub next_tag: u64,
    pub dead: Vec<String>,
}

impl Queue {
    pub fn push(&mut self, message_id: &str, body: Vec<u8>, available_at_ms: i64) {
        self.next_seq += 1;
        self.messages.insert(
            self.next_seq,
            Message {
                message_id: message_id.to_owned(),
                body,
                available_at_ms,
                delivery: None,
            },
        );
    }
}

/// A held lease.
#[derive(Debug, Clone)]
pub(crate) struct Holder {
    pub token: String,
    /// The participant whose watchdog renews it; `None` once nobody does.
    pub participant: Option<ParticipantId>,
    /// When it expires; `None` while its holder's watchdog renews it.
    pub expires_at_ms: Option<i64>,
}

#[derive(Debug)]
pub(crate) struct Leases {
    pub held: BTreeMap<String, Holder>,
    pub fence: u64,
    /// The fence each participant was last granted for each key.
    pub grants: BTreeMap<(ParticipantId, String), u64>,
}

/// How long a lease outlives its holder's last renewal (the saga lease's default ttl).
pub(crate) const LEASE_TTL_MS: i64 = 10_000;

impl Leases {
    fn free(&self, key: &str, now_ms: i64) -> bool {
        self.held
            .get(key)
            .is_none_or(|holder| holder.expires_at_ms.is_some_and(|at| at <= now_ms))
    }

    /// A participant ended (finished or crashed): its watchdogs stop, its leases run out.
    pub fn orphan(&mut self, participant: ParticipantId, now_ms: i64) {
        for holder in self.held.values_mut() {
            if holder.participant == Some(participant) {
                holder.participant = None;
                holder.expires_at_ms = Some(now_ms + LEASE_TTL_MS);
            }
        }
    }
}

/// Everything the ports share with the scheduler.
pub(crate) struct World {
    pub rng: Rng,
    pub parked: BTreeMap<ParticipantId, Parked>,
    pub live: BTreeMap<ParticipantId, String>,
    pub wallet: Wallet,
    pub campaigns: Campaigns,
    pub queue: Queue,
    pub leases: Leases,
    /// Retry delays: the bus's base (`retry.N` waits base × 2^N, jittered in its upper half).
    pub retry_base_ms: i64,
    /// What participants report (their sagas' outcomes), for the trace.
    pub log: Vec<String>,
}

pub(crate) struct Shared {
    pub world: Mutex<World>,
    /// Rung when a call parks or a participant ends.
    pub wake: Notify,
    pub clock: Arc<AtomicI64>,
}

/// A handle on the simulation for the ports.
#[derive(Clone)]
pub(crate) struct Sim(pub Arc<Shared>);

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim").finish_non_exhaustive()
    }
}

fn transient(text: &str) -> StepError {
    StepError::transient(format!("sim: {text}"))
}

impl Sim {
    pub fn now_ms(&self) -> i64 {
        self.0.clock.load(Ordering::SeqCst)
    }

    pub fn with<T>(&self, f: impl FnOnce(&mut World) -> T) -> T {
        // The world is consistent between statements; a panic elsewhere is reported anyway.
        let mut world = self.0.world.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut world)
    }

    /// Parks the calling participant until the scheduler lets the call through. A call from
    /// outside any participant (a lease watchdog) is not scheduled: it answers at once.
    pub async fn park(&self, call: String) -> Fault {
        let Ok(participant) = PARTICIPANT.try_with(|id| *id) else {
            return Fault::Ok;
        };
        let (reply, answer) = oneshot::channel();
        self.with(|world| world.parked.insert(participant, Parked { call, reply }));
        self.0.wake.notify_one();
        match answer.await {
            Ok(fault) => fault,
            // The scheduler crashed this participant: it is dropped before it runs again.
            Err(_) => std::future::pending().await,
        }
    }

    /// After a call took effect: its answer, lost, or late (parked again before it arrives).
    pub async fn answer(&self, fault: Fault, call: &str) -> Result<(), StepError> {
        match fault {
            Fault::Lost => Err(transient("the call timed out after it took effect")),
            Fault::Late => match self.park(format!("{call} (its answer, late)")).await {
                Fault::Ok | Fault::Late => Ok(()),
                Fault::Fail | Fault::Lost => Err(transient("the answer was lost")),
            },
            Fault::Ok | Fault::Fail => Ok(()),
        }
    }

    /// One call to a service: parked, then applied (unless it failed first), then answered.
    async fn call<T>(
        &self,
        call: String,
        apply: impl FnOnce(&mut World) -> Result<T, StepError>,
    ) -> Result<T, StepError> {
        let fault = self.park(call.clone()).await;
        if fault == Fault::Fail {
            return Err(transient("connection refused"));
        }
        let result = self.with(apply);
        self.answer(fault, &call).await?;
        result
    }

    /// One batch call: parked once, each item applied in order, one answer for the lot.
    async fn batch<T: Clone>(
        &self,
        call: String,
        items: usize,
        apply: impl FnOnce(&mut World) -> Vec<Result<T, StepError>>,
    ) -> Vec<Result<T, StepError>> {
        let fault = self.park(call.clone()).await;
        if fault == Fault::Fail {
            return vec![Err(transient("connection refused")); items];
        }
        let results = self.with(apply);
        match self.answer(fault, &call).await {
            Ok(()) => results,
            Err(err) => vec![Err(err); items],
        }
    }
}

/// The simulated clock: the scheduler moves it.
#[derive(Debug, Clone)]
pub(crate) struct SimClock(pub Arc<AtomicI64>);

impl Clock for SimClock {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.0.load(Ordering::SeqCst)).unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SimWallet(pub Sim);

#[async_trait::async_trait]
impl WalletApi for SimWallet {
    async fn transfer(&self, transfer: &Transfer, _request_id: &str) -> Result<Value, StepError> {
        let transfer = transfer.clone();
        self.0
            .call(format!("wallet.transfer {}", transfer.id), move |world| {
                world.wallet.apply(&transfer)
            })
            .await
    }

    async fn transfer_batch(&self, transfers: &[Transfer]) -> Vec<Result<(), StepError>> {
        let ids: Vec<&str> = transfers.iter().map(|t| t.id.as_str()).collect();
        let call = format!("wallet.transfer_batch [{}]", ids.join(" "));
        self.0
            .batch(call, transfers.len(), |world| {
                transfers
                    .iter()
                    .map(|t| world.wallet.apply(t).map(|_| ()))
                    .collect()
            })
            .await
    }

    async fn balance(&self, account: &str) -> Result<i64, StepError> {
        self.0
            .call(format!("wallet.balance {account}"), |world| {
                Ok(world.wallet.balance(account))
            })
            .await
    }
}

#[derive(Debug, Clone)]
pub(crate) struct SimCampaign(pub Sim);

#[async_trait::async_trait]
impl CampaignApi for SimCampaign {
    async fn record_claim(
        &self,
        claim_id: &str,
        body: &Value,
        _request_id: &str,
    ) -> Result<Value, StepError> {
        self.0
            .call(format!("campaign.record_claim {claim_id}"), |world| {
                world.campaigns.record(claim_id, body)
            })
            .await
    }

    async fn record_claims(&self, claims: &[Value]) -> Vec<Result<Value, StepError>> {
        let ids: Vec<&str> = claims
            .iter()
            .map(|c| c["id"].as_str().unwrap_or(""))
            .collect();
        let call = format!("campaign.record_claims [{}]", ids.join(" "));
        self.0
            .batch(call, claims.len(), |world| {
                claims
                    .iter()
                    .zip(&ids)
                    .map(|(body, id)| world.campaigns.record(id, body))
                    .collect()
            })
            .await
    }

    async fn mark_claims_credited(&self, claim_ids: &[&str]) -> Vec<Result<Value, StepError>> {
        let call = format!("campaign.mark_claims_credited [{}]", claim_ids.join(" "));
        self.0
            .batch(call, claim_ids.len(), |world| {
                claim_ids
                    .iter()
                    .map(|id| world.campaigns.mark_credited(id))
                    .collect()
            })
            .await
    }

    async fn mark_credited(&self, claim_id: &str, _request_id: &str) -> Result<Value, StepError> {
        self.0
            .call(format!("campaign.mark_credited {claim_id}"), |world| {
                world.campaigns.mark_credited(claim_id)
            })
            .await
    }

    async fn mark_compensated(
        &self,
        claim_id: &str,
        _reason: &str,
        _request_id: &str,
    ) -> Result<Value, StepError> {
        self.0
            .call(format!("campaign.mark_compensated {claim_id}"), |world| {
                world.campaigns.mark_compensated(claim_id)
            })
            .await
    }

    async fn mark_funded(&self, campaign_id: &str, _request_id: &str) -> Result<Value, StepError> {
        self.0
            .call(format!("campaign.mark_funded {campaign_id}"), |world| {
                world.campaigns.mark_funded(campaign_id)
            })
            .await
    }

    async fn mark_rejected(
        &self,
        campaign_id: &str,
        _reason: &str,
        _request_id: &str,
    ) -> Result<Value, StepError> {
        self.0
            .call(format!("campaign.mark_rejected {campaign_id}"), |world| {
                world.campaigns.mark_rejected(campaign_id)
            })
            .await
    }

    async fn mark_settled(
        &self,
        campaign_id: &str,
        amount_refunded: i64,
        _request_id: &str,
    ) -> Result<Value, StepError> {
        self.0
            .call(
                format!("campaign.mark_settled {campaign_id} {amount_refunded}"),
                |world| world.campaigns.settle(campaign_id, amount_refunded),
            )
            .await
    }

    async fn stats(&self, campaign_id: &str) -> Result<Value, StepError> {
        self.0
            .call(format!("campaign.stats {campaign_id}"), |world| {
                world.campaigns.stats(campaign_id)
            })
            .await
    }
}

/// The bus: publishing parks; consuming is the scheduler's (it delivers messages itself).
#[derive(Debug, Clone)]
pub(crate) struct SimBus(pub Sim);

fn bus_error(text: &str) -> BrokerError {
    BrokerError::Local(format!("sim: {text}"))
}

impl SimBus {
    /// Acknowledges a delivery; a lost acknowledgement leaves the message to come again.
    pub async fn ack(&self, seq: u64, tag: u64) {
        let fault = self.0.park(format!("bus.ack m{seq}")).await;
        let now = self.0.now_ms();
        self.0.with(|world| {
            let Some(message) = world.queue.messages.get_mut(&seq) else {
                return;
            };
            if message.delivery != Some(tag) {
                // A stale delivery (the message was delivered again since): nothing to ack.
                return;
            }
            if fault == Fault::Fail || fault == Fault::Lost {
                // The channel died with the ack: the broker delivers it again.
                message.delivery = None;
                message.available_at_ms = now;
            } else {
                world.queue.messages.remove(&seq);
            }
        });
    }

    /// Gives a delivery back unsettled: it comes again shortly.
    pub fn nack(&self, seq: u64, tag: u64) {
        let now = self.0.now_ms();
        self.0.with(|world| {
            if let Some(message) = world.queue.messages.get_mut(&seq)
                && message.delivery == Some(tag)
            {
                message.delivery = None;
                message.available_at_ms = now + 200;
            }
        });
    }
}

#[async_trait::async_trait]
impl Bus for SimBus {
    async fn publish_all(
        &self,
        routing_key: &str,
        messages: &[(String, Vec<u8>)],
    ) -> Result<(), BrokerError> {
        let ids: Vec<&str> = messages.iter().map(|(id, _)| id.as_str()).collect();
        let call = format!("bus.publish {routing_key} [{}]", ids.join(" "));
        let fault = self.0.park(call.clone()).await;
        if fault == Fault::Fail {
            return Err(bus_error("the broker refused the connection"));
        }
        let now = self.0.now_ms();
        let published = self.0.with(|world| {
            let available_at_ms = match routing_key.strip_prefix("retry.") {
                Some(level) => {
                    let level: u32 = level.parse().map_err(|_| bus_error("no such queue"))?;
                    let delay = world.retry_base_ms << level.min(7);
                    let jitter = world.rng.below(u64::try_from(delay / 2).unwrap_or(1));
                    now + delay / 2 + i64::try_from(jitter).unwrap_or(0)
                }
                None if routing_key == "work" => now,
                None if routing_key == "dead" => {
                    world
                        .queue
                        .dead
                        .extend(ids.iter().map(|id| (*id).to_owned()));
                    return Ok(());
                }
                None => return Err(bus_error("no such queue")),
            };
            for (id, body) in messages {
                world.queue.push(id, body.clone(), available_at_ms);
            }
            Ok(())
        });
        published?;
        self.0
            .answer(fault, &call)
            .await
            .map_err(|_| BrokerError::Timeout)
    }

    async fn consume(&self, _prefetch: u16, _handler: Handler, shutdown: CancellationToken) {
        // The scheduler delivers the messages; nothing consumes on its own.
        shutdown.cancelled().await;
    }

    async fn reconnect(&self) {}
}

/// The lease store: grants, releases and takeovers are scheduled; expiry follows the
/// simulated clock.
#[derive(Debug, Clone)]
pub(crate) struct SimLeases(pub Sim);

fn lease_error() -> LeaseError {
    LeaseError::Redis(redis::RedisError::from((
        redis::ErrorKind::Io,
        "sim: the lease store did not answer",
    )))
}

impl SimLeases {
    async fn grant_keys(
        &self,
        keys: &[String],
        token: &str,
    ) -> Result<(Option<u64>, Vec<bool>), LeaseError> {
        let call = format!("lease.grant [{}]", keys.join(" "));
        let fault = self.0.park(call.clone()).await;
        if fault == Fault::Fail {
            return Err(lease_error());
        }
        let participant = PARTICIPANT.try_with(|id| *id).ok();
        let now = self.0.now_ms();
        let answer = self.0.with(|world| {
            let leases = &mut world.leases;
            let granted: Vec<bool> = keys.iter().map(|key| leases.free(key, now)).collect();
            if !granted.iter().any(|g| *g) {
                return (None, granted);
            }
            leases.fence += 1;
            let fence = leases.fence;
            for (key, _) in keys.iter().zip(&granted).filter(|(_, g)| **g) {
                // A grant whose answer is lost has no holder to renew it.
                let holder = match fault {
                    Fault::Lost => Holder {
                        token: token.to_owned(),
                        participant: None,
                        expires_at_ms: Some(now + LEASE_TTL_MS),
                    },
                    _ => Holder {
                        token: token.to_owned(),
                        participant,
                        expires_at_ms: None,
                    },
                };
                leases.held.insert(key.clone(), holder);
                if let Some(participant) = participant {
                    leases.grants.insert((participant, key.clone()), fence);
                }
            }
            (Some(fence), granted)
        });
        self.0
            .answer(fault, &call)
            .await
            .map_err(|_| lease_error())?;
        Ok(answer)
    }

    async fn release_keys(&self, keys: &[String], token: &str) -> Result<bool, LeaseError> {
        let call = format!("lease.release [{}]", keys.join(" "));
        let fault = self.0.park(call.clone()).await;
        if fault == Fault::Fail {
            return Err(lease_error());
        }
        let released = self.0.with(|world| {
            let mut all = true;
            for key in keys {
                if world.leases.held.get(key).is_some_and(|h| h.token == token) {
                    world.leases.held.remove(key);
                } else {
                    all = false;
                }
            }
            all
        });
        self.0
            .answer(fault, &call)
            .await
            .map_err(|_| lease_error())?;
        Ok(released)
    }

    fn extend_keys(&self, keys: &[String], token: &str) -> bool {
        let now = self.0.now_ms();
        self.0.with(|world| {
            keys.iter().all(|key| {
                !world.leases.free(key, now)
                    && world.leases.held.get(key).is_some_and(|h| h.token == token)
            })
        })
    }
}

#[async_trait::async_trait]
impl LeaseStore for SimLeases {
    async fn grant(
        &self,
        key: &str,
        token: &str,
        _ttl: Duration,
    ) -> Result<Option<u64>, LeaseError> {
        let (fence, _) = self.grant_keys(&[key.to_owned()], token).await?;
        Ok(fence)
    }

    async fn extend(&self, key: &str, token: &str, _ttl: Duration) -> Result<bool, LeaseError> {
        Ok(self.extend_keys(&[key.to_owned()], token))
    }

    async fn release(&self, key: &str, token: &str) -> Result<bool, LeaseError> {
        self.release_keys(&[key.to_owned()], token).await
    }

    fn raise_floor(&self, fence: u64) {
        self.0
            .with(|world| world.leases.fence = world.leases.fence.max(fence));
    }

    async fn grant_many(
        &self,
        keys: &[String],
        token: &str,
        _ttl: Duration,
    ) -> Result<(Option<u64>, Vec<bool>), LeaseError> {
        self.grant_keys(keys, token).await
    }

    async fn extend_many(
        &self,
        keys: &[String],
        token: &str,
        _ttl: Duration,
    ) -> Result<bool, LeaseError> {
        Ok(self.extend_keys(keys, token))
    }

    async fn release_many(&self, keys: &[String], token: &str) -> Result<(), LeaseError> {
        self.release_keys(keys, token).await.map(|_| ())
    }
}
