//! `fastfusion-worker bench --mode memory`: peak resident memory with each memory option.
//!
//! Peak memory belongs to a whole process, so each option set runs in a child process of its
//! own: the bench re-executes its binary with the hidden `--memory-child NAME` flag (the caller
//! builds that command, see `main.rs`), the child loads the model with the option set applied,
//! makes one request and prints one line with its peak resident set size (`VmHWM` of
//! /proc/self/status, so Linux only) after the load and at the end, and the parent collects the
//! lines into a table.

use std::fmt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use super::BenchSettings;
use crate::config::{DTypeSpec, ModelConfig};
use crate::error::{Result, WorkerError};
use crate::pipelines::{NoProgress, TextToImage};
use crate::startup;

/// Starts the line a child reports on, so the parent can find it among other output.
const MARKER: &str = "fastfusion-bench-memory";

/// One option set of `model_config.json`, applied on top of the given config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryCase {
    /// Every option off, float32 throughout.
    Baseline,
    VaeTiling,
    /// Accepted for the seed's sake: the VAE always decodes one image at a time.
    VaeSlicing,
    CpuOffload,
    CpuOffloadAndTiling,
    InitF16RunF32,
    InitF32RunF16,
    InitF16RunF16,
}

impl MemoryCase {
    pub const ALL: [MemoryCase; 8] = [
        MemoryCase::Baseline,
        MemoryCase::VaeTiling,
        MemoryCase::VaeSlicing,
        MemoryCase::CpuOffload,
        MemoryCase::CpuOffloadAndTiling,
        MemoryCase::InitF16RunF32,
        MemoryCase::InitF32RunF16,
        MemoryCase::InitF16RunF16,
    ];

    /// The name `--memory-child` takes and the table shows.
    pub fn name(self) -> &'static str {
        match self {
            MemoryCase::Baseline => "baseline",
            MemoryCase::VaeTiling => "vae_tiling",
            MemoryCase::VaeSlicing => "vae_slicing",
            MemoryCase::CpuOffload => "cpu_offload",
            MemoryCase::CpuOffloadAndTiling => "cpu_offload+vae_tiling",
            MemoryCase::InitF16RunF32 => "init f16 / run f32",
            MemoryCase::InitF32RunF16 => "init f32 / run f16",
            MemoryCase::InitF16RunF16 => "init f16 / run f16",
        }
    }

    pub fn from_name(name: &str) -> Option<MemoryCase> {
        Self::ALL.into_iter().find(|case| case.name() == name)
    }

    /// `config` with this option set: the memory options are reset first, so that each case
    /// differs from the baseline only by what its name says.
    fn apply(self, config: &mut ModelConfig) {
        let p = &mut config.pipeline;
        p.enable_vae_tiling = matches!(
            self,
            MemoryCase::VaeTiling | MemoryCase::CpuOffloadAndTiling
        );
        p.enable_vae_slicing = self == MemoryCase::VaeSlicing;
        p.enable_cpu_offload = matches!(
            self,
            MemoryCase::CpuOffload | MemoryCase::CpuOffloadAndTiling
        );
        let (init, run) = match self {
            MemoryCase::InitF16RunF32 => (DTypeSpec::F16, DTypeSpec::F32),
            MemoryCase::InitF32RunF16 => (DTypeSpec::F32, DTypeSpec::F16),
            MemoryCase::InitF16RunF16 => (DTypeSpec::F16, DTypeSpec::F16),
            _ => (DTypeSpec::F32, DTypeSpec::F32),
        };
        p.torch_dtype_init = init;
        p.torch_dtype_run = Some(run);
    }
}

/// What a child measured.
#[derive(Debug, Clone, PartialEq)]
pub struct ChildReport {
    /// Peak resident set size once the model was loaded, in KiB (`None` off Linux).
    pub load_peak_kib: Option<u64>,
    /// Peak resident set size at the end of the request, in KiB.
    pub peak_kib: Option<u64>,
    pub load: Duration,
    pub generate: Duration,
}

impl ChildReport {
    /// The line a child prints: `MARKER load_peak_kib=… peak_kib=… load_s=… generate_s=…`.
    pub fn line(&self) -> String {
        let kib = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        format!(
            "{MARKER} load_peak_kib={} peak_kib={} load_s={:.4} generate_s={:.4}",
            kib(self.load_peak_kib),
            kib(self.peak_kib),
            self.load.as_secs_f64(),
            self.generate.as_secs_f64()
        )
    }

    /// Finds and reads the line [`Self::line`] wrote in a child's output.
    pub fn parse(output: &str) -> Option<ChildReport> {
        let line = output.lines().find_map(|l| l.strip_prefix(MARKER))?;
        let field = |key: &str| {
            line.split_whitespace()
                .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
        };
        let kib = |key: &str| -> Option<Option<u64>> {
            match field(key)? {
                "-" => Some(None),
                v => v.parse().ok().map(Some),
            }
        };
        let secs = |key: &str| -> Option<Duration> {
            Duration::try_from_secs_f64(field(key)?.parse().ok()?).ok()
        };
        Some(ChildReport {
            load_peak_kib: kib("load_peak_kib")?,
            peak_kib: kib("peak_kib")?,
            load: secs("load_s")?,
            generate: secs("generate_s")?,
        })
    }
}

