//! The configurations of the talk (plus the labelled host-page-cache baseline) and of the
//! stack KVM operators run today (`modern`: free page reporting + host swap with zswap +
//! KSM, and `modern-tmem`: that stack with tmem on top).

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
    /// What a 2026 host gives for free: no tmemd; guests with virtio-balloon free page
    /// reporting; a host swap file with zswap (lz4, or lzo-rle where the kernel lacks
    /// lz4) in front; KSM on. Plain disks
    /// `cache=none`, guests at their full size (the host overcommits through swap).
    Modern,
    /// `tmem-dedup-comp` (self-ballooning, tmem swap and cached exports) on top of the
    /// modern stack: free page reporting, host swap + zswap and KSM stay on.
    ModernTmem,
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
    pub const ALL: [ConfigKind; 8] = [
        ConfigKind::Unchanged,
        ConfigKind::HostCache,
        ConfigKind::Selfballoon,
        ConfigKind::Tmem,
        ConfigKind::TmemDedup,
        ConfigKind::TmemDedupComp,
        ConfigKind::Modern,
        ConfigKind::ModernTmem,
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
            ConfigKind::Modern => "modern",
            ConfigKind::ModernTmem => "modern-tmem",
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
            ConfigKind::Modern => "Modern (FPR + zswap + KSM)",
            ConfigKind::ModernTmem => "Modern + tmem w/dedup+comp",
        }
    }

    /// Parses a name.
    pub fn parse(s: &str) -> Option<Self> {
        ConfigKind::ALL.into_iter().find(|c| c.name() == s.trim())
    }

    /// Whether guests are self-ballooned (tmemd's balloon manager).
    pub fn selfballoon(self) -> bool {
        !matches!(
            self,
            ConfigKind::Unchanged | ConfigKind::HostCache | ConfigKind::Modern
        )
    }

    /// Whether the host's modern stack (host swap + zswap, KSM) is on and the guests
    /// report free pages.
    pub fn modern_stack(self) -> bool {
        matches!(self, ConfigKind::Modern | ConfigKind::ModernTmem)
    }

    /// Whether guests are statically partitioned: nothing takes memory back from them and
    /// nothing lets the host overcommit, so under the host budget each gets at most
    /// `budget / guests` (less QEMU's own memory).
    pub fn static_partition(self) -> bool {
        matches!(self, ConfigKind::Unchanged | ConfigKind::HostCache)
    }

    /// Whether the disks go through tmemd exports.
    pub fn tmem(self) -> bool {
        matches!(
            self,
            ConfigKind::Tmem
                | ConfigKind::TmemDedup
                | ConfigKind::TmemDedupComp
                | ConfigKind::ModernTmem
        )
    }

    /// Whether a tmemd runs at all (exports or balloon manager).
    pub fn needs_daemon(self) -> bool {
        self.selfballoon()
    }

    /// The daemon's codec: `comp` (e.g. `zstd`, `lz4`) with compression, else `none`.
    pub fn codec(self, comp: &str) -> String {
        match self {
            ConfigKind::TmemDedupComp | ConfigKind::ModernTmem => comp.to_string(),
            _ => "none".to_string(),
        }
    }

    /// The daemon's dedup scope.
    pub fn dedup(self) -> &'static str {
        match self {
            ConfigKind::TmemDedup | ConfigKind::TmemDedupComp | ConfigKind::ModernTmem => "global",
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
        ConfigKind::TALK.contains(&self)
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
        assert!(!ConfigKind::Modern.in_talk() && !ConfigKind::Modern.selfballoon());
        assert!(ConfigKind::ModernTmem.tmem() && ConfigKind::ModernTmem.modern_stack());
        assert_eq!(ConfigKind::ModernTmem.dedup(), "global");
        assert!(ConfigKind::Unchanged.static_partition() && !ConfigKind::Modern.static_partition());
    }
}
