//! PNG and SVG plots with `plotters`: bars per configuration (like the talk's slides) and
//! time series of balloon sizes and of the pool.

use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Result};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::configs::ConfigKind;
use crate::report::Results;
use crate::run::RunResult;

/// Plot files (without extension) and what they show.
pub const FILES: &[(&str, &str)] = &[
    (
        "temporal",
        "Temporal stats: wall time and CPU per configuration",
    ),
    (
        "sectors",
        "Virtual block device stats: sectors read and written per configuration",
    ),
    (
        "balloon",
        "Each guest's balloon size over time (first repeat of each configuration)",
    ),
    (
        "pool",
        "tmem pool logical (apparent) and held (physical) size and its budget over time",
    ),
    (
        "density",
        "Density: healthy idle and light-workload guests within the host budget",
    ),
];

const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a TrueType font for plotters' `ab_glyph` text rendering (once).
fn ensure_font() -> Result<()> {
    static DONE: OnceLock<bool> = OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    });
    if ok {
        Ok(())
    } else {
        bail!("no TrueType font found (install fonts-dejavu-core); tried {FONT_PATHS:?}")
    }
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(0x4c, 0x72, 0xb0),
    RGBColor(0xdd, 0x84, 0x52),
    RGBColor(0x55, 0xa8, 0x68),
    RGBColor(0xc4, 0x4e, 0x52),
    RGBColor(0x81, 0x72, 0xb3),
    RGBColor(0x93, 0x78, 0x60),
];

fn err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("plotting: {e:?}")
}

/// Grouped bars: one group per label, one bar per series.
fn bars<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    ylabel: &str,
    labels: &[String],
    series: &[(&str, Vec<f64>)],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let n = labels.len().max(1);
    let ymax = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .fold(0.0f64, f64::max)
        .max(1e-9)
        // Headroom for the values and, with many series, the legend.
        * (1.15 + 0.12 * series.len().saturating_sub(2) as f64);
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(60)
        .y_label_area_size(80)
        .build_cartesian_2d(0f64..n as f64, 0f64..ymax)
        .map_err(err)?;
    let labels_c = labels.to_vec();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .light_line_style(WHITE)
        .x_labels(n * 2 + 1)
        .x_label_formatter(&move |x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 {
                labels_c.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(ylabel)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(err)?;
    let k = series.len().max(1) as f64;
    let w = 0.8 / k;
    for (si, (name, vals)) in series.iter().enumerate() {
        let color = PALETTE[si % PALETTE.len()];
        chart
            .draw_series(vals.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + w * si as f64;
                Rectangle::new([(x0, 0.0), (x0 + w * 0.95, *v)], color.filled())
            }))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
        chart
            .draw_series(vals.iter().enumerate().map(|(i, v)| {
                let x0 = i as f64 + 0.1 + w * si as f64 + w * 0.45;
                Text::new(
                    fmt_val(*v),
                    (x0, *v + ymax * 0.01),
                    ("sans-serif", 14).into_font(),
                )
            }))
            .map_err(err)?;
    }
    if series.len() > 1 {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
    }
    root.present().map_err(err)?;
    Ok(())
}

