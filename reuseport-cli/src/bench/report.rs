//! The benchmark's outputs: a Markdown table, CSV, JSON and SVG charts,
//! and the check of the project's targets.

use std::{fmt::Write as _, fs, path::Path};

use plotters::{
    coord::{ranged1d::ValueFormatter, types::RangedCoordf64},
    prelude::*,
};

use super::{Report, Row, Target, Workload};
use reuseport::{
    error::{Error, Result},
    policy::PolicyKind,
};

fn find<'a>(workloads: &'a [Workload], name: &str) -> Option<&'a Workload> {
    workloads.iter().find(|w| w.name == name)
}

fn get<'a>(w: Option<&'a Workload>, model: &str) -> Option<&'a Row> {
    w?.rows.iter().find(|r| r.model == model)
}

/// The cost targets: a selection's run time over the floor program's.
/// Those that read nothing from the packet (or only the kernel's flow
/// hash) within 10 %; those that read the packet's addresses or compare
/// workers' loads within 30 %.
pub const COST_TARGETS: [(&str, f64); 9] = [
    ("cpu", 1.10),
    ("round-robin", 1.10),
    ("weighted", 1.10),
    ("hash/flow", 1.10),
    ("hash/src-ip", 1.30),
    ("hash/four-tuple", 1.30),
    ("consistent/flow", 1.30),
    ("consistent/four-tuple", 1.30),
    ("least-loaded", 1.30),
];

/// The project's targets, checked against a run.
pub fn targets(workloads: &[Workload], quick: bool) -> Vec<Target> {
    let mut t = Vec::new();
    let bpf = find(workloads, "bpf-cost");
    for (policy, goal) in COST_TARGETS {
        if let Some(r) = get(bpf, policy) {
            t.push(Target {
                what: format!(
                    "BPF cost of `{policy}` per selection, over the floor program (median of the rounds)"
                ),
                goal: format!("<= {goal:.2}x"),
                value: match (r.bpf_ratio, r.bpf_ns) {
                    (Some(x), Some(ns)) => format!("{x:.2}x ({ns:.0} ns)"),
                    _ => "not measured".into(),
                },
                met: r.bpf_ratio.is_some_and(|x| x <= goal),
            });
        }
    }
    let rate = find(workloads, "connection-rate");
    if let Some(kernel) = get(rate, "reuseport-kernel") {
        for r in rate.map(|w| w.rows.as_slice()).unwrap_or(&[]) {
            let steered = PolicyKind::STEERED
                .iter()
                .any(|k| k.name() == r.model.as_str());
            if steered && kernel.rate > 0.0 {
                let x = r.rate / kernel.rate;
                t.push(Target {
                    what: format!("connection rate of `{}` over reuseport-kernel", r.model),
                    goal: ">= 0.98x".into(),
                    value: format!("{x:.3}x ({:.0} vs {:.0} conn/s)", r.rate, kernel.rate),
                    met: x >= 0.98,
                });
            }
        }
    }
    let dist = find(workloads, "distribution");
    let n = dist
        .and_then(|w| w.rows.first())
        .map_or(0, |r| r.spread.per_worker.iter().sum::<u64>());
    for (model, goal) in [("round-robin", 1.001), ("hash", 1.02)] {
        if let Some(r) = get(dist, model) {
            let m = r.spread.max_over_mean;
            t.push(Target {
                what: format!(
                    "max/mean of `{model}` over {n} connections{}",
                    if quick {
                        " (quick run: the goal is for 10,000)"
                    } else {
                        ""
                    }
                ),
                goal: format!("<= {goal}"),
                value: format!("{m:.4}"),
                met: m <= goal,
            });
        }
    }
    if let Some(r) = get(dist, "shared-accept") {
        t.push(Target {
            what: format!("max/mean of `shared-accept` over {n} connections (reported alongside)"),
            goal: "-".into(),
            value: format!("{:.4}", r.spread.max_over_mean),
            met: true,
        });
    }
    if let Some(r) = find(workloads, "idle-memory").and_then(|w| w.rows.first()) {
        let n = r.ops / 2;
        let b = r.bytes_per_connection.unwrap_or(f64::NAN);
        t.push(Target {
            what: format!(
                "resident memory per idle connection ({n} held; every one echoed at the end)"
            ),
            goal: "<= 8 KiB".into(),
            value: format!("{:.0} bytes", b),
            met: b <= 8192.0 && r.errors == 0,
        });
    }
    if let Some(r) = get(rate, "cpu") {
        let l = r.locality.unwrap_or(0.0);
        t.push(Target {
            what: "CPU locality of `cpu` (served on the CPU that received the SYN)".into(),
            goal: "100 %".into(),
            value: format!("{:.2} %", l * 100.0),
            met: l >= 1.0,
        });
    }
    let pers = find(workloads, "persistent-echo");
    let lat = find(workloads, "open-loop-latency");
    if let (Some(tpc), Some(tokio)) = (get(pers, "cpu"), get(pers, "tokio-default")) {
        let x = tpc.rate / tokio.rate.max(1.0);
        t.push(Target {
            what: "persistent echo, thread-per-core (`cpu`) over tokio-default, requests/s".into(),
            goal: ">= 1.2x".into(),
            value: format!("{x:.2}x ({:.0} vs {:.0} req/s)", tpc.rate, tokio.rate),
            met: x >= 1.2,
        });
    }
    if let (Some(tpc), Some(tokio)) = (get(lat, "cpu"), get(lat, "tokio-default")) {
        let x = tpc.latency.p99 as f64 / (tokio.latency.p99.max(1)) as f64;
        t.push(Target {
            what: "persistent echo p99 (open loop), thread-per-core (`cpu`) over tokio-default"
                .into(),
            goal: "<= 0.5x".into(),
            value: format!("{x:.2}x ({} vs {} µs)", tpc.latency.p99, tokio.latency.p99),
            met: x <= 0.5,
        });
    }
    t
}

