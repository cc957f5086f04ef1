//! Parameters and the layer kinds the model is built from.
//!
//! Every parameter has a global name (`text.multimodal.1.xattn.q.weight`), a global shape,
//! and the slice of it this process owns ([`Shard`]: candle's `Shard { dim, rank,
//! world_size }`). Initial values are drawn for the *global* tensor from a generator seeded
//! by (seed, name) and then sliced, so a parameter starts with the same values whatever the
//! layout, the device, or the order in which a pipeline stage builds its layers.

use tch::{Device, Kind, Tensor};

pub use weaver_parallel::tp::{Shard, Split, TpPos};

use crate::error::{ModelError, Result};
use crate::lora::{Lora, LoraSpec};
use crate::quant::{Int8Weight, Observer};

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with this standard deviation.
    Normal(f64),
    /// Zeros.
    Zeros,
    /// Ones.
    Ones,
    /// Every element this constant.
    Const(f64),
}

/// One trainable tensor and what it is.
#[derive(Debug)]
pub struct Param {
    /// Global name.
    pub name: String,
    /// This process's part (requires grad; in the compute dtype).
    pub tensor: Tensor,
    /// Shape of the whole tensor.
    pub global_shape: Vec<i64>,
    /// Which part this process holds.
    pub shard: Shard,
    /// Whether AdamW's weight decay applies (not to norms, biases, positions, gates and
    /// the temperature).
    pub decay: bool,
}

/// The parameters of one model (or of one shard of it), in creation order.
#[derive(Debug)]
pub struct ParamStore {
    /// Where parameters live.
    pub device: Device,
    /// Their dtype (the compute dtype).
    pub kind: Kind,
    seed: u64,
    params: Vec<Param>,
    /// Adapters the targeted linear layers get when built (see [`crate::lora`]).
    lora: Option<LoraSpec>,
    /// Parameters are created as placeholders (see [`ParamStore::placeholders`]).
    placeholders: bool,
}

/// The initial values of `shard` of a tensor of `global` shape, row-major.
///
/// Normal values come from a counter-based generator: element `i` of the global tensor is a
/// pure function of (key, i). Each process computes exactly its slice, the result does not
/// depend on libtorch's global generator (which threads and other code share), and a
/// sharded parameter is bit-for-bit the matching slice of the unsharded one.
fn init_values(key: u64, global: &[i64], shard: Shard, init: Init) -> Vec<f32> {
    let local: i64 = shard.local_shape(global).iter().product();
    let n = local.max(0) as usize;
    let std = match init {
        Init::Normal(std) => std,
        Init::Zeros => return vec![0.0; n],
        Init::Ones => return vec![1.0; n],
        Init::Const(c) => return vec![c as f32; n],
    };
    // Local element j ↦ global flat index: the split dimension offsets a block of rows.
    let (dim, start, len) = if global.is_empty() {
        (0, 0, 1)
    } else {
        shard.range(global)
    };
    let size_d = global.get(dim).copied().unwrap_or(1);
    let inner: i64 = global.iter().skip(dim + 1).product();
    let global_index = move |j: usize| -> u64 {
        let j = j as i64;
        let (o, rest) = (j / (len * inner), j % (len * inner));
        ((o * size_d + start) * inner + rest) as u64
    };
    let mut out = vec![0f32; n];
    let threads = if n >= 1 << 20 {
        std::thread::available_parallelism()
            .map(|t| t.get())
            .unwrap_or(1)
    } else {
        1
    };
    let chunk = n.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            scope.spawn(move || {
                for (k, v) in part.iter_mut().enumerate() {
                    *v = (normal_at(key, global_index(c * chunk + k)) * std) as f32;
                }
            });
        }
    });
    out
}

