//! Targeted scheduler cases: agreement, majority, deadlines, loss, duplicates, exclusion, and
//! group commit: nothing acknowledged before a flush commits it, failed flushes, a restart
//! between staging and flushing.

use std::sync::Arc;

use tessera_coordinator::{
    Config, JobOutcome, JobSpec, MemoryStore, Millis, Output, Report, Scheduler, SchedulerError,
    Store,
};
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
    let out = drain(&mut s, Millis(0));
    let a = assigns(&out);
    assert_eq!(a.len(), 2);
    assert_ne!(a[0].0, a[1].0);
    let result = honest(&a[0].2);
    assert_eq!(
        s.report(Millis(5), a[0].0, a[0].1, result.clone()).unwrap(),
        Report::Recorded
    );
    assert!(accepted(&drain(&mut s, Millis(5))).is_empty());
    assert_eq!(
        s.report(Millis(6), a[1].0, a[1].1, result.clone()).unwrap(),
        Report::Accepted
    );
    let out = drain(&mut s, Millis(6));
    assert_eq!(accepted(&out), vec![(a[0].1, result.clone())]);
    assert_eq!(votes(&out), vec![(a[0].1, vec![a[0].0, a[1].0], vec![])]);
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
    let a = assigns(&drain(&mut s, Millis(0)));
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
    let third = assigns(&drain(&mut s, Millis(2)));
    assert_eq!(third.len(), 1, "one more replica after a disagreement");
    assert!(third[0].0 != honest_c && third[0].0 != liar);
    assert_eq!(
        s.report(Millis(3), third[0].0, third[0].1, truth.clone())
            .unwrap(),
        Report::Accepted
    );
    assert_eq!(accepted(&drain(&mut s, Millis(3))), vec![(a[0].1, truth)]);
    assert_eq!(s.contributor(liar).unwrap().2.rejected, 1);
    assert_eq!(s.contributor(honest_c).unwrap().2.agreed, 1);
    assert_eq!(s.contributor(third[0].0).unwrap().2.agreed, 1);
}

/// Who agreed and who was rejected, per accepted unit among `outputs`.
fn votes(outputs: &[Output]) -> Vec<(UnitId, Vec<ContributorId>, Vec<ContributorId>)> {
    outputs
        .iter()
        .filter_map(|o| match o {
            Output::UnitAccepted {
                unit,
                agreed,
                rejected,
                ..
            } => Some((*unit, agreed.clone(), rejected.clone())),
            _ => None,
        })
        .collect()
}

/// The shell sends each contributor that reported on a unit one verdict, from `UnitAccepted`:
/// the wrong-shaped and the outvoted results are rejected, each counted once in reputations,
/// and a result that arrives after the decision is in neither list.
#[test]
fn the_accepted_unit_names_who_agreed_and_who_was_rejected() {
    let mut rng = Rng(5);
    let mut s = scheduler(Config::default());
    for i in 1..=5 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    let job = s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let first = assigns(&drain(&mut s, Millis(0)));
    assert_eq!(first.len(), 2);
    let (unit, work) = (first[0].1, Arc::clone(&first[0].2));
    let (malformed, liar) = (first[0].0, first[1].0);
    let wrong = Tensor::from_f32(vec![3, 2], &[0.5; 6]).unwrap();
    assert!(matches!(
        s.report(Millis(1), malformed, unit, wrong).unwrap(),
        Report::Invalid(_)
    ));
    let second = assigns(&drain(&mut s, Millis(1)));
    assert_eq!(second.len(), 1, "the wrong shape is replaced");
    let honest_1 = second[0].0;
    s.report(Millis(2), liar, unit, perturbed(&work, &mut rng))
        .unwrap();
    s.report(Millis(3), honest_1, unit, honest(&work)).unwrap();
    let third = assigns(&drain(&mut s, Millis(3)));
    assert_eq!(third.len(), 1, "a disagreement gets one more replica");
    let honest_2 = third[0].0;
    assert_eq!(
        s.report(Millis(4), honest_2, unit, honest(&work)).unwrap(),
        Report::Accepted
    );
    // A late result from someone who was never asked changes nothing.
    let late = (1..=5)
        .map(c)
        .find(|x| ![malformed, liar, honest_1, honest_2].contains(x))
        .unwrap();
    assert_eq!(
        s.report(Millis(5), late, unit, honest(&work)).unwrap(),
        Report::Stale
    );
    let out = drain(&mut s, Millis(5));
    assert_eq!(
        votes(&out),
        vec![(unit, vec![honest_1, honest_2], vec![liar, malformed])]
    );
    let stored: Vec<_> = s.store().accepted(job).cloned().collect();
    assert_eq!(
        (stored[0].agreed.clone(), stored[0].rejected.clone()),
        (vec![honest_1, honest_2], vec![liar, malformed])
    );
    let reputation = |who| s.contributor(who).unwrap().2;
    for (who, agreed, rejected) in [
        (malformed, 0, 1),
        (liar, 0, 1),
        (honest_1, 1, 0),
        (honest_2, 1, 0),
        (late, 0, 0),
    ] {
        let r = reputation(who);
        assert_eq!(
            (r.agreed, r.rejected),
            (agreed, rejected),
            "contributor {who}"
        );
    }
}

