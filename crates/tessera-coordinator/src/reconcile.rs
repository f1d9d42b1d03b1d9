//! Job kinds and how each one decides whether two results agree.

use tessera_protocol::{DType, Tensor, Work};

/// Embeddings agree when every pair of rows has at least this cosine similarity.
pub const EMBEDDING_MIN_COSINE: f64 = 0.999;

/// The kinds of job the coordinator runs; each brings its own result check and tolerance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Sentence embeddings: one L2-normalised F32 row per input.
    Embedding,
}

impl JobKind {
    pub fn name(self) -> &'static str {
        match self {
            JobKind::Embedding => "embedding",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "embedding" => Some(JobKind::Embedding),
            _ => None,
        }
    }

    /// Whether `result` has the shape `work` calls for; `Err` says what is wrong.
    pub fn check_shape(self, work: &Work, result: &Tensor) -> Result<(), String> {
        match (self, work) {
            (JobKind::Embedding, Work::Embedding { inputs, .. }) => {
                let dims = result.dims();
                if result.dtype() != DType::F32 || dims.len() != 2 || dims[1] == 0 {
                    return Err(format!(
                        "expected F32 [{}, hidden], got {:?} {dims:?}",
                        inputs.len(),
                        result.dtype()
                    ));
                }
                if dims[0] != inputs.len() as u64 {
                    return Err(format!("expected {} rows, got {}", inputs.len(), dims[0]));
                }
                Ok(())
            }
        }
    }

    /// Whether two results of this kind agree within the kind's tolerance.
    pub fn agree(self, a: &Tensor, b: &Tensor) -> bool {
        match self {
            JobKind::Embedding => embeddings_agree(a, b, EMBEDDING_MIN_COSINE),
        }
    }
}

/// Two `[rows, hidden]` F32 tensors agree when, row by row, their cosine similarity is at least
/// `min_cosine`. Different shapes, NaNs, or a zero row against a non-zero one disagree.
pub fn embeddings_agree(a: &Tensor, b: &Tensor, min_cosine: f64) -> bool {
    let dims = a.dims();
    if dims != b.dims() || dims.len() != 2 || dims[1] == 0 {
        return false;
    }
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 {
        return false;
    }
    let row_bytes = dims[1] as usize * 4;
    a.data()
        .chunks_exact(row_bytes)
        .zip(b.data().chunks_exact(row_bytes))
        .all(|(ra, rb)| {
            let (dot, na, nb) = row_products(ra, rb);
            if na == 0.0 || nb == 0.0 {
                na == 0.0 && nb == 0.0
            } else {
                // NaN compares false, so a NaN anywhere in the row disagrees.
                dot / (na.sqrt() * nb.sqrt()) >= min_cosine
            }
        })
}

/// Lanes summed independently, so the compiler can vectorize the f64 sums.
const LANES: usize = 8;

/// `(a·b, a·a, b·b)` of two rows of little-endian f32, summed in f64.
fn row_products(a: &[u8], b: &[u8]) -> (f64, f64, f64) {
    let f = |c: &[u8]| f64::from(f32::from_le_bytes([c[0], c[1], c[2], c[3]]));
    let (mut dot, mut na, mut nb) = ([0f64; LANES], [0f64; LANES], [0f64; LANES]);
    let (ca, cb) = (a.chunks_exact(4 * LANES), b.chunks_exact(4 * LANES));
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (xa, xb) in ca.zip(cb) {
        for k in 0..LANES {
            let (x, y) = (f(&xa[4 * k..]), f(&xb[4 * k..]));
            dot[k] += x * y;
            na[k] += x * x;
            nb[k] += y * y;
        }
    }
    for (xa, xb) in ta.chunks_exact(4).zip(tb.chunks_exact(4)) {
        let (x, y) = (f(xa), f(xb));
        dot[0] += x * y;
        na[0] += x * x;
        nb[0] += y * y;
    }
    let sum = |v: [f64; LANES]| v.iter().sum::<f64>();
    (sum(dot), sum(na), sum(nb))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(rows: u64, v: &[f32]) -> Tensor {
        Tensor::from_f32(vec![rows, v.len() as u64 / rows], v).unwrap()
    }

    fn check(a: &Tensor, b: &Tensor, expected: bool) {
        assert_eq!(JobKind::Embedding.agree(a, b), expected, "{a:?} vs {b:?}");
        assert_eq!(JobKind::Embedding.agree(b, a), expected, "{b:?} vs {a:?}");
    }

    #[test]
    fn cosine_tolerance() {
        // Rows longer than the lanes, with a remainder: 19 = 2 * 8 + 3.
        let long: Vec<f32> = (0..38).map(|i| ((i * 7) % 11) as f32 - 5.0).collect();
        let mut tilted = long.clone();
        // In the remainder lanes of the last row: cos 0.99748, then 0.99959.
        tilted[37] += 1.0;
        check(&t(2, &long), &t(2, &long), true);
        check(&t(2, &long), &t(2, &tilted), false);
        let mut small = long.clone();
        small[37] += 0.4;
        check(&t(2, &long), &t(2, &small), true);
        let base = t(2, &[1.0, 0.0, 0.0, 0.6, 0.8, 0.0]);
        check(&base, &base, true);
        // Scale does not matter, direction does.
        check(&base, &t(2, &[2.0, 0.0, 0.0, 0.3, 0.4, 0.0]), true);
        // cos = 1/sqrt(1 + 0.04^2) ≈ 0.9992: agrees; 0.05 gives 0.99875: does not.
        check(&base, &t(2, &[1.0, 0.04, 0.0, 0.6, 0.8, 0.0]), true);
        check(&base, &t(2, &[1.0, 0.05, 0.0, 0.6, 0.8, 0.0]), false);
        // One bad row is enough to disagree.
        check(&base, &t(2, &[1.0, 0.0, 0.0, 0.8, 0.6, 0.0]), false);
        check(&base, &t(2, &[1.0, 0.0, 0.0, 0.6, f32::NAN, 0.0]), false);
        check(&base, &t(2, &[1.0, 0.0, 0.0, 0.0, 0.0, 0.0]), false);
        check(&t(1, &[0.0, 0.0]), &t(1, &[0.0, 0.0]), true);
        // Shapes must match.
        check(&base, &t(3, &[1.0, 0.0, 0.0, 0.6, 0.8, 0.0]), false);
        let u = Tensor::new(DType::U32, vec![2, 3], vec![0; 24]).unwrap();
        check(&u, &u, false);
    }

    #[test]
    fn shape_check() {
        let work = Work::Embedding {
            model: "m".into(),
            inputs: vec![vec![1], vec![2]],
        };
        assert!(
            JobKind::Embedding
                .check_shape(&work, &t(2, &[0.0; 6]))
                .is_ok()
        );
        assert_eq!(
            JobKind::Embedding
                .check_shape(&work, &t(3, &[0.0; 6]))
                .unwrap_err(),
            "expected 2 rows, got 3"
        );
        let flat = Tensor::from_f32(vec![6], &[0.0; 6]).unwrap();
        assert_eq!(
            JobKind::Embedding.check_shape(&work, &flat).unwrap_err(),
            "expected F32 [2, hidden], got F32 [6]"
        );
    }
}
