//! Only the owner refuses an item: a refusal of the whole call (a timeout on the way back, a
//! body too large, a bad gateway, a proxy's page) is never a refusal of the items it carries.
//! A proxy between the saga worker and the wallet or the campaign service answers for a while
//! in one of these ways; when it clears, every grab answered is credited once, nothing is
//! compensated, the refund is exact and the ledger holds.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use redpacket_saga_worker::TestSwitches;
use serde_json::Value;

use crate::faults::{Faults, Mode};
use crate::helpers::{System, spawn_system};

#[derive(Debug, Clone, Copy)]
enum Target {
    Wallet,
    Campaign,
}

fn proxy(system: &System, target: Target) -> &Faults {
    match target {
        Target::Wallet => &system.faults,
        Target::Campaign => &system.campaign_faults,
    }
}

async fn a_whole_call_refused_refuses_no_item(target: Target, mode: Mode) {
    let system = spawn_system(TestSwitches::default(), 500).await;
    let (total, packets) = (30_000_i64, 300_usize);
    system.top_up("m1", 100_000).await;
    let id = system
        .create_campaign("m1", total, i64::try_from(packets).unwrap(), 120_000)
        .await;
    system.wait_for_status(&id, "active", 30).await;

    proxy(&system, target).set(mode);
    let grabs = system.grab_all(&id, packets + 100, 16).await;
    assert_eq!(grabs.len(), packets, "grabs answered never exceed packets");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        proxy(&system, target).faulted.load(Ordering::Relaxed) > 0,
        "the fault reached the saga worker's calls"
    );
    proxy(&system, target).set(Mode::Pass);

    system
        .wait_until(60, "every claim is credited", || async {
            system.stats(&id).await["packets_credited"] == packets
        })
        .await;
    let stats = system.stats(&id).await;
    assert_eq!(
        stats["packets_compensated"], 0,
        "nothing compensated: {stats}"
    );
    let mut expected: HashMap<String, i64> = HashMap::new();
    for grab in &grabs {
        let claim = system
            .campaigns
            .store()
            .claim(grab["claim_id"].as_str().unwrap())
            .await
            .unwrap()
            .expect("claim recorded");
        assert_eq!(claim.status, "credited");
        assert_eq!(claim.amount, grab["amount"].as_i64().unwrap());
        *expected.entry(claim.user_id).or_default() += claim.amount;
    }
    for (user, amount) in &expected {
        assert_eq!(
            system.balance(&format!("user:{user}")).await,
            *amount,
            "user {user} holds exactly what the grab answered"
        );
    }
    let letters = system.sagas.dead_letters(10).await.unwrap();
    assert!(letters.is_empty(), "nothing parked: {letters:?}");

    system.wait_for_status(&id, "settled", 60).await;
    let credited: i64 = expected.values().sum();
    assert_eq!(credited, total, "every packet was granted and credited");
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(system.balance("merchant:m1").await, 100_000 - credited);
    let stats: Value = system.stats(&id).await;
    assert_eq!(stats["amount_refunded"], total - credited);
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wallet_answer_lost_after_its_commit_is_retried_not_compensated() {
    a_whole_call_refused_refuses_no_item(Target::Wallet, Mode::CommitThenLose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_page_in_front_of_the_wallet_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Wallet, Mode::Page(408)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_page_in_front_of_the_wallet_splits_and_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Wallet, Mode::Page(413)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_gateway_in_front_of_the_wallet_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Wallet, Mode::Page(502)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_s_html_404_in_front_of_the_wallet_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Wallet, Mode::Page(404)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_campaign_answer_lost_after_its_commit_is_retried_not_compensated() {
    a_whole_call_refused_refuses_no_item(Target::Campaign, Mode::CommitThenLose).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_page_in_front_of_the_campaign_service_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Campaign, Mode::Page(408)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_too_large_page_in_front_of_the_campaign_service_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Campaign, Mode::Page(413)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_gateway_in_front_of_the_campaign_service_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Campaign, Mode::Page(502)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_s_html_404_in_front_of_the_campaign_service_compensates_nothing() {
    a_whole_call_refused_refuses_no_item(Target::Campaign, Mode::Page(404)).await;
}
