//! Money: integer minor units with an ISO 4217 currency.
//!
//! There is no float anywhere in this module on purpose: amounts are counted in minor units
//! (cents) as `i64`, every operation is checked, and decimal strings are parsed digit by digit.

use std::fmt;
use std::str::FromStr;

/// The largest amount one operation may carry, in minor units (10^15, ten trillion units of a
/// two-decimal currency). Keeping single amounts this far below `i64::MAX` leaves room for
/// balances that sum many of them without overflow.
pub const MAX_AMOUNT_MINOR: i64 = 1_000_000_000_000_000;

/// ISO 4217 codes this system accepts, with their number of minor-unit digits.
const CURRENCIES: &[(&str, u8)] = &[
    ("AED", 2),
    ("AUD", 2),
    ("BHD", 3),
    ("BRL", 2),
    ("CAD", 2),
    ("CHF", 2),
    ("CNY", 2),
    ("CZK", 2),
    ("DKK", 2),
    ("EUR", 2),
    ("GBP", 2),
    ("HKD", 2),
    ("HUF", 2),
    ("IDR", 2),
    ("ILS", 2),
    ("INR", 2),
    ("JOD", 3),
    ("JPY", 0),
    ("KRW", 0),
    ("KWD", 3),
    ("MXN", 2),
    ("MYR", 2),
    ("NOK", 2),
    ("NZD", 2),
    ("PHP", 2),
    ("PLN", 2),
    ("SAR", 2),
    ("SEK", 2),
    ("SGD", 2),
    ("THB", 2),
    ("TRY", 2),
    ("TWD", 2),
    ("USD", 2),
    ("VND", 0),
    ("ZAR", 2),
];

/// Why a currency code or an amount was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("`{0}` is not a supported ISO 4217 currency code")]
    UnknownCurrency(String),
    #[error("`{0}` is not a valid decimal amount")]
    Malformed(String),
    #[error("`{input}` has more than {digits} decimal digits for {currency}")]
    TooPrecise {
        input: String,
        currency: Currency,
        digits: u8,
    },
    #[error("the amount must be positive")]
    NotPositive,
    #[error("the amount exceeds the maximum of {MAX_AMOUNT_MINOR} minor units")]
    TooLarge,
    #[error("currencies differ: {0} and {1}")]
    CurrencyMismatch(Currency, Currency),
    #[error("arithmetic overflow")]
    Overflow,
}

/// An ISO 4217 currency code from the supported list.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Currency {
    code: &'static str,
    minor_digits: u8,
}

impl Currency {
    /// Parses a three-letter upper-case code from the supported list.
    pub fn parse(code: &str) -> Result<Self, MoneyError> {
        CURRENCIES
            .iter()
            .find(|(known, _)| *known == code)
            .map(|(known, digits)| Currency {
                code: known,
                minor_digits: *digits,
            })
            .ok_or_else(|| MoneyError::UnknownCurrency(code.to_owned()))
    }

    /// The three-letter code.
    pub fn code(&self) -> &'static str {
        self.code
    }

    /// How many decimal digits a major unit has (2 for cents).
    pub fn minor_digits(&self) -> u8 {
        self.minor_digits
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl fmt::Debug for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl FromStr for Currency {
    type Err = MoneyError;
    fn from_str(code: &str) -> Result<Self, Self::Err> {
        Currency::parse(code)
    }
}

/// A non-negative amount of money in minor units of one currency.
///
/// Signed movements (ledger entries) are plain `i64` deltas; an `Amount` is what is moved.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Amount {
    minor: i64,
    currency: Currency,
}

impl Amount {
    /// An amount of `minor` units; zero is allowed, negative or above [`MAX_AMOUNT_MINOR`] not.
    pub fn new(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if minor < 0 {
            return Err(MoneyError::NotPositive);
        }
        if minor > MAX_AMOUNT_MINOR {
            return Err(MoneyError::TooLarge);
        }
        Ok(Amount { minor, currency })
    }

    /// A strictly positive amount, as every transfer must be.
    pub fn positive(minor: i64, currency: Currency) -> Result<Self, MoneyError> {
        if minor <= 0 {
            return Err(MoneyError::NotPositive);
        }
        Amount::new(minor, currency)
    }

    /// Zero of a currency.
    pub fn zero(currency: Currency) -> Self {
        Amount { minor: 0, currency }
    }

    /// Parses a plain decimal string exactly: digits, optionally a point and at most the
    /// currency's number of decimal digits. No sign, exponent, spaces or special values.
    pub fn parse_decimal(input: &str, currency: Currency) -> Result<Self, MoneyError> {
        let malformed = || MoneyError::Malformed(input.to_owned());
        let (whole, fraction) = match input.split_once('.') {
            Some((whole, fraction)) => (whole, Some(fraction)),
            None => (input, None),
        };
        if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let fraction = fraction.unwrap_or("");
        if input.contains('.') && fraction.is_empty() {
            return Err(malformed());
        }
        if !fraction.bytes().all(|b| b.is_ascii_digit()) {
            return Err(malformed());
        }
        let digits = currency.minor_digits();
        if fraction.len() > usize::from(digits) {
            return Err(MoneyError::TooPrecise {
                input: input.to_owned(),
                currency,
                digits,
            });
        }
        let mut minor: i64 = 0;
        let padded = fraction
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(usize::from(digits));
        for byte in whole.bytes().chain(padded) {
            minor = minor
                .checked_mul(10)
                .and_then(|m| m.checked_add(i64::from(byte - b'0')))
                .ok_or(MoneyError::TooLarge)?;
        }
        Amount::new(minor, currency)
    }

