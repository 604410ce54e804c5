//! Builders of the policy tables the loader writes into [`map::TABLE`](crate::map::TABLE).
//!
//! They write into a caller's buffer (no allocation) so they stay in this
//! `no_std` crate next to the code that reads the tables.

use crate::{
    hash::hash_u32, CpuRow, MAGLEV_SMALL_GROUP, MAGLEV_TABLE_SIZE, MAGLEV_TABLE_SIZE_LARGE,
    MAX_CPUS, MAX_WORKERS, TABLE_CAPACITY,
};

/// The size of the Maglev table for `slots` live slots:
/// [`MAGLEV_TABLE_SIZE`] up to [`MAGLEV_SMALL_GROUP`] slots, else
/// [`MAGLEV_TABLE_SIZE_LARGE`]. A group that crosses the boundary gets a
/// table built afresh (most keys move once).
pub fn maglev_size(slots: usize) -> u32 {
    if slots <= MAGLEV_SMALL_GROUP as usize {
        MAGLEV_TABLE_SIZE
    } else {
        MAGLEV_TABLE_SIZE_LARGE
    }
}

/// Why a table could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableError {
    /// No slot to steer to.
    NoSlots,
    /// More slots than the socket map holds.
    TooManySlots,
    /// The table would need more entries than [`TABLE_CAPACITY`].
    TooLarge {
        /// Entries needed.
        needed: u32,
    },
    /// Every weight is zero.
    ZeroWeights,
    /// The output buffer is shorter than the table.
    BufferTooSmall,
}

impl core::fmt::Display for TableError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            TableError::NoSlots => write!(f, "no live worker to steer to"),
            TableError::TooManySlots => write!(f, "more than {MAX_WORKERS} workers"),
            TableError::TooLarge { needed } => write!(
                f,
                "the table needs {needed} entries, more than the {TABLE_CAPACITY} it can hold"
            ),
            TableError::ZeroWeights => write!(f, "every weight is zero"),
            TableError::BufferTooSmall => write!(f, "table buffer too small"),
        }
    }
}

/// What the `cpu` planner knows of the machine, one entry per CPU (index =
/// CPU number; the length is the number of possible CPUs): the id of the
/// CPU's largest cache domain and of its NUMA node, any number shared by
/// exactly the CPUs of that domain (for example its lowest CPU), or
/// [`UNKNOWN`].
#[derive(Clone, Copy, Debug)]
pub struct CpuTopology<'a> {
    /// Largest shared cache domain of each CPU (the last-level cache).
    pub cache: &'a [u32],
    /// NUMA node of each CPU.
    pub node: &'a [u32],
}

/// A domain id that matches nothing.
pub const UNKNOWN: u32 = u32::MAX;

impl CpuTopology<'_> {
    /// CPUs covered.
    pub fn cpus(&self) -> usize {
        self.cache.len().max(self.node.len())
    }

    /// The domain of `cpu` at `level` (0: cache, 1: NUMA node).
    fn domain(&self, level: usize, cpu: u32) -> u32 {
        let ids = if level == 0 { self.cache } else { self.node };
        ids.get(cpu as usize).copied().unwrap_or(UNKNOWN)
    }
}

