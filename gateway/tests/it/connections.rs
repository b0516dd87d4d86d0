//! The gateway under thousands of slow connections: new clients are still answered at once,
//! and every slow connection is cut at its head deadline.

use std::time::{Duration, Instant};

use redpacket_common::auth::Role;
use redpacket_common::front::{self, ConnectionLimits};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::system::{FakeUpstream, Gateway, gateway_config, token};

/// Slow connections held at once: far more than the event loops or the requests in flight, far
/// fewer than the bound.
const SLOW: usize = 3_000;

#[tokio::test]
async fn thousands_of_half_sent_heads_leave_new_clients_answered_and_are_all_cut_at_the_deadline() {
    // Each slow connection is two descriptors in this process, the client's and the server's.
    let open_files = front::raise_open_files_limit(4 * SLOW).unwrap_or(0);
    assert!(
        open_files >= 2 * SLOW + 1_000,
        "this test needs {} open files, the hard limit allows {open_files}",
        2 * SLOW + 1_000
    );
    let head_timeout = Duration::from_secs(5);
    let fake = FakeUpstream::start().await;
    let mut config = gateway_config(&fake.url, &fake.url, &fake.url);
    config.connections = ConnectionLimits {
        head_timeout,
        keep_alive_timeout: head_timeout,
        max_connections: 2 * SLOW,
    };
    let gateway = Gateway::start(config).await;
    let addr = gateway.url.trim_start_matches("http://").to_owned();

    let first_opened = Instant::now();
    let mut slow = Vec::with_capacity(SLOW);
    for _ in 0..SLOW {
        let mut stream = TcpStream::connect(&addr).await.unwrap();
        stream.write_all(b"POST /v1/campaigns/1/gr").await.unwrap();
        slow.push(stream);
    }

    // New clients, each on a connection of its own, are answered promptly meanwhile.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let grab = |user: String| {
        let fresh = fresh.clone();
        let url = format!("{}/v1/campaigns/1/grab", gateway.url);
        async move {
            let asked = Instant::now();
            let answer = fresh
                .post(url)
                .bearer_auth(token(Role::User, &user))
                .send()
                .await
                .unwrap();
            (answer.status().as_u16(), asked.elapsed())
        }
    };
    let mut slowest = Duration::ZERO;
    for i in 0..50 {
        let (status, took) = grab(format!("u{i}")).await;
        assert_eq!(status, 200, "grab {i} among {SLOW} slow connections");
        slowest = slowest.max(took);
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a new client is answered promptly: the slowest took {slowest:?}"
    );
    assert!(
        first_opened.elapsed() < head_timeout,
        "the new clients were served while every slow connection was held ({:?})",
        first_opened.elapsed()
    );

    // Then every slow connection is cut, none before its deadline.
    let mut chunk = [0u8; 64];
    for (i, stream) in slow.iter_mut().enumerate() {
        let read = tokio::time::timeout_at(
            (first_opened + head_timeout + Duration::from_secs(5)).into(),
            stream.read(&mut chunk),
        )
        .await;
        assert!(
            matches!(read, Ok(Ok(0) | Err(_))),
            "slow connection {i} is cut within 5 s of its deadline: {read:?}"
        );
        if i == 0 {
            assert!(
                first_opened.elapsed() >= head_timeout,
                "cut before its deadline: {:?}",
                first_opened.elapsed()
            );
        }
    }
    let (status, _) = grab("after".to_owned()).await;
    assert_eq!(status, 200);
}
