//! safetensors checkpoints: bitwise round trips, deterministic bytes, typed errors, and (where
//! Python has `safetensors` and `numpy`) loading by the reference implementation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use cdcl::checkpoint::{Checkpoint, NamedTensor, TensorData};
use cdcl::Error;

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("cdcl-ckpt-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a PSPNet-DAB state dict looks like, with awkward values.
fn sample_checkpoint() -> Checkpoint {
    let mut c = Checkpoint::new();
    let conv: Vec<f32> = (0..2 * 3 * 3 * 3).map(|i| i as f32 * 0.25 - 3.0).collect();
    c.push(NamedTensor::f32("layer1.0.conv1.weight", vec![2, 3, 3, 3], conv));
    c.push(NamedTensor::f32(
        "layer1.0.bn1.bn.2.running_mean",
        vec![4],
        vec![
            f32::from_bits(0x7fc0_0001), // quiet NaN with a payload
            f32::from_bits(0xffa0_0000), // negative signalling-pattern NaN
            -0.0,
            f32::from_bits(1), // smallest subnormal
        ],
    ));
    c.push(NamedTensor::f32(
        "layer1.0.bn1.bn.2.running_var",
        vec![4],
        vec![f32::INFINITY, f32::NEG_INFINITY, 1e-30, 3.5],
    ));
    c.push(NamedTensor::i64("layer1.0.bn1.bn.2.num_batches_tracked", vec![], vec![1234567890123]));
    c.push(NamedTensor::i64("extremes", vec![2], vec![i64::MIN, i64::MAX]));
    c.push(NamedTensor::f32("scalar", vec![], vec![std::f32::consts::PI]));
    c.push(NamedTensor::f32("empty", vec![0, 5], vec![]));
    c.push(NamedTensor::f32("head.dataset\"quoted\\name/ünï", vec![1, 1], vec![7.0]));
    c.metadata.insert("step".into(), "1000".into());
    c.metadata.insert("seed".into(), "42".into());
    c.metadata.insert("config".into(), "{\"lr\": 0.01,\n \"datasets\": [\"city\", \"dusk\"]}\t\u{1}".into());
    c
}

fn assert_bitwise_same(a: &Checkpoint, b: &Checkpoint) {
    let mut want = a.tensors.clone();
    want.sort_by(|x, y| x.name.cmp(&y.name));
    assert_eq!(want.len(), b.tensors.len());
    for (x, y) in want.iter().zip(&b.tensors) {
        assert_eq!(x.name, y.name);
        assert_eq!(x.shape, y.shape, "{}", x.name);
        assert!(x.data.bitwise_eq(&y.data), "{}: {:?} vs {:?}", x.name, x.data, y.data);
    }
    assert_eq!(a.metadata, b.metadata);
}

#[test]
fn round_trip_is_bitwise() {
    let dir = TempDir::new("rt");
    let path = dir.file("model.safetensors");
    let c = sample_checkpoint();
    c.save(&path).unwrap();
    let back = Checkpoint::load(&path).unwrap();
    assert_bitwise_same(&c, &back);
    // Tensors come back sorted by name, and the accessors check shape and dtype.
    let names: Vec<&str> = back.tensors.iter().map(|t| t.name.as_str()).collect();
    let mut sorted = names.clone();
    sorted.sort();
    assert_eq!(names, sorted);
    assert_eq!(back.i64("layer1.0.bn1.bn.2.num_batches_tracked", &[]).unwrap(), &[1234567890123]);
    assert_eq!(back.f32("scalar", &[]).unwrap(), &[std::f32::consts::PI]);
    assert_eq!(back.get("empty").unwrap().data, TensorData::F32(vec![]));
    assert!(back.get("missing").is_none());
    // No temporary file is left beside the checkpoint.
    let left: Vec<_> = std::fs::read_dir(&dir.0).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(left, vec![std::ffi::OsString::from("model.safetensors")]);
}

#[test]
fn empty_metadata_and_empty_checkpoints_round_trip() {
    let dir = TempDir::new("empty");
    let mut c = Checkpoint::new();
    c.push(NamedTensor::i64("n", vec![], vec![0]));
    c.save(dir.file("a.safetensors")).unwrap();
    let back = Checkpoint::load(dir.file("a.safetensors")).unwrap();
    assert_bitwise_same(&c, &back);
    assert!(back.metadata.is_empty());

    let nothing = Checkpoint::new();
    nothing.save(dir.file("b.safetensors")).unwrap();
    assert_eq!(Checkpoint::load(dir.file("b.safetensors")).unwrap(), nothing);

    let mut only_meta = Checkpoint::new();
    only_meta.metadata.insert("k".into(), String::new());
    only_meta.save(dir.file("c.safetensors")).unwrap();
    assert_eq!(Checkpoint::load(dir.file("c.safetensors")).unwrap(), only_meta);
}

#[test]
fn bytes_are_deterministic_and_the_crate_reads_them() {
    let c = sample_checkpoint();
    let bytes = c.to_bytes().unwrap();
    // Insertion order and repeated calls change nothing.
    let mut shuffled = c.clone();
    shuffled.tensors.reverse();
    assert_eq!(shuffled.to_bytes().unwrap(), bytes);
    assert_eq!(c.to_bytes().unwrap(), bytes);
    // Layout: 8-byte header length, header padded to 8 bytes, every tensor aligned to its
    // element size.
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (name, view) in st.tensors() {
        let offset = view.data().as_ptr() as usize - bytes.as_ptr() as usize - 8 - n;
        let size = if view.dtype() == safetensors::Dtype::I64 { 8 } else { 4 };
        assert_eq!(offset % size, 0, "{name} is misaligned");
    }
    assert_eq!(st.len(), c.tensors.len());
    assert_eq!(Checkpoint::from_bytes(&bytes).unwrap().metadata, c.metadata);
}

#[test]
fn files_written_by_the_safetensors_crate_load() {
    let data: Vec<u8> = [1.5f32, -2.0].iter().flat_map(|v| v.to_le_bytes()).collect();
    let idx: Vec<u8> = 9i64.to_le_bytes().to_vec();
    let views = vec![
        ("w".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2], &data).unwrap()),
        ("n".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![], &idx).unwrap()),
    ];
    let meta = std::collections::HashMap::from([("a".to_string(), "b".to_string())]);
    let bytes = safetensors::serialize(views, Some(meta)).unwrap();
    let c = Checkpoint::from_bytes(&bytes).unwrap();
    assert_eq!(c.f32("w", &[2]).unwrap(), &[1.5, -2.0]);
    assert_eq!(c.i64("n", &[]).unwrap(), &[9]);
    assert_eq!(c.metadata, BTreeMap::from([("a".to_string(), "b".to_string())]));
}

