//! Bearer tokens: HS256 JSON Web Tokens carrying a subject, a role and an expiry.
//!
//! Only HS256 is accepted: the header's `alg` is checked, so a token that claims `none` or an
//! asymmetric algorithm is refused rather than trusted. The signature is compared in constant
//! time (ring's `hmac::verify`).

use std::fmt;
use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::hmac;
use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, ConfigSource, Secret};

/// The variable holding the signing secret.
pub const SECRET_VAR: &str = "RP_AUTH_SECRET";
/// The shortest secret accepted: HS256 wants at least as many bytes as its output.
pub const MIN_SECRET_LEN: usize = 32;
/// The longest token read; anything larger is refused before decoding.
pub const MAX_TOKEN_LEN: usize = 4096;
/// The longest lifetime a token may be minted with.
pub const MAX_TTL: Duration = Duration::from_secs(366 * 24 * 3600);
/// The file, inside a data directory, holding a generated secret.
pub const SECRET_FILE: &str = "auth-secret";

/// What a token's holder may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Grabs packets, reads its own claims and wallet.
    User,
    /// Creates and reads its own campaigns and wallet.
    Merchant,
    /// Tops up merchants, reads sagas, dead letters and the reconciliation.
    Operator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Merchant => "merchant",
            Role::Operator => "operator",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "user" => Ok(Role::User),
            "merchant" => Ok(Role::Merchant),
            "operator" => Ok(Role::Operator),
            other => Err(format!(
                "unknown role `{other}`; expected user, merchant or operator"
            )),
        }
    }
}

/// The claims of a verified token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// The merchant's or user's id (an operator's name for operators).
    pub sub: String,
    pub role: Role,
    /// Expiry, seconds since the Unix epoch.
    pub exp: i64,
    /// Issued at, seconds since the Unix epoch.
    #[serde(default)]
    pub iat: i64,
}

/// Why a token was refused. Every variant maps to 401.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(&'static str),
    #[error("the token's algorithm is not HS256")]
    Algorithm,
    #[error("the token's signature does not match")]
    Signature,
    #[error("the token expired")]
    Expired,
}

/// Why a token could not be minted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    #[error("the subject must be 1-64 characters of letters, digits, '-' or '_'")]
    Subject,
    #[error("the lifetime must be between 1 second and 366 days")]
    Ttl,
}

/// The signing key; cheap to clone.
#[derive(Clone)]
pub struct TokenKey {
    key: hmac::Key,
}

impl fmt::Debug for TokenKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("TokenKey([redacted])")
    }
}

/// The fixed header of every token we mint: `{"alg":"HS256","typ":"JWT"}`.
const HEADER_B64: &str = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9";

#[derive(Deserialize)]
struct Header {
    alg: String,
}

impl TokenKey {
    pub fn new(secret: &[u8]) -> Self {
        TokenKey {
            key: hmac::Key::new(hmac::HMAC_SHA256, secret),
        }
    }

    /// Signs a token for `sub` in `role`, valid for `ttl` from `now_secs`.
    pub fn mint_at(
        &self,
        role: Role,
        sub: &str,
        ttl: Duration,
        now_secs: i64,
    ) -> Result<String, MintError> {
        if !valid_subject(sub) {
            return Err(MintError::Subject);
        }
        if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
            return Err(MintError::Ttl);
        }
        let ttl_secs = i64::try_from(ttl.as_secs()).map_err(|_| MintError::Ttl)?;
        let claims = Claims {
            sub: sub.to_owned(),
            role,
            exp: now_secs + ttl_secs,
            iat: now_secs,
        };
        let payload = serde_json::to_vec(&claims).expect("claims serialize");
        let mut token = String::with_capacity(256);
        token.push_str(HEADER_B64);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(payload, &mut token);
        let tag = hmac::sign(&self.key, token.as_bytes());
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(tag.as_ref(), &mut token);
        Ok(token)
    }

    /// Signs a token valid for `ttl` from now.
    pub fn mint(&self, role: Role, sub: &str, ttl: Duration) -> Result<String, MintError> {
        self.mint_at(role, sub, ttl, crate::time::now_ms() / 1000)
    }

    /// Checks the algorithm, the signature and the expiry, in that order.
    pub fn verify_at(&self, token: &str, now_secs: i64) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::Malformed("longer than 4096 bytes"));
        }
        let mut parts = token.splitn(3, '.');
        let (Some(header), Some(payload), Some(signature)) =
            (parts.next(), parts.next(), parts.next())
        else {
            return Err(TokenError::Malformed("expected three dot-separated parts"));
        };
        if header != HEADER_B64 {
            let bytes = URL_SAFE_NO_PAD
                .decode(header)
                .map_err(|_| TokenError::Malformed("header is not base64url"))?;
            let header: Header = serde_json::from_slice(&bytes)
                .map_err(|_| TokenError::Malformed("header is not a JSON object with alg"))?;
            if header.alg != "HS256" {
                return Err(TokenError::Algorithm);
            }
        }
        let signature = URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| TokenError::Malformed("signature is not base64url"))?;
        let signed_len = header.len() + 1 + payload.len();
        hmac::verify(&self.key, &token.as_bytes()[..signed_len], &signature)
            .map_err(|_| TokenError::Signature)?;
        let payload = URL_SAFE_NO_PAD
            .decode(payload)
            .map_err(|_| TokenError::Malformed("payload is not base64url"))?;
        let claims: Claims = serde_json::from_slice(&payload)
            .map_err(|_| TokenError::Malformed("payload lacks sub, role or exp"))?;
        if !valid_subject(&claims.sub) {
            return Err(TokenError::Malformed("subject is not a valid id"));
        }
        if claims.exp <= now_secs {
            return Err(TokenError::Expired);
        }
        Ok(claims)
    }

    /// Verifies against the current time.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(token, crate::time::now_ms() / 1000)
    }
}

