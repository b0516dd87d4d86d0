//! The public API, `/v1`: what each role may do, checked here, then relayed to the service
//! that owns the data.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use poem::http::{Method, StatusCode};
use poem::{IntoResponse, Request};
use poem_openapi::auth::Bearer;
use poem_openapi::param::{Header, Path, Query};
use poem_openapi::{ApiResponse, OpenApi, SecurityScheme, Tags};
use redpacket_campaign::api::{
    CampaignPage, CampaignView, ClaimDto, ClaimPage, GrabResult, StatsDto,
};
use redpacket_common::Problem;
use redpacket_common::auth::{Claims, Role};
use redpacket_common::front::{self, Head, HotRoute, Reply};
use redpacket_common::http::{REQUEST_ID_HEADER, StrictJson};
use redpacket_saga_worker::api::{DeadLetterList, ReplayFilter, ReplayReport, SagaView};
use redpacket_wallet::api::EntryPageView;
use serde::Deserialize;

use crate::dto::{
    BreakerList, BreakerView, NewCampaign, Pong, Reconciliation, RepairBody, RepairReport,
    TopupBody, TopupResult, WalletView,
};
use crate::error::{GatewayError, forbidden_role, rate_limited};
use crate::payload::Raw;
use crate::{Gateway, reconcile, repair};

#[derive(Tags)]
enum ApiTags {
    /// Operators: money in, sagas, dead letters, invariants, breakers.
    Admin,
    /// Merchants: their campaigns and wallet.
    Merchant,
    /// Users: grabs, claims and wallet.
    User,
    /// Liveness of the gateway itself.
    Meta,
}

/// The caller, from a verified bearer token.
#[derive(Debug, Clone)]
pub struct Caller {
    pub sub: String,
    pub role: Role,
    pub request_id: String,
}

/// Declares a bearer-token scheme whose checker also enforces the roles allowed, so a wrong
/// role is refused (403) before the request body is even read. Every scheme shares the name
/// `Token` in the spec: for clients they are one and the same bearer token.
macro_rules! token_scheme {
    ($name:ident, $checker:ident = $checker_name:literal, [$($role:ident),+]) => {
        /// A bearer token: an HS256 JWT with `sub`, `role` (`user`, `merchant`, `operator`) and
        /// `exp`.
        #[derive(Debug, SecurityScheme)]
        #[oai(rename = "Token", ty = "bearer", bearer_format = "JWT", checker = $checker_name)]
        pub struct $name(Caller);

        async fn $checker(request: &Request, bearer: Bearer) -> poem::Result<Caller> {
            authenticate(request, bearer, &[$(Role::$role),+]).await
        }
    };
}

token_scheme!(Token, any_role = "any_role", [User, Merchant, Operator]);
token_scheme!(OperatorToken, operator_role = "operator_role", [Operator]);
token_scheme!(MerchantToken, merchant_role = "merchant_role", [Merchant]);
token_scheme!(UserToken, user_role = "user_role", [User]);
token_scheme!(
    StaffToken,
    merchant_or_operator = "merchant_or_operator",
    [Merchant, Operator]
);
token_scheme!(
    ReaderToken,
    user_or_operator = "user_or_operator",
    [User, Operator]
);

/// Verifies the token, checks its role, then spends one token of the caller's own rate limit.
async fn authenticate(request: &Request, bearer: Bearer, allowed: &[Role]) -> poem::Result<Caller> {
    let gateway = request
        .data::<Arc<Gateway>>()
        .ok_or_else(|| poem::Error::from(Problem::internal()))?;
    let request_id = request
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    authenticate_token(gateway, request_id, &bearer.token, allowed)
}

fn authenticate_token(
    gateway: &Gateway,
    request_id: &str,
    token: &str,
    allowed: &[Role],
) -> poem::Result<Caller> {
    let claims: Claims = gateway.tokens.verify(&gateway.key, token).map_err(|err| {
        poem::Error::from(Problem::new(
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "Unauthorized",
            err.to_string(),
        ))
    })?;
    if !allowed.contains(&claims.role) {
        let names: Vec<&str> = allowed.iter().map(|role| role.as_str()).collect();
        return Err(forbidden_role(&names.join(" or ")).into());
    }
    gateway
        .limits
        .user
        .check(&claims.sub, Instant::now())
        .map_err(|wait| poem::Error::from(rate_limited("per-user", wait)))?;
    Ok(Caller {
        sub: claims.sub,
        role: claims.role,
        request_id: request_id.to_owned(),
    })
}