#[test]
fn a_contributor_never_gets_two_replicas_of_a_unit() {
    let mut rng = Rng(2);
    let mut s = scheduler(Config::default());
    // Two contributors with room for many units each.
    s.join(Millis(0), c(1), caps(4)).unwrap();
    s.join(Millis(0), c(2), caps(4)).unwrap();
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s, Millis(0)));
    assert_eq!(a.len(), 2);
    s.report(Millis(1), a[0].0, a[0].1, honest(&a[0].2))
        .unwrap();
    s.report(Millis(2), a[1].0, a[1].1, perturbed(&a[1].2, &mut rng))
        .unwrap();
    // A third replica is needed, but both contributors already had one.
    assert!(assigns(&drain(&mut s, Millis(2))).is_empty());
    s.join(Millis(3), c(3), caps(1)).unwrap();
    let third = assigns(&drain(&mut s, Millis(3)));
    assert_eq!(third.iter().map(|x| x.0).collect::<Vec<_>>(), vec![c(3)]);
}

#[test]
fn a_missed_deadline_reissues_and_a_late_result_still_counts() {
    let mut s = scheduler(Config::default());
    for i in 1..=3 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.submit(Millis(0), one_unit_job(1000)).unwrap();
    let a = assigns(&drain(&mut s, Millis(0)));
    let truth = honest(&a[0].2);
    s.report(Millis(10), a[0].0, a[0].1, truth.clone()).unwrap();
    assert_eq!(s.poll_timeout(), Some(Millis(1000)));
    s.tick(Millis(999)).unwrap();
    assert!(drain(&mut s, Millis(999)).is_empty());
    s.tick(Millis(1000)).unwrap();
    let re = assigns(&drain(&mut s, Millis(1000)));
    assert_eq!(re.len(), 1);
    assert!(re[0].0 != a[0].0 && re[0].0 != a[1].0);
    assert_eq!(s.contributor(a[1].0).unwrap().2.missed_deadlines, 1);
    // The slow contributor's late result arrives first and completes the quorum.
    assert_eq!(
        s.report(Millis(1100), a[1].0, a[1].1, truth).unwrap(),
        Report::Accepted
    );
    let out = drain(&mut s, Millis(1100));
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
    let a = assigns(&drain(&mut s, Millis(0)));
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
    let out = drain(&mut s, Millis(15_000));
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
        assigns(&drain(&mut s, Millis(15_002))).is_empty(),
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
    let a = assigns(&drain(&mut s, Millis(0)));
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
    assert!(accepted(&drain(&mut s, Millis(3))).is_empty());
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
    let a = assigns(&drain(&mut s, Millis(0)));
    let wrong = Tensor::from_f32(vec![3, 2], &[0.5; 6]).unwrap();
    assert_eq!(
        s.report(Millis(1), a[0].0, a[0].1, wrong).unwrap(),
        Report::Invalid("expected 2 rows, got 3".into())
    );
    assert_eq!(s.contributor(a[0].0).unwrap().2.rejected, 1);
    assert_eq!(assigns(&drain(&mut s, Millis(1))).len(), 1);
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
        let out = drain(&mut s, Millis(t));
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

/// Every output, without flushing.
fn take(s: &mut Scheduler<MemoryStore>) -> Vec<Output> {
    std::iter::from_fn(|| s.poll()).collect()
}

fn acknowledgements(outputs: &[Output]) -> usize {
    outputs
        .iter()
        .filter(|o| {
            matches!(
                o,
                Output::UnitAccepted { .. } | Output::JobDone { .. } | Output::JobFailed { .. }
            )
        })
        .count()
}

#[test]
fn nothing_is_acknowledged_until_a_flush_commits_it() {
    let mut s = scheduler(Config::default());
    for i in 1..=2 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    s.store().set_failing(true);
    let job = s.submit(Millis(0), one_unit_job(1000)).unwrap();
    assert_eq!(job, JobId(1));
    assert!(s.needs_flush());
    assert!(matches!(s.flush(Millis(0)), Err(SchedulerError::Store(_))));
    assert!(
        take(&mut s).is_empty(),
        "a job not stored is not dispatched"
    );
    assert_eq!(s.job_status(job).map(|j| j.units_total), Some(1));
    // The next flush commits the batch that failed.
    s.store().set_failing(false);
    let a = assigns(&drain(&mut s, Millis(1)));
    assert_eq!(a.len(), 2);
    assert_eq!(s.store().commits(), 1);
    let truth = honest(&a[0].2);
    assert_eq!(
        s.report(Millis(2), a[0].0, a[0].1, truth.clone()).unwrap(),
        Report::Recorded
    );
    assert_eq!(
        s.report(Millis(3), a[1].0, a[1].1, truth.clone()).unwrap(),
        Report::Accepted
    );
    // Accepted and staged, not released.
    assert_eq!(acknowledgements(&take(&mut s)), 0);
    assert!(!s.store().is_accepted(job, 0));
    assert_eq!(
        (s.unflushed().accepted.len(), s.unflushed().finished.len()),
        (1, 1)
    );
    // A failed commit releases nothing and keeps the batch whole.
    s.store().set_failing(true);
    assert!(matches!(s.flush(Millis(4)), Err(SchedulerError::Store(_))));
    assert!(take(&mut s).is_empty());
    assert_eq!(s.unflushed().len(), 2);
    assert_eq!(s.store().outcome(job), None);
    // The unit is decided: a late report is stale, never a second acceptance.
    assert_eq!(
        s.report(Millis(5), a[0].0, a[0].1, truth.clone()).unwrap(),
        Report::Stale
    );
    s.store().set_failing(false);
    let out = drain(&mut s, Millis(6));
    assert_eq!(accepted(&out), vec![(a[0].1, truth)]);
    assert_eq!(out.last(), Some(&Output::JobDone { job }));
    assert_eq!(acknowledgements(&out), 2);
    assert_eq!(
        s.store().commits(),
        2,
        "the unit and the job's end in one commit"
    );
    assert!(s.store().is_accepted(job, 0));
    assert_eq!(s.store().outcome(job), Some(&JobOutcome::Done));
    assert!(!s.needs_flush());
    assert!(drain(&mut s, Millis(7)).is_empty());
}

#[test]
fn a_burst_of_acceptances_is_one_commit() {
    let mut s = scheduler(Config::default());
    for i in 1..=16 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    let mut spec = one_unit_job(1000);
    spec.inputs = (0..8).map(|i| vec![101, i, 102]).collect();
    spec.inputs_per_unit = 1;
    let job = s.submit(Millis(0), spec).unwrap();
    let a = assigns(&drain(&mut s, Millis(0)));
    assert_eq!(a.len(), 16);
    let commits = s.store().commits();
    for (who, unit, work) in &a {
        s.report(Millis(1), *who, *unit, honest(work)).unwrap();
    }
    assert_eq!(acknowledgements(&take(&mut s)), 0);
    let out = drain(&mut s, Millis(2));
    assert_eq!(s.store().commits(), commits + 1);
    assert_eq!(accepted(&out).len(), 8);
    assert_eq!(out.last(), Some(&Output::JobDone { job }));
}

#[test]
fn accepted_but_unflushed_units_are_done_again_after_a_restart() {
    let mut s = scheduler(Config::default());
    for i in 1..=4 {
        s.join(Millis(0), c(i), caps(1)).unwrap();
    }
    let mut spec = one_unit_job(1000);
    spec.inputs = (0..2).map(|i| vec![101, i, 102]).collect();
    spec.inputs_per_unit = 1;
    let job = s.submit(Millis(0), spec).unwrap();
    let a = assigns(&drain(&mut s, Millis(0)));
    assert_eq!(a.len(), 4);
    let index_of = |u: UnitId| u.0 - a.iter().map(|x| x.1.0).min().unwrap();
    // Unit 0 is accepted and flushed; unit 1 is accepted but only staged.
    for (who, unit, work) in a.iter().filter(|x| index_of(x.1) == 0) {
        s.report(Millis(1), *who, *unit, honest(work)).unwrap();
    }
    assert_eq!(accepted(&drain(&mut s, Millis(1))).len(), 1);
    for (who, unit, work) in a.iter().filter(|x| index_of(x.1) == 1) {
        s.report(Millis(2), *who, *unit, honest(work)).unwrap();
    }
    assert_eq!(s.unflushed().accepted.len(), 1);
    let staged = take(&mut s);
    assert_eq!(acknowledgements(&staged), 0, "{staged:?}");

    // The coordinator stops before the next flush.
    let store = s.into_store();
    let mut s = Scheduler::restore(Config::default(), store, Millis(10)).unwrap();
    assert_eq!(
        s.job_status(job).map(|j| (j.units_accepted, j.units_total)),
        Some((1, 2))
    );
    for i in 5..=6 {
        s.join(Millis(10), c(i), caps(1)).unwrap();
    }
    let again = assigns(&drain(&mut s, Millis(10)));
    assert_eq!(again.len(), 2, "unit 1 handed out again, to both replicas");
    assert!(again.iter().all(|x| index_of(x.1) == 1));
    for (who, unit, work) in &again {
        s.report(Millis(11), *who, *unit, honest(work)).unwrap();
    }
    let out = drain(&mut s, Millis(11));
    let indices: Vec<u32> = out
        .iter()
        .filter_map(|o| match o {
            Output::UnitAccepted { index, .. } => Some(*index),
            _ => None,
        })
        .collect();
    assert_eq!(
        indices,
        vec![1],
        "only the unflushed unit is accepted again"
    );
    assert_eq!(out.last(), Some(&Output::JobDone { job }));
    assert_eq!(s.store().results(job).unwrap().len(), 2);
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
        let out = drain(&mut s, Millis(t));
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

/// A liar that is excluded and comes back under a new identity, telling the same lie, must not
/// find its old vote still counted: two of its own would make a majority.
#[test]
fn an_excluded_liars_votes_do_not_outlive_it() {
    let config = Config { exclude_after_rejections: 1, ..Config::default() };
    let mut s = scheduler(config);
    // The same lie for the same work, whoever tells it.
    let lie = |work: &Work| {
        let Work::Embedding { inputs, .. } = work;
        perturbed(work, &mut Rng(inputs[0][1] as u64))
    };
    let mut liar = c(1);
    s.join(Millis(0), liar, caps(4)).unwrap();
    s.join(Millis(0), c(2), caps(1)).unwrap();
    s.join(Millis(0), c(3), caps(1)).unwrap();
    let mut spec = one_unit_job(1000);
    spec.inputs = (0..12).map(|i| vec![101, i, 102]).collect();
    spec.inputs_per_unit = 1;
    s.submit(Millis(0), spec).unwrap();
    let (mut done, mut comebacks) = (false, 0);
    for t in 1..400 {
        let out = drain(&mut s, Millis(t));
        // Honest vectors have unit norm; the lie (noise, not re-normalised) does not.
        for (unit, result) in accepted(&out) {
            let norm = result.f32_values().unwrap().map(|v| v * v).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-3, "unit {unit}: a lie was accepted (norm {norm})");
        }
        for o in &out {
            if let Output::ContributorExcluded { contributor } = o {
                assert_eq!(*contributor, liar);
                comebacks += 1;
                liar = c(100 + comebacks);
                s.join(Millis(t), liar, caps(4)).unwrap();
            }
            if matches!(o, Output::JobDone { .. }) {
                done = true;
            }
        }
        if done {
            break;
        }
        for (who, unit, work) in assigns(&out) {
            let result = if who.0 == 1 || who.0 > 100 { lie(&work) } else { honest(&work) };
            if s.contributor(who).is_some() {
                s.report(Millis(t), who, unit, result).unwrap();
            }
        }
    }
    assert!(done, "the job did not complete");
    assert!(comebacks >= 1, "the liar was never excluded, so the case was not exercised");
}