fn is_checkpoint_error(r: Result<Checkpoint, Error>, path_part: &str, message_part: &str) {
    match r {
        Err(Error::Checkpoint { path, message }) => {
            assert!(path.contains(path_part), "path {path:?}");
            assert!(message.contains(message_part), "message {message:?}");
        }
        other => panic!("expected Error::Checkpoint, got {other:?}"),
    }
}

#[test]
fn missing_truncated_and_corrupted_files_are_typed_errors() {
    let dir = TempDir::new("bad");
    is_checkpoint_error(Checkpoint::load(dir.file("nope.safetensors")), "nope.safetensors", "no such file");

    let good = sample_checkpoint().to_bytes().unwrap();
    let path = dir.file("bad.safetensors");
    let n = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    // Truncations anywhere: in the length, in the header, in the data.
    for cut in [0, 3, 8, 8 + n / 2, 8 + n, good.len() - 1] {
        std::fs::write(&path, &good[..cut]).unwrap();
        is_checkpoint_error(Checkpoint::load(&path), "bad.safetensors", "not a valid safetensors file");
    }
    // Trailing garbage.
    let mut longer = good.clone();
    longer.extend_from_slice(&[0; 4]);
    std::fs::write(&path, &longer).unwrap();
    is_checkpoint_error(Checkpoint::load(&path), "bad.safetensors", "not a valid safetensors file");
    // A huge header length, a header that is not JSON, a header that is not UTF-8.
    let mut huge = good.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    let mut not_json = good.clone();
    not_json[8] = b'[';
    let mut not_utf8 = good.clone();
    not_utf8[9] = 0xff;
    for bytes in [huge, not_json, not_utf8] {
        std::fs::write(&path, &bytes).unwrap();
        is_checkpoint_error(Checkpoint::load(&path), "bad.safetensors", "not a valid safetensors file");
    }
    // Flipping any single header byte never panics: it either still parses or is a typed error.
    for i in 0..8 + n {
        let mut b = good.clone();
        b[i] ^= 0x5a;
        if let Err(e) = Checkpoint::from_bytes(&b) {
            assert!(matches!(e, Error::Checkpoint { .. }));
        }
    }
    // A dtype we do not read.
    let half = [0u8; 4];
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F16, vec![2], &half).unwrap();
    let f16 = safetensors::serialize([("h", view)], None).unwrap();
    is_checkpoint_error(Checkpoint::from_bytes(&f16), "(in memory)", "dtype F16");
    // A directory is not a file.
    is_checkpoint_error(Checkpoint::load(&dir.0), "cdcl-ckpt-bad", "cannot read");
}

