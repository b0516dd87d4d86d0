//! Relays: the grab hand-off streams (Redis) and the campaign outbox (the campaign service's
//! internal API) into RabbitMQ.
//!
//! A stream entry is acknowledged and deleted in Redis only after the broker confirmed its
//! message, so a relay that dies in between leaves the entry pending; the next relay claims
//! pending entries that sat idle longer than `CLAIM_IDLE` and publishes them again (the sagas
//! are idempotent, so a second copy is harmless). One relay works a stream at a time: it holds
//! the stream's lease while it does.

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::streams::{StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, Value};
use redpacket_common::lease::{Lease, LeaseManager};
use redpacket_common::messages::{Delivery, Envelope, SagaEvent};
use tokio_util::sync::CancellationToken;

use crate::bus::Bus;
use crate::clients::CampaignClient;

/// The consumer group of the relays on every hand-off stream.
pub const GROUP: &str = "relay";
/// Entries read per stream per round.
const BATCH: usize = 500;
/// Grabs relayed in one message (at most `messages::MAX_ENVELOPES_PER_MESSAGE`). The consumer's
/// prefetch counts messages, so it is divided by this (see `SagaConfig::prefetch`): the grabs in
/// flight stay as many, while a message of its own (a retry, a funding) still finds room.
pub const GRABS_PER_MESSAGE: usize = 10;
/// A pending entry idle this long belonged to a relay that died: it is claimed.
const CLAIM_IDLE: Duration = Duration::from_secs(5);
/// How long a relay holds a stream's lease (renewed while it works).
const LEASE_TTL: Duration = Duration::from_secs(5);
/// How long one blocking read waits for new entries.
const BLOCK: Duration = Duration::from_millis(100);
/// How often the relay looks for new streams.
const DISCOVER_EVERY: Duration = Duration::from_secs(1);
/// The pause after a failed relay round before the next.
const ROUND_RETRY_DELAY: Duration = Duration::from_millis(500);

/// Turns a hand-off entry into a saga message.
fn envelope_of(fields: &HashMap<String, Value>) -> Option<Envelope> {
    let text =
        |name: &str| -> Option<String> { redis::from_redis_value_ref(fields.get(name)?).ok() };
    let request_id = text("rid").filter(|rid| !rid.is_empty());
    let claim_id = text("claim")?;
    Some(Envelope::new(
        format!("grab:{claim_id}"),
        request_id,
        SagaEvent::GrabClaimed {
            campaign_id: text("campaign")?,
            user_id: text("user")?,
            packet_seq: text("seq")?.parse().ok()?,
            amount: text("amount")?.parse().ok()?,
            currency: text("currency")?,
            grabbed_at_ms: text("at")?.parse().ok()?,
            claim_id,
        },
    ))
}

/// Moves hand-off streams into the broker until `shutdown`.
pub async fn relay_handoff(
    redis: ConnectionManager,
    leases: LeaseManager,
    broker: std::sync::Arc<dyn Bus>,
    registry_key: String,
    lease_prefix: String,
    duplicate_every_message: bool,
    shutdown: CancellationToken,
) {
    let consumer = format!("relay-{}", uuid::Uuid::new_v4().simple());
    let mut held: HashMap<String, Lease> = HashMap::new();
    let mut last_discovery = tokio::time::Instant::now() - DISCOVER_EVERY;
    while !shutdown.is_cancelled() {
        if last_discovery.elapsed() >= DISCOVER_EVERY {
            last_discovery = tokio::time::Instant::now();
            held.retain(|_, lease| !lease.is_lost());
            let streams: Vec<String> = redis
                .clone()
                .smembers(&registry_key)
                .await
                .unwrap_or_default();
            // Streams of settled campaigns leave the registry: stop relaying them.
            let gone: Vec<String> = held
                .keys()
                .filter(|stream| !streams.contains(stream))
                .cloned()
                .collect();
            for stream in gone {
                if let Some(lease) = held.remove(&stream) {
                    let _ = lease.release().await;
                }
            }
            for stream in streams {
                if held.contains_key(&stream) {
                    continue;
                }
                if let Ok(Some(lease)) = leases
                    .try_acquire(&format!("{lease_prefix}:relay:{stream}"), LEASE_TTL)
                    .await
                {
                    // Made with its group, unless the campaign was settled meanwhile.
                    let _ = remake_stream(&mut redis.clone(), &registry_key, &stream).await;
                    held.insert(stream, lease);
                }
            }
        }
        if held.is_empty() {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(BLOCK) => continue,
            }
        }
        let streams: Vec<String> = held.keys().cloned().collect();
        match relay_round(
            &redis,
            &*broker,
            &registry_key,
            &streams,
            &consumer,
            duplicate_every_message,
        )
        .await
        {
            Ok(gone) => {
                for stream in gone {
                    if let Some(lease) = held.remove(&stream) {
                        let _ = lease.release().await;
                    }
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, "relay round failed; retrying");
                // Waits for the broker if it is the one failing, and in any case a moment, so
                // that a failing Redis is not asked again in a tight loop.
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = async {
                        broker.reconnect().await;
                        tokio::time::sleep(ROUND_RETRY_DELAY).await;
                    } => {}
                }
            }
        }
    }
    for (_, lease) in held {
        let _ = lease.release().await;
    }
}

