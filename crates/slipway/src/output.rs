//! Output formats: tables and lines for people, JSON for scripts.

#![expect(clippy::print_stdout, reason = "the binary owns the terminal")]

/// `-o text` or `-o json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Tables and lines.
    Text,
    /// JSON (one document, pretty-printed).
    Json,
}

/// Prints `v` as pretty JSON.
pub fn json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// A duration in its largest whole unit: 45s, 12m, 3h, 2d.
pub fn short_duration(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86_400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86_400),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_show_their_largest_whole_unit() {
        use super::short_duration;
        assert_eq!(short_duration(0), "0s");
        assert_eq!(short_duration(59_999), "59s");
        assert_eq!(short_duration(60_000), "1m");
        assert_eq!(short_duration(3_599_000), "59m");
        assert_eq!(short_duration(7_200_000), "2h");
        assert_eq!(short_duration(3 * 86_400_000), "3d");
    }
}
