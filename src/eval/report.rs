//! Per-dataset scores of an evaluation: the confusion matrix over the whole split, per-class
//! IoU and accuracy, mIoU, mean accuracy and pixel accuracy, as a table, JSON and CSV.
//!
//! mIoU follows the usual definition (Cityscapes' scripts, mmsegmentation): the mean of the
//! per-class IoUs over the classes whose union is not empty over the split, i.e. a class that
//! appears in neither the labels nor the predictions of any image is left out (its IoU is
//! undefined, not 0); the report names the classes left out. Pixels labelled 255 are not counted.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};

/// One class's scores.
#[derive(Debug, Clone, PartialEq)]
pub struct ClassScore {
    /// Its name.
    pub name: String,
    /// TP / (TP + FP + FN); `None` when the class is absent from labels and predictions.
    pub iou: Option<f64>,
    /// TP / (TP + FN); `None` when no pixel is labelled with the class.
    pub accuracy: Option<f64>,
    /// Pixels labelled with the class.
    pub label_pixels: u64,
    /// Pixels predicted as the class (among labelled pixels).
    pub predicted_pixels: u64,
}

/// One dataset's evaluation.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetReport {
    /// The evaluated dataset.
    pub dataset: String,
    /// Its split.
    pub split: String,
    /// The dataset whose head classified it.
    pub head: String,
    /// The dataset whose BN slice normalised it.
    pub bn: String,
    /// Images evaluated.
    pub images: usize,
    /// Class names (of the head).
    pub classes: Vec<String>,
    /// Row = label, column = prediction, `classes² ` counts.
    pub confusion: Vec<u64>,
}

impl DatasetReport {
    /// An empty report.
    pub fn new(dataset: &str, split: &str, head: &str, bn: &str, classes: Vec<String>) -> Self {
        let c = classes.len();
        DatasetReport {
            dataset: dataset.into(),
            split: split.into(),
            head: head.into(),
            bn: bn.into(),
            images: 0,
            classes,
            confusion: vec![0; c * c],
        }
    }

    /// Counts one image's (label, prediction) pairs; 255 labels are skipped, and a label or a
    /// prediction outside the classes is an error.
    pub fn add(&mut self, labels: &[u8], predictions: &[u8]) -> Result<()> {
        let c = self.classes.len();
        if labels.len() != predictions.len() {
            return Err(Error::ShapeMismatch {
                what: "predictions of the labels",
                expected: vec![labels.len()],
                got: vec![predictions.len()],
            });
        }
        for (i, (&l, &p)) in labels.iter().zip(predictions).enumerate() {
            if l == 255 {
                continue;
            }
            if l as usize >= c || p as usize >= c {
                return Err(Error::InvalidArgument(format!(
                    "{}: pixel {i} has label {l} and prediction {p}; the head has {c} classes",
                    self.dataset
                )));
            }
            self.confusion[l as usize * c + p as usize] += 1;
        }
        self.images += 1;
        Ok(())
    }

    /// Scores of every class.
    pub fn scores(&self) -> Vec<ClassScore> {
        let c = self.classes.len();
        (0..c)
            .map(|k| {
                let tp = self.confusion[k * c + k];
                let label_pixels: u64 = self.confusion[k * c..(k + 1) * c].iter().sum();
                let predicted_pixels: u64 = (0..c).map(|r| self.confusion[r * c + k]).sum();
                let union = label_pixels + predicted_pixels - tp;
                ClassScore {
                    name: self.classes[k].clone(),
                    iou: (union > 0).then(|| tp as f64 / union as f64),
                    accuracy: (label_pixels > 0).then(|| tp as f64 / label_pixels as f64),
                    label_pixels,
                    predicted_pixels,
                }
            })
            .collect()
    }

    /// Mean IoU over the classes present in labels or predictions; `None` when there is none.
    pub fn miou(&self) -> Option<f64> {
        mean(self.scores().iter().filter_map(|s| s.iou))
    }

    /// Mean per-class accuracy over the classes with labelled pixels.
    pub fn mean_accuracy(&self) -> Option<f64> {
        mean(self.scores().iter().filter_map(|s| s.accuracy))
    }

