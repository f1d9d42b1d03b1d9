//! A native contributor's direct channels, sans-IO. [`Links`] (`Link`, `Unlink`): which
//! contributors may offer this one a channel (upstream: they hold the span before ours, and we
//! run the `Forward`s they send), which channels to downstream contributors are open (where our
//! outputs go straight on, to the next stage and to its standbys' shadow copies), and the
//! `MAX_LINKS` bound. [`Lends`] (`Lend`): which contributors may offer a channel to fetch which
//! shards from this one, for how long. `contribute.rs` owns the sockets and tasks; these tables
//! only decide, and hold each channel's task handle so that forgetting it stops the task.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use tessera_protocol::{ContributorId, NextHop, Standby};

/// Which way a link carries `Forward`s, seen from here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The peer sends us `Forward`s; it offers and we answer (`Link { offer: false }`).
    Upstream,
    /// We send the peer `Forward`s; we offer (`Link { offer: true }`).
    Downstream,
}

/// Why a `Link` was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{max} direct channels are linked already")]
    Full { max: usize },
    #[error("that link exists already")]
    Again,
}

/// One link. `T` is its task (answering or connecting, then serving the channel), `S` an open
/// downstream channel's sender.
#[derive(Debug)]
struct Link<S, T> {
    /// Which `Link` made it: a task started for an earlier one finds it gone.
    epoch: u64,
    /// None until a task serves the link, and again once its channel has closed.
    task: Option<T>,
    /// Set while a downstream channel is open.
    sender: Option<S>,
}

/// The links of one connection to the coordinator, keyed by peer and side: a peer before and
/// after us on a route holds two. A link keeps its place until `Unlink` (or the connection's
/// end), even when its channel failed, as the coordinator counts it until then.
#[derive(Debug)]
pub struct Links<S, T> {
    max: usize,
    epochs: u64,
    links: HashMap<(ContributorId, Side), Link<S, T>>,
}

impl<S: Clone, T> Links<S, T> {
    pub fn new(max: usize) -> Self {
        Links { max, epochs: 0, links: HashMap::new() }
    }

    /// A `Link`: the new link's epoch, which its task names from then on.
    pub fn link(&mut self, peer: ContributorId, side: Side) -> Result<u64, Refused> {
        if self.links.contains_key(&(peer, side)) {
            return Err(Refused::Again);
        }
        if self.links.len() >= self.max {
            return Err(Refused::Full { max: self.max });
        }
        self.epochs += 1;
        self.links.insert((peer, side), Link { epoch: self.epochs, task: None, sender: None });
        Ok(self.epochs)
    }

    /// An `Unlink`: forgets both sides with `peer`, dropping (so stopping) their tasks; whether
    /// there was a link.
    pub fn unlink(&mut self, peer: ContributorId) -> bool {
        let upstream = self.links.remove(&(peer, Side::Upstream)).is_some();
        let downstream = self.links.remove(&(peer, Side::Downstream)).is_some();
        upstream || downstream
    }

    /// An SDP offer from `peer`: the epoch to answer it under, if `peer` is linked upstream and
    /// no task serves that link now. Offers from anyone else are not answered.
    pub fn offer(&self, peer: ContributorId) -> Option<u64> {
        self.links.get(&(peer, Side::Upstream)).filter(|link| link.task.is_none()).map(|link| link.epoch)
    }

    /// Hands the link its task. False when that link is gone (or has a task): `task` is dropped.
    pub fn start(&mut self, peer: ContributorId, side: Side, epoch: u64, task: T) -> bool {
        match self.links.get_mut(&(peer, side)) {
            Some(link) if link.epoch == epoch && link.task.is_none() => {
                link.task = Some(task);
                true
            }
            _ => false,
        }
    }

    /// The channel to downstream `peer` opened. False when that link is gone.
    pub fn opened(&mut self, peer: ContributorId, epoch: u64, sender: S) -> bool {
        match self.links.get_mut(&(peer, Side::Downstream)) {
            Some(link) if link.epoch == epoch && link.task.is_some() => {
                link.sender = Some(sender);
                true
            }
            _ => false,
        }
    }

