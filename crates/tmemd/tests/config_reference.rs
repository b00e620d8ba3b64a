//! The configuration reference (`docs/configuration.md`) and the shipped configuration
//! (`packaging/tmemd.toml`) cannot drift from the parser:
//! * every documented key, set to its documented example, is accepted by tmemd's
//!   [`FileConfig`] (which refuses unknown keys) and resolves to a valid configuration;
//! * every key the parser accepts is documented, the set taken from the serde field names
//!   the derived `Deserialize` impls themselves hand to the deserializer (so a new field,
//!   or a new section, fails here until it is documented);
//! * every default written as a TOML value is what the code applies when the key is
//!   missing;
//! * the documented flags are `tmemd --help`'s;
//! * `packaging/tmemd.toml` parses as shipped, and lists every key.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use clap::CommandFactory;
use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};
use tmemd::config::{Args, Config, FileConfig};

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(rel)
}

fn read(rel: &str) -> String {
    let p = repo(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

// ------------------------------------------------------------------ accepted keys

/// Why the probe stopped (always: it only looks).
#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// A deserializer that answers nothing: it follows `path` (one field name per struct
/// level, `Option`s looked through) and, if what it reaches is a struct, records the field
/// names serde's derive hands to `deserialize_struct` — the very names the parser accepts.
struct Probe<'p> {
    path: &'p [&'static str],
    found: &'p mut Option<&'static [&'static str]>,
}

/// Offers the struct visitor one field, `path[0]`, whose value is probed further.
struct OneField<'p> {
    path: &'p [&'static str],
    found: Option<&'p mut Option<&'static [&'static str]>>,
    key_given: bool,
}

impl<'de> MapAccess<'de> for OneField<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        if self.key_given {
            return Ok(None);
        }
        self.key_given = true;
        let key: de::value::StrDeserializer<'_, Stop> = self.path[0].into_deserializer();
        seed.deserialize(key).map(Some)
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        let found = self.found.take().ok_or(Stop)?;
        seed.deserialize(Probe {
            path: &self.path[1..],
            found,
        })
    }
}

impl<'de> Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        if self.path.is_empty() {
            *self.found = Some(fields);
            return Err(Stop);
        }
        visitor.visit_map(OneField {
            path: self.path,
            found: Some(self.found),
            key_given: false,
        })
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Every key `T` accepts, nested structs' keys as `section.key`.
fn accepted_keys<T: de::DeserializeOwned>() -> BTreeSet<String> {
    fn walk<T: de::DeserializeOwned>(path: &mut Vec<&'static str>, out: &mut BTreeSet<String>) {
        let mut found = None;
        let _ = T::deserialize(Probe {
            path,
            found: &mut found,
        });
        match found {
            Some(fields) => {
                assert!(!fields.is_empty(), "a struct without fields at {path:?}");
                for f in fields {
                    path.push(f);
                    walk::<T>(path, out);
                    path.pop();
                }
            }
            None => {
                assert!(!path.is_empty(), "the configuration is not a struct");
                out.insert(path.join("."));
            }
        }
    }
    let mut out = BTreeSet::new();
    walk::<T>(&mut Vec::new(), &mut out);
    out
}

// ------------------------------------------------------------------ the reference

/// One row of the reference's key table.
#[derive(Debug)]
struct Row {
    key: String,
    /// The default as a TOML value, when the reference gives one (else prose).
    default: Option<String>,
    example: String,
}

/// The cells of a Markdown table row, trimmed.
fn cells(line: &str) -> Option<Vec<String>> {
    let inner = line.trim().strip_prefix('|')?.strip_suffix('|')?;
    Some(inner.split('|').map(|c| c.trim().to_owned()).collect())
}

/// The text between one pair of backticks that make up the whole cell.
fn code(cell: &str) -> Option<String> {
    let inner = cell.strip_prefix('`')?.strip_suffix('`')?;
    (!inner.contains('`')).then(|| inner.to_owned())
}

/// The rows of the table whose header starts with `header`.
fn table(doc: &str, header: &[&str]) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    let mut lines = doc.lines().peekable();
    while let Some(l) = lines.next() {
        let Some(h) = cells(l) else { continue };
        if h.len() < header.len() || h[..header.len()] != *header {
            continue;
        }
        assert!(lines.next().is_some_and(|sep| sep.contains("---")), "{l}");
        while let Some(row) = lines.peek().and_then(|l| cells(l)) {
            assert_eq!(row.len(), h.len(), "a cell too many or too few: {row:?}");
            rows.push(row);
            lines.next();
        }
        return rows;
    }
    panic!("no table with header {header:?}");
}

fn reference() -> Vec<Row> {
    let doc = read("docs/configuration.md");
    let rows = table(&doc, &["key", "type", "default", "example", "meaning"]);
    rows.into_iter()
        .map(|r| {
            let key = code(&r[0]).unwrap_or_else(|| panic!("key not in backticks: {r:?}"));
            let example = code(&r[3]).unwrap_or_else(|| panic!("example not in backticks: {r:?}"));
            assert!(!r[1].is_empty() && !r[4].is_empty(), "{r:?}");
            Row {
                key,
                default: code(&r[2]),
                example,
            }
        })
        .collect()
}

/// A TOML document setting each `(dotted key, value)`.
fn document<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> String {
    pairs
        .into_iter()
        .map(|(k, v)| format!("{k} = {v}\n"))
        .collect()
}

fn parse(text: &str) -> FileConfig {
    toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"))
}

