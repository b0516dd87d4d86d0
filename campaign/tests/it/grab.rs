use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::{
    Setup, TestApp, assert_problem, campaign_body, rfc3339_in, spawn_app, spawn_app_with_buckets,
};
use crate::on_every_pool;

/// Runs `grabs` (campaign, user) in parallel with `in_flight` at once; returns (user, status,
/// body) of each.
async fn race(
    app: &Arc<TestApp>,
    id: &str,
    users: Vec<String>,
    in_flight: usize,
) -> Vec<(String, u16, Value)> {
    futures::stream::iter(users)
        .map(|user| {
            let app = app.clone();
            let id = id.to_owned();
            async move {
                let response = app.grab(&id, &user).await;
                let status = response.status().as_u16();
                (user, status, response.json::<Value>().await.unwrap())
            }
        })
        .buffer_unordered(in_flight)
        .collect()
        .await
}

async fn distinct_users_racing_get_exactly_the_packets(setup: Setup) {
    let app = Arc::new(spawn_app_with_buckets(setup, 4).await);
    let (packets, total) = (300_i64, 100_000_i64);
    let id = app.create(&campaign_body(total, packets, 1)).await;
    app.fund_and_open(&id).await;

    let users: Vec<String> = (0..500).map(|i| format!("u{i}")).collect();
    let results = race(&app, &id, users, 64).await;
    let won: Vec<&(String, u16, Value)> = results.iter().filter(|(_, s, _)| *s == 200).collect();
    assert_eq!(
        won.len() as i64,
        packets,
        "grabs = min(users x limit, packets)"
    );
    for (_, status, body) in results.iter().filter(|(_, s, _)| *s != 200) {
        assert_eq!(*status, 410, "{body}");
        assert_eq!(body["code"], "sold_out");
    }
    let winners: HashSet<&str> = won.iter().map(|(user, _, _)| user.as_str()).collect();
    assert_eq!(winners.len(), won.len(), "no user above the limit of 1");
    let grabbed: i64 = won
        .iter()
        .map(|(_, _, body)| body["amount"].as_i64().unwrap())
        .sum();
    assert_eq!(
        grabbed, total,
        "every packet taken, so the amounts sum to the total"
    );

    // The hand-off holds exactly the answered grabs, one to one.
    let handoff = app.handoff(&id, 4).await;
    let answered: BTreeMap<String, (String, i64)> = won
        .iter()
        .map(|(user, _, body)| {
            (
                body["claim_id"].as_str().unwrap().to_owned(),
                (user.clone(), body["amount"].as_i64().unwrap()),
            )
        })
        .collect();
    let handed_off: BTreeMap<String, (String, i64)> = handoff
        .iter()
        .map(|(claim, user, _, amount)| (claim.clone(), (user.clone(), *amount)))
        .collect();
    assert_eq!(handoff.len(), answered.len(), "one hand-off entry per grab");
    assert_eq!(handed_off, answered);
    let seqs: HashSet<u32> = handoff.iter().map(|(_, _, seq, _)| *seq).collect();
    assert_eq!(seqs.len() as i64, packets, "no packet given twice");

    app.wait_for_status(&id, "exhausted").await;
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_remaining"], 0);
    assert_eq!(stats["amount_grabbed"], total);
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_pool!(distinct_users_racing_get_exactly_the_packets);

async fn users_under_a_limit_get_exactly_their_limit(setup: Setup) {
    let app = Arc::new(spawn_app_with_buckets(setup, 8).await);
    let id = app.create(&campaign_body(1_000_000, 1_000, 3)).await;
    app.fund_and_open(&id).await;
    // 40 users try 5 times each, all interleaved.
    let attempts: Vec<String> = (0..200).map(|i| format!("u{}", i % 40)).collect();
    let results = race(&app, &id, attempts, 48).await;
    let mut per_user: HashMap<&str, usize> = HashMap::new();
    for (user, status, body) in &results {
        match status {
            200 => *per_user.entry(user.as_str()).or_default() += 1,
            409 => {
                assert_eq!(body["code"], "limit_reached");
                assert_eq!(body["claims"].as_array().unwrap().len(), 3, "{body}");
            }
            other => panic!("unexpected {other}: {body}"),
        }
    }
    assert_eq!(per_user.len(), 40);
    assert!(per_user.values().all(|n| *n == 3), "{per_user:?}");
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_grabbed"], 120);
    assert_eq!(
        stats["amount_grabbed"].as_i64().unwrap() + stats["amount_remaining"].as_i64().unwrap(),
        1_000_000
    );
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_pool!(users_under_a_limit_get_exactly_their_limit);

async fn one_user_racing_against_itself_gets_exactly_the_limit(setup: Setup) {
    let app = Arc::new(spawn_app(setup).await);
    let id = app.create(&campaign_body(10_000, 100, 2)).await;
    app.fund_and_open(&id).await;
    let results = race(&app, &id, vec!["greedy".to_owned(); 60], 60).await;
    let won: Vec<&Value> = results
        .iter()
        .filter(|r| r.1 == 200)
        .map(|r| &r.2)
        .collect();
    assert_eq!(won.len(), 2);
    let claims: HashSet<&str> = won
        .iter()
        .map(|b| b["claim_id"].as_str().unwrap())
        .collect();
    for (_, status, body) in results.iter().filter(|r| r.1 != 200) {
        assert_eq!(*status, 409);
        assert_eq!(body["code"], "limit_reached");
        let listed: HashSet<&str> = body["claims"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["claim_id"].as_str().unwrap())
            .collect();
        assert_eq!(listed, claims, "the 409 lists the user's existing claims");
    }
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_pool!(one_user_racing_against_itself_gets_exactly_the_limit);

/// When a user's home bucket runs dry, the grab takes from the other buckets.
async fn an_empty_home_bucket_moves_on_to_the_others(setup: Setup) {
    let app = Arc::new(spawn_app_with_buckets(setup, 8).await);
    let id = app.create(&campaign_body(800, 8, 8)).await;
    app.fund_and_open(&id).await;
    // One user takes all 8 packets: one from each bucket, whatever its home.
    for _ in 0..8 {
        assert_eq!(app.grab(&id, "solo").await.status(), 200);
    }
    let body = assert_problem(app.grab(&id, "solo").await, 409, "limit_reached", None).await;
    assert_eq!(body["claims"].as_array().unwrap().len(), 8);
    assert_problem(app.grab(&id, "other").await, 410, "sold_out", None).await;
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_pool!(an_empty_home_bucket_moves_on_to_the_others);

async fn grabs_outside_the_window_or_state_are_refused(setup: Setup) {
    let app = spawn_app(setup).await;
    // Unknown campaigns.
    assert_problem(
        app.grab("123456", "u").await,
        404,
        "campaign_not_found",
        None,
    )
    .await;
    assert_problem(app.grab("nope", "u").await, 404, "campaign_not_found", None).await;

    // Not funded.
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    assert_problem(app.grab(&id, "u").await, 409, "campaign_not_funded", None).await;
    // Bad user id.
    assert_problem(
        app.grab(&id, "a b").await,
        422,
        "invalid_field",
        Some("user_id"),
    )
    .await;

    // Funded, loaded (within the lead), not started.
    let mut later = campaign_body(1_000, 10, 1);
    later["starts_at"] = json!(rfc3339_in(30_000));
    let later_id = app.create(&later).await;
    assert_eq!(
        app.post(&format!("/campaigns/{later_id}/funded"), &json!({}))
            .await
            .status(),
        200
    );
    assert_problem(
        app.grab(&later_id, "u").await,
        409,
        "campaign_not_started",
        None,
    )
    .await;

    // Cancelled before its start: grabs are gone.
    let cancelled = app
        .post(
            &format!("/campaigns/{later_id}/cancel"),
            &json!({"merchant_id": "m1"}),
        )
        .await;
    assert_eq!(cancelled.status(), 200);
    assert_eq!(
        cancelled.json::<Value>().await.unwrap()["status"],
        "cancelled"
    );
    assert_problem(
        app.grab(&later_id, "u").await,
        410,
        "campaign_cancelled",
        None,
    )
    .await;

    // A started campaign cannot be cancelled.
    app.fund_and_open(&id).await;
    assert_problem(
        app.post(&format!("/campaigns/{id}/cancel"), &json!({}))
            .await,
        409,
        "wrong_state",
        None,
    )
    .await;

    // Ended by time.
    let mut short = campaign_body(1_000, 10, 1);
    short["ends_at"] = json!(rfc3339_in(1_500));
    let short_id = app.create(&short).await;
    app.fund_and_open(&short_id).await;
    assert_eq!(app.grab(&short_id, "early").await.status(), 200);
    app.wait_for_status(&short_id, "expired").await;
    assert_problem(
        app.grab(&short_id, "late").await,
        410,
        "campaign_ended",
        None,
    )
    .await;
    let stats = app.get_json(&format!("/campaigns/{short_id}/stats")).await;
    assert_eq!(stats["packets_remaining"], 9);
    assert_eq!(stats["packets_grabbed"], 1);

    // Rejected by its funding saga.
    let rejected = app.create(&campaign_body(1_000, 10, 1)).await;
    let response = app
        .post(
            &format!("/campaigns/{rejected}/rejected"),
            &json!({"reason": "insufficient funds"}),
        )
        .await;
    assert_eq!(response.status(), 200);
    assert_problem(
        app.grab(&rejected, "u").await,
        409,
        "campaign_rejected",
        None,
    )
    .await;
    assert_problem(
        app.post(&format!("/campaigns/{rejected}/funded"), &json!({}))
            .await,
        409,
        "wrong_state",
        None,
    )
    .await;
    app.stop().await;
}
on_every_pool!(grabs_outside_the_window_or_state_are_refused);

/// The grab has a route of its own ahead of the documented operation: every bad request gets
/// the answer a documented operation with a JSON body gives it, and grabs nothing.
async fn a_bad_grab_request_is_answered_like_any_operation_and_grabs_nothing(setup: Setup) {
    let app = spawn_app(setup).await;
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    app.fund_and_open(&id).await;
    let too_large = format!(r#"{{"user_id": "{}"}}"#, "u".repeat(300 * 1024));
    let cases: [(Option<&str>, String); 6] = [
        (None, r#"{"user_id": "alice"}"#.to_owned()),
        (Some("text/plain"), r#"{"user_id": "alice"}"#.to_owned()),
        (Some("application/json"), "{not json".to_owned()),
        (
            Some("application/json"),
            r#"{"user_id": "alice", "x": 1}"#.to_owned(),
        ),
        (Some("application/json"), "{}".to_owned()),
        (Some("application/json"), too_large),
    ];
    for (content_type, body) in cases {
        let send = |path: String| {
            let mut request = app
                .client
                .post(format!("{}{path}", app.address))
                .body(body.clone());
            if let Some(content_type) = content_type {
                request = request.header("content-type", content_type);
            }
            request.send()
        };
        let grab = send(format!("/campaigns/{id}/grab")).await.unwrap();
        // An operation with the same body bound (the batch endpoints take 1 MiB).
        let other = send("/claims/some-claim/record".to_owned()).await.unwrap();
        let (grab_status, other_status) = (grab.status(), other.status());
        assert!(
            grab_status.is_client_error(),
            "{content_type:?} {grab_status}"
        );
        assert_eq!(grab_status, other_status, "{content_type:?}");
        assert_eq!(
            grab.headers()["content-type"],
            "application/problem+json",
            "{content_type:?}"
        );
        let (grab, other): (Value, Value) =
            (grab.json().await.unwrap(), other.json().await.unwrap());
        assert_eq!(
            grab["code"], other["code"],
            "{content_type:?}: {grab} vs {other}"
        );
    }
    // A bad campaign id is the grab's own check.
    assert_problem(
        app.post("/campaigns/nope/grab", &json!({"user_id": "alice"}))
            .await,
        404,
        "campaign_not_found",
        None,
    )
    .await;
    let stats = app.get_json(&format!("/campaigns/{id}/stats")).await;
    assert_eq!(stats["packets_grabbed"], 0, "{stats}");
    app.stop().await;
}
on_every_pool!(a_bad_grab_request_is_answered_like_any_operation_and_grabs_nothing);

/// The grab answered ahead of the framework still gets what the edge gives every request: the
/// client's request id echoed (a new one when it sent none or an insane one) and the HTTP
/// metrics.
async fn the_grab_carries_request_ids_and_is_counted(setup: Setup) {
    let app = spawn_app(setup).await;
    let id = app.create(&campaign_body(1_000, 10, 1)).await;
    app.fund_and_open(&id).await;
    let grab = |user: &'static str, request_id: Option<&'static str>| {
        let mut request = app
            .client
            .post(format!("{}/campaigns/{id}/grab", app.address))
            .json(&json!({ "user_id": user }));
        if let Some(request_id) = request_id {
            request = request.header("x-request-id", request_id);
        }
        request.send()
    };
    let given = grab("alice", Some("trace-abc.1")).await.unwrap();
    assert_eq!(given.status(), 200);
    assert_eq!(given.headers()["x-request-id"], "trace-abc.1");
    for (user, request_id) in [("bob", None), ("carol", Some("not sane!"))] {
        let answer = grab(user, request_id).await.unwrap();
        assert_eq!(answer.status(), 200);
        let echoed = answer.headers()["x-request-id"]
            .to_str()
            .unwrap()
            .to_owned();
        assert!(
            !echoed.is_empty() && echoed != "not sane!",
            "a new id replaces a missing or insane one: {echoed:?}"
        );
    }
    let refused = grab("alice", None).await.unwrap();
    assert_eq!(refused.status(), 409);
    assert!(refused.headers().contains_key("x-request-id"));
    let metrics = app.get("/metrics").await.text().await.unwrap();
    let count = |status: &str| -> u64 {
        metrics
            .lines()
            .filter(|line| {
                line.starts_with("rp_http_requests_total{")
                    && line.contains(r#"method="POST""#)
                    && line.contains(&format!(r#"status="{status}""#))
            })
            .filter_map(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // Creating and funding answer 201 and 200 too: at least the three grabs, and the refused one.
    assert!(count("200") >= 3, "{metrics}");
    assert_eq!(count("409"), 1, "{metrics}");
    app.stop().await;
}
on_every_pool!(the_grab_carries_request_ids_and_is_counted);

/// A pool larger than one load round trip per bucket lands whole: every packet once, in its
/// bucket (`seq % buckets`), in order, with its amount.
#[tokio::test]
async fn a_large_pool_is_loaded_whole_and_in_order() {
    use redis::AsyncCommands;
    use redpacket_campaign::RedisPool;
    use redpacket_campaign::pool::{PacketPool, PoolCampaign};

    let url = redpacket_common::testing::redis_url();
    let prefix = format!("rpt:{}", uuid::Uuid::new_v4().simple());
    let pool = RedisPool::connect(&url, &prefix).await.unwrap();
    let buckets = 3_u32;
    let packets: Vec<i64> = (0..180_001).map(|seq| 1 + seq % 97).collect();
    let now = redpacket_common::time::now_ms();
    let campaign = PoolCampaign {
        id: 7,
        currency: "CNY".to_owned(),
        starts_at_ms: now,
        ends_at_ms: now + 60_000,
        per_user_limit: 1,
        buckets,
    };
    assert!(pool.load(&campaign, &packets).await.unwrap());
    assert!(
        !pool.load(&campaign, &packets).await.unwrap(),
        "a second load changes nothing"
    );

    let mut connection = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let keys: Vec<String> = connection.keys(format!("{prefix}:*")).await.unwrap();
    let mut seen = vec![false; packets.len()];
    let mut lists = 0;
    for key in keys {
        let kind: String = redis::cmd("TYPE")
            .arg(&key)
            .query_async(&mut connection)
            .await
            .unwrap();
        if kind != "list" {
            continue;
        }
        lists += 1;
        let items: Vec<String> = connection.lrange(&key, 0, -1).await.unwrap();
        let mut last = None;
        for item in items {
            let (seq, amount) = item.split_once(':').unwrap();
            let (seq, amount): (usize, i64) = (seq.parse().unwrap(), amount.parse().unwrap());
            assert_eq!(amount, packets[seq], "packet {seq}");
            assert!(last.is_none_or(|last| last < seq), "{key}: in order");
            assert!(
                last.is_none_or(|last| (seq - last) == buckets as usize),
                "{key}: one bucket's packets"
            );
            assert!(
                !std::mem::replace(&mut seen[seq], true),
                "packet {seq} twice"
            );
            last = Some(seq);
        }
    }
    assert_eq!(lists, buckets);
    assert!(seen.iter().all(|seen| *seen), "every packet loaded");
    let leftovers: Vec<String> = connection.keys(format!("{prefix}:*")).await.unwrap();
    let _: () = connection.del(leftovers).await.unwrap();
}
