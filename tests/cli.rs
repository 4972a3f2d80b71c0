//! The `cdcl` command on real-data layouts written by the test: training with `--data`
//! (periodic checkpoints, log, evaluation), resume that rebuilds the network from the
//! checkpoint, runs that refuse bad input or an unwritable checkpoint before training, and
//! `cdcl eval`, the training modes, and `cdcl recalibrate`. Tiny images and a 1/16-width model
//! keep each run to seconds.

mod fixtures;

use std::path::Path;
use std::process::{Command, Output};

use cdcl::checkpoint::Checkpoint;
use cdcl::train::ModelMeta;
use fixtures::*;

fn cdcl(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cdcl")).args(args).output().expect("the cdcl binary runs")
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn ok(args: &[&str]) -> String {
    let o = cdcl(args);
    assert!(o.status.success(), "cdcl {} failed:\n{}", args.join(" "), text(&o));
    text(&o)
}

fn fails(args: &[&str]) -> String {
    let o = cdcl(args);
    assert!(!o.status.success(), "cdcl {} should fail:\n{}", args.join(" "), text(&o));
    text(&o)
}

/// Cityscapes (train 4, val 2) and CamVid (train 4, val 2), 40×28 images.
fn data(root: &Path) -> (String, String) {
    let cs = root.join("cityscapes");
    cityscapes(&cs, "train", &["aachen", "bremen"], 2, 40, 28, &[7, 8, 26, 23, 0]);
    cityscapes(&cs, "val", &["lindau"], 2, 40, 28, &[7, 8, 26, 23]);
    let cv = root.join("camvid");
    camvid(&cv, "train", 4, 40, 28, &[0, 3, 8, 11]);
    camvid(&cv, "val", 2, 40, 28, &[0, 3, 8]);
    (format!("cityscapes={}", cs.display()), format!("camvid={}", cv.display()))
}

const TINY: [&str; 12] = [
    "--width",
    "0.0625",
    "--crop",
    "32",
    "--batch",
    "2",
    "--workers",
    "2",
    "--device",
    "cpu",
    "--scale-range",
    "0.75,1.25",
];

#[test]
fn trains_on_two_datasets_on_disk_logs_checkpoints_and_evaluates() {
    let dir = tempfile::tempdir().unwrap();
    let (cs, cv) = data(dir.path());
    let ck = dir.path().join("run/ck.safetensors");
    std::fs::create_dir_all(ck.parent().unwrap()).unwrap();
    let log = dir.path().join("log");
    let (ck_s, log_s) = (ck.display().to_string(), log.display().to_string());
    let mut args = vec!["train", "--data", &cs, "--data", &cv, "--iters", "3", "--save-every", "2"];
    args.extend(["--checkpoint", &ck_s, "--log-dir", &log_s]);
    args.extend(TINY);
    let out = ok(&args);
    assert!(out.contains("checked 12 images"), "{out}");
    assert!(out.contains("cityscapes (val, 2 images; head cityscapes, BN slice cityscapes)"), "{out}");
    assert!(out.contains("camvid (val, 2 images; head camvid, BN slice camvid)"), "{out}");
    assert!(out.contains("left out of mIoU"), "classes absent from the tiny split are named:\n{out}");
    // The checkpoint describes its network and datasets.
    let meta = ModelMeta::of(&Checkpoint::load(&ck).unwrap()).unwrap();
    assert_eq!(meta.datasets.iter().map(|d| d.name.as_str()).collect::<Vec<_>>(), ["cityscapes", "camvid"]);
    assert_eq!(meta.model.num_classes, [19, 11]);
    assert_eq!(meta.datasets[1].class_names[4], "pavement");
    // The log: an iteration line per step with both datasets' losses, the evaluations, a chart.
    let lines: Vec<serde_json::Value> = std::fs::read_to_string(log.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let train: Vec<_> = lines.iter().filter(|v| v["kind"] == "train").collect();
    assert_eq!(train.iter().map(|v| v["iter"].as_u64().unwrap()).collect::<Vec<_>>(), [0, 1, 2]);
    assert!(train[0]["datasets"]["camvid"]["aux_loss"].as_f64().unwrap() > 0.0);
    assert!(train[2]["images_per_s"].as_f64().unwrap() > 0.0);
    let evals: Vec<_> = lines.iter().filter(|v| v["kind"] == "eval").collect();
    assert_eq!(evals.len(), 2);
    assert_eq!(evals[1]["dataset"], "camvid");
    assert_eq!(evals[1]["classes"].as_array().unwrap().len(), 11);
    let svg = std::fs::read_to_string(log.join("loss.svg")).unwrap();
    assert!(svg.contains("cityscapes loss") && svg.contains("camvid aux loss"));

    // Resume without the model flags: the network comes from the checkpoint (width 1/16 and
    // not the default 0.25), and the log continues.
    let mut args = vec!["train", "--data", &cs, "--data", &cv, "--iters", "4", "--resume", &ck_s];
    args.extend(["--checkpoint", &ck_s, "--log-dir", &log_s, "--crop", "32", "--batch", "2", "--device", "cpu"]);
    let out = ok(&args);
    assert!(out.contains("resumed from") && out.contains("at iteration 3"), "{out}");
    let ck2 = Checkpoint::load(&ck).unwrap();
    assert_eq!(ck2.metadata["iteration"], "4");
    let log_text = std::fs::read_to_string(log.join("metrics.jsonl")).unwrap();
    assert_eq!(log_text.lines().filter(|l| l.contains("\"kind\":\"train\"")).count(), 4);

    // Another depth given explicitly, or another dataset set: refused, the mismatch named.
    let out = fails(&[
        "train", "--data", &cs, "--data", &cv, "--iters", "5", "--resume", &ck_s, "--depth", "34", "--crop", "32",
    ]);
    assert!(out.contains("ResNet depth: the checkpoint has 18, this run 34"), "{out}");
    let out = fails(&["train", "--data", &cs, "--iters", "5", "--resume", &ck_s, "--crop", "32"]);
    assert!(
        out.contains("datasets: the checkpoint has [\"cityscapes\", \"camvid\"], this run [\"cityscapes\"]"),
        "{out}"
    );

    // cdcl eval rebuilds the network from the file: sliding window, scales and flips, the
    // tables, JSON and CSV, colourised predictions in the dataset's palette.
    let (out_dir, pred_dir) = (dir.path().join("eval"), dir.path().join("pred"));
    let (o, p) = (out_dir.display().to_string(), pred_dir.display().to_string());
    let out = ok(&[
        "eval",
        "--checkpoint",
        &ck_s,
        "--data",
        &cs,
        "--data",
        &cv,
        "--mode",
        "slide",
        "--crop",
        "24x32",
        "--stride",
        "16x20",
        "--scales",
        "0.75,1",
        "--flip",
        "--out",
        &o,
        "--save-predictions",
        &p,
        "--device",
        "cpu",
        "--workers",
        "2",
    ]);
    assert!(out.contains("sliding 24×32 windows every 16×20") && out.contains("mIoU"), "{out}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(json["datasets"][0]["dataset"], "cityscapes");
    assert_eq!(json["datasets"][1]["images"], 2);
    let csv = std::fs::read_to_string(out_dir.join("eval.csv")).unwrap();
    assert!(csv.starts_with("dataset,split,head,bn,class,iou"));
    assert_eq!(csv.lines().filter(|l| l.starts_with("camvid,")).count(), 11 + 3);
    let pred = cdcl::data::image::decode_image(&pred_dir.join("cityscapes/lindau_000000_000019.png")).unwrap();
    assert_eq!((pred.width, pred.height), (40, 28));
    let palette = cdcl::data::labels::cityscapes_palette();
    assert!(pred.data.chunks(3).all(|px| palette.contains(&[px[0], px[1], px[2]])));

    // KITTI, which the model never saw: needs a head and a BN slice.
    let kt = dir.path().join("kitti");
    kitti(&kt, 2, 40, 28, &[7, 26, 0]);
    let kd = format!("kitti={}", kt.display());
    let out = fails(&["eval", "--checkpoint", &ck_s, "--data", &kd, "--out", &o, "--device", "cpu"]);
    assert!(out.contains("choose --head and --bn"), "{out}");
    let out = ok(&[
        "eval",
        "--checkpoint",
        &ck_s,
        "--data",
        &kd,
        "--head",
        "cityscapes",
        "--bn",
        "camvid",
        "--out",
        &o,
        "--device",
        "cpu",
    ]);
    assert!(out.contains("kitti (val, 2 images; head cityscapes, BN slice camvid)"), "{out}");
}

#[test]
fn bad_data_or_an_unwritable_checkpoint_stop_the_run_before_it_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (cs, cv) = data(dir.path());
    let ck = dir.path().join("ck.safetensors");
    let ck_s = ck.display().to_string();
    // A truncated validation image: found before the first iteration, named, nothing written.
    let bad = dir.path().join("camvid/val/0001TP_006720.png");
    let bytes = std::fs::read(&bad).unwrap();
    std::fs::write(&bad, &bytes[..bytes.len() / 2]).unwrap();
    let mut args = vec!["train", "--data", &cs, "--data", &cv, "--iters", "100000", "--checkpoint", &ck_s];
    args.extend(TINY);
    let out = fails(&args);
    assert!(out.contains("0001TP_006720.png") && out.contains("PNG"), "{out}");
    assert!(!ck.exists() && !out.contains("cdcl train:"), "it started:\n{out}");
    std::fs::write(&bad, &bytes).unwrap();
    // A label outside CamVid's classes.
    let lab = dir.path().join("camvid/trainannot/0001TP_006750.png");
    png_gray(&lab, 40, 28, &labels(40, 28, &[3, 40]));
    let out = fails(&args);
    assert!(out.contains("0001TP_006750.png") && out.contains("label value 40"), "{out}");
    png_gray(&lab, 40, 28, &labels(40, 28, &[3]));
    // A missing dataset folder.
    let missing = format!("bdd100k={}", dir.path().join("nowhere").display());
    let out = fails(&["train", "--data", &missing, "--iters", "100000", "--device", "cpu"]);
    assert!(out.contains("nowhere/images/10k/train: no such directory"), "{out}");
    // An unwritable checkpoint path, synthetic and real data: an error at once (a run of
    // 100000 iterations would not end within the test otherwise).
    let nowhere = dir.path().join("missing-dir/ck.safetensors").display().to_string();
    let out = fails(&["train", "--iters", "100000", "--checkpoint", &nowhere, "--device", "cpu"]);
    assert!(out.contains("missing-dir/ck.safetensors") && out.contains("no such directory"), "{out}");
    let mut args = vec!["train", "--data", &cs, "--iters", "100000", "--checkpoint", &nowhere];
    args.extend(TINY);
    let out = fails(&args);
    assert!(out.contains("missing-dir/ck.safetensors"), "{out}");
    // Real-data options without real data.
    let out = fails(&["train", "--crop", "64", "--iters", "1"]);
    assert!(out.contains("--crop applies to real data"), "{out}");
}

#[test]
fn synthetic_checkpoints_resume_as_their_own_network_and_evaluate() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("syn.safetensors").display().to_string();
    let common = ["--size", "32", "--batch", "2", "--eval-images", "2", "--device", "cpu", "--checkpoint", &ck];
    let log = dir.path().join("log").display().to_string();
    let mut args = vec!["train", "--depth", "34", "--width", "0.0625", "--iters", "1", "--log-dir", &log];
    args.extend(common);
    ok(&args);
    let metrics = std::fs::read_to_string(dir.path().join("log/metrics.jsonl")).unwrap();
    assert!(metrics.contains("\"kind\":\"train\"") && metrics.contains("\"dataset\":\"dusk\""), "{metrics}");
    // Resumed with the default depth (18) and width (0.25): the checkpoint's ResNet-34 at 1/16.
    let mut args = vec!["train", "--iters", "2", "--resume", &ck];
    args.extend(common);
    let out = ok(&args);
    assert!(out.contains("at iteration 1") && out.contains("PSPNet-ResNet34 width 0.0625"), "{out}");
    let meta = ModelMeta::of(&Checkpoint::load(&ck).unwrap()).unwrap();
    assert_eq!((meta.model.depth, meta.model.width), (cdcl::nn::Depth::R34, 0.0625));
    assert_eq!(meta.datasets[1].name, "dusk");
    let out_dir = dir.path().join("eval").display().to_string();
    let out = ok(&["eval", "--checkpoint", &ck, "--size", "32", "--images", "2", "--out", &out_dir, "--device", "cpu"]);
    assert!(out.contains("city (val, 2 images") && out.contains("dusk (val, 2 images"), "{out}");
}

#[test]
fn pretrained_backbones_load_and_report_what_they_read() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("resnet18.safetensors");
    torchvision_basic([2, 2, 2, 2], 16, false).save(&file).unwrap();
    let (f, ck) = (file.display().to_string(), dir.path().join("ck.safetensors").display().to_string());
    let base = ["train", "--iters", "1", "--size", "32", "--batch", "2", "--eval-images", "1", "--device", "cpu"];
    let mut args = base.to_vec();
    args.extend(["--width", "0.0625", "--pretrained", &f, "--checkpoint", &ck]);
    let out = ok(&args);
    assert!(out.contains("20 convolutions, 20 BatchNorms each copied into 2 dataset slice(s)"), "{out}");
    assert!(out.contains("ignored fc.bias, fc.weight"), "{out}");
    // The default width does not match the file: the first tensor is named, before training.
    let mut args = base.to_vec();
    args.extend(["--pretrained", &f, "--checkpoint", &ck]);
    let out = fails(&args);
    assert!(out.contains("tensor \"conv1.weight\" has shape [4, 3, 7, 7], this backbone needs [16, 3, 7, 7]"), "{out}");
}

