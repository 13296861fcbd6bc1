//! The injected filesystem root every read and write goes through, and small parsers for the
//! formats found under `/proc` and `/sys` (CPU lists, `[selected]` option lists).
//!
//! [`Root::live`] is the real `/`; [`Root::new`] points at a fixture tree holding the same paths
//! (`proc/sys/...`, `sys/devices/...`). Reads never fail: a missing or unreadable file is `None`
//! and the checks report it as unknown. In a fixture tree, [`Root::set_value`] also mimics what
//! the kernel shows after a write to a `[selected]` file, so `check` after `apply` sees the change.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::error::TuningError;

/// Largest file we read; nothing under `/proc` or `/sys` that we look at comes close.
const MAX_READ: u64 = 4 << 20;

/// Largest CPU id we accept from a CPU list (guards against absurd ranges in odd files).
const MAX_CPU_ID: usize = 1 << 16;

/// The directory standing for `/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Root {
    dir: PathBuf,
}

impl Root {
    /// The real root of this machine.
    pub fn live() -> Self {
        Self {
            dir: PathBuf::from("/"),
        }
    }

    /// A root at `dir` (`/` gives the live root).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory standing for `/`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether this is the real `/` (live probes and real process limits apply only there).
    pub fn is_live(&self) -> bool {
        self.dir == Path::new("/")
    }

    /// Where the absolute path `abs` lives under this root.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.dir.join(abs.trim_start_matches('/'))
    }

    /// The file's text (lossily decoded), or `None` when it is missing or unreadable.
    pub fn read(&self, abs: &str) -> Option<String> {
        let file = std::fs::File::open(self.path(abs)).ok()?;
        let mut bytes = Vec::new();
        file.take(MAX_READ).read_to_end(&mut bytes).ok()?;
        Some(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The file's text without surrounding whitespace; `None` when missing, unreadable or empty.
    pub fn read_trimmed(&self, abs: &str) -> Option<String> {
        let text = self.read(abs)?;
        let text = text.trim();
        (!text.is_empty()).then(|| text.to_owned())
    }

    /// The file as one unsigned integer.
    pub fn read_u64(&self, abs: &str) -> Option<u64> {
        self.read_trimmed(abs)?.parse().ok()
    }

    /// Whether the path exists (file, directory or symlink).
    pub fn exists(&self, abs: &str) -> bool {
        std::fs::symlink_metadata(self.path(abs)).is_ok()
    }

    /// Names in a directory, sorted; empty when it is missing or unreadable.
    pub fn list(&self, abs: &str) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(self.path(abs)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort_by(|a, b| natural_cmp(a, b));
        names
    }

    /// The last component of a symlink's target (`/sys/class/net/eth0/device` -> `virtio2`).
    pub fn link_name(&self, abs: &str) -> Option<String> {
        let target = std::fs::read_link(self.path(abs)).ok()?;
        Some(target.file_name()?.to_string_lossy().into_owned())
    }

    /// Writes a whole configuration file, creating its directory. Returns whether the content
    /// changed; an identical file is left untouched.
    pub fn write_file(&self, abs: &str, contents: &str) -> Result<bool, TuningError> {
        let path = self.path(abs);
        if std::fs::read(&path).ok().as_deref() == Some(contents.as_bytes()) {
            return Ok(false);
        }
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|source| TuningError::Write {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(&path, contents).map_err(|source| TuningError::Write { path, source })?;
        Ok(true)
    }

    /// Writes one runtime kernel setting (`/proc/sys/...`, `/sys/...`, `/proc/irq/...`).
    ///
    /// On the live root this is a plain write; the kernel does the rest. In a fixture tree a file
    /// showing `a [b] c` gets the brackets moved to `value` when it is one of the options, the
    /// way the kernel would show it afterwards.
    pub fn set_value(&self, abs: &str, value: &str) -> Result<(), TuningError> {
        let path = self.path(abs);
        let mut text = format!("{value}\n");
        if !self.is_live() {
            if let Some(old) = self.read(abs) {
                if old.contains('[') && options(&old).iter().any(|o| o == value) {
                    text = options(&old)
                        .iter()
                        .map(|o| {
                            if o == value {
                                format!("[{o}]")
                            } else {
                                o.clone()
                            }
                        })
                        .collect::<Vec<_>>()
                        .join(" ")
                        + "\n";
                }
            } else if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| TuningError::Write {
                    path: parent.to_path_buf(),
                    source,
                })?;
            }
        }
        std::fs::write(&path, text).map_err(|source| TuningError::Write { path, source })
    }
}

