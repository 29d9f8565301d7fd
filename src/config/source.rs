//! Where a configuration value comes from: the TOML file (with its line), a flag, an
//! environment variable or the default; and the errors that name that place.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use toml::Spanned;

use super::keys::{self, Key};
use super::value::cut;

/// Where a value was set. Shown in every error and in `check-config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File { path: PathBuf, line: Option<usize> },
    Flag(String),
    Env(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File { path, line: Some(line) } => write!(f, "{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "{}", path.display()),
            Origin::Flag(flag) => write!(f, "flag --{flag}"),
            Origin::Env(var) => write!(f, "environment variable {var}"),
        }
    }
}

/// One thing wrong with the configuration, with the place to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub origin: Origin,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "{}: {key}: {}", self.origin, self.message),
            None => write!(f, "{}: {}", self.origin, self.message),
        }
    }
}

/// Every error found in one load, in the order the keys are listed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// A value set on the command line or in the environment.
#[derive(Debug, Clone)]
pub struct Override {
    pub key: &'static Key,
    pub value: String,
    pub origin: Origin,
}

impl Override {
    /// A value for `name` as if given by its flag; used by tests and embedders.
    pub fn flag(name: &str, value: impl Into<String>) -> Result<Override, ConfigError> {
        let key = keys::find(name).ok_or_else(|| ConfigError {
            origin: Origin::Default,
            key: Some(name.to_string()),
            message: "unknown key".into(),
        })?;
        Ok(Override { key, value: value.into(), origin: Origin::Flag(key.flag()) })
    }
}

/// A value from a file, the file and the line it is on.
#[derive(Debug, Clone)]
pub struct FileEntry {
    pub value: toml::Value,
    pub path: PathBuf,
    pub line: usize,
}

impl FileEntry {
    pub fn origin(&self) -> Origin {
        Origin::File { path: self.path.clone(), line: Some(self.line) }
    }
}

/// The parsed config file and its drop-ins (see [`FileLayer::read_with_drop_ins`]):
/// `section.key` to value, every key already known to exist, and the `[[route]]` tables, in
/// file order. `path` is the main file.
#[derive(Debug, Clone)]
pub struct FileLayer {
    pub path: PathBuf,
    pub entries: BTreeMap<String, FileEntry>,
    pub routes: Vec<RouteTable>,
    /// The drop-ins read after the main file, in the order read.
    pub drop_ins: Vec<PathBuf>,
}

/// One `[[route]]` table: its line and its keys (a sub-table such as `health.interval = ...`
/// flattened to `health.interval`), each with its line. The keys are checked against
/// [`super::routes::FIELDS`] and [`super::routes::OVERRIDES`] when the configuration is built.
#[derive(Debug, Clone)]
pub struct RouteTable {
    pub path: PathBuf,
    pub line: usize,
    pub entries: BTreeMap<String, FileEntry>,
}

/// The name of the one list of tables the file may hold.
pub const ROUTE: &str = "route";

type Section = BTreeMap<String, Spanned<toml::Value>>;

/// A top-level item: a `[section]`, or a list of tables (`[[route]]`).
#[derive(Debug)]
enum Item {
    Section(Section),
    Tables(Vec<Spanned<Section>>),
}

impl Item {
    fn as_section(&self) -> Option<&Section> {
        match self {
            Item::Section(s) => Some(s),
            Item::Tables(_) => None,
        }
    }
}

impl<'de> serde::Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Item, D::Error> {
        struct ItemVisitor;
        impl<'de> serde::de::Visitor<'de> for ItemVisitor {
            type Value = Item;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a [section] or a [[list]] of tables")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Item, A::Error> {
                let mut section = Section::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = map.next_value::<Spanned<toml::Value>>()?;
                    section.insert(key, value);
                }
                Ok(Item::Section(section))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                let mut tables = Vec::new();
                // Bounded by the file: each element is a table written in it.
                while let Some(table) = seq.next_element::<Spanned<Section>>()? {
                    tables.push(table);
                }
                Ok(Item::Tables(tables))
            }
        }
        d.deserialize_any(ItemVisitor)
    }
}

type Document = BTreeMap<String, Spanned<Item>>;