/// The baselines from the command line: each run evaluates what its mode defines and says what
/// that means; flags of other modes are refused.
#[test]
fn modes_evaluate_what_they_define() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("m.safetensors").display().to_string();
    let common = [
        "--size",
        "32",
        "--width",
        "0.0625",
        "--batch",
        "2",
        "--eval-images",
        "2",
        "--device",
        "cpu",
        "--checkpoint",
        &ck,
    ];
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--iters", "4"];
        args.extend(extra);
        args.extend(common);
        ok(&args)
    };
    let out = run(&["--mode", "single", "--dataset", "dusk"]);
    assert!(out.contains("held-out  dusk") && !out.contains("held-out  city"), "single evaluates only dusk:\n{out}");
    assert!(out.contains("a network trained on dusk alone"), "{out}");
    let meta = ModelMeta::of(&Checkpoint::load(&ck).unwrap()).unwrap();
    assert_eq!((meta.model.num_classes.clone(), meta.datasets[0].name.as_str()), (vec![5], "dusk"));
    let out = run(&["--mode", "two-stage", "--source", "city", "--target", "1", "--freeze-conv"]);
    assert!(out.contains("held-out  dusk") && !out.contains("held-out  city") && out.contains("frozen"), "{out}");
    let out = run(&["--mode", "label-remap", "--target", "city"]);
    assert!(out.contains("held-out  city (8 classes)") && out.contains("in city's classes"), "{out}");
    let out = run(&["--mode", "separate-conv", "--interval", "dusk:2"]);
    assert!(out.contains("held-out  city") && out.contains("held-out  dusk"), "{out}");
    let out = run(&["--mode", "shared-bn", "--no-dat"]);
    assert!(out.contains("stepped in turn"), "{out}");
    // A flag of another mode, a dataset the run lacks.
    let mut args = vec!["train", "--mode", "dat", "--freeze-conv"];
    args.extend(common);
    assert!(fails(&args).contains("--freeze-conv does not apply"));
    let mut args = vec!["train", "--mode", "single", "--dataset", "fog"];
    args.extend(common);
    assert!(fails(&args).contains("not a dataset of this run"));
}

