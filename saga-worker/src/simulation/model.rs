//! In-memory models of the wallet and the campaign service, faithful to their contracts:
//! idempotent by transfer id and by claim id, with the refusal codes the real services answer
//! (`wallet::ledger`, `campaign::service` and `campaign::store`). Each operation is one atomic
//! step, as each is one database transaction in the services.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::clients::{StepError, Transfer};

pub(crate) fn refused(code: &str, detail: impl Into<String>) -> StepError {
    StepError::Refused {
        code: code.to_owned(),
        detail: detail.into(),
    }
}

/// The ledger: accounts created by their first transfer, in its currency.
#[derive(Debug, Default)]
pub(crate) struct Wallet {
    /// Account → (currency, balance).
    pub accounts: BTreeMap<String, (String, i64)>,
    /// Transfer id → the transfer as applied.
    pub transfers: BTreeMap<String, Transfer>,
}

impl Wallet {
    /// `Ledger::apply` for one transfer: a replay answers the original, the same id with
    /// another body is a conflict, an overdraft or a currency mismatch moves nothing.
    pub fn apply(&mut self, transfer: &Transfer) -> Result<Value, StepError> {
        if let Some(done) = self.transfers.get(&transfer.id) {
            let same = done.debit == transfer.debit
                && done.credit == transfer.credit
                && done.amount == transfer.amount
                && done.currency == transfer.currency;
            return if same {
                Ok(json!({"id": transfer.id, "replayed": true}))
            } else {
                Err(refused(
                    "transfer_conflict",
                    format!(
                        "transfer `{}` was applied with a different body",
                        transfer.id
                    ),
                ))
            };
        }
        if transfer.amount <= 0 {
            return Err(refused("invalid_field", "amount must be positive"));
        }
        for account in [&transfer.debit, &transfer.credit] {
            if let Some((currency, _)) = self.accounts.get(account)
                && *currency != transfer.currency
            {
                return Err(refused(
                    "currency_mismatch",
                    format!("account `{account}` is in {currency}"),
                ));
            }
        }
        let debit_balance = self.balance(&transfer.debit);
        if transfer.debit != "external" && debit_balance < transfer.amount {
            return Err(refused(
                "insufficient_funds",
                format!(
                    "account `{}` holds {debit_balance}, less than {}",
                    transfer.debit, transfer.amount
                ),
            ));
        }
        let credit_balance = self.balance(&transfer.credit);
        let (Some(debited), Some(credited)) = (
            debit_balance.checked_sub(transfer.amount),
            credit_balance.checked_add(transfer.amount),
        ) else {
            return Err(refused("balance_overflow", "a balance would overflow"));
        };
        for (account, balance) in [(&transfer.debit, debited), (&transfer.credit, credited)] {
            self.accounts
                .insert(account.clone(), (transfer.currency.clone(), balance));
        }
        self.transfers.insert(transfer.id.clone(), transfer.clone());
        Ok(json!({"id": transfer.id, "replayed": false}))
    }

    pub fn balance(&self, account: &str) -> i64 {
        self.accounts
            .get(account)
            .map_or(0, |(_, balance)| *balance)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Status {
    Funding,
    Scheduled,
    Active,
    Exhausted,
    Expired,
    Cancelled,
    Rejected,
    Settled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Funding => "funding",
            Status::Scheduled => "scheduled",
            Status::Active => "active",
            Status::Exhausted => "exhausted",
            Status::Expired => "expired",
            Status::Cancelled => "cancelled",
            Status::Rejected => "rejected",
            Status::Settled => "settled",
        }
    }

