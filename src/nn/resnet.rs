//! Dilated ResNet (output stride 8) from Dataset-Aware Blocks: BasicBlock (ResNet-18/34) and
//! Bottleneck (ResNet-50/101), each ending in DSBN + residual add + ReLU. Layer 3 runs at
//! dilation 2 and layer 4 at dilation 4, both with stride 1 (as PSPNet's backbone).

use crate::autograd::{Datasets, Graph, ParamStore, Var};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;

use super::{Dab, DabSpec};

/// Which ResNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Depth {
    /// BasicBlock ×[2, 2, 2, 2].
    R18,
    /// BasicBlock ×[3, 4, 6, 3].
    R34,
    /// Bottleneck ×[3, 4, 6, 3].
    R50,
    /// Bottleneck ×[3, 4, 23, 3].
    R101,
}

impl Depth {
    /// Blocks per layer and their kind.
    pub fn layout(self) -> ([usize; 4], BlockKind) {
        match self {
            Depth::R18 => ([2, 2, 2, 2], BlockKind::Basic),
            Depth::R34 => ([3, 4, 6, 3], BlockKind::Basic),
            Depth::R50 => ([3, 4, 6, 3], BlockKind::Bottleneck),
            Depth::R101 => ([3, 4, 23, 3], BlockKind::Bottleneck),
        }
    }

    /// Parses "18", "34", "50", "101" (with or without a "resnet" prefix).
    pub fn parse(s: &str) -> Result<Self> {
        match s.trim_start_matches("resnet") {
            "18" => Ok(Depth::R18),
            "34" => Ok(Depth::R34),
            "50" => Ok(Depth::R50),
            "101" => Ok(Depth::R101),
            _ => Err(Error::InvalidArgument(format!("unknown ResNet depth {s:?}: use 18, 34, 50 or 101"))),
        }
    }
}

/// The residual unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Two 3×3 convolutions; expansion 1.
    Basic,
    /// 1×1 → 3×3 → 1×1 (×4 channels); expansion 4.
    Bottleneck,
}

impl BlockKind {
    /// Output channels per `planes`.
    pub fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// One residual block: its DABs (the last one adds the identity before its ReLU) and the
/// optional projection of the identity.
#[derive(Debug, Clone)]
pub struct Block {
    /// The convolutions in order.
    pub dabs: Vec<Dab>,
    /// 1×1 conv + DSBN when the shape changes.
    pub downsample: Option<Dab>,
}

impl Block {
    /// Registers block `layer{layer}.{index}`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new<B: Backend>(
        store: &mut ParamStore<B>,
        kind: BlockKind,
        prefix: &str,
        inplanes: usize,
        planes: usize,
        stride: usize,
        dilation: usize,
        num_bn: usize,
        conv_sets: usize,
        seed: u64,
    ) -> Result<Self> {
        let out = planes * kind.expansion();
        let g3 = |s: usize| ConvGeometry::square(s, dilation, dilation);
        let plans: Vec<(&str, &str, usize, usize, usize, ConvGeometry)> = match kind {
            BlockKind::Basic => {
                vec![("conv1", "bn1", inplanes, planes, 3, g3(stride)), ("conv2", "bn2", planes, planes, 3, g3(1))]
            }
            BlockKind::Bottleneck => vec![
                ("conv1", "bn1", inplanes, planes, 1, ConvGeometry::default()),
                ("conv2", "bn2", planes, planes, 3, g3(stride)),
                ("conv3", "bn3", planes, out, 1, ConvGeometry::default()),
            ],
        };
        let mut dabs = Vec::new();
        for (conv, bn, cin, cout, k, g) in plans {
            let cname = format!("{prefix}.{conv}");
            let bname = format!("{prefix}.{bn}");
            let spec = DabSpec::backbone(&cname, &bname, cin, cout, k, g);
            dabs.push(Dab::with_conv_sets(store, spec, num_bn, conv_sets, seed)?);
        }
        let downsample = if stride != 1 || inplanes != out {
            let cname = format!("{prefix}.downsample.0");
            let bname = format!("{prefix}.downsample.1");
            let g = ConvGeometry::square(stride, 0, 1);
            let spec = DabSpec::backbone(&cname, &bname, inplanes, out, 1, g);
            Some(Dab::with_conv_sets(store, spec, num_bn, conv_sets, seed)?)
        } else {
            None
        };
        Ok(Block { dabs, downsample })
    }

    /// This block with conv set `set`'s convolutions ([`Dab::in_set`]).
    pub fn in_set(&self, set: usize) -> Block {
        Block {
            dabs: self.dabs.iter().map(|d| d.in_set(set)).collect(),
            downsample: self.downsample.as_ref().map(|d| d.in_set(set)),
        }
    }

    /// `relu(DSBN(conv_last(...)) + identity)`; the blocks before the last hand their
    /// normalisation to the next convolution's prologue.
    pub fn forward<B: Backend>(
        &self,
        g: &mut Graph<B>,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
    ) -> Result<Var> {
        let identity = match &self.downsample {
            Some(d) => d.forward(g, store, x, datasets, None, false)?,
            None => x,
        };
        let mut h = x;
        let last = self.dabs.len() - 1;
        for (i, dab) in self.dabs.iter().enumerate() {
            // Inside the block each output feeds only the next convolution: its normalisation
            // runs in that convolution's prologue. The last block adds the identity and writes.
            h = if i == last {
                dab.forward(g, store, h, datasets, Some(identity), true)?
            } else {
                dab.forward_deferred(g, store, h, datasets, true)?
            };
        }
        Ok(h)
    }
}