/// Precise BN from the command line: a new checkpoint whose only changes are the slice's
/// running statistics.
#[test]
fn recalibrate_writes_a_checkpoint_with_new_running_statistics_only() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("a.safetensors").display().to_string();
    let out_ck = dir.path().join("b.safetensors").display().to_string();
    ok(&[
        "train",
        "--iters",
        "2",
        "--size",
        "32",
        "--width",
        "0.0625",
        "--batch",
        "2",
        "--eval-images",
        "0",
        "--device",
        "cpu",
        "--checkpoint",
        &ck,
    ]);
    let out = ok(&[
        "recalibrate",
        "--checkpoint",
        &ck,
        "--out",
        &out_ck,
        "--bn-slice",
        "city",
        "--synthetic",
        "fog",
        "--size",
        "32",
        "--images",
        "6",
        "--device",
        "cpu",
    ]);
    assert!(out.contains("recalibrated BN slice 0 (city)") && out.contains("6 images in 2 batches"), "{out}");
    let (a, b) = (Checkpoint::load(&ck).unwrap(), Checkpoint::load(&out_ck).unwrap());
    assert_eq!(a.tensors.len(), b.tensors.len());
    let mut moved = 0;
    for (x, y) in a.tensors.iter().zip(&b.tensors) {
        assert_eq!(x.name, y.name);
        let stat = x.name.contains(".bn.0.running_");
        if x.data != y.data {
            assert!(stat, "{} changed", x.name);
            moved += 1;
        }
    }
    assert!(moved > 20, "only {moved} statistics moved");
    assert!(b.metadata["precise_bn"].contains("synthetic fog"));
    assert!(fails(&["recalibrate", "--checkpoint", &ck, "--out", &out_ck, "--bn-slice", "fog", "--synthetic", "fog"])
        .contains("not a dataset"));
}

