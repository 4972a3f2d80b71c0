//! Per-dataset SyncBN in the graph: the group a step's normalisations synchronise over, the
//! pyramid pooling module as its unfused chain, and the collective handed to the backend.

use super::{BnId, Datasets, Graph, ParamStore, Var, WeightId};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::ops::conv::ConvGeometry;
use crate::ops::ppm::PpmOptions;

impl<B: Backend> Graph<B> {
    /// Per-dataset synchronised BatchNorm over `comm`'s group (`None`: statistics of this
    /// process's batch only). With it every training normalisation — standalone DSBN, block,
    /// pyramid pooling branch — runs as a convolution followed by
    /// [`Backend::dsbn_forward_train_synced`] (the unfused chain: the fused block takes its
    /// statistics inside one op, with no point between the statistics and the normalisation at
    /// which a collective could run), and no block defers its normalisation. Every rank must
    /// then build the same sequence of normalisations; set before the first op.
    pub fn set_bn_sync(&mut self, comm: Option<std::sync::Arc<dyn crate::dist::Communicator>>) -> Result<()> {
        if !self.values.is_empty() {
            return Err(Error::InvalidArgument(
                "BatchNorm synchronisation is chosen before the graph's first op".into(),
            ));
        }
        self.bn_sync = comm;
        Ok(())
    }

    /// Whether training normalisations use the statistics of a data-parallel group.
    pub fn bn_synced(&self) -> bool {
        self.bn_sync.is_some() && self.training
    }

    /// The pyramid pooling module as the chain of graph ops the fused one computes (pooling, the
    /// branch's 1×1 convolution and DSBN, upsampling, concatenation), for SyncBN. Branch order
    /// does not matter to the result (each has its own DSBN layer); every rank uses bin order.
    pub(super) fn ppm_unfused(
        &mut self,
        store: &mut ParamStore<B>,
        x: Var,
        datasets: Datasets,
        branches: &[(WeightId, BnId)],
        opts: &PpmOptions,
    ) -> Result<Var> {
        let [_, h, w, _] = super::nhwc(&self.values[x.0], "PPM input")?;
        if opts.bins.is_empty() || branches.len() != opts.bins.len() {
            return Err(Error::InvalidArgument(format!(
                "{} PPM branches for {} bins: one branch per bin, at least one",
                branches.len(),
                opts.bins.len()
            )));
        }
        let one = ConvGeometry { stride: (1, 1), padding: (0, 0), dilation: (1, 1) };
        let mut parts = vec![x];
        for (&(wid, bid), &bin) in branches.iter().zip(&opts.bins) {
            let pooled = self.adaptive_avg_pool(x, bin, bin)?;
            let c = self.conv2d(store, pooled, wid, None, one)?;
            let y = self.dsbn(store, c, datasets, bid, None, opts.dsbn)?;
            parts.push(self.resize_bilinear(y, h, w, opts.align_corners)?);
        }
        self.concat_channels(&parts)
    }
}

/// The collective of a synchronised DSBN op: the backend's f32 buffer summed over the group
/// through host memory (a few `[D, C]` tables per layer).
pub(crate) fn host_all_reduce<'a, B: Backend>(
    backend: &'a B,
    comm: &'a dyn crate::dist::Communicator,
) -> impl FnMut(&mut B::Tensor) -> Result<()> + 'a {
    move |t: &mut B::Tensor| {
        let mut host = backend.to_f32(t)?;
        comm.all_reduce_sum(&mut host)?;
        backend.write_f32(t, &host)
    }
}
