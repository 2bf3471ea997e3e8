//! The GEMM contract of cuBLAS (`cublasGemmEx` with bf16 A and B, f32 C, f32 compute), checked
//! on the host the way cuBLAS checks it, so the emulated device's reference GEMM and a real
//! cuBLAS call take the same descriptor and refuse the same mistakes.
//!
//! Column-major: `C[m x n] = alpha * op(A) * op(B) + beta * C`, `op(X)` = X or its transpose.
//! A row-major `y[tokens][out] = x[tokens][in] . W[out][in]^T` is
//! `(transa = T, transb = N, m = out, n = tokens, k = in, lda = in, ldb = in, ldc = out)`:
//! see [`GemmBf16::linear`].

use super::device::DeviceSlice;

/// One bf16 GEMM with f32 output and accumulation.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GemmBf16 {
    /// op(A) = A^T.
    pub transa: bool,
    /// op(B) = B^T.
    pub transb: bool,
    /// Rows of op(A) and C.
    pub m: usize,
    /// Columns of op(B) and C.
    pub n: usize,
    /// Columns of op(A), rows of op(B).
    pub k: usize,
    /// Scale of the product.
    pub alpha: f32,
    /// bf16, column-major with leading dimension `lda`.
    pub a: DeviceSlice,
    /// Leading dimension of A.
    pub lda: usize,
    /// bf16, column-major with leading dimension `ldb`.
    pub b: DeviceSlice,
    /// Leading dimension of B.
    pub ldb: usize,
    /// Scale of C's old value (0: C is only written).
    pub beta: f32,
    /// f32, column-major with leading dimension `ldc`.
    pub c: DeviceSlice,
    /// Leading dimension of C.
    pub ldc: usize,
}

impl GemmBf16 {
    /// Row-major `y[tokens][out] = x[tokens][inp] . w[out][inp]^T` (x and w bf16, y f32).
    pub fn linear(
        x: DeviceSlice,
        w: DeviceSlice,
        y: DeviceSlice,
        tokens: usize,
        inp: usize,
        out: usize,
    ) -> GemmBf16 {
        GemmBf16 {
            transa: true,
            transb: false,
            m: out,
            n: tokens,
            k: inp,
            alpha: 1.0,
            a: w,
            lda: inp,
            b: x,
            ldb: inp,
            beta: 0.0,
            c: y,
            ldc: out,
        }
    }

    /// Rows and columns of A and B as stored: (rows, cols) of the column-major matrix.
    fn stored(&self) -> ((usize, usize), (usize, usize)) {
        let a = if self.transa {
            (self.k, self.m)
        } else {
            (self.m, self.k)
        };
        let b = if self.transb {
            (self.n, self.k)
        } else {
            (self.k, self.n)
        };
        (a, b)
    }

    /// cuBLAS's argument checks (`CUBLAS_STATUS_INVALID_VALUE` cases) and the buffer sizes
    /// the dimensions imply.
    pub fn check(&self) -> Result<(), String> {
        if self.m == 0 || self.n == 0 || self.k == 0 {
            return Err(format!("empty GEMM m={} n={} k={}", self.m, self.n, self.k));
        }
        // cuBLAS takes 32-bit sizes.
        let dims = [self.m, self.n, self.k, self.lda, self.ldb, self.ldc];
        if dims.iter().any(|&d| d > i32::MAX as usize) {
            return Err(format!("a GEMM dimension exceeds i32: {dims:?}"));
        }
        let ((a_rows, a_cols), (b_rows, b_cols)) = self.stored();
        if self.lda < a_rows.max(1) {
            return Err(format!(
                "lda {} < {} (rows of A as stored)",
                self.lda, a_rows
            ));
        }
        if self.ldb < b_rows.max(1) {
            return Err(format!(
                "ldb {} < {} (rows of B as stored)",
                self.ldb, b_rows
            ));
        }
        if self.ldc < self.m.max(1) {
            return Err(format!("ldc {} < m = {}", self.ldc, self.m));
        }
        let span = |ld: usize, rows: usize, cols: usize| ld * (cols - 1) + rows;
        let check = |what: &str, s: &DeviceSlice, elems: usize, size: usize| {
            if s.is_null() || s.bytes < elems * size {
                Err(format!(
                    "{what} holds {} bytes, the GEMM reaches {}",
                    s.bytes,
                    elems * size
                ))
            } else {
                Ok(())
            }
        };
        check("A", &self.a, span(self.lda, a_rows, a_cols), 2)?;
        check("B", &self.b, span(self.ldb, b_rows, b_cols), 2)?;
        check("C", &self.c, span(self.ldc, self.m, self.n), 4)?;
        Ok(())
    }
}
