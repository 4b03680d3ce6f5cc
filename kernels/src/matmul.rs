//! A bounds-checked, single-threaded front for the `gemm` crate's float32 matrix product, so
//! that a kernel can multiply small strided blocks inside its own rayon task (candle's matmul
//! takes whole tensors and spreads each product over every thread).
//!
//! The crate's only `unsafe`: `gemm::gemm` takes raw pointers and strides. [`matmul`] checks,
//! before the call, that every element the product reads or writes lies inside the slices it was
//! given, so no caller can make it touch memory outside them.
#![allow(unsafe_code)]

/// A `rows × cols` matrix read from `data`: element (i, j) is `data[i·row_stride + j·col_stride]`.
#[derive(Debug, Clone, Copy)]
pub struct Mat<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

/// A `rows × cols` matrix written into `data`, laid out as [`Mat`].
#[derive(Debug)]
pub struct MatMut<'a> {
    pub data: &'a mut [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> Mat<'a> {
    /// Rows `row_stride` apart, each row's elements adjacent.
    pub fn rows(data: &'a [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }
}

impl<'a> MatMut<'a> {
    /// Rows `row_stride` apart, each row's elements adjacent.
    pub fn rows(data: &'a mut [f32], rows: usize, cols: usize, row_stride: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            row_stride,
            col_stride: 1,
        }
    }
}

/// Whether every element (i, j), i < rows, j < cols, at `i·rs + j·cs` is below `len`, with
/// strides small enough for `isize`.
fn fits(len: usize, rows: usize, cols: usize, rs: usize, cs: usize) -> bool {
    if isize::try_from(rs).is_err() || isize::try_from(cs).is_err() {
        return false;
    }
    if rows == 0 || cols == 0 {
        return true;
    }
    (rows - 1)
        .checked_mul(rs)
        .zip((cols - 1).checked_mul(cs))
        .and_then(|(a, b)| a.checked_add(b))
        .is_some_and(|last| last < len)
}

/// `dst = scale · lhs · rhs`, overwriting `dst`, on the calling thread (gemm picks its AVX-512,
/// AVX2 or baseline micro-kernel at run time). Panics if the shapes do not chain or a matrix
/// does not fit in its slice.
pub fn matmul(dst: MatMut<'_>, lhs: Mat<'_>, rhs: Mat<'_>, scale: f32) {
    let (m, n, k) = (dst.rows, dst.cols, lhs.cols);
    assert!(
        lhs.rows == m && rhs.rows == k && rhs.cols == n,
        "matmul: {m}×{n} = {}×{} · {}×{}",
        lhs.rows,
        lhs.cols,
        rhs.rows,
        rhs.cols
    );
    assert!(
        fits(dst.data.len(), m, n, dst.row_stride, dst.col_stride)
            && fits(lhs.data.len(), m, k, lhs.row_stride, lhs.col_stride)
            && fits(rhs.data.len(), k, n, rhs.row_stride, rhs.col_stride),
        "matmul: a matrix does not fit in its slice"
    );
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty sum; gemm is not asked about that case.
        for i in 0..m {
            for j in 0..n {
                dst.data[i * dst.row_stride + j * dst.col_stride] = 0.0;
            }
        }
        return;
    }
    // `fits` checked the strides convert; `as` cannot wrap below.
    let s = |x: usize| x as isize;
    // SAFETY: `fits` established above that every element the product touches, (i, j) at
    // i·row_stride + j·col_stride for the shapes gemm is given, is inside the matching slice:
    // `dst` is written only through its `&mut` slice (no other reference to it exists for this
    // call) and `lhs`/`rhs` are only read. `read_dst = false`, so `dst`'s old values are never
    // read (they may be anything). `Parallelism::None` keeps the call on this thread, so the
    // pointers do not cross threads. gemm supports any strides, including 0 and overlapping
    // rows of the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.data.as_mut_ptr(),
            s(dst.col_stride),
            s(dst.row_stride),
            false,
            lhs.data.as_ptr(),
            s(lhs.col_stride),
            s(lhs.row_stride),
            rhs.data.as_ptr(),
            s(rhs.col_stride),
            s(rhs.row_stride),
            0.0,
            scale,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        out
    }

    #[test]
    fn strided_products_match_the_naive_one() {
        let (m, k, n) = (5, 7, 9);
        let a: Vec<f32> = (0..m * k).map(|i| (i % 11) as f32 - 5.0).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 7) as f32 * 0.5 - 1.0).collect();
        let want = naive(&a, &b, m, k, n);
        // rhs given transposed (column-major), dst written into every other column of a wider
        // buffer that keeps its other values.
        let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
        let mut dst = vec![7f32; m * n * 2];
        matmul(
            MatMut {
                data: &mut dst,
                rows: m,
                cols: n,
                row_stride: 2 * n,
                col_stride: 2,
            },
            Mat {
                data: &a,
                rows: m,
                cols: k,
                row_stride: k,
                col_stride: 1,
            },
            Mat {
                data: &bt,
                rows: k,
                cols: n,
                row_stride: 1,
                col_stride: k,
            },
            0.5,
        );
        for i in 0..m {
            for j in 0..n {
                assert_eq!(dst[i * 2 * n + 2 * j], 0.5 * want[i * n + j], "({i}, {j})");
                assert_eq!(dst[i * 2 * n + 2 * j + 1], 7.0);
            }
        }
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn a_matrix_past_its_slice_is_refused() {
        let a = [1f32; 6];
        let mut dst = [0f32; 4];
        let mat = |rows, cols| Mat {
            data: &a,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        };
        // lhs claims 3×3 of a 6-element slice.
        matmul(
            MatMut {
                data: &mut dst,
                rows: 3,
                cols: 1,
                row_stride: 1,
                col_stride: 1,
            },
            mat(3, 3),
            mat(3, 1),
            1.0,
        );
    }

    #[test]
    fn an_empty_inner_dimension_gives_zeros() {
        let mut dst = [3f32; 4];
        let empty: [f32; 0] = [];
        let mat = |rows, cols| Mat {
            data: &empty,
            rows,
            cols,
            row_stride: 0,
            col_stride: 0,
        };
        matmul(
            MatMut {
                data: &mut dst,
                rows: 2,
                cols: 2,
                row_stride: 2,
                col_stride: 1,
            },
            mat(2, 0),
            mat(0, 2),
            1.0,
        );
        assert_eq!(dst, [0.0; 4]);
    }
}
