//! The layers adapters reach: a linear or convolution layer plus the low-rank parts of every
//! adapter that touches it, added in the forward pass with the weights active at that moment.
//!
//! Models build these through [`linear`], [`linear_no_bias`] and [`conv2d`] (drop-in for
//! candle_nn's). Inside [`build_with`] each constructor looks its module name up in the part's
//! [`ComponentLoras`] and takes what matches; outside it (or for a part no adapter touches) it
//! is the plain layer. The scope is a thread-local set only while the build closure runs, so
//! model constructors keep their signatures and a rebuilt offloaded part gets its adapters again.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::Arc;

use candle_core::{Module, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, VarBuilder};

use super::bank::{ActiveWeights, ComponentLoras};
use super::names::{Naming, Slice};
use crate::models::conv::Conv;

/// One adapter's low-rank path through one layer.
#[derive(Debug, Clone)]
struct Part {
    /// Index of the adapter in the bank (where its active weight is).
    adapter: usize,
    /// alpha / rank from the file.
    scale: f64,
    path: LowRank,
}

#[derive(Debug, Clone)]
enum LowRank {
    Linear {
        down: Linear,
        up: Linear,
    },
    /// down has the base's kernel, stride and padding; up is 1×1.
    Conv {
        down: Conv2d,
        up: Conv2d,
    },
}

impl LowRank {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            LowRank::Linear { down, up } => up.forward(&down.forward(xs)?),
            LowRank::Conv { down, up } => up.forward(&down.forward(xs)?),
        }
    }
}

/// The adapter parts of one layer and where to read their weights.
#[derive(Debug, Clone)]
struct Deltas {
    parts: Vec<Part>,
    active: Arc<ActiveWeights>,
}

impl Deltas {
    /// `ys + Σ weight · scale · up(down(xs))` over the parts whose adapter is active, as peft's
    /// unfused forward (`result + lora_B(lora_A(x)) * scaling`).
    fn add(&self, xs: &Tensor, mut ys: Tensor) -> candle_core::Result<Tensor> {
        let weights = self.active.current();
        for part in &self.parts {
            let weight = weights.get(part.adapter).copied().unwrap_or(0.0);
            if weight == 0.0 {
                continue;
            }
            let delta = part.path.forward(xs)?;
            ys = (ys + (delta * (f64::from(weight) * part.scale))?)?;
        }
        Ok(ys)
    }
}

/// `nn.Linear` that adapters can reach.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    deltas: Option<Deltas>,
}

impl LoraLinear {
    /// The plain layer (no adapter can reach it).
    pub fn plain(base: Linear) -> Self {
        Self { base, deltas: None }
    }

    pub fn weight(&self) -> &Tensor {
        self.base.weight()
    }
}

impl Module for LoraLinear {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ys = self.base.forward(xs)?;
        match &self.deltas {
            Some(deltas) => deltas.add(xs, ys),
            None => Ok(ys),
        }
    }
}

/// `nn.Conv2d` that adapters (LoCon, PEFT conv LoRAs) can reach.
#[derive(Debug, Clone)]
pub struct LoraConv2d {
    base: Conv,
    deltas: Option<Deltas>,
}

impl Module for LoraConv2d {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let ys = self.base.forward(xs)?;
        match &self.deltas {
            Some(deltas) => deltas.add(xs, ys),
            None => Ok(ys),
        }
    }
}

/// What a build in progress knows: the part's adapters and which of their entries were taken.
struct Scope {
    loras: Arc<ComponentLoras>,
    /// (adapter index, entry key) of every entry some layer took.
    claimed: HashSet<(usize, String)>,
}

thread_local! {
    static SCOPE: RefCell<Option<Scope>> = const { RefCell::new(None) };
}