    /// Correct pixels over labelled pixels.
    pub fn pixel_accuracy(&self) -> Option<f64> {
        let c = self.classes.len();
        let total: u64 = self.confusion.iter().sum();
        let correct: u64 = (0..c).map(|k| self.confusion[k * c + k]).sum();
        (total > 0).then(|| correct as f64 / total as f64)
    }

    /// The classes left out of mIoU (in neither labels nor predictions over the split).
    pub fn absent(&self) -> Vec<String> {
        self.scores().into_iter().filter(|s| s.iou.is_none()).map(|s| s.name).collect()
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let pct = |v: Option<f64>| v.map_or("    n/a".to_string(), |v| format!("{:7.2}", 100.0 * v));
        let width = self.classes.iter().map(|c| c.len()).max().unwrap_or(5).max(5);
        let mut s = format!(
            "{} ({}, {} images; head {}, BN slice {})\n",
            self.dataset, self.split, self.images, self.head, self.bn
        );
        let _ = writeln!(s, "  {:width$}  {:>7}  {:>7}", "class", "IoU %", "acc %");
        for sc in self.scores() {
            let _ = writeln!(s, "  {:width$}  {}  {}", sc.name, pct(sc.iou), pct(sc.accuracy));
        }
        let present = self.classes.len() - self.absent().len();
        let _ = writeln!(
            s,
            "  mIoU {}% over {present} of {} classes   mean acc {}%   pixel acc {}%",
            pct(self.miou()).trim(),
            self.classes.len(),
            pct(self.mean_accuracy()).trim(),
            pct(self.pixel_accuracy()).trim()
        );
        let absent = self.absent();
        if !absent.is_empty() {
            let _ = writeln!(
                s,
                "  left out of mIoU (absent from both labels and predictions over the split): {}",
                absent.join(", ")
            );
        }
        s
    }

    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        let classes: Vec<Value> = self
            .scores()
            .iter()
            .map(|s| {
                json!({
                    "name": s.name,
                    "iou": s.iou,
                    "accuracy": s.accuracy,
                    "label_pixels": s.label_pixels,
                    "predicted_pixels": s.predicted_pixels,
                })
            })
            .collect();
        json!({
            "dataset": self.dataset,
            "split": self.split,
            "head": self.head,
            "bn": self.bn,
            "images": self.images,
            "miou": self.miou(),
            "mean_accuracy": self.mean_accuracy(),
            "pixel_accuracy": self.pixel_accuracy(),
            "classes": classes,
            "left_out_of_miou": self.absent(),
        })
    }
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let (s, n) = v.fold((0.0, 0usize), |(s, n), x| (s + x, n + 1));
    (n > 0).then(|| s / n as f64)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The reports as CSV: one row per (dataset, class), then per dataset the rows `mIoU`,
/// `mean accuracy` and `pixel accuracy` (in the `iou` column). Empty cells are undefined scores.
pub fn to_csv(reports: &[DatasetReport]) -> String {
    let num = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
    let mut s = String::from("dataset,split,head,bn,class,iou,accuracy,label_pixels,predicted_pixels\n");
    for r in reports {
        let pre = [&r.dataset, &r.split, &r.head, &r.bn].map(|f| csv_field(f)).join(",");
        for sc in r.scores() {
            let _ = writeln!(
                s,
                "{pre},{},{},{},{},{}",
                csv_field(&sc.name),
                num(sc.iou),
                num(sc.accuracy),
                sc.label_pixels,
                sc.predicted_pixels
            );
        }
        for (what, v) in
            [("mIoU", r.miou()), ("mean accuracy", r.mean_accuracy()), ("pixel accuracy", r.pixel_accuracy())]
        {
            let _ = writeln!(s, "{pre},{what},{},,,", num(v));
        }
    }
    s
}

/// Writes `text` to `path`, naming the file on failure.
pub fn write_text(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)
        .map_err(|e| Error::Data { path: path.display().to_string(), message: format!("cannot write: {e}") })
}