fn fmt_val(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Line series: (name, points).
fn lines<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    title: &str,
    ylabel: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> Result<()> {
    root.fill(&WHITE).map_err(err)?;
    let pts = series.iter().flat_map(|(_, v)| v.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0f64);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        x0 = 0.0;
        x1 = 1.0;
    }
    if x1 - x0 < 1e-6 {
        x1 = x0 + 1.0;
    }
    let mut chart = ChartBuilder::on(root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, 0f64..(y1.max(1e-9) * 1.1))
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("seconds since workload start")
        .y_desc(ylabel)
        .label_style(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    for (i, (name, v)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(v.iter().copied(), color.stroke_width(2)))
            .map_err(err)?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 14, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

fn both(
    out: &Path,
    name: &str,
    size: (u32, u32),
    f: &dyn Fn(&DrawingArea<BitMapBackend, Shift>) -> Result<()>,
    g: &dyn Fn(&DrawingArea<SVGBackend, Shift>) -> Result<()>,
) -> Result<()> {
    let png = out.join(format!("{name}.png"));
    let svg = out.join(format!("{name}.svg"));
    {
        let root = BitMapBackend::new(&png, size).into_drawing_area();
        f(&root)?;
    }
    {
        let root = SVGBackend::new(&svg, size).into_drawing_area();
        g(&root)?;
    }
    Ok(())
}

fn first_run(r: &Results, c: ConfigKind) -> Option<&RunResult> {
    r.runs
        .iter()
        .filter(|x| x.config == c)
        .min_by_key(|x| x.repeat)
}

/// Writes every plot into `out`.
pub fn write_plots(r: &Results, out: &Path) -> Result<()> {
    ensure_font()?;
    let labels: Vec<String> = r
        .summaries
        .iter()
        .map(|s| short_label(s.config).to_string())
        .collect();
    let m = |name: &str| -> Vec<f64> {
        r.summaries
            .iter()
            .map(|s| s.metrics.get(name).copied().unwrap_or(0.0))
            .collect()
    };
    let n = labels.len() as u32;
    let wide = (260 + 150 * n.max(2), 480);
    // Temporal: wall and CPU, two panels like the talk's slide.
    let (wall, cpu) = (m("wall_secs"), m("cpu_secs"));
    let draw_t = |a: &DrawingArea<BitMapBackend, Shift>| -> Result<()> {
        let (l, rr) = a.split_horizontally(a.dim_in_pixel().0 / 2);
        bars(
            &l,
            "Wall time to completion",
            "seconds",
            &labels,
            &[("wall", wall.clone())],
        )?;
        bars(
            &rr,
            "Total CPU (QEMU + tmemd)",
            "CPU seconds",
            &labels,
            &[("cpu", cpu.clone())],
        )
    };
    let draw_t_svg = |a: &DrawingArea<SVGBackend, Shift>| -> Result<()> {
        let (l, rr) = a.split_horizontally(a.dim_in_pixel().0 / 2);
        bars(
            &l,
            "Wall time to completion",
            "seconds",
            &labels,
            &[("wall", wall.clone())],
        )?;
        bars(
            &rr,
            "Total CPU (QEMU + tmemd)",
            "CPU seconds",
            &labels,
            &[("cpu", cpu.clone())],
        )
    };
    both(out, "temporal", (wide.0 * 2, wide.1), &draw_t, &draw_t_svg)?;
    let (rd, wr) = (m("sectors_read"), m("sectors_written"));
    let series = [("sectors read", rd), ("sectors written", wr)];
    both(
        out,
        "sectors",
        (wide.0 + 200, wide.1),
        &|a| {
            bars(
                a,
                "Backing storage: 512-byte sectors",
                "sectors",
                &labels,
                &series,
            )
        },
        &|a| {
            bars(
                a,
                "Backing storage: 512-byte sectors",
                "sectors",
                &labels,
                &series,
            )
        },
    )?;
    // Balloon sizes: one panel per configuration (first repeat).
    let confs: Vec<ConfigKind> = r.summaries.iter().map(|s| s.config).collect();
    let balloon_series = |c: ConfigKind| -> Vec<(String, Vec<(f64, f64)>)> {
        first_run(r, c)
            .map(|x| {
                x.guests
                    .iter()
                    .map(|g| {
                        (
                            g.name.clone(),
                            g.balloon
                                .iter()
                                .map(|p| (p.t, p.bytes as f64 / 1048576.0))
                                .collect(),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let cols = 3usize;
    let rows = confs.len().div_ceil(cols).max(1);
    let bsize = (1500, 380 * rows as u32);
    let draw_b = |a: &DrawingArea<BitMapBackend, Shift>| -> Result<()> {
        a.fill(&WHITE).map_err(err)?;
        for (panel, c) in a.split_evenly((rows, cols)).iter().zip(&confs) {
            lines(
                panel,
                &format!("{}: balloon (MiB)", short_label(*c)),
                "MiB",
                &balloon_series(*c),
            )?;
        }
        Ok(())
    };
    let draw_b_svg = |a: &DrawingArea<SVGBackend, Shift>| -> Result<()> {
        a.fill(&WHITE).map_err(err)?;
        for (panel, c) in a.split_evenly((rows, cols)).iter().zip(&confs) {
            lines(
                panel,
                &format!("{}: balloon (MiB)", short_label(*c)),
                "MiB",
                &balloon_series(*c),
            )?;
        }
        Ok(())
    };
    both(out, "balloon", bsize, &draw_b, &draw_b_svg)?;
    // Pool: logical and held for each tmem configuration (first repeat).
    let mut pool_series = Vec::new();
    for c in &confs {
        if let Some(x) = first_run(r, *c).filter(|x| x.config.tmem()) {
            pool_series.push((
                format!("{} logical", short_label(*c)),
                x.pool
                    .iter()
                    .map(|p| (p.t, p.logical as f64 / 1048576.0))
                    .collect::<Vec<_>>(),
            ));
            pool_series.push((
                format!("{} held", short_label(*c)),
                x.pool
                    .iter()
                    .map(|p| (p.t, p.held as f64 / 1048576.0))
                    .collect(),
            ));
            pool_series.push((
                format!("{} budget", short_label(*c)),
                x.pool
                    .iter()
                    .map(|p| (p.t, p.budget as f64 / 1048576.0))
                    .collect(),
            ));
        }
    }
    both(
        out,
        "pool",
        (1100, 520),
        &|a| {
            lines(
                a,
                "tmem pool: logical (apparent), held (physical) and its budget",
                "MiB",
                &pool_series,
            )
        },
        &|a| {
            lines(
                a,
                "tmem pool: logical (apparent), held (physical) and its budget",
                "MiB",
                &pool_series,
            )
        },
    )?;
    let passes = r.density_passes();
    if let Some(first) = passes.first() {
        let l: Vec<String> = first.modes().iter().map(|m| m.mode.clone()).collect();
        let mut s: Vec<(String, Vec<f64>)> = Vec::new();
        for d in &passes {
            let modes = d.modes();
            let w = d.workload.name();
            s.push((
                format!("{w}: last stable count"),
                modes.iter().map(|m| f64::from(m.last_stable)).collect(),
            ));
            s.push((
                format!("{w}: healthy at end"),
                modes.iter().map(|m| f64::from(m.healthy)).collect(),
            ));
        }
        let s: Vec<(&str, Vec<f64>)> = s.iter().map(|(n, v)| (n.as_str(), v.clone())).collect();
        let workloads: Vec<&str> = passes.iter().map(|d| d.workload.name()).collect();
        let title = format!(
            "{} MiB guests ({}) in a {} MiB budget",
            first.guest_mib,
            workloads.join(", "),
            first.budget_mib
        );
        both(
            out,
            "density",
            (800, 480),
            &|a| bars(a, &title, "guests", &l, &s),
            &|a| bars(a, &title, "guests", &l, &s),
        )?;
    }
    Ok(())
}

fn short_label(c: ConfigKind) -> &'static str {
    match c {
        ConfigKind::Unchanged => "unchanged",
        ConfigKind::HostCache => "host cache",
        ConfigKind::Selfballoon => "self-balloon",
        ConfigKind::Tmem => "tmem",
        ConfigKind::TmemDedup => "tmem+dedup",
        ConfigKind::TmemDedupComp => "tmem+dedup+comp",
        ConfigKind::Modern => "modern",
        ConfigKind::ModernTmem => "modern+tmem",
    }
}