/// The directory of drop-ins for the config file at `path`: `<path>.d`, as sshd reads
/// `sshd_config.d` (`/etc/static-ingress/static-ingress.toml.d/`).
pub fn drop_in_dir(path: &Path) -> PathBuf {
    let mut dir = path.as_os_str().to_owned();
    dir.push(".d");
    PathBuf::from(dir)
}

/// The most drop-ins one directory may hold: a bound on work, far above any real use.
pub const MAX_DROP_INS: usize = 256;

/// The largest config file read (the main one or a drop-in).
pub const MAX_FILE_BYTES: u64 = 1 << 20;

impl FileLayer {
    /// The config file at `path` (which need not exist when `optional`) and then every
    /// `*.toml` file in [`drop_in_dir`], in byte order of their names, each a config file of
    /// its own. A key set in a later file replaces the earlier value (each keeps its own
    /// `file:line`); `[[route]]` tables add up, in the order read. Files whose names start
    /// with `.` or do not end in `.toml` are skipped (editor backups, `dpkg-dist` copies). The
    /// errors of every file are returned together.
    pub fn read_with_drop_ins(path: &Path, optional: bool) -> Result<Option<FileLayer>, ConfigErrors> {
        let dir = drop_in_dir(path);
        let mut errors = Vec::new();
        let mut layer = match Self::read(path) {
            Ok(layer) => Some(layer),
            Err(_) if optional && !path.exists() => None,
            Err(e) => {
                errors.extend(e.0);
                None
            }
        };
        let mut names = Vec::new();
        match std::fs::read_dir(&dir) {
            Ok(entries) => {
                for entry in entries {
                    let entry = match entry {
                        Ok(entry) => entry,
                        Err(e) => {
                            errors.push(dir_error(&dir, &format!("cannot list the drop-in directory: {e}")));
                            break;
                        }
                    };
                    let name = entry.file_name();
                    let Some(text) = name.to_str() else {
                        errors.push(dir_error(
                            &dir,
                            &format!("holds a file whose name is not UTF-8 ({}); rename it", name.to_string_lossy()),
                        ));
                        continue;
                    };
                    if text.starts_with('.') || !text.ends_with(".toml") {
                        continue;
                    }
                    names.push(entry.path());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => {
                errors.push(dir_error(&dir, "is not a directory; drop-ins go in a directory of that name"));
            }
            Err(e) => errors.push(dir_error(&dir, &format!("cannot read the drop-in directory: {e}"))),
        }
        names.sort();
        if names.len() > MAX_DROP_INS {
            errors.push(dir_error(&dir, &format!("holds {} drop-ins; at most {MAX_DROP_INS} are read", names.len())));
            names.truncate(MAX_DROP_INS);
        }
        for name in names {
            match Self::read(&name) {
                Ok(next) => match &mut layer {
                    Some(layer) => layer.add(next),
                    None => {
                        // No main file: the first drop-in's path stands for the files in errors.
                        let mut next = next;
                        next.drop_ins = vec![next.path.clone()];
                        next.path = path.to_path_buf();
                        layer = Some(next);
                    }
                },
                Err(e) => errors.extend(e.0),
            }
        }
        if errors.is_empty() { Ok(layer) } else { Err(ConfigErrors(errors)) }
    }

    /// `later`'s keys over this layer's, and its routes after them.
    fn add(&mut self, later: FileLayer) {
        self.entries.extend(later.entries);
        self.routes.extend(later.routes);
        self.drop_ins.push(later.path);
    }

    /// Reads and parses `path`, refusing unknown sections and keys (all of them, not just
    /// the first).
    pub fn read(path: &Path) -> Result<FileLayer, ConfigErrors> {
        let fail = |message: String| {
            ConfigErrors(vec![ConfigError {
                origin: Origin::File { path: path.to_path_buf(), line: None },
                key: None,
                message,
            }])
        };
        // `--config /dev/null`: no settings, as the idiom means.
        if path == Path::new("/dev/null") {
            return Self::parse(path, "");
        }
        // Only a regular file (through symlinks): a FIFO would block the read for ever, a
        // device would never end.
        let meta = std::fs::metadata(path).map_err(|e| fail(format!("cannot read the config file: {e}")))?;
        if !meta.is_file() {
            return Err(fail("is not a regular file; a config file must be one".into()));
        }
        let mut bytes = Vec::new();
        std::fs::File::open(path)
            .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FILE_BYTES + 1), &mut bytes))
            .map_err(|e| {
                fail(format!("cannot read the config file: {e} (it must be readable by the user the proxy runs as)"))
            })?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(fail(format!("is larger than {} KiB; a config file is a few KiB", MAX_FILE_BYTES / 1024)));
        }
        Self::parse_bytes(path, &bytes)
    }

    /// Like [`FileLayer::parse`], for the file's bytes: text that is not UTF-8 is refused with
    /// the line and column of the first bad byte, so it can be found in an editor.
    pub fn parse_bytes(path: &Path, bytes: &[u8]) -> Result<FileLayer, ConfigErrors> {
        match std::str::from_utf8(bytes) {
            Ok(text) => Self::parse(path, text),
            Err(e) => {
                let good = &bytes[..e.valid_up_to()];
                let line_start = good.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                // Characters, not bytes, as an editor counts columns; the part before the bad
                // byte is valid UTF-8 by definition.
                let column = String::from_utf8_lossy(&good[line_start..]).chars().count() + 1;
                let line = good.iter().filter(|b| **b == b'\n').count() + 1;
                let what = match bytes.get(e.valid_up_to()) {
                    Some(b) if e.error_len().is_some() => format!("byte 0x{b:02X} at column {column}"),
                    _ => format!("a character cut short at column {column}"),
                };
                Err(ConfigErrors(vec![ConfigError {
                    origin: Origin::File { path: path.to_path_buf(), line: Some(line) },
                    key: None,
                    message: format!("the config file is not valid UTF-8 ({what}); save it as UTF-8"),
                }]))
            }
        }
    }

    pub fn parse(path: &Path, text: &str) -> Result<FileLayer, ConfigErrors> {
        Self::parse_indexed(path, text, &LineIndex::new(text))
    }

    fn parse_indexed(path: &Path, text: &str, lines: &LineIndex) -> Result<FileLayer, ConfigErrors> {
        let at = |line: Option<usize>| Origin::File { path: path.to_path_buf(), line };

        let doc: Document = match toml::from_str(text) {
            Ok(doc) => doc,
            Err(e) => {
                let line = e.span().map(|s| lines.line(s.start));
                let message = match (not_a_section(text), e.span()) {
                    (Some(name), _) => {
                        let name = cut(&name);
                        format!("`{name}` must be a section: write [{name}] and put its keys below it")
                    }
                    (None, Some(span)) if e.message().starts_with("duplicate key") => duplicate(text, span, lines),
                    (None, _) => cut(e.message().trim()).into_owned(),
                };
                return Err(ConfigErrors(vec![ConfigError { origin: at(line), key: None, message }]));
            }
        };

        let mut errors = Vec::new();
        let mut entries = BTreeMap::new();
        let mut routes = Vec::new();
        let known_sections = keys::sections();
        for (section, item) in doc {
            // Looked up only for an error: a line lookup per key is the budget.
            let start = item.span().start;
            let line = || lines.line(start);
            let table = match item.into_inner() {
                Item::Tables(tables) if section == ROUTE => {
                    for table in tables {
                        routes.push(route_table(path, table, lines));
                    }
                    continue;
                }
                Item::Section(_) if section == ROUTE => {
                    errors.push(ConfigError {
                        origin: at(Some(line())),
                        key: None,
                        message: "routes are a list: write each as [[route]], with double brackets".into(),
                    });
                    continue;
                }
                Item::Tables(_) => {
                    let name = cut(&section);
                    let hint = if known_sections.contains(&section.as_str()) {
                        format!(": write [{name}], with single brackets")
                    } else {
                        String::new()
                    };
                    errors.push(ConfigError {
                        origin: at(Some(line())),
                        key: None,
                        message: format!("[[{name}]] is not a list the config takes (only [[route]] is){hint}"),
                    });
                    continue;
                }
                Item::Section(table) => table,
            };
            if !known_sections.contains(&section.as_str()) {
                let hint = did_you_mean(&section, known_sections.iter().copied());
                errors.push(ConfigError {
                    origin: at(Some(line())),
                    key: None,
                    message: format!(
                        "unknown section [{}]{}",
                        cut(&section),
                        hint.map(|h| format!(" (did you mean [{h}]?)")).unwrap_or_default()
                    ),
                });
                continue;
            }
            for (field, value) in table {
                let name = format!("{section}.{field}");
                let line = lines.line(value.span().start);
                if keys::find(&name).is_none() {
                    errors.push(ConfigError {
                        origin: at(Some(line)),
                        key: None,
                        message: format!(
                            "unknown key {section}.{}{}",
                            cut(&field),
                            key_hint(&section, &field).map(|h| format!(" (did you mean {h}?)")).unwrap_or_default()
                        ),
                    });
                    continue;
                }
                entries.insert(name, FileEntry { value: value.into_inner(), path: path.to_path_buf(), line });
            }
        }
        errors.sort_by_key(|e: &ConfigError| match e.origin {
            Origin::File { line, .. } => line,
            _ => None,
        });
        if errors.is_empty() {
            Ok(FileLayer { path: path.to_path_buf(), entries, routes, drop_ins: Vec::new() })
        } else {
            Err(ConfigErrors(errors))
        }
    }
}