/// A campaign id: the decimal id the campaign service gave (checked before it goes into an
/// upstream URL).
fn campaign_id(id: &str) -> Result<&str, GatewayError> {
    if !id.is_empty() && id.len() <= 19 && id.bytes().all(|b| b.is_ascii_digit()) {
        Ok(id)
    } else {
        Err(not_found_campaign(id))
    }
}

fn claim_id(id: &str) -> Result<&str, GatewayError> {
    if !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(id)
    } else {
        Err(not_found_claim(id))
    }
}

fn not_found_campaign(id: &str) -> GatewayError {
    Problem::not_found("campaign_not_found", format!("no campaign `{id}`")).into()
}

fn not_found_claim(id: &str) -> GatewayError {
    Problem::not_found("claim_not_found", format!("no claim `{id}`")).into()
}

/// A cursor relayed to an upstream: only the characters our cursors use.
fn cursor_query(cursor: Option<&str>) -> Result<String, GatewayError> {
    match cursor {
        None => Ok(String::new()),
        Some(cursor)
            if !cursor.is_empty()
                && cursor.len() <= 64
                && cursor
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Ok(format!("cursor={cursor}"))
        }
        Some(_) => Err(Problem::bad_request(
            "invalid_cursor",
            "`cursor` is not a cursor this API returned",
        )
        .with_field("cursor")
        .into()),
    }
}

#[derive(Deserialize)]
struct Owned {
    merchant_id: String,
}

#[derive(Deserialize)]
struct ClaimOwner {
    user_id: String,
}

#[derive(Deserialize)]
struct AccountReply {
    currency: String,
    balance: i64,
}

#[derive(Deserialize)]
struct TransferReply {
    id: String,
    credit_balance_after: i64,
}

/// A created campaign, or the original one for a retried `Idempotency-Key`.
#[derive(ApiResponse)]
enum CreateResponse {
    /// Created; the funding saga moves it to `scheduled` (or `rejected`).
    #[oai(status = 201)]
    Created(Raw<CampaignView>),
    /// The campaign an earlier request with the same `Idempotency-Key` created.
    #[oai(status = 200)]
    Existing(Raw<CampaignView>),
}

/// Statistics, fresh or, while the campaign service is unreachable, the last known ones.
#[derive(ApiResponse)]
enum StatsResponse {
    #[oai(status = 200)]
    Ok(
        Raw<StatsDto>,
        /// Present when the figures are the last known ones: their age in seconds.
        #[oai(header = "X-Stale-Seconds")]
        Option<u64>,
        /// `110 - "Response is Stale"` with stale figures.
        #[oai(header = "Warning")]
        Option<String>,
    ),
}

/// The public API.
#[derive(Debug, Clone)]
pub struct PublicApi {
    gateway: Arc<Gateway>,
}

impl PublicApi {
    pub fn new(gateway: Arc<Gateway>) -> Self {
        PublicApi { gateway }
    }

    /// The campaign's merchant, from the cache (campaigns never change hands) or upstream.
    async fn owner_of(&self, caller: &Caller, id: &str) -> Result<String, GatewayError> {
        if let Some(owner) = self.gateway.cache.owner(id) {
            return Ok(owner);
        }
        let reply = self
            .gateway
            .campaign
            .get(
                &format!("/campaigns/{id}"),
                &caller.request_id,
                self.gateway.timeouts.read,
            )
            .await?;
        let owned: Owned = reply.json()?;
        self.gateway.cache.set_owner(id, &owned.merchant_id);
        Ok(owned.merchant_id)
    }

    /// Lets an operator, or the merchant owning the campaign, through; others learn nothing of
    /// the campaign's existence.
    async fn check_owner(&self, caller: &Caller, id: &str) -> Result<(), GatewayError> {
        match caller.role {
            Role::Operator => Ok(()),
            Role::Merchant if self.owner_of(caller, id).await? == caller.sub => Ok(()),
            Role::Merchant => Err(not_found_campaign(id)),
            // The token scheme admits only merchants and operators here.
            Role::User => Err(forbidden_role("merchant or operator")),
        }
    }

