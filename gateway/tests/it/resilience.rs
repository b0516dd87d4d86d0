//! Breakers, rate limits and the in-flight bound, against a fake upstream a test controls.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use redpacket_common::auth::Role;
use redpacket_gateway::GatewayConfig;
use redpacket_gateway::breaker::BreakerConfig;
use redpacket_gateway::limits::Rate;
use reqwest::Method;
use serde_json::Value;

use crate::system::{FakeUpstream, Gateway, Mode, gateway_config, token};

async fn gateway_over(fake: &FakeUpstream, adjust: impl FnOnce(&mut GatewayConfig)) -> Gateway {
    let mut config = gateway_config(&fake.url, &fake.url, &fake.url);
    config.breaker = BreakerConfig {
        window: 10,
        min_calls: 5,
        failure_percent: 50,
        slow_percent: 50,
        slow_call: Duration::from_millis(100),
        open_for: Duration::from_millis(700),
        probes: 2,
    };
    adjust(&mut config);
    Gateway::start(config).await
}

async fn grab(
    gateway: &Gateway,
    user: &str,
    campaign: &str,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let (status, headers, body) = gateway
        .send(
            Method::POST,
            &format!("/v1/campaigns/{campaign}/grab"),
            Some(&token(Role::User, user)),
            None,
        )
        .await;
    (status.as_u16(), headers, body)
}

