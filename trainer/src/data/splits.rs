//! Cross-validation splits (`splits_final.json`), bit-identical to nnU-Net's
//! `generate_crossval_split` (sklearn `KFold(n_splits=5, shuffle=True, random_state=12345)`
//! over the sorted case identifiers), including numpy's legacy `RandomState` (MT19937) so the
//! shuffled folds match exactly.

use std::path::{Path, PathBuf};

use datasets::PreprocessedDir;
use serde::{Deserialize, Serialize};

use super::DataError;

/// nnU-Net's KFold seed.
pub const SPLIT_SEED: u32 = 12345;
/// Number of folds nnU-Net creates.
pub const NUM_FOLDS: usize = 5;

/// One fold: training and validation case identifiers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Split {
    /// Training cases.
    pub train: Vec<String>,
    /// Validation cases.
    pub val: Vec<String>,
}

/// Which fold to train: a number or `all`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fold {
    /// Fold `k` of `splits_final.json` (or a random 80:20 split if `k` is past its end).
    Index(usize),
    /// Train and validate on all cases.
    All,
}

impl std::str::FromStr for Fold {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if s == "all" {
            return Ok(Fold::All);
        }
        s.parse::<usize>()
            .map(Fold::Index)
            .map_err(|_| format!("invalid fold {s:?}: expected a non-negative integer or \"all\""))
    }
}

impl std::fmt::Display for Fold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fold::Index(k) => write!(f, "{k}"),
            Fold::All => write!(f, "all"),
        }
    }
}

/// numpy's MT19937 with the legacy `RandomState(int)` seeding (`init_genrand`).
#[derive(Clone)]
pub struct Mt19937 {
    mt: [u32; 624],
    idx: usize,
}

impl Mt19937 {
    /// `np.random.RandomState(seed)`'s generator.
    pub fn new(seed: u32) -> Self {
        let mut mt = [0u32; 624];
        mt[0] = seed;
        for i in 1..624 {
            mt[i] = 1_812_433_253u32
                .wrapping_mul(mt[i - 1] ^ (mt[i - 1] >> 30))
                .wrapping_add(i as u32);
        }
        Mt19937 { mt, idx: 624 }
    }

    fn generate(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..624 {
            let y = (self.mt[i] & UPPER) | (self.mt[(i + 1) % 624] & LOWER);
            let mut v = self.mt[(i + 397) % 624] ^ (y >> 1);
            if y & 1 == 1 {
                v ^= MATRIX_A;
            }
            self.mt[i] = v;
        }
        self.idx = 0;
    }

    /// Next raw 32-bit output.
    pub fn next_u32(&mut self) -> u32 {
        if self.idx >= 624 {
            self.generate();
        }
        let mut y = self.mt[self.idx];
        self.idx += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^= y >> 18;
        y
    }

    /// numpy's `random_interval(max)`: uniform in `[0, max]` by masked rejection.
    pub fn random_interval(&mut self, max: u64) -> u64 {
        if max == 0 {
            return 0;
        }
        let mut mask = max;
        for s in [1, 2, 4, 8, 16, 32] {
            mask |= mask >> s;
        }
        if max <= 0xffff_ffff {
            loop {
                let v = u64::from(self.next_u32()) & mask;
                if v <= max {
                    return v;
                }
            }
        } else {
            loop {
                let v = ((u64::from(self.next_u32()) << 32) | u64::from(self.next_u32())) & mask;
                if v <= max {
                    return v;
                }
            }
        }
    }

    /// Legacy `RandomState.shuffle` of a 1-D array (Fisher–Yates from the end).
    pub fn shuffle<T>(&mut self, x: &mut [T]) {
        for i in (1..x.len()).rev() {
            let j = self.random_interval(i as u64) as usize;
            x.swap(i, j);
        }
    }

    /// Legacy `RandomState.permutation(n)`.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut v: Vec<usize> = (0..n).collect();
        self.shuffle(&mut v);
        v
    }
}

/// `KFold(n_splits, shuffle=True, random_state=seed)` over `sorted_ids` (nnU-Net's
/// `generate_crossval_split`). Both lists of a fold are in sorted order, as sklearn returns
/// them via boolean masks.
pub fn generate_crossval_split(sorted_ids: &[String], seed: u32, n_splits: usize) -> Vec<Split> {
    let n = sorted_ids.len();
    let mut idx: Vec<usize> = (0..n).collect();
    Mt19937::new(seed).shuffle(&mut idx);
    let mut out = Vec::with_capacity(n_splits);
    let mut start = 0;
    for f in 0..n_splits {
        let size = n / n_splits + usize::from(f < n % n_splits);
        let mut is_val = vec![false; n];
        for &i in &idx[start..start + size] {
            is_val[i] = true;
        }
        start += size;
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, id) in sorted_ids.iter().enumerate() {
            if is_val[i] {
                val.push(id.clone());
            } else {
                train.push(id.clone());
            }
        }
        out.push(Split { train, val });
    }
    out
}

