//! Targeted scheduler cases: agreement, majority, deadlines, loss, duplicates, exclusion and
//! persistence before acknowledgement.

use std::sync::Arc;

use tessera_coordinator::{Config, JobOutcome, JobSpec, Millis, Output, Report, SchedulerError};
use tessera_protocol::{ContributorId, JobId, Tensor, UnitId, Work};

use crate::common::{Rng, caps, drain, honest, perturbed, scheduler};

fn c(i: u64) -> ContributorId {
    ContributorId(i)
}

fn one_unit_job(deadline_ms: u64) -> JobSpec {
    let mut spec = JobSpec::embedding("bafkreimodel", vec![vec![101, 5, 102], vec![101, 6, 102]]);
    spec.unit_deadline_ms = deadline_ms;
    spec
}

/// The assignments among `outputs`, as (contributor, unit, work).
fn assigns(outputs: &[Output]) -> Vec<(ContributorId, UnitId, Arc<Work>)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::Assign {
                contributor,
                unit,
                work,
                ..
            } => Some((*contributor, *unit, Arc::clone(work))),
            _ => None,
        })
        .collect()
}

fn accepted(outputs: &[Output]) -> Vec<(UnitId, Tensor)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::UnitAccepted { unit, result, .. } => Some((*unit, result.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn two_agreeing_results_accept_the_unit() {
    let mut s = scheduler(Config::default());
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    let job = s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let out = drain(&mut s);
    let a = assigns(&out);
    assert_eq!(a.len(), 2);
    assert_ne!(a[0].0, a[1].0);
    let result = honest(&a[0].2);
    assert_eq!(
        s.report(Millis(5), a[0].0, a[0].1, result.clone()).unwrap(),
        Report::Recorded
    );
    assert!(accepted(&drain(&mut s)).is_empty());
    assert_eq!(
        s.report(Millis(6), a[1].0, a[1].1, result.clone()).unwrap(),
        Report::Accepted
    );
    let out = drain(&mut s);
    assert_eq!(accepted(&out), vec![(a[0].1, result.clone())]);
    assert!(out.contains(&Output::JobDone { job }));
    assert_eq!(s.store().outcome(job), Some(&JobOutcome::Done));
    let stored: Vec<_> = s.store().accepted(job).cloned().collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].agreed, vec![a[0].0, a[1].0]);
    assert!(stored[0].rejected.is_empty());
    // Late and duplicate reports are harmless.
    assert_eq!(
        s.report(Millis(7), a[1].0, a[1].1, result).unwrap(),
        Report::Stale
    );
}

#[test]
fn disagreement_goes_to_a_third_contributor_and_the_majority_wins() {
    let mut rng = Rng(1);
    let mut s = scheduler(Config::default());
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s));
    let (honest_c, liar) = (a[0].0, a[1].0);
    let truth = honest(&a[0].2);
    assert_eq!(
        s.report(Millis(1), liar, a[1].1, perturbed(&a[1].2, &mut rng))
            .unwrap(),
        Report::Recorded
    );
    assert_eq!(
        s.report(Millis(2), honest_c, a[0].1, truth.clone())
            .unwrap(),
        Report::Recorded
    );
    let third = assigns(&drain(&mut s));
    assert_eq!(third.len(), 1, "one more replica after a disagreement");
    assert!(third[0].0 != honest_c && third[0].0 != liar);
    assert_eq!(
        s.report(Millis(3), third[0].0, third[0].1, truth.clone())
            .unwrap(),
        Report::Accepted
    );
    assert_eq!(accepted(&drain(&mut s)), vec![(a[0].1, truth)]);
    assert_eq!(s.contributor(liar).unwrap().2.rejected, 1);
    assert_eq!(s.contributor(honest_c).unwrap().2.agreed, 1);
    assert_eq!(s.contributor(third[0].0).unwrap().2.agreed, 1);
}

#[test]
fn a_contributor_never_gets_two_replicas_of_a_unit() {
    let mut rng = Rng(2);
    let mut s = scheduler(Config::default());
    // Two contributors with room for many units each.
    s.join(Millis(0), c(1), caps(4)).unwrap();
    s.join(Millis(0), c(2), caps(4)).unwrap();
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s));
    assert_eq!(a.len(), 2);
    s.report(Millis(1), a[0].0, a[0].1, honest(&a[0].2))
        .unwrap();
    s.report(Millis(2), a[1].0, a[1].1, perturbed(&a[1].2, &mut rng))
        .unwrap();
    // A third replica is needed, but both contributors already had one.
    assert!(assigns(&drain(&mut s)).is_empty());
    s.join(Millis(3), c(3), caps(1)).unwrap();
    let third = assigns(&drain(&mut s));
    assert_eq!(third.iter().map(|x| x.0).collect::<Vec<_>>(), vec![c(3)]);
}