    /// The link's channel closed, or never opened: its task and sender are dropped, and an
    /// upstream peer may offer again. False when that link is gone (or was down already).
    pub fn closed(&mut self, peer: ContributorId, side: Side, epoch: u64) -> bool {
        match self.links.get_mut(&(peer, side)) {
            Some(link) if link.epoch == epoch && link.task.is_some() => {
                link.sender = None;
                link.task = None;
                true
            }
            _ => false,
        }
    }

    /// Where a step's output goes: the open channel to the first stage of `then`, with the
    /// link's epoch; none (it goes back to the coordinator) when `then` is empty or that
    /// channel is not open.
    pub fn pass(&self, then: &[NextHop]) -> Option<(S, u64)> {
        let next = then.first()?;
        let link = self.links.get(&(next.contributor, Side::Downstream))?;
        Some((link.sender.clone()?, link.epoch))
    }

    /// Where a step's shadow copies go: the standbys of `standbys` with an open downstream
    /// channel here, each with its channel's sender and the link's epoch, in order. A standby
    /// without one gets no copy.
    pub fn shadows<'a>(&self, standbys: &'a [Standby]) -> Vec<(&'a Standby, S, u64)> {
        standbys
            .iter()
            .filter_map(|standby| {
                let link = self.links.get(&(standby.contributor, Side::Downstream))?;
                Some((standby, link.sender.clone()?, link.epoch))
            })
            .collect()
    }

    /// Links, open or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.links.len()
    }

    /// Forgets every link (the connection ended), stopping their tasks.
    pub fn clear(&mut self) {
        self.links.clear();
    }
}

/// The shards one contributor may fetch from this one (`Lend`) and has not been sent yet; it
/// must offer a channel by `offer_by`.
#[derive(Debug)]
struct Lend<T> {
    epoch: u64,
    blobs: BTreeSet<String>,
    offer_by: Instant,
    /// The task serving its channel, once it offered one.
    task: Option<T>,
}

/// The lends of one connection to the coordinator, at most `max` at once, by borrower. A lend
/// ends once each blob lent was sent, or when its borrower has not offered a channel within
/// `window` of the `Lend` (or of its last channel's close).
#[derive(Debug)]
pub struct Lends<T> {
    max: usize,
    window: Duration,
    epochs: u64,
    lends: HashMap<ContributorId, Lend<T>>,
}

impl<T> Lends<T> {
    pub fn new(max: usize, window: Duration) -> Self {
        Lends { max, window, epochs: 0, lends: HashMap::new() }
    }

    /// A `Lend` at `now`: `peer` may offer a channel and fetch `blobs` over it. A second `Lend`
    /// to the same peer adds its blobs (to a channel already serving, too).
    pub fn lend(&mut self, peer: ContributorId, blobs: Vec<String>, now: Instant) -> Result<(), Refused> {
        self.lends.retain(|_, lend| lend.task.is_some() || lend.offer_by > now);
        if let Some(lend) = self.lends.get_mut(&peer) {
            lend.blobs.extend(blobs);
            lend.offer_by = now + self.window;
            return Ok(());
        }
        if self.lends.len() >= self.max {
            return Err(Refused::Full { max: self.max });
        }
        self.epochs += 1;
        self.lends.insert(peer, Lend { epoch: self.epochs, blobs: blobs.into_iter().collect(), offer_by: now + self.window, task: None });
        Ok(())
    }

    /// An offer from `peer` of a channel to fetch over, at `now`: the epoch to answer it under,
    /// if a lend to `peer` stands and no channel serves it yet.
    pub fn offer(&self, peer: ContributorId, now: Instant) -> Option<u64> {
        self.lends.get(&peer).filter(|lend| lend.task.is_none() && lend.offer_by > now).map(|lend| lend.epoch)
    }

    /// Hands the lend its task. False when that lend is gone (or has a task): `task` is dropped.
    pub fn start(&mut self, peer: ContributorId, epoch: u64, task: T) -> bool {
        match self.lends.get_mut(&peer) {
            Some(lend) if lend.epoch == epoch && lend.task.is_none() => {
                lend.task = Some(task);
                true
            }
            _ => false,
        }
    }