fn opt(v: Option<f64>, digits: usize, scale: f64, suffix: &str) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{:.*}{suffix}", digits, x * scale),
        _ => "-".into(),
    }
}

/// The report as Markdown.
pub fn markdown(report: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## reuseport bench, {} (Linux {}, CPUs {:?}, epochs of {} ms x {}, load average {:.2} at the start, {:.2} at the end)\n",
        report.started,
        report.kernel,
        report.cpus,
        report.settings.epoch_ms,
        report.settings.rounds,
        report.load.0,
        report.load.1
    );
    for w in &report.workloads {
        let _ = writeln!(s, "### {}\n\n{}\n", w.name, w.about);
        if w.name == "bpf-cost-by-workers" {
            by_workers_markdown(&mut s, w);
            continue;
        }
        let _ = writeln!(
            s,
            "| model | {} | p50 µs | p99 µs | p99.9 µs | max µs | per worker | max/mean | Jain | locality | BPF ns | BPF / floor | bytes per conn | errors |",
            w.unit
        );
        let _ = writeln!(
            s,
            "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
        );
        for r in &w.rows {
            let spread = &r.spread;
            let per = if spread.per_worker.is_empty() {
                "-".to_string()
            } else {
                spread
                    .per_worker
                    .iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(" / ")
            };
            let _ = writeln!(
                s,
                "| {} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.model,
                r.rate,
                r.latency.p50,
                r.latency.p99,
                r.latency.p999,
                r.latency.max,
                per,
                opt(
                    (!spread.per_worker.is_empty()).then_some(spread.max_over_mean),
                    3,
                    1.0,
                    ""
                ),
                opt(
                    (!spread.per_worker.is_empty()).then_some(spread.jain),
                    4,
                    1.0,
                    ""
                ),
                opt(r.locality, 1, 100.0, " %"),
                opt(r.bpf_ns, 0, 1.0, ""),
                opt(r.bpf_ratio, 2, 1.0, "x"),
                opt(r.bytes_per_connection, 0, 1.0, ""),
                r.errors
            );
        }
        let _ = writeln!(s);
    }
    let _ = writeln!(
        s,
        "### targets\n\n| | goal | this run | |\n|---|---|---|---|"
    );
    for t in &report.targets {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} |",
            t.what,
            t.goal,
            t.value,
            if t.met { "met" } else { "**missed**" }
        );
    }
    let _ = writeln!(
        s,
        "\nrun clean (every model measured, every echo verified, no kernel drops): {}",
        if report.clean {
            "yes".to_string()
        } else {
            format!("**no**: {}", report.problems.join("; "))
        }
    );
    s
}

