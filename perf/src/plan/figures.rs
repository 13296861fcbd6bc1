//! Where measured figures come from, and how they are laid over the seed figures.
//!
//! - `--figures FILE`: a small JSON or TOML file of our own, strict: every key must name a
//!   figure (see [`Figures`]) or one of its [aliases](ALIASES), at the top level or inside a
//!   `figures` table; `note`, `source` and `description` strings are allowed beside them.
//! - `--results FILE`: a results JSON written by `iris-load`, lenient: if it is a JSON object,
//!   the planner reads the figure keys it knows from its top level and from a `figures` object
//!   (the `figures` object wins), and reports which keys it used; everything else is ignored.
//! - Flags (`--edge-msgs-per-core-per-s …`, `--measured KEY=VALUE`): last word.
//!
//! [`Overrides`] records each value with where it came from, so the report can say so.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Serialize;
use serde_json::{Map, Value};

use super::model::{Figures, Target};
use super::PlanError;

/// Other names accepted for a figure, `(alias, canonical)`.
pub const ALIASES: &[(&str, &str)] = &[
    ("msgs_per_s_per_core", "edge_msgs_per_core_per_s"),
    ("msgs_per_core_per_s", "edge_msgs_per_core_per_s"),
    ("delivered_msgs_per_s_per_core", "edge_msgs_per_core_per_s"),
    ("edge_msgs_per_s_per_core", "edge_msgs_per_core_per_s"),
    ("conns_per_node", "edge_conns_per_node"),
    ("connections_per_node", "edge_conns_per_node"),
    ("edge_connections_per_node", "edge_conns_per_node"),
    ("bytes_per_idle_conn", "edge_bytes_per_idle_conn"),
    ("bytes_per_conn", "edge_bytes_per_idle_conn"),
    ("edge_bytes_per_conn", "edge_bytes_per_idle_conn"),
    ("logins_per_s", "logins_per_s_per_core"),
    ("edge_logins_per_s_per_core", "logins_per_s_per_core"),
    ("drain_msgs_per_s_per_core", "drain_msgs_per_s"),
    ("edge_drain_msgs_per_s", "drain_msgs_per_s"),
];

/// Keys a `--figures` file may carry beside figures, as free text.
const META_KEYS: &[&str] = &["note", "source", "description"];

/// The DESIGN.md per-core goals, as a figure set (`iris-plan --goals`).
pub const DESIGN_GOALS: &[(&str, f64)] = &[
    ("edge_msgs_per_core_per_s", 250_000.0),
    ("edge_bytes_per_idle_conn", 2_048.0),
    ("logins_per_s_per_core", 50_000.0),
    ("drain_msgs_per_s", 500_000.0),
];

/// Names of every [`Figures`] field.
pub fn figure_keys() -> Vec<String> {
    keys_of(&Figures::default())
}

/// Names of every [`Target`] field.
pub fn target_keys() -> Vec<String> {
    keys_of(&Target::default())
}

fn keys_of<T: Serialize>(v: &T) -> Vec<String> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m.keys().cloned().collect(),
        _ => Vec::new(),
    }
}

/// The canonical figure name of `key` (itself or through an alias), if it names a figure.
pub fn canonical_figure(key: &str) -> Option<String> {
    let key = key.trim().to_ascii_lowercase().replace('-', "_");
    if figure_keys().contains(&key) {
        return Some(key);
    }
    ALIASES
        .iter()
        .find(|(a, _)| *a == key)
        .map(|(_, c)| (*c).to_owned())
}

/// One overriding value and where it came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Override {
    /// The value.
    pub value: f64,
    /// Where it came from: a file path with the key read, a flag, `design goals`.
    pub source: String,
}

/// Figure values laid over a [`Figures`], by canonical name.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Overrides {
    /// By canonical figure name.
    pub values: BTreeMap<String, Override>,
}