/// Runs `build` (a model constructor) with `loras` reachable by its layers, then checks that
/// every entry of every adapter was taken by some layer: a key that matches no module is an
/// error naming the adapter and the first such keys. `None` builds the plain model.
pub fn build_with<C>(
    loras: Option<&Arc<ComponentLoras>>,
    build: impl FnOnce() -> candle_core::Result<C>,
) -> candle_core::Result<C> {
    let Some(loras) = loras else {
        return build();
    };
    let previous = SCOPE.with(|s| {
        s.replace(Some(Scope {
            loras: loras.clone(),
            claimed: HashSet::new(),
        }))
    });
    let built = build();
    let scope = SCOPE.with(|s| s.replace(previous));
    let built = built?;
    let claimed = scope.map(|s| s.claimed).unwrap_or_default();
    loras.check_claimed(&claimed)?;
    Ok(built)
}

/// The parts the scope's adapters have for the layer at `path` (in × out), with the base's
/// kernel size (1 for linear layers); errors name the adapter and key whose shape does not fit.
fn take_parts(
    path: &str,
    in_dim: usize,
    out_dim: usize,
    kernel: Option<(usize, Conv2dConfig)>,
) -> candle_core::Result<Vec<Part>> {
    SCOPE.with(|s| {
        let mut scope = s.borrow_mut();
        let Some(scope) = scope.as_mut() else {
            return Ok(Vec::new());
        };
        let loras = scope.loras.clone();
        let mut parts = Vec::new();
        for (key, slice) in loras
            .naming()
            .candidates(loras.target(), path, in_dim, out_dim)
        {
            for (adapter, entry) in loras.entries(&key) {
                let down = widen_flux_input(&loras, path, entry.down.clone(), in_dim, kernel)?;
                let up = slice.apply(&entry.up).map_err(|e| {
                    entry.error(&format!("does not fit {path} ({in_dim} → {out_dim}): {e}"))
                })?;
                let path = low_rank(down, up, entry.up_bias.clone(), in_dim, out_dim, kernel)
                    .map_err(|why| entry.error(&format!("{why} for {path}")))?;
                scope.claimed.insert((adapter, key.clone()));
                parts.push(Part {
                    adapter,
                    scale: entry.scale,
                    path,
                });
            }
        }
        Ok(parts)
    })
}

/// A FLUX Fill transformer's `x_embedder` reads the noisy latents' 64 packed channels first, then
/// the masked picture's and the mask's: an ordinary FLUX LoRA's `x_embedder` down matrix (rank ×
/// 64) is widened with zero columns, so it acts on the latents alone, as diffusers'
/// `_maybe_expand_lora_state_dict` does when it loads such a LoRA into FluxFillPipeline.
fn widen_flux_input(
    loras: &ComponentLoras,
    path: &str,
    down: Tensor,
    in_dim: usize,
    kernel: Option<(usize, Conv2dConfig)>,
) -> candle_core::Result<Tensor> {
    match down.dims() {
        &[_, narrower]
            if kernel.is_none()
                && loras.naming() == Naming::Flux
                && path == "x_embedder"
                && narrower < in_dim =>
        {
            down.pad_with_zeros(1, 0, in_dim - narrower)
        }
        _ => Ok(down),
    }
}