/// Resolves a file as tmemd does, with a fixed MemTotal; socket groups are dropped first
/// (they name groups of a real host, e.g. libvirt-qemu, which this one may lack).
fn resolve(mut file: FileConfig) -> Config {
    file.nbd_socket_group = None;
    file.ctl_socket_group = None;
    Config::resolve(&Args::default(), file, Some(64 << 30))
        .unwrap_or_else(|e| panic!("does not resolve: {e:?}"))
}

#[test]
fn the_probe_sees_every_field() {
    let keys = accepted_keys::<FileConfig>();
    for k in [
        "budget",
        "nbd_stall_timeout_secs",
        "balloon.interval_ms",
        "balloon.host_total",
    ] {
        assert!(keys.contains(k), "{k} not found: {keys:?}");
    }
    assert!(
        !keys.contains("balloon"),
        "a section is not a key: {keys:?}"
    );
}

#[test]
fn every_documented_key_is_accepted_and_every_accepted_key_documented() {
    let rows = reference();
    let documented: BTreeSet<String> = rows.iter().map(|r| r.key.clone()).collect();
    assert_eq!(documented.len(), rows.len(), "a key documented twice");
    let accepted = accepted_keys::<FileConfig>();
    let undocumented: Vec<_> = accepted.difference(&documented).collect();
    let unknown: Vec<_> = documented.difference(&accepted).collect();
    assert!(
        undocumented.is_empty() && unknown.is_empty(),
        "docs/configuration.md: keys the parser accepts but the reference lacks: \
         {undocumented:?}; keys the reference has but the parser refuses: {unknown:?}"
    );
    // Each example on its own (so an error names the key), then all of them together.
    for r in &rows {
        let text = document([(r.key.as_str(), r.example.as_str())]);
        resolve(parse(&text));
    }
    let all = parse(&document(
        rows.iter().map(|r| (r.key.as_str(), r.example.as_str())),
    ));
    assert!(all.balloon.is_some() && all.budget.is_some() && all.nbd_stall_timeout_secs.is_some());
    resolve(all);
}

#[test]
fn documented_defaults_are_the_code_defaults() {
    let rows = reference();
    let with_defaults: Vec<_> = rows.iter().filter(|r| r.default.is_some()).collect();
    // Most defaults are plain values; the others depend on the host (MemTotal, uid, ...).
    assert!(with_defaults.len() >= rows.len() / 2, "{rows:?}");
    let text = document(
        with_defaults
            .iter()
            .map(|r| (r.key.as_str(), r.default.as_deref().unwrap_or_default())),
    );
    assert_eq!(
        resolve(parse(&text)),
        resolve(FileConfig::default()),
        "a default in docs/configuration.md is not the code's:\n{text}"
    );
    // Each on its own too, so that a mismatch names its key.
    for r in with_defaults {
        let text = document([(r.key.as_str(), r.default.as_deref().unwrap_or_default())]);
        assert_eq!(
            resolve(parse(&text)),
            resolve(FileConfig::default()),
            "documented default of {}",
            r.key
        );
    }
}

#[test]
fn documented_flags_are_the_command_line() {
    let doc = read("docs/configuration.md");
    let documented: BTreeSet<String> = table(&doc, &["flag", "key"])
        .iter()
        .map(|r| {
            let flag = code(&r[0]).unwrap_or_else(|| panic!("{r:?}"));
            flag.split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    let actual: BTreeSet<String> = Args::command()
        .get_arguments()
        .filter_map(|a| a.get_long())
        .filter(|l| !["help", "version"].contains(l))
        .map(|l| format!("--{l}"))
        .collect();
    assert_eq!(documented, actual, "docs/configuration.md: the Flags table");
}

/// `packaging/tmemd.toml` with every `#key = value` line uncommented.
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase()) => rest,
            _ => l,
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

/// The keys set in a TOML document, tables' keys as `table.key`.
fn keys_of(text: &str) -> BTreeSet<String> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeSet<String>) {
        for (k, v) in t {
            match v {
                toml::Value::Table(inner) => walk(&format!("{prefix}{k}."), inner, out),
                _ => {
                    out.insert(format!("{prefix}{k}"));
                }
            }
        }
    }
    let t: toml::Table = toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
    let mut out = BTreeSet::new();
    walk("", &t, &mut out);
    out
}

#[test]
fn shipped_config_parses_and_lists_every_key() {
    let text = read("packaging/tmemd.toml");
    // As shipped: tmemd's defaults.
    assert_eq!(resolve(parse(&text)), resolve(FileConfig::default()));
    // Every key is there, commented out, with a value the parser takes.
    let all = uncommented(&text);
    let keys = keys_of(&all);
    assert_eq!(
        keys,
        accepted_keys::<FileConfig>(),
        "packaging/tmemd.toml should list every key once"
    );
    resolve(parse(&all));
    // Where the reference gives a default, the file shows that default.
    for r in reference() {
        let Some(d) = r.default else { continue };
        let (table, key) = match r.key.split_once('.') {
            Some((t, k)) => (Some(t), k),
            None => (None, r.key.as_str()),
        };
        let t: toml::Table = toml::from_str(&all).unwrap();
        let shown = match table {
            Some(s) => t[s].as_table().and_then(|t| t.get(key)).cloned(),
            None => t.get(key).cloned(),
        };
        let want: toml::Table = toml::from_str(&format!("v = {d}")).unwrap();
        assert_eq!(
            shown.as_ref(),
            want.get("v"),
            "packaging/tmemd.toml: {}",
            r.key
        );
    }
}