    fn ended(self) -> bool {
        matches!(
            self,
            Status::Exhausted | Status::Expired | Status::Cancelled
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ClaimStatus {
    Pending,
    Credited,
    Compensated,
}

impl ClaimStatus {
    fn as_str(self) -> &'static str {
        match self {
            ClaimStatus::Pending => "pending",
            ClaimStatus::Credited => "credited",
            ClaimStatus::Compensated => "compensated",
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Campaign {
    pub id: String,
    pub merchant: String,
    pub currency: String,
    /// Packet amounts by seq.
    pub packets: Vec<i64>,
    /// The seqs still in the pool.
    pub pool: Vec<u32>,
    pub status: Status,
    pub amount_refunded: Option<i64>,
}

impl Campaign {
    pub fn total(&self) -> i64 {
        self.packets.iter().sum()
    }
}

/// A granted grab: in the pool's pending list until recorded, then a claim row.
#[derive(Debug, Clone)]
pub(crate) struct Claim {
    pub id: String,
    pub campaign: String,
    pub user: String,
    pub seq: u32,
    pub amount: i64,
    pub grabbed_at_ms: i64,
    /// `None` while only the pool knows it.
    pub recorded: Option<ClaimStatus>,
    pub returned_to_pool: bool,
}

impl Claim {
    fn to_json(&self) -> Value {
        json!({
            "id": self.id, "campaign_id": self.campaign, "user_id": self.user,
            "packet_seq": self.seq, "amount": self.amount,
            "status": self.recorded.unwrap_or(ClaimStatus::Pending).as_str(),
        })
    }
}

/// The campaign service: campaigns, their pools and claims.
#[derive(Debug, Default)]
pub(crate) struct Campaigns {
    pub campaigns: BTreeMap<String, Campaign>,
    pub claims: BTreeMap<String, Claim>,
}

fn claim_not_found(id: &str) -> StepError {
    refused("claim_not_found", format!("claim `{id}` does not exist"))
}

impl Campaigns {
    fn campaign(&mut self, id: &str) -> Result<&mut Campaign, StepError> {
        self.campaigns
            .get_mut(id)
            .ok_or_else(|| refused("campaign_not_found", format!("campaign `{id}`")))
    }

    /// `Store::record_claim`: once; a repeat answers the stored claim; a record that does not
    /// match the grab (its packet, amount, user) is refused.
    pub fn record(&mut self, id: &str, body: &Value) -> Result<Value, StepError> {
        let Some(claim) = self.claims.get_mut(id) else {
            return Err(refused(
                "claim_state",
                format!("claim `{id}` matches no grab"),
            ));
        };
        let matches = body["campaign_id"] == claim.campaign.as_str()
            && body["user_id"] == claim.user.as_str()
            && body["packet_seq"] == claim.seq
            && body["amount"] == claim.amount
            && body["grabbed_at_ms"] == claim.grabbed_at_ms;
        if !matches {
            return Err(refused(
                "claim_state",
                format!("claim `{id}` was recorded with another body"),
            ));
        }
        claim.recorded.get_or_insert(ClaimStatus::Pending);
        Ok(claim.to_json())
    }

    /// `mark_credited` (`batch`: the batch endpoint's answer for an unrecorded claim is the
    /// same `claim_not_found`).
    pub fn mark_credited(&mut self, id: &str) -> Result<Value, StepError> {
        let claim = self.claims.get_mut(id).ok_or_else(|| claim_not_found(id))?;
        match claim.recorded {
            None => Err(claim_not_found(id)),
            Some(ClaimStatus::Compensated) => Err(refused(
                "claim_state",
                format!("claim `{id}` is compensated; it cannot be credited"),
            )),
            Some(_) => {
                claim.recorded = Some(ClaimStatus::Credited);
                Ok(claim.to_json())
            }
        }
    }

    /// `mark_compensated`: the packet goes back to the pool while the campaign is live, and
    /// otherwise stays out for the refund.
    pub fn mark_compensated(&mut self, id: &str) -> Result<Value, StepError> {
        let claim = self.claims.get(id).ok_or_else(|| claim_not_found(id))?;
        match claim.recorded {
            None => return Err(claim_not_found(id)),
            Some(ClaimStatus::Compensated) => return Ok(claim.to_json()),
            Some(ClaimStatus::Credited) => {
                return Err(refused(
                    "claim_state",
                    format!("claim `{id}` is credited; it cannot be compensated"),
                ));
            }
            Some(ClaimStatus::Pending) => {}
        }
        let (campaign_id, seq) = (claim.campaign.clone(), claim.seq);
        let campaign = self.campaign(&campaign_id)?;
        let returned = campaign.status == Status::Active;
        if returned {
            campaign.pool.push(seq);
        }
        let claim = self.claims.get_mut(id).ok_or_else(|| claim_not_found(id))?;
        claim.recorded = Some(ClaimStatus::Compensated);
        claim.returned_to_pool = returned;
        Ok(claim.to_json())
    }

    pub fn mark_funded(&mut self, id: &str) -> Result<Value, StepError> {
        let campaign = self.campaign(id)?;
        if campaign.status == Status::Funding {
            campaign.status = Status::Scheduled;
        }
        match campaign.status {
            Status::Funding | Status::Rejected => Err(refused(
                "wrong_state",
                format!("the campaign is {}", campaign.status.as_str()),
            )),
            Status::Cancelled => Err(refused("campaign_cancelled", "the campaign was cancelled")),
            status => Ok(json!({"id": id, "status": status.as_str()})),
        }
    }

    pub fn mark_rejected(&mut self, id: &str) -> Result<Value, StepError> {
        let campaign = self.campaign(id)?;
        if campaign.status == Status::Funding {
            campaign.status = Status::Rejected;
        }
        match campaign.status {
            Status::Rejected => Ok(json!({"id": id, "status": "rejected"})),
            Status::Cancelled => Err(refused("campaign_cancelled", "the campaign was cancelled")),
            status => Err(refused(
                "wrong_state",
                format!("the campaign is {}", status.as_str()),
            )),
        }
    }

    pub fn settle(&mut self, id: &str, amount_refunded: i64) -> Result<Value, StepError> {
        let campaign = self.campaign(id)?;
        if campaign.status != Status::Settled {
            if !campaign.status.ended() {
                return Err(refused(
                    "wrong_state",
                    format!("the campaign is {}", campaign.status.as_str()),
                ));
            }
            campaign.status = Status::Settled;
            campaign.amount_refunded = Some(amount_refunded);
        }
        Ok(json!({"id": id, "status": "settled"}))
    }

    /// The counters the refund saga reads (`Stats`).
    pub fn stats(&self, id: &str) -> Result<Value, StepError> {
        let campaign = self
            .campaigns
            .get(id)
            .ok_or_else(|| refused("campaign_not_found", format!("campaign `{id}`")))?;
        let counts = self.counts(id);
        let grabbed = i64::try_from(campaign.packets.len() - campaign.pool.len()).unwrap_or(0);
        let in_flight = grabbed - counts.credited - (counts.compensated - counts.returned_to_pool);
        Ok(json!({
            "status": campaign.status.as_str(),
            "amount_total": campaign.total(),
            "amount_credited": counts.amount_credited,
            "packets_in_flight": in_flight,
        }))
    }

    pub fn counts(&self, campaign: &str) -> Counts {
        let mut counts = Counts::default();
        for claim in self.claims.values().filter(|c| c.campaign == campaign) {
            match claim.recorded {
                Some(ClaimStatus::Credited) => {
                    counts.credited += 1;
                    counts.amount_credited += claim.amount;
                }
                Some(ClaimStatus::Compensated) => {
                    counts.compensated += 1;
                    counts.returned_to_pool += i64::from(claim.returned_to_pool);
                }
                _ => {}
            }
        }
        counts
    }
}

#[derive(Debug, Default)]
pub(crate) struct Counts {
    pub credited: i64,
    pub amount_credited: i64,
    pub compensated: i64,
    pub returned_to_pool: i64,
}

/// The money invariants, checked after every step: the first one broken, if any.
pub(crate) fn check_money(wallet: &Wallet, campaigns: &Campaigns) -> Result<(), String> {
    let sum: i64 = wallet.accounts.values().map(|(_, balance)| balance).sum();
    if sum != 0 {
        return Err(format!("the ledger sums to {sum}, not zero"));
    }
    if let Some((account, (_, balance))) = wallet
        .accounts
        .iter()
        .find(|(account, (_, balance))| *account != "external" && *balance < 0)
    {
        return Err(format!("account {account} is negative: {balance}"));
    }
    // Every transfer is one of the flows, with the right accounts and amount.
    for (id, transfer) in &wallet.transfers {
        let expected = expected_transfer(id, campaigns);
        match expected {
            Some((debit, credit, amount))
                if debit == transfer.debit
                    && credit == transfer.credit
                    && amount.is_none_or(|amount| amount == transfer.amount) => {}
            _ => {
                return Err(format!(
                    "transfer {id} moved money it should not: {transfer:?}"
                ));
            }
        }
    }
    for claim in campaigns.claims.values() {
        let credited = wallet.transfers.contains_key(&format!("grab:{}", claim.id));
        match claim.recorded {
            Some(ClaimStatus::Credited) if !credited => {
                return Err(format!(
                    "claim {} is marked credited but was never credited",
                    claim.id
                ));
            }
            Some(ClaimStatus::Compensated) if credited => {
                return Err(format!(
                    "claim {} is compensated but was credited",
                    claim.id
                ));
            }
            _ => {}
        }
    }
    for campaign in campaigns.campaigns.values() {
        let escrow = wallet.balance(&format!("escrow:{}", campaign.id));
        let funded = wallet
            .transfers
            .contains_key(&format!("fund:{}", campaign.id));
        let refund = wallet
            .transfers
            .get(&format!("refund:{}", campaign.id))
            .map(|t| t.amount);
        // What the escrow must hold, counted on the campaign's side: the packets in its pool
        // plus its claims not credited (pending, unrecorded, or compensated with the packet
        // kept out of the pool). A packet given twice, or returned to the pool and still
        // claimed, makes this differ from the money.
        let in_pool: i64 = campaign
            .pool
            .iter()
            .filter_map(|seq| campaign.packets.get(usize::try_from(*seq).ok()?))
            .sum();
        let claimed_not_credited: i64 = campaigns
            .claims
            .values()
            .filter(|c| c.campaign == campaign.id)
            .filter(|c| !wallet.transfers.contains_key(&format!("grab:{}", c.id)))
            .filter(|c| !(c.recorded == Some(ClaimStatus::Compensated) && c.returned_to_pool))
            .map(|c| c.amount)
            .sum();
        let not_credited = in_pool + claimed_not_credited;
        let expected = match (funded, refund) {
            (false, _) => 0,
            (true, None) => not_credited,
            (true, Some(refund)) => not_credited - refund,
        };
        if campaign.status == Status::Rejected && funded {
            return Err(format!(
                "campaign {} is rejected, yet its funding moved the money",
                campaign.id
            ));
        }
        if escrow != expected {
            return Err(format!(
                "escrow of campaign {} holds {escrow}, not {expected} (funded {funded}, refund {refund:?})",
                campaign.id
            ));
        }
        if campaign.status == Status::Settled {
            let counts = campaigns.counts(&campaign.id);
            let owed = if funded {
                campaign.total() - counts.amount_credited
            } else {
                0
            };
            if campaign.amount_refunded != Some(owed) || refund.unwrap_or(0) != owed || escrow != 0
            {
                return Err(format!(
                    "campaign {} settled with {:?} refunded ({refund:?} moved, escrow {escrow}), not total - credited = {owed}",
                    campaign.id, campaign.amount_refunded
                ));
            }
            if let Some(claim) = campaigns.claims.values().find(|c| {
                c.campaign == campaign.id && c.recorded.is_none_or(|s| s == ClaimStatus::Pending)
            }) {
                return Err(format!(
                    "campaign {} settled with claim {} still in flight",
                    campaign.id, claim.id
                ));
            }
        }
    }
    Ok(())
}

/// What a transfer id may move: (debit, credit, amount if fixed by the id).
fn expected_transfer(id: &str, campaigns: &Campaigns) -> Option<(String, String, Option<i64>)> {
    if let Some(claim) = id.strip_prefix("grab:") {
        let claim = campaigns.claims.get(claim)?;
        return Some((
            format!("escrow:{}", claim.campaign),
            format!("user:{}", claim.user),
            Some(claim.amount),
        ));
    }
    if let Some(campaign) = id.strip_prefix("fund:") {
        let campaign = campaigns.campaigns.get(campaign)?;
        return Some((
            format!("merchant:{}", campaign.merchant),
            format!("escrow:{}", campaign.id),
            Some(campaign.total()),
        ));
    }
    if let Some(campaign) = id.strip_prefix("refund:") {
        let campaign = campaigns.campaigns.get(campaign)?;
        return Some((
            format!("escrow:{}", campaign.id),
            format!("merchant:{}", campaign.merchant),
            None,
        ));
    }
    // The scenario's own top-ups (`topup:{account}`): money entering from outside.
    id.strip_prefix("topup:")
        .map(|account| ("external".to_owned(), account.to_owned(), None))
}