    /// Whether `peer`, over the channel of lend `epoch`, may fetch `cid`.
    pub fn lends(&self, peer: ContributorId, epoch: u64, cid: &str) -> bool {
        self.lends.get(&peer).is_some_and(|lend| lend.epoch == epoch && lend.blobs.contains(cid))
    }

    /// Blob `cid` was sent to `peer` over the channel of lend `epoch`: it is no longer lent.
    pub fn sent(&mut self, peer: ContributorId, epoch: u64, cid: &str) {
        if let Some(lend) = self.lends.get_mut(&peer).filter(|lend| lend.epoch == epoch) {
            lend.blobs.remove(cid);
        }
    }

    /// The channel of lend `epoch` closed (or never opened), at `now`: the lend ends if every
    /// blob was sent; otherwise the borrower may offer another channel, under a new epoch,
    /// within the window.
    pub fn ended(&mut self, peer: ContributorId, epoch: u64, now: Instant) {
        let Some(lend) = self.lends.get_mut(&peer).filter(|lend| lend.epoch == epoch) else { return };
        if lend.blobs.is_empty() {
            self.lends.remove(&peer);
            return;
        }
        self.epochs += 1;
        (lend.epoch, lend.task, lend.offer_by) = (self.epochs, None, now + self.window);
    }

    /// Ends every lend (the connection ended), stopping their tasks.
    pub fn clear(&mut self) {
        self.lends.clear();
    }
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::rc::Rc;

    use super::*;

    /// A task that counts how many were stopped (dropped).
    struct Task(Rc<Cell<usize>>);

    impl Drop for Task {
        fn drop(&mut self) {
            self.0.set(self.0.get() + 1);
        }
    }

    fn id(n: u64) -> ContributorId {
        ContributorId(n)
    }

    fn hops(to: &[u64]) -> Vec<NextHop> {
        to.iter().map(|&n| NextHop { contributor: id(n), shard: format!("shard{n}"), standbys: Vec::new() }).collect()
    }

    /// At most `max` links, both sides with one peer counted apart; a repeated `Link` is refused
    /// without touching the first, and `Unlink` frees the places of both sides.
    #[test]
    fn links_are_bounded_and_unique() {
        let mut links: Links<&str, ()> = Links::new(3);
        assert_eq!(links.link(id(1), Side::Upstream), Ok(1));
        assert_eq!(links.link(id(1), Side::Downstream), Ok(2));
        assert_eq!(links.link(id(1), Side::Upstream), Err(Refused::Again));
        assert_eq!(links.link(id(2), Side::Downstream), Ok(3));
        assert_eq!(links.link(id(3), Side::Upstream), Err(Refused::Full { max: 3 }));
        assert_eq!(links.len(), 3);
        assert!(links.unlink(id(1)));
        assert!(!links.unlink(id(1)));
        assert_eq!(links.len(), 1);
        assert_eq!(links.link(id(3), Side::Upstream), Ok(4));
        assert_eq!(links.link(id(4), Side::Upstream), Ok(5));
        assert_eq!(links.link(id(5), Side::Upstream), Err(Refused::Full { max: 3 }));
    }

    /// Offers are answered only from a peer linked upstream, once per channel: again after that
    /// channel closed, never after `Unlink`.
    #[test]
    fn only_linked_upstream_peers_may_offer() {
        let stopped = Rc::new(Cell::new(0));
        let mut links: Links<&str, Task> = Links::new(4);
        assert_eq!(links.offer(id(1)), None, "not linked");
        let down = links.link(id(2), Side::Downstream).unwrap();
        assert_eq!(links.offer(id(2)), None, "linked the other way");
        let up = links.link(id(1), Side::Upstream).unwrap();
        assert_eq!(links.offer(id(1)), Some(up));
        assert!(links.start(id(1), Side::Upstream, up, Task(stopped.clone())));
        assert_eq!(links.offer(id(1)), None, "a channel is being answered already");
        assert!(!links.start(id(1), Side::Upstream, up, Task(stopped.clone())), "a second task");
        assert_eq!(stopped.get(), 1);
        assert!(links.closed(id(1), Side::Upstream, up));
        assert_eq!(stopped.get(), 2);
        assert!(!links.closed(id(1), Side::Upstream, up), "closed twice");
        assert_eq!(links.offer(id(1)), Some(up), "the upstream peer may offer again");
        assert!(!links.closed(id(2), Side::Downstream, down), "never started");
        assert!(links.unlink(id(1)));
        assert_eq!(links.offer(id(1)), None);
    }

