//! The configurations of the talk (plus the labelled host-page-cache baseline).

use serde::{Deserialize, Serialize};

/// One experiment configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum ConfigKind {
    /// Fixed-size guests, plain disk files with `cache=none`, no balloon manager.
    Unchanged,
    /// Like `unchanged`, but disks with `cache=writeback`: the host page cache is a hidden
    /// second cache (a labelled extra row, not one of the talk's five).
    HostCache,
    /// Self-ballooning (tmemd's balloon manager, selfballoon policy), plain disks `cache=none`.
    Selfballoon,
    /// Self-ballooning + tmem: swap disk = tmemd `swap` export, data disk = `cached` export
    /// of the shared image; no dedup, no compression.
    Tmem,
    /// As `tmem`, with deduplication (global scope).
    TmemDedup,
    /// As `tmem`, with deduplication and compression (`--codec`, default zstd).
    TmemDedupComp,
}

impl ConfigKind {
    /// The talk's five, in its order.
    pub const TALK: [ConfigKind; 5] = [
        ConfigKind::Unchanged,
        ConfigKind::Selfballoon,
        ConfigKind::Tmem,
        ConfigKind::TmemDedup,
        ConfigKind::TmemDedupComp,
    ];

    /// All configurations, in report order.
    pub const ALL: [ConfigKind; 6] = [
        ConfigKind::Unchanged,
        ConfigKind::HostCache,
        ConfigKind::Selfballoon,
        ConfigKind::Tmem,
        ConfigKind::TmemDedup,
        ConfigKind::TmemDedupComp,
    ];

    /// The flag / JSON name.
    pub fn name(self) -> &'static str {
        match self {
            ConfigKind::Unchanged => "unchanged",
            ConfigKind::HostCache => "host-cache",
            ConfigKind::Selfballoon => "selfballoon",
            ConfigKind::Tmem => "tmem",
            ConfigKind::TmemDedup => "tmem-dedup",
            ConfigKind::TmemDedupComp => "tmem-dedup-comp",
        }
    }

    /// The label used in tables and plots.
    pub fn label(self) -> &'static str {
        match self {
            ConfigKind::Unchanged => "Unchanged",
            ConfigKind::HostCache => "Unchanged + host page cache",
            ConfigKind::Selfballoon => "Self-ballooning",
            ConfigKind::Tmem => "Tmem",
            ConfigKind::TmemDedup => "Tmem w/dedup",
            ConfigKind::TmemDedupComp => "Tmem w/dedup+comp",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        ConfigKind::ALL.into_iter().find(|c| c.name() == s.trim())
    }

    /// Whether guests are self-ballooned (tmemd's balloon manager).
    pub fn selfballoon(self) -> bool {
        !matches!(self, ConfigKind::Unchanged | ConfigKind::HostCache)
    }

    /// Whether the disks go through tmemd exports.
    pub fn tmem(self) -> bool {
        matches!(
            self,
            ConfigKind::Tmem | ConfigKind::TmemDedup | ConfigKind::TmemDedupComp
        )
    }

    /// Whether a tmemd runs at all (exports or balloon manager).
    pub fn needs_daemon(self) -> bool {
        self.selfballoon()
    }

    /// The daemon's codec: `comp` (e.g. `zstd`, `lz4`) with compression, else `none`.
    pub fn codec(self, comp: &str) -> String {
        match self {
            ConfigKind::TmemDedupComp => comp.to_string(),
            _ => "none".to_string(),
        }
    }

    /// The daemon's dedup scope.
    pub fn dedup(self) -> &'static str {
        match self {
            ConfigKind::TmemDedup | ConfigKind::TmemDedupComp => "global",
            _ => "off",
        }
    }

    /// QEMU `cache=` mode of plain-file disks.
    pub fn file_cache_mode(self) -> &'static str {
        match self {
            ConfigKind::HostCache => "writeback",
            _ => "none",
        }
    }

    /// Whether this row is one of the talk's five.
    pub fn in_talk(self) -> bool {
        self != ConfigKind::HostCache
    }
}

impl std::fmt::Display for ConfigKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_roundtrip() {
        for c in ConfigKind::ALL {
            assert_eq!(ConfigKind::parse(c.name()), Some(c));
        }
        assert_eq!(ConfigKind::parse("nope"), None);
        assert!(ConfigKind::TmemDedupComp.tmem());
        assert!(!ConfigKind::Selfballoon.tmem());
        assert!(ConfigKind::Selfballoon.selfballoon());
        assert!(!ConfigKind::HostCache.in_talk());
    }
}
