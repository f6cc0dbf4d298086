//! safetensors dtypes: names, item sizes, sort rank, and bit-exact casts among floats.
//!
//! The rank is the declaration order of safetensors' Rust `Dtype` enum; safetensors writes the
//! tensors of a file by rank descending, then name, which is what makes files byte-identical.
//!
//! Casts exist only among `F64`, `F32`, `F16` and `BF16` and reproduce torch's results:
//! - `f32 → bf16` rounds to nearest even; every NaN becomes `0x7FC0` (c10's scalar
//!   `round_to_nearest_even`; torch's AVX kernels write `0xFFFF` instead, so NaN bits differ
//!   between torch's own code paths);
//! - `f32 → f16` is IEEE round to nearest even with NaN payloads kept and quieted (the `half` crate,
//!   identical to F16C `vcvtps2ph`, which torch uses);
//! - `f64 → bf16/f16` goes through `f32` first (double rounding), as c10's constructors do;
//! - widening casts are exact.

use crate::error::{Error, Result};
use half::{bf16, f16};

/// A safetensors dtype, declared in safetensors' rank order (lowest first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DType {
    /// Boolean, one byte.
    Bool,
    /// 4-bit float (two per byte in safetensors; not supported here as an item type).
    F4,
    /// 6-bit float E2M3 (not supported here as an item type).
    F6E2M3,
    /// 6-bit float E3M2 (not supported here as an item type).
    F6E3M2,
    /// Unsigned 8-bit integer.
    U8,
    /// Signed 8-bit integer.
    I8,
    /// 8-bit float E5M2.
    F8E5M2,
    /// 8-bit float E4M3 (fn).
    F8E4M3,
    /// 8-bit float E8M0 (fnu).
    F8E8M0,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex of two f32.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

const ALL: [DType; 20] = [
    DType::Bool,
    DType::F4,
    DType::F6E2M3,
    DType::F6E3M2,
    DType::U8,
    DType::I8,
    DType::F8E5M2,
    DType::F8E4M3,
    DType::F8E8M0,
    DType::I16,
    DType::U16,
    DType::F16,
    DType::BF16,
    DType::I32,
    DType::U32,
    DType::F32,
    DType::C64,
    DType::F64,
    DType::I64,
    DType::U64,
];

impl DType {
    /// Parses a safetensors dtype name (`"BF16"`, `"F32"`, ...). Sub-byte types are refused,
    /// since a byte-addressed copy cannot place them.
    pub fn parse(name: &str) -> Result<DType> {
        let dt = ALL
            .iter()
            .copied()
            .find(|d| d.name() == name)
            .ok_or_else(|| Error::UnknownDtype(name.to_owned()))?;
        if dt.bits() < 8 {
            return Err(Error::Plan(format!(
                "dtype '{name}' is a sub-byte type, which fastckpt does not support"
            )));
        }
        Ok(dt)
    }

