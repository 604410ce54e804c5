//! The machine's CPU topology as the `cpu` policy needs it: which CPUs
//! exist, which share a last-level cache, which share a NUMA node. Read from
//! sysfs (`/sys/devices/system/cpu`, `/sys/devices/system/node`); the
//! planning itself is pure code in `reuseport_common::table::cpu_plan`.

use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::OnceLock,
};

use reuseport_common::table::{CpuTopology, UNKNOWN};

/// Per CPU (index = CPU number, over every possible CPU): the id of its
/// largest cache domain and of its NUMA node, or
/// [`UNKNOWN`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Topology {
    /// Largest shared cache of each CPU, named by the lowest CPU sharing it.
    pub cache: Vec<u32>,
    /// NUMA node of each CPU.
    pub node: Vec<u32>,
}

impl Topology {
    /// This machine's topology, read once per process. When sysfs cannot
    /// be read, the CPUs this process may use, with no domains known (the
    /// plan then spreads CPUs without workers over all workers).
    pub fn host() -> &'static Topology {
        static HOST: OnceLock<Topology> = OnceLock::new();
        HOST.get_or_init(|| {
            Topology::read(Path::new("/sys/devices/system")).unwrap_or_else(|e| {
                // The CPUs this process may use, read here rather than
                // through `sys`, which sits above the policy layer.
                let cpus = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
                    .ok()
                    .and_then(|set| {
                        (0..nix::sched::CpuSet::count())
                            .filter(|&c| set.is_set(c).unwrap_or(false))
                            .max()
                    })
                    .map_or(1, |top| top + 1);
                log::warn!(
                    "cannot read the CPU topology from /sys/devices/system ({e}): the cpu policy spreads CPUs without a worker over all workers"
                );
                Topology::flat(cpus)
            })
        })
    }

    /// `cpus` CPUs with no shared domain known.
    pub fn flat(cpus: usize) -> Topology {
        Topology {
            cache: vec![UNKNOWN; cpus],
            node: vec![UNKNOWN; cpus],
        }
    }

    /// Reads the topology under `root` (normally `/sys/devices/system`):
    /// the possible CPUs from `cpu/possible`, each CPU's highest-level
    /// cache from `cpu/cpuN/cache/index*/{level,shared_cpu_list}`, the nodes
    /// from `node/nodeN/cpulist`. Missing cache or node directories (an
    /// offline CPU, a kernel without NUMA) leave those entries unknown.
    pub fn read(root: &Path) -> io::Result<Topology> {
        let possible = fs::read_to_string(root.join("cpu/possible"))?;
        let cpus = parse_cpu_list(&possible)
            .ok_or_else(|| bad(root.join("cpu/possible"), &possible))?
            .into_iter()
            .max()
            .map_or(0, |top| top as usize + 1);
        let mut topo = Topology::flat(cpus);
        for (cpu, cache) in topo.cache.iter_mut().enumerate() {
            if let Some(domain) = largest_cache(&root.join(format!("cpu/cpu{cpu}/cache"))) {
                *cache = domain;
            }
        }
        if let Ok(entries) = fs::read_dir(root.join("node")) {
            for e in entries.flatten() {
                let name = e.file_name();
                let Some(id) = name
                    .to_str()
                    .and_then(|n| n.strip_prefix("node"))
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(list) = fs::read_to_string(e.path().join("cpulist")) else {
                    continue;
                };
                for cpu in parse_cpu_list(&list).unwrap_or_default() {
                    if let Some(n) = topo.node.get_mut(cpu as usize) {
                        *n = id;
                    }
                }
            }
        }
        Ok(topo)
    }

    /// The view the planner takes.
    pub fn view(&self) -> CpuTopology<'_> {
        CpuTopology {
            cache: &self.cache,
            node: &self.node,
        }
    }
}

/// The domain of the highest-level cache listed in `dir` (a CPU's
/// `cache` directory): the lowest CPU of its `shared_cpu_list`.
fn largest_cache(dir: &Path) -> Option<u32> {
    let mut best: Option<(u32, usize, u32)> = None;
    for e in fs::read_dir(dir).ok()?.flatten() {
        if !e.file_name().to_string_lossy().starts_with("index") {
            continue;
        }
        let Some(level) = fs::read_to_string(e.path().join("level"))
            .ok()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            continue;
        };
        let Some(shared) = fs::read_to_string(e.path().join("shared_cpu_list"))
            .ok()
            .and_then(|l| parse_cpu_list(&l))
        else {
            continue;
        };
        let Some(&lowest) = shared.iter().min() else {
            continue;
        };
        // The highest level; at one level, the widest (L1d and L1i).
        let key = (level, shared.len(), lowest);
        if best.is_none_or(|b| (key.0, key.1) > (b.0, b.1)) {
            best = Some(key);
        }
    }
    best.map(|(_, _, lowest)| lowest)
}

/// Parses the kernel's CPU list format (`0-3,8,10-11`, see
/// `Documentation/admin-guide/cputopology.rst`). An empty list is empty.
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().ok()?, b.parse().ok()?);
                if b < a || b - a > 1 << 20 {
                    return None;
                }
                cpus.extend(a..=b);
            }
            None => cpus.push(part.parse().ok()?),
        }
    }
    Some(cpus)
}

fn bad(path: PathBuf, content: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: not a CPU list: {:?}", path.display(), content.trim()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0-3,8,10-11\n"),
            Some(vec![0, 1, 2, 3, 8, 10, 11])
        );
        assert_eq!(parse_cpu_list("\n"), Some(vec![]));
        assert_eq!(parse_cpu_list("5"), Some(vec![5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("x"), None);
    }

    /// A fake sysfs: 2 NUMA nodes of 4 CPUs, an L2 per CPU pair, an L3 per
    /// node; CPU 7 offline (no cache directory).
    fn fake_sysfs(root: &Path) {
        let w = |p: &str, s: &str| {
            let p = root.join(p);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, s).unwrap();
        };
        w("cpu/possible", "0-7\n");
        for c in 0..7u32 {
            let pair = c / 2 * 2;
            let node = c / 4 * 4;
            for (i, level, shared) in [
                (0, 1, format!("{c}")),
                (1, 1, format!("{c}")),
                (2, 2, format!("{pair}-{}", pair + 1)),
                (3, 3, format!("{node}-{}", node + 3)),
            ] {
                w(
                    &format!("cpu/cpu{c}/cache/index{i}/level"),
                    &format!("{level}\n"),
                );
                w(
                    &format!("cpu/cpu{c}/cache/index{i}/shared_cpu_list"),
                    &format!("{shared}\n"),
                );
            }
        }
        w("node/node0/cpulist", "0-3\n");
        w("node/node1/cpulist", "4-7\n");
        w("node/possible", "0-1\n");
    }

    #[test]
    fn reads_cache_domains_and_nodes_from_sysfs() {
        let root = std::env::temp_dir().join(format!("reuseport-topology-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fake_sysfs(&root);
        let t = Topology::read(&root).unwrap();
        let _ = fs::remove_dir_all(&root);
        assert_eq!(t.cache, [0, 0, 0, 0, 4, 4, 4, UNKNOWN]);
        assert_eq!(t.node, [0, 0, 0, 0, 1, 1, 1, 1]);
    }

    #[test]
    fn this_machine_has_a_topology() {
        let t = Topology::host();
        assert!(!t.cache.is_empty());
        assert_eq!(t.cache.len(), t.node.len());
        for cpu in crate::sys::usable_cpus().unwrap() {
            assert!(cpu < t.cache.len(), "CPU {cpu} is possible");
        }
    }
}
