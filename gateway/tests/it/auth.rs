//! Every operation × every role, and every kind of bad token.

use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use redpacket_common::auth::{Role, TokenKey};
use reqwest::Method;
use serde_json::{Value, json};

use crate::system::{System, key, token};

/// The operations and the roles allowed to call them.
fn operations(campaign: &str, claim: &str) -> Vec<(Method, String, &'static [Role])> {
    use Role::{Merchant, Operator, User};
    vec![
        (Method::POST, "/v1/admin/topups".into(), &[Operator]),
        (Method::GET, "/v1/admin/sagas/nope".into(), &[Operator]),
        (Method::GET, "/v1/admin/dead-letters".into(), &[Operator]),
        (
            Method::POST,
            "/v1/admin/dead-letters/nope/replay".into(),
            &[Operator],
        ),
        (Method::GET, "/v1/admin/reconciliation".into(), &[Operator]),
        (Method::GET, "/v1/admin/breakers".into(), &[Operator]),
        (Method::POST, "/v1/campaigns".into(), &[Merchant]),
        (Method::GET, "/v1/campaigns".into(), &[Merchant]),
        (
            Method::GET,
            format!("/v1/campaigns/{campaign}"),
            &[Merchant, Operator, User],
        ),
        (
            Method::GET,
            format!("/v1/campaigns/{campaign}/stats"),
            &[Merchant, Operator],
        ),
        (
            Method::GET,
            format!("/v1/campaigns/{campaign}/claims"),
            &[Merchant, Operator],
        ),
        (
            Method::POST,
            format!("/v1/campaigns/{campaign}/cancel"),
            &[Merchant],
        ),
        (Method::GET, "/v1/merchants/me/wallet".into(), &[Merchant]),
        (
            Method::POST,
            format!("/v1/campaigns/{campaign}/grab"),
            &[User],
        ),
        (
            Method::GET,
            format!("/v1/claims/{claim}"),
            &[User, Operator],
        ),
        (Method::GET, "/v1/me/claims".into(), &[User]),
        (Method::GET, "/v1/me/wallet".into(), &[User]),
        (Method::GET, "/v1/me/wallet/entries".into(), &[User]),
    ]
}

#[tokio::test]
async fn every_operation_checks_the_token_and_the_role() {
    let system = System::start().await;
    system.top_up("acme", 10_000).await;
    let campaign = system.active_campaign("acme", 1000, 10).await;
    let (status, grabbed) = system
        .gateway
        .post(
            &format!("/v1/campaigns/{campaign}/grab"),
            &token(Role::User, "owner"),
            None,
        )
        .await;
    assert_eq!(status, 200, "{grabbed}");
    let claim = grabbed["claim_id"].as_str().unwrap().to_owned();

    let expired = key()
        .mint_at(Role::Operator, "ops", Duration::from_secs(60), 1_000)
        .unwrap();
    let foreign = TokenKey::new(b"another-secret-another-secret-another")
        .mint(Role::Operator, "ops", Duration::from_secs(60))
        .unwrap();
    let none_alg = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(br#"{"sub":"ops","role":"operator","exp":99999999999}"#)
    );
    let bad_tokens = [
        ("expired", expired),
        ("badly signed", foreign),
        ("alg none", none_alg),
        ("malformed", "not.a.jwt".to_owned()),
    ];

    for (method, path, allowed) in operations(&campaign, &claim) {
        let body = (method == Method::POST).then(|| json!({}));
        let (status, _, problem) = system
            .gateway
            .send(method.clone(), &path, None, body.clone())
            .await;
        assert_eq!(status, 401, "{method} {path} without a token: {problem}");
        assert_eq!(problem["code"], "unauthorized");
        // A value that is not a readable bearer token (a byte outside visible ASCII, no space
        // after the scheme) counts as no token, on the hot grab as everywhere else.
        for unreadable in [&b"Bearer ab\xffcd"[..], b"Bearer", b"Basic abc"] {
            let response = system
                .gateway
                .client
                .request(method.clone(), format!("{}{path}", system.gateway.url))
                .header(
                    "authorization",
                    reqwest::header::HeaderValue::from_bytes(unreadable).unwrap(),
                )
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), 401, "{method} {path} {unreadable:?}");
            let problem: Value = response.json().await.unwrap();
            assert_eq!(
                problem["code"], "unauthorized",
                "{method} {path} {unreadable:?}"
            );
        }
        for (what, bad) in &bad_tokens {
            let (status, _, problem) = system
                .gateway
                .send(method.clone(), &path, Some(bad), body.clone())
                .await;
            assert_eq!(
                status, 401,
                "{method} {path} with an {what} token: {problem}"
            );
            assert_eq!(problem["code"], "invalid_token");
        }
        for role in [Role::User, Role::Merchant, Role::Operator] {
            let sub = match role {
                Role::User => "owner",
                Role::Merchant => "acme",
                Role::Operator => "ops",
            };
            let (status, _, problem) = system
                .gateway
                .send(method.clone(), &path, Some(&token(role, sub)), body.clone())
                .await;
            if allowed.contains(&role) {
                assert!(
                    status != 401 && status != 403,
                    "{method} {path} as {role} must pass auth: {status} {problem}"
                );
            } else {
                assert_eq!(status, 403, "{method} {path} as {role}: {problem}");
                assert_eq!(problem["code"], "forbidden_role");
            }
        }
    }
}

#[tokio::test]
async fn others_campaigns_and_claims_do_not_exist_for_you() {
    let system = System::start().await;
    system.top_up("acme", 10_000).await;
    let campaign = system.active_campaign("acme", 1000, 10).await;
    let (_, grabbed) = system
        .gateway
        .post(
            &format!("/v1/campaigns/{campaign}/grab"),
            &token(Role::User, "alice"),
            None,
        )
        .await;
    let claim = grabbed["claim_id"].as_str().unwrap();

    let rival = token(Role::Merchant, "rival");
    for path in [
        format!("/v1/campaigns/{campaign}"),
        format!("/v1/campaigns/{campaign}/stats"),
        format!("/v1/campaigns/{campaign}/claims"),
    ] {
        let (status, problem) = system.gateway.get(&path, &rival).await;
        assert_eq!(status, 404, "{path}: {problem}");
        assert_eq!(problem["code"], "campaign_not_found");
    }
    let (status, _) = system
        .gateway
        .post(&format!("/v1/campaigns/{campaign}/cancel"), &rival, None)
        .await;
    assert_eq!(status, 404);
    let (status, problem) = system
        .gateway
        .get(
            &format!("/v1/claims/{claim}"),
            &token(Role::User, "mallory"),
        )
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (404, Some("claim_not_found"))
    );
    // The owner and operators see them.
    let (status, _) = system
        .gateway
        .get(&format!("/v1/claims/{claim}"), &token(Role::User, "alice"))
        .await;
    assert_eq!(status, 200);
    let (status, _) = system
        .gateway
        .get(
            &format!("/v1/campaigns/{campaign}/stats"),
            &token(Role::Operator, "ops"),
        )
        .await;
    assert_eq!(status, 200);
}
