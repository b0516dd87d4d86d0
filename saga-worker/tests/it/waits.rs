//! Nothing waits forever: a saga that waits on another has a bound, past which it is stuck
//! with its reason (in the saga API, the dead letters and the reconciliation); and purging old
//! sagas never removes what a live campaign's sagas still need.

use std::time::Duration;

use redpacket_saga_worker::TestSwitches;
use redpacket_saga_worker::store::state;
use serde_json::{Value, json};

use crate::faults::Mode;
use crate::helpers::{spawn_system, spawn_system_with};

/// Thirty days from now: every finished saga is older than that by then.
fn weeks_later_ms() -> i64 {
    chrono::Utc::now().timestamp_millis() + 30 * 24 * 3600 * 1000
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_ending_weeks_after_its_funding_still_refunds_exactly() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 10_000, 50, 6_000).await;
    system.wait_for_status(&id, "active", 30).await;
    let grabs = system.grab_all(&id, 20, 4).await;
    system
        .wait_until(30, "the grabs are credited", || async {
            system.stats(&id).await["packets_credited"] == 20
        })
        .await;
    // The sweeper's purge, as if weeks had passed: the finished grab sagas go, the funding
    // saga of the live campaign stays for its refund.
    // The grab sagas end just after their claims are marked credited.
    let purged = std::sync::atomic::AtomicU64::new(0);
    system
        .wait_until(30, "the finished grab sagas are purged", || async {
            let now = system.sagas.purge_finished(weeks_later_ms()).await.unwrap();
            purged.fetch_add(now, std::sync::atomic::Ordering::SeqCst) + now >= 20
        })
        .await;
    assert_eq!(purged.into_inner(), 20, "the grab sagas only");
    let funding = system.sagas.get(&format!("fund:{id}")).await.unwrap();
    assert!(funding.is_some_and(|f| f.state == state::COMPLETED));

    system.wait_for_status(&id, "settled", 60).await;
    let credited: i64 = grabs.iter().map(|g| g["amount"].as_i64().unwrap()).sum();
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(system.balance("merchant:m1").await, 100_000 - credited);
    assert_eq!(
        system.stats(&id).await["amount_refunded"],
        10_000 - credited
    );
    // Settled: its funding and refund sagas go together.
    let purged = system.sagas.purge_finished(weeks_later_ms()).await.unwrap();
    assert_eq!(purged, 2);
    assert!(
        system
            .sagas
            .get(&format!("fund:{id}"))
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        system
            .sagas
            .get(&format!("refund:{id}"))
            .await
            .unwrap()
            .is_none()
    );
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_while_the_funding_is_refused_still_settles() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("poor", 1_000).await;
    // The wallet is out of reach: the funding saga retries while the merchant cancels.
    system.faults.set(Mode::Unavailable);
    let response = system
        .post(
            &format!("{}/campaigns", system.campaign_url),
            json!({
                "merchant_id": "poor", "title": "cancelled", "currency": "CNY",
                "total_amount": 5_000, "packet_count": 10, "split": {"mode": "fixed"},
                "starts_at": crate::helpers::rfc3339_in(60_000),
                "ends_at": crate::helpers::rfc3339_in(600_000),
            }),
        )
        .await;
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    system
        .wait_until(30, "the funding saga has started", || async {
            system
                .sagas
                .get(&format!("fund:{id}"))
                .await
                .unwrap()
                .is_some()
        })
        .await;
    let cancelled = system
        .post(
            &format!("{}/campaigns/{id}/cancel", system.campaign_url),
            json!({"merchant_id": "poor"}),
        )
        .await;
    assert_eq!(cancelled.status(), 200);
    // Back: the funding is refused (too little money) after the cancel.
    system.faults.set(Mode::Pass);
    system.wait_for_status(&id, "settled", 60).await;
    let funding = system
        .sagas
        .get(&format!("fund:{id}"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(funding.state, state::COMPENSATED, "{funding:?}");
    assert_eq!(system.stats(&id).await["amount_refunded"], 0);
    assert_eq!(system.balance("merchant:poor").await, 1_000);
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert!(system.sagas.dead_letters(10).await.unwrap().is_empty());
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_waiting_past_its_bound_is_stuck_with_its_reason_and_replays() {
    let system = spawn_system_with(TestSwitches::default(), 500, |config| {
        config.retry_budget = Duration::from_secs(120);
        config.wait_max = Duration::from_secs(3);
    })
    .await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 10_000, 20, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    // The wallet hangs on credits: every claim stays in flight after the campaign sells out.
    system.faults.set(Mode::Hang);
    let grabs = system.grab_all(&id, 20, 8).await;
    system.wait_for_status(&id, "exhausted", 30).await;
    let refund_id = format!("refund:{id}");
    system
        .wait_until(30, "the refund saga is stuck", || async {
            system
                .sagas
                .get(&refund_id)
                .await
                .unwrap()
                .is_some_and(|saga| saga.state == state::STUCK)
        })
        .await;
    let saga_url = system.worker.as_ref().unwrap().url.clone();
    let saga = system
        .get_json(&format!("{saga_url}/sagas/{refund_id}"))
        .await;
    let reason = saga["last_error"].as_str().unwrap();
    assert!(
        reason.contains("waited more than 3 s") && reason.contains("in flight"),
        "{saga}"
    );
    let checks = system.get_json(&format!("{saga_url}/reconciliation")).await;
    let check = &checks["checks"][0];
    assert_eq!(check["name"], "no_stuck_sagas");
    assert_eq!(check["ok"], false);
    assert!(
        check["detail"].as_str().unwrap().contains(&refund_id),
        "{checks}"
    );

    // The wallet is back: the grabs are credited; the operator replays the refund.
    system.faults.set(Mode::Pass);
    system
        .wait_until(60, "the grabs are credited", || async {
            system.stats(&id).await["packets_credited"] == 20
        })
        .await;
    let letters = system.get_json(&format!("{saga_url}/dead-letters")).await;
    let letter = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["saga_id"] == refund_id.as_str())
        .expect("the stuck refund is a dead letter")
        .clone();
    let replayed = system
        .post(
            &format!(
                "{saga_url}/dead-letters/{}/replay",
                letter["id"].as_str().unwrap()
            ),
            json!({}),
        )
        .await;
    assert_eq!(replayed.status(), 200);
    system.wait_for_status(&id, "settled", 60).await;
    let checks = system.get_json(&format!("{saga_url}/reconciliation")).await;
    assert_eq!(checks["checks"][0]["ok"], true, "{checks}");
    assert_eq!(grabs.len(), 20);
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(system.balance("merchant:m1").await, 100_000 - 10_000);
    system.assert_ledger().await;
    system.stop().await;
}
