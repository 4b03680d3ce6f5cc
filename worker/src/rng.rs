//! Random numbers identical to PyTorch's CPU generator, so a request's `seed` gives the same initial
//! noise (and the same per-step noise for ancestral samplers) as diffusers with
//! `torch.Generator("cpu").manual_seed(seed)`.
//!
//! Data flow: [`TorchRng::new`] seeds an MT19937 engine exactly like `std::mt19937(seed)` (only the low
//! 32 bits of the seed count, as in torch). Every [`TorchRng::randn`] call continues the same stream
//! and picks the algorithm torch picks for a tensor of that many elements:
//!
//! - `n >= 16` (torch's vectorised `normal_fill`): `n` 24-bit uniforms in order, then Box–Muller in
//!   blocks of 16 (element `j` pairs with `j + 8`); when `n` is not a multiple of 16 the last 16
//!   positions are redrawn from 16 fresh uniforms and transformed again.
//! - `n < 16` (torch's scalar `normal_distribution<double>`): two 53-bit uniforms per pair of normals;
//!   the second normal (the sine) is cached in the generator and returned by the next scalar draw,
//!   even across calls and across vectorised draws in between.
//!
//! torch computes the `n >= 16` path with vectorised float32 `log`/`sin`/`cos` whose last bit depends
//! on the CPU; this module uses float64 math and so matches torch to about 1e-6, not bit for bit.

use candle_core::{DType, Device, Tensor};

/// Words of MT19937 state.
const MT_N: usize = 624;
/// MT19937 middle word offset.
const MT_M: usize = 397;

/// PyTorch-compatible CPU generator: MT19937 plus torch's normal-sampling algorithms.
#[derive(Clone)]
pub struct TorchRng {
    /// The engine's state words; regenerated in place every 624 outputs.
    state: Box<[u32; MT_N]>,
    /// Index of the next state word to temper and return; `MT_N` means "regenerate first".
    index: usize,
    /// Second value of the last scalar Box–Muller pair, returned by the next scalar draw (torch keeps
    /// it in the generator as `next_double_normal_sample`).
    cached_normal: Option<f64>,
}

impl std::fmt::Debug for TorchRng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The 624-word state is noise to a reader; the position and cache say where the stream is.
        f.debug_struct("TorchRng")
            .field("index", &self.index)
            .field("cached_normal", &self.cached_normal)
            .finish_non_exhaustive()
    }
}

