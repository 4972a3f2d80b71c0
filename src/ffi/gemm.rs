//! The one GEMM of the CPU backend: the `gemm` crate's packed f32 kernels (AVX2 + FMA or
//! AVX-512, picked at run time), always single-threaded. Callers parallelise over independent
//! output blocks whose sizes depend on the shapes only, so that every output element is one
//! call's sum in one fixed order whatever the thread count (the crate's own threading may cut
//! the work differently per thread count).
//!
//! `gemm::gemm` takes raw pointers and strides; [`gemm_into`] is its safe face: it checks that
//! every element the strides reach lies inside the slices before the call.

/// A strided f32 matrix view: element (i, j) at `data[i·rs + j·cs]`.
#[derive(Clone, Copy)]
pub(crate) struct Mat<'a> {
    pub(crate) data: &'a [f32],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a> Mat<'a> {
    pub(crate) fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows, cols, rs: cols, cs: 1 }
    }

    /// The transpose of the row-major `rows × cols` matrix in `data`.
    pub(crate) fn transposed(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Mat { data, rows: cols, cols: rows, rs: 1, cs: cols }
    }
}

/// One past the largest index a `rows × cols` view with strides `(rs, cs)` reaches (0 when
/// empty).
fn extent(rows: usize, cols: usize, rs: usize, cs: usize) -> usize {
    if rows == 0 || cols == 0 {
        0
    } else {
        (rows - 1) * rs + (cols - 1) * cs + 1
    }
}

/// `c = a · b` (or `c += a · b` with `accumulate`), `c` row-major `a.rows × b.cols` with row
/// stride `ldc ≥ b.cols`: f32 products and sums.
pub(crate) fn gemm_into(a: Mat<'_>, b: Mat<'_>, c: &mut [f32], ldc: usize, accumulate: bool) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(b.rows, k, "GEMM inner dimensions");
    assert!(ldc >= n, "GEMM output row stride");
    assert!(extent(m, k, a.rs, a.cs) <= a.data.len(), "GEMM left operand outside its slice");
    assert!(extent(k, n, b.rs, b.cs) <= b.data.len(), "GEMM right operand outside its slice");
    assert!(extent(m, n, ldc, 1) <= c.len(), "GEMM output outside its slice");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.chunks_mut(ldc).take(m).for_each(|row| row[..n].fill(0.0));
        }
        return;
    }
    let s = |v: usize| v as isize;
    // SAFETY: the asserts above put every element (i, p) of a, (p, j) of b and (i, j) of c that
    // the kernel touches (i < m, p < k, j < n, non-negative strides) inside its slice; `c` is
    // borrowed mutably, so it aliases neither operand; with `read_dst` false the kernel only
    // writes c, with it true it reads c's elements, which are initialised f32s.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            s(ldc),
            accumulate,
            a.data.as_ptr(),
            s(a.cs),
            s(a.rs),
            b.data.as_ptr(),
            s(b.cs),
            s(b.rs),
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// `c = a · b` with `c` row-major `a.rows × b.cols`.
pub(crate) fn gemm(a: Mat<'_>, b: Mat<'_>, c: &mut [f32]) {
    let n = b.cols;
    gemm_into(a, b, c, n, false);
}