#[test]
fn usss_flags_train_semi_supervised_or_refuse_bad_values() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("u.safetensors").display().to_string();
    let common = ["--size", "32", "--width", "0.0625", "--eval-images", "0", "--device", "cpu", "--checkpoint", &ck];
    let run = |extra: &[&str], good: bool| {
        let mut args = vec!["train", "--iters", "3"];
        args.extend(extra);
        args.extend(common);
        if good {
            ok(&args)
        } else {
            fails(&args)
        }
    };
    let out = run(&["--batch", "4", "--unlabeled-fraction", "0.5", "--alpha", "0.5", "--beta", "1"], true);
    assert!(out.contains("usss: unlabelled entropy within"), "{out}");
    for (bad, says) in [
        (&["--alpha", "1"][..], "--unlabeled-fraction"),
        (&["--unlabeled-fraction", "1.5", "--beta", "1"][..], "(0, 1)"),
        (&["--unlabeled-fraction", "0.1", "--beta", "1", "--batch", "4"][..], "at least one"),
        (&["--unlabeled-fraction", "0.5", "--alpha=-1"][..], "alpha"),
        (&["--unlabeled-fraction", "0.5", "--beta", "NaN"][..], "beta"),
        (&["--unlabeled-fraction", "0.5", "--beta", "1", "--usss-temperature", "0"][..], "temperature"),
        (&["--unlabeled-fraction", "0.5", "--beta", "1", "--prototype-momentum", "1"][..], "momentum"),
        (&["--unlabeled-fraction", "0.5", "--beta", "1", "--mode", "single", "--dataset", "city"][..], "USSS"),
        (&["--unlabeled", "city=/tmp", "--beta", "1"][..], "--unlabeled-fraction"),
    ] {
        let out = run(bad, false);
        assert!(out.contains("error: ") && out.contains(says), "{bad:?}:\n{out}");
    }
    // Real data: a folder of unlabelled images for one of the two datasets.
    let (cs, cv) = data(dir.path());
    let unl = dir.path().join("unlabeled");
    mkdir(&unl);
    for k in 0..3 {
        png_rgb(&unl.join(format!("frame{k}.png")), &rgb(40, 28, 50 + k));
    }
    let empty = dir.path().join("empty");
    mkdir(&empty);
    let real = |extra: &[&str], good: bool| {
        let mut args = vec!["train", "--data", &cs, "--data", &cv, "--iters", "3", "--eval-images", "0"];
        args.extend(["--checkpoint", &ck]);
        args.extend(TINY);
        args.extend(extra);
        if good {
            ok(&args)
        } else {
            fails(&args)
        }
    };
    let folder = format!("cityscapes={}", unl.display());
    let out = real(&["--unlabeled", &folder, "--alpha", "1", "--beta", "1"], true);
    assert!(out.contains("checked 11 images") && out.contains("usss: unlabelled entropy within"), "{out}");
    let nowhere = format!("kitti={}", unl.display());
    let no_images = format!("camvid={}", empty.display());
    for (bad, says) in [
        (&["--unlabeled-fraction", "0.5", "--beta", "1"][..], "--unlabeled-fraction"),
        (&["--beta", "1"][..], "--unlabeled NAME=PATH"),
        (&["--unlabeled", &nowhere, "--beta", "1"][..], "no --data dataset is named"),
        (&["--unlabeled", &no_images, "--beta", "1"][..], "no PNG or JPEG image"),
        (&["--unlabeled", &folder, "--unlabeled", &folder, "--beta", "1"][..], "twice"),
    ] {
        let out = real(bad, false);
        assert!(out.contains("error: ") && out.contains(says), "{bad:?}:\n{out}");
    }
}

