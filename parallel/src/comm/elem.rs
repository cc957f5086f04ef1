//! Element types the collectives move and reduce, and the reduction kernels of the CPU
//! backend. Kernels work on raw bytes of tensor memory (aligned by libtorch) and on the
//! backends' scratch buffers (aligned to 8); half types are widened to f32 in small blocks,
//! combined, and rounded back to nearest-even — one rounding per hop, like NCCL.

use half::slice::{HalfBitsSliceExt, HalfFloatSliceExt};
use tch::Kind;

use super::ReduceOp;

/// An element type the collectives know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Elem {
    F32,
    F64,
    Bf16,
    F16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

const ALL: [Elem; 10] = [
    Elem::F32,
    Elem::F64,
    Elem::Bf16,
    Elem::F16,
    Elem::I64,
    Elem::I32,
    Elem::I16,
    Elem::I8,
    Elem::U8,
    Elem::Bool,
];

impl Elem {
    pub(crate) fn from_kind(kind: Kind) -> Option<Elem> {
        ALL.into_iter().find(|e| e.kind() == kind)
    }

    pub(crate) fn kind(self) -> Kind {
        match self {
            Elem::F32 => Kind::Float,
            Elem::F64 => Kind::Double,
            Elem::Bf16 => Kind::BFloat16,
            Elem::F16 => Kind::Half,
            Elem::I64 => Kind::Int64,
            Elem::I32 => Kind::Int,
            Elem::I16 => Kind::Int16,
            Elem::I8 => Kind::Int8,
            Elem::U8 => Kind::Uint8,
            Elem::Bool => Kind::Bool,
        }
    }

    pub(crate) fn size(self) -> usize {
        match self {
            Elem::F64 | Elem::I64 => 8,
            Elem::F32 | Elem::I32 => 4,
            Elem::Bf16 | Elem::F16 | Elem::I16 => 2,
            Elem::I8 | Elem::U8 | Elem::Bool => 1,
        }
    }

    /// Wire code (headers).
    pub(crate) fn code(self) -> u8 {
        ALL.iter().position(|&e| e == self).unwrap_or(0) as u8 + 1
    }

    pub(crate) fn from_code(code: u8) -> Option<Elem> {
        ALL.get(usize::from(code).checked_sub(1)?).copied()
    }

    /// Whether reductions are defined (everything but bool).
    pub(crate) fn reducible(self) -> bool {
        self != Elem::Bool
    }
}

/// Plain numeric types that any bit pattern is valid for.
trait Plain: Copy {}
impl Plain for f32 {}
impl Plain for f64 {}
impl Plain for u16 {}
impl Plain for i64 {}
impl Plain for i32 {}
impl Plain for i16 {}
impl Plain for i8 {}
impl Plain for u8 {}

fn cast<T: Plain>(b: &[u8]) -> &[T] {
    let size = std::mem::size_of::<T>();
    assert!(
        (b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
            && b.len().is_multiple_of(size),
        "misaligned buffer for the element type (internal error)"
    );
    // SAFETY: alignment and length checked above; T is plain data valid for any bits.
    unsafe { std::slice::from_raw_parts(b.as_ptr().cast::<T>(), b.len() / size) }
}

fn cast_mut<T: Plain>(b: &mut [u8]) -> &mut [T] {
    let size = std::mem::size_of::<T>();
    assert!(
        (b.as_ptr() as usize).is_multiple_of(std::mem::align_of::<T>())
            && b.len().is_multiple_of(size),
        "misaligned buffer for the element type (internal error)"
    );
    // SAFETY: as in `cast`, and `b` is borrowed mutably for the slice's lifetime.
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr().cast::<T>(), b.len() / size) }
}