impl TorchRng {
    /// A generator in the state of `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; MT_N]);
        // torch keeps only the low 32 bits of the seed for its MT19937 engine.
        state[0] = seed as u32;
        for i in 1..MT_N {
            let prev = state[i - 1];
            state[i] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(i as u32);
        }
        TorchRng {
            state,
            index: MT_N,
            cached_normal: None,
        }
    }

    /// Next 32-bit output of the engine.
    fn next_u32(&mut self) -> u32 {
        if self.index >= MT_N {
            self.twist();
        }
        let mut y = self.state[self.index];
        self.index += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }

    /// Regenerates the whole state block (the MT19937 recurrence).
    fn twist(&mut self) {
        const UPPER: u32 = 0x8000_0000;
        const LOWER: u32 = 0x7fff_ffff;
        const MATRIX_A: u32 = 0x9908_b0df;
        for i in 0..MT_N {
            let y = (self.state[i] & UPPER) | (self.state[(i + 1) % MT_N] & LOWER);
            let mag = if y & 1 == 1 { MATRIX_A } else { 0 };
            self.state[i] = self.state[(i + MT_M) % MT_N] ^ (y >> 1) ^ mag;
        }
        self.index = 0;
    }

    /// torch's float uniform: the low 24 bits of one output, as a float32 in [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.next_u32() & 0x00ff_ffff) as f32 * (1.0 / 16_777_216.0)
    }

    /// torch's double uniform: 53 bits of a 64-bit value made of two outputs (first one high).
    fn uniform_f64(&mut self) -> f64 {
        let hi = u64::from(self.next_u32());
        let lo = u64::from(self.next_u32());
        (((hi << 32) | lo) & ((1u64 << 53) - 1)) as f64 * (1.0 / 9_007_199_254_740_992.0)
    }

    /// `n` standard normal samples, as `torch.randn(n, generator=g)` (float32) draws them.
    pub fn randn(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.scalar_normal() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_f32()).collect();
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        if !n.is_multiple_of(16) {
            // torch redraws the tail: 16 fresh uniforms for the last 16 positions, overlapping the
            // last whole block.
            let tail = &mut data[n - 16..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            box_muller_16(tail);
        }
        data
    }

    /// One normal sample from torch's scalar path (`at::normal_distribution<double>`).
    fn scalar_normal(&mut self) -> f64 {
        if let Some(cached) = self.cached_normal.take() {
            return cached;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let radius = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.cached_normal = Some(radius * theta.sin());
        radius * theta.cos()
    }

    /// A tensor of standard normal samples, drawn on the CPU in float32 like diffusers' `randn_tensor`
    /// with a CPU generator, then moved to `device` and cast to `dtype`.
    pub fn randn_tensor(
        &mut self,
        shape: &[usize],
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Tensor> {
        let n = shape.iter().product();
        Tensor::from_vec(self.randn(n), shape, &Device::Cpu)?
            .to_device(device)?
            .to_dtype(dtype)
    }
}

/// Box–Muller over one block of 16 uniforms, in place: element `j` (radius from `1 - u`) pairs with
/// element `j + 8` (angle), giving the cosine at `j` and the sine at `j + 8`.
fn box_muller_16(block: &mut [f32]) {
    for j in 0..8 {
        let u1 = 1.0 - f64::from(block[j]);
        let u2 = f64::from(block[j + 8]);
        let radius = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        block[j] = (radius * theta.cos()) as f32;
        block[j + 8] = (radius * theta.sin()) as f32;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Deserialize)]
    struct Refs {
        cases: Vec<Case>,
    }

    #[derive(Deserialize)]
    struct Case {
        seed: u64,
        sizes: Vec<usize>,
        values: Vec<Vec<f32>>,
    }

    fn refs() -> Refs {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/schedulers/randn_refs.json"
        );
        let text = std::fs::read_to_string(path).expect("randn_refs.json is committed");
        serde_json::from_str(&text).expect("randn_refs.json parses")
    }

    #[test]
    fn matches_torch_randn() {
        let refs = refs();
        assert!(!refs.cases.is_empty());
        for case in refs.cases {
            let mut rng = TorchRng::new(case.seed);
            for (n, expected) in case.sizes.iter().zip(&case.values) {
                let got = rng.randn(*n);
                assert_eq!(got.len(), expected.len());
                for (i, (g, e)) in got.iter().zip(expected).enumerate() {
                    assert!(
                        (g - e).abs() <= 1e-6,
                        "seed {} size {n} element {i}: got {g}, torch {e}",
                        case.seed
                    );
                }
            }
        }
    }

    #[test]
    fn mt19937_matches_reference_output() {
        // The 10000th output of std::mt19937 with its default seed 5489 is 4123659995 (C++ standard).
        let mut rng = TorchRng::new(5489);
        let last = (0..10_000).map(|_| rng.next_u32()).last();
        assert_eq!(last, Some(4_123_659_995));
    }

    #[test]
    fn randn_tensor_has_shape_dtype_and_stream_position() {
        let mut a = TorchRng::new(9);
        let t = a
            .randn_tensor(&[2, 4, 3], &Device::Cpu, DType::F16)
            .expect("cpu tensor");
        assert_eq!(t.dims(), &[2, 4, 3]);
        assert_eq!(t.dtype(), DType::F16);
        let mut b = TorchRng::new(9);
        let flat = b.randn(24);
        let got: Vec<f32> = t
            .to_dtype(DType::F32)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("readable");
        for (g, e) in got.iter().zip(&flat) {
            assert!((g - e).abs() <= 1e-2 * e.abs().max(1.0));
        }
        // Both generators are now at the same stream position.
        assert_eq!(a.randn(16), b.randn(16));
    }
}
