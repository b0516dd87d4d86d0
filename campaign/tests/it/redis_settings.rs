//! The pool refuses a Redis that would lose what it keeps: one that evicts keys. What it can
//! lose by its persistence settings is reported in the readiness detail.

use redpacket_campaign::RedisPool;
use redpacket_common::testing::{Backend, PrivateRedis};
use serde_json::Value;

use crate::helpers::{PoolKind, Setup, spawn_app, spawn_app_on};

#[tokio::test]
async fn a_redis_that_evicts_keys_is_refused_at_start() {
    let redis = PrivateRedis::start(&["--maxmemory-policy", "allkeys-lru"]).await;
    let refused = RedisPool::connect(&redis.url(), "rpt:evicting").await;
    let err = refused
        .expect_err("an evicting Redis is refused")
        .to_string();
    assert!(err.contains("maxmemory-policy `allkeys-lru`"), "{err}");
    assert!(err.contains("noeviction"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_reports_redis_persistence_and_fails_once_redis_evicts() {
    let setup = Setup {
        backend: Backend::Postgres,
        pool: PoolKind::Redis,
    };
    let app = spawn_app(setup).await;
    let ready: Value = app.get_json("/health/ready").await;
    let detail = ready["detail"].as_str().unwrap();
    assert!(detail.contains("maxmemory-policy noeviction"), "{ready}");
    assert!(detail.contains("aof"), "{ready}");

    let redis = PrivateRedis::start(&["--appendonly", "yes", "--appendfsync", "always"]).await;
    let app = spawn_app_on(setup, 4, &redis.url()).await;
    let ready: Value = app.get_json("/health/ready").await;
    assert!(
        ready["detail"]
            .as_str()
            .unwrap()
            .contains("aof on, appendfsync always"),
        "{ready}"
    );
    // Switched to evicting while the service runs: not ready, and why.
    redis
        .run(&["CONFIG", "SET", "maxmemory-policy", "volatile-lru"])
        .await;
    let response = app
        .client
        .get(format!("{}/health/ready", app.address))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 503);
    let problem: Value = response.json().await.unwrap();
    assert!(
        problem["detail"].as_str().unwrap().contains("volatile-lru"),
        "{problem}"
    );
}
