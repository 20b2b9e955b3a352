//! SVG plots of replay summaries (plotters' SVG backend: no font or bitmap stack).
//!
//! ```
//! use kvroute_replay::{plot, replay, PolicyName, ReplayConfig, TraceRequest, Workload};
//!
//! let request = |t, ids: &[u64]| TraceRequest {
//!     timestamp: t, input_length: 64 * ids.len() as u64, output_length: 4,
//!     hash_ids: ids.to_vec(), media_ids: vec![],
//! };
//! let workload = Workload::from_trace(&[request(0, &[1, 2]), request(9, &[1, 3])], 64, 64)?;
//! let config = ReplayConfig::default().with_workers(2);
//! let summaries: Vec<_> = [PolicyName::KvAware, PolicyName::RoundRobin]
//!     .into_iter()
//!     .map(|p| replay(&workload, &config, p.build(Default::default(), 1).as_mut(), &mut |_, _| {}))
//!     .map(|r| r.map(|r| r.summary))
//!     .collect::<Result<_, _>>()?;
//! let svg = plot::policies_svg(&summaries, "two requests")?;
//! assert!(svg.starts_with("<svg"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use crate::report::ReplaySummary;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// Drawing failed (plotters' error, as text).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("plot: {0}")]
pub struct PlotError(pub String);

fn err(error: impl std::fmt::Display) -> PlotError {
    PlotError(error.to_string())
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// One point of a hit rate over capacity sweep.
#[derive(Clone, Debug, PartialEq)]
pub struct CapacityPoint {
    /// The policy.
    pub policy: String,
    /// Blocks per worker.
    pub capacity_blocks: usize,
    /// Hit rate measured.
    pub hit_rate: f64,
}

/// Two panels: hit rate per policy (with the ideal as a dashed line) and TTFT per policy (p99
/// bars with the p50 inside).
pub fn policies_svg(summaries: &[ReplaySummary], title: &str) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (1000, 440)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let root = root.titled(title, ("sans-serif", 20)).map_err(err)?;
        let (left, right) = root.split_horizontally(500);
        hit_rate_panel(&left, summaries)?;
        ttft_panel(&right, summaries)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}

/// The policies' names under their segments (one segment per policy, `0..=last`).
fn policy_labels(summaries: &[ReplaySummary]) -> impl Fn(&SegmentValue<u32>) -> String + '_ {
    |x| match x {
        SegmentValue::CenterOf(i) => summaries
            .get(*i as usize)
            .map_or_else(String::new, |s| s.policy.clone()),
        _ => String::new(),
    }
}

fn last_segment(summaries: &[ReplaySummary]) -> u32 {
    summaries.len().saturating_sub(1) as u32
}

/// A bar filling policy `i`'s segment up to `value`, `inset` pixels in from each side.
fn segment_bar(
    i: usize,
    value: f64,
    inset: u32,
    color: RGBColor,
) -> Rectangle<(SegmentValue<u32>, f64)> {
    let i = i as u32;
    let mut rect = Rectangle::new(
        [
            (SegmentValue::Exact(i), 0.0),
            (SegmentValue::Exact(i + 1), value),
        ],
        color.filled(),
    );
    rect.set_margin(0, 0, inset, inset);
    rect
}

/// `text` centred over policy `i`'s segment at height `y`.
fn segment_label(
    i: usize,
    y: f64,
    text: String,
) -> Text<'static, (SegmentValue<u32>, f64), String> {
    Text::new(
        text,
        (SegmentValue::CenterOf(i as u32), y),
        ("sans-serif", 13)
            .into_font()
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Center)),
    )
}

