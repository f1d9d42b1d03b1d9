//! `bench_round_trip` runs end to end and its figures are ordered (no speed is asserted).

use tessera_rtc::bench_round_trip;

use crate::bounded;

#[tokio::test]
async fn bench_round_trip_reports_ordered_figures() {
    let figures = bounded(bench_round_trip(20, 64 * 1024))
        .await
        .expect("bench runs");
    assert_eq!((figures.iterations, figures.frame_len), (20, 64 * 1024));
    assert!(figures.min <= figures.median, "{figures}");
    assert!(figures.median <= figures.p99, "{figures}");
    assert!(figures.p99 <= figures.max, "{figures}");
    assert!(!figures.min.is_zero(), "{figures}");
}