fn sorted(ids: &[String]) -> Vec<String> {
    let mut v = ids.to_vec();
    v.sort();
    v.dedup();
    v
}

/// Reads a splits file (`[{"train": [...], "val": [...]}, ...]`); a fold whose training
/// and validation cases overlap is an error naming the fold and the cases.
pub fn load_splits(path: &Path) -> Result<Vec<Split>, DataError> {
    let splits = parse_splits(path)?;
    for (k, s) in splits.iter().enumerate() {
        let val: std::collections::BTreeSet<&String> = s.val.iter().collect();
        let both: Vec<&str> = s
            .train
            .iter()
            .filter(|c| val.contains(c))
            .map(String::as_str)
            .collect();
        if !both.is_empty() {
            return Err(DataError::Splits {
                path: path.to_path_buf(),
                message: format!(
                    "fold {k}: {} case(s) are in both train and val: {}",
                    both.len(),
                    both.join(", ")
                ),
            });
        }
    }
    Ok(splits)
}

fn parse_splits(path: &Path) -> Result<Vec<Split>, DataError> {
    let value = plans::io::read_json_file(path).map_err(|e| DataError::Splits {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    serde_json::from_value(value).map_err(|e| DataError::Splits {
        path: path.to_path_buf(),
        message: format!("expected a list of {{\"train\": [...], \"val\": [...]}}: {e}"),
    })
}

/// Loads `{preprocessed_dataset_folder}/splits_final.json`, or creates it (5-fold, nnU-Net's
/// seed) over `case_ids` and writes it atomically.
pub fn load_or_create_splits(
    preprocessed_dataset_folder: &Path,
    case_ids: &[String],
) -> Result<Vec<Split>, DataError> {
    load_or_create_splits_with(preprocessed_dataset_folder, None, case_ids)
}

/// As [`load_or_create_splits`]; if the preprocessed folder has no splits file but
/// `raw_copy` (e.g. `nnUNet_raw/DatasetXXX/splits_final.json`) exists, that one is copied
/// (as nnU-Net does) and used.
pub fn load_or_create_splits_with(
    preprocessed_dataset_folder: &Path,
    raw_copy: Option<&Path>,
    case_ids: &[String],
) -> Result<Vec<Split>, DataError> {
    let path: PathBuf = PreprocessedDir::new(preprocessed_dataset_folder).splits();
    if path.is_file() {
        return load_splits(&path);
    }
    let splits = match raw_copy.filter(|p| p.is_file()) {
        Some(raw) => load_splits(raw)?,
        None => generate_crossval_split(&sorted(case_ids), SPLIT_SEED, NUM_FOLDS),
    };
    plans::io::write_json_atomic(&path, &splits).map_err(|e| DataError::Splits {
        path: path.clone(),
        message: e.to_string(),
    })?;
    Ok(splits)
}

/// nnU-Net's `do_split` for one fold: `all` → all cases for both; a fold inside `splits` →
/// that fold; a fold past the end → a random 80:20 split with `RandomState(12345 + fold)`
/// (training keys in the permutation's order, validation keys sorted). Keys not in
/// `available` are an error naming the case.
pub fn select_fold(splits: &[Split], fold: Fold, available: &[String]) -> Result<Split, DataError> {
    let all = sorted(available);
    let split = match fold {
        Fold::All => Split {
            train: all.clone(),
            val: all.clone(),
        },
        Fold::Index(k) if k < splits.len() => splits[k].clone(),
        Fold::Index(k) => {
            let mut rs = Mt19937::new(SPLIT_SEED.wrapping_add(k as u32));
            let n_tr = (all.len() as f64 * 0.8) as usize;
            let perm = rs.permutation(all.len());
            let tr: Vec<usize> = perm[..n_tr].to_vec();
            let mut is_tr = vec![false; all.len()];
            for &i in &tr {
                is_tr[i] = true;
            }
            Split {
                train: tr.iter().map(|&i| all[i].clone()).collect(),
                val: (0..all.len())
                    .filter(|&i| !is_tr[i])
                    .map(|i| all[i].clone())
                    .collect(),
            }
        }
    };
    for id in split.train.iter().chain(&split.val) {
        if all.binary_search(id).is_err() {
            return Err(DataError::MissingCase {
                case: id.clone(),
                context: format!("fold {fold} of the splits"),
            });
        }
    }
    Ok(split)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("case_{i:03}")).collect()
    }

    fn val_indices(s: &[Split]) -> Vec<Vec<usize>> {
        s.iter()
            .map(|f| {
                f.val
                    .iter()
                    .map(|k| k[5..].parse::<usize>().unwrap())
                    .collect()
            })
            .collect()
    }

    #[test]
    fn mt19937_matches_numpy() {
        // np.random.MT19937()._legacy_seeding(12345); random_raw(3)
        let mut r = Mt19937::new(12345);
        assert_eq!(
            [r.next_u32(), r.next_u32(), r.next_u32()],
            [3992670690, 3823185381, 1358822685]
        );
        // np.random.RandomState(12345).permutation(10)
        assert_eq!(
            Mt19937::new(12345).permutation(10),
            vec![0, 7, 3, 9, 6, 4, 1, 8, 5, 2]
        );
    }

    #[test]
    fn kfold_matches_sklearn() {
        // values from sklearn KFold(5, shuffle=True, random_state=12345)
        let s = generate_crossval_split(&ids(5), 12345, 5);
        assert_eq!(
            val_indices(&s),
            vec![vec![0], vec![4], vec![3], vec![1], vec![2]]
        );
        let s = generate_crossval_split(&ids(7), 12345, 5);
        assert_eq!(
            val_indices(&s),
            vec![vec![3, 6], vec![0, 4], vec![1], vec![5], vec![2]]
        );
        let s = generate_crossval_split(&ids(12), 12345, 5);
        assert_eq!(
            val_indices(&s),
            vec![
                vec![0, 3, 8],
                vec![7, 10, 11],
                vec![6, 9],
                vec![1, 4],
                vec![2, 5]
            ]
        );
        let s = generate_crossval_split(&ids(23), 12345, 5);
        assert_eq!(
            val_indices(&s),
            vec![
                vec![3, 8, 10, 17, 19],
                vec![0, 7, 12, 15, 16],
                vec![6, 11, 14, 18, 20],
                vec![9, 13, 21, 22],
                vec![1, 2, 4, 5]
            ]
        );
        for f in &s {
            assert_eq!(f.train.len() + f.val.len(), 23);
            assert!(f.train.iter().all(|t| !f.val.contains(t)));
        }
    }

    #[test]
    fn random_fold_past_end_matches_numpy() {
        // RandomState(12345 + 5).choice(12, 9, replace=False)
        let s = select_fold(&[], Fold::Index(5), &ids(12)).unwrap();
        let tr: Vec<usize> = s.train.iter().map(|k| k[5..].parse().unwrap()).collect();
        assert_eq!(tr, vec![4, 7, 0, 10, 5, 9, 8, 3, 11]);
        assert_eq!(s.val, vec!["case_001", "case_002", "case_006"]);
        let all = select_fold(&[], Fold::All, &ids(3)).unwrap();
        assert_eq!(all.train, ids(3));
        assert_eq!(all.val, ids(3));
        assert_eq!("all".parse::<Fold>().unwrap(), Fold::All);
        assert!("x".parse::<Fold>().is_err());
    }

    #[test]
    fn create_then_load_and_raw_copy() {
        let dir = tempfile::tempdir().unwrap();
        let s = load_or_create_splits(dir.path(), &ids(7)).unwrap();
        assert_eq!(s.len(), 5);
        let text = std::fs::read_to_string(PreprocessedDir::new(dir.path()).splits()).unwrap();
        assert!(text.contains("\"train\""), "{text}");
        // an edited file is respected
        let custom = vec![Split {
            train: vec!["case_000".into()],
            val: vec!["case_001".into()],
        }];
        plans::io::write_json_atomic(&PreprocessedDir::new(dir.path()).splits(), &custom).unwrap();
        assert_eq!(load_or_create_splits(dir.path(), &ids(7)).unwrap(), custom);
        // unknown case in the file is reported
        let err = select_fold(&custom, Fold::Index(0), &ids(1)).unwrap_err();
        assert!(err.to_string().contains("case_001"), "{err}");
        // raw copy used when the preprocessed folder has none
        let d2 = tempfile::tempdir().unwrap();
        let raw = PreprocessedDir::new(dir.path()).splits();
        let got = load_or_create_splits_with(d2.path(), Some(&raw), &ids(7)).unwrap();
        assert_eq!(got, custom);
        assert!(PreprocessedDir::new(d2.path()).splits().is_file());
        // malformed file
        std::fs::write(PreprocessedDir::new(d2.path()).splits(), b"{\"a\": 1}").unwrap();
        assert!(load_or_create_splits(d2.path(), &ids(7)).is_err());
    }

    /// Issue 19: a split whose train and validation sets overlap is an error naming them.
    #[test]
    fn overlapping_train_and_val_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let bad = vec![
            Split {
                train: vec!["case_000".into()],
                val: vec!["case_001".into()],
            },
            Split {
                train: vec!["case_000".into(), "case_001".into()],
                val: vec!["case_001".into()],
            },
        ];
        plans::io::write_json_atomic(&PreprocessedDir::new(dir.path()).splits(), &bad).unwrap();
        let e = load_or_create_splits(dir.path(), &ids(2))
            .unwrap_err()
            .to_string();
        assert!(e.contains("fold 1") && e.contains("case_001"), "{e}");
    }
}