#[test]
fn data_parallel_runs_write_from_rank_zero_and_resume_on_another_number_of_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("dp.safetensors").display().to_string();
    let log = dir.path().join("log").display().to_string();
    let common = ["--size", "32", "--batch", "2", "--width", "0.0625", "--eval-images", "2", "--device", "cpu"];
    let mut args = vec!["train", "--iters", "2", "--nproc-per-node", "2", "--checkpoint", &ck, "--log-dir", &log];
    args.extend(common);
    let out = ok(&args);
    assert!(out.contains("data-parallel: 2 ranks, per-dataset SyncBN"), "{out}");
    // One header, one report: rank 0 alone prints, logs and writes.
    assert_eq!(out.matches("cdcl train:").count(), 1, "{out}");
    assert_eq!(out.matches("held-out").count(), 2, "{out}");
    let metrics = std::fs::read_to_string(dir.path().join("log/metrics.jsonl")).unwrap();
    let once = |it: usize| metrics.lines().filter(|l| l.contains(&format!("\"iter\":{it},"))).count();
    assert!(once(0) >= 1 && once(0) == once(1), "{metrics}");
    // Resumed on three ranks (per-rank statistics), then on one process.
    let mut args = vec!["train", "--iters", "3", "--nproc-per-node", "3", "--no-sync-bn", "--resume", &ck];
    args.extend(["--checkpoint", &ck]);
    args.extend(common);
    let out = ok(&args);
    assert!(out.contains("at iteration 2") && out.contains("3 ranks, BatchNorm statistics per rank"), "{out}");
    let mut args = vec!["train", "--iters", "4", "--resume", &ck, "--checkpoint", &ck];
    args.extend(common);
    assert!(ok(&args).contains("at iteration 3"));
    let it = Checkpoint::load(&ck).unwrap().metadata.get("iteration").cloned();
    assert_eq!(it.as_deref(), Some("4"));
}

#[test]
fn launcher_ranks_need_a_gpu_and_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let ck = dir.path().join("x.safetensors").display().to_string();
    let args = ["train", "--iters", "1", "--size", "32", "--width", "0.0625", "--checkpoint", &ck];
    // A CPU rank launched as one process of a torchrun-style run: refused, typed, no panic.
    let o = Command::new(env!("CARGO_BIN_EXE_cdcl"))
        .args(args)
        .args(["--device", "cpu"])
        .envs([("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "1")])
        .output()
        .unwrap();
    let t = text(&o);
    assert!(!o.status.success() && t.contains("rank 1 of 2") && t.contains("--device cuda"), "{t}");
    assert!(!t.contains("panicked"), "{t}");
    // GPU ranks on a machine without a usable GPU: each child fails with a typed error, and
    // the launching process names the ranks that failed.
    let mut cuda = args.to_vec();
    cuda.extend(["--device", "cuda", "--nproc-per-node", "2"]);
    let t = fails(&cuda);
    assert!(t.contains("rank 0 exited") && t.contains("rank 1 exited") && !t.contains("panicked"), "{t}");
}
