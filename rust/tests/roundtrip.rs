//! The property test: a tensor split into random boxes (random layouts, two files) gathers,
//! digests and writes back (cast or not) to its original bytes.

use super::{gather_vec, global_bytes, simple_source, store_box};
use crate::dtype::DType;
use crate::gather::digest;
use crate::mmap::FileCache;
use crate::plan::{prepare_source, Source};
use crate::pool::Progress;
use crate::reshard::fill_window;
use crate::writer::{write_shards, ShardSpec, WriteOptions};
use proptest::prelude::*;
use std::path::PathBuf;

/// A random tensor shape (0–3 dims), a grid split, and per-chunk layout choices.
/// shape, cut points per dim, per-chunk (dim order, padding), cast or not.
type Case = (Vec<u64>, Vec<Vec<u64>>, Vec<(Vec<usize>, u64)>, bool);

fn case() -> impl Strategy<Value = Case> {
    prop::collection::vec(0u64..7, 0..4)
        .prop_flat_map(|shape| {
            let cuts: Vec<_> = shape
                .iter()
                .map(|&n| prop::collection::vec(0..=n, 0..3))
                .collect();
            let nd = shape.len();
            let layouts = prop::collection::vec(
                (
                    Just((0..nd).collect::<Vec<usize>>()).prop_shuffle(),
                    0u64..3,
                ),
                64,
            );
            (Just(shape), cuts, layouts, any::<bool>())
        })
        .prop_map(|(shape, cuts, layouts, cast)| {
            let cuts = shape
                .iter()
                .zip(cuts)
                .map(|(&n, mut c)| {
                    c.push(0);
                    c.push(n);
                    c.sort_unstable();
                    c.dedup();
                    c
                })
                .collect();
            (shape, cuts, layouts, cast)
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn split_and_write_back_is_identity((shape, cuts, layouts, cast) in case()) {
        let dir = tempfile::tempdir().unwrap();
        let paths: Vec<PathBuf> = (0..2).map(|i| dir.path().join(format!("__{i}_0.distcp"))).collect();
        let mut files: Vec<_> = paths.iter().map(|p| std::fs::File::create(p).unwrap()).collect();
        // all boxes of the grid
        let mut boxes = vec![(vec![], vec![])];
        for c in &cuts {
            let mut next = Vec::new();
            for (o, s) in &boxes {
                for w in c.windows(2) {
                    let (mut o2, mut s2): (Vec<u64>, Vec<u64>) = (o.clone(), s.clone());
                    o2.push(w[0]);
                    s2.push(w[1] - w[0]);
                    next.push((o2, s2));
                }
            }
            boxes = next;
        }
        let mut chunks = Vec::new();
        for (i, (o, s)) in boxes.iter().enumerate() {
            let (perm, pad) = &layouts[i % layouts.len()];
            let fi = i % 2;
            chunks.push(store_box(&mut files[fi], &paths[fi], &shape, o, s, perm, *pad));
        }
        chunks.reverse();
        let src = Source { name: "w".into(), dtype: DType::BF16, shape: shape.clone(), chunks };
        let want = global_bytes(&shape);
        prop_assert_eq!(&gather_vec(&src).unwrap(), &want);
        // windows of every small size: runs cut at arbitrary element boundaries
        let plan = prepare_source(&src, DType::BF16, &mut FileCache::new()).unwrap();
        let numel = want.len() / 2;
        for per in [1usize, 2, 3, 5, 7, 16] {
            let mut got = vec![0u8; want.len()];
            let mut e0 = 0;
            while e0 < numel {
                let e1 = (e0 + per).min(numel);
                fill_window(&plan, e0 as u64, &mut got[e0 * 2..e1 * 2]).unwrap();
                e0 = e1;
            }
            prop_assert_eq!(&got, &want);
        }
        prop_assert_eq!(digest(&src).unwrap(), xxhash_rust::xxh3::xxh3_128(&want));

        // write it (optionally cast to F32) next to a contiguous copy, compare the data region
        let out_dtype = if cast { DType::F32 } else { DType::BF16 };
        let contiguous = simple_source(dir.path(), "c", &shape, &[0, shape.first().copied().unwrap_or(1)]);
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let spec = ShardSpec { file_name: "m.safetensors".into(),
            tensors: vec![(src.clone(), out_dtype), (contiguous, DType::BF16)] };
        let n = write_shards(&out, &[spec], &WriteOptions { num_threads: Some(2), fsync: false },
            &Progress::new()).unwrap();
        let bytes = std::fs::read(out.join("m.safetensors")).unwrap();
        let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let data = &bytes[8 + hlen..];
        prop_assert_eq!(n as usize, data.len());
        let want_w: Vec<u8> = if cast {
            want.chunks(2).flat_map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32().to_le_bytes()).collect()
        } else { want.clone() };
        // F32 sorts before BF16; with equal dtypes 'c' < 'w'
        if cast {
            prop_assert_eq!(&data[..want_w.len()], &want_w[..]);
            prop_assert_eq!(&data[want_w.len()..], &want[..]);
        } else {
            prop_assert_eq!(&data[..want.len()], &want[..]);
            prop_assert_eq!(&data[want.len()..], &want[..]);
        }
    }
}