async fn breaker_state(gateway: &Gateway) -> String {
    let (_, body) = gateway
        .get("/v1/admin/breakers", &token(Role::Operator, "ops"))
        .await;
    body["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["upstream"] == "campaign")
        .unwrap()["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Drives the breaker open with `mode`, checks it fails fast while open, then lets the
/// upstream recover and sees half-open probes close it.
async fn opens_then_recovers(mode: Mode) {
    let fake = FakeUpstream::start().await;
    let gateway = gateway_over(&fake, |_| {}).await;
    fake.set(mode);
    for i in 0..5 {
        let (status, _, _) = grab(&gateway, &format!("u{i}"), "1").await;
        match mode {
            Mode::Fail => assert_eq!(status, 500, "the upstream's failure is relayed"),
            _ => assert_eq!(status, 200, "a slow answer is still an answer"),
        }
    }
    assert_eq!(breaker_state(&gateway).await, "open");
    let calls = fake.calls.load(Ordering::Relaxed);
    let started = Instant::now();
    let (status, headers, problem) = grab(&gateway, "u9", "1").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("upstream_unavailable"))
    );
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_millis(100),
        "open means no call"
    );
    assert_eq!(
        fake.calls.load(Ordering::Relaxed),
        calls,
        "the upstream was spared"
    );

    let metrics = gateway
        .client
        .get(format!("{}/metrics", gateway.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("rp_gateway_breaker_state{service=\"gateway\",upstream=\"campaign\"} 2")
            || metrics
                .contains("rp_gateway_breaker_state{upstream=\"campaign\",service=\"gateway\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("rp_gateway_breaker_transitions_total"));

    fake.set(Mode::Ok);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, _, _) = grab(&gateway, "p1", "1").await;
    assert_eq!(status, 200, "the first probe goes through");
    assert_eq!(breaker_state(&gateway).await, "half_open");
    let (status, _, _) = grab(&gateway, "p2", "1").await;
    assert_eq!(status, 200);
    assert_eq!(
        breaker_state(&gateway).await,
        "closed",
        "two good probes close it"
    );
}

#[tokio::test]
async fn a_failing_upstream_opens_the_breaker_which_recovers_through_half_open() {
    opens_then_recovers(Mode::Fail).await;
}

#[tokio::test]
async fn a_slow_upstream_opens_the_breaker_too() {
    opens_then_recovers(Mode::Slow(150)).await;
}

#[tokio::test]
async fn a_failed_probe_opens_it_again() {
    let fake = FakeUpstream::start().await;
    let gateway = gateway_over(&fake, |_| {}).await;
    fake.set(Mode::Fail);
    for i in 0..5 {
        grab(&gateway, &format!("u{i}"), "1").await;
    }
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (status, _, _) = grab(&gateway, "p1", "1").await;
    assert_eq!(status, 500, "the probe reached the still-failing upstream");
    assert_eq!(breaker_state(&gateway).await, "open");
}

#[tokio::test]
async fn the_per_user_limit_is_exact() {
    let fake = FakeUpstream::start().await;
    let gateway = gateway_over(&fake, |config| {
        config.limits.user = Rate {
            per_second: 1,
            burst: 3,
        };
    })
    .await;
    for _ in 0..3 {
        assert_eq!(grab(&gateway, "alice", "1").await.0, 200);
    }
    let (status, headers, problem) = grab(&gateway, "alice", "1").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (429, Some("rate_limited"))
    );
    assert_eq!(problem["limit"], "per-user");
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(
        grab(&gateway, "bob", "1").await.0,
        200,
        "another user has their own bucket"
    );
    tokio::time::sleep(Duration::from_millis(1050)).await;
    assert_eq!(
        grab(&gateway, "alice", "1").await.0,
        200,
        "one token back after a second"
    );
    assert_eq!(grab(&gateway, "alice", "1").await.0, 429);
}

#[tokio::test]
async fn the_per_campaign_limit_is_exact() {
    let fake = FakeUpstream::start().await;
    let gateway = gateway_over(&fake, |config| {
        config.limits.campaign = Rate {
            per_second: 1,
            burst: 5,
        };
    })
    .await;
    for i in 0..5 {
        assert_eq!(grab(&gateway, &format!("u{i}"), "7").await.0, 200);
    }
    let (status, _, problem) = grab(&gateway, "u5", "7").await;
    assert_eq!(
        (status, problem["limit"].as_str()),
        (429, Some("per-campaign"))
    );
    assert_eq!(
        grab(&gateway, "u5", "8").await.0,
        200,
        "another campaign is not limited"
    );
}

#[tokio::test]
async fn the_global_limit_is_exact() {
    let fake = FakeUpstream::start().await;
    let gateway = gateway_over(&fake, |config| {
        config.limits.global = Rate {
            per_second: 1,
            burst: 4,
        };
    })
    .await;
    for i in 0..4 {
        let path = if i % 2 == 0 {
            "/v1/ping"
        } else {
            "/v1/campaigns/1/grab"
        };
        let method = if i % 2 == 0 {
            Method::GET
        } else {
            Method::POST
        };
        let (status, _, _) = gateway
            .send(
                method,
                path,
                Some(&token(Role::User, &format!("u{i}"))),
                None,
            )
            .await;
        assert_eq!(status, 200);
    }
    let (status, headers, problem) = gateway.send(Method::GET, "/v1/ping", None, None).await;
    assert_eq!(
        (status.as_u16(), problem["limit"].as_str()),
        (429, Some("global"))
    );
    assert!(headers.contains_key("retry-after"));
}

#[tokio::test]
async fn beyond_the_in_flight_bound_requests_are_shed_not_queued() {
    let fake = FakeUpstream::start().await;
    fake.set(Mode::Slow(500));
    let gateway = gateway_over(&fake, |config| {
        config.max_in_flight = 2;
        config.breaker.slow_call = Duration::from_secs(10);
    })
    .await;
    let gateway = std::sync::Arc::new(gateway);
    let mut tasks = Vec::new();
    for i in 0..2 {
        let gateway = gateway.clone();
        tasks.push(tokio::spawn(async move {
            grab(&gateway, &format!("u{i}"), "1").await.0
        }));
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let started = Instant::now();
    let (status, headers, problem) = grab(&gateway, "u3", "1").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("overloaded"))
    );
    assert!(headers.contains_key("retry-after"));
    assert!(
        started.elapsed() < Duration::from_millis(200),
        "shed at once"
    );
    for task in tasks {
        assert_eq!(task.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn an_overloaded_upstream_is_relayed_as_503_with_its_retry_after_on_grabs_and_reads() {
    let fake = FakeUpstream::start().await;
    fake.set(Mode::Overloaded);
    let gateway = gateway_over(&fake, |_| {}).await;
    let (status, headers, problem) = grab(&gateway, "u1", "1").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (503, Some("overloaded")),
        "the grab relay: {problem}"
    );
    assert_eq!(headers["retry-after"], "2");
    let (status, headers, problem) = gateway
        .send(
            Method::GET,
            "/v1/me/claims",
            Some(&token(Role::User, "u2")),
            None,
        )
        .await;
    assert_eq!(
        (status.as_u16(), problem["code"].as_str()),
        (503, Some("overloaded")),
        "a read: {problem}"
    );
    assert_eq!(headers["retry-after"], "2");
}

#[tokio::test]
async fn a_hanging_upstream_hits_the_route_timeout() {
    let fake = FakeUpstream::start().await;
    fake.set(Mode::Slow(3000));
    let gateway = gateway_over(&fake, |config| {
        config.timeouts.grab = Duration::from_millis(300);
    })
    .await;
    let started = Instant::now();
    let (status, _, problem) = grab(&gateway, "u1", "1").await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (504, Some("upstream_timeout"))
    );
    assert!(started.elapsed() < Duration::from_millis(1000));
}