macro_rules! int_kernel {
    ($t:ty, $d:expr, $s:expr, $op:expr) => {{
        let d = cast_mut::<$t>($d);
        let s = cast::<$t>($s);
        match $op {
            ReduceOp::Sum | ReduceOp::Avg => d
                .iter_mut()
                .zip(s)
                .for_each(|(d, s)| *d = d.wrapping_add(*s)),
            ReduceOp::Max => d.iter_mut().zip(s).for_each(|(d, s)| *d = (*d).max(*s)),
            ReduceOp::Min => d.iter_mut().zip(s).for_each(|(d, s)| *d = (*d).min(*s)),
        }
    }};
}

macro_rules! float_kernel {
    ($t:ty, $d:expr, $s:expr, $op:expr) => {{
        let d = cast_mut::<$t>($d);
        let s = cast::<$t>($s);
        float_slices(d, s, $op)
    }};
}

fn float_slices<T: num_like::Float>(d: &mut [T], s: &[T], op: ReduceOp) {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => d.iter_mut().zip(s).for_each(|(d, s)| *d = d.add(*s)),
        // `s > d || s is NaN` takes s; a NaN already in d stays: NaN wins either way.
        ReduceOp::Max => d.iter_mut().zip(s).for_each(|(d, s)| {
            if s.gt(*d) || s.nan() {
                *d = *s
            }
        }),
        ReduceOp::Min => d.iter_mut().zip(s).for_each(|(d, s)| {
            if s.lt(*d) || s.nan() {
                *d = *s
            }
        }),
    }
}

/// The two float types, without a dependency on num-traits.
mod num_like {
    pub(super) trait Float: Copy {
        fn add(self, o: Self) -> Self;
        fn gt(self, o: Self) -> bool;
        fn lt(self, o: Self) -> bool;
        fn nan(self) -> bool;
    }
    macro_rules! imp {
        ($t:ty) => {
            impl Float for $t {
                #[inline(always)]
                fn add(self, o: Self) -> Self {
                    self + o
                }
                #[inline(always)]
                fn gt(self, o: Self) -> bool {
                    self > o
                }
                #[inline(always)]
                fn lt(self, o: Self) -> bool {
                    self < o
                }
                #[inline(always)]
                fn nan(self) -> bool {
                    self.is_nan()
                }
            }
        };
    }
    imp!(f32);
    imp!(f64);
}

#[inline(always)]
fn bf16_to_f32(b: u16) -> f32 {
    f32::from_bits(u32::from(b) << 16)
}

#[inline(always)]
fn f32_to_bf16(f: f32) -> u16 {
    let x = f.to_bits();
    if f.is_nan() {
        // Keep the sign, force a quiet NaN.
        ((x >> 16) | 0x0040) as u16
    } else {
        // Round to nearest, ties to even.
        let lsb = (x >> 16) & 1;
        (x.wrapping_add(0x7fff + lsb) >> 16) as u16
    }
}

const BLOCK: usize = 256;

/// Widens a block of half values to f32.
fn widen(e: Elem, src: &[u16], dst: &mut [f32]) {
    match e {
        Elem::Bf16 => src
            .iter()
            .zip(dst.iter_mut())
            .for_each(|(s, d)| *d = bf16_to_f32(*s)),
        _ => src
            .reinterpret_cast::<half::f16>()
            .convert_to_f32_slice(dst),
    }
}

/// Rounds a block of f32 back to the half type.
fn narrow(e: Elem, src: &[f32], dst: &mut [u16]) {
    match e {
        Elem::Bf16 => src
            .iter()
            .zip(dst.iter_mut())
            .for_each(|(s, d)| *d = f32_to_bf16(*s)),
        _ => dst
            .reinterpret_cast_mut::<half::f16>()
            .convert_from_f32_slice(src),
    }
}

fn half_kernel(e: Elem, d: &mut [u8], s: &[u8], op: ReduceOp) {
    let d = cast_mut::<u16>(d);
    let s = cast::<u16>(s);
    let mut a = [0f32; BLOCK];
    let mut b = [0f32; BLOCK];
    for (dc, sc) in d.chunks_mut(BLOCK).zip(s.chunks(BLOCK)) {
        let n = dc.len();
        widen(e, dc, &mut a[..n]);
        widen(e, sc, &mut b[..n]);
        float_slices(&mut a[..n], &b[..n], op);
        narrow(e, &a[..n], dc);
    }
}

