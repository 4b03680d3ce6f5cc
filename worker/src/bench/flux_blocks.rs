//! `fastfusion-worker bench --mode flux-blocks --model DIR --size WxH`: one FLUX double-stream and
//! one single-stream block at the model's real width, for an image of that size.
//!
//! DIR holds `config.json` (a FLUX transformer config: heads, head dim, RoPE axes) and
//! `blocks.safetensors` with `transformer_blocks.0.*` and `single_transformer_blocks.0.*` in
//! diffusers' names; `scripts/bench-flux-blocks.py` writes random ones (FLUX.1's 3072 wide, 24
//! heads) and runs this next to diffusers on the same weights. Tokens: `(W/16)·(H/16)` image tokens
//! (FLUX's packed latents) after 512 text tokens (FLUX.1-dev's prompt length). Each block runs once
//! untimed, then `--repeat` times; the report has the mean seconds and the memory the calls needed
//! above what was resident before them (peak resident set size, reset before each block through
//! `/proc/self/clear_refs`, so Linux only).

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::BenchSettings;
use crate::config::ModelConfig;
use crate::error::{Result, WorkerError};
use crate::models::flux::{
    image_ids, rope_tables, text_ids, DoubleBlock, FluxTransformerConfig, Rope, SingleBlock,
};
use crate::models::weights;
use crate::startup;

/// Starts each result line, so a driving script can find them among other output.
const MARKER: &str = "fastfusion-bench-flux-blocks";
/// FLUX.1-dev's T5 prompt length.
const TEXT_TOKENS: usize = 512;
/// Pixels per packed token side: VAE scale factor 8 × the 2×2 packing.
const PIXELS_PER_TOKEN: usize = 16;

/// One block's figures.
#[derive(Debug, Clone)]
pub struct BlockRow {
    pub block: &'static str,
    pub mean: Duration,
    /// Resident set size before the timed calls, KiB.
    pub rss_before_kib: Option<u64>,
    /// Peak resident set size during the calls, KiB.
    pub peak_kib: Option<u64>,
}

/// The figures of one `--mode flux-blocks` run.
#[derive(Debug, Clone)]
pub struct FluxBlocksReport {
    pub device: String,
    pub dtype: DType,
    pub width: usize,
    pub height: usize,
    pub image_tokens: usize,
    pub text_tokens: usize,
    pub hidden: usize,
    pub heads: usize,
    pub repeat: usize,
    pub rows: Vec<BlockRow>,
}

impl fmt::Display for FluxBlocksReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "FLUX blocks · device {} · dtype {:?} · {}x{} · {} image + {} text tokens · hidden {} · \
             {} heads · {} timed runs",
            self.device,
            self.dtype,
            self.width,
            self.height,
            self.image_tokens,
            self.text_tokens,
            self.hidden,
            self.heads,
            self.repeat
        )?;
        writeln!(
            f,
            "{:<8} {:>10} {:>16} {:>12}",
            "block", "seconds", "resident MiB", "peak MiB"
        )?;
        let mib =
            |kib: Option<u64>| kib.map_or("?".to_string(), |k| format!("{:.0}", k as f64 / 1024.0));
        for r in &self.rows {
            writeln!(
                f,
                "{:<8} {:>10.3} {:>16} {:>12}",
                r.block,
                r.mean.as_secs_f64(),
                mib(r.rss_before_kib),
                mib(r.peak_kib)
            )?;
        }
        for r in &self.rows {
            writeln!(
                f,
                "{MARKER} block={} image_tokens={} text_tokens={} seconds={:.4} rss_before_kib={} \
                 peak_kib={}",
                r.block,
                self.image_tokens,
                self.text_tokens,
                r.mean.as_secs_f64(),
                r.rss_before_kib.map_or(-1, |k| k as i64),
                r.peak_kib.map_or(-1, |k| k as i64)
            )?;
        }
        Ok(())
    }
}

impl BlockRow {
    /// "seconds per {what} … · resident … MiB · peak … MiB", then the machine-readable line
    /// `{marker} width= height= seconds= rss_before_kib= peak_kib=` that the driving scripts parse.
    pub(super) fn write_figures(
        &self,
        f: &mut fmt::Formatter<'_>,
        what: &str,
        marker: &str,
        (width, height): (usize, usize),
    ) -> fmt::Result {
        let mib =
            |kib: Option<u64>| kib.map_or("?".to_string(), |k| format!("{:.0}", k as f64 / 1024.0));
        writeln!(
            f,
            "seconds per {what} {:.3} · resident {} MiB · peak {} MiB",
            self.mean.as_secs_f64(),
            mib(self.rss_before_kib),
            mib(self.peak_kib)
        )?;
        write!(
            f,
            "{marker} width={width} height={height} seconds={:.4} rss_before_kib={} peak_kib={}",
            self.mean.as_secs_f64(),
            self.rss_before_kib.map_or(-1, |k| k as i64),
            self.peak_kib.map_or(-1, |k| k as i64)
        )
    }
}