/// A `[[route]]` table with its keys flattened one level (`health = { interval = ... }`, as
/// `health.interval = ...` writes it, becomes `health.interval`), each with its line.
fn route_table(path: &Path, table: Spanned<Section>, lines: &LineIndex) -> RouteTable {
    let line = lines.line(table.span().start);
    let mut entries = BTreeMap::new();
    for (field, value) in table.into_inner() {
        let value_line = lines.line(value.span().start);
        match value.into_inner() {
            toml::Value::Table(sub) => {
                for (k, v) in sub {
                    entries.insert(
                        format!("{field}.{k}"),
                        FileEntry { value: v, path: path.to_path_buf(), line: value_line },
                    );
                }
            }
            v => {
                entries.insert(field, FileEntry { value: v, path: path.to_path_buf(), line: value_line });
            }
        }
    }
    RouteTable { path: path.to_path_buf(), line, entries }
}

fn dir_error(dir: &Path, message: &str) -> ConfigError {
    ConfigError { origin: Origin::File { path: dir.to_path_buf(), line: None }, key: None, message: message.into() }
}

/// Line numbers of byte offsets, from one pass over the text. Finding each key's line by
/// rescanning the text up to it made a file of 80,000 unknown keys take quadratic time.
struct LineIndex {
    /// The offset at which each line after the first starts.
    starts: Vec<usize>,
    /// Bytes scanned and comparisons made, so a test can hold the work to linear.
    steps: Cell<usize>,
}

