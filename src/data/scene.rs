//! Scene geometry: which surface covers each pixel. Integer arithmetic only, so the label map
//! of a sample is the same on every machine.
//!
//! A scene is painted back to front: sky, a skyline of buildings (with windows), small trees on
//! the horizon, the ground (a perspective road with an optional dashed centre line, sidewalks
//! on both sides, grass or more pavement beyond), then the street objects — trees, poles, cars
//! and people — sorted by the row they stand on (farther first, so nearer ones occlude), and
//! last the ego-vehicle hood. Sizes of street objects scale linearly with the distance of their
//! base row below the horizon, like a pinhole camera over flat ground.

use super::rng::Rng;
use super::{Appearance, FineClass, Layout, IGNORE, NUM_FINE_CLASSES};

/// Fine label of the pixels no dataset labels (the hood).
const IGNORE_FINE: u8 = IGNORE as u8;

/// How far a surface is: 0 at the horizon, 1 at the bottom row.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Depth {
    /// The whole surface is at one distance.
    Fixed(f32),
    /// Flat ground: the distance follows the row.
    Ground,
}

/// Something painted: a class and how it looks.
#[derive(Debug, Clone)]
pub(crate) struct Surface {
    /// Fine class, or 255.
    pub class: u8,
    /// RGB in [0, 1] before the domain's global appearance.
    pub color: [f32; 3],
    pub depth: Depth,
    /// Vertical shading: the colour is scaled by `1 + vgrad · (y/H − 1/2)`.
    pub vgrad: f32,
    /// Amplitude of a grey per-pixel texture (asphalt grain, leaves).
    pub texture: f32,
}

/// A painted scene.
#[derive(Debug, Clone)]
pub(crate) struct Scene {
    pub h: usize,
    pub w: usize,
    /// The horizon row.
    pub horizon: usize,
    /// Per pixel, the index of the surface that covers it.
    pub surf: Vec<u16>,
    pub surfaces: Vec<Surface>,
    ignore_border: usize,
}

#[derive(Debug, Clone, Copy)]
enum Shape {
    /// Half-open `[x0, x1) × [y0, y1)`.
    Rect { x0: i64, y0: i64, x1: i64, y1: i64 },
    /// Centre and half-axes (a half-axis of r covers 2r + 1 pixels).
    Ellipse { cx: i64, cy: i64, rx: i64, ry: i64 },
}

/// A street object: what it is made of and the row it stands on.
struct Object {
    base: i64,
    parts: Vec<(u16, Shape)>,
}

/// `a + (b − a)·num/den`, rounded toward −∞.
fn lerp(a: i64, b: i64, num: i64, den: i64) -> i64 {
    a + ((b - a) * num).div_euclid(den)
}

/// Per-row geometry of the street.
struct Street {
    hz: i64,
    span: i64,
    /// Road centre, road half-width and sidewalk width of each row (valid from the horizon).
    cx: Vec<i64>,
    hw: Vec<i64>,
    sw: Vec<i64>,
}

impl Street {
    /// `full · (y − horizon) / span`: a size that is `full` at the bottom row.
    fn scale(&self, full: i64, y: i64) -> i64 {
        full * (y - self.hz) / self.span
    }

    fn depth(&self, y: i64) -> f32 {
        (y - self.hz) as f32 / self.span as f32
    }
}

impl Scene {
    fn add(&mut self, class: u8, color: [f32; 3], depth: Depth, vgrad: f32, texture: f32) -> u16 {
        self.surfaces.push(Surface { class, color, depth, vgrad, texture });
        u16::try_from(self.surfaces.len() - 1).expect("a scene has fewer than 65536 surfaces")
    }

