//! Parsers for the values both programs' configs write as text.

/// Parses a size such as `"10GiB"`, `"512 MiB"` or `"4096"` (bytes) into bytes.
///
/// Only binary units (KiB, MiB, GiB, TiB) and plain bytes are accepted. Decimal units such as
/// "GB" are refused on purpose: disk tools disagree on what they mean, and an operator sizing a
/// cache drive or a rate cap should not lose 7% to an ambiguity.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let unit_start = trimmed
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(unit_start);
    let not_a_size = || format!("\"{text}\" is not a size; use e.g. \"10GiB\"");
    let shift = match unit.trim() {
        "" | "B" => 0,
        "KiB" => 10,
        "MiB" => 20,
        "GiB" => 30,
        "TiB" => 40,
        _ => return Err(not_a_size()),
    };
    if digits.is_empty() {
        return Err(not_a_size());
    }
    let number: u64 = digits.parse().map_err(|_| not_a_size())?;
    number.checked_mul(1 << shift).ok_or_else(not_a_size)
}

/// Parses a rate cap: bits per second (`"400Mbit"`, `"1Gbit"`, `"512Kbit"`, decimal units as
/// links are sold) or bytes per second as a size (`"50MiB"`). `"0"` means no cap (`None`).
pub fn parse_bandwidth(text: &str) -> Result<Option<u64>, String> {
    let trimmed = text.trim();
    if trimmed == "0" {
        return Ok(None);
    }
    let not_a_rate = || {
        format!(
            "\"{text}\" is not a rate; use e.g. \"400Mbit\" or \"50MiB\" (per second), or \"0\""
        )
    };
    for (unit, bits) in [
        ("Gbit", 1_000_000_000u64),
        ("Mbit", 1_000_000),
        ("Kbit", 1_000),
        ("bit", 1),
    ] {
        if let Some(digits) = trimmed.strip_suffix(unit) {
            let number: u64 = digits.trim().parse().map_err(|_| not_a_rate())?;
            let bytes = number.checked_mul(bits).ok_or_else(not_a_rate)? / 8;
            return if bytes == 0 {
                Err(not_a_rate())
            } else {
                Ok(Some(bytes))
            };
        }
    }
    match parse_size(trimmed) {
        Ok(0) | Err(_) => Err(not_a_rate()),
        Ok(bytes) => Ok(Some(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_take_bits_or_binary_sizes_per_second() {
        assert_eq!(parse_bandwidth("400Mbit"), Ok(Some(50_000_000)));
        assert_eq!(parse_bandwidth("1Gbit"), Ok(Some(125_000_000)));
        assert_eq!(parse_bandwidth(" 64 Kbit "), Ok(Some(8_000)));
        assert_eq!(parse_bandwidth("50MiB"), Ok(Some(50 << 20)));
        assert_eq!(parse_bandwidth("0"), Ok(None));
        for bad in ["", "fast", "10 Mbps", "4bit", "0MiB", "-1Mbit"] {
            assert!(parse_bandwidth(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sizes_take_binary_units_and_refuse_the_rest() {
        let table: [(&str, Option<u64>); 12] = [
            ("4096", Some(4096)),
            ("7B", Some(7)),
            ("64KiB", Some(64 << 10)),
            ("512 MiB", Some(512 << 20)),
            (" 10GiB ", Some(10 << 30)),
            ("1TiB", Some(1 << 40)),
            ("10GB", None),
            ("1.5GiB", None),
            ("GiB", None),
            ("", None),
            ("-1", None),
            ("99999999999TiB", None),
        ];
        for (text, expected) in table {
            assert_eq!(parse_size(text).ok(), expected, "{text:?}");
        }
        assert!(parse_size("10GB").unwrap_err().contains("is not a size"));
    }

    proptest::proptest! {
        #[test]
        fn any_text_parses_or_is_refused_without_panicking(text in ".{0,24}") {
            let _ = parse_size(&text);
        }

        #[test]
        fn every_byte_count_round_trips(bytes in proptest::num::u64::ANY) {
            proptest::prop_assert_eq!(parse_size(&bytes.to_string()), Ok(bytes));
        }
    }
}
