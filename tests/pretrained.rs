//! `--pretrained`: an ImageNet ResNet in torchvision's `state_dict` names (written here by the
//! test, with the names enumerated independently of the model) fills every DSBN slice; the
//! classifier is ignored; a missing, unexpected or mis-shaped tensor is an error naming it.

use cdcl::autograd::ParamStore;
use cdcl::backend::{Backend, BnTables, CpuBackend};
use cdcl::checkpoint::{Checkpoint, NamedTensor};
use cdcl::nn::pretrained::{load_pretrained, load_pretrained_from};
use cdcl::nn::{Depth, ModelConfig, PspNet};
use cdcl::Error;
use fixtures::{torchvision_basic, torchvision_bottleneck};

mod fixtures;

#[test]
fn a_torchvision_resnet50_loads_into_the_bottleneck_backbone() {
    let mut store = ParamStore::new(CpuBackend::new());
    let cfg = ModelConfig { depth: Depth::R50, width: 1.0 / 16.0, num_bn: 2, ..ModelConfig::resnet18(vec![3, 4]) };
    PspNet::new(cfg, &mut store).unwrap();
    let report =
        load_pretrained_from(&mut store, &torchvision_bottleneck([3, 4, 6, 3], 16), "r50.safetensors").unwrap();
    // 1 stem + 16 blocks × 3 + 4 projections.
    assert_eq!((report.convolutions, report.batch_norms, report.slices), (53, 53, 2));
}

fn model(deep_stem: bool, datasets: usize) -> (CpuBackend, ParamStore<CpuBackend>) {
    let be = CpuBackend::new();
    let mut store = ParamStore::new(be);
    let cfg = ModelConfig {
        depth: Depth::R18,
        width: 1.0 / 16.0,
        deep_stem,
        num_bn: datasets,
        ..ModelConfig::resnet18(vec![5; datasets])
    };
    PspNet::new(cfg, &mut store).unwrap();
    (be, store)
}

fn snapshot(be: &CpuBackend, store: &ParamStore<CpuBackend>) -> Vec<Vec<f32>> {
    let mut out: Vec<Vec<f32>> = store.weights().iter().map(|w| be.to_f32(&w.value).unwrap()).collect();
    for l in store.bn_layers() {
        out.extend(l.tables.tables().iter().map(|t| be.to_f32(t).unwrap()));
    }
    out
}

#[test]
fn a_torchvision_resnet_fills_every_dsbn_slice_and_ignores_fc() {
    let (be, mut store) = model(false, 3);
    let ck = torchvision_basic([2, 2, 2, 2], 16, false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("resnet18.safetensors");
    ck.save(&path).unwrap();
    let heads_before: Vec<Vec<f32>> = store
        .weights()
        .iter()
        .filter(|w| !w.name.starts_with("layer") && !w.name.starts_with("conv"))
        .map(|w| be.to_f32(&w.value).unwrap())
        .collect();
    let report = load_pretrained(&mut store, &path).unwrap();
    assert_eq!((report.convolutions, report.batch_norms, report.slices), (20, 20, 3));
    assert_eq!(report.ignored, ["fc.bias", "fc.weight"]);
    assert_eq!(report.tensors_read, ck.tensors.len() - 2);
    assert!(report.to_string().contains("20 convolutions"), "{report}");
    // Convolutions: PyTorch [K, C, R, S] element (k, c, r, s) is our KRSC element (k, r, s, c).
    let w = store.weights().iter().find(|w| w.name == "layer2.0.conv1.weight").unwrap();
    let ours = be.to_f32(&w.value).unwrap();
    let theirs = ck.get("layer2.0.conv1.weight").unwrap().as_f32().unwrap();
    let (k, c, r) = (8, 4, 3);
    for (ki, ci, ri, si) in [(0, 0, 0, 0), (7, 3, 2, 1), (3, 1, 0, 2)] {
        assert_eq!(ours[((ki * r + ri) * r + si) * c + ci], theirs[((ki * c + ci) * r + ri) * r + si]);
    }
    assert_eq!(ours.len(), k * c * r * r);
    // Every BatchNorm in every dataset slice.
    for l in store.bn_layers().iter().filter(|l| l.name.starts_with("layer") || l.name == "bn1") {
        let tables = l.tables.tables();
        for (t, f) in tables.iter().zip(["weight", "bias", "running_mean", "running_var"]) {
            let file = ck.get(&format!("{}.{f}", l.name)).unwrap().as_f32().unwrap();
            let all = be.to_f32(t).unwrap();
            for d in 0..3 {
                assert_eq!(&all[d * l.channels..(d + 1) * l.channels], file, "{} {f} slice {d}", l.name);
            }
        }
        assert_eq!(l.batches_tracked, [12345; 3]);
    }
    // The heads keep their initialisation.
    let heads_after: Vec<Vec<f32>> = store
        .weights()
        .iter()
        .filter(|w| !w.name.starts_with("layer") && !w.name.starts_with("conv"))
        .map(|w| be.to_f32(&w.value).unwrap())
        .collect();
    assert_eq!(heads_before, heads_after);
}

#[test]
fn the_deep_stem_loads_the_pspnet_reference_names() {
    let (_, mut store) = model(true, 2);
    let report =
        load_pretrained_from(&mut store, &torchvision_basic([2, 2, 2, 2], 16, true), "deep.safetensors").unwrap();
    // 3 stem + 16 block convolutions + 4 projections (layer1 too: the deep stem is 128 wide).
    assert_eq!((report.convolutions, report.batch_norms, report.slices), (23, 23, 2));
}

fn expect_error(ck: &Checkpoint, needle: &str) {
    let (be, mut store) = model(false, 2);
    let before = snapshot(&be, &store);
    match load_pretrained_from(&mut store, ck, "bad.safetensors") {
        Err(Error::Checkpoint { path, message }) => {
            assert_eq!(path, "bad.safetensors");
            assert!(message.contains(needle), "{message:?} does not name {needle:?}");
        }
        other => panic!("expected an error naming {needle}, got {other:?}"),
    }
    assert!(snapshot(&be, &store) == before, "a failed load changed the model");
}

#[test]
fn a_missing_unexpected_or_misshaped_tensor_is_an_error_naming_it() {
    let good = torchvision_basic([2, 2, 2, 2], 16, false);
    let mut missing = good.clone();
    missing.tensors.retain(|t| t.name != "layer3.1.bn2.running_var");
    expect_error(&missing, "layer3.1.bn2.running_var");
    let mut extra = good.clone();
    extra.push(NamedTensor::f32("layer1.0.conv3.weight", vec![4, 4, 1, 1], vec![0.0; 16]));
    expect_error(&extra, "layer1.0.conv3.weight");
    // ResNet-34's file into ResNet-18: its third block of layer1 is unexpected.
    expect_error(&torchvision_basic([3, 4, 6, 3], 16, false), "layer1.2.");
    // Full width into the 1/16 model.
    expect_error(&torchvision_basic([2, 2, 2, 2], 1, false), "conv1.weight");
    let mut misshaped = good.clone();
    let t = misshaped.tensors.iter_mut().find(|t| t.name == "layer4.0.downsample.1.bias").unwrap();
    t.shape = vec![31];
    t.data = cdcl::checkpoint::TensorData::F32(vec![0.0; 31]);
    expect_error(&misshaped, "layer4.0.downsample.1.bias");
}