/// Checks the shapes of `down` (rank × in [× kh × kw]) and `up` (out × rank [× 1 × 1]) against
/// the layer and builds its low-rank path.
fn low_rank(
    down: Tensor,
    up: Tensor,
    up_bias: Option<Tensor>,
    in_dim: usize,
    out_dim: usize,
    kernel: Option<(usize, Conv2dConfig)>,
) -> Result<LowRank, String> {
    let shape = |t: &Tensor| format!("{:?}", t.dims());
    let rank = down.dims().first().copied().unwrap_or(0);
    let (down_in, up_out, up_rank) = (
        down.dims().get(1).copied(),
        up.dims().first().copied(),
        up.dims().get(1).copied(),
    );
    if down_in != Some(in_dim) || up_out != Some(out_dim) || up_rank != Some(rank) || rank == 0 {
        let hint = if down_in.is_some_and(|d| d > in_dim) && down_in == Some(2 * in_dim) {
            " (its input is twice as wide as the layer's: a FLUX control LoRA such as \
             FLUX.1-Canny/Depth-dev-lora, which needs a control image this worker does not take)"
        } else {
            ""
        };
        return Err(format!(
            "shapes down {} / up {} do not fit a layer of {in_dim} inputs and {out_dim} outputs{hint}",
            shape(&down),
            shape(&up)
        ));
    }
    let flat = |t: &Tensor, what: &str| -> Result<Tensor, String> {
        match t.dims() {
            [_, _] => Ok(t.clone()),
            [a, b, 1, 1] => t.reshape((*a, *b)).map_err(|e| e.to_string()),
            dims => Err(format!("{what} has shape {dims:?}, not a linear layer's")),
        }
    };
    match kernel {
        None => Ok(LowRank::Linear {
            down: Linear::new(flat(&down, "down")?, None),
            up: Linear::new(flat(&up, "up")?, up_bias),
        }),
        Some((k, config)) => {
            let down = match down.dims() {
                [r, i] if k == 1 => down.reshape((*r, *i, 1, 1)).map_err(|e| e.to_string())?,
                [_, _, kh, kw] if *kh == k && *kw == k => down,
                dims => {
                    return Err(format!(
                        "down has shape {dims:?}; the layer's kernel is {k}×{k}"
                    ))
                }
            };
            let up = match up.dims() {
                [o, r] => up.reshape((*o, *r, 1, 1)).map_err(|e| e.to_string())?,
                [_, _, 1, 1] => up,
                dims => return Err(format!("up has shape {dims:?}, not 1×1")),
            };
            let down_config = Conv2dConfig {
                groups: 1,
                ..config
            };
            Ok(LowRank::Conv {
                down: Conv2d::new(down, None, down_config),
                up: Conv2d::new(up, up_bias, Conv2dConfig::default()),
            })
        }
    }
}

fn deltas(parts: Vec<Part>) -> Option<Deltas> {
    let active = SCOPE.with(|s| s.borrow().as_ref().map(|s| s.loras.active()))?;
    (!parts.is_empty()).then_some(Deltas { parts, active })
}

/// `candle_nn::linear` (with bias) that adapters can reach.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> candle_core::Result<LoraLinear> {
    let path = vb.prefix();
    let base = candle_nn::linear(in_dim, out_dim, vb)?;
    Ok(LoraLinear {
        base,
        deltas: deltas(take_parts(&path, in_dim, out_dim, None)?),
    })
}

/// `candle_nn::linear_no_bias` that adapters can reach.
pub fn linear_no_bias(
    in_dim: usize,
    out_dim: usize,
    vb: VarBuilder,
) -> candle_core::Result<LoraLinear> {
    let path = vb.prefix();
    let base = candle_nn::linear_no_bias(in_dim, out_dim, vb)?;
    Ok(LoraLinear {
        base,
        deltas: deltas(take_parts(&path, in_dim, out_dim, None)?),
    })
}

/// `candle_nn::conv2d` (with bias) that adapters can reach.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    config: Conv2dConfig,
    vb: VarBuilder,
) -> candle_core::Result<LoraConv2d> {
    let path = vb.prefix();
    let base = Conv::new(candle_nn::conv2d(
        in_channels,
        out_channels,
        kernel,
        config,
        vb,
    )?);
    let parts = take_parts(&path, in_channels, out_channels, Some((kernel, config)))?;
    Ok(LoraConv2d {
        base,
        deltas: deltas(parts),
    })
}

impl Slice {
    /// The rows of a (possibly fused) `up` matrix that belong to one layer.
    fn apply(&self, up: &Tensor) -> candle_core::Result<Tensor> {
        match *self {
            Slice::Full => Ok(up.clone()),
            Slice::Rows { start, len } => up.narrow(0, start, len),
            Slice::SwapHalves => {
                let half = up.dim(0)? / 2;
                Tensor::cat(&[up.narrow(0, half, half)?, up.narrow(0, 0, half)?], 0)
            }
        }
    }
}