    /// A task of a link that was unlinked (and maybe linked again) finds it gone: whatever it
    /// reports changes nothing, and a task handed in late is stopped at once.
    #[test]
    fn a_stale_task_changes_nothing() {
        let stopped = Rc::new(Cell::new(0));
        let mut links: Links<&str, Task> = Links::new(4);
        let old = links.link(id(7), Side::Downstream).unwrap();
        assert!(links.start(id(7), Side::Downstream, old, Task(stopped.clone())));
        assert!(links.unlink(id(7)));
        assert_eq!(stopped.get(), 1, "unlinking stops the task");
        let new = links.link(id(7), Side::Downstream).unwrap();
        assert!(!links.opened(id(7), old, "old"));
        assert!(!links.opened(id(7), new, "new"), "no task serves it yet");
        assert!(!links.start(id(7), Side::Downstream, old, Task(stopped.clone())));
        assert_eq!(stopped.get(), 2);
        assert!(links.start(id(7), Side::Downstream, new, Task(stopped.clone())));
        assert!(!links.closed(id(7), Side::Downstream, old));
        assert!(links.opened(id(7), new, "new"));
        assert_eq!(links.pass(&hops(&[7])), Some(("new", new)));
        links.clear();
        assert_eq!((links.len(), stopped.get()), (0, 3));
    }

    /// A lend lets its borrower offer a channel at a time, within the window, and fetch only
    /// the blobs lent, each once; and the table holds at most `max` lends.
    #[test]
    fn lends_allow_one_channel_for_the_blobs_lent() {
        let stopped = Rc::new(Cell::new(0));
        let t0 = Instant::now();
        let window = Duration::from_secs(60);
        let mut lends: Lends<Task> = Lends::new(2, window);
        assert_eq!(lends.offer(id(1), t0), None, "nothing lent");
        lends.lend(id(1), vec!["a".into()], t0).unwrap();
        let epoch = lends.offer(id(1), t0).unwrap();
        assert_eq!(lends.offer(id(1), t0 + window), None, "offered too late");
        assert!(lends.start(id(1), epoch, Task(stopped.clone())));
        assert_eq!(lends.offer(id(1), t0), None, "one channel at a time");
        assert!(lends.lends(id(1), epoch, "a"));
        assert!(!lends.lends(id(1), epoch, "b"), "not lent");
        assert!(!lends.lends(id(2), epoch, "a"), "another peer");
        // A second `Lend` adds to the channel already serving.
        lends.lend(id(1), vec!["b".into()], t0).unwrap();
        assert!(lends.lends(id(1), epoch, "b"));
        lends.lend(id(2), vec!["a".into()], t0).unwrap();
        assert_eq!(lends.lend(id(3), vec!["a".into()], t0), Err(Refused::Full { max: 2 }));
        // A lend never taken up makes room once its window is over; a serving one does not.
        lends.lend(id(3), vec!["a".into()], t0 + window).unwrap();
        assert!(lends.lends(id(1), epoch, "a"));
        assert_eq!(lends.offer(id(2), t0), None, "expired and gone");
        lends.ended(id(1), epoch + 1, t0);
        assert!(lends.lends(id(1), epoch, "a"), "another channel's end changes nothing");
        // "a" sent, "b" not: the channel's end leaves the lend of "b", for another channel.
        lends.sent(id(1), epoch, "a");
        assert!(!lends.lends(id(1), epoch, "a"), "sent once");
        let later = t0 + window;
        lends.ended(id(1), epoch, later);
        assert_eq!(stopped.get(), 1, "the channel's end stops its task");
        assert!(!lends.lends(id(1), epoch, "b"), "the old channel's epoch is over");
        let again = lends.offer(id(1), later).expect("the borrower may offer again");
        assert!(lends.start(id(1), again, Task(stopped.clone())));
        assert!(lends.lends(id(1), again, "b"));
        lends.sent(id(1), again, "b");
        lends.ended(id(1), again, later);
        assert_eq!(stopped.get(), 2);
        assert_eq!(lends.offer(id(1), later), None, "everything lent was sent: the lend is over");
    }