    async fn wallet(
        &self,
        caller: &Caller,
        account: String,
    ) -> Result<Raw<WalletView>, GatewayError> {
        let reply = self
            .gateway
            .wallet
            .get(
                &format!("/accounts/{account}"),
                &caller.request_id,
                self.gateway.timeouts.read,
            )
            .await?;
        let view = if reply.status == StatusCode::NOT_FOUND {
            WalletView {
                account,
                currency: self.gateway.currency.clone(),
                balance: 0,
            }
        } else {
            let found: AccountReply = reply.json()?;
            WalletView {
                account,
                currency: found.currency,
                balance: found.balance,
            }
        };
        Ok(Raw::of(&view))
    }

    async fn relay_get<T>(
        &self,
        upstream: &crate::upstream::Upstream,
        caller: &Caller,
        path: String,
    ) -> Result<Raw<T>, GatewayError> {
        let reply = upstream
            .get(&path, &caller.request_id, self.gateway.timeouts.read)
            .await?;
        Ok(Raw::new(reply.success()?))
    }
}

#[OpenApi]
impl PublicApi {
    /// Liveness of the gateway alone (no upstream call, no token): the baseline of load runs.
    #[oai(path = "/v1/ping", method = "get", tag = "ApiTags::Meta")]
    async fn ping(&self) -> Raw<Pong> {
        Raw::new(Bytes::from_static(br#"{"status":"ok"}"#))
    }

    /// Top up a merchant's wallet (operator).
    ///
    /// Moves money from `external` (the payment provider) into `merchant:{merchant_id}`. The
    /// `Idempotency-Key` (required) names the transfer: a retry answers the original result and
    /// moves nothing; the same key with another body is 409 `transfer_conflict`.
    #[oai(path = "/v1/admin/topups", method = "post", tag = "ApiTags::Admin")]
    async fn topup(
        &self,
        auth: OperatorToken,
        body: StrictJson<TopupBody>,
        /// 1-100 characters: letters, digits, `-`, `_`, `.`, `:`.
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<String>,
    ) -> Result<Raw<TopupResult>, GatewayError> {
        let caller = auth.0;
        let key = idempotency_key.0;
        if key.is_empty()
            || key.len() > 100
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
        {
            return Err(Problem::bad_request(
                "invalid_idempotency_key",
                "`Idempotency-Key` must be 1-100 letters, digits, `-`, `_`, `.` or `:`",
            )
            .with_field("Idempotency-Key")
            .into());
        }
        let body = body.0;
        if !redpacket_common::accounts::is_owner_id(&body.merchant_id) {
            return Err(Problem::unprocessable(
                "invalid_field",
                "`merchant_id` must be 1-64 letters, digits, `-` or `_`",
            )
            .with_field("merchant_id")
            .into());
        }
        let transfer = serde_json::json!({
            "id": format!("topup:{key}"),
            "debit": "external",
            "credit": format!("merchant:{}", body.merchant_id),
            "amount": body.amount,
            "currency": body.currency,
            "metadata": {"kind": "topup", "request_id": caller.request_id},
        });
        let reply = self
            .gateway
            .wallet
            .call(
                Method::POST,
                "/transfers",
                Some(Bytes::from(transfer.to_string())),
                &[],
                &caller.request_id,
                self.gateway.timeouts.write,
            )
            .await?;
        let applied: TransferReply = reply.json()?;
        Ok(Raw::of(&TopupResult {
            transfer_id: applied.id,
            balance: applied.credit_balance_after,
        }))
    }

    /// Read a saga (operator): its steps, attempts, last error and timestamps.
    #[oai(path = "/v1/admin/sagas/:id", method = "get", tag = "ApiTags::Admin")]
    async fn saga(
        &self,
        auth: OperatorToken,
        id: Path<String>,
    ) -> Result<Raw<SagaView>, GatewayError> {
        let id = saga_id(&id.0)?;
        self.relay_get(&self.gateway.saga, &auth.0, format!("/sagas/{id}"))
            .await
    }

    /// The dead-letter list (operator): sagas that exhausted their retries.
    #[oai(
        path = "/v1/admin/dead-letters",
        method = "get",
        tag = "ApiTags::Admin"
    )]
    async fn dead_letters(&self, auth: OperatorToken) -> Result<Raw<DeadLetterList>, GatewayError> {
        self.relay_get(&self.gateway.saga, &auth.0, "/dead-letters".to_owned())
            .await
    }

