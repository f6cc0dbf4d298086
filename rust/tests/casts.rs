//! Dtype casts, bit-exact against torch, and the casts refused.

use crate::dtype::{cast_fn, f32_to_bf16_bits, DType};
use crate::error::Error;

fn cast1(from: DType, to: DType, src: &[u8]) -> Vec<u8> {
    let f = cast_fn(from, to).unwrap().unwrap();
    let mut out = vec![0u8; src.len() / from.size() * to.size()];
    f(src, &mut out);
    out
}

#[test]
fn casts_bit_exact() {
    // f32 -> bf16: round to nearest even, NaN canonical
    assert_eq!(f32_to_bf16_bits(1.0), 0x3F80);
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8000)), 0x3F80); // tie to even (down)
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F81_8000)), 0x3F82); // tie to even (up)
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x3F80_8001)), 0x3F81);
    assert_eq!(f32_to_bf16_bits(f32::INFINITY), 0x7F80);
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0x7F7F_FFFF)), 0x7F80); // overflow to inf
    assert_eq!(f32_to_bf16_bits(f32::from_bits(0xFFA0_0001)), 0x7FC0);
    assert_eq!(f32_to_bf16_bits(-0.0), 0x8000);
    // f32 -> f16 (torch / F16C): overflow, NaN payload kept and quieted
    let h = |x: u32| cast1(DType::F32, DType::F16, &x.to_le_bytes());
    assert_eq!(h(65520f32.to_bits()), 0x7C00u16.to_le_bytes());
    assert_eq!(h(65519f32.to_bits()), 0x7BFFu16.to_le_bytes());
    assert_eq!(h(0x7FA0_0001), 0x7F00u16.to_le_bytes());
    assert_eq!(h(0xFFC0_0000), 0xFE00u16.to_le_bytes());
    assert_eq!(h(1e-8f32.to_bits()), 0u16.to_le_bytes());
    // f64 -> bf16 / f16 goes through f32 (double rounding), as torch does
    let x = 1.0f64 + 2f64.powi(-8) + 2f64.powi(-40);
    assert_eq!(
        cast1(DType::F64, DType::BF16, &x.to_le_bytes()),
        0x3F80u16.to_le_bytes()
    );
    let y = 1.0f64 + 2f64.powi(-11) + 2f64.powi(-40);
    assert_eq!(
        cast1(DType::F64, DType::F16, &y.to_le_bytes()),
        0x3C00u16.to_le_bytes()
    );
    // widening is exact
    assert_eq!(
        cast1(DType::BF16, DType::F32, &0x4780u16.to_le_bytes()),
        65536f32.to_le_bytes()
    );
    assert_eq!(
        cast1(DType::F16, DType::F64, &0x7BFFu16.to_le_bytes()),
        65504f64.to_le_bytes()
    );
    assert_eq!(
        cast1(DType::BF16, DType::F16, &0x4780u16.to_le_bytes()),
        0x7C00u16.to_le_bytes()
    );
    // refused casts
    assert!(cast_fn(DType::I64, DType::F32).is_err());
    assert!(cast_fn(DType::F32, DType::Bool).is_err());
    assert!(cast_fn(DType::F8E4M3, DType::BF16).is_err());
    assert!(cast_fn(DType::I64, DType::I64).unwrap().is_none());
    assert!(matches!(DType::parse("F7"), Err(Error::UnknownDtype(_))));
    assert!(DType::parse("F4").is_err());
    assert_eq!(DType::parse("F8_E4M3").unwrap().size(), 1);
}
