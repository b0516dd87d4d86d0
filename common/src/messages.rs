//! The messages of the sagas, as they travel through RabbitMQ.
//!
//! Every message is an [`Envelope`]: a schema version, a unique message id, the request id of
//! the request that started it (so one grab can be followed through every log), the delivery
//! attempt, and one [`SagaEvent`]. The saga a message drives is named by [`SagaEvent::saga_id`],
//! a deterministic key, so a message delivered twice drives the same saga twice, and every step
//! of a saga is idempotent.

use serde::{Deserialize, Serialize};

/// The version of the message format this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// A message on the saga queues.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    pub schema_version: u32,
    pub message_id: String,
    /// The request id of the grab or API call that started this saga.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Deliveries so far through the retry queues (0 on the first).
    #[serde(default)]
    pub attempt: u32,
    pub event: SagaEvent,
}

/// What happened, and what a saga must follow up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum SagaEvent {
    /// A grab was answered: record the claim, credit the wallet, mark it credited.
    GrabClaimed {
        claim_id: String,
        campaign_id: String,
        user_id: String,
        packet_seq: u32,
        amount: i64,
        currency: String,
        grabbed_at_ms: i64,
    },
    /// A campaign waits for its money: move it from the merchant to the escrow.
    CampaignCreated {
        campaign_id: String,
        merchant_id: String,
        currency: String,
        total_amount: i64,
    },
    /// A campaign ended: once no claim is in flight, return the escrow's rest to the merchant.
    CampaignEnded {
        campaign_id: String,
        merchant_id: String,
        currency: String,
        total_amount: i64,
    },
}

impl SagaEvent {
    /// The saga this event drives.
    pub fn saga_id(&self) -> String {
        match self {
            SagaEvent::GrabClaimed { claim_id, .. } => format!("grab:{claim_id}"),
            SagaEvent::CampaignCreated { campaign_id, .. } => format!("fund:{campaign_id}"),
            SagaEvent::CampaignEnded { campaign_id, .. } => format!("refund:{campaign_id}"),
        }
    }

    /// The saga's kind.
    pub fn kind(&self) -> &'static str {
        match self {
            SagaEvent::GrabClaimed { .. } => "grab",
            SagaEvent::CampaignCreated { .. } => "funding",
            SagaEvent::CampaignEnded { .. } => "refund",
        }
    }
}

impl Envelope {
    pub fn new(message_id: String, request_id: Option<String>, event: SagaEvent) -> Self {
        Envelope {
            schema_version: SCHEMA_VERSION,
            message_id,
            request_id,
            attempt: 0,
            event,
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a message, refusing other schema versions.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let envelope: Envelope = serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
        if envelope.schema_version != SCHEMA_VERSION {
            return Err(format!(
                "schema version {} is not {SCHEMA_VERSION}",
                envelope.schema_version
            ));
        }
        Ok(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_name_their_saga() {
        let envelope = Envelope::new(
            "m1".into(),
            Some("r1".into()),
            SagaEvent::GrabClaimed {
                claim_id: "c1".into(),
                campaign_id: "7".into(),
                user_id: "u".into(),
                packet_seq: 3,
                amount: 100,
                currency: "CNY".into(),
                grabbed_at_ms: 1,
            },
        );
        let parsed = Envelope::from_bytes(&envelope.to_bytes()).unwrap();
        assert_eq!(parsed, envelope);
        assert_eq!(parsed.event.saga_id(), "grab:c1");
        let mut other = serde_json::to_value(&envelope).unwrap();
        other["schema_version"] = 2.into();
        assert!(Envelope::from_bytes(other.to_string().as_bytes()).is_err());
    }
}
