//! The shard planner and the safetensors header bytes.

use crate::dtype::DType;
use crate::plan::{layout_file, plan_shards, TensorMeta};

#[test]
fn plan_shards_cases() {
    assert!(plan_shards(&[], 10).is_empty());
    // exact limit fits in one shard
    assert_eq!(plan_shards(&[4, 6], 10), vec![vec![0, 1]]);
    assert_eq!(plan_shards(&[4, 7], 10), vec![vec![0], vec![1]]);
    // oversized tensor gets its own shard, before the one being filled
    assert_eq!(
        plan_shards(&[3, 20, 4, 5], 10),
        vec![vec![1], vec![0, 2], vec![3]]
    );
    assert_eq!(plan_shards(&[20], 10), vec![vec![0]]);
    // exactly the limit is not oversized
    assert_eq!(plan_shards(&[10, 10, 0], 10), vec![vec![0], vec![1, 2]]);
    assert_eq!(plan_shards(&[0, 0], 0), vec![vec![0, 1]]);
    // empty tensors share one storage key in the hub's splitter: later ones join the first's shard
    assert_eq!(
        plan_shards(&[4, 4, 0, 4, 0], 4),
        vec![vec![0], vec![1, 2, 4], vec![3]]
    );
    assert_eq!(plan_shards(&[0, 8, 0], 4), vec![vec![1], vec![0, 2]]);
}

fn meta<'a>(name: &'a str, dtype: DType, shape: &'a [u64]) -> TensorMeta<'a> {
    TensorMeta { name, dtype, shape }
}

#[test]
fn header_bytes_match_safetensors() {
    let lay = layout_file(&[meta("a", DType::F32, &[2, 3])]).unwrap();
    let json =
        br#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]}}"#;
    let padded = json.len().div_ceil(8) * 8;
    let mut want = (padded as u64).to_le_bytes().to_vec();
    want.extend_from_slice(json);
    want.resize(8 + padded, b' ');
    assert_eq!(lay.header, want);
    assert_eq!(lay.file_len, 8 + padded as u64 + 24);
    assert_eq!(lay.order, vec![(0, 0, 24)]);
}

#[test]
fn header_order_rank_then_name() {
    let ts = [
        meta("b", DType::BF16, &[2]),
        meta("a", DType::BF16, &[1]),
        meta("B", DType::BF16, &[1]),
        meta("z", DType::Bool, &[3]),
        meta("m", DType::I64, &[]),
        meta("layers.10", DType::F32, &[0, 4]),
        meta("layers.2", DType::F32, &[1]),
        meta("é", DType::U8, &[1]),
    ];
    let lay = layout_file(&ts).unwrap();
    let names: Vec<&str> = lay.order.iter().map(|o| ts[o.0].name).collect();
    assert_eq!(
        names,
        ["m", "layers.10", "layers.2", "B", "a", "b", "é", "z"]
    );
    let text = std::str::from_utf8(&lay.header[8..]).unwrap();
    assert!(text.contains(r#""m":{"dtype":"I64","shape":[],"data_offsets":[0,8]}"#));
    assert!(text.contains(r#""layers.10":{"dtype":"F32","shape":[0,4],"data_offsets":[8,8]}"#));
    assert!(text.contains("\"é\""));
    assert_eq!(lay.header.len() % 8, 0);
    assert!(layout_file(&[meta("x", DType::F32, &[1]), meta("x", DType::F32, &[1])]).is_err());
}
