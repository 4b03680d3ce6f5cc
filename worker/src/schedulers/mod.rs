//! Noise schedulers: the step rule of the denoising loop.
//!
//! Each scheduler behaves as the diffusers class of its kind built `from_config` of a repo's
//! `scheduler/scheduler_config.json`. The pipeline drives them through [`Scheduler`]:
//!
//! ```text
//! let mut s = kind.build(&config, steps)?;
//! latents = noise * s.init_noise_sigma();
//! for i in 0..s.timesteps().len() {
//!     let x = s.scale_model_input(&latents, i)?;
//!     let eps = unet(x, s.timesteps()[i]);            // after classifier-free guidance
//!     latents = s.step(&eps, i, &latents, &mut rng)?;  // converts v/epsilon predictions itself
//! }
//! ```
//!
//! Layout:
//!
//! ```text
//! config.rs      SchedulerConfig (the JSON file, every key optional) and its typed readers
//! schedule.rs    betas, alphas_cumprod, sigma tables, timestep spacings: diffusers' numbers exactly
//! euler.rs       EulerDiscreteScheduler and EulerAncestralDiscreteScheduler
//! ddim.rs        DDIMScheduler (eta = 0)
//! pndm.rs        PNDMScheduler (PLMS, with or without the Runge–Kutta warm-up)
//! dpm_solver.rs  DPMSolverMultistepScheduler (DPM-Solver++ 2M, optionally with Karras sigmas)
//! flow_match.rs  FlowMatchEulerDiscreteScheduler (FLUX: velocity prediction, shifted linear sigmas)
//! ```
//!
//! Flow-matching models (FLUX) and the discrete-time ones (SD) take different schedulers:
//! [`SchedulerKind::is_flow_matching`] tells them apart, and `build_with` refuses a kind whose family
//! differs from the repo's scheduler class. A flow-matching schedule may depend on the packed image
//! sequence length (dynamic shifting), passed in a [`ScheduleContext`].
//!
//! Tables are built once in [`SchedulerKind::build`]; `step` only reads them, except for the
//! multistep schedulers (PNDM, DPM-Solver) which keep the previous model outputs. Tensor math runs in
//! float32 whatever the latents' dtype (diffusers upcasts the same way) and the result is cast back.
//! Step indices are loop positions, so image-to-image simply starts the loop at a later index.

mod config;
mod ddim;
mod dpm_solver;
mod euler;
mod flow_match;
mod pndm;
mod schedule;
#[cfg(test)]
mod tests;

pub use config::SchedulerConfig;

use candle_core::{DType, Tensor};

use crate::error::WorkerError;
use crate::rng::TorchRng;

/// One denoising schedule for a fixed number of inference steps.
pub trait Scheduler: Send {
    /// Timesteps passed to the UNet, in loop order (PNDM repeats one, as diffusers does).
    fn timesteps(&self) -> &[f64];
    /// Scale for the initial noise: 1 for the alpha-based schedulers (DDIM, PNDM, DPM-Solver),
    /// about sigma_max for the sigma-based Euler family.
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input for loop step `step_index`: unchanged by default; Euler-type schedulers divide
    /// by `sqrt(sigma² + 1)`.
    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> candle_core::Result<Tensor> {
        Ok(sample.clone())
    }
    /// `model_output` is the UNet output after guidance; the scheduler converts epsilon / v_prediction / sample.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        rng: &mut TorchRng,
    ) -> candle_core::Result<Tensor>;
    /// Image-to-image: noise `original` to the level of `step_index` (diffusers add_noise at timesteps[step_index]).
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor>;
}

/// The schedulers a request may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SchedulerKind {
    Euler,
    EulerAncestral,
    Ddim,
    Pndm,
    DpmPp2m,
    DpmPp2mKarras,
    /// FLUX's scheduler; only for flow-matching models.
    FlowMatchEuler,
}

