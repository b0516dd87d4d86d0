//! The objects of the public API that the gateway itself defines; the others are the services'
//! own objects, relayed.

use poem_openapi::types::Example;
use poem_openapi::{Enum, Object};
use serde::{Deserialize, Serialize};

/// Money from the payment provider into a merchant's wallet.
#[derive(Debug, Clone, Object, Deserialize)]
#[oai(deny_unknown_fields, example)]
#[serde(deny_unknown_fields)]
pub struct TopupBody {
    /// The merchant credited (its wallet is `merchant:{merchant_id}`).
    pub merchant_id: String,
    /// Minor units, 1 to 10^15.
    pub amount: i64,
    /// ISO 4217 code.
    pub currency: String,
}

impl Example for TopupBody {
    fn example() -> Self {
        TopupBody {
            merchant_id: "acme".into(),
            amount: 1_000_000,
            currency: "CNY".into(),
        }
    }
}

/// A top-up's result.
#[derive(Debug, Clone, Object, Serialize)]
pub struct TopupResult {
    /// The ledger transfer; the same `Idempotency-Key` always names the same transfer.
    pub transfer_id: String,
    /// The merchant's balance right after this top-up, in minor units.
    pub balance: i64,
}

/// How the total is divided into packets.
#[derive(Debug, Clone, Copy, Enum, Deserialize, Serialize, PartialEq, Eq)]
#[oai(rename_all = "snake_case")]
#[serde(rename_all = "snake_case")]
pub enum SplitMode {
    /// Equal packets; the remainder goes one minor unit at a time to the first packets.
    Fixed,
    /// Each draw uniform in [min, 2 × remaining / packets left]; the last takes the rest.
    DoubleMean,
    /// Random within `min_amount` and `max_amount`.
    Bounded,
}

/// The split of a new campaign.
#[derive(Debug, Clone, Object, Deserialize, Serialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct SplitBody {
    // No field doc: a described reference becomes `allOf`, which SDK generators refuse for
    // enums; the enum's own doc describes it.
    pub mode: SplitMode,
    /// Smallest packet in minor units (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_amount: Option<i64>,
    /// Largest packet in minor units (required by `bounded`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_amount: Option<i64>,
}

/// A campaign to create for the calling merchant, who funds it from its wallet.
#[derive(Debug, Clone, Object, Deserialize, Serialize)]
#[oai(deny_unknown_fields, example)]
#[serde(deny_unknown_fields)]
pub struct NewCampaign {
    /// 1-200 characters.
    pub title: String,
    /// ISO 4217 code.
    pub currency: String,
    /// The total in minor units, taken from the merchant's wallet by the funding saga.
    pub total_amount: i64,
    /// 1 to 10,000,000 packets.
    pub packet_count: i64,
    // Undocumented for the same reason as `SplitBody::mode`: SDKs get a plain `SplitBody`.
    pub split: SplitBody,
    /// Claims one user may hold, 1-100 (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user_limit: Option<i64>,
    /// When grabs open (RFC 3339).
    pub starts_at: chrono::DateTime<chrono::Utc>,
    /// When grabs close (RFC 3339); after `starts_at`, at most 30 days later.
    pub ends_at: chrono::DateTime<chrono::Utc>,
    /// Seed of the random split; the same seed gives the same packets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

impl Example for NewCampaign {
    fn example() -> Self {
        let starts_at = chrono::DateTime::parse_from_rfc3339("2026-12-12T12:00:00Z")
            .map(|t| t.to_utc())
            .unwrap_or_default();
        NewCampaign {
            title: "Double 12".into(),
            currency: "CNY".into(),
            total_amount: 100_000,
            packet_count: 1000,
            split: SplitBody {
                mode: SplitMode::DoubleMean,
                min_amount: Some(1),
                max_amount: None,
            },
            per_user_limit: Some(1),
            starts_at,
            ends_at: starts_at + chrono::Duration::hours(1),
            seed: None,
        }
    }
}

/// A wallet's balance.
#[derive(Debug, Clone, Object, Serialize)]
pub struct WalletView {
    /// The account: `user:{id}` or `merchant:{id}`.
    pub account: String,
    /// ISO 4217 code.
    pub currency: String,
    /// Minor units; 0 for an account never used.
    pub balance: i64,
}

/// One invariant, checked now.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct CheckView {
    /// A stable name, e.g. `ledger_sums_to_zero`.
    pub name: String,
    /// Whether it holds.
    pub ok: bool,
    /// The measured values, or the offending ids when it is broken.
    pub detail: String,
}

