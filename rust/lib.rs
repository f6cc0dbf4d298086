//! fastckpt core: sharded checkpoints → Hugging Face safetensors, at copy speed, bit-exact.
//!
//! The core knows byte ranges, dtypes, shapes and safetensors; it never interprets pickle (it
//! only bounds-checks its opcodes before Python loads it, [`pickle_scan`]). Python
//! (package `fastckpt`) describes every tensor as boxes stored in files ([`plan::Chunk`]); the
//! core validates them ([`mmap`]), plans output files and copy operations ([`plan`]), copies with
//! fused casts ([`reshard`]) and writes the files in parallel ([`writer`], [`pool`]), moving
//! contiguous ranges with the kernel (`splice`, `copy_file_range`, `pwrite`: `copy.rs`). Whole
//! tensors are read into Python buffers or digested in [`mod@gather`].
//!
//! The Python extension module `fastckpt._core` (`py.rs`) is compiled only with the `python`
//! feature, so `cargo test` and the benches never link Python.

#![warn(missing_docs)]

mod copy;
pub mod coverage;
pub mod dtype;
pub mod error;
pub mod gather;
pub mod mmap;
pub mod pickle_scan;
pub mod plan;
pub mod pool;
pub mod reshard;
pub mod writer;

#[cfg(feature = "python")]
mod py;

pub use dtype::DType;
pub use error::{Error, Result};
pub use gather::{digest, gather};
pub use plan::{plan_shards, Chunk, Source};
pub use writer::{write_shards, ShardSpec, WriteOptions};

#[cfg(test)]
mod tests;
