//! Deciding what goes: the kept set, the order of the rest, the budget.
//!
//! Kept is the closure (all references, transitively) of the recorded
//! images' paths, the gc roots' paths, and every path used since the
//! cutoff. A path counts as used at the latest of: its registration time,
//! the moment it came into the store (the ctime of its top entry), and the
//! last moment its atimes allow for a read (see [`Atimes`]).
//!
//! Everything else may go. That set is closed under referrers by
//! construction: were a path that references it kept, its closure would
//! hold this one too; so no remaining path ever loses a reference. Under a
//! budget, the order matters: a path may go only with everything that
//! references it, so each path's "last use" is raised to the latest use of
//! any path that references it (transitively). Sorting by that, referrers
//! first among equals, every prefix of the order is again closed under
//! referrers, and the least recently used go first.

use std::collections::{HashMap, VecDeque};

use super::scan::{Atimes, Entry, Scan};

/// A path registered, added or read in the last hour is kept whatever the options.
pub const RECENT_SECS: i64 = 3600;

/// What the user asked for.
#[derive(Clone, Debug)]
pub struct Policy {
    pub keep_days: u32,
    pub max_size: Option<u64>,
    /// Unix seconds.
    pub now: i64,
}

impl Policy {
    /// Paths used at or after this moment are kept.
    pub fn cutoff(&self) -> i64 {
        let keep = i64::from(self.keep_days).saturating_mul(86_400);
        self.now - keep.max(RECENT_SECS)
    }
}

/// Why a path is kept; several may hold.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Why {
    pub image: bool,
    pub root: bool,
    pub recent: bool,
}

impl Why {
    pub fn any(self) -> bool {
        self.image || self.root || self.recent
    }
}

/// The plan.
pub struct Plan {
    /// Per path: the latest moment it may have been used.
    pub last_used: Vec<i64>,
    /// Per path: why it is kept (nothing: it may go).
    pub kept: Vec<Why>,
    /// Store paths to delete (indices into the scan's paths), in order:
    /// least recently used first, every prefix closed under referrers.
    pub victims: Vec<usize>,
    /// Unregistered entries to delete (indices into the scan's `unregistered`).
    pub unregistered: Vec<usize>,
    /// `.links` entries that are left with no other link once the victims go.
    pub links: Vec<usize>,
    /// The store's size now, as [`Scan::store_bytes`] counts.
    pub before: u64,
}

/// The latest moment `entry` (registered at `registered`) may have been used.
pub fn last_use(registered: i64, entry: &Entry, atimes: Atimes) -> i64 {
    let mut t = registered;
    if entry.present {
        t = t.max(entry.added);
        if let Some(read) = entry.newest_atime.and_then(|a| atimes.latest_read(a)) {
            t = t.max(read);
        }
    }
    t
}

/// Plan a collection of `scan` under `policy`, keeping the closure of
/// `image_roots` and `gc_roots` (indices into the scan's paths) too.
pub fn plan(scan: &Scan, policy: &Policy, image_roots: &[usize], gc_roots: &[usize]) -> Plan {
    let n = scan.paths.len();
    let cutoff = policy.cutoff();
    let last_used: Vec<i64> = (0..n)
        .map(|i| {
            last_use(
                scan.snap.paths[i].registration_time,
                &scan.paths[i],
                scan.atimes,
            )
        })
        .collect();
    let graph = Graph::of(scan);
    let mut kept = vec![Why::default(); n];
    for i in graph.closure(image_roots.iter().copied()) {
        kept[i].image = true;
    }
    for i in graph.closure(gc_roots.iter().copied()) {
        kept[i].root = true;
    }
    let recent: Vec<usize> = (0..n).filter(|&i| last_used[i] >= cutoff).collect();
    for i in graph.closure(recent) {
        kept[i].recent = true;
    }
    let order = loop {
        match graph.lru_order(&kept, &last_used) {
            Ok(order) => break order,
            // A reference cycle (a damaged database): keep it and what it needs.
            Err(cycle) => {
                for i in graph.closure(cycle) {
                    kept[i].root = true;
                }
            }
        }
    };

    let before = scan.store_bytes();
    let old_enough = policy.now - RECENT_SECS;
    let mut unregistered: Vec<usize> = (0..scan.unregistered.len())
        .filter(|&u| scan.unregistered[u].entry.newest_ctime < old_enough)
        .collect();
    unregistered.sort_by_key(|&u| std::cmp::Reverse(scan.unregistered[u].entry.bytes));
    let mut victims = Vec::new();
    let mut after = before;
    match policy.max_size {
        None => victims = order,
        Some(max) => {
            // Lock files cost nothing and are always tidied; entries and
            // paths go only while the store is over budget.
            let mut chosen = Vec::new();
            for &u in &unregistered {
                let bytes = scan.unregistered[u].entry.bytes;
                if scan.unregistered[u].lock_file || after > max {
                    chosen.push(u);
                    after -= bytes;
                }
            }
            unregistered = chosen;
            for i in order {
                if after <= max {
                    break;
                }
                after -= scan.size(i);
                victims.push(i);
            }
        }
    }
    let links = orphaned_links(scan, &victims);
    Plan {
        last_used,
        kept,
        victims,
        unregistered,
        links,
        before,
    }
}

