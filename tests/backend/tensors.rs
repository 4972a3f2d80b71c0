//! Tensors, element-wise ops, channel and batch slices and concatenations.

use super::*;

// ---- tensors ----------------------------------------------------------------------------------

pub(crate) fn shape_strategy(max_rank: usize, max_dim: usize) -> impl Strategy<Value = Vec<usize>> {
    proptest::collection::vec(1..=max_dim, 1..=max_rank)
}

pub(crate) fn check_tensors<B: Backend>(be: &B, shape: &[usize], seed: u64) -> Result<(), String> {
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    // Any bit pattern, NaN payloads and -0 included: the host copies must not touch them.
    let data: Vec<f32> = (0..len).map(|_| f32::from_bits(r.next_u64() as u32)).collect();
    let ints: Vec<i32> = (0..len).map(|_| r.next_u64() as i32).collect();
    let t = be.tensor_f32(shape, &data).map_err(|e| e.to_string())?;
    let ti = be.tensor_i32(shape, &ints).map_err(|e| e.to_string())?;
    if TensorLike::shape(&t) != shape || ti.dtype() != DType::I32 {
        return Err(format!("shape {:?} / dtype {} after upload", t.shape(), ti.dtype()));
    }
    let want_bits: Vec<u32> = data.iter().map(|v| v.to_bits()).collect();
    if bits(be, &t) != want_bits {
        return Err("f32 round trip changed bits".into());
    }
    if be.to_i32(&ti).unwrap() != ints {
        return Err("i32 round trip changed values".into());
    }
    let z = be.zeros(shape).unwrap();
    if z.dtype() != DType::F32 || bits(be, &z) != vec![0; len] {
        return Err("zeros are not +0.0 f32".into());
    }
    // A deep copy: writing the copy leaves the original alone.
    let mut c = be.try_clone(&t).unwrap();
    let ci = be.try_clone(&ti).unwrap();
    if bits(be, &c) != want_bits || be.to_i32(&ci).unwrap() != ints || c.shape() != shape {
        return Err("try_clone differs from its source".into());
    }
    let other: Vec<f32> = (0..len).map(|i| i as f32 - 0.5).collect();
    be.write_f32(&mut c, &other).unwrap();
    if be.to_f32(&c).unwrap() != other || bits(be, &t) != want_bits {
        return Err("write_f32 into the copy is not a deep write".into());
    }
    // Typed errors.
    let wrong_len = vec![0.0f32; len + 1];
    match be.write_f32(&mut c, &wrong_len) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("write_f32 of a wrong length: {other:?}")),
    }
    match be.tensor_f32(shape, &wrong_len) {
        Err(Error::InvalidShape { .. }) => {}
        other => return Err(format!("tensor_f32 of a wrong length: {other:?}")),
    }
    match be.to_f32(&ti) {
        Err(Error::DTypeMismatch { expected: DType::F32, got: DType::I32, .. }) => {}
        other => return Err(format!("to_f32 of an i32 tensor: {other:?}")),
    }
    match be.to_i32(&t) {
        Err(Error::DTypeMismatch { expected: DType::I32, got: DType::F32, .. }) => {}
        other => return Err(format!("to_i32 of an f32 tensor: {other:?}")),
    }
    let mut ti2 = be.try_clone(&ti).unwrap();
    match be.write_f32(&mut ti2, &other) {
        Err(Error::DTypeMismatch { .. }) => Ok(()),
        other => Err(format!("write_f32 into an i32 tensor: {other:?}")),
    }
}

// ---- element-wise -----------------------------------------------------------------------------

