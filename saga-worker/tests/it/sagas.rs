use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redpacket_saga_worker::TestSwitches;
use redpacket_saga_worker::store::state;
use serde_json::Value;

use crate::faults::Mode;
use crate::helpers::{SagaProcess, System, spawn_system};

/// Every grab's user holds exactly its amount, and the claim is credited.
async fn assert_each_credited_once(system: &System, grabs: &[Value]) {
    let mut expected: HashMap<String, i64> = HashMap::new();
    for grab in grabs {
        let claim = grab["claim_id"].as_str().unwrap();
        let stored = system
            .campaigns
            .store()
            .claim(claim)
            .await
            .unwrap()
            .expect("claim recorded");
        assert_eq!(stored.status, "credited", "{claim}");
        *expected.entry(stored.user_id).or_default() += stored.amount;
    }
    for (user, amount) in expected {
        assert_eq!(
            system.balance(&format!("user:{user}")).await,
            amount,
            "user {user}"
        );
    }
}

async fn credited(system: &System, id: &str) -> i64 {
    system.stats(id).await["packets_credited"].as_i64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_grabs_are_each_credited_once_and_the_campaign_settles() {
    let system = Arc::new(spawn_system(TestSwitches::default(), 500).await);
    let (total, packets) = (1_000_000_i64, 10_000_i64);
    system.top_up("m1", 2_000_000).await;
    let id = system.create_campaign("m1", total, packets, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    assert_eq!(system.balance(&format!("escrow:{id}")).await, total);

    // Escrow = unclaimed + claimed-not-credited, sampled while it runs: what left the escrow
    // (total - escrow) is at least what the campaign marked credited before the read and at
    // most what was grabbed after it (a claim is credited in the wallet first, then marked).
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (system, id, sampling) = (system.clone(), id.clone(), sampling.clone());
        tokio::spawn(async move {
            let mut samples = 0;
            while sampling.load(Ordering::SeqCst) {
                let before = system.stats(&id).await;
                let paid_out = total - system.balance(&format!("escrow:{id}")).await;
                let after = system.stats(&id).await;
                let marked = before["amount_credited"].as_i64().unwrap();
                let grabbed = after["amount_grabbed"].as_i64().unwrap();
                assert!(
                    marked <= paid_out && paid_out <= grabbed,
                    "credited {marked} <= paid out of escrow {paid_out} <= grabbed {grabbed}"
                );
                samples += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };

    let grabs = system
        .grab_all(&id, usize::try_from(packets).unwrap(), 64)
        .await;
    assert_eq!(grabs.len() as i64, packets);
    system
        .wait_until(180, "every claim is credited", || async {
            credited(&system, &id).await == packets
        })
        .await;
    sampling.store(false, Ordering::SeqCst);
    assert!(sampler.await.unwrap() > 0, "the escrow was sampled");

    // At rest the equality is exact: escrow = unclaimed + claimed-not-credited = 0 + 0.
    let stats = system.stats(&id).await;
    assert_eq!(stats["amount_credited"], total);
    assert_eq!(stats["packets_in_flight"], 0);
    // Exhausted → refund saga → settled, with nothing left in the escrow.
    system.wait_for_status(&id, "settled", 60).await;
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(system.balance("merchant:m1").await, 2_000_000 - total);
    assert_each_credited_once(&system, &grabs).await;
    system.assert_ledger().await;
    // The saga's own row ends just after the campaign turned `settled`.
    let refund = format!("refund:{id}");
    system
        .wait_until(10, "the refund saga completes", || async {
            system
                .sagas
                .get(&refund)
                .await
                .unwrap()
                .is_some_and(|saga| saga.state == state::COMPLETED)
        })
        .await;
    Arc::into_inner(system).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_delivered_twice_credit_once() {
    messages_delivered_twice_credit_once_with(500).await;
}

/// The same with every saga driven on its own (batching off).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_delivered_twice_credit_once_one_saga_at_a_time() {
    messages_delivered_twice_credit_once_with(1).await;
}

async fn messages_delivered_twice_credit_once_with(batch: usize) {
    let system = spawn_system(
        TestSwitches {
            duplicate_every_message: true,
        },
        batch,
    )
    .await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 50_000, 300, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    let grabs = system.grab_all(&id, 300, 32).await;
    system
        .wait_until(120, "every claim is credited", || async {
            credited(&system, &id).await == 300
        })
        .await;
    system.wait_for_status(&id, "settled", 120).await;
    assert_each_credited_once(&system, &grabs).await;
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    // Settled: the pool, its hand-off and the relays' leases on it leave Redis.
    system
        .wait_until(10, "the campaign's Redis keys are gone", || async {
            system.redis_keys(&format!("{{c:{id}}}")).await.is_empty()
        })
        .await;
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_worker_s_sagas_are_finished_by_another_and_its_stale_writes_refused() {
    let mut system = spawn_system(TestSwitches::default(), 50).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 10_000, 40, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;

    // The wallet hangs on credits: worker A gets stuck in the middle of every grab saga.
    system.faults.set(Mode::Hang);
    let grabs = system.grab_all(&id, 40, 16).await;
    let first_saga = format!("grab:{}", grabs[0]["claim_id"].as_str().unwrap());
    // A grab saga's row shows it running under A's fence until it ends (its steps in between
    // are not written); with the wallet hanging, it cannot end.
    system
        .wait_until(30, "worker A runs the saga", || async {
            system
                .sagas
                .get(&first_saga)
                .await
                .unwrap()
                .is_some_and(|s| s.state == state::RUNNING)
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stale_fence = system.sagas.get(&first_saga).await.unwrap().unwrap().fence;

    // A dies without acknowledging anything; B starts with a healthy wallet.
    system.worker.take().unwrap().crash();
    system.faults.set(Mode::Pass);
    system.worker = Some(SagaProcess::start(
        system.config.clone(),
        TestSwitches::default(),
    ));
    system
        .wait_until(120, "worker B credits every claim", || async {
            credited(&system, &id).await == 40
        })
        .await;
    assert_each_credited_once(&system, &grabs).await;

    // A wakes up with its old fencing token: its writes are refused.
    system
        .wait_until(10, "B completes the first saga", || async {
            system
                .sagas
                .get(&first_saga)
                .await
                .unwrap()
                .is_some_and(|saga| saga.state == state::COMPLETED)
        })
        .await;
    let saga = system.sagas.get(&first_saga).await.unwrap().unwrap();
    assert!(saga.fence > stale_fence);
    assert!(
        !system
            .sagas
            .advance(&first_saga, stale_fence, "credit", state::RUNNING, None)
            .await
            .unwrap()
    );
    assert_eq!(
        system.sagas.get(&first_saga).await.unwrap().unwrap().state,
        state::COMPLETED
    );
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_wallet_is_retried_and_a_refusing_one_compensates_and_refunds() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 10_000, 60, 20_000).await;
    system.wait_for_status(&id, "active", 30).await;

    // Down for a while: retried with backoff, then credited.
    system.faults.set(Mode::Unavailable);
    let first = system.grab_all(&id, 20, 8).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(credited(&system, &id).await, 0);
    system.faults.set(Mode::Pass);
    system
        .wait_until(60, "the first claims are credited", || async {
            credited(&system, &id).await == 20
        })
        .await;
    assert_each_credited_once(&system, &first).await;

    // Refusing for good: compensated, the packets go back to the pool, the money stays.
    system.faults.set(Mode::RejectCredits);
    let remaining_before = system.stats(&id).await["packets_remaining"]
        .as_i64()
        .unwrap();
    let refused: Vec<Value> = {
        use futures::StreamExt;
        let url = format!("{}/campaigns/{id}/grab", system.campaign_url);
        futures::stream::iter(100..110)
            .map(|i| {
                let (client, url) = (system.client.clone(), url.clone());
                async move {
                    client
                        .post(url)
                        .json(&serde_json::json!({"user_id": format!("r{i}")}))
                        .send()
                        .await
                        .unwrap()
                        .json::<Value>()
                        .await
                        .unwrap()
                }
            })
            .buffer_unordered(4)
            .collect()
            .await
    };
    system
        .wait_until(60, "the refused claims are compensated", || async {
            system.stats(&id).await["packets_compensated"] == 10
        })
        .await;
    for grab in &refused {
        let claim = system
            .campaigns
            .store()
            .claim(grab["claim_id"].as_str().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim.status, "compensated");
        assert!(claim.reason.unwrap().contains("insufficient_funds"));
        assert_eq!(system.balance(&format!("user:{}", claim.user_id)).await, 0);
    }
    assert_eq!(
        system.stats(&id).await["packets_remaining"]
            .as_i64()
            .unwrap(),
        remaining_before
    );
    system.faults.set(Mode::Pass);

    // The campaign expires: the merchant gets back exactly what was not credited.
    system.wait_for_status(&id, "settled", 90).await;
    let credited_amount = system.stats(&id).await["amount_credited"].as_i64().unwrap();
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(
        system.balance("merchant:m1").await,
        100_000 - credited_amount
    );
    assert_eq!(
        system.stats(&id).await["amount_refunded"].as_i64().unwrap(),
        10_000 - credited_amount
    );
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_broker_connection_loses_nothing() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 50_000, 400, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    let first = system.grab_all(&id, 200, 32).await;
    system
        .worker
        .as_ref()
        .unwrap()
        .broker
        .close_connection()
        .await;
    let mut second = {
        use futures::StreamExt;
        let url = format!("{}/campaigns/{id}/grab", system.campaign_url);
        futures::stream::iter(200..400)
            .map(|i| {
                let (client, url) = (system.client.clone(), url.clone());
                async move {
                    client
                        .post(url)
                        .json(&serde_json::json!({"user_id": format!("u{i}")}))
                        .send()
                        .await
                        .unwrap()
                        .json::<Value>()
                        .await
                        .unwrap()
                }
            })
            .buffer_unordered(32)
            .collect::<Vec<Value>>()
            .await
    };
    system
        .worker
        .as_ref()
        .unwrap()
        .broker
        .close_connection()
        .await;
    system
        .wait_until(120, "every claim is credited", || async {
            credited(&system, &id).await == 400
        })
        .await;
    second.extend(first);
    assert_each_credited_once(&system, &second).await;
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn funding_without_money_rejects_the_campaign_and_moves_nothing() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("poor", 1_000).await;
    let id = system.create_campaign("poor", 5_000, 10, 600_000).await;
    system.wait_for_status(&id, "rejected", 30).await;
    let campaign = system.campaign(&id).await;
    assert!(
        campaign["status_reason"]
            .as_str()
            .unwrap()
            .contains("insufficient_funds"),
        "{campaign}"
    );
    assert_eq!(system.balance("merchant:poor").await, 1_000);
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    // The saga's own row ends just after the campaign turned `rejected`.
    let saga_id = format!("fund:{id}");
    system
        .wait_until(10, "the funding saga ends compensated", || async {
            system
                .sagas
                .get(&saga_id)
                .await
                .unwrap()
                .is_some_and(|saga| saga.state == state::COMPENSATED)
        })
        .await;
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saga_out_of_retries_is_dead_lettered_and_replays() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 1_000, 5, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    system.faults.set(Mode::Unavailable);
    let grabs = system.grab_all(&id, 1, 1).await;
    let saga_id = format!("grab:{}", grabs[0]["claim_id"].as_str().unwrap());
    let saga_url = system.worker.as_ref().unwrap().url.clone();
    system
        .wait_until(60, "the saga is stuck", || async {
            system
                .sagas
                .get(&saga_id)
                .await
                .unwrap()
                .is_some_and(|s| s.state == state::STUCK)
        })
        .await;
    let saga = system
        .get_json(&format!("{saga_url}/sagas/{saga_id}"))
        .await;
    assert_eq!(saga["state"], "stuck");
    assert!(
        saga["last_error"].as_str().is_some_and(|e| !e.is_empty()),
        "{saga}"
    );
    let letters = system.get_json(&format!("{saga_url}/dead-letters")).await;
    let letter = letters["dead_letters"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["saga_id"] == saga_id.as_str())
        .expect("dead letter");

    system.faults.set(Mode::Pass);
    let replayed = system
        .post(
            &format!(
                "{saga_url}/dead-letters/{}/replay",
                letter["id"].as_str().unwrap()
            ),
            serde_json::json!({}),
        )
        .await;
    assert_eq!(replayed.status(), 200);
    system
        .wait_until(30, "the replayed saga completes", || async {
            system
                .sagas
                .get(&saga_id)
                .await
                .unwrap()
                .is_some_and(|s| s.state == state::COMPLETED)
        })
        .await;
    assert_each_credited_once(&system, &grabs).await;
    let letters = system.get_json(&format!("{saga_url}/dead-letters")).await;
    assert!(
        letters["dead_letters"]
            .as_array()
            .unwrap()
            .iter()
            .all(|l| l["saga_id"] != saga_id.as_str())
    );
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_re_drives_a_saga_that_stopped_moving() {
    use sea_orm::{ConnectionTrait, Statement};
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 1_000, 5, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    let grabs = system.grab_all(&id, 1, 1).await;
    let saga_id = format!("grab:{}", grabs[0]["claim_id"].as_str().unwrap());
    system
        .wait_until(30, "the saga completes", || async {
            system
                .sagas
                .get(&saga_id)
                .await
                .unwrap()
                .is_some_and(|s| s.state == state::COMPLETED)
        })
        .await;

    // Its message is gone; the row says it stopped half-way an hour ago.
    let backend = system.sagas.db().get_database_backend();
    let hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    system
        .sagas
        .db()
        .execute_raw(Statement::from_string(
            backend,
            format!("UPDATE saga_sagas SET state = 'running', step = 'record', updated_at_ms = {hour_ago} WHERE id = '{saga_id}'"),
        ))
        .await
        .unwrap();
    let broker = system.worker.as_ref().unwrap().broker.clone();
    let redriven =
        redpacket_saga_worker::sweeper::sweep_once(&system.sagas, &broker, Duration::from_secs(60))
            .await
            .unwrap();
    assert_eq!(redriven, 1);
    system
        .wait_until(30, "the re-driven saga completes again", || async {
            system
                .sagas
                .get(&saga_id)
                .await
                .unwrap()
                .is_some_and(|s| s.state == state::COMPLETED)
        })
        .await;
    // Every step was idempotent: the user was credited once.
    assert_each_credited_once(&system, &grabs).await;
    system.assert_ledger().await;
    system.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_hand_off_entry_is_dead_lettered_not_dropped() {
    use lapin::options::BasicGetOptions;
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 1_000, 5, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    let stream = format!("{}:{{c:{id}}}:h:0", system.config.redis_prefix);
    let mut redis = redis::Client::open(crate::helpers::redis_url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: String = redis::cmd("XADD")
        .arg(&stream)
        .arg("*")
        .arg("claim")
        .arg("broken")
        .query_async(&mut redis)
        .await
        .unwrap();
    system
        .wait_until(30, "the entry left the stream", || {
            let mut redis = redis.clone();
            let stream = stream.clone();
            async move {
                let length: i64 = redis::cmd("XLEN")
                    .arg(&stream)
                    .query_async(&mut redis)
                    .await
                    .unwrap();
                length == 0
            }
        })
        .await;
    let connection = lapin::Connection::connect(
        &crate::helpers::amqp_url(),
        lapin::ConnectionProperties::default()
            .with_executor(tokio_executor_trait::Tokio::current())
            .with_reactor(tokio_reactor_trait::Tokio::current()),
    )
    .await
    .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let dead = system
        .worker
        .as_ref()
        .unwrap()
        .broker
        .topology()
        .dead
        .clone();
    let message = channel
        .basic_get(&dead, BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("the entry is in the dead queue");
    let body: Value = serde_json::from_slice(&message.delivery.data).unwrap();
    assert_eq!(body["fields"]["claim"], "broken", "{body}");
    let _ = connection.close(200, "done").await;
    system.stop().await;
}

/// A refund waits for the claims in flight as long as they take, beyond the whole retry budget
/// (8 levels from 20 ms: about 5 s here), and is not dead-lettered for waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refund_waits_for_claims_in_flight_beyond_its_retry_budget() {
    let system = spawn_system(TestSwitches::default(), 500).await;
    system.top_up("m1", 100_000).await;
    let id = system.create_campaign("m1", 10_000, 20, 600_000).await;
    system.wait_for_status(&id, "active", 30).await;
    // The wallet hangs on credits: every claim stays in flight while the campaign sells out.
    system.faults.set(Mode::Hang);
    let grabs = system.grab_all(&id, 20, 8).await;
    system.wait_for_status(&id, "exhausted", 30).await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(credited(&system, &id).await, 0);
    let refund = system
        .sagas
        .get(&format!("refund:{id}"))
        .await
        .unwrap()
        .expect("the refund saga started");
    assert_eq!(refund.state, state::RUNNING, "{refund:?}");
    system.faults.set(Mode::Pass);
    system.wait_for_status(&id, "settled", 120).await;
    assert_each_credited_once(&system, &grabs).await;
    assert!(system.sagas.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(system.balance(&format!("escrow:{id}")).await, 0);
    assert_eq!(system.balance("merchant:m1").await, 100_000 - 10_000);
    system.assert_ledger().await;
    system.stop().await;
}