/// Shards of [`VerifiedTokens`].
const TOKEN_SHARDS: usize = 16;

/// The shard of a token: the value of the signature's second-to-last base64url character,
/// uniform over 0..64 for a real signature. (The last character is not: it carries the
/// signature's last 4 bits and 2 zero bits, so it takes only 16 of the 64 values, which would
/// leave shards empty and others crowded.) Anything that is not a signature character lands
/// in shard 0; such a token never verifies and is never kept.
fn shard_of(token: &str) -> usize {
    let value = match token.as_bytes().iter().rev().nth(1) {
        Some(&c @ b'A'..=b'Z') => c - b'A',
        Some(&c @ b'a'..=b'z') => c - b'a' + 26,
        Some(&c @ b'0'..=b'9') => c - b'0' + 52,
        Some(b'-') => 62,
        Some(b'_') => 63,
        _ => 0,
    };
    usize::from(value) % TOKEN_SHARDS
}

/// Tokens verified recently, so a client repeating its token (a crowd tapping "grab") costs a
/// hash lookup instead of two base64 decodes, an HMAC and a JSON parse.
///
/// Only tokens that verified are kept, keyed by the whole token: a hit is an exact match of a
/// token this key signed, so nothing can be forged through the cache, and a refused token costs
/// its full check every time. The expiry is checked again on every use. At most `capacity`
/// tokens are kept (a token is about 200 bytes). A shard that fills up drops its expired
/// tokens and an eighth of the others, spread over the table: when more users are active than
/// the cache holds, most of them still hit (emptying the whole shard instead would make every
/// access of a crowd cycling through its users a miss).
#[derive(Debug)]
pub struct VerifiedTokens {
    /// Hashed with foldhash (a token is ~200 bytes: SipHash over it costs a tenth of a full
    /// verification); only tokens that verified are keys, so nobody can aim at the hash.
    shards: Vec<
        std::sync::Mutex<std::collections::HashMap<Box<str>, Claims, foldhash::fast::RandomState>>,
    >,
    per_shard: usize,
    /// Full verifications done (cache misses, refused tokens included).
    verifications: std::sync::atomic::AtomicU64,
}