/// `roots` (indices into the scan's paths) and all they reference, transitively.
pub fn closure(scan: &Scan, roots: &[usize]) -> Vec<usize> {
    Graph::of(scan).closure(roots.iter().copied())
}

/// `.links` entries whose only other links are in `victims` (or that have none now).
pub fn orphaned_links(scan: &Scan, victims: &[usize]) -> Vec<usize> {
    if scan.links.is_empty() {
        return Vec::new();
    }
    let mut going: HashMap<u64, u64> = HashMap::new();
    for &i in victims {
        for &ino in &scan.paths[i].shared {
            *going.entry(ino).or_default() += 1;
        }
    }
    (0..scan.links.len())
        .filter(|&l| {
            let link = &scan.links[l];
            link.nlink
                .saturating_sub(going.get(&link.ino).copied().unwrap_or(0))
                <= 1
        })
        .collect()
}

/// The reference graph, by index into the scan's paths.
struct Graph {
    references: Vec<Vec<usize>>,
    referrers: Vec<Vec<usize>>,
}

impl Graph {
    fn of(scan: &Scan) -> Graph {
        let n = scan.snap.paths.len();
        let index: HashMap<i64, usize> = scan
            .snap
            .paths
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id, i))
            .collect();
        let mut references = vec![Vec::new(); n];
        let mut referrers = vec![Vec::new(); n];
        for (from, to) in &scan.snap.refs {
            if let (Some(&a), Some(&b)) = (index.get(from), index.get(to))
                && a != b
            {
                references[a].push(b);
                referrers[b].push(a);
            }
        }
        Graph {
            references,
            referrers,
        }
    }

    /// `roots` and everything they reference, transitively.
    fn closure(&self, roots: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut seen = vec![false; self.references.len()];
        let mut stack: Vec<usize> = roots.into_iter().collect();
        let mut out = Vec::new();
        while let Some(i) = stack.pop() {
            if std::mem::replace(&mut seen[i], true) {
                continue;
            }
            out.push(i);
            stack.extend(self.references[i].iter().copied().filter(|&j| !seen[j]));
        }
        out
    }

    /// The paths not kept, least recently used first (each path's use raised
    /// to its referrers'), referrers before their references among equals.
    /// `Err` with the paths of a reference cycle, which cannot be ordered.
    fn lru_order(&self, kept: &[Why], last_used: &[i64]) -> Result<Vec<usize>, Vec<usize>> {
        let n = kept.len();
        let free = |i: usize| !kept[i].any();
        let mut pending: Vec<usize> = (0..n)
            .map(|i| {
                if free(i) {
                    self.referrers[i].iter().filter(|&&r| free(r)).count()
                } else {
                    0
                }
            })
            .collect();
        let mut effective: Vec<i64> = last_used.to_vec();
        let mut queue: VecDeque<usize> = (0..n).filter(|&i| free(i) && pending[i] == 0).collect();
        let mut topo = Vec::new();
        while let Some(i) = queue.pop_front() {
            topo.push(i);
            for &j in &self.references[i] {
                if !free(j) {
                    continue;
                }
                effective[j] = effective[j].max(effective[i]);
                pending[j] -= 1;
                if pending[j] == 0 {
                    queue.push_back(j);
                }
            }
        }
        let total = (0..n).filter(|&i| free(i)).count();
        if topo.len() < total {
            let placed: std::collections::HashSet<usize> = topo.iter().copied().collect();
            return Err((0..n)
                .filter(|&i| free(i) && !placed.contains(&i))
                .collect());
        }
        let position: HashMap<usize, usize> =
            topo.iter().enumerate().map(|(p, &i)| (i, p)).collect();
        topo.sort_by_key(|&i| (effective[i], position[&i]));
        Ok(topo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nix::db::{PathInfo, Snapshot};

    /// A scan of paths 0..n (all on disk, `size` bytes each, used at
    /// `times[i]`) with `refs` as (referrer, reference) indices.
    fn scan(times: &[i64], refs: &[(usize, usize)], size: u64) -> Scan {
        let paths: Vec<PathInfo> = times
            .iter()
            .enumerate()
            .map(|(i, &t)| PathInfo {
                id: i as i64 + 1,
                path: format!("/nix/store/{:032}-p{i}", 0),
                hash: String::new(),
                registration_time: t,
                deriver: None,
                nar_size: Some(size as i64),
                ultimate: None,
                sigs: None,
                ca: None,
            })
            .collect();
        let refs = refs
            .iter()
            .map(|&(a, b)| (a as i64 + 1, b as i64 + 1))
            .collect();
        let snap = Snapshot::from_rows(paths, refs, Vec::new());
        Scan {
            paths: vec![Entry::default(); times.len()],
            snap,
            unregistered: Vec::new(),
            links: Vec::new(),
            atimes: Atimes::Exact,
            free_bytes: 0,
        }
    }

    fn policy(max_size: Option<u64>) -> Policy {
        Policy {
            keep_days: 14,
            max_size,
            now: 100 * 86_400,
        }
    }

    /// The store's size once the plan's victims are gone.
    fn after(s: &Scan, p: &Plan) -> u64 {
        p.before - p.victims.iter().map(|&i| s.size(i)).sum::<u64>()
    }

    #[test]
    fn what_a_kept_path_references_is_kept() {
        // 2 is recent and references 1, which references 0; 3 is old and alone.
        let s = scan(&[0, 0, 99 * 86_400, 0], &[(2, 1), (1, 0)], 10);
        let p = plan(&s, &policy(None), &[], &[]);
        assert_eq!(p.victims, vec![3]);
        assert!(p.kept[0].recent && p.kept[1].recent);
    }

    #[test]
    fn a_referrer_goes_before_what_it_references_and_lends_it_its_age() {
        // 0 (day 1) is referenced by 1 (day 50); 2 (day 30) is alone.
        let s = scan(&[86_400, 50 * 86_400, 30 * 86_400], &[(1, 0)], 10);
        let p = plan(&s, &policy(None), &[], &[]);
        // 2 is least recently used; 0 is as recent as 1, and 1 must go first.
        assert_eq!(p.victims, vec![2, 1, 0]);
        let budget = plan(&s, &policy(Some(15)), &[], &[]);
        assert_eq!(budget.victims, vec![2, 1]);
        assert_eq!(after(&s, &budget), 10);
    }

    #[test]
    fn roots_keep_their_closure_and_an_overfull_kept_set_says_by_how_much() {
        let s = scan(&[0, 0, 0], &[(0, 1)], 10);
        let p = plan(&s, &policy(Some(5)), &[0], &[]);
        assert!(p.kept[0].image && p.kept[1].image);
        assert_eq!(p.victims, vec![2]);
        assert_eq!(after(&s, &p), 20, "15 over the budget of 5");
    }

    #[test]
    fn the_last_hour_is_kept_even_with_keep_days_0() {
        let mut pol = policy(None);
        pol.keep_days = 0;
        let s = scan(&[pol.now - 60, pol.now - 7200], &[], 10);
        assert_eq!(plan(&s, &pol, &[], &[]).victims, vec![1]);
    }

    #[test]
    fn a_reference_cycle_is_kept() {
        let s = scan(&[0, 0, 0], &[(0, 1), (1, 0)], 10);
        let p = plan(&s, &policy(None), &[], &[]);
        assert_eq!(p.victims, vec![2]);
    }
}