/// `bpf-cost-by-workers` as one row per model, one column per group size:
/// run time per selection and its ratio over the floor of the same size.
fn by_workers_markdown(s: &mut String, w: &Workload) {
    let mut sizes: Vec<usize> = w.rows.iter().filter_map(|r| r.workers).collect();
    sizes.dedup();
    let mut models: Vec<&str> = Vec::new();
    for r in &w.rows {
        if !models.contains(&r.model.as_str()) {
            models.push(&r.model);
        }
    }
    let head: Vec<String> = sizes.iter().map(|n| format!("{n} workers")).collect();
    let _ = writeln!(s, "| model | {} |", head.join(" | "));
    let _ = writeln!(s, "|---|{}", "---:|".repeat(sizes.len()));
    for m in models {
        let cells: Vec<String> = sizes
            .iter()
            .map(|&n| {
                w.rows
                    .iter()
                    .find(|r| r.model == m && r.workers == Some(n))
                    .map_or("-".into(), |r| {
                        format!(
                            "{} ns ({})",
                            opt(r.bpf_ns, 0, 1.0, ""),
                            opt(r.bpf_ratio, 2, 1.0, "x")
                        )
                    })
            })
            .collect();
        let _ = writeln!(s, "| {m} | {} |", cells.join(" | "));
    }
    let _ = writeln!(s);
}

/// Writes `report.md`, `results.json`, `results.csv`, `distribution.svg`
/// and `latency.svg` into `dir`.
pub fn write(report: &Report, dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
    let put = |name: &str, data: &[u8]| {
        fs::write(dir.join(name), data)
            .map_err(|e| Error::io(format!("writing {}", dir.join(name).display()), e))
    };
    put("report.md", markdown(report).as_bytes())?;
    let json =
        serde_json::to_vec_pretty(report).map_err(|e| Error::io("encoding JSON", e.into()))?;
    put("results.json", &json)?;
    let mut csv = csv::Writer::from_writer(Vec::new());
    let header = [
        "workload",
        "model",
        "rate",
        "unit",
        "ops",
        "errors",
        "p50_us",
        "p99_us",
        "p999_us",
        "max_us",
        "per_worker",
        "max_over_mean",
        "jain",
        "locality",
        "bpf_ns",
        "bpf_ratio",
        "bytes_per_connection",
        "workers",
    ];
    csv.write_record(header)
        .map_err(|e| Error::io("writing CSV", e.into()))?;
    let f = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    for w in &report.workloads {
        for r in &w.rows {
            let per: Vec<String> = r.spread.per_worker.iter().map(u64::to_string).collect();
            csv.write_record([
                w.name.clone(),
                r.model.clone(),
                format!("{:.1}", r.rate),
                w.unit.clone(),
                r.ops.to_string(),
                r.errors.to_string(),
                r.latency.p50.to_string(),
                r.latency.p99.to_string(),
                r.latency.p999.to_string(),
                r.latency.max.to_string(),
                per.join(" "),
                f((!per.is_empty()).then_some(r.spread.max_over_mean)),
                f((!per.is_empty()).then_some(r.spread.jain)),
                f(r.locality),
                f(r.bpf_ns),
                f(r.bpf_ratio),
                f(r.bytes_per_connection),
                r.workers.map(|n| n.to_string()).unwrap_or_default(),
            ])
            .map_err(|e| Error::io("writing CSV", e.into()))?;
        }
    }
    let csv = csv
        .into_inner()
        .map_err(|e| Error::io("writing CSV", std::io::Error::other(e.to_string())))?;
    put("results.csv", &csv)?;
    if let Some(w) = report.workloads.iter().find(|w| w.name == "distribution") {
        distribution_chart(w, &dir.join("distribution.svg"))?;
    }
    if let Some(w) = report
        .workloads
        .iter()
        .find(|w| w.name == "open-loop-latency")
    {
        latency_chart(w, &dir.join("latency.svg"))?;
    }
    Ok(())
}

fn chart_error(e: impl std::fmt::Display) -> Error {
    Error::io("drawing a chart", std::io::Error::other(e.to_string()))
}

type Chart<'a, 'b, Y> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>;

/// A chart with one group of bars per model along x, labelled with the
/// models' names.
fn model_chart<'a, 'b, Y>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    names: &[String],
    y: Y,
    y_desc: &str,
) -> Result<Chart<'a, 'b, Y>>
where
    Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
{
    let n = names.len().max(1);
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(70)
        .y_label_area_size(60)
        // Group i spans [i - 0.5, i + 0.5]: integer ticks fall in the middle.
        .build_cartesian_2d(-0.5f64..n as f64 - 0.5, y)
        .map_err(chart_error)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_style(("sans-serif", 11))
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(chart_error)?;
    Ok(chart)
}

