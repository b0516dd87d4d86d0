//! The sagas: grab → credit → mark credited (or compensate), funding, refund.
//!
//! Each message is handled under a lease on its saga (one executor at a time), and every write
//! of the saga's row carries the lease's fencing token, so an executor that lost its lease
//! cannot overwrite the progress of the one that took over. Every step is idempotent by a
//! deterministic key (the transfer id is derived from the claim or campaign id), so a message
//! delivered twice, or a saga re-driven from the middle, moves no money twice.

use std::sync::Arc;
use std::time::Duration;

use redpacket_common::lease::LeaseManager;
use redpacket_common::messages::{Envelope, SagaEvent};
use serde_json::{Value, json};

use crate::batcher::CreditBatcher;
use crate::clients::{CampaignApi, StepError, Transfer, WalletApi};
use crate::store::{SagaStore, state};

/// How long an executor's lease on a saga lasts by default (renewed while it works).
pub const DEFAULT_SAGA_LEASE_TTL: Duration = Duration::from_secs(10);

/// Why a saga waits when another executor holds its lease.
pub const HELD_ELSEWHERE: &str = "another executor holds the saga";

/// What to do with a message after handling it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Done (or nothing left to do): acknowledge.
    Done,
    /// Try again later, through the retry queues.
    Retry(String),
    /// Not ready yet (a refund waiting for claims in flight, a saga another executor holds):
    /// look again later without using up retries, since waiting is not failing. Bounded by
    /// `Engine::wait_max`: past it the saga is stuck, with the reason, for an operator.
    Wait(String),
    /// Give up now: dead-letter it.
    Dead(String),
}

/// The saga engine.
#[derive(Debug, Clone)]
pub struct Engine {
    pub store: SagaStore,
    pub campaign: Arc<dyn CampaignApi>,
    pub wallet: Arc<dyn WalletApi>,
    pub batcher: CreditBatcher,
    pub leases: LeaseManager,
    pub lease_prefix: String,
    /// How long a crashed executor keeps a saga locked.
    pub lease_ttl: Duration,
    /// Grab sagas (and credits) per batch; 1 drives every saga on its own.
    pub batch: usize,
    /// The longest a grab waits for its batch to fill.
    pub linger: Duration,
    /// How long a message keeps being retried before it is dead-lettered.
    pub retry_budget: Duration,
    /// How long a saga may wait on another before it is stuck.
    pub wait_max: Duration,
}

fn escrow(campaign_id: &str) -> String {
    format!("escrow:{campaign_id}")
}

impl Engine {
    pub(crate) fn lease_key(&self, saga_id: &str) -> String {
        format!("{}:saga:{saga_id}", self.lease_prefix)
    }

    /// Handles one message.
    pub async fn handle(&self, envelope: &Envelope) -> Outcome {
        let saga_id = envelope.event.saga_id();
        let lease = match self
            .leases
            .try_acquire(&self.lease_key(&saga_id), self.lease_ttl)
            .await
        {
            Ok(Some(lease)) => lease,
            // Another executor drives this saga right now; look again later.
            Ok(None) => return Outcome::Wait(HELD_ELSEWHERE.into()),
            Err(err) => return Outcome::Retry(format!("lease: {err}")),
        };
        let fence = i64::try_from(lease.fence()).unwrap_or(i64::MAX);
        let payload = String::from_utf8(envelope.to_bytes()).unwrap_or_default();
        let outcome = match self
            .store
            .claim(
                &saga_id,
                envelope.event.kind(),
                &payload,
                envelope.request_id.as_deref(),
                fence,
            )
            .await
        {
            Ok(Some(saga)) if state::is_terminal(&saga.state) => Outcome::Done,
            Ok(Some(saga)) => {
                let run = Run::new(
                    self,
                    saga_id.clone(),
                    fence,
                    envelope.request_id.as_deref().unwrap_or(""),
                );
                let lost = lease.lost();
                tokio::select! {
                    outcome = run.drive(&envelope.event, &saga.step) => outcome,
                    () = lost.cancelled() => Outcome::Retry("lost the saga's lease".into()),
                }
            }
            // A newer executor owns the saga: this copy of the message is a duplicate.
            Ok(None) => Outcome::Done,
            Err(err) => Outcome::Retry(format!("saga store: {err}")),
        };
        if let Outcome::Retry(reason) | Outcome::Wait(reason) | Outcome::Dead(reason) = &outcome
            && let Err(err) = self.store.note_error(&saga_id, reason).await
        {
            tracing::warn!(saga = saga_id, error = %err, "could not note a saga error");
        }
        let _ = lease.release().await;
        outcome
    }
}