/// f16 / bf16 storage: uploads round to nearest even, read-backs widen exactly, writes round,
/// clones and slices keep the storage type; the 16-bit add rounds its f32 sum once.
pub(crate) fn check_float_storage<B: Backend>(be: &B, shape: &[usize], seed: u64) -> Result<(), String> {
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    // Values with more bits than 16-bit storage holds, some halfway cases, and overflow for f16.
    let v: Vec<f32> = (0..len)
        .map(|i| match i % 5 {
            0 => (r.normal() * 3.0) as f32,
            1 => 1.0 + (2.0f32).powi(-8) * (r.below(3) as f32 + 0.5),
            2 => 70000.0 * if r.below(2) == 0 { 1.0 } else { -1.0 },
            3 => (r.normal() * 1e-3) as f32,
            _ => f32::from_bits(r.next_u64() as u32 & 0x7f7f_ffff),
        })
        .collect();
    for dtype in [DType::F16, DType::BF16] {
        let round = |x: f32| match dtype {
            DType::F16 => f16::from_f32(x).to_f32(),
            _ => bf16::from_f32(x).to_f32(),
        };
        let want: Vec<u32> = v.iter().map(|&x| round(x).to_bits()).collect();
        let t = be.tensor_float(shape, &v, dtype).map_err(|e| e.to_string())?;
        if TensorLike::dtype(&t) != dtype {
            return Err(format!("{dtype} upload reports {}", TensorLike::dtype(&t)));
        }
        let got: Vec<u32> = be.to_f32(&t).unwrap().iter().map(|x| x.to_bits()).collect();
        if got != want {
            return Err(format!("{dtype}: upload / read-back is not round-to-nearest-even"));
        }
        let mut w = be.tensor_float(shape, &vec![0.0; len], dtype).unwrap();
        be.write_f32(&mut w, &v).unwrap();
        if be.to_f32(&w).unwrap().iter().map(|x| x.to_bits()).collect::<Vec<_>>() != want {
            return Err(format!("{dtype}: write_f32 does not round to the storage type"));
        }
        let c = be.try_clone(&t).unwrap();
        let s = be.slice_batch(&t, 0, 1).unwrap();
        if TensorLike::dtype(&c) != dtype || TensorLike::dtype(&s) != dtype {
            return Err(format!("{dtype}: a clone or a slice changed the storage type"));
        }
        // add: the f32 sum of two stored values, rounded once.
        let sum = be.add(&t, &w).map_err(|e| e.to_string())?;
        let want_sum: Vec<u32> = want
            .iter()
            .map(|&b| {
                let x = f32::from_bits(b);
                round(x + x).to_bits()
            })
            .collect();
        let got_sum: Vec<u32> = be.to_f32(&sum).unwrap().iter().map(|x| x.to_bits()).collect();
        if got_sum
            .iter()
            .zip(&want_sum)
            .any(|(a, b)| a != b && !(f32::from_bits(*a).is_nan() && f32::from_bits(*b).is_nan()))
        {
            return Err(format!("{dtype}: add does not round its f32 sum once"));
        }
        // Operands of two storage types are refused.
        let f = be.tensor_f32(shape, &v).unwrap();
        if !matches!(be.add(&t, &f), Err(Error::DTypeMismatch { .. })) {
            return Err(format!("{dtype} + f32 was accepted"));
        }
    }
    Ok(())
}

pub(crate) fn check_elementwise<B: Backend>(be: &B, shape: &[usize], seed: u64) -> Result<(), String> {
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    let (a, b, dy) = (normals(&mut r, len, 1.0), normals(&mut r, len, 1.0), normals(&mut r, len, 1.0));
    let (ta, tb, tdy) =
        (be.tensor_f32(shape, &a).unwrap(), be.tensor_f32(shape, &b).unwrap(), be.tensor_f32(shape, &dy).unwrap());
    let want = relt::add(&wide(&a), &wide(&b));
    let sum = be.add(&ta, &tb).map_err(|e| e.to_string())?;
    assert_close("add", &read(be, &sum), &want, |i| 2.0 * U * want[i].abs())?;
    let y = be.relu(&ta).map_err(|e| e.to_string())?;
    let want_y = relt::relu(&wide(&a));
    assert_close("relu", &read(be, &y), &want_y, |_| 0.0)?;
    let dx = be.relu_backward(&tdy, &y).map_err(|e| e.to_string())?;
    assert_close("relu_backward", &read(be, &dx), &relt::relu_backward(&wide(&dy), &want_y), |_| 0.0)?;
    let mut longer = shape.to_vec();
    longer[0] += 1;
    let tl = be.zeros(&longer).unwrap();
    match be.add(&ta, &tl) {
        Err(Error::ShapeMismatch { .. }) => Ok(()),
        other => Err(format!("add of different shapes: {other:?}")),
    }
}

// ---- channel and batch slices -----------------------------------------------------------------

pub(crate) fn random_bits(r: &mut Rng, len: usize) -> Vec<f32> {
    (0..len).map(|_| f32::from_bits(r.next_u64() as u32)).collect()
}

