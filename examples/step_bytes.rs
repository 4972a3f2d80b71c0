//! The DRAM-byte model of one DAT step (docs/kernels.md, "A training step"): PSPNet-ResNet-18 at
//! the paper's shape — two datasets × batch 8, 512×512 crops, 19 classes per head, aux head —
//! walked layer by layer for the pipeline before this crate's fused training path (one pass per
//! dataset; conv → 4-kernel DSBN; the residual form's thrown-away statistics pass; the PPM and
//! the loss from primitives; a gradient add per parameter and pass) and after it (one pass;
//! DABs with the statistics in the convolution's epilogue, the prologue inside BasicBlocks, the
//! fused PPM, the upsampled loss, one gradient gather), in f32 and (after) in bf16.
//!
//! A model, not a measurement: every tensor an op reads or writes crosses DRAM once per pass
//! over it (caches hold weights, tables and small tensors only), outputs are zero-filled at
//! allocation only in the "before" and "zero-filled" rows (the device layer allocates outputs
//! that kernels write in full uninitialised since the stall-free step), and per-tile workspaces (statistics partials, split-K slices)
//! are counted at their size. `cargo run --example step_bytes`.

/// Bytes moved, by what moved them.
#[derive(Default, Clone, Copy)]
struct Bytes {
    read: f64,
    write: f64,
    fill: f64,
}

impl Bytes {
    fn total(&self) -> f64 {
        self.read + self.write + self.fill
    }
}