/// One execution of one saga under one fencing token.
pub(crate) struct Run<'a> {
    engine: &'a Engine,
    saga_id: String,
    fence: i64,
    request_id: &'a str,
}

/// A step's verdict: go to the next step, turn to undoing with a reason, or stop.
enum Next {
    Step(&'static str),
    /// Go to an undoing step, recording why.
    Undo(&'static str, String),
    Finish(&'static str, Option<String>),
    Stop(Outcome),
}

fn transient_or_dead(err: StepError) -> Next {
    Next::Stop(step_outcome(err))
}

/// A failed step's outcome: retry what may pass later; a refusal that no undo answers parks
/// the saga in the dead letters for an operator (nothing is undone).
pub(crate) fn step_outcome(err: StepError) -> Outcome {
    match err {
        StepError::Transient(reason) => Outcome::Retry(reason),
        StepError::Refused { code, detail } => Outcome::Dead(format!("{code}: {detail}")),
    }
}

/// The wallet's refusals of a transfer that mean it moved nothing and never will: the only
/// answers that turn a credit to compensation or a funding to rejection. Anything else (a
/// conflicting replay, a malformed request, a refusal of the whole call) may hide money that
/// moved, so it is retried or parked, never undone.
pub(crate) fn undoes_a_transfer(code: &str) -> bool {
    matches!(
        code,
        "insufficient_funds" | "currency_mismatch" | "balance_overflow"
    )
}

/// A grab's two requests: its claim record for the campaign service (without the claim id)
/// and its credit, escrow → user, with a transfer id derived from the claim.
pub(crate) fn grab_requests(event: &SagaEvent, request_id: &str) -> Option<(Value, Transfer)> {
    let SagaEvent::GrabClaimed {
        claim_id,
        campaign_id,
        user_id,
        packet_seq,
        amount,
        currency,
        grabbed_at_ms,
    } = event
    else {
        return None;
    };
    let record = json!({
        "campaign_id": campaign_id, "user_id": user_id, "packet_seq": packet_seq,
        "amount": amount, "currency": currency, "grabbed_at_ms": grabbed_at_ms,
        "request_id": request_id,
    });
    let credit = Transfer {
        id: format!("grab:{claim_id}"),
        debit: escrow(campaign_id),
        credit: format!("user:{user_id}"),
        amount: *amount,
        currency: currency.clone(),
    };
    Some((record, credit))
}

impl<'a> Run<'a> {
    pub(crate) fn new(
        engine: &'a Engine,
        saga_id: String,
        fence: i64,
        request_id: &'a str,
    ) -> Self {
        Run {
            engine,
            saga_id,
            fence,
            request_id,
        }
    }

    /// Turns the saga to an undoing step, recording why, and drives it from there.
    pub(crate) async fn undo(&self, event: &SagaEvent, to: &str, reason: String) -> Outcome {
        match self
            .engine
            .store
            .advance(&self.saga_id, self.fence, to, state::RUNNING, Some(&reason))
            .await
        {
            Ok(true) => self.drive(event, to).await,
            // A newer executor took over: stop without touching anything.
            Ok(false) => Outcome::Done,
            Err(err) => Outcome::Retry(format!("saga store: {err}")),
        }
    }

    /// The reason stored with the saga when it turned to compensation.
    async fn recorded_reason(&self, fallback: &str) -> String {
        self.engine
            .store
            .get(&self.saga_id)
            .await
            .ok()
            .flatten()
            .and_then(|saga| saga.reason)
            .unwrap_or_else(|| fallback.to_owned())
    }

    pub(crate) async fn drive(&self, event: &SagaEvent, from: &str) -> Outcome {
        let mut step: String = from.to_owned();
        // Bounded: every saga has at most four steps.
        for _ in 0..8 {
            let next = match event {
                SagaEvent::GrabClaimed { .. } => self.grab_step(event, &step).await,
                SagaEvent::CampaignCreated { .. } => self.funding_step(event, &step).await,
                SagaEvent::CampaignEnded { .. } => self.refund_step(event, &step).await,
            };
            match next {
                // A grab's steps are each idempotent and cheap to run again, so its progress
                // between them is not written: two saga-row writes fewer per grab, the hot
                // path. A grab saga driven again starts from its first step, which answers
                // at once for what is already done.
                Next::Step(to) if matches!(event, SagaEvent::GrabClaimed { .. }) => {
                    step = to.to_owned();
                }
                Next::Step(to) => match self
                    .engine
                    .store
                    .advance(&self.saga_id, self.fence, to, state::RUNNING, None)
                    .await
                {
                    Ok(true) => step = to.to_owned(),
                    // A newer executor took over: stop without touching anything.
                    Ok(false) => return Outcome::Done,
                    Err(err) => return Outcome::Retry(format!("saga store: {err}")),
                },
                Next::Undo(to, reason) => match self
                    .engine
                    .store
                    .advance(&self.saga_id, self.fence, to, state::RUNNING, Some(&reason))
                    .await
                {
                    Ok(true) => step = to.to_owned(),
                    Ok(false) => return Outcome::Done,
                    Err(err) => return Outcome::Retry(format!("saga store: {err}")),
                },
                Next::Finish(final_state, reason) => {
                    return match self
                        .engine
                        .store
                        .advance(
                            &self.saga_id,
                            self.fence,
                            "done",
                            final_state,
                            reason.as_deref(),
                        )
                        .await
                    {
                        Ok(_) => Outcome::Done,
                        Err(err) => Outcome::Retry(format!("saga store: {err}")),
                    };
                }
                Next::Stop(outcome) => return outcome,
            }
        }
        Outcome::Dead(format!("saga {} did not finish its steps", self.saga_id))
    }

    async fn grab_step(&self, event: &SagaEvent, step: &str) -> Next {
        let (SagaEvent::GrabClaimed { claim_id, .. }, Some((record, transfer))) =
            (event, grab_requests(event, self.request_id))
        else {
            return Next::Stop(Outcome::Dead("not a grab".into()));
        };
        let campaign = &self.engine.campaign;
        match step {
            "start" | "record" => match campaign
                .record_claim(claim_id, &record, self.request_id)
                .await
            {
                Ok(claim) if claim["status"] == "credited" => Next::Finish(state::COMPLETED, None),
                Ok(claim) if claim["status"] == "compensated" => {
                    Next::Finish(state::COMPENSATED, None)
                }
                Ok(_) => Next::Step("credit"),
                Err(err) => transient_or_dead(err),
            },
            "credit" => match self.engine.batcher.credit(transfer).await {
                Ok(()) => Next::Step("mark_credited"),
                // The wallet refused this credit for good: undo the grab.
                Err(StepError::Refused { code, detail }) if undoes_a_transfer(&code) => {
                    tracing::warn!(
                        claim = claim_id,
                        code,
                        detail,
                        "credit refused; compensating"
                    );
                    Next::Undo("compensate", format!("{code}: {detail}"))
                }
                Err(err) => transient_or_dead(err),
            },
            "mark_credited" => match campaign.mark_credited(claim_id, self.request_id).await {
                Ok(_) => Next::Finish(state::COMPLETED, None),
                Err(err) => transient_or_dead(err),
            },
            "compensate" => {
                let reason = self.recorded_reason("the wallet refused the credit").await;
                match campaign
                    .mark_compensated(claim_id, &reason, self.request_id)
                    .await
                {
                    Ok(_) => Next::Finish(state::COMPENSATED, Some(reason)),
                    Err(err) => transient_or_dead(err),
                }
            }
            other => Next::Stop(Outcome::Dead(format!("unknown grab step `{other}`"))),
        }
    }

    async fn funding_step(&self, event: &SagaEvent, step: &str) -> Next {
        let SagaEvent::CampaignCreated {
            campaign_id,
            merchant_id,
            currency,
            total_amount,
        } = event
        else {
            return Next::Stop(Outcome::Dead("not a funding".into()));
        };
        let campaign = &self.engine.campaign;
        match step {
            "start" | "transfer" => {
                let transfer = Transfer {
                    id: format!("fund:{campaign_id}"),
                    debit: format!("merchant:{merchant_id}"),
                    credit: escrow(campaign_id),
                    amount: *total_amount,
                    currency: currency.clone(),
                };
                match self
                    .engine
                    .wallet
                    .transfer(&transfer, self.request_id)
                    .await
                {
                    Ok(_) => Next::Step("mark_funded"),
                    Err(StepError::Refused { code, detail }) if undoes_a_transfer(&code) => {
                        Next::Undo("reject", format!("{code}: {detail}"))
                    }
                    Err(err) => transient_or_dead(err),
                }
            }
            "mark_funded" => match campaign.mark_funded(campaign_id, self.request_id).await {
                Ok(_) => Next::Finish(state::COMPLETED, None),
                // Cancelled while funding: its refund saga gives the money back.
                Err(StepError::Refused { code, .. }) if code == "campaign_cancelled" => {
                    Next::Finish(state::COMPLETED, Some("cancelled while funding".into()))
                }
                Err(err) => transient_or_dead(err),
            },
            "reject" => {
                let reason = self
                    .recorded_reason("the funding transfer was refused")
                    .await;
                match campaign
                    .mark_rejected(campaign_id, &reason, self.request_id)
                    .await
                {
                    Ok(_) => Next::Finish(state::COMPENSATED, Some(reason)),
                    // Cancelled while its funding was refused: nothing moved, and its refund
                    // saga (which sees this saga compensated) settles it with nothing to give.
                    Err(StepError::Refused { code, .. }) if code == "campaign_cancelled" => {
                        Next::Finish(
                            state::COMPENSATED,
                            Some(format!("{reason}; cancelled while funding")),
                        )
                    }
                    Err(err) => transient_or_dead(err),
                }
            }
            other => Next::Stop(Outcome::Dead(format!("unknown funding step `{other}`"))),
        }
    }

    async fn refund_step(&self, event: &SagaEvent, step: &str) -> Next {
        let SagaEvent::CampaignEnded {
            campaign_id,
            merchant_id,
            currency,
            ..
        } = event
        else {
            return Next::Stop(Outcome::Dead("not a refund".into()));
        };
        match step {
            "start" | "wait_funding" => {
                // A refund message of a campaign already settled (a late duplicate, after its
                // sagas were purged) has nothing left to do.
                match self.engine.campaign.stats(campaign_id).await {
                    Ok(stats) if stats["status"] == "settled" => {
                        return Next::Finish(state::COMPLETED, None);
                    }
                    Ok(_) => {}
                    Err(err) => return transient_or_dead(err),
                }
                // The funding must be over, or its money could land after the refund.
                match self.engine.store.get(&format!("fund:{campaign_id}")).await {
                    Ok(Some(funding)) if state::is_terminal(&funding.state) => {
                        Next::Step("wait_claims")
                    }
                    Ok(_) => Next::Stop(Outcome::Wait("the funding saga has not finished".into())),
                    Err(err) => Next::Stop(Outcome::Retry(err.to_string())),
                }
            }
            "wait_claims" => match self.engine.campaign.stats(campaign_id).await {
                Ok(stats) if stats["packets_in_flight"] == 0 => Next::Step("refund"),
                Ok(stats) => Next::Stop(Outcome::Wait(format!(
                    "{} claims still in flight",
                    stats["packets_in_flight"]
                ))),
                Err(err) => transient_or_dead(err),
            },
            "refund" | "settle" => {
                let stats = match self.engine.campaign.stats(campaign_id).await {
                    Ok(stats) => stats,
                    Err(err) => return transient_or_dead(err),
                };
                let total = stats["amount_total"].as_i64().unwrap_or(0);
                let credited = stats["amount_credited"].as_i64().unwrap_or(0);
                let funded = matches!(
                    self.engine.store.get(&format!("fund:{campaign_id}")).await,
                    Ok(Some(funding)) if funding.state == state::COMPLETED
                );
                // Everything not credited goes back; nothing if the money never came.
                let refund = if funded { total - credited } else { 0 };
                if step == "refund" && refund > 0 {
                    let transfer = Transfer {
                        id: format!("refund:{campaign_id}"),
                        debit: escrow(campaign_id),
                        credit: format!("merchant:{merchant_id}"),
                        amount: refund,
                        currency: currency.clone(),
                    };
                    if let Err(err) = self
                        .engine
                        .wallet
                        .transfer(&transfer, self.request_id)
                        .await
                    {
                        return transient_or_dead(err);
                    }
                    match self
                        .engine
                        .store
                        .advance(&self.saga_id, self.fence, "settle", state::RUNNING, None)
                        .await
                    {
                        Ok(true) => {}
                        Ok(false) => return Next::Stop(Outcome::Done),
                        Err(err) => return Next::Stop(Outcome::Retry(err.to_string())),
                    }
                }
                // The escrow must now be empty: assert it where the money moved.
                match self.engine.wallet.balance(&escrow(campaign_id)).await {
                    Ok(0) => {}
                    Ok(left) => {
                        return Next::Stop(Outcome::Dead(format!(
                            "escrow of campaign {campaign_id} holds {left} after its refund"
                        )));
                    }
                    Err(err) => return transient_or_dead(err),
                }
                match self
                    .engine
                    .campaign
                    .mark_settled(campaign_id, refund, self.request_id)
                    .await
                {
                    Ok(_) => Next::Finish(state::COMPLETED, None),
                    Err(err) => transient_or_dead(err),
                }
            }
            other => Next::Stop(Outcome::Dead(format!("unknown refund step `{other}`"))),
        }
    }
}