    /// The amount in minor units.
    pub fn minor(&self) -> i64 {
        self.minor
    }

    /// Its currency.
    pub fn currency(&self) -> Currency {
        self.currency
    }

    /// Sum of two amounts of the same currency.
    pub fn checked_add(self, other: Amount) -> Result<Amount, MoneyError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_add(other.minor)
            .ok_or(MoneyError::Overflow)?;
        Amount::new(minor, self.currency)
    }

    /// Difference of two amounts of the same currency; an amount never goes below zero.
    pub fn checked_sub(self, other: Amount) -> Result<Amount, MoneyError> {
        self.same_currency(other)?;
        let minor = self
            .minor
            .checked_sub(other.minor)
            .ok_or(MoneyError::Overflow)?;
        if minor < 0 {
            return Err(MoneyError::Overflow);
        }
        Amount::new(minor, self.currency)
    }

    fn same_currency(self, other: Amount) -> Result<(), MoneyError> {
        if self.currency == other.currency {
            Ok(())
        } else {
            Err(MoneyError::CurrencyMismatch(self.currency, other.currency))
        }
    }
}

impl fmt::Display for Amount {
    /// Formats as the exact decimal string with the currency code, e.g. `12.34 CNY`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let digits = u32::from(self.currency.minor_digits());
        if digits == 0 {
            return write!(f, "{} {}", self.minor, self.currency);
        }
        let scale = 10_i64.pow(digits);
        write!(
            f,
            "{}.{:0width$} {}",
            self.minor / scale,
            self.minor % scale,
            self.currency,
            width = usize::from(self.currency.minor_digits())
        )
    }
}

impl fmt::Debug for Amount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cny() -> Currency {
        Currency::parse("CNY").unwrap()
    }

    #[test]
    fn decimal_strings_parse_exactly_to_minor_units() {
        assert_eq!(Amount::parse_decimal("12.34", cny()).unwrap().minor(), 1234);
        assert_eq!(Amount::parse_decimal("12.3", cny()).unwrap().minor(), 1230);
        assert_eq!(Amount::parse_decimal("12", cny()).unwrap().minor(), 1200);
        assert_eq!(Amount::parse_decimal("0.01", cny()).unwrap().minor(), 1);
        let jpy = Currency::parse("JPY").unwrap();
        assert_eq!(Amount::parse_decimal("500", jpy).unwrap().minor(), 500);
        let kwd = Currency::parse("KWD").unwrap();
        assert_eq!(Amount::parse_decimal("1.005", kwd).unwrap().minor(), 1005);
    }

    #[test]
    fn malformed_or_too_precise_strings_are_refused() {
        for bad in [
            "-1", "1e3", "NaN", "inf", "", ".5", "5.", " 1", "1 ", "+1", "1,00", "0x10", "1.2.3",
        ] {
            assert!(
                matches!(
                    Amount::parse_decimal(bad, cny()),
                    Err(MoneyError::Malformed(_))
                ),
                "{bad:?} should be malformed"
            );
        }
        assert!(matches!(
            Amount::parse_decimal("12.345", cny()),
            Err(MoneyError::TooPrecise { .. })
        ));
        let jpy = Currency::parse("JPY").unwrap();
        assert!(Amount::parse_decimal("1.5", jpy).is_err());
        assert_eq!(
            Amount::parse_decimal("99999999999999999999", cny()),
            Err(MoneyError::TooLarge)
        );
    }

    #[test]
    fn unknown_currency_codes_are_refused() {
        for bad in ["", "cny", "XXX", "EURO", "US"] {
            assert!(Currency::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn arithmetic_is_checked_and_currency_safe() {
        let a = Amount::positive(100, cny()).unwrap();
        let usd = Amount::positive(100, Currency::parse("USD").unwrap()).unwrap();
        assert!(matches!(
            a.checked_add(usd),
            Err(MoneyError::CurrencyMismatch(..))
        ));
        assert_eq!(a.checked_sub(a).unwrap().minor(), 0);
        assert!(Amount::zero(cny()).checked_sub(a).is_err());
        let max = Amount::new(MAX_AMOUNT_MINOR, cny()).unwrap();
        assert_eq!(max.checked_add(a), Err(MoneyError::TooLarge));
        assert_eq!(Amount::positive(0, cny()), Err(MoneyError::NotPositive));
        assert_eq!(Amount::new(-1, cny()), Err(MoneyError::NotPositive));
    }

    proptest! {
        #[test]
        fn display_and_parse_round_trip(minor in 0..=MAX_AMOUNT_MINOR) {
            let amount = Amount::new(minor, cny()).unwrap();
            let text = amount.to_string();
            let number = text.strip_suffix(" CNY").unwrap();
            prop_assert_eq!(Amount::parse_decimal(number, cny()).unwrap(), amount);
        }

        #[test]
        fn add_then_sub_is_identity(a in 0..MAX_AMOUNT_MINOR / 2, b in 0..MAX_AMOUNT_MINOR / 2) {
            let a = Amount::new(a, cny()).unwrap();
            let b = Amount::new(b, cny()).unwrap();
            prop_assert_eq!(a.checked_add(b).unwrap().checked_sub(b).unwrap(), a);
        }
    }
}