pub(crate) fn check_channels<B: Backend>(
    be: &B,
    n: usize,
    h: usize,
    w: usize,
    widths: &[usize],
    seed: u64,
) -> Result<(), String> {
    let mut r = Rng(seed);
    let pix = n * h * w;
    let total: usize = widths.iter().sum();
    let host_parts: Vec<Vec<f32>> = widths.iter().map(|&c| random_bits(&mut r, pix * c)).collect();
    let parts: Vec<B::Tensor> =
        host_parts.iter().zip(widths).map(|(v, &c)| be.tensor_f32(&[n, h, w, c], v).unwrap()).collect();
    let refs: Vec<&B::Tensor> = parts.iter().collect();
    let cat = be.concat_channels(&refs).map_err(|e| e.to_string())?;
    if cat.shape() != [n, h, w, total] {
        return Err(format!("concat shape {:?}", cat.shape()));
    }
    let mut want = Vec::with_capacity(pix * total);
    for p in 0..pix {
        for (v, &c) in host_parts.iter().zip(widths) {
            want.extend(v[p * c..(p + 1) * c].iter().map(|x| x.to_bits()));
        }
    }
    if bits(be, &cat) != want {
        return Err("concat_channels is not the host concatenation bit for bit".into());
    }
    // Slicing each part back out, and one random slice, bit for bit.
    let mut offset = 0;
    for (part, &c) in parts.iter().zip(widths) {
        let s = be.slice_channels(&cat, offset, c).map_err(|e| e.to_string())?;
        if s.shape() != part.shape() || bits(be, &s) != bits(be, part) {
            return Err(format!("slice_channels({offset}, {c}) is not the part"));
        }
        offset += c;
    }
    let start = r.below(total);
    let len = 1 + r.below(total - start);
    let s = be.slice_channels(&cat, start, len).map_err(|e| e.to_string())?;
    let want_s: Vec<u32> = (0..pix).flat_map(|p| want[p * total + start..p * total + start + len].to_vec()).collect();
    if bits(be, &s) != want_s {
        return Err(format!("slice_channels({start}, {len}) differs"));
    }
    // i32 tensors (labels) concatenate the same way.
    let ints: Vec<i32> = (0..pix * 2).map(|i| i as i32 - 7).collect();
    let ti = be.tensor_i32(&[n, h, w, 2], &ints).unwrap();
    let both = be.concat_channels(&[&ti, &ti]).map_err(|e| e.to_string())?;
    let back = be.slice_channels(&both, 2, 2).map_err(|e| e.to_string())?;
    if be.to_i32(&back).unwrap() != ints {
        return Err("i32 channel concat/slice round trip".into());
    }
    // Typed errors.
    match be.slice_channels(&cat, start, total - start + 1) {
        Err(Error::InvalidArgument(_)) => {}
        other => return Err(format!("slice past the channels: {other:?}")),
    }
    let taller = be.zeros(&[n, h + 1, w, 1]).unwrap();
    match be.concat_channels(&[&cat, &taller]) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("concat of different spatial sizes: {other:?}")),
    }
    match be.concat_channels(&[&cat, &ti]) {
        Err(Error::DTypeMismatch { .. }) => {}
        other => return Err(format!("concat of f32 and i32: {other:?}")),
    }
    match be.concat_channels(&[]) {
        Err(Error::InvalidArgument(_)) => Ok(()),
        other => Err(format!("concat of nothing: {other:?}")),
    }
}

pub(crate) fn check_batch<B: Backend>(be: &B, shape: &[usize], cuts: &[usize], seed: u64) -> Result<(), String> {
    let mut r = Rng(seed);
    let len: usize = shape.iter().product();
    let per_sample = len / shape[0];
    let f = random_bits(&mut r, len);
    let i: Vec<i32> = (0..len).map(|_| r.next_u64() as i32).collect();
    // Split points: distinct, sorted, strictly inside the batch.
    let mut points: Vec<usize> = cuts.iter().map(|&c| c % shape[0]).filter(|&c| c > 0).collect();
    points.sort_unstable();
    points.dedup();
    let bounds: Vec<usize> = std::iter::once(0).chain(points).chain(std::iter::once(shape[0])).collect();
    for t in [be.tensor_f32(shape, &f).unwrap(), be.tensor_i32(shape, &i).unwrap()] {
        let all = bits(be, &t);
        let mut pieces = Vec::new();
        for win in bounds.windows(2) {
            let (start, count) = (win[0], win[1] - win[0]);
            let s = be.slice_batch(&t, start, count).map_err(|e| e.to_string())?;
            let mut want_shape = shape.to_vec();
            want_shape[0] = count;
            if s.shape() != want_shape || s.dtype() != t.dtype() {
                return Err(format!("slice_batch({start}, {count}): {:?} {}", s.shape(), s.dtype()));
            }
            if bits(be, &s) != all[start * per_sample..(start + count) * per_sample] {
                return Err(format!("slice_batch({start}, {count}) of {} differs", t.dtype()));
            }
            pieces.push(s);
        }
        let refs: Vec<&B::Tensor> = pieces.iter().collect();
        let back = be.concat_batch(&refs).map_err(|e| e.to_string())?;
        if back.shape() != shape || back.dtype() != t.dtype() || bits(be, &back) != all {
            return Err(format!("slice_batch / concat_batch round trip of {} differs", t.dtype()));
        }
        match be.slice_batch(&t, shape[0], 1) {
            Err(Error::InvalidArgument(_)) => {}
            other => return Err(format!("slice_batch past the end: {other:?}")),
        }
        match be.slice_batch(&t, 0, 0) {
            Err(Error::InvalidArgument(_)) => {}
            other => return Err(format!("empty slice_batch: {other:?}")),
        }
    }
    let mut other_shape = shape.to_vec();
    other_shape.push(2);
    let (a, b) = (be.zeros(shape).unwrap(), be.zeros(&other_shape).unwrap());
    match be.concat_batch(&[&a, &b]) {
        Err(Error::ShapeMismatch { .. }) => {}
        other => return Err(format!("concat_batch of different sample shapes: {other:?}")),
    }
    let ai = be.tensor_i32(shape, &i).unwrap();
    match be.concat_batch(&[&a, &ai]) {
        Err(Error::DTypeMismatch { .. }) => Ok(()),
        other => Err(format!("concat_batch of f32 and i32: {other:?}")),
    }
}