/// `dst = dst op src`, element-wise. Both hold whole elements of `e`.
pub(crate) fn reduce(e: Elem, dst: &mut [u8], src: &[u8], op: ReduceOp) {
    debug_assert_eq!(dst.len(), src.len());
    match e {
        Elem::F32 => float_kernel!(f32, dst, src, op),
        Elem::F64 => float_kernel!(f64, dst, src, op),
        Elem::Bf16 | Elem::F16 => half_kernel(e, dst, src, op),
        Elem::I64 => int_kernel!(i64, dst, src, op),
        Elem::I32 => int_kernel!(i32, dst, src, op),
        Elem::I16 => int_kernel!(i16, dst, src, op),
        Elem::I8 => int_kernel!(i8, dst, src, op),
        Elem::U8 => int_kernel!(u8, dst, src, op),
        // Callers refuse bool reductions up front.
        Elem::Bool => {}
    }
}

/// `dst /= n`: the end of an `Avg`. Floats divide (half types through f32, one rounding);
/// integers truncate toward zero.
pub(crate) fn divide(e: Elem, dst: &mut [u8], n: usize) {
    match e {
        Elem::F32 => cast_mut::<f32>(dst).iter_mut().for_each(|x| *x /= n as f32),
        Elem::F64 => cast_mut::<f64>(dst).iter_mut().for_each(|x| *x /= n as f64),
        Elem::Bf16 | Elem::F16 => {
            let mut a = [0f32; BLOCK];
            for c in cast_mut::<u16>(dst).chunks_mut(BLOCK) {
                let k = c.len();
                widen(e, c, &mut a[..k]);
                a[..k].iter_mut().for_each(|x| *x /= n as f32);
                narrow(e, &a[..k], c);
            }
        }
        Elem::I64 => cast_mut::<i64>(dst).iter_mut().for_each(|x| *x /= n as i64),
        Elem::I32 => cast_mut::<i32>(dst).iter_mut().for_each(|x| *x /= n as i32),
        Elem::I16 => cast_mut::<i16>(dst).iter_mut().for_each(|x| *x /= n as i16),
        Elem::I8 => cast_mut::<i8>(dst).iter_mut().for_each(|x| *x /= n as i8),
        Elem::U8 => cast_mut::<u8>(dst).iter_mut().for_each(|x| *x /= n as u8),
        Elem::Bool => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// The raw bytes of a contiguous CPU tensor, in an 8-aligned buffer.
    fn raw(t: &Tensor) -> Vec<u64> {
        let n = t.numel() * t.kind().elt_size_in_bytes();
        let mut out = vec![0u64; n.div_ceil(8)];
        // SAFETY: the tensor is contiguous on the CPU and holds n bytes; out holds at least n.
        unsafe {
            std::ptr::copy_nonoverlapping(
                t.data_ptr().cast::<u8>(),
                out.as_mut_ptr().cast::<u8>(),
                n,
            )
        };
        out
    }

    fn bytes(v: &mut [u64], n: usize) -> &mut [u8] {
        &mut cast_mut_u64_as_u8(v)[..n]
    }

    fn cast_mut_u64_as_u8(v: &mut [u64]) -> &mut [u8] {
        // SAFETY: u64 storage viewed as bytes.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), v.len() * 8) }
    }

    fn halves(e: Elem, v: &mut [u64], n: usize) -> Vec<f32> {
        cast::<u16>(bytes(v, 2 * n))
            .iter()
            .map(|&h| {
                if e == Elem::Bf16 {
                    bf16_to_f32(h)
                } else {
                    half::f16::from_bits(h).to_f32()
                }
            })
            .collect()
    }

    #[test]
    fn bf16_rounding_matches_torch() {
        let xs = [
            1.0f32,
            1.001_953_1,
            1.005_859_4,
            1.011_718_8,
            -3.5,
            65504.0,
            1e-40,
            3.0e38,
            f32::INFINITY,
        ];
        let t = Tensor::from_slice(&xs).to_kind(Kind::BFloat16);
        let mut want = raw(&t);
        let want = cast::<u16>(bytes(&mut want, 2 * xs.len())).to_vec();
        let got: Vec<u16> = xs.iter().map(|&x| f32_to_bf16(x)).collect();
        assert_eq!(got, want);
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }

    #[test]
    fn float_kernels_and_nan() {
        let a = Tensor::from_slice(&[1.0f32, 5.0, -2.0, f32::NAN]);
        let b = Tensor::from_slice(&[2.0f32, 3.0, -7.0, 1.0]);
        for (op, want) in [
            (ReduceOp::Sum, [3.0f32, 8.0, -9.0, f32::NAN]),
            (ReduceOp::Max, [2.0, 5.0, -2.0, f32::NAN]),
            (ReduceOp::Min, [1.0, 3.0, -7.0, f32::NAN]),
        ] {
            let (mut d, mut s) = (raw(&a), raw(&b));
            reduce(Elem::F32, bytes(&mut d, 16), bytes(&mut s, 16), op);
            let got = cast::<f32>(bytes(&mut d, 16)).to_vec();
            for (g, w) in got.iter().zip(want) {
                assert!(*g == w || (g.is_nan() && w.is_nan()), "{op:?}: {got:?}");
            }
        }
        // NaN in the incoming value wins too.
        let (mut d, mut s) = (raw(&b), raw(&a));
        reduce(
            Elem::F32,
            bytes(&mut d, 16),
            bytes(&mut s, 16),
            ReduceOp::Max,
        );
        assert!(cast::<f32>(bytes(&mut d, 16))[3].is_nan());
    }

    #[test]
    fn half_kernels_round_once_per_hop_and_avg() {
        for e in [Elem::Bf16, Elem::F16] {
            let a = Tensor::from_slice(&[1.0f32, 2.5, -4.0, 7.0]).to_kind(e.kind());
            let b = Tensor::from_slice(&[3.0f32, 0.5, 4.0, 9.0]).to_kind(e.kind());
            let (mut d, mut s) = (raw(&a), raw(&b));
            reduce(e, bytes(&mut d, 8), bytes(&mut s, 8), ReduceOp::Sum);
            assert_eq!(halves(e, &mut d, 4), vec![4.0, 3.0, 0.0, 16.0], "{e:?}");
            divide(e, bytes(&mut d, 8), 2);
            assert_eq!(halves(e, &mut d, 4), vec![2.0, 1.5, 0.0, 8.0], "{e:?}");
            reduce(e, bytes(&mut d, 8), bytes(&mut s, 8), ReduceOp::Max);
            assert_eq!(halves(e, &mut d, 4), vec![3.0, 1.5, 4.0, 9.0], "{e:?}");
        }
    }

    #[test]
    fn integer_kernels() {
        let mut d = raw(&Tensor::from_slice(&[7i64, -7, 9]));
        let mut s = raw(&Tensor::from_slice(&[1i64, 2, i64::MAX]));
        reduce(
            Elem::I64,
            bytes(&mut d, 24),
            bytes(&mut s, 24),
            ReduceOp::Min,
        );
        assert_eq!(cast::<i64>(bytes(&mut d, 24)), &[1, -7, 9]);
        divide(Elem::I64, bytes(&mut d, 24), 2);
        assert_eq!(cast::<i64>(bytes(&mut d, 24)), &[0, -3, 4]);
    }

    #[test]
    fn codes_roundtrip() {
        for e in ALL {
            assert_eq!(Elem::from_code(e.code()), Some(e));
            assert_eq!(Elem::from_kind(e.kind()), Some(e));
            assert_eq!(e.size(), e.kind().elt_size_in_bytes());
        }
        assert_eq!(Elem::from_code(0), None);
        assert_eq!(Elem::from_code(200), None);
    }
}