    fn paint(&mut self, id: u16, shape: Shape) {
        let (h, w) = (self.h as i64, self.w as i64);
        match shape {
            Shape::Rect { x0, y0, x1, y1 } => {
                for y in y0.max(0)..y1.min(h) {
                    let row = y as usize * self.w;
                    for x in x0.max(0)..x1.min(w) {
                        self.surf[row + x as usize] = id;
                    }
                }
            }
            Shape::Ellipse { cx, cy, rx, ry } => {
                // Inside when (dx / (rx + ½))² + (dy / (ry + ½))² ≤ 1, in integers.
                let (a2, b2) = ((2 * rx + 1) * (2 * rx + 1), (2 * ry + 1) * (2 * ry + 1));
                for y in (cy - ry).max(0)..(cy + ry + 1).min(h) {
                    let dy = 2 * (y - cy);
                    let row = y as usize * self.w;
                    for x in (cx - rx).max(0)..(cx + rx + 1).min(w) {
                        let dx = 2 * (x - cx);
                        if dx * dx * b2 + dy * dy * a2 <= a2 * b2 {
                            self.surf[row + x as usize] = id;
                        }
                    }
                }
            }
        }
    }

    /// The fine label of every pixel, with the ignore border applied.
    pub(crate) fn fine_labels(&self) -> Vec<i32> {
        let b = self.ignore_border;
        let mut out = Vec::with_capacity(self.h * self.w);
        for y in 0..self.h {
            for x in 0..self.w {
                let border = y < b || x < b || y + b >= self.h || x + b >= self.w;
                let class = self.surfaces[self.surf[y * self.w + x] as usize].class;
                out.push(if border { IGNORE } else { class as i32 });
            }
        }
        out
    }