#[test]
fn a_missed_deadline_reissues_and_a_late_result_still_counts() {
    let mut s = scheduler(Config::default());
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s));
    let truth = honest(&a[0].2);
    s.report(Millis(10), a[0].0, a[0].1, truth.clone()).unwrap();
    assert_eq!(s.poll_timeout(), Some(Millis(1000)));
    s.tick(Millis(999)).unwrap();
    assert!(drain(&mut s).is_empty());
    s.tick(Millis(1000)).unwrap();
    let re = assigns(&drain(&mut s));
    assert_eq!(re.len(), 1);
    assert!(re[0].0 != a[0].0 && re[0].0 != a[1].0);
    assert_eq!(s.contributor(a[1].0).unwrap().2.missed_deadlines, 1);
    // The slow contributor's late result arrives first and completes the quorum.
    assert_eq!(
        s.report(Millis(1100), a[1].0, a[1].1, truth).unwrap(),
        Report::Accepted
    );
    let out = drain(&mut s);
    assert!(
        out.contains(&Output::Cancel {
            contributor: re[0].0,
            unit: re[0].1
        }),
        "{out:?}"
    );
}

#[test]
fn a_silent_contributor_is_lost_and_its_units_reissued() {
    let config = Config {
        heartbeat_timeout_ms: 15_000,
        ..Config::default()
    };
    let mut s = scheduler(config);
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.submit(Millis(0), one_unit_job(60_000)).unwrap();
    let a = assigns(&drain(&mut s));
    let idle = (1..=3)
        .map(c)
        .find(|&x| x != a[0].0 && x != a[1].0)
        .unwrap();
    for t in [5_000, 10_000, 15_000] {
        s.heartbeat(Millis(t), a[0].0).unwrap();
        s.heartbeat(Millis(t), idle).unwrap();
    }
    assert_eq!(s.poll_timeout(), Some(Millis(15_000)));
    s.tick(Millis(15_000)).unwrap();
    let out = drain(&mut s);
    assert!(
        out.contains(&Output::ContributorLost {
            contributor: a[1].0
        }),
        "{out:?}"
    );
    assert_eq!(
        assigns(&out).iter().map(|x| (x.0, x.1)).collect::<Vec<_>>(),
        vec![(idle, a[1].1)]
    );
    assert_eq!(s.contributor_count(), 2);
    assert!(matches!(
        s.heartbeat(Millis(15_001), a[1].0),
        Err(SchedulerError::UnknownContributor(_))
    ));
    // Graceful leave reissues at once.
    s.leave(Millis(15_002), idle).unwrap();
    assert!(
        assigns(&drain(&mut s)).is_empty(),
        "no one left who has not had the unit"
    );
}

#[test]
fn duplicate_unsolicited_and_unknown_reports_are_ignored() {
    let mut s = scheduler(Config::default());
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s));
    let truth = honest(&a[0].2);
    assert_eq!(
        s.report(Millis(1), a[0].0, a[0].1, truth.clone()).unwrap(),
        Report::Recorded
    );
    assert_eq!(
        s.report(Millis(2), a[0].0, a[0].1, truth.clone()).unwrap(),
        Report::Duplicate
    );
    let other = (1..=3)
        .map(c)
        .find(|&x| x != a[0].0 && x != a[1].0)
        .unwrap();
    assert_eq!(
        s.report(Millis(3), other, a[0].1, truth.clone()).unwrap(),
        Report::NotAssigned
    );
    assert_eq!(
        s.report(Millis(3), a[0].0, UnitId(999), truth.clone())
            .unwrap(),
        Report::Stale
    );
    assert!(matches!(
        s.report(Millis(3), c(77), a[0].1, truth.clone()),
        Err(SchedulerError::UnknownContributor(_))
    ));
    // Neither the duplicate nor the stranger's result made a quorum.
    assert!(accepted(&drain(&mut s)).is_empty());
    assert_eq!(s.contributor(a[0].0).unwrap().2.duplicates, 1);
    assert_eq!(s.contributor(other).unwrap().2.unsolicited, 1);
    assert_eq!(
        s.report(Millis(4), a[1].0, a[1].1, truth).unwrap(),
        Report::Accepted
    );
}

