//! Builders of the policy tables the loader writes into [`map::TABLE`](crate::map::TABLE).
//!
//! They write into a caller's buffer (no allocation) so they stay in this
//! `no_std` crate next to the code that reads the tables.

use crate::{hash::hash_u32, MAGLEV_TABLE_SIZE, MAX_WORKERS, TABLE_CAPACITY};

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

/// Builds the `cpu` policy's table from `(slot, cpu)` pairs of the live
/// workers. Returns `(row_len, table_len)`.
///
/// Row `c` (entries `c * row_len ..`) lists the slots of the workers pinned
/// to CPU `c`, repeated to fill the row; `row_len` is the most workers any one
/// CPU has. A CPU that has no worker (fewer workers than CPUs) gets the live
/// slots in turn starting at its own number, so its packets still land on a
/// defined worker.
pub fn cpu_table(workers: &[(u32, u32)], out: &mut [u32]) -> Result<(u32, u32), TableError> {
    if workers.is_empty() {
        return Err(TableError::NoSlots);
    }
    if workers.len() > MAX_WORKERS as usize {
        return Err(TableError::TooManySlots);
    }
    let rows = workers.iter().map(|&(_, cpu)| cpu).max().unwrap_or(0) + 1;
    let row_len = (0..rows)
        .map(|c| workers.iter().filter(|&&(_, cpu)| cpu == c).count() as u32)
        .max()
        .unwrap_or(1)
        .max(1);
    let needed = rows.saturating_mul(row_len);
    if needed > TABLE_CAPACITY {
        return Err(TableError::TooLarge { needed });
    }
    if out.len() < needed as usize {
        return Err(TableError::BufferTooSmall);
    }
    for c in 0..rows {
        let mut on_cpu = [0u32; MAX_WORKERS as usize];
        let mut count = 0;
        for &(slot, _) in workers.iter().filter(|&&(_, cpu)| cpu == c) {
            on_cpu[count] = slot;
            count += 1;
        }
        let row = &mut out[(c * row_len) as usize..((c + 1) * row_len) as usize];
        for (j, entry) in row.iter_mut().enumerate() {
            *entry = if count == 0 {
                workers[(c as usize + j) % workers.len()].0
            } else {
                on_cpu[j % count]
            };
        }
    }
    Ok((row_len, needed))
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
/// NSDI 2016) of [`MAGLEV_TABLE_SIZE`] entries over the live `slots`.
///
/// Each slot's preference list is the permutation
/// `(offset + j * skip) mod M` with `offset` and `skip` from a hash of the
/// slot number, so a slot keeps its preferences whatever the other slots
/// are; slots take turns claiming their next free preferred entry. Removing
/// or adding one slot moves about `1/N` of the entries. Returns the length.
pub fn maglev_table(slots: &[u32], out: &mut [u32]) -> Result<u32, TableError> {
    const EMPTY: u32 = u32::MAX;
    let m = MAGLEV_TABLE_SIZE;
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
        core::array::from_fn(|i| Permutation::of(slots.get(i).copied().unwrap_or(0)));
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
}

impl Permutation {
    fn of(slot: u32) -> Self {
        let m = MAGLEV_TABLE_SIZE;
        Permutation {
            offset: u64::from(hash_u32(MAGLEV_OFFSET_SEED, slot) % m),
            skip: u64::from(hash_u32(MAGLEV_SKIP_SEED, slot) % (m - 1) + 1),
        }
    }

    fn at(self, j: u64) -> usize {
        ((self.offset + j * self.skip) % u64::from(MAGLEV_TABLE_SIZE)) as usize
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
    let m = MAGLEV_TABLE_SIZE as usize;
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
        core::array::from_fn(|i| Permutation::of(slots.get(i).copied().unwrap_or(0)));
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
    Ok(MAGLEV_TABLE_SIZE)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::{vec, vec::Vec};

    fn count(table: &[u32], slot: u32) -> usize {
        table.iter().filter(|&&s| s == slot).count()
    }

    #[test]
    fn cpu_table_one_worker_per_cpu() {
        let mut t = [u32::MAX; 16];
        let (row, len) = cpu_table(&[(0, 0), (1, 1)], &mut t).unwrap();
        assert_eq!((row, len), (1, 2));
        assert_eq!(&t[..2], &[0, 1]);
    }

    #[test]
    fn cpu_table_wraps_more_workers_than_cpus() {
        let mut t = [u32::MAX; 16];
        // 5 workers on 2 CPUs: 0,2,4 on CPU 0; 1,3 on CPU 1.
        let w = [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0)];
        let (row, len) = cpu_table(&w, &mut t).unwrap();
        assert_eq!((row, len), (3, 6));
        assert_eq!(&t[..3], &[0, 2, 4]);
        assert_eq!(&t[3..6], &[1, 3, 1]);
    }

    #[test]
    fn cpu_table_fills_rows_of_cpus_without_workers() {
        let mut t = [u32::MAX; 16];
        let (row, len) = cpu_table(&[(5, 2)], &mut t).unwrap();
        assert_eq!((row, len), (1, 3));
        assert_eq!(&t[..3], &[5, 5, 5]);
        assert_eq!(cpu_table(&[], &mut t), Err(TableError::NoSlots));
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
            weighted_table(&[(0, 9000), (1, 1)], &mut t),
            Err(TableError::TooLarge { needed: 9001 })
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
        let m = MAGLEV_TABLE_SIZE as usize;
        for s in slots {
            let c = count(table, *s);
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

        /// A set of 1 to 64 distinct live slots.
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
                let mut t = vec![u32::MAX; MAGLEV_TABLE_SIZE as usize];
                maglev_table(&slots, &mut t).unwrap();
                let seen: BTreeSet<u32> = t.iter().copied().collect();
                let live: BTreeSet<u32> = slots.iter().copied().collect();
                prop_assert_eq!(seen, live);
            }

            #[test]
            fn maglev_updates_stay_even_and_move_only_what_they_must(
                before in live_slots(),
                after in live_slots(),
            ) {
                let m = MAGLEV_TABLE_SIZE as usize;
                let mut old = vec![0u32; m];
                let mut new = vec![0u32; m];
                maglev_table(&before, &mut old).unwrap();
                maglev_update(&old, &after, &mut new).unwrap();
                for s in &after {
                    let c = count(&new, *s);
                    prop_assert!(c == m / after.len() || c == m / after.len() + 1, "slot {} has {}", s, c);
                }
                // An entry moves only if its slot left, or to a slot that
                // needed entries (one that is new or was below its share).
                let gained: BTreeSet<u32> = after
                    .iter()
                    .copied()
                    .filter(|s| count(&new, *s) > count(&old, *s))
                    .collect();
                for i in 0..m {
                    if old[i] != new[i] {
                        prop_assert!(!after.contains(&old[i]) || count(&old, old[i]) > count(&new, old[i]));
                        prop_assert!(gained.contains(&new[i]));
                    }
                }
            }

            #[test]
            fn cpu_tables_send_each_cpu_to_its_own_workers(
                cpus_of in proptest::collection::vec(0u32..8, 1..=16usize)
            ) {
                let workers: Vec<(u32, u32)> = cpus_of.iter().enumerate().map(|(s, &c)| (s as u32, c)).collect();
                let mut t = vec![u32::MAX; TABLE_CAPACITY as usize];
                let (row, len) = cpu_table(&workers, &mut t).unwrap();
                let live: BTreeSet<u32> = workers.iter().map(|w| w.0).collect();
                for c in 0..len / row {
                    let here: BTreeSet<u32> = workers.iter().filter(|w| w.1 == c).map(|w| w.0).collect();
                    for &s in &t[(c * row) as usize..((c + 1) * row) as usize] {
                        prop_assert!(live.contains(&s));
                        if !here.is_empty() {
                            prop_assert!(here.contains(&s), "CPU {} row has slot {} of another CPU", c, s);
                        }
                    }
                    // Every worker of the CPU appears in its row.
                    for s in &here {
                        prop_assert!(t[(c * row) as usize..((c + 1) * row) as usize].contains(s));
                    }
                }
            }
        }
    }
}