impl VerifiedTokens {
    pub fn new(capacity: usize) -> Self {
        VerifiedTokens {
            shards: (0..TOKEN_SHARDS).map(|_| Default::default()).collect(),
            per_shard: capacity.div_ceil(TOKEN_SHARDS).max(1),
            verifications: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// [`TokenKey::verify_at`], answered from the cache when the token was verified before.
    pub fn verify_at(
        &self,
        key: &TokenKey,
        token: &str,
        now_secs: i64,
    ) -> Result<Claims, TokenError> {
        let shard = shard_of(token);
        let shard = &self.shards[shard];
        let cached = shard
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(token)
            .cloned();
        if let Some(claims) = cached {
            return if claims.exp <= now_secs {
                Err(TokenError::Expired)
            } else {
                Ok(claims)
            };
        }
        self.verifications
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let claims = key.verify_at(token, now_secs)?;
        let mut verified = shard.lock().unwrap_or_else(|e| e.into_inner());
        if verified.len() >= self.per_shard {
            // Every eighth entry in table order (the first always): a spread the hash makes.
            let stride = verified.len().min(8);
            let mut position = 0usize;
            verified.retain(|_, kept| {
                position += 1;
                kept.exp > now_secs && !(position - 1).is_multiple_of(stride)
            });
        }
        verified.insert(token.into(), claims.clone());
        Ok(claims)
    }

    /// Verifies against the current time.
    pub fn verify(&self, key: &TokenKey, token: &str) -> Result<Claims, TokenError> {
        self.verify_at(key, token, crate::time::now_ms() / 1000)
    }

    /// Tokens kept.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Full verifications done so far: the cache's misses.
    pub fn verifications(&self) -> u64 {
        self.verifications
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Ids that can become account names (`user:{id}`, `merchant:{id}`).
fn valid_subject(sub: &str) -> bool {
    (1..=64).contains(&sub.len())
        && sub
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Parses a token lifetime such as `30s`, `15m`, `12h`, `7d` (a bare number is seconds).
pub fn parse_ttl(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (digits, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let value: u64 = digits
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 30s, 15m, 12h or 7d"))?;
    let unit_secs = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("`{text}`: the unit must be s, m, h or d")),
    };
    let ttl = Duration::from_secs(value.saturating_mul(unit_secs));
    if ttl < Duration::from_secs(1) || ttl > MAX_TTL {
        return Err(format!("`{text}`: between 1s and 366d"));
    }
    Ok(ttl)
}

/// Checks a configured secret's length.
pub fn secret_from_text(var: &str, text: &str) -> Result<Secret<Vec<u8>>, ConfigError> {
    if text.len() < MIN_SECRET_LEN {
        return Err(ConfigError::Malformed {
            var: var.to_owned(),
            shown: String::new(),
            reason: format!("must be at least {MIN_SECRET_LEN} bytes"),
        });
    }
    Ok(Secret::new(text.as_bytes().to_vec()))
}

/// The secret from `RP_AUTH_SECRET`, which a distributed gateway requires.
pub fn required_secret(config: &ConfigSource) -> Result<Secret<Vec<u8>>, ConfigError> {
    let text = config.required_secret(SECRET_VAR)?;
    secret_from_text(SECRET_VAR, text.expose())
}

/// `RP_AUTH_SECRET` when set, else the secret kept in `data_dir` (generated on first use, the
/// file readable by its owner only), so tokens minted by `redpacket token --data-dir` work
/// against `redpacket dev --data-dir` with the same directory.
pub fn secret_or_generated(
    config: &ConfigSource,
    data_dir: &Path,
) -> anyhow::Result<Secret<Vec<u8>>> {
    if config.is_set(SECRET_VAR) {
        return Ok(required_secret(config)?);
    }
    let path = data_dir.join(SECRET_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => Ok(secret_from_text(&path.display().to_string(), text.trim())?),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(data_dir)?;
            let mut bytes = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
                .map_err(|_| anyhow::anyhow!("the system random source failed"))?;
            let text = hex_encode(&bytes);
            write_private(&path, &text)?;
            Ok(Secret::new(text.into_bytes()))
        }
        Err(err) => Err(anyhow::anyhow!("cannot read {}: {err}", path.display())),
    }
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    std::fs::write(path, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_minted_token_verifies_until_it_expires() {
        let key = TokenKey::new(SECRET);
        let token = key
            .mint_at(Role::Merchant, "m-1", Duration::from_secs(60), 1_000)
            .unwrap();
        let claims = key.verify_at(&token, 1_059).unwrap();
        assert_eq!(claims.sub, "m-1");
        assert_eq!(claims.role, Role::Merchant);
        assert_eq!(key.verify_at(&token, 1_060), Err(TokenError::Expired));
    }

    #[test]
    fn another_secret_or_a_changed_payload_is_refused() {
        let key = TokenKey::new(SECRET);
        let token = key
            .mint_at(Role::User, "u1", Duration::from_secs(60), 1_000)
            .unwrap();
        let other = TokenKey::new(b"another secret of thirty-two bytes!!");
        assert_eq!(other.verify_at(&token, 1_000), Err(TokenError::Signature));

        let forged = key
            .mint_at(Role::Operator, "u1", Duration::from_secs(60), 1_000)
            .unwrap();
        let mut parts: Vec<&str> = token.split('.').collect();
        let forged_payload = forged.split('.').nth(1).unwrap();
        parts[1] = forged_payload;
        assert_eq!(
            key.verify_at(&parts.join("."), 1_000),
            Err(TokenError::Signature)
        );
    }

    #[test]
    fn alg_none_and_garbage_are_refused() {
        let key = TokenKey::new(SECRET);
        let none_header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"u1","role":"user","exp":99999999999}"#);
        assert_eq!(
            key.verify_at(&format!("{none_header}.{payload}."), 0),
            Err(TokenError::Algorithm)
        );
        assert!(matches!(
            key.verify_at("not-a-token", 0),
            Err(TokenError::Malformed(_))
        ));
        assert!(matches!(
            key.verify_at(&"a".repeat(MAX_TOKEN_LEN + 1), 0),
            Err(TokenError::Malformed(_))
        ));
    }

    #[test]
    fn subjects_and_lifetimes_are_bounded() {
        let key = TokenKey::new(SECRET);
        assert_eq!(
            key.mint(Role::User, "has space", Duration::from_secs(5)),
            Err(MintError::Subject)
        );
        assert_eq!(
            key.mint(Role::User, "u", Duration::from_secs(0)),
            Err(MintError::Ttl)
        );
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert!(parse_ttl("400d").is_err());
        assert!(parse_ttl("5y").is_err());
    }

    #[test]
    fn a_generated_secret_is_kept_in_the_data_directory() {
        let dir = std::env::temp_dir().join(format!("rp-auth-{}", uuid::Uuid::new_v4()));
        let config = ConfigSource::from_environment([]).unwrap();
        let first = secret_or_generated(&config, &dir).unwrap();
        let second = secret_or_generated(&config, &dir).unwrap();
        assert_eq!(first.expose(), second.expose());
        assert!(first.expose().len() >= MIN_SECRET_LEN);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn verified_tokens_answer_as_the_key_does_and_stay_bounded() {
        let key = TokenKey::new(&[7; 32]);
        let other = TokenKey::new(&[8; 32]);
        let cache = VerifiedTokens::new(32);
        let token = key
            .mint_at(Role::User, "u-1", Duration::from_secs(60), 1_000)
            .unwrap();
        for _ in 0..2 {
            // The first time verified by the key, the second answered from the cache.
            let claims = cache.verify_at(&key, &token, 1_010).unwrap();
            assert_eq!((claims.sub.as_str(), claims.role), ("u-1", Role::User));
        }
        assert_eq!(cache.len(), 1);
        assert_eq!(
            cache.verify_at(&key, &token, 1_060),
            Err(TokenError::Expired),
            "a cached token still expires"
        );
        // Tokens that fail are refused every time and never kept.
        let forged = other
            .mint_at(Role::Operator, "u-1", Duration::from_secs(60), 1_000)
            .unwrap();
        let tampered = format!("{}x", &token[..token.len() - 1]);
        for bad in [forged.as_str(), tampered.as_str(), "not.a.token"] {
            for _ in 0..2 {
                assert!(cache.verify_at(&key, bad, 1_010).is_err(), "{bad}");
            }
        }
        assert_eq!(cache.len(), 1);
        for n in 0..1_000 {
            let token = key
                .mint_at(Role::User, &format!("u{n}"), Duration::from_secs(60), 1_000)
                .unwrap();
            assert!(cache.verify_at(&key, &token, 1_010).is_ok());
        }
        assert!(cache.len() <= 32, "bounded: {}", cache.len());
    }

    #[test]
    fn a_crowd_larger_than_the_cache_still_mostly_hits() {
        let key = TokenKey::new(&[7; 32]);
        // 15 users of one shard, which holds 10, each tapping in turn 20 times.
        let cache = VerifiedTokens::new(10 * TOKEN_SHARDS);
        let tokens: Vec<String> = (0..)
            .map(|n| {
                key.mint_at(Role::User, &format!("u{n}"), Duration::from_secs(60), 1_000)
                    .unwrap()
            })
            .filter(|token| shard_of(token) == 0)
            .take(15)
            .collect();
        for _ in 0..20 {
            for token in &tokens {
                assert!(cache.verify_at(&key, token, 1_010).is_ok());
            }
        }
        assert!(cache.len() <= 10 * TOKEN_SHARDS);
        // Emptying the shard when full makes all 300 a miss; evicting a few keeps about half
        // as hits.
        let verified = cache.verifications();
        assert!(verified < 270, "{verified} full verifications of 300");

        // A full shard of tokens that have all expired since: the next insert drops them all.
        let expired = VerifiedTokens::new(10 * TOKEN_SHARDS);
        for token in &tokens[..10] {
            assert!(expired.verify_at(&key, token, 1_010).is_ok());
        }
        let fresh = (0..)
            .map(|n| {
                key.mint_at(
                    Role::User,
                    &format!("f{n}"),
                    Duration::from_secs(600),
                    1_100,
                )
                .unwrap()
            })
            .find(|token| shard_of(token) == 0)
            .unwrap();
        assert!(expired.verify_at(&key, &fresh, 1_100).is_ok());
        assert_eq!(expired.len(), 1, "only the fresh token is left");
    }

    #[test]
    fn tokens_spread_evenly_over_the_shards() {
        let key = TokenKey::new(&[7; 32]);
        let mut counts = [0usize; TOKEN_SHARDS];
        for n in 0..16_000 {
            let token = key
                .mint_at(Role::User, &format!("u{n}"), Duration::from_secs(60), 1_000)
                .unwrap();
            counts[shard_of(&token)] += 1;
        }
        // 1,000 a shard on average; a fair spread stays well within ±20 %.
        for (shard, count) in counts.iter().enumerate() {
            assert!((800..=1_200).contains(count), "shard {shard}: {counts:?}");
        }
    }
}