    /// A table with an upstream link from 1, an open downstream channel to 2 (its sender "to 2")
    /// and a downstream link to 3 not open yet; the epochs of 2 and 3.
    fn upstream_one_downstream_two_open_three_not() -> (Links<&'static str, ()>, u64, u64) {
        let mut links: Links<&str, ()> = Links::new(8);
        let up = links.link(id(1), Side::Upstream).unwrap();
        assert!(links.start(id(1), Side::Upstream, up, ()));
        let two = links.link(id(2), Side::Downstream).unwrap();
        assert!(links.start(id(2), Side::Downstream, two, ()));
        assert!(links.opened(id(2), two, "to 2"));
        let three = links.link(id(3), Side::Downstream).unwrap();
        assert!(links.start(id(3), Side::Downstream, three, ()));
        (links, two, three)
    }

    /// A step's output goes straight on only over an open channel to the first of `then`.
    #[test]
    fn outputs_pass_directly_only_over_an_open_downstream_channel() {
        let (mut links, two, three) = upstream_one_downstream_two_open_three_not();
        // `then`, and where the output goes: a channel's sender, or back to the coordinator.
        let cases: [(&[u64], Option<&str>); 7] = [
            (&[], None),
            (&[2], Some("to 2")),
            (&[2, 3], Some("to 2")),
            (&[3, 2], None),
            (&[1], None),
            (&[4], None),
            (&[4, 2], None),
        ];
        for (then, expected) in cases {
            assert_eq!(links.pass(&hops(then)).map(|(sender, _)| sender), expected, "then {then:?}");
        }
        assert!(links.closed(id(2), Side::Downstream, two));
        assert_eq!(links.pass(&hops(&[2])), None, "closed");
        assert!(links.opened(id(3), three, "to 3"));
        assert_eq!(links.pass(&hops(&[3])), Some(("to 3", three)));
    }

    /// Shadow copies go over every open downstream channel to a standby, and to no standby
    /// without one: not linked, linked upstream only, not open yet, or closed.
    #[test]
    fn shadows_go_only_over_open_downstream_channels() {
        fn standbys(to: &[u64]) -> Vec<Standby> {
            to.iter().map(|&n| Standby { contributor: id(n), shard: format!("standby{n}") }).collect()
        }
        // Who gets a copy: (standby, its shard, the channel's sender).
        fn shadows(links: &Links<&'static str, ()>, to: &[u64]) -> Vec<(u64, String, &'static str)> {
            links.shadows(&standbys(to)).into_iter().map(|(standby, sender, _)| (standby.contributor.0, standby.shard.clone(), sender)).collect()
        }
        let (mut links, two, three) = upstream_one_downstream_two_open_three_not();
        let four = links.link(id(4), Side::Downstream).unwrap();
        assert!(links.start(id(4), Side::Downstream, four, ()));
        assert!(links.opened(id(4), four, "to 4"));
        assert_eq!(shadows(&links, &[]), []);
        assert_eq!(shadows(&links, &[1, 3, 5]), [], "upstream, not open, not linked");
        assert_eq!(shadows(&links, &[4, 1, 2, 5]), [(4, "standby4".into(), "to 4"), (2, "standby2".into(), "to 2")]);
        assert_eq!(links.shadows(&standbys(&[2])).into_iter().map(|(_, _, epoch)| epoch).collect::<Vec<_>>(), [two]);
        assert!(links.closed(id(4), Side::Downstream, four));
        assert!(links.opened(id(3), three, "to 3"));
        assert_eq!(shadows(&links, &[2, 3, 4]), [(2, "standby2".into(), "to 2"), (3, "standby3".into(), "to 3")]);
        assert!(links.unlink(id(2)));
        assert_eq!(shadows(&links, &[2, 3]), [(3, "standby3".into(), "to 3")]);
    }
}
