//! The saga worker's internal API: sagas by id or state, the dead letters and their replay.

use poem_openapi::param::{Path, Query};
use poem_openapi::payload::Json;
use poem_openapi::{Object, OpenApi, Tags};
use redpacket_common::Problem;
use redpacket_common::messages::Envelope;
use redpacket_common::time::rfc3339;

use crate::bus::Bus;
use crate::entity::{dead_letter, saga};
use crate::store::SagaStore;

#[derive(Tags)]
enum ApiTags {
    /// Saga state.
    Sagas,
    /// Messages that exhausted their retries.
    DeadLetters,
}

fn store_failure(err: sea_orm::DbErr) -> Problem {
    Problem::from_db(&err, "the saga database")
}

/// A saga's state.
#[derive(Debug, Clone, Object)]
pub struct SagaView {
    /// `grab:{claim}`, `fund:{campaign}` or `refund:{campaign}`.
    pub id: String,
    /// `grab`, `funding` or `refund`.
    pub kind: String,
    /// `running`, `completed`, `compensated` or `stuck`.
    pub state: String,
    /// The step it is at (or `done`).
    pub step: String,
    /// Executions so far.
    pub attempts: i64,
    /// The last failure, at most 1,000 characters.
    #[oai(skip_serializing_if_is_none)]
    pub last_error: Option<String>,
    /// The request that started it.
    #[oai(skip_serializing_if_is_none)]
    pub request_id: Option<String>,
    /// When it started.
    pub created_at: String,
    /// When it last moved.
    pub updated_at: String,
}

impl From<saga::Model> for SagaView {
    fn from(model: saga::Model) -> Self {
        SagaView {
            id: model.id,
            kind: model.kind,
            state: model.state,
            step: model.step,
            attempts: i64::from(model.attempts),
            last_error: model.last_error,
            request_id: model.request_id,
            created_at: rfc3339(model.created_at_ms),
            updated_at: rfc3339(model.updated_at_ms),
        }
    }
}

/// Sagas.
#[derive(Debug, Clone, Object)]
pub struct SagaList {
    /// The sagas, most recently updated first.
    pub sagas: Vec<SagaView>,
}

/// A dead letter.
#[derive(Debug, Clone, Object)]
pub struct DeadLetterView {
    /// Its id, for replay.
    pub id: String,
    /// The saga it drives.
    pub saga_id: String,
    /// Why it was given up.
    pub reason: String,
    /// The message (JSON envelope).
    pub message: serde_json::Value,
    /// When it was given up.
    pub created_at: String,
}

impl From<dead_letter::Model> for DeadLetterView {
    fn from(model: dead_letter::Model) -> Self {
        DeadLetterView {
            id: model.id.to_string(),
            saga_id: model.saga_id,
            reason: model.reason,
            message: serde_json::from_str(&model.message)
                .unwrap_or(serde_json::Value::String(model.message)),
            created_at: rfc3339(model.created_at_ms),
        }
    }
}

/// Dead letters.
#[derive(Debug, Clone, Object)]
pub struct DeadLetterList {
    /// Newest first.
    pub dead_letters: Vec<DeadLetterView>,
}

/// One check of the reconciliation.
#[derive(Debug, Clone, Object)]
pub struct CheckView {
    /// The invariant checked.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// What was found.
    pub detail: String,
}

/// The saga worker's part of the reconciliation.
#[derive(Debug, Clone, Object)]
pub struct SagaChecks {
    /// Every check.
    pub checks: Vec<CheckView>,
}

/// Stuck sagas named at most in the reconciliation's detail.
const STUCK_SHOWN: u64 = 20;

/// The saga worker API.
#[derive(Debug, Clone)]
pub struct SagaApi {
    pub store: SagaStore,
    pub broker: std::sync::Arc<dyn Bus>,
}

fn limit_of(limit: Option<u64>) -> Result<u64, Problem> {
    let limit = limit.unwrap_or(50);
    if (1..=500).contains(&limit) {
        Ok(limit)
    } else {
        Err(
            Problem::bad_request("invalid_limit", "`limit` must be between 1 and 500")
                .with_field("limit"),
        )
    }
}

