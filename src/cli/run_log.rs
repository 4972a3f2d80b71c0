//! The run log of `cdcl train --log-dir DIR`: `metrics.jsonl`, one JSON object a line, as
//! segmentation toolkits log runs — per iteration `{"kind":"train","iter",...,"lr","total",
//! "images_per_s","datasets":{NAME:{"loss","aux_loss"}}}`, per evaluation
//! `{"kind":"eval","iter",...report}` — and `loss.svg`, the loss curves of every dataset.
//!
//! A resumed run keeps the lines of the iterations before its start and continues the file.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Value};

use super::chart::{svg, Series};
use cdcl::train::StepStats;
use cdcl::{Error, Result};

/// An open run log.
#[derive(Debug)]
pub struct RunLog {
    dir: PathBuf,
    file: File,
    curves: Curves,
}

/// Each dataset's main and auxiliary loss by iteration.
#[derive(Debug)]
struct Curves {
    names: Vec<String>,
    main: Vec<Vec<(f64, f64)>>,
    aux: Vec<Vec<(f64, f64)>>,
}

impl Curves {
    fn add(&mut self, v: &Value) {
        let it = v["iter"].as_f64().unwrap_or(0.0);
        for (d, name) in self.names.iter().enumerate() {
            if let Some(x) = v["datasets"][name]["loss"].as_f64() {
                self.main[d].push((it, x));
            }
            if let Some(x) = v["datasets"][name]["aux_loss"].as_f64() {
                self.aux[d].push((it, x));
            }
        }
    }
}

fn io_err(path: &Path, e: std::io::Error) -> Error {
    Error::Data { path: path.display().to_string(), message: format!("cannot write the run log: {e}") }
}

impl RunLog {
    /// Opens (creating) `dir` for a run over datasets `names` that starts at iteration `start`.
    pub fn open(dir: &Path, names: &[String], start: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, e))?;
        let path = dir.join("metrics.jsonl");
        let mut curves =
            Curves { names: names.to_vec(), main: vec![Vec::new(); names.len()], aux: vec![Vec::new(); names.len()] };
        // Keep what a previous run logged before `start`.
        let mut kept = String::new();
        if let Ok(old) = std::fs::read_to_string(&path) {
            for line in old.lines() {
                let Ok(v) = serde_json::from_str::<Value>(line) else { continue };
                if v.get("iter").and_then(Value::as_u64).is_some_and(|i| (i as usize) < start) {
                    if v["kind"] == "train" {
                        curves.add(&v);
                    }
                    kept.push_str(line);
                    kept.push('\n');
                }
            }
        }
        std::fs::write(&path, kept).map_err(|e| io_err(&path, e))?;
        let file = OpenOptions::new().append(true).open(&path).map_err(|e| io_err(&path, e))?;
        Ok(RunLog { dir: dir.to_path_buf(), file, curves })
    }

    fn write(&mut self, v: &Value) -> Result<()> {
        let path = self.dir.join("metrics.jsonl");
        writeln!(self.file, "{v}").map_err(|e| io_err(&path, e))
    }

    /// Logs iteration `stats.iter`.
    pub fn iteration(&mut self, stats: &StepStats, images_per_s: f64, elapsed_s: f64) -> Result<()> {
        let finite = |x: f32| x.is_finite().then_some(x as f64);
        let mut datasets = Map::new();
        for (d, name) in self.curves.names.iter().enumerate() {
            let (l, a) = (stats.per_dataset.get(d).copied(), stats.aux_per_dataset.get(d).copied());
            if let Some(l) = l.and_then(finite) {
                datasets.insert(name.clone(), json!({ "loss": l, "aux_loss": a.and_then(finite) }));
            }
        }
        let v = json!({
            "kind": "train",
            "iter": stats.iter,
            "lr": stats.lr,
            "total": finite(stats.total),
            "images_per_s": images_per_s,
            "time_s": elapsed_s,
            "datasets": datasets,
        });
        self.curves.add(&v);
        self.write(&v)
    }

    /// Logs an evaluation (a report's JSON) at iteration `iter`.
    pub fn eval(&mut self, iter: usize, report: &Value) -> Result<()> {
        let mut v = json!({ "kind": "eval", "iter": iter });
        if let (Some(m), Some(r)) = (v.as_object_mut(), report.as_object()) {
            m.extend(r.iter().map(|(k, x)| (k.clone(), x.clone())));
        }
        self.write(&v)
    }

    /// Writes `loss.svg`.
    pub fn chart(&self) -> Result<()> {
        let c = &self.curves;
        let mut series = Vec::new();
        for (d, name) in c.names.iter().enumerate() {
            series.push(Series { label: format!("{name} loss"), points: c.main[d].clone(), dashed: false });
            if !c.aux[d].is_empty() {
                series.push(Series { label: format!("{name} aux loss"), points: c.aux[d].clone(), dashed: true });
            }
        }
        let path = self.dir.join("loss.svg");
        std::fs::write(&path, svg("training losses", "iteration", "cross-entropy", &series))
            .map_err(|e| io_err(&path, e))
    }
}