/// This process's peak resident set size in KiB, from /proc/self/status (Linux).
fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

/// The child's side: loads the model with `case` applied and makes one request of
/// `settings.images` images.
pub fn run_child(
    case: MemoryCase,
    config: &ModelConfig,
    base_dir: Option<&Path>,
    settings: &BenchSettings,
) -> Result<ChildReport> {
    let mut config = config.clone();
    case.apply(&mut config);
    let started = Instant::now();
    let backend = startup::load_backend(&config, base_dir)?;
    let load = started.elapsed();
    let load_peak_kib = peak_rss_kib();
    let request = TextToImage {
        prompt: super::PROMPT.into(),
        negative_prompt: None,
        n: settings.images,
        width: settings.width,
        height: settings.height,
        seed: 0,
        steps: settings.steps,
        guidance_scale: settings.guidance_scale,
        scheduler: backend.description().default_scheduler,
        max_sequence_length: None,
        loras: Vec::new(),
    };
    let started = Instant::now();
    backend.text_to_image(&request, &mut NoProgress)?;
    Ok(ChildReport {
        load_peak_kib,
        peak_kib: peak_rss_kib(),
        load,
        generate: started.elapsed(),
    })
}

/// Every case's outcome: the child's report, or why it has none.
#[derive(Debug)]
pub struct MemoryReport {
    pub settings: BenchSettings,
    pub rows: Vec<(MemoryCase, std::result::Result<ChildReport, String>)>,
}

/// The parent's side: runs `child(case)` for each case, one at a time (so that they do not
/// compete for memory or cores).
pub fn run(
    settings: &BenchSettings,
    cases: &[MemoryCase],
    child: impl Fn(MemoryCase) -> Command,
) -> Result<MemoryReport> {
    let mut rows = Vec::with_capacity(cases.len());
    for &case in cases {
        let output = child(case)
            .output()
            .map_err(|e| WorkerError::Internal(format!("cannot start the bench child: {e}")))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let outcome = match ChildReport::parse(&stdout) {
            Some(report) if output.status.success() => Ok(report),
            _ => {
                // The last line of stderr says why (an error, or nothing when the OOM killer
                // ended it).
                let stderr = String::from_utf8_lossy(&output.stderr);
                let last = stderr.lines().last().unwrap_or("").trim().to_string();
                Err(format!("{}: {last}", output.status))
            }
        };
        rows.push((case, outcome));
    }
    Ok(MemoryReport {
        settings: settings.clone(),
        rows,
    })
}

impl fmt::Display for MemoryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.settings;
        writeln!(
            f,
            "peak resident memory · {}x{} · {} image(s) · {} steps · guidance {} · one process per row",
            s.width, s.height, s.images, s.steps, s.guidance_scale
        )?;
        writeln!(
            f,
            "{:<24} {:>14} {:>10} {:>8} {:>11}",
            "option set", "load peak MiB", "peak MiB", "load s", "generate s"
        )?;
        let mib = |kib: Option<u64>| {
            kib.map_or("n/a".to_string(), |k| format!("{:.1}", k as f64 / 1024.0))
        };
        for (case, outcome) in &self.rows {
            match outcome {
                Ok(r) => writeln!(
                    f,
                    "{:<24} {:>14} {:>10} {:>8.3} {:>11.3}",
                    case.name(),
                    mib(r.load_peak_kib),
                    mib(r.peak_kib),
                    r.load.as_secs_f64(),
                    r.generate.as_secs_f64()
                )?,
                Err(why) => writeln!(f, "{:<24} failed ({why})", case.name())?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_child_line_reads_back() {
        let report = ChildReport {
            load_peak_kib: Some(51_200),
            peak_kib: None,
            load: Duration::from_millis(250),
            generate: Duration::from_millis(1500),
        };
        let output = format!("some log line\n{}\n", report.line());
        assert_eq!(ChildReport::parse(&output), Some(report));
        assert_eq!(ChildReport::parse("no marker here"), None);
        assert_eq!(ChildReport::parse(&format!("{MARKER} peak_kib=x")), None);
    }

    #[test]
    fn case_names_round_trip_and_cases_differ_from_the_baseline() {
        let base = ModelConfig::for_model("unused");
        let mut baseline = base.clone();
        MemoryCase::Baseline.apply(&mut baseline);
        for case in MemoryCase::ALL {
            assert_eq!(MemoryCase::from_name(case.name()), Some(case));
            let mut config = base.clone();
            case.apply(&mut config);
            assert_eq!(config == baseline, case == MemoryCase::Baseline, "{case:?}");
        }
    }

    #[test]
    fn this_process_has_a_peak() {
        if cfg!(target_os = "linux") {
            assert!(peak_rss_kib().unwrap() > 0);
        }
    }
}