/// A standard normal value, the `i`-th of stream `key` (SplitMix64 finaliser, Box–Muller).
fn normal_at(key: u64, i: u64) -> f64 {
    let mut z = key
        ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .wrapping_add(0x632b_e59b_d9b4_e019);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    let u1 = ((z >> 32) as f64 + 0.5) / 4_294_967_296.0;
    let u2 = ((z & 0xffff_ffff) as f64 + 0.5) / 4_294_967_296.0;
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// FNV-1a over the seed and the name: a fixed function, so initial values do not change
/// with the Rust release (std's hashers promise no stability).
fn name_seed(seed: u64, name: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in seed.to_le_bytes().iter().chain(name.as_bytes()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

impl ParamStore {
    /// An empty store; `seed` drives every initial value.
    pub fn new(device: Device, kind: Kind, seed: u64) -> ParamStore {
        ParamStore {
            device,
            kind,
            seed,
            params: Vec::new(),
            lora: None,
            placeholders: false,
        }
    }

    /// A store whose parameters are created as placeholders of their local shapes (one
    /// element broadcast: no memory, no initial values computed, never requiring grad), for
    /// a model whose tensors are then made to share other parameters' storage
    /// (`Tensor::set_data`): a second view of a trainer's weights, built without a
    /// transient copy of them.
    pub fn placeholders(device: Device, kind: Kind) -> ParamStore {
        ParamStore {
            placeholders: true,
            ..ParamStore::new(device, kind, 0)
        }
    }

    /// Gives the linear layers built from now on LoRA adapters as `spec` says (`None`: no
    /// adapters).
    pub fn set_lora(&mut self, spec: Option<LoraSpec>) {
        self.lora = spec;
    }

    /// The adapters linear layers get.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// Parameters in creation order.
    pub fn params(&self) -> &[Param] {
        &self.params
    }

    /// Number of elements held here.
    pub fn numel(&self) -> i64 {
        self.params.iter().map(|p| p.tensor.numel() as i64).sum()
    }

    /// The tensor named `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.params
            .iter()
            .find(|p| p.name == name)
            .map(|p| &p.tensor)
    }

    /// Takes parameter `name` out of the store (a layer that no longer uses it: a weight
    /// replaced by its quantized form); returns it.
    pub fn remove(&mut self, name: &str) -> Option<Param> {
        let i = self.params.iter().position(|p| p.name == name)?;
        Some(self.params.remove(i))
    }

    /// A builder for names under `prefix`.
    pub fn root(&mut self) -> Builder<'_> {
        Builder {
            store: self,
            prefix: String::new(),
        }
    }

    fn create(
        &mut self,
        name: String,
        global_shape: &[i64],
        shard: Shard,
        init: Init,
        decay: bool,
    ) -> Result<Tensor> {
        if self.params.iter().any(|p| p.name == name) {
            return Err(ModelError::ParamMismatch(format!(
                "parameter {name} created twice"
            )));
        }
        let local_shape = shard.local_shape(global_shape);
        if self.placeholders {
            let t = Tensor::f_zeros([], (self.kind, self.device))?.f_expand(&local_shape, false)?;
            self.params.push(Param {
                name,
                tensor: t.shallow_clone(),
                global_shape: global_shape.to_vec(),
                shard,
                decay,
            });
            return Ok(t);
        }
        let values = init_values(name_seed(self.seed, &name), global_shape, shard, init);
        // Detached: the reshape is a view whose autograd metadata keeps its base alive, and
        // with it the initial storage after the trainer moves the parameter into its flat
        // buffer (`set_data`) — on a CPU in f32, where the conversions below are no-ops, a
        // second copy of every parameter for the whole run.
        let local = Tensor::f_from_slice(&values)?
            .f_reshape(&local_shape)?
            .f_detach()?;
        let t = local
            .f_to_kind(self.kind)?
            .f_to_device(self.device)?
            .f_contiguous()?
            .set_requires_grad(true);
        self.params.push(Param {
            name,
            tensor: t.shallow_clone(),
            global_shape: global_shape.to_vec(),
            shard,
            decay,
        });
        Ok(t)
    }

    /// Copies values into the parameters from `(name, tensor)` pairs holding this
    /// process's parts; every parameter must be present with its local shape.
    pub fn load_local(&mut self, named: &[(String, Tensor)]) -> Result<()> {
        for p in &mut self.params {
            let (_, src) = named.iter().find(|(n, _)| n == &p.name).ok_or_else(|| {
                ModelError::ParamMismatch(format!("no value for parameter {}", p.name))
            })?;
            if src.size() != p.tensor.size() {
                return Err(ModelError::ParamMismatch(format!(
                    "{}: expected shape {:?}, got {:?}",
                    p.name,
                    p.tensor.size(),
                    src.size()
                )));
            }
            tch::no_grad(|| p.tensor.f_copy_(src))?;
        }
        Ok(())
    }

    /// Zeroes every gradient (drops them: the next backward allocates fresh ones).
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.tensor.zero_grad();
        }
    }
}