#[test]
fn wrong_shapes_are_rejected_and_reissued() {
    let mut s = scheduler(Config::default());
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s));
    let wrong = Tensor::from_f32(vec![3, 2], &[0.5; 6]).unwrap();
    assert_eq!(
        s.report(Millis(1), a[0].0, a[0].1, wrong).unwrap(),
        Report::Invalid("expected 2 rows, got 3".into())
    );
    assert_eq!(s.contributor(a[0].0).unwrap().2.rejected, 1);
    assert_eq!(assigns(&drain(&mut s)).len(), 1);
}

#[test]
fn liars_are_excluded_after_losing_votes() {
    let mut rng = Rng(3);
    let config = Config {
        exclude_after_rejections: 2,
        ..Config::default()
    };
    let mut s = scheduler(config);
    s.join(Millis(0), c(1), caps(1)).unwrap();
    for i in 2..=4 {
        s.join(Millis(0), c(i), caps(4)).unwrap();
    }
    let mut spec = one_unit_job(1000);
    spec.inputs = (0..8).map(|i| vec![101, i, 102]).collect();
    spec.inputs_per_unit = 1;
    s.submit(Millis(0), spec).unwrap();
    let mut excluded = false;
    let mut t = 1;
    while !excluded {
        assert!(t < 200, "the liar was never excluded");
        t += 1;
        let out = drain(&mut s);
        excluded = out.contains(&Output::ContributorExcluded { contributor: c(1) });
        for (who, unit, work) in assigns(&out) {
            let r = if who == c(1) {
                perturbed(&work, &mut rng)
            } else {
                honest(&work)
            };
            if s.contributor(who).is_some() {
                s.report(Millis(t), who, unit, r).unwrap();
            }
        }
    }
    assert!(
        s.contributor(c(1)).is_none(),
        "an excluded contributor is disconnected"
    );
}

#[test]
fn nothing_is_acknowledged_unless_stored() {
    let mut s = scheduler(Config::default());
    for i in 1..=2 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.store().set_failing(true);
    assert!(matches!(
        s.submit(Millis(0), one_unit_job(1000)),
        Err(SchedulerError::Store(_))
    ));
    assert!(
        drain(&mut s).is_empty(),
        "a job that was not stored is not dispatched"
    );
    s.store().set_failing(false);
    let job = s.submit(Millis(0), one_unit_job(1000)).unwrap();
    assert_eq!(job, JobId(1), "the failed submission used no id");
    let a = assigns(&drain(&mut s));
    let truth = honest(&a[0].2);
    s.report(Millis(1), a[0].0, a[0].1, truth.clone()).unwrap();
    s.store().set_failing(true);
    assert!(matches!(
        s.report(Millis(2), a[1].0, a[1].1, truth.clone()),
        Err(SchedulerError::Store(_))
    ));
    assert!(drain(&mut s).is_empty(), "no acceptance without storage");
    s.store().set_failing(false);
    assert_eq!(
        s.report(Millis(3), a[1].0, a[1].1, truth).unwrap(),
        Report::Accepted
    );
    assert_eq!(s.store().outcome(job), Some(&JobOutcome::Done));
}

#[test]
fn a_unit_no_one_agrees_on_fails_its_job() {
    let mut rng = Rng(4);
    let config = Config {
        max_results_per_unit: 4,
        exclude_after_rejections: 0,
        ..Config::default()
    };
    let mut s = scheduler(config);
    for i in 1..=6 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    let job = s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let mut failed = None;
    for t in 1..10 {
        let out = drain(&mut s);
        if let Some(Output::JobFailed { reason, .. }) =
            out.iter().find(|o| matches!(o, Output::JobFailed { .. }))
        {
            failed = Some(reason.clone());
            break;
        }
        for (who, unit, work) in assigns(&out) {
            s.report(Millis(t), who, unit, perturbed(&work, &mut rng))
                .unwrap();
        }
    }
    assert_eq!(
        failed.as_deref(),
        Some("4 results without 2 agreeing within the embedding tolerance")
    );
    assert!(matches!(
        s.store().outcome(job),
        Some(JobOutcome::Failed(_))
    ));
    assert!(s.job_status(job).is_none());
}

#[test]
fn invalid_jobs_are_refused() {
    let mut s = scheduler(Config::default());
    let mut spec = one_unit_job(1000);
    spec.inputs.clear();
    assert_eq!(
        s.submit(Millis(0), spec).unwrap_err().to_string(),
        "invalid job: no inputs"
    );
    let mut spec = one_unit_job(1000);
    spec.replicas = 0;
    assert_eq!(
        s.submit(Millis(0), spec).unwrap_err().to_string(),
        "invalid job: replicas must be between 1 and 6, got 0"
    );
}