#[test]
fn invalid_checkpoints_are_refused_before_anything_is_written() {
    let dir = TempDir::new("refuse");
    let path = dir.file("x.safetensors");
    let cases = [
        (vec![NamedTensor::f32("a", vec![2, 3], vec![0.0; 5])], "elements"),
        (vec![NamedTensor::f32("a", vec![1], vec![0.0]), NamedTensor::i64("a", vec![1], vec![0])], "two tensors"),
        (vec![NamedTensor::f32("", vec![1], vec![0.0])], "invalid tensor name"),
        (vec![NamedTensor::f32("__metadata__", vec![1], vec![0.0])], "invalid tensor name"),
        (vec![NamedTensor::f32("a", vec![usize::MAX, 2], vec![])], "elements"),
    ];
    for (tensors, msg) in cases {
        let c = Checkpoint { tensors, metadata: BTreeMap::new() };
        match c.save(&path) {
            Err(Error::Checkpoint { message, .. }) => assert!(message.contains(msg), "{message}"),
            other => panic!("expected Error::Checkpoint, got {other:?}"),
        }
        assert!(!path.exists());
    }
    // Saving into a directory that does not exist is a typed error too, and leaves nothing.
    let c = sample_checkpoint();
    assert!(matches!(c.save(dir.file("no/such/dir/x.safetensors")), Err(Error::Checkpoint { .. })));
    // Accessors report what is wrong.
    let c = sample_checkpoint();
    assert!(matches!(c.f32("scalar", &[1]), Err(Error::Checkpoint { .. })));
    assert!(matches!(c.i64("scalar", &[]), Err(Error::Checkpoint { .. })));
    assert!(matches!(c.f32("nope", &[]), Err(Error::Checkpoint { .. })));
}

#[test]
fn saving_over_an_existing_checkpoint_replaces_it() {
    let dir = TempDir::new("over");
    let path = dir.file("m.safetensors");
    let mut c = sample_checkpoint();
    c.save(&path).unwrap();
    c.metadata.insert("step".into(), "2000".into());
    c.tensors.truncate(2);
    c.save(&path).unwrap();
    assert_bitwise_same(&c, &Checkpoint::load(&path).unwrap());
}

const PYTHON_CHECK: &str = r#"
import sys, numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file
path = sys.argv[1]
t = load_file(path)
assert sorted(t) == sorted([
    "layer1.0.conv1.weight", "layer1.0.bn1.bn.2.running_mean", "layer1.0.bn1.bn.2.running_var",
    "layer1.0.bn1.bn.2.num_batches_tracked", "extremes", "scalar", "empty", 'head.dataset"quoted\\name/ünï',
]), sorted(t)
w = t["layer1.0.conv1.weight"]
assert w.dtype == np.float32 and w.shape == (2, 3, 3, 3)
assert np.array_equal(w.reshape(-1), np.arange(54, dtype=np.float32) * np.float32(0.25) - np.float32(3.0))
m = t["layer1.0.bn1.bn.2.running_mean"]
assert [int(x) for x in m.view(np.uint32)] == [0x7fc00001, 0xffa00000, 0x80000000, 1], m.view(np.uint32)
n = t["layer1.0.bn1.bn.2.num_batches_tracked"]
assert n.dtype == np.int64 and n.shape == () and int(n) == 1234567890123
e = t["extremes"]
assert e.dtype == np.int64 and list(e) == [-2**63, 2**63 - 1]
s = t["scalar"]
assert s.shape == () and s.dtype == np.float32 and float(s) == float(np.float32(3.14159265358979))
assert t["empty"].shape == (0, 5)
assert t['head.dataset"quoted\\name/ünï'].shape == (1, 1)
with safe_open(path, framework="np") as f:
    meta = f.metadata()
assert meta == {"step": "1000", "seed": "42",
                "config": '{"lr": 0.01,\n "datasets": ["city", "dusk"]}\t\x01'}, meta
print("python safetensors: ok")
"#;

#[test]
fn python_safetensors_reads_our_files() {
    let probe = Command::new("python3").args(["-c", "import safetensors, numpy"]).output();
    if !matches!(&probe, Ok(o) if o.status.success()) {
        eprintln!("skipped: python3 with safetensors and numpy is not available");
        return;
    }
    let dir = TempDir::new("py");
    let path = dir.file("model.safetensors");
    sample_checkpoint().save(&path).unwrap();
    let out = Command::new("python3").args(["-c", PYTHON_CHECK]).arg(&path).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "python check failed:\n{text}");
    assert!(text.contains("python safetensors: ok"), "{text}");
}
