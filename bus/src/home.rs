//! Homing: which region stores a user's messages and prekeys.
//!
//! A federated deployment configures an ordered, append-only list of region names (`regions`);
//! a region's index is its position in the list (at most [`MAX_REGIONS`]) and goes into every
//! message id the region mints (see [`crate::hops::id_region`]). Each user has exactly one home
//! region: the entry of the home table if there is one (an operator's override, loaded from a
//! file with [`Homes::load_table`]), else [`rendezvous`] hashing over the region list. Every
//! edge and core of every region computes the same answer, so a frame for a user homed
//! elsewhere is wrapped in a [`crate::Route`] for that region and sent on the global bus.
//!
//! An empty region list is a single-region deployment: everyone is homed in the own region, its
//! index is 0 and there is no global bus. `docs/REGIONS.md` holds the definition, the test
//! vectors client libraries can check themselves against, and the table file format.

use std::collections::HashMap;
use std::path::Path;

use crate::topics::{is_valid_region, user_hash};

/// At most this many regions (the region index has 4 bits in a message id).
pub const MAX_REGIONS: usize = 16;

/// A region configuration or home table that cannot be used (a configuration error).
#[derive(Debug, thiserror::Error)]
pub enum HomeError {
    #[error("invalid region name {0:?} (1 to 64 of [a-z0-9-], not \"global\")")]
    InvalidRegion(String),
    #[error("region {0:?} is listed twice in the region list")]
    Duplicate(String),
    #[error("{0} regions listed; at most {MAX_REGIONS} are supported")]
    TooMany(usize),
    #[error("own region {own:?} is not in the region list {regions:?}")]
    OwnMissing { own: String, regions: Vec<String> },
    #[error(
        "home table entry for user {user:?} names unknown region {region:?} (regions: {regions:?})"
    )]
    UnknownTableRegion {
        user: String,
        region: String,
        regions: Vec<String>,
    },
    #[error("home table {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("home table {path} line {line}: {reason}")]
    BadLine {
        path: String,
        line: usize,
        reason: String,
    },
}

/// The region list of a deployment, this process's own region in it, and the home table.
#[derive(Debug, Clone)]
pub struct Homes {
    regions: Vec<String>,
    own: String,
    own_index: u32,
    table: HashMap<Vec<u8>, String>,
}

impl Homes {
    /// `regions` empty => single region `own` (everyone homed there, index 0). Errors when: own
    /// region not in a non-empty list; a name is invalid ([`is_valid_region`]); duplicates; more
    /// than [`MAX_REGIONS`] regions; a table entry naming a region not in the list.
    pub fn new(
        own: &str,
        regions: &[String],
        table: HashMap<Vec<u8>, String>,
    ) -> Result<Homes, HomeError> {
        if !is_valid_region(own) {
            return Err(HomeError::InvalidRegion(own.to_string()));
        }
        if regions.len() > MAX_REGIONS {
            return Err(HomeError::TooMany(regions.len()));
        }
        for (i, r) in regions.iter().enumerate() {
            if !is_valid_region(r) {
                return Err(HomeError::InvalidRegion(r.clone()));
            }
            if regions[..i].contains(r) {
                return Err(HomeError::Duplicate(r.clone()));
            }
        }
        let (list, own_index) = if regions.is_empty() {
            (vec![own.to_string()], 0)
        } else {
            let Some(i) = regions.iter().position(|r| r == own) else {
                return Err(HomeError::OwnMissing {
                    own: own.to_string(),
                    regions: regions.to_vec(),
                });
            };
            (regions.to_vec(), i as u32)
        };
        // Sorted so the error names the same entry whatever the map's order.
        let mut entries: Vec<_> = table.iter().collect();
        entries.sort();
        for (user, region) in entries {
            if !list.contains(region) {
                return Err(HomeError::UnknownTableRegion {
                    user: String::from_utf8_lossy(user).into_owned(),
                    region: region.clone(),
                    regions: list.clone(),
                });
            }
        }
        Ok(Homes {
            regions: list,
            own: own.to_string(),
            own_index,
            table,
        })
    }