fn hit_rate_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    summaries: &[ReplaySummary],
) -> Result<(), PlotError> {
    let last = last_segment(summaries);
    let ideal = summaries.first().map_or(0.0, |s| s.ideal_hit_rate);
    let top = summaries
        .iter()
        .map(|s| s.hit_rate)
        .fold(ideal, f64::max)
        .max(0.01)
        * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("cache hit rate (blocks)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&policy_labels(summaries))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(
            summaries
                .iter()
                .enumerate()
                .map(|(i, s)| segment_bar(i, s.hit_rate, 12, PALETTE[i % PALETTE.len()])),
        )
        .map_err(err)?;
    chart
        .draw_series(summaries.iter().enumerate().map(|(i, s)| {
            segment_label(
                i,
                s.hit_rate + top * 0.05,
                format!("{:.1}%", s.hit_rate * 100.0),
            )
        }))
        .map_err(err)?;
    chart
        .draw_series(DashedLineSeries::new(
            [
                (SegmentValue::Exact(0), ideal),
                (SegmentValue::Exact(last + 1), ideal),
            ],
            6,
            4,
            BLACK.stroke_width(1),
        ))
        .map_err(err)?
        .label(format!("ideal (one infinite cache) {:.1}%", ideal * 100.0))
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

fn ttft_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    summaries: &[ReplaySummary],
) -> Result<(), PlotError> {
    let last = last_segment(summaries);
    let slowest = summaries.iter().map(|s| s.ttft_ms.p99).fold(1.0, f64::max) * 1.2;
    let mut chart = ChartBuilder::on(area)
        .caption("time to first token (virtual ms)", ("sans-serif", 16))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d((0..last).into_segmented(), 0.0..slowest)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_label_formatter(&policy_labels(summaries))
        .draw()
        .map_err(err)?;
    // p99 wide, p50 narrower in front of it.
    for (name, color, inset, value) in [
        (
            "p99",
            PALETTE[1],
            10,
            (|s: &ReplaySummary| s.ttft_ms.p99) as fn(&ReplaySummary) -> f64,
        ),
        ("p50", PALETTE[0], 24, |s: &ReplaySummary| s.ttft_ms.p50),
    ] {
        chart
            .draw_series(
                summaries
                    .iter()
                    .enumerate()
                    .map(|(i, s)| segment_bar(i, value(s), inset, color)),
            )
            .map_err(err)?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], color.filled()));
    }
    chart
        .draw_series(summaries.iter().enumerate().map(|(i, s)| {
            segment_label(
                i,
                s.ttft_ms.p99 + slowest * 0.04,
                format!("{:.0}", s.ttft_ms.p99),
            )
        }))
        .map_err(err)?;
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(err)
}

/// Hit rate over each worker's capacity (log scale), one line per policy, with the ideal.
pub fn capacity_svg(
    points: &[CapacityPoint],
    ideal: f64,
    title: &str,
) -> Result<String, PlotError> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 460)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let lo = points
            .iter()
            .map(|p| p.capacity_blocks)
            .min()
            .unwrap_or(1)
            .max(1);
        let hi = points
            .iter()
            .map(|p| p.capacity_blocks)
            .max()
            .unwrap_or(2)
            .max(lo + 1);
        let top = points
            .iter()
            .map(|p| p.hit_rate)
            .fold(ideal, f64::max)
            .max(0.01)
            * 1.1;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(45)
            .y_label_area_size(55)
            .build_cartesian_2d((lo as f64..hi as f64).log_scale(), 0.0..top)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("KV capacity per worker (blocks)")
            .light_line_style(TRANSPARENT)
            .y_desc("hit rate")
            .x_label_formatter(&|x| format!("{:.0}", x))
            .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
            .draw()
            .map_err(err)?;
        let mut policies: Vec<&str> = Vec::new();
        for point in points {
            if !policies.contains(&point.policy.as_str()) {
                policies.push(&point.policy);
            }
        }
        for (i, policy) in policies.iter().enumerate() {
            let color = PALETTE[i % PALETTE.len()];
            let mut line: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.policy == *policy)
                .map(|p| (p.capacity_blocks as f64, p.hit_rate))
                .collect();
            line.sort_by(|a, b| a.0.total_cmp(&b.0));
            chart
                .draw_series(LineSeries::new(line.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(*policy)
                .legend(move |(x, y)| {
                    PathElement::new([(x, y), (x + 16, y)], color.stroke_width(2))
                });
            chart
                .draw_series(line.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .draw_series(DashedLineSeries::new(
                [(lo as f64, ideal), (hi as f64, ideal)],
                6,
                4,
                BLACK.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("ideal (one infinite cache) {:.1}%", ideal * 100.0))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::MiddleRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