/// "Winograd weights kept by the convolutions: … MiB" (`conv::cached_bytes`, read after the
/// passes), for the UNet and VAE reports.
pub(super) fn write_kept_weights(f: &mut fmt::Formatter<'_>, bytes: usize) -> fmt::Result {
    writeln!(
        f,
        "Winograd weights kept by the convolutions: {:.0} MiB",
        bytes as f64 / f64::from(1 << 20)
    )
}

/// A /proc/self/status value in KiB (Linux).
fn status_kib(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix(key))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// Makes the peak resident set size the current one (Linux ≥ 4.0), so the next peak is this
/// block's.
fn reset_peak() {
    // A kernel without it just leaves the peak where it was; the figures then say so by being high.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Times `f` after one untimed call; returns the mean and the memory figures.
pub(super) fn measure(
    block: &'static str,
    repeat: usize,
    f: &mut dyn FnMut() -> candle_core::Result<Tensor>,
) -> Result<BlockRow> {
    f()?;
    reset_peak();
    let rss_before_kib = status_kib("VmRSS:");
    let started = Instant::now();
    for _ in 0..repeat {
        // Reading one value back waits for asynchronous devices to finish.
        f()?.flatten_all()?
            .get(0)?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
    }
    Ok(BlockRow {
        block,
        mean: started.elapsed() / repeat.max(1) as u32,
        rss_before_kib,
        peak_kib: status_kib("VmHWM:"),
    })
}

/// Loads the two blocks in `config`'s model directory and times them at `settings`' size.
pub fn run(
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &BenchSettings,
) -> Result<FluxBlocksReport> {
    let (dir, options) = startup::resolve(config, base_dir)?;
    let source = dir.display().to_string();
    let flux = FluxTransformerConfig::load(&source, &dir.join("config.json"))?;
    let (device, dtype) = (&options.device, options.dtype);
    let vb = weights::load_var_builder(&source, &dir, "blocks", dtype, device)?;
    let (dim, heads) = (flux.inner_dim(), flux.num_attention_heads);
    let weights_error =
        |e: candle_core::Error| WorkerError::model_load(&source, dir.join("blocks.safetensors"), e);
    let double =
        DoubleBlock::new(dim, heads, vb.pp("transformer_blocks.0")).map_err(weights_error)?;
    let single = SingleBlock::new(dim, heads, vb.pp("single_transformer_blocks.0"))
        .map_err(weights_error)?;
    drop(vb);

    let (rows, cols) = (
        settings.height / PIXELS_PER_TOKEN,
        settings.width / PIXELS_PER_TOKEN,
    );
    if rows == 0 || cols == 0 {
        return Err(WorkerError::invalid(
            "size",
            format!("must be at least {PIXELS_PER_TOKEN}x{PIXELS_PER_TOKEN}"),
        ));
    }
    let image_tokens = rows * cols;
    let ids = Tensor::cat(
        &[
            text_ids(TEXT_TOKENS, &Device::Cpu)?,
            image_ids(rows, cols, &Device::Cpu)?,
        ],
        0,
    )?;
    let (cos, sin) = rope_tables(&ids, &flux.axes_dims_rope, device)?;
    let rope = Rope { cos, sin };
    let random = |shape: (usize, usize, usize)| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, 1.0, shape, device)?.to_dtype(dtype)
    };
    let img = random((1, image_tokens, dim))?;
    let txt = random((1, TEXT_TOKENS, dim))?;
    let temb = random((1, 1, dim))?.squeeze(1)?;
    let joint = Tensor::cat(&[&txt, &img], 1)?;

    let repeat = settings.repeat.max(1);
    let rows = vec![
        measure("double", repeat, &mut || {
            double.forward(&img, &txt, &temb, &rope).map(|(img, _)| img)
        })?,
        measure("single", repeat, &mut || {
            single.forward(&joint, &temb, &rope)
        })?,
    ];
    Ok(FluxBlocksReport {
        device: format!("{device:?}"),
        dtype,
        width: settings.width,
        height: settings.height,
        image_tokens,
        text_tokens: TEXT_TOKENS,
        hidden: dim,
        heads,
        repeat,
        rows,
    })
}