    /// A single-region `Homes` for `own` (no list, no table). `own` must be a valid region name
    /// for the result to be meaningful; it is not checked here.
    pub fn single(own: &str) -> Homes {
        Homes {
            regions: vec![own.to_string()],
            own: own.to_string(),
            own_index: 0,
            table: HashMap::new(),
        }
    }

    /// Reads a home table file: UTF-8 text, one `user region` pair per line (whitespace
    /// separated), `#` starts a comment, blank lines are ignored. A user listed twice is an
    /// error. Region names are checked against the list by [`Homes::new`].
    pub fn load_table(path: &Path) -> Result<HashMap<Vec<u8>, String>, HomeError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| HomeError::Read {
            path: shown.clone(),
            source: e,
        })?;
        parse_table(&shown, &text)
    }

    pub fn own(&self) -> &str {
        &self.own
    }

    /// The own region's position in the list, 0 when single-region.
    pub fn own_index(&self) -> u32 {
        self.own_index
    }

    /// The region list (the own region alone when single-region).
    pub fn regions(&self) -> &[String] {
        &self.regions
    }

    /// More than one region.
    pub fn is_multi(&self) -> bool {
        self.regions.len() > 1
    }

    /// The index of `region` in the list.
    pub fn index_of(&self, region: &str) -> Option<u32> {
        self.regions
            .iter()
            .position(|r| r == region)
            .map(|i| i as u32)
    }

    /// The number of entries in the home table.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// The home region of `user`: the table's entry, else [`rendezvous`] over the list.
    pub fn home_of<'a>(&'a self, user: &[u8]) -> &'a str {
        if let Some(r) = self.table.get(user) {
            return r;
        }
        if !self.is_multi() {
            return &self.own;
        }
        rendezvous(user, &self.regions).unwrap_or(&self.own)
    }

    /// True when `user` is homed in the own region.
    pub fn is_home(&self, user: &[u8]) -> bool {
        self.home_of(user) == self.own
    }
}

impl PartialEq for Homes {
    fn eq(&self, other: &Self) -> bool {
        self.regions == other.regions && self.own == other.own && self.table == other.table
    }
}

fn parse_table(path: &str, text: &str) -> Result<HashMap<Vec<u8>, String>, HomeError> {
    let mut table = HashMap::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |reason: String| HomeError::BadLine {
            path: path.to_string(),
            line: n + 1,
            reason,
        };
        let mut words = line.split_whitespace();
        let (Some(user), Some(region), None) = (words.next(), words.next(), words.next()) else {
            return Err(bad(format!(
                "expected `user region`, found {:?}",
                raw.trim()
            )));
        };
        if !is_valid_region(region) {
            return Err(bad(format!("invalid region name {region:?}")));
        }
        if table
            .insert(user.as_bytes().to_vec(), region.to_string())
            .is_some()
        {
            return Err(bad(format!("user {user:?} is listed twice")));
        }
    }
    Ok(table)
}

/// The splitmix64 finalizer.
fn mix64(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^= x >> 31;
    x
}

