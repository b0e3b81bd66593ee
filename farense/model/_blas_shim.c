/* farense's BLAS shim: the three standard CBLAS functions MLX's CPU backend calls, forwarded to
 * scipy-openblas32, which exports them under a scipy_ prefix.
 *
 * farense/blas.py compiles this once per machine, loads scipy-openblas32 with RTLD_GLOBAL, then
 * this file's library with RTLD_GLOBAL, all before mlx is imported: libmlx.so's undefined
 * cblas_sgemm/dgemm/cgemm then bind here instead of to its bundled reference BLAS. The scipy_
 * symbols stay undefined in this library; the dynamic linker finds them in the OpenBLAS already
 * in the global namespace, so the shim depends on no path and no header.
 *
 * farense_cblas_calls counts the forwarded calls, so that a test can prove MLX really comes here.
 */

typedef int blasint; /* scipy-openblas32: 32-bit integers (the 64 in scipy-openblas64 is its ints) */

void scipy_cblas_sgemm(int order, int transa, int transb, blasint m, blasint n, blasint k, float alpha,
                       const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c,
                       blasint ldc);
void scipy_cblas_dgemm(int order, int transa, int transb, blasint m, blasint n, blasint k, double alpha,
                       const double *a, blasint lda, const double *b, blasint ldb, double beta, double *c,
                       blasint ldc);
void scipy_cblas_cgemm(int order, int transa, int transb, blasint m, blasint n, blasint k, const void *alpha,
                       const void *a, blasint lda, const void *b, blasint ldb, const void *beta, void *c,
                       blasint ldc);

unsigned long farense_cblas_calls = 0;

#define COUNT() __atomic_fetch_add(&farense_cblas_calls, 1, __ATOMIC_RELAXED)

void cblas_sgemm(int order, int transa, int transb, blasint m, blasint n, blasint k, float alpha,
                 const float *a, blasint lda, const float *b, blasint ldb, float beta, float *c, blasint ldc) {
    COUNT();
    scipy_cblas_sgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_dgemm(int order, int transa, int transb, blasint m, blasint n, blasint k, double alpha,
                 const double *a, blasint lda, const double *b, blasint ldb, double beta, double *c, blasint ldc) {
    COUNT();
    scipy_cblas_dgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void cblas_cgemm(int order, int transa, int transb, blasint m, blasint n, blasint k, const void *alpha,
                 const void *a, blasint lda, const void *b, blasint ldb, const void *beta, void *c, blasint ldc) {
    COUNT();
    scipy_cblas_cgemm(order, transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