/// Plans the `cpu` policy from `(slot, cpu)` pairs of the live workers:
/// fills `slots` with the slots ordered by CPU (then slot) and `rows` with
/// each CPU's range of it, and returns the number of CPUs with a row.
///
/// - A CPU with workers pinned to it gets them all (the program picks among
///   them by the flow hash).
/// - A CPU without a worker gets exactly one worker: one that shares its
///   cache domain if any does, else its NUMA node, else any worker. Within
///   those candidates it is the one given the fewest such CPUs so far (ties:
///   a worker that shares its own CPU with others, then the lowest CPU), so
///   the CPUs without workers are spread evenly over each domain's workers.
///   The CPUs that have a same-cache candidate are placed first, then the
///   same-node ones, then the rest, so that remote placements even out what
///   local ones left.
///
/// Rows cover every CPU of `topo` and every worker's CPU, up to
/// [`MAX_CPUS`]. The result depends only on the arguments.
pub fn cpu_plan(
    workers: &[(u32, u32)],
    topo: CpuTopology<'_>,
    rows: &mut [CpuRow],
    slots: &mut [u16],
) -> Result<u32, TableError> {
    let n = workers.len();
    if n == 0 {
        return Err(TableError::NoSlots);
    }
    if n > MAX_WORKERS as usize {
        return Err(TableError::TooManySlots);
    }
    let top_worker_cpu = workers.iter().map(|&(_, c)| c).max().unwrap_or(0);
    let n_cpus = (topo.cpus() as u64)
        .max(u64::from(top_worker_cpu) + 1)
        .min(u64::from(MAX_CPUS)) as u32;
    if rows.len() < n_cpus as usize || slots.len() < n {
        return Err(TableError::BufferTooSmall);
    }
    // Workers ordered by (CPU, slot): each CPU's workers are one range.
    let mut order = [0u16; MAX_WORKERS as usize];
    for (k, o) in order.iter_mut().enumerate().take(n) {
        *o = k as u16;
    }
    let order = &mut order[..n];
    order.sort_unstable_by_key(|&k| (workers[k as usize].1, workers[k as usize].0));
    let cpu_at = |k: usize| workers[order[k] as usize].1;
    let rows = &mut rows[..n_cpus as usize];
    rows.fill(CpuRow::default());
    // How many workers share the CPU of the worker at position k.
    let mut sharing = [0u16; MAX_WORKERS as usize];
    let mut k = 0;
    while k < n {
        let cpu = cpu_at(k);
        let mut end = k;
        while end < n && cpu_at(end) == cpu {
            end += 1;
        }
        for s in &mut sharing[k..end] {
            *s = (end - k) as u16;
        }
        if let Some(row) = rows.get_mut(cpu as usize) {
            *row = CpuRow {
                start: k as u16,
                len: (end - k) as u16,
            };
        }
        k = end;
    }
    for (k, s) in slots.iter_mut().enumerate().take(n) {
        *s = workers[order[k] as usize].0 as u16;
    }
    // CPUs without a worker, nearest domain first.
    let mut given = [0u32; MAX_WORKERS as usize];
    for level in 0..3 {
        for c in 0..n_cpus {
            if rows[c as usize].len != 0 {
                continue;
            }
            let want = if level < 2 { topo.domain(level, c) } else { 0 };
            if want == UNKNOWN {
                continue;
            }
            let mut best: Option<usize> = None;
            for k in 0..n {
                if level < 2 && topo.domain(level, cpu_at(k)) != want {
                    continue;
                }
                let better = match best {
                    None => true,
                    Some(b) => {
                        (given[k], core::cmp::Reverse(sharing[k]))
                            < (given[b], core::cmp::Reverse(sharing[b]))
                    }
                };
                if better {
                    best = Some(k);
                }
            }
            if let Some(k) = best {
                given[k] += 1;
                rows[c as usize] = CpuRow {
                    start: k as u16,
                    len: 1,
                };
            }
        }
    }
    Ok(n_cpus)
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Builds the `weighted` policy's table from `(slot, weight)` pairs: a cycle
/// in which each slot appears `weight / g` times (`g` the weights' greatest
/// common divisor), interleaved by smooth weighted round robin so that any
/// window of the cycle is close to the weights, not only the whole cycle.
/// Returns the table length.
pub fn weighted_table(weights: &[(u32, u32)], out: &mut [u32]) -> Result<u32, TableError> {
    if weights.is_empty() {
        return Err(TableError::NoSlots);
    }
    if weights.len() > MAX_WORKERS as usize {
        return Err(TableError::TooManySlots);
    }
    let g = weights.iter().fold(0, |g, &(_, w)| gcd(g, w));
    if g == 0 {
        return Err(TableError::ZeroWeights);
    }
    let total: u64 = weights.iter().map(|&(_, w)| u64::from(w / g)).sum();
    if total > u64::from(TABLE_CAPACITY) {
        return Err(TableError::TooLarge {
            needed: total.min(u64::from(u32::MAX)) as u32,
        });
    }
    if out.len() < total as usize {
        return Err(TableError::BufferTooSmall);
    }
    let mut current = [0i64; MAX_WORKERS as usize];
    for entry in out.iter_mut().take(total as usize) {
        let mut best = 0;
        for (i, &(_, w)) in weights.iter().enumerate() {
            current[i] += i64::from(w / g);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        *entry = weights[best].0;
    }
    Ok(total as u32)
}

/// Seeds of the two Maglev permutation hashes (fixed, so the table depends
/// only on the set of live slots).
const MAGLEV_OFFSET_SEED: u32 = 0x6d61_676c;
const MAGLEV_SKIP_SEED: u32 = 0x6576_2121;

/// Builds the `consistent` policy's Maglev lookup table (Eisenbud et al.,
/// NSDI 2016) of [`maglev_size`] entries over the live `slots`.
///
/// Each slot's preference list is the permutation
/// `(offset + j * skip) mod M` with `offset` and `skip` from a hash of the
/// slot number, so a slot keeps its preferences whatever the other slots
/// are; slots take turns claiming their next free preferred entry. Removing
/// or adding one slot moves about `1/N` of the entries. Returns the length.
pub fn maglev_table(slots: &[u32], out: &mut [u32]) -> Result<u32, TableError> {
    const EMPTY: u32 = u32::MAX;
    let m = maglev_size(slots.len());
    if slots.is_empty() {
        return Err(TableError::NoSlots);
    }
    if slots.len() > MAX_WORKERS as usize {
        return Err(TableError::TooManySlots);
    }
    if out.len() < m as usize {
        return Err(TableError::BufferTooSmall);
    }
    let out = &mut out[..m as usize];
    out.fill(EMPTY);
    let perm: [Permutation; MAX_WORKERS as usize] =
        core::array::from_fn(|i| Permutation::of(slots.get(i).copied().unwrap_or(0), m));
    let mut next = [0u64; MAX_WORKERS as usize];
    let mut filled = 0;
    // Every slot's sequence visits all M entries (M prime, 0 < skip < M), so
    // each turn finds a free entry and the loop ends after M claims.
    'fill: loop {
        for (i, &slot) in slots.iter().enumerate() {
            let mut c = perm[i].at(next[i]);
            while out[c] != EMPTY {
                next[i] += 1;
                c = perm[i].at(next[i]);
            }
            out[c] = slot;
            next[i] += 1;
            filled += 1;
            if filled == m {
                break 'fill;
            }
        }
    }
    Ok(m)
}

/// One slot's Maglev preference order: entry `perm(j)` is its `j`-th choice.
#[derive(Clone, Copy)]
struct Permutation {
    offset: u64,
    skip: u64,
    m: u64,
}

impl Permutation {
    /// Slot `slot`'s order in a table of `m` (prime) entries.
    fn of(slot: u32, m: u32) -> Self {
        Permutation {
            offset: u64::from(hash_u32(MAGLEV_OFFSET_SEED, slot) % m),
            skip: u64::from(hash_u32(MAGLEV_SKIP_SEED, slot) % (m - 1) + 1),
            m: u64::from(m),
        }
    }

    fn at(self, j: u64) -> usize {
        ((self.offset + j * self.skip) % self.m) as usize
    }
}

/// Rebuilds the `consistent` policy's table for a new set of live `slots`
/// from the `previous` table in force, moving only what must move:
///
/// - entries of a slot that is gone go to the remaining slots;
/// - a new slot takes entries only from slots above their new share.
///
/// So when a worker leaves, exactly its keys move, and when one joins, only
/// keys that now go to it move; every slot still ends with
/// `⌊M/N⌋` or `⌈M/N⌉` entries. Freed entries are claimed as in
/// [`maglev_table`] (slots in turn, each along its own preference order),
/// and a slot above its share gives up the entries it prefers least. The
/// result depends only on `previous` and `slots`, so any process computes
/// the same table. A `previous` of the wrong size builds afresh.
pub fn maglev_update(previous: &[u32], slots: &[u32], out: &mut [u32]) -> Result<u32, TableError> {
    const EMPTY: u32 = u32::MAX;
    let m = maglev_size(slots.len()) as usize;
    if previous.len() != m {
        return maglev_table(slots, out);
    }
    if slots.is_empty() {
        return Err(TableError::NoSlots);
    }
    if slots.len() > MAX_WORKERS as usize {
        return Err(TableError::TooManySlots);
    }
    if out.len() < m {
        return Err(TableError::BufferTooSmall);
    }
    let n = slots.len();
    let out = &mut out[..m];
    let index_of = |slot: u32| slots.iter().position(|&s| s == slot);
    let mut count = [0usize; MAX_WORKERS as usize];
    for (entry, &prev) in out.iter_mut().zip(previous) {
        *entry = match index_of(prev) {
            Some(i) => {
                count[i] += 1;
                prev
            }
            None => EMPTY,
        };
    }
    // Shares: ⌈M/N⌉ for the r slots holding the most entries now (fewest
    // moves), ⌊M/N⌋ for the others; ties by slot number.
    let (q, r) = (m / n, m % n);
    let mut order = [0usize; MAX_WORKERS as usize];
    for (k, o) in order.iter_mut().enumerate().take(n) {
        *o = k;
    }
    order[..n].sort_unstable_by(|&a, &b| count[b].cmp(&count[a]).then(slots[a].cmp(&slots[b])));
    let mut target = [q; MAX_WORKERS as usize];
    for &i in &order[..r] {
        target[i] = q + 1;
    }
    let perm: [Permutation; MAX_WORKERS as usize] =
        core::array::from_fn(|i| Permutation::of(slots.get(i).copied().unwrap_or(0), m as u32));
    // Slots above their share give up the entries they prefer least.
    for i in 0..n {
        let mut j = m as u64;
        while count[i] > target[i] && j > 0 {
            j -= 1;
            let c = perm[i].at(j);
            if out[c] == slots[i] {
                out[c] = EMPTY;
                count[i] -= 1;
            }
        }
    }
    // Slots below their share claim free entries in turn, in preference order.
    let mut next = [0u64; MAX_WORKERS as usize];
    loop {
        let mut claimed = false;
        for i in 0..n {
            if count[i] >= target[i] {
                continue;
            }
            while out[perm[i].at(next[i])] != EMPTY {
                next[i] += 1;
            }
            out[perm[i].at(next[i])] = slots[i];
            next[i] += 1;
            count[i] += 1;
            claimed = true;
        }
        if !claimed {
            break;
        }
    }
    Ok(m as u32)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    fn count(table: &[u32], slot: u32) -> usize {
        table.iter().filter(|&&s| s == slot).count()
    }

    /// Plans `workers` on `topo`; returns, per CPU, the slots of its row.
    fn plan_rows(workers: &[(u32, u32)], cache: &[u32], node: &[u32]) -> Vec<Vec<u32>> {
        let mut rows = vec![CpuRow::default(); MAX_CPUS as usize];
        let mut slots = vec![0u16; MAX_WORKERS as usize];
        let topo = CpuTopology { cache, node };
        let n = cpu_plan(workers, topo, &mut rows, &mut slots).unwrap();
        (0..n as usize)
            .map(|c| {
                let r = rows[c];
                (r.start..r.start + r.len)
                    .map(|i| u32::from(slots[i as usize]))
                    .collect()
            })
            .collect()
    }

    /// `cpus` CPUs, `per_cache` to a last-level cache, `per_node` to a node.
    fn topology(cpus: u32, per_cache: u32, per_node: u32) -> (Vec<u32>, Vec<u32>) {
        (
            (0..cpus).map(|c| c / per_cache * per_cache).collect(),
            (0..cpus).map(|c| c / per_node).collect(),
        )
    }

    /// How many CPUs have `slot` as their one worker, besides its own.
    fn given_to(rows: &[Vec<u32>], own: &[u32], slot: u32) -> usize {
        rows.iter()
            .enumerate()
            .filter(|(c, r)| r.as_slice() == [slot] && !own.contains(&(*c as u32)))
            .count()
    }

    #[test]
    fn cpu_plan_one_worker_per_cpu() {
        let (cache, node) = topology(2, 2, 2);
        assert_eq!(plan_rows(&[(0, 0), (1, 1)], &cache, &node), [[0], [1]]);
    }

    #[test]
    fn cpu_plan_gives_every_cpu_a_worker_when_workers_are_fewer() {
        // The case of issue 11: one worker, two CPUs.
        let (cache, node) = topology(2, 2, 2);
        assert_eq!(plan_rows(&[(0, 0)], &cache, &node), [[0], [0]]);
        // Unknown topology, 7 CPUs, 3 workers: the 4 CPUs without a
        // worker are spread 2, 1, 1.
        let unknown = [UNKNOWN; 7];
        let rows = plan_rows(&[(0, 0), (1, 1), (2, 2)], &unknown, &unknown);
        assert_eq!(rows.len(), 7);
        let shares: Vec<usize> = (0..3).map(|s| given_to(&rows, &[s], s)).collect();
        assert_eq!(shares.iter().sum::<usize>(), 4);
        assert!(shares.iter().all(|&g| g == 1 || g == 2), "{shares:?}");
    }

    #[test]
    fn cpu_plan_two_numa_nodes_of_four_cpus_and_three_workers() {
        let (cache, node) = topology(8, 4, 4);
        // Workers placed on CPUs 0, 1, 2 (one per usable CPU, in order):
        // CPU 3 shares their cache; CPUs 4 to 7 share nothing with them
        // and are spread over all three.
        let rows = plan_rows(&[(0, 0), (1, 1), (2, 2)], &cache, &node);
        assert_eq!(rows[..3], [[0], [1], [2]]);
        assert!([0, 1, 2].contains(&rows[3][0]));
        let total: Vec<usize> = (0..3u32)
            .map(|s| rows.iter().filter(|r| r.as_slice() == [s]).count())
            .collect();
        assert_eq!(total.iter().sum::<usize>(), 8);
        assert!(total.iter().all(|&t| t == 2 || t == 3), "{total:?}");
        // Workers on both nodes (CPUs 0, 4 and 5): node 0's CPUs stay with
        // worker 0, node 1's are shared evenly by workers 1 and 2.
        let rows = plan_rows(&[(0, 0), (1, 4), (2, 5)], &cache, &node);
        assert_eq!(rows[..4], [[0], [0], [0], [0]]);
        assert_eq!(rows[4..], [[1], [2], [1], [2]]);
    }

    #[test]
    fn cpu_plan_prefers_the_cache_domain_then_the_node() {
        // One node, two last-level caches of 4 CPUs (chiplets): each
        // cache's CPUs go to the worker that shares it.
        let (cache, node) = topology(8, 4, 8);
        let rows = plan_rows(&[(0, 0), (1, 4)], &cache, &node);
        assert_eq!(rows, [[0], [0], [0], [0], [1], [1], [1], [1]]);
        // Two nodes of two caches each; the workers are on cache 0 of node
        // 0 and cache 4 of node 1: CPUs of the other caches go to the
        // worker of their node.
        let (cache, node) = topology(16, 4, 8);
        let rows = plan_rows(&[(0, 0), (1, 4), (2, 8)], &cache, &node);
        for (c, row) in rows.iter().enumerate() {
            let expect = match c {
                0..=3 => 0,
                4..=7 => 1,
                // Node 1 (CPUs 8 to 15) has worker 2 only.
                _ => 2,
            };
            assert_eq!(row, &[expect], "CPU {c}");
        }
        // A node without a worker: its CPUs are spread over all of them.
        let rows = plan_rows(&[(0, 0), (1, 1)], &cache, &node);
        assert_eq!(given_to(&rows[8..], &[], 0), 4);
        assert_eq!(given_to(&rows[8..], &[], 1), 4);
    }

    #[test]
    fn cpu_plan_keeps_a_cpus_own_workers_together() {
        // 5 workers on 2 CPUs: 0, 2, 4 on CPU 0; 1, 3 on CPU 1.
        let (cache, node) = topology(2, 2, 2);
        let w = [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)];
        assert_eq!(plan_rows(&w, &cache, &node), [vec![0, 2, 4], vec![1, 3]]);
        // A worker on a CPU the topology does not list still has its row.
        let rows = plan_rows(&[(5, 2)], &cache, &node);
        assert_eq!(rows, [[5], [5], [5]]);
        let mut rows = [CpuRow::default(); 4];
        let mut slots = [0u16; 4];
        let topo = CpuTopology {
            cache: &cache,
            node: &node,
        };
        assert_eq!(
            cpu_plan(&[], topo, &mut rows, &mut slots),
            Err(TableError::NoSlots)
        );
        assert_eq!(
            cpu_plan(&[(0, 9)], topo, &mut rows, &mut slots),
            Err(TableError::BufferTooSmall)
        );
    }

    #[test]
    fn cpu_plan_covers_a_thousand_cpus_and_workers() {
        let (cache, node) = topology(MAX_WORKERS, 16, 512);
        let w: Vec<(u32, u32)> = (0..MAX_WORKERS).map(|s| (s, s)).collect();
        let rows = plan_rows(&w, &cache, &node);
        assert_eq!(rows.len(), MAX_WORKERS as usize);
        assert!(rows.iter().enumerate().all(|(c, r)| r == &[c as u32]));
        // Half as many workers, on the even CPUs: each odd CPU goes to a
        // worker of its own cache domain, one each.
        let w: Vec<(u32, u32)> = (0..MAX_WORKERS / 2).map(|s| (s, 2 * s)).collect();
        let rows = plan_rows(&w, &cache, &node);
        for (c, r) in rows.iter().enumerate() {
            assert_eq!(r.len(), 1);
            assert_eq!(cache[w[r[0] as usize].1 as usize], cache[c], "CPU {c}");
        }
        for s in 0..MAX_WORKERS / 2 {
            assert_eq!(given_to(&rows, &[2 * s], s), 1, "slot {s}");
        }
    }

    #[test]
    fn weighted_table_has_the_weights_and_interleaves() {
        let mut t = [u32::MAX; 64];
        let len = weighted_table(&[(0, 3), (1, 1)], &mut t).unwrap();
        assert_eq!(len, 4);
        assert_eq!(count(&t[..4], 0), 3);
        assert_eq!(count(&t[..4], 1), 1);
        let len = weighted_table(&[(0, 30), (1, 20), (7, 10)], &mut t).unwrap();
        assert_eq!(len, 6, "weights are reduced by their gcd");
        assert_eq!(&t[..6], &[0, 1, 0, 7, 1, 0]);
        assert_eq!(
            weighted_table(&[(0, 0)], &mut t),
            Err(TableError::ZeroWeights)
        );
        assert_eq!(
            weighted_table(&[(0, 70_000), (1, 1)], &mut t),
            Err(TableError::TooLarge { needed: 70_001 })
        );
    }

    #[test]
    fn weighted_table_zero_weight_slot_never_appears() {
        let mut t = [u32::MAX; 64];
        let len = weighted_table(&[(0, 2), (1, 0), (2, 1)], &mut t).unwrap();
        assert_eq!(count(&t[..len as usize], 1), 0);
    }

    #[test]
    fn maglev_covers_every_slot_evenly() {
        let mut t = vec![0u32; MAGLEV_TABLE_SIZE as usize];
        let slots: Vec<u32> = (0..7).collect();
        let len = maglev_table(&slots, &mut t).unwrap();
        assert_eq!(len, MAGLEV_TABLE_SIZE);
        let ideal = MAGLEV_TABLE_SIZE as f64 / 7.0;
        for s in &slots {
            let c = count(&t, *s) as f64;
            assert!((c - ideal).abs() / ideal < 0.02, "slot {s}: {c} vs {ideal}");
        }
        assert!(t.iter().all(|s| slots.contains(s)));
    }

    fn moved(a: &[u32], b: &[u32]) -> Vec<usize> {
        (0..a.len()).filter(|&i| a[i] != b[i]).collect()
    }

    fn assert_even(table: &[u32], slots: &[u32]) {
        let m = table.len();
        let mut counts = vec![0usize; MAX_WORKERS as usize];
        for &s in table {
            counts[s as usize] += 1;
        }
        for s in slots {
            let c = counts[*s as usize];
            assert!(
                c == m / slots.len() || c == m / slots.len() + 1,
                "slot {s}: {c}"
            );
        }
        assert!(table.iter().all(|s| slots.contains(s)));
    }

    #[test]
    fn maglev_update_moves_exactly_the_leavers_keys() {
        let m = MAGLEV_TABLE_SIZE as usize;
        let mut before = vec![0u32; m];
        let mut after = vec![0u32; m];
        maglev_table(&[0, 1, 2, 3, 4], &mut before).unwrap();
        maglev_update(&before, &[0, 1, 3, 4], &mut after).unwrap();
        let mv = moved(&before, &after);
        assert!(
            mv.iter().all(|&i| before[i] == 2),
            "only slot 2's entries move"
        );
        assert_eq!(mv.len(), count(&before, 2));
        assert_even(&after, &[0, 1, 3, 4]);
    }

    #[test]
    fn maglev_update_moves_only_keys_to_a_joiner() {
        let m = MAGLEV_TABLE_SIZE as usize;
        let mut before = vec![0u32; m];
        let mut after = vec![0u32; m];
        maglev_table(&[0, 1, 2, 3], &mut before).unwrap();
        maglev_update(&before, &[0, 1, 2, 3, 9], &mut after).unwrap();
        let mv = moved(&before, &after);
        assert!(
            mv.iter().all(|&i| after[i] == 9),
            "only entries to the new slot move"
        );
        assert_eq!(mv.len(), count(&after, 9));
        assert_even(&after, &[0, 1, 2, 3, 9]);
        // And back: the joiner leaves again.
        let mut again = vec![0u32; m];
        maglev_update(&after, &[0, 1, 2, 3], &mut again).unwrap();
        assert!(moved(&after, &again).iter().all(|&i| after[i] == 9));
        assert_even(&again, &[0, 1, 2, 3]);
    }

    #[test]
    fn maglev_update_of_a_wrong_size_builds_afresh() {
        let m = MAGLEV_TABLE_SIZE as usize;
        let mut fresh = vec![0u32; m];
        let mut updated = vec![0u32; m];
        maglev_table(&[1, 2], &mut fresh).unwrap();
        maglev_update(&[1, 2, 3], &[1, 2], &mut updated).unwrap();
        assert_eq!(fresh, updated);
        maglev_update(&fresh, &[1, 2], &mut updated).unwrap();
        assert_eq!(fresh, updated, "the same live set keeps the same table");
    }

    #[test]
    fn maglev_tables_grow_past_a_small_group() {
        let small: Vec<u32> = (0..MAGLEV_SMALL_GROUP).collect();
        let large: Vec<u32> = (0..=MAGLEV_SMALL_GROUP).collect();
        assert_eq!(maglev_size(small.len()), MAGLEV_TABLE_SIZE);
        assert_eq!(maglev_size(large.len()), MAGLEV_TABLE_SIZE_LARGE);
        let mut t = vec![0u32; MAGLEV_TABLE_SIZE_LARGE as usize];
        assert_eq!(maglev_table(&small, &mut t), Ok(MAGLEV_TABLE_SIZE));
        let previous = t[..MAGLEV_TABLE_SIZE as usize].to_vec();
        let len = maglev_update(&previous, &large, &mut t).unwrap();
        assert_eq!(len, MAGLEV_TABLE_SIZE_LARGE);
        assert_even(&t, &large);
        // The largest group: 64 entries each, give or take one.
        let all: Vec<u32> = (0..MAX_WORKERS).collect();
        maglev_table(&all, &mut t).unwrap();
        assert_even(&t, &all);
    }

    #[test]
    fn maglev_removal_moves_only_about_one_nth() {
        let mut before = vec![0u32; MAGLEV_TABLE_SIZE as usize];
        let mut after = vec![0u32; MAGLEV_TABLE_SIZE as usize];
        let slots: Vec<u32> = (0..8).collect();
        maglev_table(&slots, &mut before).unwrap();
        maglev_table(&[0, 1, 2, 4, 5, 6, 7], &mut after).unwrap();
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        let removed = count(&before, 3);
        // Every entry of slot 3 had to move; of the others only a few may.
        assert!(moved >= removed);
        let extra = (moved - removed) as f64 / MAGLEV_TABLE_SIZE as f64;
        assert!(extra < 0.03, "{extra} of the table moved needlessly");
    }

    mod properties {
        extern crate std;
        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeSet;

        /// A set of 1 to `MAX_WORKERS` distinct live slots.
        fn live_slots() -> impl Strategy<Value = Vec<u32>> {
            proptest::collection::btree_set(0..MAX_WORKERS, 1..=MAX_WORKERS as usize)
                .prop_map(|s| s.into_iter().collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            #[test]
            fn weighted_tables_follow_the_weights_and_skip_weightless_slots(
                weights in proptest::collection::vec(0u32..20, 1..=MAX_WORKERS as usize)
            ) {
                prop_assume!(weights.iter().any(|&w| w > 0));
                let pairs: Vec<(u32, u32)> = weights.iter().enumerate().map(|(s, &w)| (s as u32, w)).collect();
                let mut t = vec![u32::MAX; TABLE_CAPACITY as usize];
                let len = weighted_table(&pairs, &mut t).unwrap() as usize;
                let g = weights.iter().fold(0, |g, &w| gcd(g, w));
                for &(slot, w) in &pairs {
                    prop_assert_eq!(count(&t[..len], slot), (w / g) as usize, "slot {}", slot);
                }
                prop_assert_eq!(len as u32, weights.iter().map(|w| w / g).sum::<u32>());
            }

            #[test]
            fn maglev_tables_cover_every_live_slot_and_nothing_else(slots in live_slots()) {
                let mut t = vec![u32::MAX; maglev_size(slots.len()) as usize];
                let len = maglev_table(&slots, &mut t).unwrap();
                prop_assert_eq!(len as usize, t.len());
                let seen: BTreeSet<u32> = t.iter().copied().collect();
                let live: BTreeSet<u32> = slots.iter().copied().collect();
                prop_assert_eq!(seen, live);
            }

            #[test]
            fn maglev_updates_stay_even_and_move_only_what_they_must(
                before in live_slots(),
                after in live_slots(),
            ) {
                let m = maglev_size(after.len()) as usize;
                let mut old = vec![0u32; maglev_size(before.len()) as usize];
                let mut new = vec![0u32; m];
                maglev_table(&before, &mut old).unwrap();
                prop_assert_eq!(maglev_update(&old, &after, &mut new).unwrap() as usize, m);
                let counts = |t: &[u32]| {
                    let mut c = vec![0usize; MAX_WORKERS as usize];
                    for &s in t {
                        c[s as usize] += 1;
                    }
                    c
                };
                let (c_old, c_new) = (counts(&old), counts(&new));
                let live: BTreeSet<u32> = after.iter().copied().collect();
                for s in &after {
                    let c = c_new[*s as usize];
                    prop_assert!(c == m / after.len() || c == m / after.len() + 1, "slot {} has {}", s, c);
                }
                // An entry moves only if its slot left, or to a slot that
                // needed entries (one that is new or was below its share);
                // a table of another size is built afresh.
                if old.len() != m {
                    return Ok(());
                }
                for i in 0..m {
                    if old[i] != new[i] {
                        let (o, n) = (old[i] as usize, new[i] as usize);
                        prop_assert!(!live.contains(&old[i]) || c_old[o] > c_new[o]);
                        prop_assert!(c_new[n] > c_old[n]);
                    }
                }
            }

            #[test]
            fn cpu_plans_send_each_cpu_to_its_own_workers_or_one_near_worker(
                cpus_of in proptest::collection::vec(0u32..16, 1..=24usize),
                cpus in 1u32..20,
                per_cache in 1u32..8,
                per_node in 1u32..16,
            ) {
                let workers: Vec<(u32, u32)> = cpus_of.iter().enumerate().map(|(s, &c)| (s as u32, c)).collect();
                let (cache, node) = topology(cpus, per_cache, per_node);
                let rows = plan_rows(&workers, &cache, &node);
                let top = cpus_of.iter().copied().max().unwrap();
                prop_assert_eq!(rows.len() as u32, cpus.max(top + 1));
                let domain = |ids: &[u32], c: u32| ids.get(c as usize).copied();
                for (c, row) in rows.iter().enumerate() {
                    let c = c as u32;
                    let here: BTreeSet<u32> = workers.iter().filter(|w| w.1 == c).map(|w| w.0).collect();
                    if !here.is_empty() {
                        let row: BTreeSet<u32> = row.iter().copied().collect();
                        prop_assert_eq!(row, here);
                        continue;
                    }
                    prop_assert_eq!(row.len(), 1, "CPU {} has one worker", c);
                    let cpu_of = workers[row[0] as usize].1;
                    // The nearest domain that has a worker is the one used.
                    for ids in [&cache, &node] {
                        let near = workers.iter().any(|w| domain(ids, w.1).is_some() && domain(ids, w.1) == domain(ids, c));
                        if near {
                            prop_assert_eq!(domain(ids, cpu_of), domain(ids, c), "CPU {}", c);
                            break;
                        }
                    }
                }
            }
        }
    }
}