/// Each model's share of connections per worker, as grouped bars.
fn distribution_chart(w: &Workload, path: &Path) -> Result<()> {
    let rows: Vec<&Row> = w
        .rows
        .iter()
        .filter(|r| !r.spread.per_worker.is_empty())
        .collect();
    let workers = rows
        .iter()
        .map(|r| r.spread.per_worker.len())
        .max()
        .unwrap_or(1);
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let n = rows.len().max(1);
    let names: Vec<String> = rows.iter().map(|r| r.model.clone()).collect();
    let caption = format!(
        "Share of {} per worker",
        w.about.split(';').next().unwrap_or("")
    );
    let mut chart = model_chart(
        &root,
        &caption,
        &names,
        RangedCoordf64::from(0f64..100f64),
        "% of the connections",
    )?;
    let bar = 0.8 / workers as f64;
    for (i, r) in rows.iter().enumerate() {
        let total: u64 = r.spread.per_worker.iter().sum::<u64>().max(1);
        for (k, &c) in r.spread.per_worker.iter().enumerate() {
            let x0 = i as f64 - 0.4 + k as f64 * bar;
            let share = c as f64 * 100.0 / total as f64;
            let color = Palette99::pick(k).mix(0.85);
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(x0, 0.0), (x0 + bar * 0.9, share)],
                    color.filled(),
                )))
                .map_err(chart_error)?;
        }
    }
    let even = 100.0 / workers as f64;
    chart
        .draw_series(LineSeries::new(
            [(0.0, even), (n as f64, even)],
            BLACK.mix(0.5),
        ))
        .map_err(chart_error)?
        .label("even share")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 20, y)], BLACK.mix(0.5)));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .border_style(BLACK)
        .draw()
        .map_err(chart_error)?;
    root.present().map_err(chart_error)
}

/// p50, p99 and p99.9 per model, log scale.
fn latency_chart(w: &Workload, path: &Path) -> Result<()> {
    let rows = &w.rows;
    let top = rows
        .iter()
        .map(|r| r.latency.p999)
        .max()
        .unwrap_or(10)
        .max(10) as f64
        * 8.0;
    let root = SVGBackend::new(path, (1100, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(chart_error)?;
    let names: Vec<String> = rows.iter().map(|r| r.model.clone()).collect();
    let mut chart = model_chart(
        &root,
        "Open-loop latency per model (µs, log scale)",
        &names,
        LogCoord::from((1f64..top).log_scale()),
        "µs",
    )?;
    let bar = 0.8 / 3.0;
    for (k, (label, pick)) in [
        ("p50", (|r: &Row| r.latency.p50) as fn(&Row) -> u64),
        ("p99", |r: &Row| r.latency.p99),
        ("p99.9", |r: &Row| r.latency.p999),
    ]
    .into_iter()
    .enumerate()
    {
        let color = Palette99::pick(k).mix(0.85);
        chart
            .draw_series(rows.iter().enumerate().map(|(i, r)| {
                let x0 = i as f64 - 0.4 + k as f64 * bar;
                Rectangle::new(
                    [(x0, 1.0), (x0 + bar * 0.9, pick(r).max(1) as f64)],
                    color.filled(),
                )
            }))
            .map_err(chart_error)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperMiddle)
        .border_style(BLACK)
        .draw()
        .map_err(chart_error)?;
    root.present().map_err(chart_error)
}

/// A soak run as Markdown.
pub fn soak_markdown(soak: &super::Soak) -> String {
    let mut s = String::from("## reuseport bench --soak\n\n| s | connections | failed | fds | RSS MiB |\n|---:|---:|---:|---:|---:|\n");
    for x in &soak.samples {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {:.1} |",
            x.seconds,
            x.connections,
            x.errors,
            x.fds,
            x.rss as f64 / 1048576.0
        );
    }
    let _ = writeln!(
        s,
        "\ndescriptors and memory flat, nothing failed: {}",
        if soak.flat {
            "yes".to_string()
        } else {
            "**no**".to_string()
        }
    );
    for f in &soak.failures {
        let _ = writeln!(s, "- failure: {f}");
    }
    s
}