impl LineIndex {
    fn new(text: &str) -> LineIndex {
        let starts = text.bytes().enumerate().filter(|(_, b)| *b == b'\n').map(|(i, _)| i + 1).collect();
        LineIndex { starts, steps: Cell::new(text.len()) }
    }

    /// The 1-based line that byte `offset` is on.
    fn line(&self, offset: usize) -> usize {
        let before = self.starts.partition_point(|&start| {
            self.steps.set(self.steps.get() + 1);
            start <= offset
        });
        before + 1
    }
}

/// The message for a key or section defined twice, naming it and where it was first set.
/// toml says only "duplicate key", with the span of the second one.
fn duplicate(text: &str, span: std::ops::Range<usize>, lines: &LineIndex) -> String {
    let start = span.start.min(text.len());
    let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
    let line = &text[line_start..];
    let unquote = |k: &'_ str| k.trim().trim_matches(['"', '\'']).to_string();
    // The text before this line parsed up to here, so it holds the first definition (the
    // duplicate is the first error toml meets).
    let before: Option<Document> = toml::from_str(&text[..line_start]).ok();
    if line.trim_start().starts_with('[') {
        let name = unquote(text.get(span).unwrap_or_default());
        let first = before.as_ref().and_then(|d| d.get(&name)).map(|t| lines.line(t.span().start));
        let first = first.map(|l| format!(" (first on line {l})")).unwrap_or_default();
        let name = cut(&name);
        return format!("section [{name}] appears twice{first}; put all its keys under one [{name}]");
    }
    // The key as written before its `=`, dots and all; a span past the `=` is a key inside an
    // inline table, which no key here takes.
    let key_end = line_start + line.find('=').unwrap_or(line.len());
    if start >= key_end {
        return format!("duplicate key {} in an inline table", cut(&unquote(text.get(span).unwrap_or_default())));
    }
    let key = unquote(&text[line_start..key_end]);
    // The key's section is the last header before it.
    match before.as_ref().and_then(|d| d.iter().max_by_key(|(_, t)| t.span().start)) {
        Some((section, table)) => {
            let first = table.get_ref().as_section().and_then(|t| t.get(&key)).map(|v| lines.line(v.span().start));
            let first = first.map(|l| format!(" (first set on line {l})")).unwrap_or_default();
            format!("duplicate key {}.{}{first}", cut(section), cut(&key))
        }
        None => format!("duplicate key {}", cut(&key)),
    }
}

