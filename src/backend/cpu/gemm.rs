//! The one GEMM of the CPU backend: `matrixmultiply`'s f32 `sgemm` through ndarray's safe
//! [`general_mat_mul`], so this backend adds no `unsafe`.

use ndarray::linalg::general_mat_mul;
use ndarray::{ArrayView2, ArrayViewMut2, ShapeBuilder};

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

    fn view(self) -> ArrayView2<'a, f32> {
        ArrayView2::from_shape((self.rows, self.cols).strides((self.rs, self.cs)), self.data)
            .expect("a GEMM operand lies inside its slice by construction")
    }
}

/// `c = a · b` with `c` row-major `a.rows × b.cols`, f32 products and sums (matrixmultiply).
pub(crate) fn gemm(a: Mat<'_>, b: Mat<'_>, c: &mut [f32]) {
    let c = ArrayViewMut2::from_shape((a.rows, b.cols), c).expect("GEMM output sized by its caller");
    let mut c = c;
    general_mat_mul(1.0, &a.view(), &b.view(), 0.0, &mut c);
}