/// Makes a hand-off stream's group, and the stream when it is missing, only while the stream is
/// still registered: a settled campaign's streams leave the registry before they are deleted,
/// and must stay deleted. Answers 1 when it made the group (an existing one is left alone).
const REMAKE_STREAM: &str = r"
-- KEYS: registry, stream; ARGV: group
if redis.call('SISMEMBER', KEYS[1], KEYS[2]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 then
  local made = redis.pcall('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0')
  if type(made) == 'table' and made.err then return 0 end
  return 1
end
redis.call('XGROUP', 'CREATE', KEYS[2], ARGV[1], '0', 'MKSTREAM')
return 1
";

/// Makes a hand-off stream's group (and the stream, when it is missing) while the stream is
/// registered; true when it made either.
async fn remake_stream(
    connection: &mut ConnectionManager,
    registry_key: &str,
    stream: &str,
) -> redis::RedisResult<bool> {
    let made: i64 = redis::Script::new(REMAKE_STREAM)
        .key(registry_key)
        .key(stream)
        .arg(GROUP)
        .invoke_async(connection)
        .await?;
    Ok(made == 1)
}

async fn relay_round(
    redis: &ConnectionManager,
    broker: &dyn Bus,
    registry_key: &str,
    streams: &[String],
    consumer: &str,
    duplicate_every_message: bool,
) -> anyhow::Result<Vec<String>> {
    let mut connection = redis.clone();
    let mut entries: Vec<(String, String, HashMap<String, Value>)> = Vec::new();
    // Streams gone from Redis and from the registry (a settled campaign's): left out of this
    // round's read and answered, so that the relay stops holding them at once.
    let mut gone: Vec<String> = Vec::new();
    // Entries a dead relay left pending.
    for stream in streams {
        let claimed: Value = match redis::cmd("XAUTOCLAIM")
            .arg(stream)
            .arg(GROUP)
            .arg(consumer)
            .arg(u64::try_from(CLAIM_IDLE.as_millis()).unwrap_or(u64::MAX))
            .arg("0-0")
            .arg("COUNT")
            .arg(BATCH)
            .query_async(&mut connection)
            .await
        {
            Ok(claimed) => claimed,
            // The stream (or its group) is gone from Redis, with whatever it held: make it
            // again, empty, so that the other streams' round goes on (one missing stream
            // must not stall every campaign's hand-off).
            Err(err) if err.code() == Some("NOGROUP") => {
                if remake_stream(&mut connection, registry_key, stream).await? {
                    tracing::error!(
                        stream,
                        "a hand-off stream was missing from Redis; made again, empty"
                    );
                } else {
                    gone.push(stream.clone());
                }
                continue;
            }
            Err(err) => return Err(err.into()),
        };
        if let Value::Array(parts) = claimed
            && let Some(Value::Array(items)) = parts.get(1)
        {
            for item in items {
                if let Value::Array(pair) = item
                    && let [id, Value::Array(flat)] = pair.as_slice()
                {
                    let id: String = redis::from_redis_value_ref(id)?;
                    let mut fields = HashMap::new();
                    for chunk in flat.chunks(2) {
                        if let [key, value] = chunk {
                            fields.insert(redis::from_redis_value_ref(key)?, value.clone());
                        }
                    }
                    entries.push((stream.clone(), id, fields));
                }
            }
        }
    }
    // New entries, waiting a little when there are none.
    let options = StreamReadOptions::default()
        .group(GROUP, consumer)
        .count(BATCH)
        .block(usize::try_from(BLOCK.as_millis()).unwrap_or(100));
    let readable: Vec<&String> = streams.iter().filter(|s| !gone.contains(s)).collect();
    if readable.is_empty() {
        return Ok(gone);
    }
    let ids: Vec<&str> = readable.iter().map(|_| ">").collect();
    let reply: Option<StreamReadReply> =
        connection.xread_options(&readable, &ids, &options).await?;
    for key in reply.map(|r| r.keys).unwrap_or_default() {
        for entry in key.ids {
            entries.push((key.key.clone(), entry.id, entry.map));
        }
    }
    if entries.is_empty() {
        return Ok(gone);
    }
    let mut envelopes = Vec::with_capacity(entries.len());
    let mut unreadable = Vec::new();
    for (stream, id, fields) in &entries {
        match envelope_of(fields) {
            Some(envelope) => envelopes.push(envelope),
            None => {
                // Never dropped: it goes to the dead queue for an operator, as it was.
                tracing::error!(stream, id, "unreadable hand-off entry; dead-lettering it");
                let raw: HashMap<&str, String> = fields
                    .iter()
                    .map(|(name, value)| {
                        let text = redis::from_redis_value_ref::<String>(value)
                            .unwrap_or_else(|_| format!("{value:?}"));
                        (name.as_str(), text)
                    })
                    .collect();
                let body = serde_json::json!({ "stream": stream, "entry": id, "fields": raw });
                unreadable.push((
                    format!("handoff:{stream}:{id}"),
                    body.to_string().into_bytes(),
                ));
            }
        }
    }
    // Several grabs to a message: the broker's work and the consumer's are per message.
    let mut messages = Vec::with_capacity(envelopes.len().div_ceil(GRABS_PER_MESSAGE));
    for chunk in envelopes.chunks(GRABS_PER_MESSAGE) {
        let id = format!("grabs:{}", chunk[0].message_id);
        let bytes = Delivery::many_to_bytes(chunk);
        if duplicate_every_message {
            messages.push((id.clone(), bytes.clone()));
        }
        messages.push((id, bytes));
    }
    broker.publish_all("work", &messages).await?;
    broker.publish_all("dead", &unreadable).await?;
    // Only now, with every message confirmed, the entries leave the stream.
    let mut by_stream: HashMap<&str, Vec<&str>> = HashMap::new();
    for (stream, id, _) in &entries {
        by_stream
            .entry(stream.as_str())
            .or_default()
            .push(id.as_str());
    }
    for (stream, ids) in by_stream {
        let _: () = redis::pipe()
            .cmd("XACK")
            .arg(stream)
            .arg(GROUP)
            .arg(&ids)
            .ignore()
            .cmd("XDEL")
            .arg(stream)
            .arg(&ids)
            .ignore()
            .query_async(&mut connection)
            .await?;
    }
    Ok(gone)
}

/// Moves the campaign outbox into the broker until `shutdown`, while holding its lease.
pub async fn relay_outbox(
    campaign: CampaignClient,
    leases: LeaseManager,
    broker: std::sync::Arc<dyn Bus>,
    lease_key: String,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        let lease = match leases.try_acquire(&lease_key, LEASE_TTL).await {
            Ok(Some(lease)) => lease,
            _ => {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(LEASE_TTL / 2) => continue,
                }
            }
        };
        let lost = lease.lost();
        while !shutdown.is_cancelled() && !lost.is_cancelled() {
            let published = match outbox_round(&campaign, &*broker).await {
                Ok(count) => count,
                Err(err) => {
                    tracing::warn!(error = %err, "outbox relay round failed");
                    0
                }
            };
            if published == 0 {
                tokio::select! {
                    () = shutdown.cancelled() => {}
                    () = lost.cancelled() => {}
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
        let _ = lease.release().await;
    }
}

async fn outbox_round(campaign: &CampaignClient, broker: &dyn Bus) -> anyhow::Result<usize> {
    let page = campaign.outbox(200).await?;
    let events = page["events"].as_array().cloned().unwrap_or_default();
    if events.is_empty() {
        return Ok(0);
    }
    let mut messages = Vec::new();
    let mut unknown = Vec::new();
    let mut ids = Vec::new();
    for event in &events {
        let id = event["id"].as_str().unwrap_or_default().to_owned();
        let payload = &event["payload"];
        let text = |name: &str| payload[name].as_str().unwrap_or_default().to_owned();
        let fields = (
            text("campaign_id"),
            text("merchant_id"),
            text("currency"),
            payload["total_amount"].as_i64().unwrap_or(0),
        );
        let saga_event = match event["kind"].as_str() {
            Some("campaign.created") => Some(SagaEvent::CampaignCreated {
                campaign_id: fields.0,
                merchant_id: fields.1,
                currency: fields.2,
                total_amount: fields.3,
            }),
            Some("campaign.ended") => Some(SagaEvent::CampaignEnded {
                campaign_id: fields.0,
                merchant_id: fields.1,
                currency: fields.2,
                total_amount: fields.3,
            }),
            other => {
                // Never dropped: it goes to the dead queue for an operator, as it was.
                tracing::error!(kind = ?other, id, "unknown outbox event; dead-lettering it");
                unknown.push((format!("outbox:{id}"), event.to_string().into_bytes()));
                None
            }
        };
        if let Some(saga_event) = saga_event {
            let envelope = Envelope::new(format!("event:{id}"), None, saga_event);
            messages.push((envelope.message_id.clone(), envelope.to_bytes()));
        }
        ids.push(id);
    }
    broker.publish_all("work", &messages).await?;
    broker.publish_all("dead", &unknown).await?;
    campaign.ack_outbox(&ids).await?;
    Ok(events.len())
}