/// The first top-level key that is a plain value instead of a `[section]`, if any.
fn not_a_section(text: &str) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    table.into_iter().find(|(_, v)| !v.is_table()).map(|(k, _)| k)
}

/// Whether `word` is close enough to `candidate` to be a likely typo of it.
fn close(word: &str, candidate: &str) -> Option<usize> {
    let limit = 2.max(candidate.len() / 4);
    // The distance is at least the difference in length: skip the quadratic comparison for a
    // word far longer than any key (a pasted value, say).
    if word.chars().count().abs_diff(candidate.chars().count()) > limit {
        return None;
    }
    Some(strsim::levenshtein(word, candidate)).filter(|d| *d <= limit)
}

/// The candidate closest to `word`, if it is close enough to be a likely typo.
fn did_you_mean<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates.filter_map(|c| close(word, c).map(|d| (d, c))).min_by_key(|(d, _)| *d).map(|(_, c)| c)
}

/// The known keys an unknown `section.field` most likely meant: a typo of a field in its own
/// section first, then the same (or a similar) field in another section, as when a key is put
/// under the wrong header. Ties are all named.
fn key_hint(section: &str, field: &str) -> Option<String> {
    let scored: Vec<((usize, bool), &str)> = keys::KEYS
        .iter()
        .filter_map(|k| close(field, k.field()).map(|d| ((d, k.section() != section), k.name)))
        .collect();
    let best = scored.iter().map(|(score, _)| *score).min()?;
    let names: Vec<&str> = scored.iter().filter(|(score, _)| *score == best).map(|(_, name)| *name).collect();
    Some(names.join(" or "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors(text: &str) -> Vec<String> {
        FileLayer::parse(Path::new("t.toml"), text).unwrap_err().0.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let text = "[proxy]\nconect_timeout = \"1s\"\n\n[admin]\nlisten = \"127.0.0.1:1\"\nbogus = 1\n";
        assert_eq!(
            errors(text),
            vec![
                "t.toml:2: unknown key proxy.conect_timeout (did you mean proxy.connect_timeout?)".to_string(),
                "t.toml:6: unknown key admin.bogus".to_string(),
            ]
        );
    }

    #[test]
    fn unknown_section_and_plain_top_level_value() {
        assert_eq!(
            errors("[prxy]\nlisten = \"x\"\n"),
            vec!["t.toml:1: unknown section [prxy] (did you mean [proxy]?)"]
        );
        assert_eq!(
            errors("backend = \"a:1\"\n"),
            vec!["t.toml:1: `backend` must be a section: write [backend] and put its keys below it"]
        );
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let got = errors("[proxy]\nlisten = \n");
        assert_eq!(got.len(), 1);
        assert!(got[0].starts_with("t.toml:2: "), "{got:?}");
    }

    #[test]
    fn line_lookups_cost_linear_work() {
        // A fuzzed file: 80,000 unknown keys. Looking each one's line up by rescanning the
        // text before it cost about n²/2 byte steps (40 s); one pass and a binary search per
        // key is linear (up to a log factor).
        let n = 80_000;
        let mut text = String::from("[proxy]\n");
        for i in 0..n {
            text.push_str(&format!("k{i} = 1\n"));
        }
        let lines = LineIndex::new(&text);
        let errors = FileLayer::parse_indexed(Path::new("t.toml"), &text, &lines).unwrap_err().0;
        assert_eq!(errors.len(), n);
        assert_eq!(errors[n - 1].to_string(), format!("t.toml:{}: unknown key proxy.k{}", n + 1, n - 1));
        let per_lookup = (usize::BITS - (n + 1).leading_zeros()) as usize + 1;
        let budget = text.len() + n * per_lookup;
        assert!(lines.steps.get() <= budget, "{} steps for {n} keys, budget {budget}", lines.steps.get());
    }

    #[test]
    fn duplicates_name_the_key_and_where_it_was_first_set() {
        assert_eq!(
            errors("[backend]\naddress = \"a:1\"\n\naddress = \"b:1\"\n"),
            vec!["t.toml:4: duplicate key backend.address (first set on line 2)"]
        );
        assert_eq!(
            errors("[proxy]\nidle_timeout = \"1s\"\n[backend]\naddress = \"a:1\"\n[proxy]\n"),
            vec!["t.toml:5: section [proxy] appears twice (first on line 1); put all its keys under one [proxy]"]
        );
        assert_eq!(errors("[proxy]\na.b = 1\na.b = 2\n"), vec!["t.toml:3: duplicate key proxy.a.b"]);
        assert_eq!(errors("[proxy]\nx = { a = 1, a = 2 }\n"), vec!["t.toml:2: duplicate key a in an inline table"]);
    }

    #[test]
    fn a_key_in_the_wrong_section_is_found_in_the_right_one() {
        assert_eq!(
            errors("[proxy]\ndrain_delay = \"1s\"\ndrain_dealy = \"1s\"\n"),
            vec![
                "t.toml:2: unknown key proxy.drain_delay (did you mean lifecycle.drain_delay?)",
                "t.toml:3: unknown key proxy.drain_dealy (did you mean lifecycle.drain_delay?)",
            ]
        );
        // A typo within the section beats the same typo's distance elsewhere; equal ones are
        // all named.
        assert_eq!(
            errors("[dns]\ntimeot = \"1s\"\n[proxy]\ntimeout = \"1s\"\n"),
            vec![
                "t.toml:2: unknown key dns.timeot (did you mean dns.timeout?)",
                "t.toml:4: unknown key proxy.timeout (did you mean dns.timeout or health.timeout?)",
            ]
        );
    }

    #[test]
    fn invalid_utf8_names_the_line_and_column() {
        let err =
            FileLayer::parse_bytes(Path::new("t.toml"), b"[backend]\naddress = \"a:1\"\n# caf\xe9 \n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml:3: the config file is not valid UTF-8 (byte 0xE9 at column 6); save it as UTF-8"
        );
        let err = FileLayer::parse_bytes(Path::new("t.toml"), b"# \xc3").unwrap_err();
        assert_eq!(
            err.to_string(),
            "t.toml:1: the config file is not valid UTF-8 (a character cut short at column 3); save it as UTF-8"
        );
    }

    #[test]
    fn huge_names_are_cut() {
        let long = "k".repeat(1 << 20);
        for text in [
            format!("[proxy]\n{long} = 1\n"),
            format!("[{long}]\n"),
            format!("[proxy]\n{long} = 1\n{long} = 2\n"),
            format!("{long} = 1\n"),
        ] {
            let got = errors(&text);
            assert!(got.iter().all(|e| e.len() < 300), "{:?}", got.iter().map(String::len).collect::<Vec<_>>());
        }
    }

    #[test]
    fn values_keep_their_lines() {
        let layer = FileLayer::parse(Path::new("t.toml"), "# c\n[backend]\naddress = \"a:1\"\n").unwrap();
        assert_eq!(layer.entries["backend.address"].line, 3);
    }

    /// A fresh directory for one test's files.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("static-ingress-dropins-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn drop_ins_are_read_in_name_order_and_later_keys_win_each_with_its_place() {
        let dir = scratch("order");
        let main = dir.join("s.toml");
        std::fs::write(&main, "[backend]\naddress = \"main:1\"\n[proxy]\nidle_timeout = \"1m\"\n").unwrap();
        let d = drop_in_dir(&main);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("50-fleet.toml"), "[backend]\naddress = \"fleet:1\"\n[[route]]\nname = \"a\"\n").unwrap();
        std::fs::write(d.join("10-base.toml"), "[backend]\naddress = \"base:1\"\n[[route]]\nname = \"b\"\n").unwrap();
        // Not read: hidden, a backup, a package manager's copy.
        for skipped in [".50-x.toml", "60-x.toml~", "60-x.toml.dpkg-dist", "README"] {
            std::fs::write(d.join(skipped), "not toml at all [[[").unwrap();
        }
        let layer = FileLayer::read_with_drop_ins(&main, false).unwrap().unwrap();
        let address = &layer.entries["backend.address"];
        assert_eq!(address.value.as_str(), Some("fleet:1"));
        assert_eq!(address.origin().to_string(), format!("{}:2", d.join("50-fleet.toml").display()));
        assert_eq!(layer.entries["proxy.idle_timeout"].origin().to_string(), format!("{}:4", main.display()));
        let names: Vec<_> = layer.routes.iter().map(|r| r.entries["name"].value.as_str().unwrap()).collect();
        assert_eq!(names, ["b", "a"]);
        assert_eq!(layer.drop_ins, [d.join("10-base.toml"), d.join("50-fleet.toml")]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn errors_of_every_file_come_together_and_a_missing_default_file_may_have_drop_ins() {
        let dir = scratch("errors");
        let main = dir.join("s.toml");
        std::fs::write(&main, "[nope]\n").unwrap();
        let d = drop_in_dir(&main);
        std::fs::create_dir(&d).unwrap();
        std::fs::write(d.join("1.toml"), "[proxy]\nno_such = 1\n").unwrap();
        let got: Vec<String> =
            FileLayer::read_with_drop_ins(&main, false).unwrap_err().0.iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with(&format!("{}:1: unknown section [nope]", main.display())), "{got:?}");
        assert!(got[1].starts_with(&format!("{}:2: unknown key proxy.no_such", d.join("1.toml").display())), "{got:?}");

        // The default path may be missing; its drop-ins are read all the same.
        std::fs::remove_file(&main).unwrap();
        std::fs::write(d.join("1.toml"), "[backend]\naddress = \"d:1\"\n").unwrap();
        let layer = FileLayer::read_with_drop_ins(&main, true).unwrap().unwrap();
        assert_eq!(layer.entries["backend.address"].value.as_str(), Some("d:1"));
        // A named file must exist.
        let err = FileLayer::read_with_drop_ins(&main, false).unwrap_err().to_string();
        assert!(err.contains("cannot read the config file"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
        assert!(FileLayer::read_with_drop_ins(&main, true).unwrap().is_none());

        // Only regular files of a sane size are read: a FIFO would block the load for ever.
        std::fs::create_dir_all(&d).unwrap();
        std::fs::create_dir(d.join("2.toml")).unwrap();
        let fifo = std::ffi::CString::new(d.join("3.toml").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        std::fs::write(d.join("4.toml"), vec![b'#'; (MAX_FILE_BYTES + 1) as usize]).unwrap();
        let got: Vec<String> =
            FileLayer::read_with_drop_ins(&main, true).unwrap_err().0.iter().map(ToString::to_string).collect();
        assert_eq!(got.len(), 3, "{got:?}");
        assert!(got[0].ends_with("2.toml: is not a regular file; a config file must be one"), "{got:?}");
        assert!(got[1].ends_with("3.toml: is not a regular file; a config file must be one"), "{got:?}");
        assert!(got[2].ends_with("4.toml: is larger than 1024 KiB; a config file is a few KiB"), "{got:?}");
        std::fs::remove_dir_all(&d).unwrap();

        // A file where the directory should be is said.
        std::fs::write(&d, "").unwrap();
        let err = FileLayer::read_with_drop_ins(&main, true).unwrap_err().to_string();
        assert!(err.contains("is not a directory"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