impl Overrides {
    /// Whether nothing overrides anything.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Sets figure `key` (canonical or alias) to `value`.
    pub fn set(&mut self, key: &str, value: f64, source: &str) -> Result<(), PlanError> {
        let canonical =
            canonical_figure(key).ok_or_else(|| PlanError::UnknownKey(key.to_owned()))?;
        if !value.is_finite() {
            return Err(PlanError::Invalid {
                key: canonical,
                reason: "must be finite".into(),
            });
        }
        self.values.insert(
            canonical,
            Override {
                value,
                source: source.to_owned(),
            },
        );
        Ok(())
    }

    /// Lays `other` over `self` (its values win).
    pub fn merge(&mut self, other: Overrides) {
        self.values.extend(other.values);
    }

    /// `base` with every override applied.
    pub fn apply(&self, base: &Figures) -> Result<Figures, PlanError> {
        let mut map = match serde_json::to_value(base)? {
            Value::Object(m) => m,
            _ => Map::new(),
        };
        for (k, o) in &self.values {
            map.insert(k.clone(), number(o.value));
        }
        let figures: Figures = serde_json::from_value(Value::Object(map))?;
        figures.validate()?;
        Ok(figures)
    }

    /// The DESIGN.md goals ([`DESIGN_GOALS`]).
    pub fn design_goals() -> Self {
        let mut o = Self::default();
        for (k, v) in DESIGN_GOALS {
            o.values.insert(
                (*k).to_owned(),
                Override {
                    value: *v,
                    source: "design goals".into(),
                },
            );
        }
        o
    }
}

fn number(v: f64) -> Value {
    serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number)
}

/// Applies `key = value` to the target or the seed figures (`--assume`): any [`Target`] or
/// [`Figures`] key.
pub fn assume(
    target: &mut Target,
    figures: &mut Figures,
    key: &str,
    value: f64,
) -> Result<(), PlanError> {
    let norm = key.trim().to_ascii_lowercase().replace('-', "_");
    if target_keys().contains(&norm) {
        *target = set_field(target, &norm, value)?;
        return target.validate();
    }
    let canonical = canonical_figure(&norm).ok_or_else(|| PlanError::UnknownKey(key.to_owned()))?;
    *figures = set_field(figures, &canonical, value)?;
    figures.validate()
}

fn set_field<T>(v: &T, key: &str, value: f64) -> Result<T, PlanError>
where
    T: Serialize + serde::de::DeserializeOwned,
{
    let mut map = match serde_json::to_value(v)? {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    let new = match map.get(key) {
        Some(Value::Number(n)) if n.is_u64() => {
            if value.fract() != 0.0 || value < 0.0 || value > u32::MAX as f64 {
                return Err(PlanError::Invalid {
                    key: key.into(),
                    reason: "must be a whole number".into(),
                });
            }
            // Checked whole and in range just above.
            Value::from(value as u64)
        }
        _ => number(value),
    };
    map.insert(key.to_owned(), new);
    Ok(serde_json::from_value(Value::Object(map))?)
}

/// Parses `KEY=VALUE` (the value a number; `_` separators allowed).
pub fn parse_assignment(s: &str) -> Result<(String, f64), PlanError> {
    let (k, v) = s.split_once('=').ok_or_else(|| PlanError::Invalid {
        key: s.into(),
        reason: "expected KEY=VALUE".into(),
    })?;
    Ok((k.trim().to_owned(), parse_number(k.trim(), v)?))
}

/// Parses a number as a flag or file gives it: `1e9`, `125_000`, `125,000`.
pub fn parse_number(key: &str, s: &str) -> Result<f64, PlanError> {
    let cleaned: String = s
        .trim()
        .chars()
        .filter(|c| *c != '_' && *c != ',')
        .collect();
    cleaned
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| PlanError::Invalid {
            key: key.into(),
            reason: format!("{s:?} is not a number"),
        })
}

