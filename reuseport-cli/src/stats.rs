//! The per-worker table of `reuseport stats` and `reuseport ctl status`.

use std::fmt::Write as _;

use reuseport::{balance, SlotState, SlotStatus, Status};

/// The group's table. With `previous` (a snapshot taken `seconds` earlier)
/// the balance line is that of the interval; without, of the totals.
pub fn render(now: &Status, previous: Option<(&Status, f64)>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "group {}: {} {}, pid {}, policy {}{}",
        now.name,
        now.proto,
        now.addr,
        now.owner_pid,
        now.policy,
        if now.steered {
            ""
        } else {
            " (no program attached)"
        }
    );
    let _ = writeln!(
        out,
        "{:>4} {:>4} {:>8} {:>12} {:>12} {:>8} {:>6} {:>14}",
        "slot", "cpu", "state", "selected", "accepted", "active", "load", "bytes"
    );
    for s in &now.slots {
        let r = &s.record;
        let _ = writeln!(
            out,
            "{:>4} {:>4} {:>8} {:>12} {:>12} {:>8} {:>6} {:>14}",
            s.slot,
            r.cpu,
            s.state(),
            s.selected,
            r.accepted,
            r.active,
            r.load,
            r.bytes
        );
    }
    let serving: Vec<_> = now
        .slots
        .iter()
        .filter(|s| s.state() != SlotState::Empty)
        .collect();
    // With a program, count what it steered to each slot: that covers
    // sockets adopted from other programs, whose accepts we do not see.
    // Without one, what each worker accepted.
    let count = |s: &SlotStatus| {
        if now.steered {
            s.selected
        } else {
            s.record.accepted
        }
    };
    let before = |slot: u32| {
        previous
            .and_then(|(p, _)| p.slots.iter().find(|s| s.slot == slot))
            .map_or(0, count)
    };
    let counts: Vec<u64> = serving
        .iter()
        .map(|s| count(s).saturating_sub(before(s.slot)))
        .collect();
    let span = match previous {
        Some((_, secs)) => format!("last {secs:.1} s"),
        None => "since start".to_string(),
    };
    match balance(&counts) {
        Some(b) => {
            let _ = writeln!(
                out,
                "balance ({span}): {} {}, max/mean {:.3}, cv {:.3}, jain {:.4}",
                b.total,
                if now.steered { "steered" } else { "accepted" },
                b.max_over_mean,
                b.cv,
                b.jain
            );
        }
        None => {
            let _ = writeln!(out, "balance ({span}): no connections");
        }
    }
    let c = &now.counters;
    let _ = writeln!(
        out,
        "program: fallback {}, dropped {}, empty slot {}, key unreadable {}, short payload {}, migrated {}",
        c.fallback, c.dropped, c.empty_slot, c.key_unreadable, c.short_payload, c.migrated
    );
    // The UDP stages: cookies, flow table, QUIC (zero on other groups).
    let _ = writeln!(
        out,
        "udp: cookie ok {}, bad {}, old {}; flow hit {}, miss {}, full {}; quic initial {}, unreadable {}",
        c.cookie_ok,
        c.cookie_bad,
        c.cookie_old,
        c.flow_hit,
        c.flow_miss,
        c.flow_full,
        c.quic_initial,
        c.quic_unreadable
    );
    out
}
