//! Criterion benchmarks of the copy kernels (GB/s of output bytes), in memory through a page-cache
//! backed source file: `Shard(0)` contiguous concat, `Shard(1)` with 2 KiB and 8 KiB row runs, and
//! a fused f32 → bf16 cast.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fastckpt::mmap::FileCache;
use fastckpt::plan::{prepare_source, Chunk, Source};
use fastckpt::reshard::fill_window;
use fastckpt::DType;
use std::io::Write;
use std::path::Path;

const ROWS: u64 = 2048;

/// A `[ROWS, cols]` tensor of `dtype` split in `parts` along `dim`, stored contiguously per part.
fn source(dir: &Path, dtype: DType, cols: u64, dim: usize, parts: u64) -> Source {
    let path = dir.join(format!("{}-{cols}-{dim}-{parts}.bin", dtype.name()));
    let isz = dtype.size() as u64;
    let mut f = std::fs::File::create(&path).unwrap();
    let total = ROWS * cols * isz;
    let bytes: Vec<u8> = (0..total).map(|i| (i % 251) as u8).collect();
    f.write_all(&bytes).unwrap();
    let mut chunks = Vec::new();
    let ext = [ROWS, cols][dim] / parts;
    for p in 0..parts {
        let mut sizes = vec![ROWS, cols];
        let mut offsets = vec![0, 0];
        sizes[dim] = ext;
        offsets[dim] = p * ext;
        let n = sizes[0] * sizes[1];
        chunks.push(Chunk {
            path: path.clone(),
            data_offset: p * n * isz,
            data_len: n * isz,
            storage_offset: 0,
            strides: vec![sizes[1] as i64, 1],
            offsets,
            sizes,
        });
    }
    Source {
        name: "w".into(),
        dtype,
        shape: vec![ROWS, cols],
        chunks,
    }
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "shard0_contiguous",
            source(dir.path(), DType::BF16, 8192, 0, 2),
            DType::BF16,
        ),
        // 8192 bf16 cols over 8 parts: 1024 elements = 2 KiB runs
        (
            "shard1_2KiB_runs",
            source(dir.path(), DType::BF16, 8192, 1, 8),
            DType::BF16,
        ),
        // 8192 bf16 cols over 2 parts: 4096 elements = 8 KiB runs
        (
            "shard1_8KiB_runs",
            source(dir.path(), DType::BF16, 8192, 1, 2),
            DType::BF16,
        ),
        (
            "cast_f32_to_bf16",
            source(dir.path(), DType::F32, 4096, 0, 2),
            DType::BF16,
        ),
    ];
    let mut g = c.benchmark_group("reshard");
    for (name, src, out) in &cases {
        let mut cache = FileCache::new();
        let plan = prepare_source(src, *out, &mut cache).unwrap();
        let bytes = plan.out_bytes() as usize;
        let window = 16 << 20;
        let per = window / out.size();
        let mut buf = vec![0u8; window];
        g.throughput(Throughput::Bytes(bytes as u64));
        g.bench_function(*name, |b| {
            b.iter(|| {
                let mut e0 = 0usize;
                while e0 * out.size() < bytes {
                    let n = per.min(bytes / out.size() - e0);
                    fill_window(&plan, e0 as u64, &mut buf[..n * out.size()]).unwrap();
                    e0 += n;
                }
                std::hint::black_box(&buf);
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