/// The money invariants of the whole system, checked now.
#[derive(Debug, Clone, Object, Serialize, Deserialize)]
pub struct Reconciliation {
    /// Whether every check holds.
    pub ok: bool,
    /// Each check.
    pub checks: Vec<CheckView>,
}

/// One upstream's circuit breaker.
#[derive(Debug, Clone, Object, Serialize)]
pub struct BreakerView {
    /// `campaign`, `wallet` or `saga`.
    pub upstream: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Calls in the sliding window.
    pub calls: u32,
    /// Failed calls (transport errors, timeouts, 5xx) in the window.
    pub failures: u32,
    /// Slow calls in the window.
    pub slow_calls: u32,
    /// Milliseconds until an open breaker lets probes through.
    #[oai(skip_serializing_if_is_none)]
    pub open_remaining_ms: Option<u64>,
    /// State changes since start.
    pub transitions: u64,
}

/// Every breaker of this gateway replica.
#[derive(Debug, Clone, Object, Serialize)]
pub struct BreakerList {
    pub breakers: Vec<BreakerView>,
}

/// The gateway answers.
#[derive(Debug, Clone, Object, Serialize)]
pub struct Pong {
    /// Always `ok`.
    pub status: String,
}

/// What an operator's repair is asked to do.
#[derive(Debug, Clone, Object, Deserialize, Serialize)]
#[oai(deny_unknown_fields)]
#[serde(deny_unknown_fields)]
pub struct RepairBody {
    /// The most items each service takes in this call (1-500, default 100); call again while
    /// `more` is true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Only claims grabbed, campaigns ended and sagas stalled at least this long ago are
    /// taken (up to 86,400,000 ms; default 60,000): younger ones are still moving on their
    /// own. The campaign service refuses an age below its floor (60,000 unless configured
    /// otherwise) with 422 naming `min_age_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_age_ms: Option<i64>,
    /// Where to resume: the `cursor` the previous call answered; absent to start at the
    /// oldest campaign not settled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<String>,
}

/// One thing a repair found wrong, and what became of it.
#[derive(Debug, Clone, Object, Deserialize, Serialize)]
pub struct RepairFinding {
    /// The service that owns it and repaired it: `campaign` or `saga`.
    pub service: String,
    /// `claim_unrecorded` (granted by the pool, unknown to the database), `pool_mismatch`
    /// (packets missing from or extra in a pool), `pool_lost`, `packet_granted_twice` (a packet
    /// more than one claim holds, for an operator), `repair_failed` (one campaign's repair
    /// failed, with the error; the others went on), `claim_pending` (a claim with no
    /// live saga), `campaign_unsettled` (an ended campaign with no live refund), `saga_stuck`
    /// (dead-lettered) or `saga_stalled` (no progress).
    pub kind: String,
    /// The claim, campaign or saga.
    pub id: String,
    /// Whether it was repaired.
    pub repaired: bool,
    /// What was done, or why it could not be.
    pub action: String,
}

/// What a repair found and did.
#[derive(Debug, Clone, Object, Deserialize, Serialize)]
pub struct RepairReport {
    /// True when nothing was left unrepaired.
    pub ok: bool,
    /// Findings repaired.
    pub repaired: u64,
    /// Findings left unrepaired (each says why).
    pub unrepaired: u64,
    /// Every finding; none when nothing needed a repair.
    pub findings: Vec<RepairFinding>,
    /// Whether a service stopped at its item or time bound: call again, with `cursor`.
    pub more: bool,
    /// Where the campaign service stopped, when it did: pass it back as the body's `cursor`
    /// (absent when only the saga worker had more, or nothing was left).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[oai(skip_serializing_if_is_none)]
    pub cursor: Option<String>,
}
