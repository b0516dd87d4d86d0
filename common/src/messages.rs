//! The messages of the sagas, as they travel through RabbitMQ.
//!
//! Every message is an [`Envelope`]: a schema version, a unique message id, the request id of
//! the request that started it (so one grab can be followed through every log), the delivery
//! attempt, and one [`SagaEvent`]. The saga a message drives is named by [`SagaEvent::saga_id`],
//! a deterministic key, so a message delivered twice drives the same saga twice, and every step
//! of a saga is idempotent.
//!
//! A message on the work queue carries one envelope, or a JSON array of up to
//! [`MAX_ENVELOPES_PER_MESSAGE`] of them ([`Delivery`]): the relay sends the grabs of the
//! hand-off that way, because the broker's and the consumer's cost is per message, and a seckill
//! hands off thousands of grabs a second. Each envelope of an array is still its own saga,
//! settled on its own; the message is acknowledged once all of them are.

use serde::{Deserialize, Serialize};

/// The version of the message format this code writes and reads.
pub const SCHEMA_VERSION: u32 = 1;

/// A message on the saga queues. Unknown fields are ignored (not refused) so that a worker
/// reads the messages of a newer one during a rolling upgrade; the event stays strict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub schema_version: u32,
    pub message_id: String,
    /// The request id of the grab or API call that started this saga.
    #[serde(default)]
    pub request_id: Option<String>,
    /// Deliveries so far through the retry queues (0 on the first).
    #[serde(default)]
    pub attempt: u32,
    /// When this message was first sent back for a retry (epoch ms): its retry budget counts
    /// from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retrying_since_ms: Option<i64>,
    /// Since when (epoch ms) its saga has waited on another without a change in what it waits
    /// for: the wait bound counts from there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_since_ms: Option<i64>,
    /// What it waited for at its last look (say, "12 claims still in flight"): a change is
    /// progress, and restarts the wait bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting_for: Option<String>,
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

/// The most envelopes one message carries.
pub const MAX_ENVELOPES_PER_MESSAGE: usize = 100;

/// What one message of the work queue carries.
#[derive(Debug, Clone, PartialEq, Eq)]
// A delivery is decoded once per message and moved once, into its handling: the size of its
// one-envelope variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
pub enum Delivery {
    One(Envelope),
    Many(Vec<Envelope>),
}

impl Delivery {
    /// Parses a message: an envelope, or an array of 1 to [`MAX_ENVELOPES_PER_MESSAGE`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'[') {
            return Envelope::from_bytes(bytes).map(Delivery::One);
        }
        let envelopes: Vec<Envelope> =
            serde_json::from_slice(bytes).map_err(|err| err.to_string())?;
        if envelopes.is_empty() || envelopes.len() > MAX_ENVELOPES_PER_MESSAGE {
            return Err(format!(
                "a message of {} envelopes (1 to {MAX_ENVELOPES_PER_MESSAGE})",
                envelopes.len()
            ));
        }
        if let Some(other) = envelopes
            .iter()
            .find(|envelope| envelope.schema_version != SCHEMA_VERSION)
        {
            return Err(format!(
                "schema version {} is not {SCHEMA_VERSION}",
                other.schema_version
            ));
        }
        Ok(Delivery::Many(envelopes))
    }

    /// The bytes of a message carrying `envelopes` (at most [`MAX_ENVELOPES_PER_MESSAGE`]).
    pub fn many_to_bytes(envelopes: &[Envelope]) -> Vec<u8> {
        debug_assert!(!envelopes.is_empty() && envelopes.len() <= MAX_ENVELOPES_PER_MESSAGE);
        serde_json::to_vec(envelopes).unwrap_or_default()
    }
}

impl Envelope {
    pub fn new(message_id: String, request_id: Option<String>, event: SagaEvent) -> Self {
        Envelope {
            schema_version: SCHEMA_VERSION,
            message_id,
            request_id,
            attempt: 0,
            retrying_since_ms: None,
            waiting_since_ms: None,
            waiting_for: None,
            event,
        }
    }

    /// The message as a fresh start of its saga: no retries or waits behind it (a replay, a
    /// re-drive by the sweeper).
    pub fn restarted(mut self) -> Self {
        self.attempt = 0;
        self.retrying_since_ms = None;
        self.waiting_since_ms = None;
        self.waiting_for = None;
        self
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

    #[test]
    fn a_message_carries_one_envelope_or_a_bounded_array_of_them() {
        let grab = |n: u32| {
            Envelope::new(
                format!("m{n}"),
                None,
                SagaEvent::GrabClaimed {
                    claim_id: format!("c{n}"),
                    campaign_id: "7".into(),
                    user_id: "u".into(),
                    packet_seq: n,
                    amount: 1,
                    currency: "CNY".into(),
                    grabbed_at_ms: 1,
                },
            )
        };
        assert_eq!(
            Delivery::from_bytes(&grab(1).to_bytes()).unwrap(),
            Delivery::One(grab(1))
        );
        let three: Vec<Envelope> = (1..=3).map(grab).collect();
        assert_eq!(
            Delivery::from_bytes(&Delivery::many_to_bytes(&three)).unwrap(),
            Delivery::Many(three.clone())
        );
        let too_many: Vec<Envelope> = (0..=u32::try_from(MAX_ENVELOPES_PER_MESSAGE).unwrap())
            .map(grab)
            .collect();
        assert!(Delivery::from_bytes(&serde_json::to_vec(&too_many).unwrap()).is_err());
        assert!(Delivery::from_bytes(b"[]").is_err());
        let mut old = serde_json::to_value(&three).unwrap();
        old[1]["schema_version"] = 2.into();
        assert!(Delivery::from_bytes(old.to_string().as_bytes()).is_err());
        assert!(Delivery::from_bytes(b"[{\"not\": \"an envelope\"}]").is_err());
    }
}
