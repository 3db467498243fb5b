//! Sizes as qemu-img reads and prints them.

use anyhow::{bail, Result};

/// Parses "10G", "512", "1.5M", "64k" (binary suffixes, as qemu-img; a bare number is bytes).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, suffix) = t.split_at(split);
    let shift = match suffix {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => bail!(
            "invalid size '{s}': use a number with an optional suffix k, M, G, T, P or E (binary multiples)"
        ),
    };
    if num.is_empty() {
        bail!("invalid size '{s}': no number");
    }
    let v: f64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("invalid size '{s}': '{num}' is not a number"))?;
    let bytes = v * (1u64 << shift) as f64;
    if !bytes.is_finite() || bytes >= 9.2e18 {
        bail!("invalid size '{s}': too large (the limit is 8 EiB)");
    }
    if num.contains('.') && bytes.fract() != 0.0 {
        bail!("invalid size '{s}': not a whole number of bytes");
    }
    Ok(bytes as u64)
}

/// Formats like qemu's size_to_str: three significant digits and a binary unit ("1.26 MiB").
pub fn human(size: u64) -> String {
    const UNITS: [&str; 7] = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"];
    let x = size as f64 / (1000.0 / 1024.0);
    let exp = if x > 0.0 {
        x.log2().floor() as i64 + 1
    } else {
        0
    };
    let i = ((exp - 1) / 10).clamp(0, 6) as usize;
    let v = size as f64 / (1u64 << (i * 10)) as f64;
    format!("{} {}B", sig3(v), UNITS[i])
}

/// `%0.3g`: three significant digits without trailing zeroes.
fn sig3(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let digits = v.abs().log10().floor() as i32 + 1;
    let decimals = (3 - digits).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_qemu_sizes() {
        assert_eq!(parse_size("512").unwrap(), 512);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("10G").unwrap(), 10 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("G").is_err());
        assert!(parse_size("1.1").is_err());
        assert!(parse_size("99E").is_err());
    }

    #[test]
    fn prints_like_qemu() {
        assert_eq!(human(0), "0 B");
        assert_eq!(human(4096), "4 KiB");
        assert_eq!(human(1323008), "1.26 MiB");
        assert_eq!(human(200704), "196 KiB");
        assert_eq!(human(1 << 30), "1 GiB");
        assert_eq!(human(1024000), "0.977 MiB");
    }
}