    /// Draws the scene of one sample.
    pub(crate) fn generate(h: usize, w: usize, layout: &Layout, app: &Appearance, key: u64) -> Scene {
        let mut rng = Rng::new(key);
        let (hi, wi) = (h as i64, w as i64);
        let pm = |full: i64, permille: u32| full * permille as i64 / 1000;
        let mut s =
            Scene { h, w, horizon: 0, surf: vec![0; h * w], surfaces: Vec::new(), ignore_border: layout.ignore_border };
        let color = |rng: &mut Rng, class: FineClass| -> [f32; 3] {
            let c = class as usize;
            jitter(rng, app.class_colors[c], app.class_jitter[c])
        };

        // Sky: surface 0 fills the image.
        let sky = color(&mut rng, FineClass::Sky);
        s.add(FineClass::Sky as u8, sky, Depth::Fixed(0.0), 0.6, 0.0);

        let hz = pm(hi, rng.range_incl(layout.horizon_permille.0 as i64, layout.horizon_permille.1 as i64) as u32);
        s.horizon = hz as usize;
        let span = hi - hz;

        // Skyline.
        let mut x = -rng.range(0, wi / 8);
        while x < wi {
            let bw = rng.range_incl(pm(wi, 80), pm(wi, 250)).max(3);
            if rng.chance(150) {
                x += bw / 2 + 1;
                continue;
            }
            let bh = rng.range_incl(pm(hi, 60), pm(hi, 330)).max(2);
            let top = hz - bh;
            let c = color(&mut rng, FineClass::Building);
            let id = s.add(FineClass::Building as u8, c, Depth::Fixed(0.03), 0.1, 0.02);
            s.paint(id, Shape::Rect { x0: x, y0: top, x1: x + bw, y1: hz + 1 });
            let (cw, ch) = ((wi / 48).max(3), (hi / 28).max(4));
            if bw >= 2 * cw && bh >= 2 * ch {
                let glass = [c[0] * 0.45 + 0.02, c[1] * 0.45 + 0.04, c[2] * 0.45 + 0.08];
                let wid = s.add(FineClass::Building as u8, glass, Depth::Fixed(0.03), 0.1, 0.0);
                let mut wy = top + ch / 2;
                while wy + ch <= hz {
                    let mut wx = x + cw / 2;
                    while wx + cw <= x + bw {
                        s.paint(wid, Shape::Rect { x0: wx, y0: wy, x1: wx + (cw / 2).max(1), y1: wy + ch / 2 });
                        wx += cw;
                    }
                    wy += ch;
                }
            }
            x += bw;
        }

        // Small trees on the horizon.
        for _ in 0..rng.range_incl(layout.background_trees.0 as i64, layout.background_trees.1 as i64) {
            let tx = rng.range(0, wi);
            let r = rng.range_incl(pm(hi, 20), pm(hi, 50)).max(1);
            let c = color(&mut rng, FineClass::Vegetation);
            let id = s.add(FineClass::Vegetation as u8, c, Depth::Fixed(0.02), 0.0, 0.08);
            s.paint(id, Shape::Ellipse { cx: tx, cy: hz - r, rx: r, ry: r });
            s.paint(id, Shape::Rect { x0: tx - r / 4, y0: hz - r / 2, x1: tx + r / 4 + 1, y1: hz + 1 });
        }

        // Ground.
        let vx = wi / 2 + rng.range_incl(-wi / 8, wi / 8);
        let bx = wi / 2 + rng.range_incl(-wi / 10, wi / 10);
        let hw_top = (wi / 64).max(1);
        let hw_bot = pm(
            wi,
            rng.range_incl(layout.road_half_width_permille.0 as i64, layout.road_half_width_permille.1 as i64) as u32,
        );
        let sw_top = (wi / 100).max(1);
        let sw_bot = rng.range_incl(pm(wi, 100), pm(wi, 200)).max(2);
        let mut street = Street { hz, span, cx: vec![0; h], hw: vec![0; h], sw: vec![0; h] };
        let road_c = color(&mut rng, FineClass::Road);
        let road = s.add(FineClass::Road as u8, road_c, Depth::Ground, 0.15, 0.03);
        let walk_c = color(&mut rng, FineClass::Sidewalk);
        let walk = s.add(FineClass::Sidewalk as u8, walk_c, Depth::Ground, 0.1, 0.02);
        let mut beyond = [walk; 2];
        for side in &mut beyond {
            if rng.chance(layout.verge_permille as u64) {
                let c = color(&mut rng, FineClass::Vegetation);
                *side = s.add(FineClass::Vegetation as u8, c, Depth::Ground, 0.1, 0.06);
            }
        }
        for y in hz..hi {
            let (cx, hw, sw) =
                (lerp(vx, bx, y - hz, span), lerp(hw_top, hw_bot, y - hz, span), lerp(sw_top, sw_bot, y - hz, span));
            let yu = y as usize;
            (street.cx[yu], street.hw[yu], street.sw[yu]) = (cx, hw, sw);
            for x in 0..wi {
                let d = x - cx;
                let id = if -hw <= d && d < hw {
                    road
                } else if -hw - sw <= d && d < hw + sw {
                    walk
                } else {
                    beyond[(d > 0) as usize]
                };
                s.surf[yu * w + x as usize] = id;
            }
        }
        // Dashed centre line, dashes equally long on the ground (so shorter toward the horizon).
        if rng.chance(700) {
            let paint = s.add(FineClass::Road as u8, [0.86, 0.86, 0.80], Depth::Ground, 0.0, 0.02);
            for y in hz + (span / 6).max(1)..hi {
                if (8 * span / (y - hz)) % 2 == 0 {
                    let yu = y as usize;
                    let lw = street.hw[yu] / 24;
                    let cx = street.cx[yu];
                    s.paint(paint, Shape::Rect { x0: cx - lw, y0: y, x1: cx + lw + 1, y1: y + 1 });
                }
            }
        }

        // Street objects.
        let hood = pm(hi, layout.hood_permille);
        let y_lo = hz + (span / 8).max(1);
        let y_hi = (hi - hood - 1).max(y_lo + 1);
        let count = |rng: &mut Rng, r: (u32, u32)| rng.range_incl(r.0 as i64, r.1 as i64);
        let mut objects = Vec::new();

        for _ in 0..count(&mut rng, layout.trees) {
            let yb = rng.range(y_lo, y_hi);
            let yu = yb as usize;
            let left = rng.chance(500);
            let edge = street.hw[yu] + street.sw[yu] + rng.range_incl(-street.sw[yu] / 2, street.sw[yu] / 2);
            let tx = street.cx[yu] + if left { -edge } else { edge };
            let r = street.scale(pm(hi, 170), yb).max(2);
            let trunk_h = street.scale(pm(hi, 220), yb).max(2);
            let d = Depth::Fixed(street.depth(yb));
            let c = color(&mut rng, FineClass::Vegetation);
            let crown = s.add(FineClass::Vegetation as u8, c, d, 0.2, 0.1);
            let bark = jitter(&mut rng, [0.33, 0.24, 0.16], 0.06);
            let trunk = s.add(FineClass::Vegetation as u8, bark, d, 0.0, 0.03);
            let cy = yb - trunk_h - r * 7 / 10;
            let (r2, dx) = ((r * 3 / 4).max(1), r * 6 / 10);
            objects.push(Object {
                base: yb,
                parts: vec![
                    (trunk, Shape::Rect { x0: tx - r / 8, y0: cy, x1: tx + r / 8 + 1, y1: yb + 1 }),
                    (crown, Shape::Ellipse { cx: tx, cy, rx: r, ry: r }),
                    (crown, Shape::Ellipse { cx: tx - dx, cy: cy + r / 2, rx: r2, ry: r2 }),
                    (crown, Shape::Ellipse { cx: tx + dx, cy: cy + r / 2, rx: r2, ry: r2 }),
                ],
            });
        }

        for _ in 0..count(&mut rng, layout.poles) {
            let yb = rng.range(y_lo, y_hi);
            let yu = yb as usize;
            let left = rng.chance(500);
            let off = street.hw[yu] + street.sw[yu] / 3;
            let px = street.cx[yu] + if left { -off } else { off };
            let ph = street.scale(pm(hi, 900), yb).max(4);
            let pw = street.scale(pm(wi, 14), yb).max(1);
            let arm = (ph / 6).max(1) * if left { 1 } else { -1 };
            let c = color(&mut rng, FineClass::Pole);
            let id = s.add(FineClass::Pole as u8, c, Depth::Fixed(street.depth(yb)), 0.0, 0.0);
            let top = yb - ph;
            let (ax0, ax1) = if arm > 0 { (px, px + arm + pw) } else { (px + arm, px + pw) };
            let lamp_x = px + arm;
            objects.push(Object {
                base: yb,
                parts: vec![
                    (id, Shape::Rect { x0: px, y0: top, x1: px + pw, y1: yb + 1 }),
                    (id, Shape::Rect { x0: ax0, y0: top, x1: ax1, y1: top + pw }),
                    (id, Shape::Rect { x0: lamp_x - pw, y0: top + pw, x1: lamp_x + 2 * pw, y1: top + 2 * pw + 1 }),
                ],
            });
        }

        for _ in 0..count(&mut rng, layout.cars) {
            let yb = rng.range(y_lo, y_hi);
            let yu = yb as usize;
            let xc = street.cx[yu] + street.hw[yu] * rng.range_incl(-650, 650) / 1000;
            let cw = street.scale(pm(wi, 300), yb).max(4);
            let wr = (cw / 9).max(1);
            let body_h = (cw * 30 / 100).max(2);
            let cab_h = (cw * 22 / 100).max(1);
            let cab_w = (cw * 64 / 100).max(2);
            let d = Depth::Fixed(street.depth(yb));
            let c = color(&mut rng, FineClass::Car);
            let body = s.add(FineClass::Car as u8, c, d, 0.3, 0.0);
            let glass = s.add(FineClass::Car as u8, [0.10, 0.12, 0.15], d, 0.2, 0.0);
            let tyre = s.add(FineClass::Car as u8, [0.06, 0.06, 0.06], d, 0.0, 0.0);
            let x0 = xc - cw / 2;
            let x1 = x0 + cw;
            let body_bottom = yb - wr / 2;
            let body_top = body_bottom - body_h;
            let (cx0, cx1) = (xc - cab_w / 2, xc - cab_w / 2 + cab_w);
            let mut parts = vec![
                (body, Shape::Rect { x0, y0: body_top, x1, y1: body_bottom + 1 }),
                (body, Shape::Rect { x0: cx0, y0: body_top - cab_h, x1: cx1, y1: body_top }),
                (tyre, Shape::Ellipse { cx: x0 + cw / 5, cy: yb - wr, rx: wr, ry: wr }),
                (tyre, Shape::Ellipse { cx: x1 - 1 - cw / 5, cy: yb - wr, rx: wr, ry: wr }),
            ];
            if cab_w >= 4 && cab_h >= 3 {
                parts.push((glass, Shape::Rect { x0: cx0 + 1, y0: body_top - cab_h + 1, x1: cx1 - 1, y1: body_top }));
            }
            if cw >= 12 {
                let lights = s.add(FineClass::Car as u8, [0.75, 0.08, 0.06], d, 0.0, 0.0);
                let (lw, lh) = ((cw / 12).max(1), (body_h / 4).max(1));
                let y0 = body_top + 1;
                parts.push((lights, Shape::Rect { x0: x0 + 1, y0, x1: x0 + 1 + lw, y1: y0 + lh }));
                parts.push((lights, Shape::Rect { x0: x1 - 1 - lw, y0, x1: x1 - 1, y1: y0 + lh }));
            }
            objects.push(Object { base: yb, parts });
        }

        for _ in 0..count(&mut rng, layout.people) {
            let yb = rng.range(y_lo, y_hi);
            let yu = yb as usize;
            let left = rng.chance(500);
            let off = street.hw[yu] + rng.range(0, street.sw[yu].max(1));
            let px = street.cx[yu] + if left { -off } else { off };
            let ph = street.scale(pm(hi, 300), yb).max(4);
            let pw = (ph / 4).max(2);
            let d = Depth::Fixed(street.depth(yb));
            let shirt = color(&mut rng, FineClass::Person);
            let shirt = s.add(FineClass::Person as u8, shirt, d, 0.0, 0.0);
            let trousers = jitter(&mut rng, [0.18, 0.18, 0.24], 0.15);
            let trousers = s.add(FineClass::Person as u8, trousers, d, 0.0, 0.0);
            let skin = jitter(&mut rng, [0.72, 0.55, 0.44], 0.25);
            let skin = s.add(FineClass::Person as u8, skin, d, 0.0, 0.0);
            let head_r = (ph / 10).max(1);
            objects.push(Object {
                base: yb,
                parts: vec![
                    (
                        trousers,
                        Shape::Rect { x0: px - pw / 3, y0: yb - ph * 45 / 100, x1: px + pw / 3 + 1, y1: yb + 1 },
                    ),
                    (shirt, Shape::Ellipse { cx: px, cy: yb - ph * 60 / 100, rx: pw / 2, ry: (ph * 22 / 100).max(1) }),
                    (skin, Shape::Ellipse { cx: px, cy: yb - ph + head_r, rx: head_r, ry: head_r }),
                ],
            });
        }

        // Farther first; the sort is stable, so ties keep the order they were drawn in.
        objects.sort_by_key(|o| o.base);
        for o in &objects {
            for &(id, shape) in &o.parts {
                s.paint(id, shape);
            }
        }

        if hood > 0 {
            let id = s.add(IGNORE_FINE, [0.10, 0.10, 0.12], Depth::Fixed(1.0), 0.4, 0.0);
            let b = 2 * hood;
            s.paint(id, Shape::Ellipse { cx: wi / 2, cy: hi - hood + b, rx: wi * 7 / 10, ry: b });
        }
        debug_assert!(s.surfaces.iter().all(|x| x.class == IGNORE_FINE || (x.class as usize) < NUM_FINE_CLASSES));
        s
    }
}

/// `base` plus a uniform number in `[-amount/2, amount/2)` per channel, clamped to [0.02, 0.98].
fn jitter(rng: &mut Rng, base: [f32; 3], amount: f32) -> [f32; 3] {
    let mut c = base;
    for v in &mut c {
        *v = (*v + amount * (rng.unit() - 0.5)).clamp(0.02, 0.98);
    }
    c
}