/// What a schedule may depend on besides the config and the step count.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScheduleContext {
    /// Packed latent tokens per image (FLUX: `(height/16)·(width/16)`), for dynamic shifting.
    pub image_seq_len: Option<usize>,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 7] = [
        SchedulerKind::Euler,
        SchedulerKind::EulerAncestral,
        SchedulerKind::Ddim,
        SchedulerKind::Pndm,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
        SchedulerKind::FlowMatchEuler,
    ];

    /// The name clients use in requests.
    pub fn name(self) -> &'static str {
        match self {
            SchedulerKind::Euler => "euler",
            SchedulerKind::EulerAncestral => "euler_ancestral",
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::Pndm => "pndm",
            SchedulerKind::DpmPp2m => "dpmpp_2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp_2m_karras",
            SchedulerKind::FlowMatchEuler => "flow_match_euler",
        }
    }

    /// Whether this kind steps a flow-matching (velocity) model such as FLUX rather than a
    /// discrete-time diffusion model.
    pub fn is_flow_matching(self) -> bool {
        match self {
            SchedulerKind::FlowMatchEuler => true,
            SchedulerKind::Euler
            | SchedulerKind::EulerAncestral
            | SchedulerKind::Ddim
            | SchedulerKind::Pndm
            | SchedulerKind::DpmPp2m
            | SchedulerKind::DpmPp2mKarras => false,
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.name() == name)
    }

    /// The kind a repo's scheduler_config.json `_class_name` (+ its use_karras_sigmas) means, if supported.
    pub fn from_config(config: &SchedulerConfig) -> Option<Self> {
        match config.class_name.as_deref()? {
            "EulerDiscreteScheduler" => Some(SchedulerKind::Euler),
            "EulerAncestralDiscreteScheduler" => Some(SchedulerKind::EulerAncestral),
            "DDIMScheduler" => Some(SchedulerKind::Ddim),
            "PNDMScheduler" => Some(SchedulerKind::Pndm),
            flow_match::CLASS_NAME => Some(SchedulerKind::FlowMatchEuler),
            "DPMSolverMultistepScheduler" => {
                // Only DPM-Solver++ of order 2 is implemented; other variants are a different kind.
                let plus_plus =
                    config.algorithm_type.as_deref().unwrap_or("dpmsolver++") == "dpmsolver++";
                let order_two = config.solver_order.unwrap_or(2) == 2;
                match (
                    plus_plus && order_two,
                    config.use_karras_sigmas == Some(true),
                ) {
                    (false, _) => None,
                    (true, false) => Some(SchedulerKind::DpmPp2m),
                    (true, true) => Some(SchedulerKind::DpmPp2mKarras),
                }
            }
            _ => None,
        }
    }

    /// [`build_with`](Self::build_with) without context (enough for every discrete kind and for
    /// flow matching without dynamic shifting).
    pub fn build(
        self,
        config: &SchedulerConfig,
        num_inference_steps: usize,
    ) -> Result<Box<dyn Scheduler>, WorkerError> {
        self.build_with(config, num_inference_steps, &ScheduleContext::default())
    }

    /// The scheduler of this kind for `num_inference_steps`, as diffusers builds it with
    /// `Class.from_config(config, **overrides)` + `set_timesteps(num_inference_steps)` (flow matching:
    /// with FluxPipeline's sigmas and `mu`). A kind of the other family than the repo's scheduler
    /// class is refused as an invalid `scheduler`: its schedule would be meaningless for the model.
    pub fn build_with(
        self,
        config: &SchedulerConfig,
        num_inference_steps: usize,
        context: &ScheduleContext,
    ) -> Result<Box<dyn Scheduler>, WorkerError> {
        if let Some(class) = config.class_name.as_deref() {
            let flow_model = class == flow_match::CLASS_NAME;
            if flow_model != self.is_flow_matching() {
                let family = |flow| {
                    if flow {
                        "flow-matching"
                    } else {
                        "discrete-time"
                    }
                };
                return Err(WorkerError::invalid(
                    "scheduler",
                    format!(
                        "'{}' is a {} scheduler; this model's scheduler ({class}) is {}",
                        self.name(),
                        family(self.is_flow_matching()),
                        family(flow_model)
                    ),
                ));
            }
        }
        Ok(match self {
            SchedulerKind::Euler => Box::new(euler::Euler::discrete(config, num_inference_steps)?),
            SchedulerKind::EulerAncestral => {
                Box::new(euler::Euler::ancestral(config, num_inference_steps)?)
            }
            SchedulerKind::Ddim => Box::new(ddim::Ddim::new(config, num_inference_steps)?),
            SchedulerKind::Pndm => Box::new(pndm::Pndm::new(config, num_inference_steps)?),
            SchedulerKind::DpmPp2m => Box::new(dpm_solver::DpmSolver::new(
                config,
                num_inference_steps,
                false,
            )?),
            SchedulerKind::DpmPp2mKarras => Box::new(dpm_solver::DpmSolver::new(
                config,
                num_inference_steps,
                true,
            )?),
            SchedulerKind::FlowMatchEuler => Box::new(flow_match::FlowMatchEuler::new(
                config,
                num_inference_steps,
                context,
            )?),
        })
    }
}

/// Float32 view of a tensor for scheduler math.
fn f32_of(t: &Tensor) -> candle_core::Result<Tensor> {
    t.to_dtype(DType::F32)
}

/// `t * s` with a float32 scalar, as torch multiplies a float32 tensor by a 0-dim float32 tensor.
fn mul(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.affine(f64::from(s), 0.0)
}

/// `t / s` with a float32 scalar (a true division, not a multiplication by the reciprocal).
fn div(t: &Tensor, s: f32) -> candle_core::Result<Tensor> {
    t.broadcast_div(&Tensor::new(s, t.device())?)
}

/// The error for a step index past the end of the schedule.
fn index_error(step_index: usize, len: usize) -> candle_core::Error {
    candle_core::Error::Msg(format!(
        "scheduler step index {step_index} is out of range for {len} timesteps"
    ))
}
