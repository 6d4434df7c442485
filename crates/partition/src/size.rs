//! Sizes, on the command line and in config files: `512M`, `2G`, `1GiB`, `1048576K`; a bare number is MiB.

/// Parses a size into bytes.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!("'{s}' is not a size (examples: 512M, 2G)"));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{s}' is too large"))?;
    let unit = t[digits..].trim().to_ascii_lowercase();
    let shift = match unit.trim_end_matches("ib").trim_end_matches('b') {
        "" if unit.is_empty() => 20,
        "" => 0,
        "k" => 10,
        "m" => 20,
        "g" => 30,
        "t" => 40,
        _ => return Err(format!("'{s}' has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1024k").unwrap(), 1 << 20);
        assert_eq!(parse_size("4096B").unwrap(), 4096);
    }

    #[test]
    fn malformed_sizes_are_rejected() {
        for bad in [
            "",
            "M",
            "12Q",
            "1.5G",
            "-1G",
            "99999999999999999999",
            "99999999999T",
        ] {
            assert!(parse_size(bad).is_err(), "{bad} accepted");
        }
    }
}
