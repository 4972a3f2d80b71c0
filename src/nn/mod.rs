//! The PSPNet-DAB model: a dilated ResNet (output stride 8) built from Dataset-Aware Blocks
//! (conv → DSBN → ReLU), the pyramid pooling module, and one classifier per dataset on the
//! main and the auxiliary head. Written once over [`Backend`]; parameters live in a
//! [`ParamStore`] under the names a PyTorch port of the same model would use.
//!
//! Every block is one graph op ([`Graph::dab`]) and so is the pyramid pooling module
//! ([`Graph::ppm`]). A block whose consumer is the next block's convolution — inside a
//! BasicBlock or Bottleneck, along the deep stem — leaves its output unwritten in training
//! ([`Dab::forward_deferred`]): the next convolution normalises its input as it loads it.

mod init;
pub mod pretrained;
mod pspnet;
mod resnet;

pub use init::{conv_default, kaiming_normal_fan_out, normal};
pub use pspnet::{ModelConfig, Outputs, PspNet};
pub use resnet::{Block, BlockKind, Depth};

use crate::autograd::{BnId, DabCall, Datasets, Graph, Group, ParamStore, Var, WeightId};
use crate::backend::Backend;
use crate::error::Result;
use crate::ops::conv::ConvGeometry;
use crate::ops::dsbn::DsbnOptions;
use crate::rng::splitmix64;

/// A Dataset-Aware Block: a convolution shared by all datasets (no bias), DSBN with each
/// sample's dataset slice, optional ReLU; the DSBN may add a residual before the ReLU.
///
/// A block of a model with unshared convolutions ([`ModelConfig::conv_sets`] > 1, the paper's
/// "unshared conv + shared BN" baseline of Table 3) has one convolution weight per set; the
/// DSBN layer is the same for every set.
#[derive(Debug, Clone)]
pub struct Dab {
    /// The convolution weight, KRSC (of conv set 0).
    pub weight: WeightId,
    /// The weights of conv sets 1, 2, ... (empty when the convolution is shared).
    pub unshared: Vec<WeightId>,
    /// The DSBN layer.
    pub bn: BnId,
    /// Stride, padding, dilation.
    pub geometry: ConvGeometry,
    /// Output channels.
    pub out_channels: usize,
}

/// How a convolution's weights are initialised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// torchvision ResNet: Kaiming normal, fan-out, ReLU gain.
    KaimingFanOut,
    /// `nn.Conv2d`'s default (Kaiming uniform, a = √5).
    TorchDefault,
}

/// Everything a DAB needs at construction.
#[derive(Debug, Clone)]
pub struct DabSpec<'a> {
    /// Name of the conv weight (`layer1.0.conv1`; `.weight` is appended).
    pub conv_name: &'a str,
    /// Name prefix of the DSBN layer (`layer1.0.bn1`).
    pub bn_name: &'a str,
    /// Input channels.
    pub in_channels: usize,
    /// Output channels.
    pub out_channels: usize,
    /// Square kernel size.
    pub kernel: usize,
    /// Geometry.
    pub geometry: ConvGeometry,
    /// Learning-rate group.
    pub group: Group,
    /// Initialisation.
    pub init: Init,
}

impl<'a> DabSpec<'a> {
    /// A backbone convolution (torchvision's Kaiming fan-out initialisation).
    pub fn backbone(conv: &'a str, bn: &'a str, cin: usize, cout: usize, kernel: usize, g: ConvGeometry) -> Self {
        DabSpec {
            conv_name: conv,
            bn_name: bn,
            in_channels: cin,
            out_channels: cout,
            kernel,
            geometry: g,
            group: Group::Backbone,
            init: Init::KaimingFanOut,
        }
    }

    /// A head convolution (`nn.Conv2d`'s default initialisation, head learning rate).
    pub fn head(conv: &'a str, bn: &'a str, cin: usize, cout: usize, kernel: usize, g: ConvGeometry) -> Self {
        DabSpec { group: Group::Head, init: Init::TorchDefault, ..Self::backbone(conv, bn, cin, cout, kernel, g) }
    }
}

/// Seed of the parameter registered as number `index` of a model seeded with `seed`.
pub(crate) fn param_seed(seed: u64, index: usize) -> u64 {
    splitmix64(seed, index as u64)
}