    /// Replay a dead letter (operator), by the `id` the dead-letter list shows: its saga runs
    /// again from where it stopped, with fresh retries.
    #[oai(
        path = "/v1/admin/dead-letters/:id/replay",
        method = "post",
        tag = "ApiTags::Admin"
    )]
    async fn replay(
        &self,
        auth: OperatorToken,
        id: Path<String>,
    ) -> Result<Raw<SagaView>, GatewayError> {
        let caller = auth.0;
        let id = saga_id(&id.0)?;
        let reply = self
            .gateway
            .saga
            .call(
                Method::POST,
                &format!("/dead-letters/{id}/replay"),
                None,
                &[],
                &caller.request_id,
                self.gateway.timeouts.write,
            )
            .await?;
        Ok(Raw::new(reply.success()?))
    }

    /// Replay dead letters in bulk (operator): those of a campaign, those whose reason contains
    /// a text, or all; at most `limit` (500) per call, oldest first, at most 200 a second, with
    /// each letter's outcome. Call again while `more` is true.
    #[oai(
        path = "/v1/admin/dead-letters/replay",
        method = "post",
        tag = "ApiTags::Admin"
    )]
    async fn replay_many(
        &self,
        auth: OperatorToken,
        body: StrictJson<ReplayFilter>,
    ) -> Result<Raw<ReplayReport>, GatewayError> {
        let caller = auth.0;
        let body = serde_json::to_vec(&body.0).map_err(|_| Problem::internal())?;
        let reply = self
            .gateway
            .saga
            .call(
                Method::POST,
                "/dead-letters/replay",
                Some(Bytes::from(body)),
                &[],
                &caller.request_id,
                self.gateway.timeouts.write,
            )
            .await?;
        Ok(Raw::new(reply.success()?))
    }

    /// The money invariants, checked now (operator).
    ///
    /// The ledger sums to zero, no account but `external` is negative, balances match their
    /// entries; per campaign: grabs ≤ packets, no user above the limit, counters match the
    /// claims, and the escrow holds exactly what is unclaimed plus in flight.
    #[oai(
        path = "/v1/admin/reconciliation",
        method = "get",
        tag = "ApiTags::Admin"
    )]
    async fn reconciliation(
        &self,
        auth: OperatorToken,
    ) -> Result<Raw<Reconciliation>, GatewayError> {
        let result = reconcile::run(&self.gateway, &auth.0.request_id).await?;
        Ok(Raw::of(&result))
    }

    /// Repair what the reconciliation finds (operator): claims a packet pool granted that the
    /// campaign database does not know are recorded; pools that disagree with the database are
    /// mended or rebuilt; claims with no live saga and ended campaigns with no live refund are
    /// re-driven; stuck sagas are replayed and stalled ones re-driven. Each finding says what
    /// was done or why it could not be. At most `limit` items per service and about 10 s a
    /// call (call again while `more`); one repair at a time (503 `repair_in_progress`). Money
    /// moves only through the sagas' idempotent steps, so a second run repairs nothing.
    #[oai(
        path = "/v1/admin/reconciliation/repair",
        method = "post",
        tag = "ApiTags::Admin"
    )]
    async fn repair(
        &self,
        auth: OperatorToken,
        body: StrictJson<RepairBody>,
    ) -> Result<Raw<RepairReport>, GatewayError> {
        let result = repair::run(&self.gateway, body.0, &auth.0.request_id).await?;
        tracing::info!(
            repaired = result.repaired,
            unrepaired = result.unrepaired,
            more = result.more,
            "repair"
        );
        Ok(Raw::of(&result))
    }

    /// The circuit breakers of this gateway replica (operator).
    #[oai(path = "/v1/admin/breakers", method = "get", tag = "ApiTags::Admin")]
    async fn breakers(&self, _auth: OperatorToken) -> Result<Raw<BreakerList>, GatewayError> {
        let breakers = self
            .gateway
            .upstreams()
            .map(|upstream| {
                let snapshot = upstream.snapshot();
                BreakerView {
                    upstream: upstream.name().to_owned(),
                    state: snapshot.state.as_str().to_owned(),
                    calls: snapshot.calls,
                    failures: snapshot.failures,
                    slow_calls: snapshot.slow,
                    open_remaining_ms: snapshot
                        .open_remaining
                        .map(|left| u64::try_from(left.as_millis()).unwrap_or(u64::MAX)),
                    transitions: snapshot.transitions,
                }
            })
            .collect();
        Ok(Raw::of(&BreakerList { breakers }))
    }

    /// Create a campaign (merchant), funded from the merchant's wallet.
    ///
    /// The packets are split now (seeded, reproducible); the campaign starts in `funding` and
    /// the funding saga moves the total into escrow (`scheduled`) or rejects it (`rejected`,
    /// with the reason) when the wallet is short. With an `Idempotency-Key`, a retry answers
    /// the original campaign (200); the same key with another body is 409.
    #[oai(path = "/v1/campaigns", method = "post", tag = "ApiTags::Merchant")]
    async fn create_campaign(
        &self,
        auth: MerchantToken,
        body: StrictJson<NewCampaign>,
        /// Makes a retried create return the same campaign (1-128 visible ASCII characters).
        #[oai(name = "Idempotency-Key")]
        idempotency_key: Header<Option<String>>,
        http_request: &poem::Request,
    ) -> Result<CreateResponse, GatewayError> {
        let caller = auth.0;
        // poem-openapi reads a key that is not visible ASCII as no key at all; forwarded
        // without it, the create would not be idempotent. It is refused as the campaign
        // service refuses it.
        if idempotency_key.0.is_none()
            && redpacket_common::http::header_text(http_request, "Idempotency-Key").is_some()
        {
            return Err(Problem::unprocessable(
                "invalid_field",
                "the Idempotency-Key header must be 1-128 visible ASCII characters",
            )
            .with_field("Idempotency-Key")
            .into());
        }
        let mut body = serde_json::to_value(&body.0).map_err(|_| Problem::internal())?;
        if let Some(object) = body.as_object_mut() {
            object.insert("merchant_id".into(), caller.sub.clone().into());
        }
        let key_header;
        let headers: &[(&'static str, &str)] = match &idempotency_key.0 {
            Some(key) => {
                key_header = [("Idempotency-Key", key.as_str())];
                &key_header
            }
            None => &[],
        };
        let reply = self
            .gateway
            .campaign
            .call(
                Method::POST,
                "/campaigns",
                Some(Bytes::from(body.to_string())),
                headers,
                &caller.request_id,
                self.gateway.timeouts.create,
            )
            .await?;
        let created = reply.status == StatusCode::CREATED;
        let body = reply.success()?;
        Ok(if created {
            CreateResponse::Created(Raw::new(body))
        } else {
            CreateResponse::Existing(Raw::new(body))
        })
    }

    /// The calling merchant's campaigns, newest first.
    #[oai(path = "/v1/campaigns", method = "get", tag = "ApiTags::Merchant")]
    async fn list_campaigns(
        &self,
        auth: MerchantToken,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Raw<CampaignPage>, GatewayError> {
        let caller = auth.0;
        let cursor = cursor_query(cursor.0.as_deref())?;
        self.relay_get(
            &self.gateway.campaign,
            &caller,
            format!("/campaigns?merchant_id={}&{cursor}", caller.sub),
        )
        .await
    }

    /// Read a campaign: its owner and operators; users too (what they grab is public).
    #[oai(path = "/v1/campaigns/:id", method = "get", tag = "ApiTags::Merchant")]
    async fn get_campaign(
        &self,
        auth: Token,
        id: Path<String>,
    ) -> Result<Raw<CampaignView>, GatewayError> {
        let caller = auth.0;
        let id = campaign_id(&id.0)?;
        let reply = self
            .gateway
            .campaign
            .get(
                &format!("/campaigns/{id}"),
                &caller.request_id,
                self.gateway.timeouts.read,
            )
            .await?;
        let body = reply.success()?;
        let owned: Owned = serde_json::from_slice(&body).map_err(|_| Problem::internal())?;
        self.gateway.cache.set_owner(id, &owned.merchant_id);
        if caller.role == Role::Merchant && owned.merchant_id != caller.sub {
            return Err(not_found_campaign(id));
        }
        Ok(Raw::new(body))
    }

    /// A campaign's statistics (its merchant, operators).
    ///
    /// While the campaign service is unreachable or its breaker is open, the last known
    /// figures are served with `X-Stale-Seconds` (their age) and a `Warning` header.
    #[oai(
        path = "/v1/campaigns/:id/stats",
        method = "get",
        tag = "ApiTags::Merchant"
    )]
    async fn stats(
        &self,
        auth: StaffToken,
        id: Path<String>,
    ) -> Result<StatsResponse, GatewayError> {
        let caller = auth.0;
        let id = campaign_id(&id.0)?;
        self.check_owner(&caller, id).await?;
        let fresh = self
            .gateway
            .campaign
            .get(
                &format!("/campaigns/{id}/stats"),
                &caller.request_id,
                self.gateway.timeouts.read,
            )
            .await
            .and_then(|reply| {
                if reply.status.is_server_error() {
                    Err(reply.into_error())
                } else {
                    Ok(reply)
                }
            });
        match fresh {
            Ok(reply) => {
                let body = reply.success()?;
                self.gateway.cache.set_stats(id, body.clone());
                Ok(StatsResponse::Ok(Raw::new(body), None, None))
            }
            Err(err) if err.status().is_server_error() => match self.gateway.cache.stats(id) {
                Some((age, body)) => Ok(StatsResponse::Ok(
                    Raw::new(body),
                    Some(age.as_secs()),
                    Some("110 - \"Response is Stale\"".to_owned()),
                )),
                None => Err(err),
            },
            Err(err) => Err(err),
        }
    }

    /// A campaign's claims, newest first (its merchant, operators).
    #[oai(
        path = "/v1/campaigns/:id/claims",
        method = "get",
        tag = "ApiTags::Merchant"
    )]
    async fn campaign_claims(
        &self,
        auth: StaffToken,
        id: Path<String>,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Raw<ClaimPage>, GatewayError> {
        let caller = auth.0;
        let id = campaign_id(&id.0)?;
        let cursor = cursor_query(cursor.0.as_deref())?;
        self.check_owner(&caller, id).await?;
        self.relay_get(
            &self.gateway.campaign,
            &caller,
            format!("/campaigns/{id}/claims?{cursor}"),
        )
        .await
    }

    /// Cancel a campaign before its start (its merchant); the escrow goes back by the refund
    /// saga.
    #[oai(
        path = "/v1/campaigns/:id/cancel",
        method = "post",
        tag = "ApiTags::Merchant"
    )]
    async fn cancel(
        &self,
        auth: MerchantToken,
        id: Path<String>,
    ) -> Result<Raw<CampaignView>, GatewayError> {
        let caller = auth.0;
        let id = campaign_id(&id.0)?;
        self.check_owner(&caller, id).await?;
        let body = serde_json::json!({"merchant_id": caller.sub});
        let reply = self
            .gateway
            .campaign
            .call(
                Method::POST,
                &format!("/campaigns/{id}/cancel"),
                Some(Bytes::from(body.to_string())),
                &[],
                &caller.request_id,
                self.gateway.timeouts.write,
            )
            .await?;
        Ok(Raw::new(reply.success()?))
    }

    /// The calling merchant's wallet.
    #[oai(
        path = "/v1/merchants/me/wallet",
        method = "get",
        tag = "ApiTags::Merchant"
    )]
    async fn merchant_wallet(&self, auth: MerchantToken) -> Result<Raw<WalletView>, GatewayError> {
        let caller = auth.0;
        let account = format!("merchant:{}", caller.sub);
        self.wallet(&caller, account).await
    }

    /// Grab a packet (user).
    ///
    /// One atomic step checks the campaign's window and state, the caller's per-user limit and
    /// the packets left, and takes a packet. The answer is immediate; the wallet credit follows
    /// (follow `claim_id`). 409 `limit_reached` lists the caller's claims; 410 `sold_out` or
    /// `campaign_ended`; 409 `campaign_not_started` or `campaign_not_funded`; 429 when the
    /// campaign's or the caller's rate limit is exhausted; 503 when the campaign service is
    /// unavailable (at once, never a hang).
    #[oai(
        path = "/v1/campaigns/:id/grab",
        method = "post",
        tag = "ApiTags::User"
    )]
    async fn grab(
        &self,
        auth: UserToken,
        id: Path<String>,
    ) -> Result<Raw<GrabResult>, GatewayError> {
        relay_grab(&self.gateway, &auth.0, &id.0).await
    }

    /// Read one of the caller's claims (user; operators read any).
    #[oai(path = "/v1/claims/:id", method = "get", tag = "ApiTags::User")]
    async fn claim(
        &self,
        auth: ReaderToken,
        id: Path<String>,
    ) -> Result<Raw<ClaimDto>, GatewayError> {
        let caller = auth.0;
        let id = claim_id(&id.0)?;
        let reply = self
            .gateway
            .campaign
            .get(
                &format!("/claims/{id}"),
                &caller.request_id,
                self.gateway.timeouts.read,
            )
            .await?;
        let body = reply.success()?;
        let owner: ClaimOwner = serde_json::from_slice(&body).map_err(|_| Problem::internal())?;
        if caller.role == Role::User && owner.user_id != caller.sub {
            return Err(not_found_claim(id));
        }
        Ok(Raw::new(body))
    }

    /// The caller's claims, newest first (user).
    #[oai(path = "/v1/me/claims", method = "get", tag = "ApiTags::User")]
    async fn my_claims(
        &self,
        auth: UserToken,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Raw<ClaimPage>, GatewayError> {
        let caller = auth.0;
        let cursor = cursor_query(cursor.0.as_deref())?;
        self.relay_get(
            &self.gateway.campaign,
            &caller,
            format!("/users/{}/claims?{cursor}", caller.sub),
        )
        .await
    }

    /// The caller's wallet (user).
    #[oai(path = "/v1/me/wallet", method = "get", tag = "ApiTags::User")]
    async fn my_wallet(&self, auth: UserToken) -> Result<Raw<WalletView>, GatewayError> {
        let caller = auth.0;
        let account = format!("user:{}", caller.sub);
        self.wallet(&caller, account).await
    }

    /// The caller's wallet entries, newest first (user).
    #[oai(path = "/v1/me/wallet/entries", method = "get", tag = "ApiTags::User")]
    async fn my_entries(
        &self,
        auth: UserToken,
        /// `next_cursor` of the previous page.
        cursor: Query<Option<String>>,
    ) -> Result<Raw<EntryPageView>, GatewayError> {
        let caller = auth.0;
        let cursor = cursor_query(cursor.0.as_deref())?;
        let reply = self
            .gateway
            .wallet
            .get(
                &format!("/accounts/user:{}/entries?{cursor}", caller.sub),
                &caller.request_id,
                self.gateway.timeouts.read,
            )
            .await?;
        if reply.status == StatusCode::NOT_FOUND {
            return Ok(Raw::new(Bytes::from_static(br#"{"entries":[]}"#)));
        }
        Ok(Raw::new(reply.success()?))
    }
}

fn saga_id(id: &str) -> Result<&str, GatewayError> {
    if !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    {
        Ok(id)
    } else {
        Err(Problem::not_found("saga_not_found", format!("no saga `{id}`")).into())
    }
}

/// The grab after authentication: the campaign's limit, then the campaign service.
async fn relay_grab(
    gateway: &Gateway,
    caller: &Caller,
    id: &str,
) -> Result<Raw<GrabResult>, GatewayError> {
    let id = campaign_id(id)?;
    gateway
        .limits
        .campaign
        .check(id, Instant::now())
        .map_err(|wait| rate_limited("per-campaign", wait))?;
    let mut body = Vec::with_capacity(caller.sub.len() + 16);
    body.extend_from_slice(br#"{"user_id":""#);
    body.extend_from_slice(caller.sub.as_bytes());
    body.extend_from_slice(br#""}"#);
    let mut path = String::with_capacity(id.len() + 16);
    path.push_str("/campaigns/");
    path.push_str(id);
    path.push_str("/grab");
    let reply = gateway
        .campaign
        .post_hot(&path, &body, &caller.request_id, gateway.timeouts.grab)
        .await?;
    Ok(Raw::new(reply.success()?))
}

/// `POST /v1/campaigns/{id}/grab` answered ahead of the framework (the OpenAPI service still
/// documents it): the same checks in the same order (global limit, in-flight bound, token, role,
/// per-user limit, campaign id, per-campaign limit, breaker) and the same answers. A request
/// without a bearer token goes to the documented operation, which refuses it.
#[derive(Debug, Clone)]
pub struct HotGrab {
    pub gateway: Arc<Gateway>,
}

/// The campaign id of `/v1/campaigns/{id}/grab`.
fn campaign_id_of(path: &str) -> Option<&str> {
    front::path_segment(path, "/v1/campaigns/", "/grab")
}

/// The scheme of an `Authorization` field: `Bearer`, in any case, then one space.
fn is_bearer(value: &[u8]) -> bool {
    const SCHEME: &[u8] = b"Bearer ";
    value.len() >= SCHEME.len() && value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME)
}

/// The token of an `Authorization: Bearer` field, read as the documented operation reads it:
/// the scheme in any case, one space, a visible-ASCII value, leading blanks of the token
/// skipped.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let visible = value
        .iter()
        .all(|&b| (b' '..0x7f).contains(&b) || b == b'\t');
    if !visible || !is_bearer(value) {
        return None;
    }
    let token = std::str::from_utf8(&value[7..]).ok()?;
    Some(token.trim_start())
}

impl HotRoute for HotGrab {
    /// A grab with a bearer token; one without goes to the documented operation, which refuses
    /// it.
    fn wants(&self, head: &Head<'_>) -> bool {
        head.method() == "POST"
            && campaign_id_of(head.path()).is_some()
            && head.header("authorization").is_some_and(is_bearer)
    }

    /// The grab has no body; one sent is ignored, as the documented operation ignores it.
    async fn call(&self, head: &Head<'_>, _body: &[u8], request_id: &str) -> Reply {
        let gateway = &*self.gateway;
        let _permit = match gateway.admit() {
            Ok(permit) => permit,
            Err(refused) => return Reply::Response(refused.into_response()),
        };
        // A value the documented operation cannot read as a bearer token (a byte outside
        // visible ASCII) is refused there as no token at all, after the same admission.
        let Some(token) = head.header("authorization").and_then(bearer_token) else {
            let missing = poem::Error::from_status(StatusCode::UNAUTHORIZED);
            return Reply::Response(front::error_response(missing));
        };
        let caller = match authenticate_token(gateway, request_id, token, &[Role::User]) {
            Ok(caller) => caller,
            Err(err) => return Reply::Response(front::error_response(err)),
        };
        let id = campaign_id_of(head.path()).unwrap_or_default();
        match relay_grab(gateway, &caller, id).await {
            Ok(raw) => Reply::Json(StatusCode::OK, raw.into_body()),
            Err(err) => Reply::Response(err.into_response()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::bearer_token;

    #[test]
    fn a_bearer_token_is_read_as_the_documented_operation_reads_it() {
        assert_eq!(bearer_token(b"Bearer abc.def"), Some("abc.def"));
        assert_eq!(bearer_token(b"bEARER abc"), Some("abc"), "any case");
        assert_eq!(bearer_token(b"Bearer   abc"), Some("abc"), "blanks skipped");
        assert_eq!(
            bearer_token(b"Bearer "),
            Some(""),
            "empty: refused as a bad token"
        );
        assert!(super::is_bearer(b"bearer x") && !super::is_bearer(b"Bearer"));
        for refused in [
            &b"Bearer"[..],
            b"Basic abc",
            b"Bearerabc",
            b"Bearer ab\xffc",
            b"Bearer ab\x01c",
        ] {
            assert_eq!(bearer_token(refused), None, "{refused:?}");
        }
    }
}
