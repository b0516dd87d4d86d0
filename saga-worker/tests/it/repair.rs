//! The saga worker's repair: sagas dead-lettered by an outage longer than their budget are
//! replayed and credited once, a claim handed in as pending too included; a second repair
//! finds nothing.

use std::time::Duration;

use redpacket_saga_worker::TestSwitches;
use serde_json::{Value, json};

use crate::faults::Mode;
use crate::helpers::spawn_system_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repair_replays_dead_lettered_sagas_once_each_and_a_second_run_finds_nothing() {
    let system = spawn_system_with(TestSwitches::default(), 500, |config| {
        config.retry_budget = Duration::from_secs(2);
        config.wait_max = Duration::from_secs(60);
    })
    .await;
    system.top_up("m1", 100_000).await;
    let campaign = system.create_campaign("m1", 1_000, 10, 600_000).await;
    system.wait_for_status(&campaign, "active", 30).await;
    system.faults.set(Mode::Unavailable);
    let grabs = system.grab_all(&campaign, 4, 2).await;
    system
        .wait_until(60, "every grab saga is dead-lettered", || async {
            system.sagas.dead_letters(100).await.unwrap().len() == 4
        })
        .await;
    system.faults.set(Mode::Pass);
    let saga_url = system.worker.as_ref().unwrap().url.clone();
    let repair = |body: Value| {
        let (system, url) = (&system, format!("{saga_url}/repair"));
        async move {
            let response = system.post(&url, body).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, problem) = repair(json!({"limit": 0})).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("limit")));
    // An id outside its alphabet is refused, naming it, never folded into a saga id.
    let odd = json!({
        "claim_id": "c1", "campaign_id": campaign, "user_id": "u 0",
        "packet_seq": 0, "amount": 1, "currency": "CNY", "grabbed_at_ms": 0,
    });
    let (status, problem) = repair(json!({"grabs": [odd]})).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("grabs[0].user_id"))
    );

    // One of the claims is also handed in as pending, as the campaign service lists it: its
    // dead letter is replayed once, not twice (the letter's own message, whatever the rest of
    // what is handed in says).
    let first = &grabs[0];
    let pending = json!({
        "claim_id": first["claim_id"], "campaign_id": campaign, "user_id": "u0",
        "packet_seq": 0, "amount": first["amount"], "currency": "CNY", "grabbed_at_ms": 0,
    });
    let (status, report) = repair(json!({"grabs": [pending], "stalled_after_ms": 60_000})).await;
    assert_eq!(status, 200, "{report}");
    let findings = report["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 4, "{report}");
    for finding in findings {
        assert_eq!(finding["repaired"], true, "{finding}");
        assert!(
            finding["action"].as_str().unwrap().ends_with(": replayed"),
            "{finding}"
        );
    }
    assert_eq!(findings[0]["kind"], "claim_pending");
    assert_eq!(
        findings[0]["id"],
        format!("grab:{}", first["claim_id"].as_str().unwrap())
    );
    system
        .wait_until(30, "every grab is credited", || async {
            system.stats(&campaign).await["packets_credited"] == grabs.len()
        })
        .await;
    let (_, again) = repair(json!({})).await;
    assert_eq!(again["findings"], json!([]), "{again}");
    system.assert_ledger().await;
    system.stop().await;
}