impl Dab {
    /// Registers the block's conv weight and DSBN layer (`num_bn` dataset slices).
    pub fn new<B: Backend>(store: &mut ParamStore<B>, spec: DabSpec<'_>, num_bn: usize, seed: u64) -> Result<Self> {
        Self::with_conv_sets(store, spec, num_bn, 1, seed)
    }

    /// [`Dab::new`] with `conv_sets` convolution weights (set 0 named `{conv}.weight`, set k
    /// `{conv}.set{k}.weight`, each initialised from its own seed) and one DSBN layer.
    pub fn with_conv_sets<B: Backend>(
        store: &mut ParamStore<B>,
        spec: DabSpec<'_>,
        num_bn: usize,
        conv_sets: usize,
        seed: u64,
    ) -> Result<Self> {
        let (k, r, c) = (spec.out_channels, spec.kernel, spec.in_channels);
        let mut weights = Vec::with_capacity(conv_sets.max(1));
        for set in 0..conv_sets.max(1) {
            let s = param_seed(seed, store.weights().len());
            let w = match spec.init {
                Init::KaimingFanOut => kaiming_normal_fan_out(s, k, r, r, c),
                Init::TorchDefault => conv_default(s, k, r, r, c).0,
            };
            let name = match set {
                0 => format!("{}.weight", spec.conv_name),
                _ => format!("{}.set{set}.weight", spec.conv_name),
            };
            weights.push(store.add_weight(name, &[k, r, r, c], &w, spec.group, None)?);
        }
        let bn = store.add_bn(spec.bn_name, num_bn, k, spec.group)?;
        let weight = weights.remove(0);
        Ok(Dab { weight, unshared: weights, bn, geometry: spec.geometry, out_channels: k })
    }

    /// This block with conv set `set`'s weight as its convolution (set 0, or a set it lacks:
    /// the block itself).
    pub fn in_set(&self, set: usize) -> Dab {
        match set.checked_sub(1).and_then(|i| self.unshared.get(i)) {
            Some(&w) => Dab { weight: w, unshared: Vec::new(), ..self.clone() },
            None => self.clone(),
        }
    }

    /// `relu?(DSBN(conv(x)) + residual)`, the output written (one op: [`Graph::dab`]).
    pub fn forward<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
        residual: Option<Var>,
        relu: bool,
    ) -> Result<Var> {
        g.dab(store, x, datasets, &self.spec(residual, relu, false))
    }

    /// `relu?(DSBN(conv(x)))` for a consumer that is the next block's convolution: in training
    /// the output is not written — the next block applies this block's normalisation as its
    /// convolution loads the input (the prologue), in the forward and again in the backward.
    pub fn forward_deferred<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
        relu: bool,
    ) -> Result<Var> {
        g.dab(store, x, datasets, &self.spec(None, relu, true))
    }

    fn spec(&self, residual: Option<Var>, relu: bool, defer: bool) -> DabCall {
        DabCall {
            weight: self.weight,
            bn: self.bn,
            geometry: self.geometry,
            dsbn: DsbnOptions { relu, ..DsbnOptions::default() },
            residual,
            defer,
        }
    }
}

/// A per-dataset 1×1 classifier (conv with bias).
#[derive(Debug, Clone)]
pub struct Classifier {
    /// Weight `[C_d, 1, 1, C_in]`.
    pub weight: WeightId,
    /// Bias `[C_d]`.
    pub bias: WeightId,
    /// Number of classes of this head.
    pub classes: usize,
}

impl Classifier {
    /// Registers `{name}.weight` and `{name}.bias` with `nn.Conv2d`'s default initialisation.
    pub fn new<B: Backend>(
        store: &mut ParamStore<B>,
        name: &str,
        in_channels: usize,
        classes: usize,
        dataset: usize,
        seed: u64,
    ) -> Result<Self> {
        let (w, b) = conv_default(param_seed(seed, store.weights().len()), classes, 1, 1, in_channels);
        let weight = store.add_weight(
            format!("{name}.weight"),
            &[classes, 1, 1, in_channels],
            &w,
            Group::Head,
            Some(dataset),
        )?;
        let bias = store.add_weight(format!("{name}.bias"), &[classes], &b, Group::Head, Some(dataset))?;
        Ok(Classifier { weight, bias, classes })
    }

    /// Logits `[N, H, W, C_d]`.
    pub fn forward<B: Backend>(&self, g: &mut Graph<B>, store: &ParamStore<B>, x: Var) -> Result<Var> {
        g.conv2d(store, x, self.weight, Some(self.bias), ConvGeometry::default())
    }
}
