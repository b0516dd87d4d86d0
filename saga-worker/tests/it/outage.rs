//! Outages are ridden out: with the production retry schedule (200 ms doubling to 25.6 s, then
//! repeating, for a ten-minute budget), a wallet stopped for three minutes while a crowd grabs
//! ends with every grab credited once, and no operator action.

use std::time::Duration;

use redpacket_saga_worker::TestSwitches;

use crate::helpers::spawn_system_with;

/// How long the wallet stays down.
const OUTAGE: Duration = Duration::from_secs(180);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_minute_wallet_outage_during_a_seckill_ends_with_every_grab_credited() {
    let mut system = spawn_system_with(TestSwitches::default(), 500, |config| {
        config.retry_base = Duration::from_millis(200);
        config.retry_budget = Duration::from_secs(600);
        config.wait_max = Duration::from_secs(1800);
    })
    .await;
    system.top_up("m1", 1_000_000).await;
    let (total, packets) = (200_000_i64, 2_000_usize);
    let id = system
        .create_campaign("m1", total, i64::try_from(packets).unwrap(), 600_000)
        .await;
    system.wait_for_status(&id, "active", 30).await;

    system.stop_wallet().await;
    let started = tokio::time::Instant::now();
    let grabs = system.grab_all(&id, packets, 16).await;
    assert_eq!(grabs.len(), packets);
    tokio::time::sleep(OUTAGE.saturating_sub(started.elapsed())).await;
    assert_eq!(system.stats(&id).await["packets_credited"], 0);
    assert!(
        system.sagas.dead_letters(10).await.unwrap().is_empty(),
        "nothing gave up during the outage"
    );
    system.start_wallet().await;

    system
        .wait_until(90, "every grab is credited", || async {
            system.stats(&id).await["packets_credited"] == packets
        })
        .await;
    let stats = system.stats(&id).await;
    assert_eq!(stats["packets_compensated"], 0, "{stats}");
    for grab in grabs.iter().step_by(50) {
        let claim = system
            .campaigns
            .store()
            .claim(grab["claim_id"].as_str().unwrap())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim.status, "credited");
        assert_eq!(
            system.balance(&format!("user:{}", claim.user_id)).await,
            claim.amount
        );
    }
    assert!(system.sagas.dead_letters(10).await.unwrap().is_empty());
    assert_eq!(
        system.balance(&format!("escrow:{id}")).await,
        0,
        "all {total} paid out"
    );
    system.assert_ledger().await;
    system.stop().await;
}