/// Creates parameters under a name prefix.
#[derive(Debug)]
pub struct Builder<'a> {
    store: &'a mut ParamStore,
    prefix: String,
}

impl Builder<'_> {
    /// A builder for `prefix.name`.
    pub fn sub(&mut self, name: impl std::fmt::Display) -> Builder<'_> {
        let prefix = if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Builder {
            store: self.store,
            prefix,
        }
    }

    /// The full name of `name` here.
    pub fn name(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    /// Creates a parameter.
    pub fn param(
        &mut self,
        name: &str,
        global_shape: &[i64],
        shard: Shard,
        init: Init,
        decay: bool,
    ) -> Result<Tensor> {
        let full = self.name(name);
        self.store.create(full, global_shape, shard, init, decay)
    }

    /// The compute dtype.
    pub fn kind(&self) -> Kind {
        self.store.kind
    }
}

/// `y = x Wᵀ + b`, possibly one tensor-parallel part of it.
#[derive(Debug)]
pub struct Linear {
    /// The weight's global name (`text.multimodal.0.attn.q.weight`).
    pub name: String,
    /// `[out, in]` (local part); empty once the layer is quantized.
    pub weight: Tensor,
    /// `[out]` (local part for column splits).
    pub bias: Option<Tensor>,
    /// The split.
    pub split: Split,
    /// The int8 weight that replaces `weight` in a quantized model.
    pub quant: Option<Int8Weight>,
    /// Records the inputs' per-channel maximum (quantization calibration).
    pub observer: Option<Observer>,
    /// The LoRA adapter, when the store's [`LoraSpec`] targets this layer.
    pub lora: Option<Lora>,
}

impl Linear {
    /// Builds `prefix.weight` `[out, in]` (normal(std)) and `prefix.bias` (zeros) split as
    /// `split` over `tp`.
    pub fn new(
        b: &mut Builder<'_>,
        in_dim: i64,
        out_dim: i64,
        bias: bool,
        std: f64,
        split: Split,
        tp: TpPos,
    ) -> Result<Linear> {
        let (w_shard, b_shard) = match split {
            Split::Replicated => (Shard::FULL, Shard::FULL),
            Split::Column => (tp.shard(0), tp.shard(0)),
            Split::Row => (tp.shard(1), Shard::FULL),
        };
        let weight = b.param(
            "weight",
            &[out_dim, in_dim],
            w_shard,
            Init::Normal(std),
            true,
        )?;
        let bias = if bias {
            Some(b.param("bias", &[out_dim], b_shard, Init::Zeros, false)?)
        } else {
            None
        };
        let lora = match b.store.lora.clone() {
            Some(spec) if weaver_config::finetune::lora_targets_layer(&spec.targets, &b.prefix) => {
                Some(Linear::adapter(b, &spec, in_dim, out_dim, split, tp)?)
            }
            _ => None,
        };
        Ok(Linear {
            name: b.name("weight"),
            weight,
            bias,
            split,
            quant: None,
            observer: None,
            lora,
        })
    }

    /// `prefix.lora_a` `[r, in]` (normal, std in^-1/2) and `prefix.lora_b` `[out, r]`
    /// (zeros), split to match the layer (see [`crate::lora`]).
    fn adapter(
        b: &mut Builder<'_>,
        spec: &LoraSpec,
        in_dim: i64,
        out_dim: i64,
        split: Split,
        tp: TpPos,
    ) -> Result<Lora> {
        let (a_shard, b_shard) = match split {
            Split::Column => (Shard::FULL, tp.shard(0)),
            Split::Row => (tp.shard(1), Shard::FULL),
            Split::Replicated => {
                return Err(ModelError::ParamMismatch(format!(
                    "{}: LoRA adapts tensor-parallel projections only (attention and MLP)",
                    b.prefix
                )))
            }
        };
        let r = spec.rank;
        let std = (in_dim as f64).powf(-0.5);
        Ok(Lora {
            a: b.param(
                weaver_config::finetune::LORA_A,
                &[r, in_dim],
                a_shard,
                Init::Normal(std),
                true,
            )?,
            b: b.param(
                weaver_config::finetune::LORA_B,
                &[out_dim, r],
                b_shard,
                Init::Zeros,
                true,
            )?,
            scale: spec.scale(),
            split,
        })
    }