fn value_number(key: &str, v: &Value) -> Result<f64, PlanError> {
    match v {
        Value::Number(n) => n.as_f64().ok_or_else(|| PlanError::Invalid {
            key: key.into(),
            reason: "not a number".into(),
        }),
        Value::String(s) => parse_number(key, s),
        _ => Err(PlanError::Invalid {
            key: key.into(),
            reason: "must be a number".into(),
        }),
    }
}

/// Reads a `--figures` file (JSON if it parses as JSON or ends in `.json`, else TOML). Strict.
pub fn figures_file(path: &Path) -> Result<Overrides, PlanError> {
    let name = path.display().to_string();
    let wrap = |e: PlanError| PlanError::File {
        path: name.clone(),
        source: Box::new(e),
    };
    let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
        path: name.clone(),
        source,
    })?;
    let is_json = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"))
        || text.trim_start().starts_with('{');
    let value: Value = if is_json {
        serde_json::from_str(&text).map_err(|e| wrap(e.into()))?
    } else {
        let t: toml::Value = toml::from_str(&text).map_err(|e| wrap(e.into()))?;
        serde_json::to_value(t).map_err(|e| wrap(e.into()))?
    };
    figures_value(&value, &name).map_err(wrap)
}

/// Reads figures from a parsed `--figures` document. Strict: unknown keys are errors.
pub fn figures_value(value: &Value, source: &str) -> Result<Overrides, PlanError> {
    let Value::Object(top) = value else {
        return Err(PlanError::Invalid {
            key: source.into(),
            reason: "expected a table of figures".into(),
        });
    };
    let mut out = Overrides::default();
    let mut read = |map: &Map<String, Value>, prefix: &str| -> Result<(), PlanError> {
        for (k, v) in map {
            if prefix.is_empty() && k == "figures" && v.is_object() {
                continue;
            }
            if META_KEYS.contains(&k.as_str()) && v.is_string() {
                continue;
            }
            let x = value_number(k, v)?;
            out.set(k, x, &format!("{source}: {prefix}{k}"))?;
        }
        Ok(())
    };
    read(top, "")?;
    if let Some(Value::Object(inner)) = top.get("figures") {
        read(inner, "figures.")?;
    }
    Ok(out)
}

/// What a `--results` file gave.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ResultsRead {
    /// The file.
    pub path: String,
    /// Keys read, as they appear in the file (`figures.` prefix when inside `figures`).
    pub used: Vec<String>,
    /// Why nothing could be read, when so.
    pub note: Option<String>,
}

/// Reads a `--results` file. Lenient: a file that is not a JSON object, or has no figure keys,
/// gives no figures and a note; figure keys whose values are not numbers are skipped.
pub fn results_file(path: &Path) -> Result<(Overrides, ResultsRead), PlanError> {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|source| PlanError::Io {
        path: name.clone(),
        source,
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| PlanError::File {
        path: name.clone(),
        source: Box::new(e.into()),
    })?;
    Ok(results_value(&value, &name))
}

/// Reads figures from a parsed results document (see [`results_file`]).
pub fn results_value(value: &Value, source: &str) -> (Overrides, ResultsRead) {
    let mut out = Overrides::default();
    let mut read = ResultsRead {
        path: source.to_owned(),
        ..Default::default()
    };
    let Value::Object(top) = value else {
        read.note = Some("not a JSON object: no figures read".into());
        return (out, read);
    };
    let mut take = |map: &Map<String, Value>, prefix: &str| {
        for (k, v) in map {
            if canonical_figure(k).is_none() {
                continue;
            }
            let Ok(x) = value_number(k, v) else { continue };
            if out.set(k, x, &format!("{source}: {prefix}{k}")).is_ok() {
                read.used.push(format!("{prefix}{k}"));
            }
        }
    };
    take(top, "");
    if let Some(Value::Object(inner)) = top.get("figures") {
        take(inner, "figures.");
    }
    if read.used.is_empty() {
        read.note = Some("no figure keys found".into());
    }
    (out, read)
}
