//! The adapters a pipeline loaded and the weights active right now.
//!
//! [`LoraBank::load`] reads every file at start-up (tensors moved to the device in the run
//! dtype); each model part asks for its [`ComponentLoras`] when it is built. A batch runs inside
//! [`LoraBank::activate`]: the guard sets each adapter's weight (0 = off) and puts every weight
//! back to 0 when dropped, and it holds a lock meanwhile, so two callers of one pipeline never
//! run with each other's set.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};

use super::file::{self, AdapterFile, Entries, Entry};
use super::names::Naming;
use super::LoraWeight;
use crate::error::{Result, WorkerError};
use crate::metrics;

/// The model parts adapters touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Target {
    /// The UNet or the FLUX transformer.
    Denoiser,
    /// `text_encoder` (CLIP).
    TextEncoder,
    /// `text_encoder_2` (SDXL's second CLIP).
    TextEncoder2,
}

impl Target {
    /// diffusers' component prefix (`unet.`, `transformer.`, `text_encoder.`, …).
    pub fn from_part(part: &str) -> Option<Self> {
        match part {
            "unet" | "transformer" => Some(Target::Denoiser),
            "text_encoder" => Some(Target::TextEncoder),
            "text_encoder_2" => Some(Target::TextEncoder2),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Denoiser => "unet/transformer",
            Target::TextEncoder => "text_encoder",
            Target::TextEncoder2 => "text_encoder_2",
        }
    }
}

/// Each adapter's weight for the batch running now, by bank index (0 = off).
#[derive(Debug, Default)]
pub struct ActiveWeights {
    weights: RwLock<Arc<[f32]>>,
}

impl ActiveWeights {
    /// The weights now (a cheap handle; layers read it once per forward).
    pub fn current(&self) -> Arc<[f32]> {
        self.weights
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set(&self, weights: Arc<[f32]>) {
        *self.weights.write().unwrap_or_else(PoisonError::into_inner) = weights;
    }
}

#[derive(Debug)]
struct Adapter {
    file: AdapterFile,
    entries: Entries,
}

/// Every adapter of a pipeline.
#[derive(Debug, Default)]
pub struct LoraBank {
    adapters: Vec<Adapter>,
    active: Arc<ActiveWeights>,
    /// Held by the running batch's [`ActiveGuard`]; remembers the last set for the switch metric.
    running: Mutex<Vec<LoraWeight>>,
}

impl LoraBank {
    /// Reads every adapter file; a bad one fails naming its config entry, name and reason.
    /// Duplicate names are refused.
    pub fn load(files: &[AdapterFile], device: &Device, dtype: DType) -> Result<Self> {
        let mut adapters = Vec::with_capacity(files.len());
        let mut names = HashSet::new();
        for f in files {
            if !names.insert(f.name.as_str()) {
                return Err(WorkerError::config(
                    &f.key,
                    format!("duplicate adapter name '{}'", f.name),
                ));
            }
            let started = Instant::now();
            let entries = file::read(f).map_err(|e| WorkerError::config(&f.key, e))?;
            let entries = to_device(entries, device, dtype)
                .map_err(|e| WorkerError::config(&f.key, f.error(e)))?;
            let took = started.elapsed().as_secs_f64();
            metrics::set_lora_load_seconds(&f.name, took);
            let modules: usize = entries.values().map(HashMap::len).sum();
            tracing::info!(adapter = %f.name, file = %f.path.display(), modules, seconds = took, "LoRA loaded");
            adapters.push(Adapter {
                file: f.clone(),
                entries,
            });
        }
        Ok(Self {
            active: Arc::new(ActiveWeights {
                weights: RwLock::new(vec![0.0; adapters.len()].into()),
            }),
            adapters,
            running: Mutex::new(Vec::new()),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.adapters.is_empty()
    }

    /// The adapters' names, in config order.
    pub fn names(&self) -> Vec<String> {
        self.adapters.iter().map(|a| a.file.name.clone()).collect()
    }

    /// What the part `target` (named as `naming` says) gets; `None` when no adapter touches it.
    pub fn component(&self, target: Target, naming: Naming) -> Option<Arc<ComponentLoras>> {
        let entries: Vec<(usize, HashMap<String, Entry>)> = self
            .adapters
            .iter()
            .enumerate()
            .filter_map(|(i, a)| Some((i, a.entries.get(&target)?.clone())))
            .collect();
        (!entries.is_empty()).then(|| {
            Arc::new(ComponentLoras {
                target,
                naming,
                entries,
                active: self.active.clone(),
            })
        })
    }

    /// Fails when an adapter has entries for a part the model does not have (`built` are the
    /// parts it has), e.g. `text_encoder_2` weights on an SD 1.5 model.
    pub fn check_parts(&self, built: &[Target]) -> Result<()> {
        for a in &self.adapters {
            if let Some((target, part)) = a.entries.iter().find(|(t, _)| !built.contains(t)) {
                let mut keys: Vec<&str> = part.values().map(|e| e.key.as_str()).collect();
                keys.sort_unstable();
                keys.truncate(3);
                return Err(WorkerError::config(
                    &a.file.key,
                    a.file.error(format!(
                        "has weights for {}, which this model does not have (keys {})",
                        target.name(),
                        keys.join(", ")
                    )),
                ));
            }
        }
        Ok(())
    }

    /// Makes `set` the active adapters until the guard drops (every weight back to 0 then).
    /// An unknown name is an error naming `lora_settings` and the loaded adapters.
    pub fn activate(&self, set: &[LoraWeight]) -> Result<ActiveGuard<'_>> {
        let mut weights = vec![0.0f32; self.adapters.len()];
        for w in set {
            let Some(i) = self.adapters.iter().position(|a| a.file.name == w.name) else {
                let loaded = self.names();
                return Err(WorkerError::invalid(
                    "lora_settings",
                    format!(
                        "unknown LoRA '{}'; loaded: {}",
                        w.name,
                        if loaded.is_empty() {
                            "none".to_string()
                        } else {
                            loaded.join(", ")
                        }
                    ),
                ));
            };
            weights[i] += w.weight;
        }
        let mut last = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if last.as_slice() != set {
            metrics::lora_switched();
            *last = set.to_vec();
        }
        if !set.is_empty() {
            self.active.set(weights.into());
        }
        Ok(ActiveGuard {
            active: &self.active,
            count: self.adapters.len(),
            _running: last,
        })
    }
}

/// While alive, the set given to [`LoraBank::activate`] is active.
pub struct ActiveGuard<'a> {
    active: &'a ActiveWeights,
    count: usize,
    _running: MutexGuard<'a, Vec<LoraWeight>>,
}

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.active.set(vec![0.0; self.count].into());
    }
}

