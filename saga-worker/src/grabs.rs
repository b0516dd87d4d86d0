//! Grab sagas driven in batches: the hot path of a seckill.
//!
//! A hot campaign hands off thousands of grabs a second, each a saga of three idempotent steps
//! (record the claim, credit the wallet, mark the claim credited). Driven one by one, every
//! grab costs a lease, a saga-row claim, two campaign transactions, a wallet call and a saga-row
//! finish. Driven in a batch, the same steps cost one of each for the whole batch:
//!
//! 1. the batch's saga leases, granted together under one fencing token ([`LeaseSet`]);
//! 2. the saga rows claimed under that fence in one statement per 200 sagas;
//! 3. the claims recorded with one call to the campaign service (one transaction);
//! 4. the credits applied with one call to the wallet's batch endpoint (one transaction);
//! 5. the claims marked credited with one call (one transaction);
//! 6. the saga rows ended in one statement per state.
//!
//! Each saga keeps its own outcome: one whose record or credit fails is retried or
//! dead-lettered alone, and one whose credit the wallet refuses (that item, for a reason that
//! means nothing moved) turns to compensation on the one-by-one path, under the fence it
//! already holds. A batch call that fails as a whole refuses none of its items: they retry. The guarantees are the one-by-one path's: one
//! executor per saga (its lease), fenced saga-row writes, and idempotent steps.
//!
//! [`LeaseSet`]: redpacket_common::lease::LeaseSet

use std::collections::{HashMap, HashSet};

use redpacket_common::messages::{Envelope, SagaEvent};

use crate::batcher::credit_all;
use crate::clients::StepError;
use crate::engine::{
    Engine, HELD_ELSEWHERE, Outcome, Run, grab_requests, step_outcome, undoes_a_transfer,
};
use crate::store::{NewSaga, state};

/// A grab of the batch that is still being driven: its index in the batch.
type Index = usize;

impl Engine {
    /// Handles a batch of grab messages: one outcome per message, in order. A message that
    /// repeats a saga already in the batch is a duplicate and is simply acknowledged.
    pub async fn handle_grabs(&self, envelopes: Vec<Envelope>) -> Vec<Outcome> {
        let mut outcomes: Vec<Option<Outcome>> = vec![None; envelopes.len()];
        let mut seen = HashSet::new();
        let mut leads: Vec<Index> = Vec::new();
        for (index, envelope) in envelopes.iter().enumerate() {
            if seen.insert(envelope.event.saga_id()) {
                leads.push(index);
            } else {
                outcomes[index] = Some(Outcome::Done);
            }
        }
        let keys: Vec<String> = leads
            .iter()
            .map(|&index| self.lease_key(&envelopes[index].event.saga_id()))
            .collect();
        let leases = match self.leases.try_acquire_many(&keys, self.lease_ttl).await {
            Ok(leases) => leases,
            Err(err) => {
                let reason = format!("lease: {err}");
                return outcomes
                    .into_iter()
                    .map(|outcome| outcome.unwrap_or_else(|| Outcome::Retry(reason.clone())))
                    .collect();
            }
        };
        let mut held = Vec::with_capacity(leads.len());
        for (&index, &granted) in leads.iter().zip(leases.granted()) {
            if granted {
                held.push(index);
            } else {
                // Another executor drives this saga right now; look again later.
                outcomes[index] = Some(Outcome::Wait(HELD_ELSEWHERE.into()));
            }
        }
        if !held.is_empty() {
            let fence = i64::try_from(leases.fence()).unwrap_or(i64::MAX);
            let batch = Batch {
                engine: self,
                envelopes: &envelopes,
                fence,
            };
            let lost = leases.lost();
            let driven = tokio::select! {
                driven = batch.drive(&held) => driven,
                () = lost.cancelled() => held
                    .iter()
                    .map(|&index| (index, Outcome::Retry("lost the saga's lease".into())))
                    .collect(),
            };
            for (index, outcome) in driven {
                if let Outcome::Retry(reason) | Outcome::Wait(reason) | Outcome::Dead(reason) =
                    &outcome
                {
                    let saga_id = envelopes[index].event.saga_id();
                    if let Err(err) = self.store.note_error(&saga_id, reason).await {
                        tracing::warn!(saga = saga_id, error = %err, "could not note a saga error");
                    }
                }
                outcomes[index] = Some(outcome);
            }
        }
        let _ = leases.release().await;
        outcomes
            .into_iter()
            .map(|outcome| outcome.unwrap_or_else(|| Outcome::Retry("not driven".into())))
            .collect()
    }
}

