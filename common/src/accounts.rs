//! Ledger account names and transfer ids, parsed once at the edge.

use std::fmt;

/// The longest id inside an account name (`merchant:{id}` etc.).
pub const MAX_OWNER_ID_LEN: usize = 64;
/// The longest transfer id.
pub const MAX_TRANSFER_ID_LEN: usize = 128;

/// Why a name or id was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error(
        "`{0}` is not an account name: expected `external`, `merchant:{{id}}`, `escrow:{{id}}` or \
         `user:{{id}}` with an id of 1-{MAX_OWNER_ID_LEN} letters, digits, `-` or `_`"
    )]
    Account(String),
    #[error(
        "`{0}` is not a transfer id: expected 1-{MAX_TRANSFER_ID_LEN} letters, digits, `-`, `_`, `.` or `:`"
    )]
    Transfer(String),
}

/// What kind of party an account belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum AccountKind {
    /// Money entering and leaving the system; the only account that may go negative.
    External,
    Merchant,
    Escrow,
    User,
}

/// A valid account name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountName {
    name: String,
    kind: AccountKind,
}

/// Whether `id` is a valid owner id (user, merchant, campaign): 1-64 letters, digits, `-`, `_`.
pub fn is_owner_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_OWNER_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl AccountName {
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let kind = if name == "external" {
            AccountKind::External
        } else {
            let (prefix, id) = name
                .split_once(':')
                .ok_or_else(|| NameError::Account(name.to_owned()))?;
            if !is_owner_id(id) {
                return Err(NameError::Account(name.to_owned()));
            }
            match prefix {
                "merchant" => AccountKind::Merchant,
                "escrow" => AccountKind::Escrow,
                "user" => AccountKind::User,
                _ => return Err(NameError::Account(name.to_owned())),
            }
        };
        Ok(AccountName {
            name: name.to_owned(),
            kind,
        })
    }

    /// `external`.
    pub fn external() -> Self {
        AccountName {
            name: "external".to_owned(),
            kind: AccountKind::External,
        }
    }

    fn of(prefix: &str, kind: AccountKind, id: &str) -> Result<Self, NameError> {
        if is_owner_id(id) {
            Ok(AccountName {
                name: format!("{prefix}:{id}"),
                kind,
            })
        } else {
            Err(NameError::Account(format!("{prefix}:{id}")))
        }
    }

    /// `merchant:{id}`.
    pub fn merchant(id: &str) -> Result<Self, NameError> {
        Self::of("merchant", AccountKind::Merchant, id)
    }

    /// `escrow:{campaign id}`.
    pub fn escrow(campaign_id: &str) -> Result<Self, NameError> {
        Self::of("escrow", AccountKind::Escrow, campaign_id)
    }

    /// `user:{id}`.
    pub fn user(id: &str) -> Result<Self, NameError> {
        Self::of("user", AccountKind::User, id)
    }

    pub fn as_str(&self) -> &str {
        &self.name
    }

    pub fn kind(&self) -> AccountKind {
        self.kind
    }

    /// Only `external` may have a negative balance.
    pub fn may_go_negative(&self) -> bool {
        self.kind == AccountKind::External
    }
}

impl fmt::Display for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

impl fmt::Debug for AccountName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

/// A client-chosen transfer id: the idempotency key of a transfer.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TransferId(String);

impl TransferId {
    pub fn parse(id: &str) -> Result<Self, NameError> {
        let valid = !id.is_empty()
            && id.len() <= MAX_TRANSFER_ID_LEN
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if valid {
            Ok(TransferId(id.to_owned()))
        } else {
            Err(NameError::Transfer(id.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TransferId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_four_account_patterns_parse() {
        assert_eq!(
            AccountName::parse("external").unwrap().kind(),
            AccountKind::External
        );
        assert_eq!(
            AccountName::parse("merchant:m-1").unwrap().kind(),
            AccountKind::Merchant
        );
        assert_eq!(
            AccountName::parse("escrow:123").unwrap().kind(),
            AccountKind::Escrow
        );
        assert_eq!(
            AccountName::parse("user:u_9").unwrap().kind(),
            AccountKind::User
        );
        assert!(AccountName::parse("external").unwrap().may_go_negative());
        assert!(!AccountName::parse("user:1").unwrap().may_go_negative());
    }

    #[test]
    fn names_that_fit_no_pattern_are_refused() {
        let long = format!("user:{}", "a".repeat(MAX_OWNER_ID_LEN + 1));
        for bad in [
            "",
            "External",
            "user",
            "user:",
            "bank:1",
            "user:a b",
            "user:a:b",
            "user:é",
            long.as_str(),
        ] {
            assert!(AccountName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transfer_ids_are_bounded_and_plain() {
        assert!(TransferId::parse("grab:123.credit").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(MAX_TRANSFER_ID_LEN + 1)] {
            assert!(TransferId::parse(bad).is_err(), "{bad:?}");
        }
    }
}
