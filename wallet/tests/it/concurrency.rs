use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use redpacket_common::testing::Backend;
use redpacket_wallet::entity::transfer;
use sea_orm::EntityTrait;
use serde_json::Value;

use crate::helpers::{spawn_app, transfer_body};
use redpacket_common::on_every_backend;

const ACCOUNTS: &[&str] = &[
    "external",
    "merchant:a",
    "merchant:b",
    "escrow:c1",
    "escrow:c2",
    "user:1",
    "user:2",
    "user:3",
    "user:4",
];
const TASKS: u64 = 12;
const OPERATIONS_PER_TASK: usize = 30;

/// What the clients saw: every body sent, and the ids that were answered as applied.
#[derive(Default)]
struct Observed {
    sent: Vec<Value>,
    applied: BTreeMap<String, i64>,
}

fn random_transfer(rng: &mut StdRng, task: u64, op: usize, n: usize) -> Value {
    let debit = if rng.random_bool(0.2) {
        "external"
    } else {
        ACCOUNTS[rng.random_range(1..ACCOUNTS.len())]
    };
    let credit = loop {
        let candidate = ACCOUNTS[rng.random_range(1..ACCOUNTS.len())];
        if candidate != debit {
            break candidate;
        }
    };
    // Amounts large enough that many transfers overdraw.
    transfer_body(
        &format!("t{task}-{op}-{n}"),
        debit,
        credit,
        rng.random_range(1..=800),
    )
}

fn record(observed: &Mutex<Observed>, body: &Value, ok: bool) {
    let mut observed = observed.lock().unwrap();
    if ok {
        let id = body["id"].as_str().unwrap().to_owned();
        let amount = body["amount"].as_i64().unwrap();
        let previous = observed.applied.insert(id.clone(), amount);
        assert!(
            previous.is_none_or(|p| p == amount),
            "{id} applied twice with different amounts"
        );
    }
    observed.sent.push(body.clone());
}

/// Many clients move money at random among a few accounts at once, retrying some transfers
/// and overdrawing often; afterwards the ledger is exact.
async fn random_concurrent_transfers_keep_the_ledger_exact(backend: Backend) {
    let app = Arc::new(spawn_app(backend).await);
    let observed = Arc::new(Mutex::new(Observed::default()));
    let seed: u64 = rand::random();
    println!("seed {seed} (set WALLET_TEST_SEED to replay)");
    let seed = std::env::var("WALLET_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(seed);

    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let app = app.clone();
            let observed = observed.clone();
            tokio::spawn(async move {
                let mut rng = StdRng::seed_from_u64(seed.wrapping_add(task));
                for op in 0..OPERATIONS_PER_TASK {
                    let retry = {
                        let observed = observed.lock().unwrap();
                        (!observed.sent.is_empty() && rng.random_bool(0.25)).then(|| {
                            observed.sent[rng.random_range(0..observed.sent.len())].clone()
                        })
                    };
                    if rng.random_bool(0.3) {
                        let size = rng.random_range(1..=15);
                        let mut bodies: Vec<Value> = (0..size)
                            .map(|n| random_transfer(&mut rng, task, op, n))
                            .collect();
                        bodies.extend(retry);
                        let response = app.batch(bodies.clone()).await;
                        assert_eq!(response.status(), 200);
                        let results: Value = response.json().await.unwrap();
                        for (body, result) in
                            bodies.iter().zip(results["results"].as_array().unwrap())
                        {
                            let ok = result["ok"] == true;
                            assert!(
                                ok || [409, 422].contains(&result["status"].as_u64().unwrap()),
                                "{result}"
                            );
                            record(&observed, body, ok);
                        }
                    } else {
                        let body = retry.unwrap_or_else(|| random_transfer(&mut rng, task, op, 0));
                        let response = app.transfer(&body).await;
                        let status = response.status().as_u16();
                        assert!([200, 409, 422].contains(&status), "{status} for {body}");
                        record(&observed, &body, status == 200);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }

    app.assert_invariants().await;
    let stored: BTreeMap<String, i64> = transfer::Entity::find()
        .all(app.ledger.db())
        .await
        .unwrap()
        .into_iter()
        .map(|t| (t.id, t.amount))
        .collect();
    let observed = std::mem::take(&mut *observed.lock().unwrap());
    // Exactly the ids answered as applied are in the ledger, each once with its amount.
    assert_eq!(stored, observed.applied);
    let distinct_sent: HashSet<&str> = observed
        .sent
        .iter()
        .map(|b| b["id"].as_str().unwrap())
        .collect();
    assert!(
        observed.applied.len() < distinct_sent.len(),
        "some transfers must have been refused"
    );
    let mut total = 0;
    for account in ACCOUNTS {
        let balance = app.balance(account).await;
        if *account != "external" {
            assert!(balance >= 0, "{account} is negative");
        }
        total += balance;
    }
    assert_eq!(total, 0);
    Arc::into_inner(app).unwrap().stop().await;
}
on_every_backend!(random_concurrent_transfers_keep_the_ledger_exact);
