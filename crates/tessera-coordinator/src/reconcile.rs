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
    let (Some(xa), Some(xb)) = (a.f32_values(), b.f32_values()) else {
        return false;
    };
    let hidden = dims[1] as usize;
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (i, (x, y)) in xa.zip(xb).enumerate() {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
        if (i + 1) % hidden == 0 {
            let agree = if na == 0.0 || nb == 0.0 {
                na == 0.0 && nb == 0.0
            } else {
                dot / (na.sqrt() * nb.sqrt()) >= min_cosine
            };
            if !agree {
                return false;
            }
            (dot, na, nb) = (0.0, 0.0, 0.0);
        }
    }
    true
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