/// One batch of grab sagas under one fencing token.
struct Batch<'a> {
    engine: &'a Engine,
    envelopes: &'a [Envelope],
    fence: i64,
}

impl Batch<'_> {
    fn event(&self, index: Index) -> &SagaEvent {
        &self.envelopes[index].event
    }

    fn request_id(&self, index: Index) -> &str {
        self.envelopes[index].request_id.as_deref().unwrap_or("")
    }

    fn claim_id(&self, index: Index) -> &str {
        match self.event(index) {
            SagaEvent::GrabClaimed { claim_id, .. } => claim_id,
            _ => "",
        }
    }

    /// Drives the held sagas through their steps: an outcome for each.
    async fn drive(&self, held: &[Index]) -> Vec<(Index, Outcome)> {
        let mut outcomes = Vec::with_capacity(held.len());
        let ids: Vec<String> = held
            .iter()
            .map(|&index| self.event(index).saga_id())
            .collect();
        let payloads: Vec<NewSaga<'_>> = held
            .iter()
            .zip(&ids)
            .map(|(&index, id)| NewSaga {
                id,
                kind: self.event(index).kind(),
                payload: String::from_utf8(self.envelopes[index].to_bytes()).unwrap_or_default(),
                request_id: self.envelopes[index].request_id.as_deref(),
            })
            .collect();
        let owned = match self.engine.store.claim_many(&payloads, self.fence).await {
            Ok(owned) => owned,
            Err(err) => return retry_all(held, &format!("saga store: {err}")),
        };
        let mut fresh = Vec::with_capacity(held.len());
        for (&index, id) in held.iter().zip(&ids) {
            match owned.get(id) {
                // A newer executor owns the saga: this copy of the message is a duplicate.
                None => outcomes.push((index, Outcome::Done)),
                Some(saga) if state::is_terminal(&saga.state) => {
                    outcomes.push((index, Outcome::Done));
                }
                Some(saga) if saga.step == "start" => fresh.push(index),
                // Turned to compensation earlier: carry on where it stopped, one by one.
                Some(saga) => {
                    let step = saga.step.clone();
                    outcomes.push((index, self.run(index).drive(self.event(index), &step).await));
                }
            }
        }
        let mut finished: Vec<(Index, &'static str)> = Vec::new();
        let to_credit = self.record(&fresh, &mut outcomes, &mut finished).await;
        let credited = self.credit(&to_credit, &mut outcomes).await;
        self.mark_credited(&credited, &mut outcomes, &mut finished)
            .await;
        self.finish(finished, &mut outcomes).await;
        outcomes
    }

    fn run(&self, index: Index) -> Run<'_> {
        Run::new(
            self.engine,
            self.claim_saga_id(index),
            self.fence,
            self.request_id(index),
        )
    }

    fn claim_saga_id(&self, index: Index) -> String {
        self.event(index).saga_id()
    }

    /// Step 1: records the claims; answers the ones to credit.
    async fn record(
        &self,
        fresh: &[Index],
        outcomes: &mut Vec<(Index, Outcome)>,
        finished: &mut Vec<(Index, &'static str)>,
    ) -> Vec<Index> {
        if fresh.is_empty() {
            return Vec::new();
        }
        let bodies: Vec<_> = fresh
            .iter()
            .filter_map(|&index| {
                let (mut record, _) = grab_requests(self.event(index), self.request_id(index))?;
                record["id"] = self.claim_id(index).into();
                Some(record)
            })
            .collect();
        let results = self.engine.campaign.record_claims(&bodies).await;
        let mut to_credit = Vec::with_capacity(fresh.len());
        for (&index, result) in fresh.iter().zip(results) {
            match result {
                Ok(claim) if claim["status"] == "credited" => {
                    finished.push((index, state::COMPLETED));
                }
                Ok(claim) if claim["status"] == "compensated" => {
                    finished.push((index, state::COMPENSATED));
                }
                Ok(_) => to_credit.push(index),
                Err(err) => outcomes.push((index, step_outcome(err))),
            }
        }
        to_credit
    }

    /// Step 2: credits the wallets in one batch; answers the ones credited. A credit the
    /// wallet refuses for good turns its saga to compensation.
    async fn credit(
        &self,
        to_credit: &[Index],
        outcomes: &mut Vec<(Index, Outcome)>,
    ) -> Vec<Index> {
        let transfers: Vec<_> = to_credit
            .iter()
            .filter_map(|&index| grab_requests(self.event(index), "").map(|(_, credit)| credit))
            .collect();
        if transfers.is_empty() {
            return Vec::new();
        }
        let results = credit_all(&*self.engine.wallet, &transfers).await;
        let mut credited = Vec::with_capacity(to_credit.len());
        for (&index, result) in to_credit.iter().zip(results) {
            match result {
                Ok(()) => credited.push(index),
                Err(StepError::Refused { code, detail }) if undoes_a_transfer(&code) => {
                    tracing::warn!(
                        claim = self.claim_id(index),
                        code,
                        detail,
                        "credit refused; compensating"
                    );
                    let outcome = self
                        .run(index)
                        .undo(self.event(index), "compensate", format!("{code}: {detail}"))
                        .await;
                    outcomes.push((index, outcome));
                }
                Err(err) => outcomes.push((index, step_outcome(err))),
            }
        }
        credited
    }

    /// Step 3: marks the credited claims in one batch.
    async fn mark_credited(
        &self,
        credited: &[Index],
        outcomes: &mut Vec<(Index, Outcome)>,
        finished: &mut Vec<(Index, &'static str)>,
    ) {
        if credited.is_empty() {
            return;
        }
        let ids: Vec<&str> = credited.iter().map(|&index| self.claim_id(index)).collect();
        let results = self.engine.campaign.mark_claims_credited(&ids).await;
        for (&index, result) in credited.iter().zip(results) {
            match result {
                Ok(_) => finished.push((index, state::COMPLETED)),
                Err(err) => outcomes.push((index, step_outcome(err))),
            }
        }
    }

    /// Ends the finished sagas' rows, one statement per final state.
    async fn finish(
        &self,
        finished: Vec<(Index, &'static str)>,
        outcomes: &mut Vec<(Index, Outcome)>,
    ) {
        let mut by_state: HashMap<&'static str, Vec<Index>> = HashMap::new();
        for (index, final_state) in finished {
            by_state.entry(final_state).or_default().push(index);
        }
        for (final_state, indexes) in by_state {
            let ids: Vec<String> = indexes
                .iter()
                .map(|&index| self.claim_saga_id(index))
                .collect();
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            let outcome = match self
                .engine
                .store
                .finish_many(&ids, self.fence, final_state)
                .await
            {
                Ok(()) => Outcome::Done,
                Err(err) => Outcome::Retry(format!("saga store: {err}")),
            };
            outcomes.extend(indexes.into_iter().map(|index| (index, outcome.clone())));
        }
    }
}

fn retry_all(held: &[Index], reason: &str) -> Vec<(Index, Outcome)> {
    held.iter()
        .map(|&index| (index, Outcome::Retry(reason.to_owned())))
        .collect()
}
