//! Dead letters replay in bulk (by campaign, by reason, all) with each outcome listed, and a
//! replay repeated answers the same instead of "not found".

use std::time::Duration;

use redpacket_saga_worker::TestSwitches;
use redpacket_saga_worker::store::state;
use serde_json::{Value, json};

use crate::faults::Mode;
use crate::helpers::spawn_system_with;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_replay_in_bulk_by_campaign_then_all_and_a_repeated_replay_answers_the_same() {
    let system = spawn_system_with(TestSwitches::default(), 500, |config| {
        config.retry_budget = Duration::from_secs(2);
        config.wait_max = Duration::from_secs(60);
    })
    .await;
    system.top_up("m1", 100_000).await;
    let first = system.create_campaign("m1", 1_000, 10, 600_000).await;
    let second = system.create_campaign("m1", 1_000, 10, 600_000).await;
    system.wait_for_status(&first, "active", 30).await;
    system.wait_for_status(&second, "active", 30).await;
    // The wallet is out of reach past the retry budget: every grab saga is dead-lettered.
    system.faults.set(Mode::Unavailable);
    let grabs_first = system.grab_all(&first, 6, 3).await;
    let grabs_second = system.grab_all(&second, 4, 2).await;
    let saga_url = system.worker.as_ref().unwrap().url.clone();
    system
        .wait_until(60, "every grab saga is dead-lettered", || async {
            system.sagas.dead_letters(100).await.unwrap().len() == 10
        })
        .await;
    system.faults.set(Mode::Pass);

    let replay = |body: Value| {
        let (system, url) = (&system, format!("{saga_url}/dead-letters/replay"));
        async move {
            let response = system.post(&url, body).await;
            let status = response.status().as_u16();
            (status, response.json::<Value>().await.unwrap())
        }
    };
    let (status, problem) = replay(json!({})).await;
    assert_eq!(
        (status, problem["field"].as_str()),
        (422, Some("all")),
        "{problem}"
    );
    let (status, problem) = replay(json!({"all": true, "limit": 501})).await;
    assert_eq!((status, problem["field"].as_str()), (422, Some("limit")));

    let (status, report) = replay(json!({"campaign_id": first, "limit": 4})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["outcomes"].as_array().unwrap().len(), 4);
    assert_eq!(report["more"], true);
    let (_, rest) = replay(json!({"campaign_id": first, "reason": "out of retries"})).await;
    assert_eq!(rest["outcomes"].as_array().unwrap().len(), 2, "{rest}");
    assert_eq!(rest["more"], false);
    let mut replayed = report["outcomes"].as_array().unwrap().clone();
    replayed.extend(rest["outcomes"].as_array().unwrap().iter().cloned());
    for outcome in &replayed {
        assert_eq!(outcome["outcome"], "replayed", "{outcome}");
    }
    system
        .wait_until(30, "the first campaign's grabs are credited", || async {
            system.stats(&first).await["packets_credited"] == grabs_first.len()
        })
        .await;
    assert_eq!(
        system.stats(&second).await["packets_credited"],
        0,
        "the other campaign's letters were left alone"
    );

    // The same replay again: the saga as it is now, nothing sent twice.
    let letter = replayed[0]["id"].as_str().unwrap();
    let again = system
        .post(
            &format!("{saga_url}/dead-letters/{letter}/replay"),
            json!({}),
        )
        .await;
    assert_eq!(again.status(), 200);
    let saga: Value = again.json().await.unwrap();
    assert_eq!(saga["state"], state::COMPLETED, "{saga}");

    let (_, all) = replay(json!({"all": true})).await;
    assert_eq!(all["outcomes"].as_array().unwrap().len(), 4, "{all}");
    system
        .wait_until(30, "the second campaign's grabs are credited", || async {
            system.stats(&second).await["packets_credited"] == grabs_second.len()
        })
        .await;
    assert!(system.sagas.dead_letters(100).await.unwrap().is_empty());
    system.assert_ledger().await;
    system.stop().await;
}