/// Orders `cpu2` before `cpu10` and `irq/9` before `irq/10`.
fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let split = |s: &str| {
        let digits = s.len() - s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
        let (head, tail) = s.split_at(s.len() - digits);
        (head.to_owned(), tail.parse::<u64>().ok())
    };
    split(a).cmp(&split(b)).then_with(|| a.cmp(b))
}

/// Parses a kernel CPU list (`0-3,8,10-11`). `None` for anything malformed.
pub fn parse_cpulist(text: &str) -> Option<Vec<usize>> {
    let text = text.trim();
    let mut cpus = Vec::new();
    if text.is_empty() {
        return Some(cpus);
    }
    for part in text.split(',') {
        let part = part.trim();
        let (lo, hi) = match part.split_once('-') {
            Some((lo, hi)) => (lo.trim().parse::<usize>().ok()?, hi.trim().parse().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        if lo > hi || hi > MAX_CPU_ID {
            return None;
        }
        cpus.extend(lo..=hi);
    }
    cpus.sort_unstable();
    cpus.dedup();
    Some(cpus)
}

/// Formats CPUs as a kernel CPU list (`0-3,8`); empty input gives an empty string.
pub fn format_cpulist(cpus: &[usize]) -> String {
    let mut sorted = cpus.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut parts = Vec::new();
    let mut i = 0;
    while i < sorted.len() {
        let start = sorted[i];
        let mut end = start;
        while i + 1 < sorted.len() && sorted[i + 1] == end + 1 {
            i += 1;
            end = sorted[i];
        }
        parts.push(if start == end {
            start.to_string()
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

/// The selected option of a `a [b] c` file, or the whole trimmed text when it has no brackets.
pub fn selected(text: &str) -> Option<String> {
    let text = text.trim();
    if let (Some(open), Some(close)) = (text.find('['), text.find(']')) {
        if open < close {
            let inner = text[open + 1..close].trim();
            return (!inner.is_empty()).then(|| inner.to_owned());
        }
        return None;
    }
    (!text.is_empty()).then(|| text.to_owned())
}

/// All options of a `a [b] c` file, brackets removed.
pub fn options(text: &str) -> Vec<String> {
    text.split_whitespace()
        .map(|w| w.trim_matches(|c| c == '[' || c == ']').to_owned())
        .filter(|w| !w.is_empty())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpulists_round_trip() {
        assert_eq!(
            parse_cpulist("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(format_cpulist(&[11, 0, 1, 2, 3, 8, 10]), "0-3,8,10-11");
        assert_eq!(parse_cpulist(""), Some(vec![]));
        assert_eq!(format_cpulist(&[]), "");
        assert_eq!(parse_cpulist("3-1"), None);
        assert_eq!(parse_cpulist("x"), None);
        assert_eq!(parse_cpulist("0-99999999"), None);
    }

    #[test]
    fn selectors() {
        assert_eq!(
            selected("always [madvise] never").as_deref(),
            Some("madvise")
        );
        assert_eq!(selected("performance\n").as_deref(), Some("performance"));
        assert_eq!(selected("[]"), None);
        assert_eq!(selected("  "), None);
        assert_eq!(
            options("[none] mq-deadline kyber"),
            ["none", "mq-deadline", "kyber"]
        );
    }

    #[test]
    fn fixture_set_value_moves_brackets() {
        let dir = tempfile::tempdir().unwrap();
        let root = Root::new(dir.path());
        std::fs::create_dir_all(dir.path().join("sys/x")).unwrap();
        std::fs::write(dir.path().join("sys/x/enabled"), "[always] madvise never\n").unwrap();
        root.set_value("/sys/x/enabled", "madvise").unwrap();
        assert_eq!(
            root.read("/sys/x/enabled").unwrap(),
            "always [madvise] never\n"
        );
        root.set_value("/proc/sys/new", "7").unwrap();
        assert_eq!(root.read_u64("/proc/sys/new"), Some(7));
    }

    #[test]
    fn natural_order() {
        let mut v = vec!["cpu10", "cpu2", "cpufreq", "cpu1"];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(v, ["cpu1", "cpu2", "cpu10", "cpufreq"]);
    }
}