/// Rendezvous (highest random weight) hashing: for each region r, score =
/// mix64(fnv1a64(r) ^ fnv1a64(user)) with FNV-1a 64 as [`user_hash`] and mix64 the splitmix64
/// finalizer; the highest score wins, ties go to the name that sorts first. `None` for an empty
/// list. Adding a region moves only the users it wins (about 1/n of them), all to it.
pub fn rendezvous<'a>(user: &[u8], regions: &'a [String]) -> Option<&'a str> {
    let u = user_hash(user);
    let mut best: Option<(u64, &'a str)> = None;
    for r in regions {
        let score = mix64(user_hash(r.as_bytes()) ^ u);
        best = match best {
            Some((s, name)) if s > score || (s == score && name <= r.as_str()) => Some((s, name)),
            _ => Some((score, r.as_str())),
        };
    }
    best.map(|(_, r)| r)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn list(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const USERS: [&str; 10] = [
        "alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi", "", "zoë",
    ];

    /// The vectors of `docs/REGIONS.md` (checked against an independent implementation).
    #[test]
    fn rendezvous_test_vectors() {
        let two = list(&["tokyo", "frankfurt"]);
        let want2 = [
            "frankfurt",
            "frankfurt",
            "tokyo",
            "tokyo",
            "frankfurt",
            "frankfurt",
            "tokyo",
            "tokyo",
            "tokyo",
            "frankfurt",
        ];
        let three = list(&["tokyo", "frankfurt", "virginia"]);
        let want3 = [
            "frankfurt",
            "frankfurt",
            "tokyo",
            "virginia",
            "frankfurt",
            "frankfurt",
            "virginia",
            "tokyo",
            "tokyo",
            "virginia",
        ];
        for (i, u) in USERS.iter().enumerate() {
            assert_eq!(rendezvous(u.as_bytes(), &two), Some(want2[i]), "{u:?} of 2");
            assert_eq!(
                rendezvous(u.as_bytes(), &three),
                Some(want3[i]),
                "{u:?} of 3"
            );
        }
        // The list order does not matter, only the names.
        let mut reversed = three.clone();
        reversed.reverse();
        for u in USERS {
            assert_eq!(
                rendezvous(u.as_bytes(), &reversed),
                rendezvous(u.as_bytes(), &three)
            );
        }
        assert_eq!(rendezvous(b"alice", &[]), None);
        assert_eq!(mix64(0), 0);
        assert_eq!(mix64(1), 0x5692_161d_100b_05e5);
    }

    #[test]
    fn homes_use_the_table_then_rendezvous() {
        let regions = list(&["tokyo", "frankfurt", "virginia"]);
        let table = HashMap::from([(b"alice".to_vec(), "virginia".to_string())]);
        let h = Homes::new("tokyo", &regions, table).unwrap();
        assert!(h.is_multi());
        assert_eq!(h.own(), "tokyo");
        assert_eq!(h.own_index(), 0);
        assert_eq!(h.regions(), &regions[..]);
        assert_eq!(h.home_of(b"alice"), "virginia", "the table overrides");
        assert_eq!(h.home_of(b"bob"), "frankfurt");
        assert_eq!(h.home_of(b"carol"), "tokyo");
        assert!(h.is_home(b"carol"));
        assert!(!h.is_home(b"alice"));
        assert_eq!(h.index_of("virginia"), Some(2));
        let f = Homes::new("virginia", &regions, HashMap::new()).unwrap();
        assert_eq!(f.own_index(), 2);
        assert_eq!(f.home_of(b"alice"), "frankfurt", "no table: rendezvous");
    }

    #[test]
    fn an_empty_list_is_a_single_region() {
        let h = Homes::new("local", &[], HashMap::new()).unwrap();
        assert!(!h.is_multi());
        assert_eq!(h.own_index(), 0);
        assert_eq!(h.regions(), &["local".to_string()][..]);
        for u in USERS {
            assert!(h.is_home(u.as_bytes()));
        }
        assert_eq!(h, Homes::single("local"));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let regions = list(&["tokyo", "frankfurt"]);
        let e = Homes::new("paris", &regions, HashMap::new()).unwrap_err();
        assert!(matches!(e, HomeError::OwnMissing { .. }));
        assert!(e.to_string().contains("\"paris\""), "{e}");
        let e = Homes::new("tokyo", &list(&["tokyo", "Frankfurt"]), HashMap::new()).unwrap_err();
        assert!(matches!(e, HomeError::InvalidRegion(ref r) if r == "Frankfurt"));
        let e = Homes::new("tokyo", &list(&["tokyo", "global"]), HashMap::new()).unwrap_err();
        assert!(matches!(e, HomeError::InvalidRegion(_)));
        let e = Homes::new("tokyo", &list(&["tokyo", "tokyo"]), HashMap::new()).unwrap_err();
        assert!(matches!(e, HomeError::Duplicate(_)));
        let many: Vec<String> = (0..17).map(|i| format!("r{i}")).collect();
        let e = Homes::new("r0", &many, HashMap::new()).unwrap_err();
        assert!(matches!(e, HomeError::TooMany(17)));
        assert!(Homes::new("r0", &many[..16], HashMap::new()).is_ok());
        let table = HashMap::from([(b"alice".to_vec(), "paris".to_string())]);
        let e = Homes::new("tokyo", &regions, table.clone()).unwrap_err();
        assert!(matches!(e, HomeError::UnknownTableRegion { .. }));
        assert!(e.to_string().contains("\"paris\""), "{e}");
        // Single region: the table may only name the own region.
        assert!(Homes::new("tokyo", &[], table).is_err());
    }

    #[test]
    fn table_files_parse_and_errors_name_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("homes.txt");
        std::fs::write(
            &path,
            "# moved users\n\nalice tokyo\n  bob\tfrankfurt   # a comment\n",
        )
        .unwrap();
        let t = Homes::load_table(&path).unwrap();
        assert_eq!(t.len(), 2);
        assert_eq!(t[&b"alice".to_vec()], "tokyo");
        assert_eq!(t[&b"bob".to_vec()], "frankfurt");

        for (text, line) in [
            ("alice tokyo\nbob\n", 2),
            ("alice tokyo extra\n", 1),
            ("\n\nalice Tokyo\n", 3),
            ("alice tokyo\nalice frankfurt\n", 2),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = Homes::load_table(&path).unwrap_err();
            assert!(
                matches!(e, HomeError::BadLine { line: l, .. } if l == line),
                "{text:?}: {e}"
            );
            assert!(e.to_string().contains(&format!("line {line}")), "{e}");
        }
        let e = Homes::load_table(&dir.path().join("missing")).unwrap_err();
        assert!(matches!(e, HomeError::Read { .. }), "{e}");

        // A table naming an unknown region is refused when the homes are built.
        std::fs::write(&path, "alice paris\n").unwrap();
        let t = Homes::load_table(&path).unwrap();
        let e = Homes::new("tokyo", &list(&["tokyo", "frankfurt"]), t).unwrap_err();
        assert!(e.to_string().contains("paris"), "{e}");
    }

    #[test]
    fn a_fourth_region_takes_about_a_quarter_and_moves_nobody_else() {
        let three = list(&["tokyo", "frankfurt", "virginia"]);
        let four = list(&["tokyo", "frankfurt", "virginia", "sydney"]);
        let mut moved = 0;
        let mut per_region = HashMap::<&str, usize>::new();
        for i in 0..10_000 {
            let user = format!("user-{i}");
            let before = rendezvous(user.as_bytes(), &three).unwrap();
            let after = rendezvous(user.as_bytes(), &four).unwrap();
            *per_region.entry(before).or_default() += 1;
            if before != after {
                assert_eq!(after, "sydney", "{user} moved from {before} to {after}");
                moved += 1;
            }
        }
        assert!((2_000..=3_000).contains(&moved), "{moved} of 10000 moved");
        for (r, n) in per_region {
            assert!((2_900..=3_800).contains(&n), "{r} homes {n} of 10000");
        }
    }

    proptest! {
        #[test]
        fn home_of_is_a_configured_region(
            user in proptest::collection::vec(any::<u8>(), 0..40),
            n in 1usize..=16,
            own in 0usize..16,
        ) {
            let regions: Vec<String> = (0..n).map(|i| format!("region-{i}")).collect();
            let own = &regions[own % n];
            let h = Homes::new(own, &regions, HashMap::new()).unwrap();
            let home = h.home_of(&user);
            prop_assert!(regions.iter().any(|r| r == home));
            prop_assert_eq!(Some(home), rendezvous(&user, &regions));
            prop_assert_eq!(h.is_home(&user), home == own);
        }
    }
}
