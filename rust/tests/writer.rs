//! Writing shard files (files, fsync, cancel, refused names), the thread pool, and the range
//! copy paths (splice, `copy_file_range`, `pwrite`) and their faults.

use super::{global_bytes, simple_source};
use crate::dtype::DType;
use crate::error::Error;
use crate::pool::Progress;
use crate::writer::{write_shards, ShardSpec, WriteOptions};

#[test]
fn writer_files_and_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let a = simple_source(dir.path(), "a", &[300, 7], &[0, 100, 300]);
    let b = simple_source(dir.path(), "b", &[5], &[0, 5]);
    let out = dir.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let specs = vec![
        ShardSpec {
            file_name: "model-00001-of-00002.safetensors".into(),
            tensors: vec![(a.clone(), DType::BF16), (b.clone(), DType::F32)],
        },
        ShardSpec {
            file_name: "model-00002-of-00002.safetensors".into(),
            tensors: vec![],
        },
    ];
    let prog = Progress::new();
    let n = write_shards(
        &out,
        &specs,
        &WriteOptions {
            num_threads: Some(3),
            fsync: true,
        },
        &prog,
    )
    .unwrap();
    assert_eq!(n, 300 * 7 * 2 + 5 * 4);
    assert_eq!(prog.get(), (n, n));
    let mut names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(
        names,
        [
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors"
        ]
    );
    let bytes = std::fs::read(out.join("model-00001-of-00002.safetensors")).unwrap();
    let hlen = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + hlen]).unwrap();
    assert!(header.starts_with(
        r#"{"__metadata__":{"format":"pt"},"b":{"dtype":"F32","shape":[5],"data_offsets":[0,20]},"a":{"dtype":"BF16""#
    ));
    let data = &bytes[8 + hlen..];
    assert_eq!(&data[20..], &global_bytes(&[300, 7])[..]);
    let empty = std::fs::read(out.join("model-00002-of-00002.safetensors")).unwrap();
    assert_eq!(&empty[8..], br#"{"__metadata__":{"format":"pt"}}"#);

    // cancelled: nothing is left behind
    let out2 = dir.path().join("out2");
    std::fs::create_dir(&out2).unwrap();
    let prog = Progress::new();
    prog.cancel();
    let e = write_shards(&out2, &specs, &WriteOptions::default(), &prog).unwrap_err();
    assert!(matches!(e, Error::Cancelled));
    assert_eq!(std::fs::read_dir(&out2).unwrap().count(), 0);

    // bad file names and duplicate files are refused
    let bad = vec![ShardSpec {
        file_name: "../x.safetensors".into(),
        tensors: vec![],
    }];
    assert!(write_shards(&out2, &bad, &WriteOptions::default(), &Progress::new()).is_err());
    let dup = vec![specs[1].clone(), specs[1].clone()];
    assert!(write_shards(&out2, &dup, &WriteOptions::default(), &Progress::new()).is_err());
    // missing directory is an Io error
    let e = write_shards(
        &dir.path().join("nope"),
        &specs[1..],
        &WriteOptions::default(),
        &Progress::new(),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Io { .. }));
}

#[test]
fn pool_sizing() {
    assert_eq!(crate::pool::resolve_threads(Some(3)), 3);
    let p = crate::pool::pool(Some(2)).unwrap();
    assert_eq!(p.current_num_threads(), 2);
    let q = crate::pool::pool(Some(2)).unwrap();
    assert!(std::sync::Arc::ptr_eq(&p, &q));
    assert_eq!(crate::pool::pool(Some(1)).unwrap().current_num_threads(), 1);
}

// ---------------------------------------------------------------- range copies

/// Every way of copying a range (splice through a pipe, `copy_file_range`, `pwrite` from the
/// mapping) gives the same bytes, at unaligned offsets and over several pipe fills; a source
/// that ends early is a format error, not a short file.
#[test]
fn range_copy_modes_agree() {
    use crate::copy::{copy_range, VIA_CFR, VIA_PWRITE, VIA_SPLICE};
    use crate::mmap::SourceFile;
    use std::sync::atomic::AtomicU8;
    let dir = tempfile::tempdir().unwrap();
    let src_path = dir.path().join("src.bin");
    let n: usize = (3 << 20) + 12_345;
    let data: Vec<u8> = (0..n as u64 + 777)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&src_path, &data).unwrap();
    let src = SourceFile::open(&src_path).unwrap();
    for mode in [VIA_SPLICE, VIA_CFR, VIA_PWRITE] {
        let out = dir.path().join(format!("out{mode}.bin"));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&out)
            .unwrap();
        let m = AtomicU8::new(mode);
        copy_range(&src, 777, &f, &out, 13_704, n as u64, &m).unwrap();
        let got = std::fs::read(&out).unwrap();
        assert_eq!(got.len(), 13_704 + n);
        assert!(got[..13_704].iter().all(|&b| b == 0));
        assert!(got[13_704..] == data[777..], "mode {mode}");
    }
    for mode in [VIA_SPLICE, VIA_CFR] {
        let out = dir.path().join("short.bin");
        let f = std::fs::File::create(&out).unwrap();
        let m = AtomicU8::new(mode);
        let e = copy_range(&src, 777, &f, &out, 0, n as u64 + 4096, &m).unwrap_err();
        assert!(e.to_string().contains("truncated"), "{e}");
    }
}