fn to_device(entries: Entries, device: &Device, dtype: DType) -> candle_core::Result<Entries> {
    let convert = |t: &Tensor| t.to_device(device)?.to_dtype(dtype);
    entries
        .into_iter()
        .map(|(target, part)| {
            let part = part
                .into_iter()
                .map(|(key, mut e)| {
                    e.down = convert(&e.down)?;
                    e.up = convert(&e.up)?;
                    e.up_bias = e.up_bias.as_ref().map(convert).transpose()?;
                    Ok((key, e))
                })
                .collect::<candle_core::Result<HashMap<_, _>>>()?;
            Ok((target, part))
        })
        .collect()
}

/// The adapters' entries for one model part, handed to its build (see `layers.rs`).
#[derive(Debug)]
pub struct ComponentLoras {
    target: Target,
    naming: Naming,
    /// (bank index, that adapter's entries for this part).
    entries: Vec<(usize, HashMap<String, Entry>)>,
    active: Arc<ActiveWeights>,
}

impl ComponentLoras {
    pub(super) fn target(&self) -> Target {
        self.target
    }

    pub(super) fn naming(&self) -> Naming {
        self.naming
    }

    pub(super) fn active(&self) -> Arc<ActiveWeights> {
        self.active.clone()
    }

    /// Every adapter's entry under `key`.
    pub(super) fn entries(&self, key: &str) -> Vec<(usize, &Entry)> {
        self.entries
            .iter()
            .filter_map(|(i, entries)| Some((*i, entries.get(key)?)))
            .collect()
    }

    /// Fails naming the first keys no layer took.
    pub(super) fn check_claimed(
        &self,
        claimed: &HashSet<(usize, String)>,
    ) -> candle_core::Result<()> {
        for (i, entries) in &self.entries {
            let mut missed: Vec<&Entry> = entries
                .iter()
                .filter(|(key, _)| !claimed.contains(&(*i, (*key).clone())))
                .map(|(_, e)| e)
                .collect();
            missed.sort_by(|a, b| a.key.cmp(&b.key));
            if let Some(first) = missed.first() {
                let count = missed.len();
                let keys: Vec<&str> = missed.iter().take(3).map(|e| e.key.as_str()).collect();
                return Err(candle_core::Error::Msg(format!(
                    "{}: {count} keys match no module of the {} this worker can adapt \
                     (first: {})",
                    first.origin,
                    self.target.name(),
                    keys.join(", ")
                )));
            }
        }
        Ok(())
    }
}
