//! Hostile input: the pickle scan and the planner never panic, whatever the bytes.

use crate::dtype::DType;
use crate::mmap::FileCache;
use crate::pickle_scan::scan_pickle;
use crate::plan::{plan_shards, prepare_source, Chunk, Source};
use proptest::prelude::*;
use std::io::Write;

fn refused(data: &[u8], needle: &str) {
    let err = scan_pickle(data, 100).expect_err("refused");
    assert!(err.contains(needle), "{err}");
}

#[test]
fn scan_accepts_plain_pickles() {
    // protocol 2: {'a': (1, [2.0]), 'b': None}, with memo puts and gets
    let data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01]q\x02G@\x00\x00\x00\x00\x00\x00\x00a\x86q\x03X\x01\x00\x00\x00bq\x04Nu.";
    scan_pickle(data, 100).expect("plain pickle");
    // protocol 0 text opcodes, a global, REDUCE and BUILD onto the result
    scan_pickle(b"cbuiltins\nset\n((lp0\ntRp1\n(dp2\nb.", 100).expect("text pickle");
}

#[test]
fn scan_refuses_bombs_and_deep_nesting() {
    refused(b"\x80\x02Nr\x00\xe1\xf5\x05.", "memo index");
    refused(
        b"\x80\x04\x8e\x00\x00\x00\x60\x00\x00\x00\x00abc.",
        "past the end",
    );
    let mut deep = b"\x80\x02}N".to_vec();
    deep.extend(std::iter::repeat_n(b'\x85', 1_000_000));
    deep.extend(b"Ns.");
    refused(&deep, "nested deeper than 100");
    refused(b"\x80\x02ctorch\nFloatStorage\n}b.", "BUILD onto a global");
    refused(b"\x80\x02\x82\x01.", "unsupported opcode");
    refused(b"\x80\x02N", "no STOP");
    refused(b"\x80\x02a.", "stack underflow");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn scan_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
        let _ = scan_pickle(&data, 8);
    }

    #[test]
    fn scan_never_panics_on_mutated_pickles(
        flips in proptest::collection::vec((0usize..96, any::<u8>()), 0..6),
        cut in 0usize..96,
    ) {
        let mut data = b"\x80\x02}q\x00(X\x01\x00\x00\x00aq\x01K\x01]q\x02G@\x00\x00\x00\x00\x00\x00\x00a\x86q\x03X\x01\x00\x00\x00bq\x04Nu.".to_vec();
        for (at, b) in flips {
            let k = at % data.len();
            data[k] = b;
        }
        data.truncate(cut.max(1));
        let _ = scan_pickle(&data, 8);
    }

    #[test]
    fn plan_shards_any_sizes(sizes in proptest::collection::vec(any::<u64>(), 0..40), limit in any::<u64>()) {
        let plan = plan_shards(&sizes, limit.max(1));
        let mut seen: Vec<usize> = plan.iter().flatten().copied().collect();
        seen.sort_unstable();
        prop_assert_eq!(seen, (0..sizes.len()).collect::<Vec<_>>());
    }

    #[test]
    fn planner_refuses_or_accepts_any_geometry(
        shape in proptest::collection::vec(0u64..6, 0..3),
        chunks in proptest::collection::vec(
            (0u64..80, 0u64..80, 0u64..8,
             proptest::collection::vec(-3i64..20, 0..3),
             proptest::collection::vec(0u64..6, 0..3),
             proptest::collection::vec(0u64..6, 0..3)),
            0..4),
    ) {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.write_all(&[7u8; 64]).expect("write");
        let src = Source {
            name: "t".into(),
            dtype: DType::F32,
            shape,
            chunks: chunks
                .into_iter()
                .map(|(off, len, so, strides, offsets, sizes)| Chunk {
                    path: f.path().to_path_buf(),
                    data_offset: off,
                    data_len: len,
                    storage_offset: so,
                    strides,
                    offsets,
                    sizes,
                })
                .collect(),
        };
        let mut cache = FileCache::default();
        let _ = prepare_source(&src, DType::BF16, &mut cache);
    }
}