#[derive(Clone)]
struct Step {
    /// Activation storage bytes (4 f32, 2 bf16).
    s: f64,
    b: Bytes,
    /// Bytes per part of the step, in the order first seen.
    parts: Vec<(&'static str, f64)>,
    part: &'static str,
    /// Outputs zero-filled at allocation (the device layer before the stall-free step; since
    /// then an output a kernel writes in full is allocated uninitialised from the cache).
    zero_fill: bool,
}

impl Step {
    fn add(&mut self, bytes: f64) {
        match self.parts.iter_mut().find(|p| p.0 == self.part) {
            Some(p) => p.1 += bytes,
            None => self.parts.push((self.part, bytes)),
        }
    }
    fn read(&mut self, elems: f64, s: f64) {
        self.b.read += elems * s;
        self.add(elems * s);
    }
    /// A new output written in full (zero-filled at allocation first).
    fn out(&mut self, elems: f64, s: f64) {
        let fill = if self.zero_fill { elems * s } else { 0.0 };
        self.b.write += elems * s;
        self.b.fill += fill;
        self.add(elems * s + fill);
    }
    /// Bytes not tied to an activation (workspaces, labels, parameters).
    fn raw(&mut self, read: f64, write: f64, fill: f64) {
        let fill = if self.zero_fill { fill } else { 0.0 };
        self.b.read += read;
        self.b.write += write;
        self.b.fill += fill;
        self.add(read + write + fill);
    }
    fn act(&self) -> f64 {
        self.s
    }
}

/// A convolution layer of the network: input and output activation sizes, weight elements.
#[derive(Clone, Copy)]
struct Layer {
    e_in: f64,
    e_out: f64,
    weights: f64,
    /// What follows: a residual add (last conv of a block), or the next conv of the block.
    residual: bool,
    feeds_conv: bool,
}

/// Samples per dataset.
const N: f64 = 8.0;

fn layers() -> (Vec<Layer>, f64, f64) {
    let mut v = Vec::new();
    let px = |hw: f64| N * hw * hw;
    // Stem 7×7/2: 512² → 256², 3 → 64, then max pooling to 128².
    v.push(Layer {
        e_in: px(512.0) * 3.0,
        e_out: px(256.0) * 64.0,
        weights: 64.0 * 49.0 * 3.0,
        residual: false,
        feeds_conv: false,
    });
    let mut c = 64.0;
    let mut hw = 128.0;
    for (li, planes) in [64.0, 128.0, 256.0, 512.0].into_iter().enumerate() {
        for bi in 0..2 {
            let stride2 = li == 1 && bi == 0;
            let out_hw = if stride2 { hw / 2.0 } else { hw };
            if bi == 0 && c != planes {
                // Downsample 1×1 conv + BN (no ReLU), the identity of the block's residual add.
                v.push(Layer {
                    e_in: px(hw) * c,
                    e_out: px(out_hw) * planes,
                    weights: planes * c,
                    residual: false,
                    feeds_conv: false,
                });
            }
            v.push(Layer {
                e_in: px(hw) * c,
                e_out: px(out_hw) * planes,
                weights: planes * 9.0 * c,
                residual: false,
                feeds_conv: true,
            });
            v.push(Layer {
                e_in: px(out_hw) * planes,
                e_out: px(out_hw) * planes,
                weights: planes * 9.0 * planes,
                residual: true,
                feeds_conv: false,
            });
            c = planes;
            hw = out_hw;
        }
    }
    // The heads: 3×3 1024 → 512 after the PPM, 3×3 256 → 256 on layer3 (aux).
    (v, px(64.0), px(128.0))
}

/// Bytes of one DSBN-statistics workspace of a tensor of `e` elements, `c` channels, in 64-pixel
/// chunks (two f32 partials per chunk and channel).
fn partials(e: f64) -> f64 {
    2.0 * e / 64.0 * 4.0
}

/// The conv + DSBN (+ residual, ReLU) of one layer and its backward, before: conv → DSBN's four
/// kernels (validate, statistics, finalize, apply) as separate ops; a residual layer ran the
/// statistics pass with an output it dropped, then an apply pass.
fn before_layer(st: &mut Step, l: &Layer, first: bool) {
    let s = st.act();
    // Forward: conv reads x, writes y.
    st.read(l.e_in, s);
    st.out(l.e_out, s);
    // DSBN training forward: statistics read y; apply reads y, writes z.
    st.read(l.e_out, s);
    st.read(l.e_out, s);
    st.out(l.e_out, s);
    if l.residual {
        // apply with the residual: reads y and r, writes the block output.
        st.read(2.0 * l.e_out, s);
        st.out(l.e_out, s);
    }
    // Backward: DSBN backward reads dy and y (and r) twice (partials, dx), writes dy_conv (and
    // dresidual); data gradient reads dy_conv, writes dx; filter gradient reads dy_conv and x.
    let rr = if l.residual { 1.0 } else { 0.0 };
    st.read(2.0 * (2.0 + rr) * l.e_out, s);
    st.out((1.0 + rr) * l.e_out, s);
    if !first {
        st.read(l.e_out, s);
        st.out(l.e_in, s);
    }
    st.read(l.e_out + l.e_in, s);
    if l.residual {
        // The identity's gradient: dresidual + the block's first conv's dx.
        st.read(2.0 * l.e_out, s);
        st.out(l.e_out, s);
    }
}

/// The same, after: one DAB. Statistics come from the conv's epilogue (partials written, a
/// finalize); the apply pass runs only when the output is written (not inside a block: the next
/// conv's prologue normalises as it loads, forward and backward).
fn after_layer(st: &mut Step, l: &Layer, first: bool) {
    let s = st.act();
    st.read(l.e_in, s);
    st.out(l.e_out, s);
    st.raw(0.0, partials(l.e_out), partials(l.e_out));
    if !l.feeds_conv {
        st.read((1.0 + if l.residual { 1.0 } else { 0.0 }) * l.e_out, s);
        st.out(l.e_out, s);
    }
    let rr = if l.residual { 1.0 } else { 0.0 };
    st.read(2.0 * (2.0 + rr) * l.e_out, s);
    st.out((1.0 + rr) * l.e_out, s);
    if !first {
        st.read(l.e_out, s);
        st.out(l.e_in, s);
    }
    st.read(l.e_out + l.e_in, s);
    if l.residual {
        st.read(2.0 * l.e_out, s);
        st.out(l.e_out, s);
    }
}

/// The heads of one pass of `n` samples (scale 1 per 8): PPM, 3×3 DAB, dropout, classifier,
/// aux DAB, aux classifier, both losses; `fused` selects the pipeline.
fn heads(st: &mut Step, px64: f64, fused: bool) {
    let s = st.act();
    st.part = "pyramid pooling module";
    let (x, k) = (px64 * 512.0, 128.0);
    let up = px64 * k; // one branch upsampled
    let out = px64 * 1024.0;
    if fused {
        // Forward: output zero-filled; four pooling reads of x; four slice writes; the identity
        // copied by pooling at full size (read x, write its slice).
        st.raw(5.0 * x * s, (4.0 * up + x) * s, out * s);
        // Backward: four slice reads of dy; one gather: identity slice read, dx written once.
        st.read(4.0 * up + x, s);
        st.out(x, s);
    } else {
        // Forward: per branch a pooled input (small) and an upsampled branch written; concat
        // reads x and the four branches and writes the output.
        st.read(4.0 * x, s);
        st.out(4.0 * up, s);
        st.read(x + 4.0 * up, s);
        st.out(out, s);
        // Backward: the concat's slices (x part and four branches: read and written); four
        // pooling backwards writing a full dx each; four adds onto the identity's.
        st.read(x + 4.0 * up, s);
        st.out(x + 4.0 * up, s);
        st.read(4.0 * up, s);
        st.out(4.0 * x, s);
        st.read(8.0 * x, s);
        st.out(4.0 * x, s);
    }
    // 3×3 1024 → 512 DAB, written (dropout follows), and the aux 3×3 256 → 256 on layer3.
    for (e_in, e_out) in [(out, px64 * 512.0), (px64 * 256.0, px64 * 256.0)] {
        st.part = "head and aux DABs, dropout, classifiers";
        let l = Layer { e_in, e_out, weights: 0.0, residual: false, feeds_conv: false };
        if fused {
            after_layer(st, &l, false);
        } else {
            before_layer(st, &l, false);
        }
        // Dropout forward and backward: read, write each.
        st.read(2.0 * e_out, s);
        st.out(2.0 * e_out, s);
        // Classifier 1×1 → 19 classes, forward and backward (small outputs).
        let logits = px64 * 19.0;
        st.read(e_out, s);
        st.out(logits, s);
        st.read(2.0 * logits + e_out, s);
        st.out(e_out, s);
        // The loss at label resolution (64 → 512: 64× the pixels), labels i32.
        st.part = "losses (main and aux, upsampled to 512²)";
        let full = logits * 64.0;
        let labels = px64 * 64.0 * 4.0;
        if fused {
            // Partial pass interpolating from the low-resolution logits (read once: cached),
            // lse per label pixel; the gradient gather writes dlogits at low resolution.
            st.read(logits, s);
            st.raw(2.0 * labels, labels, labels);
            st.read(logits, s);
            st.raw(labels, 0.0, 0.0);
            st.out(logits, s);
        } else {
            // resize writes the upsampled logits; the loss reads them (lse to the workspace);
            // the backward's loss reads them twice and writes dlogits at full size; the resize
            // backward reads those and writes the low-resolution gradient.
            st.read(logits, s);
            st.out(full, s);
            st.read(full, s);
            st.raw(labels, labels, 0.0);
            st.read(2.0 * full, s);
            st.raw(2.0 * labels, labels, 0.0);
            st.out(full, s);
            st.read(full, s);
            st.out(logits, s);
        }
    }
}

fn step(fused: bool, s: f64, zero_fill: bool) -> Step {
    let (layers, px64, _) = layers();
    let mut st = Step { s, b: Bytes::default(), parts: Vec::new(), part: "", zero_fill };
    // Before: one pass per dataset of N samples; after: one pass of 2N — the same bytes, so the
    // model counts 2 × (one pass of N) either way, plus what one pass adds (splits of the trunk's
    // features per dataset for the heads, and their gradients' concatenation).
    for _ in 0..2 {
        st.part = "backbone (stem, layer1-4; forward + backward)";
        for (i, l) in layers.iter().enumerate() {
            if fused {
                after_layer(&mut st, l, i == 0);
            } else {
                before_layer(&mut st, l, i == 0);
            }
        }
        // Max pooling after the stem: read, write (and i32 indices); backward read dy and
        // indices, write dx.
        st.part = "max pooling";
        let (x, y) = (N * 256.0 * 256.0 * 64.0, N * 128.0 * 128.0 * 64.0);
        st.read(x, s);
        st.out(y, s);
        st.out(y, 4.0);
        st.read(y, s);
        st.read(y, 4.0);
        st.out(x, s);
        heads(&mut st, px64, fused);
    }
    if fused {
        st.part = "splitting the one pass per dataset";
        // Splitting the features (512 and 256 channels at 64²) per dataset, and concatenating
        // their gradients: read and write both ways.
        let e = 2.0 * px64 * (512.0 + 256.0);
        st.read(2.0 * e, s);
        st.out(2.0 * e, s);
    }
    // Parameters: ~13.2 M (counted from the layers and heads). Before: every weight and
    // γ/β gradient of a parameter used by both passes added (read 2, write 1); SGD reads p, g,
    // buf and writes p, buf. After: one gather (read the per-pass parts in the storage type,
    // write f32), SGD as before plus the 16-bit copy written (bf16).
    let params: f64 = layers.iter().map(|l| l.weights).sum::<f64>()
        + 128.0 * 512.0 * 4.0
        + 512.0 * 9.0 * 1024.0
        + 256.0 * 9.0 * 256.0;
    st.part = "parameter gradients and SGD";
    if fused {
        st.raw(params * s, params * 4.0, params * 4.0);
        if s < 4.0 {
            st.raw(0.0, params * s, 0.0);
        }
    } else {
        st.raw(params * 8.0, params * 4.0, params * 4.0);
    }
    st.raw(params * 12.0, params * 8.0, 0.0);
    st
}

fn main() {
    let gb = |b: f64| b / 1e9;
    println!("modelled DRAM bytes per DAT step, PSPNet-ResNet-18, 2 datasets × 8 × 512×512 (a model):");
    println!("| pipeline | reads | writes | zero-fills | total | × before |");
    println!("|---|---|---|---|---|---|");
    let before = step(false, 4.0, true);
    let rows = [
        ("before (f32)", before.clone()),
        ("fused path, zero-filled outputs (f32)", step(true, 4.0, true)),
        ("after (f32)", step(true, 4.0, false)),
        ("after (bf16)", step(true, 2.0, false)),
    ];
    for (name, st) in &rows {
        println!(
            "| {name} | {:.2} GB | {:.2} GB | {:.2} GB | **{:.2} GB** | {:.2} |",
            gb(st.b.read),
            gb(st.b.write),
            gb(st.b.fill),
            gb(st.b.total()),
            st.b.total() / before.b.total()
        );
    }
    println!();
    println!("| part | before (f32) | after (f32) | after (bf16) |");
    println!("|---|---|---|---|");
    let (a, b) = (step(true, 4.0, false), step(true, 2.0, false));
    let names: Vec<&str> = before.parts.iter().chain(&a.parts).map(|p| p.0).collect();
    let mut seen = Vec::new();
    for n in names {
        if seen.contains(&n) {
            continue;
        }
        seen.push(n);
        let of = |st: &Step| st.parts.iter().find(|p| p.0 == n).map_or(0.0, |p| p.1);
        println!("| {n} | {:.2} GB | {:.2} GB | {:.2} GB |", gb(of(&before)), gb(of(&a)), gb(of(&b)));
    }
}