#[OpenApi]
impl SagaApi {
    /// Read one saga.
    #[oai(path = "/sagas/:id", method = "get", tag = "ApiTags::Sagas")]
    async fn saga(&self, id: Path<String>) -> Result<Json<SagaView>, Problem> {
        self.store
            .get(&id.0)
            .await
            .map_err(store_failure)?
            .map(|saga| Json(saga.into()))
            .ok_or_else(|| Problem::not_found("saga_not_found", format!("no saga `{}`", id.0)))
    }

    /// Sagas in one state.
    #[oai(path = "/sagas", method = "get", tag = "ApiTags::Sagas")]
    async fn sagas(
        &self,
        /// `running`, `completed`, `compensated` or `stuck`.
        state: Query<String>,
        /// 1-500 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<SagaList>, Problem> {
        if !["running", "completed", "compensated", "stuck"].contains(&state.0.as_str()) {
            return Err(
                Problem::bad_request("invalid_state", "unknown saga state").with_field("state")
            );
        }
        let sagas = self
            .store
            .by_state(&state.0, limit_of(limit.0)?)
            .await
            .map_err(store_failure)?;
        Ok(Json(SagaList {
            sagas: sagas.into_iter().map(Into::into).collect(),
        }))
    }

    /// The saga worker's checks: no saga is stuck (out of retries, or waiting past its bound);
    /// each stuck one is named with its reason.
    #[oai(path = "/reconciliation", method = "get", tag = "ApiTags::Sagas")]
    async fn reconciliation(&self) -> Result<Json<SagaChecks>, Problem> {
        let stuck = self
            .store
            .by_state(crate::store::state::STUCK, STUCK_SHOWN)
            .await
            .map_err(store_failure)?;
        let detail = if stuck.is_empty() {
            "no saga is stuck".to_owned()
        } else {
            let named: Vec<String> = stuck
                .iter()
                .map(|saga| {
                    format!(
                        "{} ({})",
                        saga.id,
                        saga.last_error.as_deref().unwrap_or("no reason recorded")
                    )
                })
                .collect();
            format!(
                "stuck sagas (newest {STUCK_SHOWN} at most), each in the dead letters: {}",
                named.join("; ")
            )
        };
        Ok(Json(SagaChecks {
            checks: vec![CheckView {
                name: "no_stuck_sagas".to_owned(),
                ok: stuck.is_empty(),
                detail,
            }],
        }))
    }

    /// The dead letters, newest first.
    #[oai(path = "/dead-letters", method = "get", tag = "ApiTags::DeadLetters")]
    async fn dead_letters(
        &self,
        /// 1-500 (default 50).
        limit: Query<Option<u64>>,
    ) -> Result<Json<DeadLetterList>, Problem> {
        let letters = self
            .store
            .dead_letters(limit_of(limit.0)?)
            .await
            .map_err(store_failure)?;
        Ok(Json(DeadLetterList {
            dead_letters: letters.into_iter().map(Into::into).collect(),
        }))
    }

    /// Replay a dead letter: its message goes back to the work queue with fresh retries.
    #[oai(
        path = "/dead-letters/:id/replay",
        method = "post",
        tag = "ApiTags::DeadLetters"
    )]
    async fn replay(&self, id: Path<String>) -> Result<Json<SagaView>, Problem> {
        let not_found = || {
            Problem::not_found(
                "dead_letter_not_found",
                format!("no dead letter `{}`", id.0),
            )
        };
        let letter_id: i64 = id.0.parse().map_err(|_| not_found())?;
        let letter = self
            .store
            .dead_letter(letter_id)
            .await
            .map_err(store_failure)?
            .ok_or_else(not_found)?;
        let envelope = Envelope::from_bytes(letter.message.as_bytes()).map_err(|reason| {
            Problem::unprocessable(
                "unreadable_message",
                format!("the dead letter cannot be replayed: {reason}"),
            )
        })?;
        let envelope = envelope.restarted();
        self.broker
            .publish("work", &format!("replay:{letter_id}"), &envelope.to_bytes())
            .await
            .map_err(|err| Problem::unavailable("broker_unavailable", err.to_string()))?;
        self.store.unbury(&letter).await.map_err(store_failure)?;
        self.store
            .get(&letter.saga_id)
            .await
            .map_err(store_failure)?
            .map(|saga| Json(saga.into()))
            .ok_or_else(|| {
                Problem::not_found("saga_not_found", format!("no saga `{}`", letter.saga_id))
            })
    }
}