    /// The local product `x Wᵀ` plus the bias, except for row splits where the caller adds
    /// [`Linear::bias`] after reducing the partial sums.
    pub fn forward_local(&self, x: &Tensor) -> Result<Tensor> {
        let bias = match self.split {
            Split::Row => None,
            _ => self.bias.as_ref(),
        };
        if let Some(o) = &self.observer {
            o.observe(x)?;
        }
        let y = match &self.quant {
            Some(q) => q.forward(x, bias)?,
            None => x.f_linear(&self.weight, bias)?,
        };
        match &self.lora {
            Some(l) => Ok(y.f_add(&l.forward(x)?)?),
            None => Ok(y),
        }
    }
}

/// Layer normalisation over the last dimension with affine parameters (always replicated).
#[derive(Debug)]
pub struct LayerNorm {
    /// Scale.
    pub weight: Tensor,
    /// Shift.
    pub bias: Tensor,
    /// Width.
    pub dim: i64,
    /// Epsilon.
    pub eps: f64,
}

impl LayerNorm {
    /// Builds `prefix.weight` (ones) and `prefix.bias` (zeros).
    pub fn new(b: &mut Builder<'_>, dim: i64, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: b.param("weight", &[dim], Shard::FULL, Init::Ones, false)?,
            bias: b.param("bias", &[dim], Shard::FULL, Init::Zeros, false)?,
            dim,
            eps,
        })
    }

    /// Normalises `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.f_layer_norm(
            [self.dim],
            Some(&self.weight),
            Some(&self.bias),
            self.eps,
            true,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A placeholder store's parameters have their local shapes and no memory (one
    /// broadcast element), and `set_data` makes them the tensors they stand for, in place
    /// for every holder of the handle (as the layout evaluator's stage decoder uses them).
    #[test]
    fn placeholders_take_no_memory_until_bound() {
        let mut store = ParamStore::placeholders(Device::Cpu, Kind::Float);
        let shard = Shard {
            dim: 0,
            rank: 1,
            world: 2,
        };
        let p = store
            .root()
            .sub("l")
            .param("weight", &[6, 4], shard, Init::Normal(1.0), true)
            .unwrap();
        assert_eq!(p.size(), vec![3, 4]);
        assert_eq!(p.stride(), vec![0, 0], "a placeholder holds one element");
        assert!(!p.requires_grad());
        let real =
            Tensor::from_slice(&(0..12).map(|x| x as f32).collect::<Vec<_>>()).reshape([3, 4]);
        store.params()[0].tensor.shallow_clone().set_data(&real);
        assert!(p.equal(&real), "the model's handle sees the bound values");
        assert_eq!(store.get("l.weight").unwrap().data_ptr(), real.data_ptr());
    }

    #[test]
    fn shards_are_slices_of_the_same_global_init() {
        let mut full = ParamStore::new(Device::Cpu, Kind::Float, 7);
        let w = full
            .root()
            .sub("l")
            .param("weight", &[6, 4], Shard::FULL, Init::Normal(1.0), true)
            .unwrap();
        for rank in 0..2 {
            let mut part = ParamStore::new(Device::Cpu, Kind::Float, 7);
            // Build another parameter first: the order must not matter.
            let _ = part
                .root()
                .param("other", &[3], Shard::FULL, Init::Normal(1.0), true)
                .unwrap();
            let shard = Shard {
                dim: 1,
                rank,
                world: 2,
            };
            let p = part
                .root()
                .sub("l")
                .param("weight", &[6, 4], shard, Init::Normal(1.0), true)
                .unwrap();
            assert_eq!(p.size(), vec![6, 2]);
            let expect = w.narrow(1, 2 * rank as i64, 2);
            assert!(p.equal(&expect));
        }
    }

    #[test]
    fn normal_init_has_the_requested_moments() {
        let v = init_values(42, &[1000, 100], Shard::FULL, Init::Normal(0.5));
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.01, "{mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.01, "{var}");
        // Row 0 and dimension-0 shards agree with the full tensor.
        let part = init_values(
            42,
            &[1000, 100],
            Shard {
                dim: 0,
                rank: 1,
                world: 2,
            },
            Init::Normal(0.5),
        );
        assert_eq!(&part[..], &v[50_000..]);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let mut s = ParamStore::new(Device::Cpu, Kind::Float, 0);
        let _ = s
            .root()
            .param("a", &[1], Shard::FULL, Init::Zeros, false)
            .unwrap();
        assert!(s
            .root()
            .param("a", &[1], Shard::FULL, Init::Zeros, false)
            .is_err());
    }
}
