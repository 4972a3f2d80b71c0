//! Checkpoints that know their model: the configuration and datasets in the metadata rebuild
//! the network; another depth, width or dataset set, or an unexpected tensor, is an error naming
//! the first mismatch; a path that cannot be written is found before training.

use cdcl::backend::CpuBackend;
use cdcl::checkpoint::{Checkpoint, NamedTensor};
use cdcl::nn::{Depth, ModelConfig};
use cdcl::train::{DatasetMeta, ModelMeta, TrainConfig, Trainer, MODEL_KEY};
use cdcl::Error;

fn cfg(depth: Depth, width: f32, classes: Vec<usize>) -> ModelConfig {
    ModelConfig { depth, width, seed: 3, ..ModelConfig::resnet18(classes) }
}

fn trainer(model: ModelConfig) -> Trainer<CpuBackend> {
    Trainer::new(&CpuBackend::new(), model, TrainConfig::default()).unwrap()
}

fn datasets() -> Vec<DatasetMeta> {
    vec![
        DatasetMeta { name: "cityscapes".into(), class_names: (0..4).map(|c| format!("c{c}")).collect() },
        DatasetMeta { name: "camvid".into(), class_names: vec!["sky".into(), "road".into(), "car".into()] },
    ]
}

fn checkpoint_message(e: Error) -> (String, String) {
    match e {
        Error::Checkpoint { path, message } => (path, message),
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    }
}

#[test]
fn the_metadata_rebuilds_the_model_exactly() {
    let model = ModelConfig { deep_stem: true, dropout: 0.3, bins: vec![1, 3], ..cfg(Depth::R34, 0.07, vec![4, 3]) };
    let t = trainer(model.clone());
    let ck = t.checkpoint_with(&datasets()).unwrap();
    let meta = ModelMeta::of(&ck).unwrap();
    assert_eq!(meta.model, model, "width {} and dropout {} must come back bit for bit", model.width, model.dropout);
    assert_eq!(meta.datasets, datasets());
    assert_eq!(meta.precision, "f32");
    assert_eq!(meta.dataset_index("camvid"), Some(1));
    // Through a file, a trainer built from the metadata alone takes every tensor.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ck.safetensors");
    t.save_checkpoint_with(&path, &datasets()).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    let mut rebuilt = trainer(ModelMeta::of(&back).unwrap().model);
    rebuilt.load_checkpoint(&path).unwrap();
    assert_eq!(rebuilt.checkpoint().unwrap().tensors, t.checkpoint().unwrap().tensors);
    // Placeholder names without datasets.
    let plain = ModelMeta::of(&t.checkpoint().unwrap()).unwrap();
    assert_eq!(plain.datasets[1].name, "dataset1");
    assert_eq!(plain.datasets[1].class_names.len(), 3);
}

#[test]
fn another_depth_width_or_dataset_set_is_rejected_naming_the_first_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r34.safetensors");
    trainer(cfg(Depth::R34, 0.0625, vec![4, 3])).save_checkpoint_with(&path, &datasets()).unwrap();
    let (p, m) = checkpoint_message(trainer(cfg(Depth::R18, 0.0625, vec![4, 3])).load_checkpoint(&path).unwrap_err());
    assert!(p.ends_with("r34.safetensors"), "{p}");
    assert!(m.contains("ResNet depth: the checkpoint has 34, this run 18"), "{m}");
    let (_, m) = checkpoint_message(trainer(cfg(Depth::R34, 0.125, vec![4, 3])).load_checkpoint(&path).unwrap_err());
    assert!(m.contains("width: the checkpoint has 0.0625, this run 0.125"), "{m}");
    let (_, m) = checkpoint_message(trainer(cfg(Depth::R34, 0.0625, vec![4, 5])).load_checkpoint(&path).unwrap_err());
    assert!(m.contains("classes per head"), "{m}");
    // The datasets: names, count, classes.
    let ck = ModelMeta::new(&cfg(Depth::R34, 0.0625, vec![4, 3]), &datasets());
    let mut run = ck.clone();
    run.datasets[1].name = "bdd100k".into();
    assert!(ck
        .first_mismatch(&run)
        .unwrap()
        .contains("dataset 1: the checkpoint has \"camvid\", this run \"bdd100k\""));
    let mut run = ck.clone();
    run.datasets.pop();
    run.model.num_classes.pop();
    run.model.num_bn = 1;
    assert!(ck.first_mismatch(&run).unwrap().starts_with("datasets: the checkpoint has [\"cityscapes\", \"camvid\"]"));
    let mut run = ck.clone();
    run.datasets[1].class_names[2] = "truck".into();
    assert!(ck.first_mismatch(&run).unwrap().contains("class 2 of dataset 1 (camvid)"));
    assert_eq!(ck.first_mismatch(&ck.clone()), None);
    let mut other_seed = ck.clone();
    other_seed.model.seed = 99;
    assert_eq!(ck.first_mismatch(&other_seed), None, "the initialisation seed does not make another network");
}

#[test]
fn an_unexpected_or_missing_tensor_is_named_and_nothing_changes() {
    let model = cfg(Depth::R18, 0.0625, vec![4, 3]);
    let source = trainer(ModelConfig { seed: 11, ..model.clone() });
    let mut target = trainer(model);
    let before = target.checkpoint().unwrap();
    let mut ck = source.checkpoint().unwrap();
    ck.push(NamedTensor::f32("layer5.0.conv1.weight", vec![1], vec![0.0]));
    let (_, m) = checkpoint_message(target.restore(&ck).unwrap_err());
    assert!(m.contains("unexpected tensor \"layer5.0.conv1.weight\""), "{m}");
    let mut ck = source.checkpoint().unwrap();
    ck.tensors.retain(|t| t.name != "cls.4.1.bias");
    let (_, m) = checkpoint_message(target.restore(&ck).unwrap_err());
    assert!(m.contains("cls.4.1.bias"), "{m}");
    assert_eq!(target.checkpoint().unwrap(), before);
    // A file without the model description (an older version's) still loads when its tensors
    // are exactly the model's.
    let mut legacy = source.checkpoint().unwrap();
    legacy.metadata.remove(MODEL_KEY);
    target.restore(&legacy).unwrap();
    assert_eq!(target.checkpoint().unwrap().tensors, source.checkpoint().unwrap().tensors);
}

#[test]
fn an_unwritable_path_is_found_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let (p, m) =
        checkpoint_message(Checkpoint::check_writable(dir.path().join("missing-dir/ck.safetensors")).unwrap_err());
    assert!(p.contains("missing-dir/ck.safetensors") && m.contains("no such directory"), "{p}: {m}");
    let (_, m) = checkpoint_message(Checkpoint::check_writable(dir.path()).unwrap_err());
    assert!(m.contains("directory"), "{m}");
    let ok = dir.path().join("ck.safetensors");
    Checkpoint::check_writable(&ok).unwrap();
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "the probe left a file behind");
}
