//! Kubernetes resource quantities (`1Gi`, `500M`, `1181116006400m`, `1e3`), held exactly.
//!
//! The API server stores a quantity in its canonical spelling, not as written: `1.1Gi` comes
//! back as `1181116006400m`, `1.5` as `1500m`, `1024Mi` as `1Gi`. Comparing what the operator
//! asks for with what the server holds must therefore compare values, and exactly (floats
//! make `1.1Gi` and its canonical form differ in the last bit).

use std::fmt;

const NANOS_PER_UNIT: i128 = 1_000_000_000;

/// A quantity's value in nano-units: the finest precision the API server keeps (it rounds
/// finer values up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Quantity {
    nanos: i128,
}

/// How a quantity is spelled: binary suffixes (`Ki`…`Ei`), decimal ones (`m`, `k`, `M`…), or
/// an exponent (`1e3`, which the server keeps as an exponent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    BinarySi,
    DecimalSi,
    DecimalExponent,
}

impl Quantity {
    pub const ZERO: Quantity = Quantity { nanos: 0 };

    /// Parses a quantity as the API server does (surrounding spaces included); `None` for
    /// what it cannot read, or a value beyond about 10^29.
    pub fn parse(text: &str) -> Option<(Self, Format)> {
        let text = text.trim();
        let (negative, unsigned) = match text.as_bytes().first()? {
            b'-' => (true, &text[1..]),
            b'+' => (false, &text[1..]),
            _ => (false, text),
        };
        let split = unsigned
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(unsigned.len());
        let (number, suffix) = unsigned.split_at(split);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return None;
        }
        let digits = format!("{whole}{fraction}");
        if digits.len() > 30 {
            return None;
        }
        let mantissa: i128 = digits.parse().ok()?;
        let (power_of_two, power_of_ten, format) = suffix_powers(suffix)?;
        let exponent = power_of_ten + 9 - i32::try_from(fraction.len()).ok()?;
        let scaled = mantissa.checked_mul(1i128.checked_shl(power_of_two)?)?;
        let nanos = scale(scaled, exponent)?;
        Some((
            Self {
                nanos: if negative { -nanos } else { nanos },
            },
            format,
        ))
    }

    /// What to compare a quantity's text by: its value, or the text itself when it cannot be
    /// read (so two different unreadable sizes are never taken as equal).
    pub fn comparable(text: &str) -> Result<Self, String> {
        Self::parse(text)
            .map(|(q, _)| q)
            .ok_or_else(|| text.trim().to_string())
    }

    /// The spelling the API server stores, as its `CanonicalizeBytes` makes it: binary
    /// suffixes only for whole values of 1024 or more, otherwise the decimal suffix (or
    /// exponent, a multiple of 3) that leaves a whole mantissa (`1500m`, `1k`, `1e9`).
    pub fn canonical(self, format: Format) -> String {
        let whole = self.nanos % NANOS_PER_UNIT == 0;
        if format == Format::BinarySi && whole && self.nanos.abs() >= 1024 * NANOS_PER_UNIT {
            let mut value = self.nanos / NANOS_PER_UNIT;
            let mut suffix = 0;
            while suffix < 6 && value % 1024 == 0 {
                value /= 1024;
                suffix += 1;
            }
            return format!(
                "{value}{}",
                ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"][suffix]
            );
        }
        let mut value = self.nanos;
        let mut suffix = 0;
        while suffix < 9 && value != 0 && value % 1000 == 0 {
            value /= 1000;
            suffix += 1;
        }
        if value == 0 {
            return "0".into();
        }
        if format == Format::DecimalExponent {
            let exponent = 3 * (i32::try_from(suffix).unwrap_or(3) - 3);
            return match exponent {
                0 => value.to_string(),
                e => format!("{value}e{e}"),
            };
        }
        format!(
            "{value}{}",
            ["n", "u", "m", "", "k", "M", "G", "T", "P", "E"][suffix]
        )
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical(Format::DecimalSi))
    }
}

/// (power of two, power of ten, format) a suffix multiplies by.
fn suffix_powers(suffix: &str) -> Option<(u32, i32, Format)> {
    let binary = |n: u32| Some((10 * n, 0, Format::BinarySi));
    let decimal = |n: i32| Some((0, n, Format::DecimalSi));
    match suffix {
        "Ki" => binary(1),
        "Mi" => binary(2),
        "Gi" => binary(3),
        "Ti" => binary(4),
        "Pi" => binary(5),
        "Ei" => binary(6),
        "n" => decimal(-9),
        "u" => decimal(-6),
        "m" => decimal(-3),
        "" => decimal(0),
        "k" => decimal(3),
        "M" => decimal(6),
        "G" => decimal(9),
        "T" => decimal(12),
        "P" => decimal(15),
        "E" => decimal(18),
        _ => {
            let exponent = suffix.strip_prefix(['e', 'E'])?;
            if exponent.is_empty() {
                return None;
            }
            Some((0, exponent.parse().ok()?, Format::DecimalExponent))
        }
    }
}

/// `value` × 10^`exponent`, rounded up when the exponent drops digits (as the server rounds
/// sub-nano values up); `None` on overflow.
fn scale(value: i128, exponent: i32) -> Option<i128> {
    if exponent >= 0 {
        value.checked_mul(10i128.checked_pow(u32::try_from(exponent).ok()?)?)
    } else {
        let divisor = 10i128.checked_pow(exponent.unsigned_abs())?;
        Some((value + divisor - 1) / divisor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(text: &str) -> Quantity {
        Quantity::parse(text).expect(text).0
    }

    #[test]
    fn spellings_of_one_size_are_equal_and_others_are_not() {
        assert_eq!(value("1Gi"), value("1024Mi"));
        assert_eq!(value("1.5Ki"), value("1536"));
        assert_eq!(value("1e3"), value("1k"));
        assert_eq!(value("1.1Gi"), value("1181116006400m"));
        assert_eq!(value("1.5"), value("1500m"));
        assert_ne!(value("1Gi"), value("1G"));
        assert!(value("10Gi") > value("1Gi"));
    }

    #[test]
    fn the_canonical_spelling_is_the_api_servers() {
        let canonical = |text: &str| {
            let (q, format) = Quantity::parse(text).expect(text);
            q.canonical(format)
        };
        assert_eq!(canonical("1.1Gi"), "1181116006400m");
        assert_eq!(canonical("1.5"), "1500m");
        assert_eq!(canonical("1.5Gi"), "1536Mi");
        assert_eq!(canonical("0.5Ti"), "512Gi");
        assert_eq!(canonical("1000000000000"), "1T");
        assert_eq!(canonical("1E3"), "1e3");
        assert_eq!(canonical("1e9"), "1e9");
        assert_eq!(canonical("1024Mi"), "1Gi");
        assert_eq!(canonical("1.5Mi"), "1536Ki");
        assert_eq!(canonical("10Gi"), "10Gi");
        assert_eq!(canonical("500M"), "500M");
        assert_eq!(canonical("512"), "512");
        assert_eq!(canonical("0"), "0");
    }

    #[test]
    fn unreadable_text_does_not_parse_and_compares_as_text() {
        for bad in ["", "lots", "1..5", "1.2.3Gi", "1Xi", "1e", "1e40"] {
            assert_eq!(Quantity::parse(bad), None, "{bad}");
        }
        assert_eq!(Quantity::comparable("1Gi "), Ok(value("1Gi")));
        assert_ne!(Quantity::comparable("1e40"), Quantity::comparable("2e40"));
    }
}