    /// The safetensors name.
    pub fn name(self) -> &'static str {
        match self {
            DType::Bool => "BOOL",
            DType::F4 => "F4",
            DType::F6E2M3 => "F6_E2M3",
            DType::F6E3M2 => "F6_E3M2",
            DType::U8 => "U8",
            DType::I8 => "I8",
            DType::F8E5M2 => "F8_E5M2",
            DType::F8E4M3 => "F8_E4M3",
            DType::F8E8M0 => "F8_E8M0",
            DType::I16 => "I16",
            DType::U16 => "U16",
            DType::F16 => "F16",
            DType::BF16 => "BF16",
            DType::I32 => "I32",
            DType::U32 => "U32",
            DType::F32 => "F32",
            DType::C64 => "C64",
            DType::F64 => "F64",
            DType::I64 => "I64",
            DType::U64 => "U64",
        }
    }

    /// Size of one element in bits.
    pub fn bits(self) -> usize {
        match self {
            DType::F4 => 4,
            DType::F6E2M3 | DType::F6E3M2 => 6,
            DType::Bool | DType::U8 | DType::I8 => 8,
            DType::F8E5M2 | DType::F8E4M3 | DType::F8E8M0 => 8,
            DType::I16 | DType::U16 | DType::F16 | DType::BF16 => 16,
            DType::I32 | DType::U32 | DType::F32 => 32,
            DType::C64 | DType::F64 | DType::I64 | DType::U64 => 64,
        }
    }

    /// Size of one element in bytes (byte-sized dtypes only; see [`DType::parse`]).
    pub fn size(self) -> usize {
        self.bits() / 8
    }

    /// safetensors sort rank (declaration order of its `Dtype` enum, lowest first).
    pub fn rank(self) -> u8 {
        self as u8
    }

    /// Whether this dtype takes part in casts (`F64`, `F32`, `F16`, `BF16`).
    pub fn is_castable_float(self) -> bool {
        matches!(self, DType::F64 | DType::F32 | DType::F16 | DType::BF16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Converts an `f32` to bfloat16 bits, round to nearest even, NaN → `0x7FC0` (c10).
#[inline(always)]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    // branch-free select, so that the loop vectorises
    if b & 0x7FFF_FFFF > 0x7F80_0000 {
        0x7FC0
    } else {
        rounded
    }
}

/// Converts an `f32` to IEEE half bits, round to nearest even (as torch / F16C).
#[inline(always)]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// Widens bfloat16 bits to `f32` (exact).
#[inline(always)]
pub fn bf16_bits_to_f32(b: u16) -> f32 {
    bf16::from_bits(b).to_f32()
}

/// Widens IEEE half bits to `f32` (exact).
#[inline(always)]
pub fn f16_bits_to_f32(b: u16) -> f32 {
    f16::from_bits(b).to_f32()
}

/// A cast of contiguous elements: `src.len() / src_size == dst.len() / dst_size` elements.
pub type CastFn = fn(&[u8], &mut [u8]);

macro_rules! cast_fn {
    ($name:ident, $n_in:literal, $n_out:literal, |$b:ident| $conv:expr) => {
        fn $name(src: &[u8], dst: &mut [u8]) {
            for (s, d) in src.chunks_exact($n_in).zip(dst.chunks_exact_mut($n_out)) {
                let $b: [u8; $n_in] = s.try_into().expect("chunk size");
                d.copy_from_slice(&$conv.to_le_bytes());
            }
        }
    };
}

cast_fn!(f32_to_bf16, 4, 2, |b| f32_to_bf16_bits(f32::from_le_bytes(
    b
)));
cast_fn!(f32_to_f16, 4, 2, |b| f32_to_f16_bits(f32::from_le_bytes(b)));
cast_fn!(f32_to_f64, 4, 8, |b| f32::from_le_bytes(b) as f64);
cast_fn!(f64_to_f32, 8, 4, |b| f64::from_le_bytes(b) as f32);
cast_fn!(f64_to_bf16, 8, 2, |b| f32_to_bf16_bits(
    f64::from_le_bytes(b) as f32
));
cast_fn!(f64_to_f16, 8, 2, |b| f32_to_f16_bits(
    f64::from_le_bytes(b) as f32
));
cast_fn!(bf16_to_f32, 2, 4, |b| bf16_bits_to_f32(u16::from_le_bytes(
    b
)));
cast_fn!(
    bf16_to_f64,
    2,
    8,
    |b| bf16_bits_to_f32(u16::from_le_bytes(b)) as f64
);
cast_fn!(bf16_to_f16, 2, 2, |b| f32_to_f16_bits(bf16_bits_to_f32(
    u16::from_le_bytes(b)
)));
cast_fn!(f16_to_f32, 2, 4, |b| f16_bits_to_f32(u16::from_le_bytes(b)));
cast_fn!(f16_to_f64, 2, 8, |b| f16::from_bits(u16::from_le_bytes(b))
    .to_f64());
cast_fn!(f16_to_bf16, 2, 2, |b| f32_to_bf16_bits(f16_bits_to_f32(
    u16::from_le_bytes(b)
)));

/// The kernel casting `from` to `to`; `None` when `from == to` (plain copy).
///
/// Fails for casts involving a dtype other than `F64`, `F32`, `F16`, `BF16`.
pub fn cast_fn(from: DType, to: DType) -> Result<Option<CastFn>> {
    if from == to {
        return Ok(None);
    }
    use DType::*;
    let f: CastFn = match (from, to) {
        (F32, BF16) => f32_to_bf16,
        (F32, F16) => f32_to_f16,
        (F32, F64) => f32_to_f64,
        (F64, F32) => f64_to_f32,
        (F64, BF16) => f64_to_bf16,
        (F64, F16) => f64_to_f16,
        (BF16, F32) => bf16_to_f32,
        (BF16, F64) => bf16_to_f64,
        (BF16, F16) => bf16_to_f16,
        (F16, F32) => f16_to_f32,
        (F16, F64) => f16_to_f64,
        (F16, BF16) => f16_to_bf16,
        _ => {
            return Err(Error::Plan(format!(
                "cannot cast {from} to {to}: casts exist only among F64, F32, F16 and BF16"
            )))
        }
    };
    Ok(Some(f))
}
