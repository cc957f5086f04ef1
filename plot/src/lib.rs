//! weaver-plot: one PNG of a run, from its `metrics.jsonl` (`weaver plot RUN_DIR`).
//!
//! Seven panels over the step: the loss and its terms, the learning rate, the gradient norm,
//! throughput (tokens/s), MFU, the largest rank's peak memory, and held-out recall@1. Where the run started again (a new
//! generation under the coordinator, or a resumed `weaver train` whose steps go back) every
//! panel has a vertical line, labelled in the loss panel, and each stretch between two such
//! lines is drawn as its own curve, so that steps trained twice show as two curves rather
//! than a zig-zag.
//!
//! Drawn by `plotters` into an RGB buffer and encoded by `png`; the text uses the DejaVu
//! Sans font this crate ships (`fonts/`, with its licence), so no system font, fontconfig
//! or freetype is needed.

use std::collections::BTreeMap;
use std::io::BufWriter;
use std::path::{Path, PathBuf};

use plotters::prelude::*;
use serde_json::Value;

/// The picture's size in pixels.
pub const SIZE: (u32, u32) = (1600, 1200);

const FONT: &str = "sans-serif";
static DEJAVU: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");

/// What can go wrong drawing a run.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// `metrics.jsonl` cannot be read, or the picture cannot be written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The run has no training line yet: nothing to draw.
    #[error("{path} has no training step yet (is RUN_DIR a weaver run directory?)")]
    NoSteps {
        /// The metrics file.
        path: String,
    },
    /// Drawing or encoding failed.
    #[error("drawing {path}: {message}")]
    Draw {
        /// The picture.
        path: String,
        /// What failed.
        message: String,
    },
}

/// Where a run started again.
#[derive(Debug, Clone, PartialEq)]
pub struct Mark {
    /// The first step of the new stretch.
    pub step: u64,
    /// `gen N` (a new generation) or `resumed` (a `weaver train --resume`).
    pub label: String,
}

/// A run's metrics, split into stretches at every restart.
#[derive(Debug, Default, Clone)]
pub struct Run {
    /// Per training key, per stretch: `(step, value)` in order.
    pub train: BTreeMap<String, Vec<Vec<(f64, f64)>>>,
    /// Per evaluation key: `(step, value)`.
    pub eval: BTreeMap<String, Vec<(f64, f64)>>,
    /// Where the run started again.
    pub marks: Vec<Mark>,
    /// Training lines read (one per step and stretch).
    pub steps: usize,
    /// Lines that were not JSON objects (a line cut short by a crash), passed over.
    pub unreadable_lines: usize,
    /// The largest step seen.
    pub last_step: u64,
}

const TRAIN_KEYS: [&str; 9] = [
    "loss",
    "itc",
    "caption",
    "itm",
    "lr",
    "grad_norm",
    "tokens_per_s",
    "mfu",
    "peak_mem_bytes",
];
const EVAL_KEYS: [&str; 2] = ["i2t_r1", "t2i_r1"];

impl Run {
    /// Reads `<run_dir>/metrics.jsonl`.
    pub fn read(run_dir: &Path) -> Result<Run, PlotError> {
        let path = run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|source| PlotError::Io {
            path: path.display().to_string(),
            source,
        })?;
        let run = Run::parse(&text);
        if run.steps == 0 {
            return Err(PlotError::NoSteps {
                path: path.display().to_string(),
            });
        }
        Ok(run)
    }

    /// Reads `metrics.jsonl` text.
    pub fn parse(text: &str) -> Run {
        let mut run = Run::default();
        // (generation, last step) of the current stretch; the stretch's index.
        let mut at: Option<(Option<u64>, u64)> = None;
        let mut stretch = 0usize;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let Ok(Value::Object(obj)) = serde_json::from_str::<Value>(line) else {
                run.unreadable_lines += 1;
                continue;
            };
            let Some(step) = obj.get("step").and_then(Value::as_u64) else {
                continue;
            };
            let num = |k: &str| obj.get(k).and_then(Value::as_f64);
            if obj.get("eval") == Some(&Value::Bool(true)) {
                for k in EVAL_KEYS {
                    if let Some(v) = num(k) {
                        run.eval
                            .entry(k.to_string())
                            .or_default()
                            .push((step as f64, v));
                    }
                }
                continue;
            }
            let Some(loss) = num("loss") else {
                continue; // the final `done` line, and anything else without a loss
            };
            let generation = obj.get("generation").and_then(Value::as_u64);
            match at {
                Some((g, last)) if g == generation && step == last => continue, // a duplicate
                Some((g, last)) if g != generation || step < last => {
                    stretch += 1;
                    run.marks.push(Mark {
                        step,
                        label: match generation {
                            Some(n) if g != generation => format!("gen {n}"),
                            _ => "resumed".into(),
                        },
                    });
                }
                _ => {}
            }
            at = Some((generation, step));
            run.steps += 1;
            run.last_step = run.last_step.max(step);
            for k in TRAIN_KEYS {
                let v = if k == "loss" { Some(loss) } else { num(k) };
                if let Some(v) = v.filter(|v| v.is_finite()) {
                    let stretches = run.train.entry(k.to_string()).or_default();
                    stretches.resize_with(stretch + 1, Vec::new);
                    stretches[stretch].push((step as f64, v));
                }
            }
        }
        run
    }
}

/// What [`plot`] drew.
#[derive(Debug, Clone)]
pub struct PlotReport {
    /// The picture.
    pub path: PathBuf,
    /// Training lines drawn.
    pub steps: usize,
    /// Evaluations drawn.
    pub evals: usize,
    /// Restarts marked.
    pub marks: Vec<Mark>,
    /// Unreadable lines passed over.
    pub unreadable_lines: usize,
}

/// Draws `<run_dir>/metrics.jsonl` into `out` (a PNG of [`SIZE`]).
pub fn plot(run_dir: &Path, out: &Path) -> Result<PlotReport, PlotError> {
    let run = Run::read(run_dir)?;
    render(&run, out)?;
    Ok(PlotReport {
        path: out.to_path_buf(),
        steps: run.steps,
        evals: run.eval.get("i2t_r1").map_or(0, Vec::len),
        marks: run.marks.clone(),
        unreadable_lines: run.unreadable_lines,
    })
}

// Colours: a loss and its terms, the eval directions, restarts.
const INK: RGBColor = RGBColor(40, 40, 40);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const ORANGE: RGBColor = RGBColor(255, 127, 14);
const GREEN: RGBColor = RGBColor(44, 160, 44);
const PURPLE: RGBColor = RGBColor(148, 103, 189);
const MARK: RGBColor = RGBColor(214, 39, 40);

struct Panel<'a> {
    title: &'a str,
    series: Vec<(&'a str, RGBColor)>,
    /// Shown when no series has a point.
    missing: &'a str,
    format: fn(f64) -> String,
}

fn plain(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-2 || v.abs() >= 1e5) {
        format!("{v:.1e}")
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    }
}

fn percent(v: f64) -> String {
    let s = format!("{:.1}", v * 100.0);
    format!("{}%", s.trim_end_matches('0').trim_end_matches('.'))
}

fn gib(v: f64) -> String {
    let s = format!("{:.2}", v / f64::from(1u32 << 30));
    format!("{} GiB", s.trim_end_matches('0').trim_end_matches('.'))
}

fn kilo(v: f64) -> String {
    if v.abs() >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// Draws `run` into `out`.
pub fn render(run: &Run, out: &Path) -> Result<(), PlotError> {
    let draw_err = |e: &dyn std::fmt::Display| PlotError::Draw {
        path: out.display().to_string(),
        message: e.to_string(),
    };
    // Registering the same font again is harmless (the map keeps the latest).
    plotters::style::register_font(FONT, FontStyle::Normal, DEJAVU)
        .map_err(|_| draw_err(&"the shipped font does not load"))?;
    let (w, h) = SIZE;
    let mut buf = vec![255u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| draw_err(&e))?;
        let (head, body) = root.split_vertically(50);
        let title = format!(
            "{} steps{}{}",
            run.last_step,
            if run.marks.is_empty() {
                String::new()
            } else {
                format!(
                    ", {} restart{} ({})",
                    run.marks.len(),
                    if run.marks.len() == 1 { "" } else { "s" },
                    run.marks
                        .iter()
                        .map(|m| format!("{} at step {}", m.label, m.step))
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            },
            if run.unreadable_lines > 0 {
                format!(", {} unreadable lines passed over", run.unreadable_lines)
            } else {
                String::new()
            }
        );
        head.titled(&title, (FONT, 26).into_font().color(&INK))
            .map_err(|e| draw_err(&e))?;
        let panels = [
            Panel {
                title: "loss",
                series: vec![
                    ("loss", INK),
                    ("itc", BLUE),
                    ("caption", ORANGE),
                    ("itm", GREEN),
                ],
                missing: "no loss",
                format: plain,
            },
            Panel {
                title: "learning rate",
                series: vec![("lr", BLUE)],
                missing: "no learning rate",
                format: plain,
            },
            Panel {
                title: "gradient norm (before clipping)",
                series: vec![("grad_norm", PURPLE)],
                missing: "no gradient norm",
                format: plain,
            },
            Panel {
                title: "throughput (tokens/s)",
                series: vec![("tokens_per_s", GREEN)],
                missing: "no throughput",
                format: kilo,
            },
            Panel {
                title: "MFU",
                series: vec![("mfu", ORANGE)],
                missing: "not measured: set train.peak_tflops",
                format: percent,
            },
            Panel {
                title: "peak memory (largest rank)",
                series: vec![("peak_mem_bytes", PURPLE)],
                missing: "not reported",
                format: gib,
            },
            Panel {
                title: "held-out recall@1",
                series: vec![("i2t_r1", BLUE), ("t2i_r1", ORANGE)],
                missing: "no evaluation yet",
                format: percent,
            },
        ];
        let areas = body.split_evenly((4, 2));
        for (area, panel) in areas.iter().zip(&panels) {
            draw_panel(area, panel, run).map_err(|e| draw_err(&e))?;
        }
        root.present().map_err(|e| draw_err(&e))?;
    }
    let io = |source| PlotError::Io {
        path: out.display().to_string(),
        source,
    };
    let file = std::fs::File::create(out).map_err(io)?;
    let mut enc = png::Encoder::new(BufWriter::new(file), w, h);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().map_err(|e| draw_err(&e))?;
    writer.write_image_data(&buf).map_err(|e| draw_err(&e))?;
    writer.finish().map_err(|e| draw_err(&e))
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, plotters::coord::Shift>;

/// A series of a panel: its key, colour, and its stretches of `(step, value)`.
type Curve<'a> = (&'a str, RGBColor, Vec<&'a [(f64, f64)]>);

fn draw_panel(area: &Area<'_>, panel: &Panel<'_>, run: &Run) -> Result<(), String> {
    // A panel's curves: training keys per stretch, evaluation keys as one curve.
    let curves: Vec<Curve<'_>> = panel
        .series
        .iter()
        .filter_map(|&(key, color)| {
            let parts: Vec<&[(f64, f64)]> = if let Some(s) = run.train.get(key) {
                s.iter()
                    .map(Vec::as_slice)
                    .filter(|p| !p.is_empty())
                    .collect()
            } else {
                run.eval.get(key).map(|p| vec![p.as_slice()])?
            };
            (!parts.is_empty()).then_some((key, color, parts))
        })
        .collect();
    let x1 = (run.last_step.max(1)) as f64;
    let x0 = 0.0;
    let values = curves
        .iter()
        .flat_map(|(_, _, parts)| parts.iter().flat_map(|p| p.iter().map(|&(_, v)| v)));
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    let (y0, y1) = if lo > hi {
        (0.0, 1.0)
    } else {
        let pad = if hi > lo {
            (hi - lo) * 0.08
        } else {
            lo.abs().max(1e-3) * 0.1
        };
        // Quantities that cannot be negative keep 0 as their floor; a legend gets room
        // above the curves.
        let top = if curves.len() > 1 {
            (hi - lo).max(pad) * 0.35
        } else {
            0.0
        };
        (
            (lo - pad).max(if lo >= 0.0 { 0.0 } else { f64::MIN }),
            hi + pad + top,
        )
    };
    let e = |e: DrawingAreaErrorKind<_>| e.to_string();
    let mut chart = ChartBuilder::on(area)
        .caption(panel.title, (FONT, 22).into_font().color(&INK))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_labels(8)
        .y_labels(6)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| (panel.format)(*v))
        .label_style((FONT, 15).into_font().color(&INK))
        .axis_desc_style((FONT, 16).into_font().color(&INK))
        .light_line_style(RGBColor(235, 235, 235))
        .bold_line_style(RGBColor(215, 215, 215))
        .draw()
        .map_err(e)?;
    for m in &run.marks {
        let x = m.step as f64;
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(x, y0), (x, y1)],
                MARK.mix(0.7).stroke_width(2),
            )))
            .map_err(e)?;
        if panel.title == "loss" {
            chart
                .draw_series(std::iter::once(Text::new(
                    m.label.clone(),
                    (x + x1 * 0.005, y1 - (y1 - y0) * 0.02),
                    (FONT, 15).into_font().color(&MARK),
                )))
                .map_err(e)?;
        }
    }
    if curves.is_empty() {
        let (w, h) = area.dim_in_pixel();
        area.draw(&Text::new(
            panel.missing.to_string(),
            (w as i32 / 2 - 4 * panel.missing.len() as i32, h as i32 / 2),
            (FONT, 18).into_font().color(&RGBColor(150, 150, 150)),
        ))
        .map_err(e)?;
        return Ok(());
    }
    for (key, color, parts) in &curves {
        for (i, part) in parts.iter().enumerate() {
            let style = color.stroke_width(if *key == "loss" { 3 } else { 2 });
            if part.len() == 1 || run.eval.contains_key(*key) {
                // Evaluations are few: draw their points too.
                chart
                    .draw_series(part.iter().map(|&p| Circle::new(p, 4, color.filled())))
                    .map_err(e)?;
            }
            let series = chart
                .draw_series(LineSeries::new(part.iter().copied(), style))
                .map_err(e)?;
            if i == 0 && curves.len() > 1 {
                let c = *color;
                series.label(*key).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3))
                });
            }
        }
    }
    if curves.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font((FONT, 15).into_font().color(&INK))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()
            .map_err(e)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run under the coordinator that restarted (generation 2 trains steps 5..6 again)
    /// and then was resumed in one process (steps go back to 7 again).
    fn sample_run() -> String {
        let mut lines = Vec::new();
        let mut train = |step: u64, generation: u64| {
            let loss = 5.0 / (1.0 + step as f64);
            lines.push(
                serde_json::json!({"step": step, "loss": loss, "itc": loss * 0.6,
                "caption": loss * 0.4, "lr": 1e-3 * (step as f64 / 10.0).min(1.0),
                "grad_norm": 1.0 / (step as f64).sqrt(), "tokens_per_s": 1000.0 + step as f64,
                "step_time_s": 0.1, "mfu": 0.3, "generation": generation, "rank": 0,
                "peak_mem_bytes": (1u64 << 30) + step * (1 << 24)})
                .to_string(),
            );
        };
        for s in 1..=6 {
            train(s, 1);
        }
        for s in 5..=8 {
            train(s, 2);
        }
        for s in 7..=10 {
            train(s, 2);
        }
        lines.push(r#"{"eval": true, "step": 4, "i2t_r1": 0.2, "t2i_r1": 0.1}"#.into());
        lines.push(r#"{"eval": true, "step": 10, "i2t_r1": 0.6, "t2i_r1": 0.5}"#.into());
        lines.push(r#"{"done": true, "step": 10}"#.into());
        lines.push(r#"{"step": 11, "loss": 0."#.into()); // cut short by a crash
        lines.join("\n")
    }

    #[test]
    fn restarts_split_the_curves_and_are_marked() {
        let run = Run::parse(&sample_run());
        assert_eq!(run.steps, 14);
        assert_eq!(run.last_step, 10);
        assert_eq!(run.unreadable_lines, 1);
        assert_eq!(
            run.marks,
            [
                Mark {
                    step: 5,
                    label: "gen 2".into()
                },
                Mark {
                    step: 7,
                    label: "resumed".into()
                }
            ]
        );
        let loss = &run.train["loss"];
        assert_eq!(loss.len(), 3);
        assert_eq!(loss[1].first().unwrap().0, 5.0);
        assert_eq!(run.eval["t2i_r1"], [(4.0, 0.1), (10.0, 0.5)]);
        assert!(!run.train.contains_key("itm"));
        assert_eq!(
            run.train["peak_mem_bytes"][0][0],
            (1.0, (1u64 << 30) as f64 + 16777216.0)
        );
    }

    #[test]
    fn a_run_with_restarts_renders_a_png_with_its_curves() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("metrics.jsonl"), sample_run()).unwrap();
        let out = dir.path().join("run.png");
        let report = plot(dir.path(), &out).unwrap();
        assert_eq!((report.steps, report.evals, report.marks.len()), (14, 2, 2));
        let decoder =
            png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut px = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut px).unwrap();
        assert_eq!((info.width, info.height), SIZE);
        assert_eq!(info.color_type, png::ColorType::Rgb);
        let count = |c: RGBColor| {
            px.chunks_exact(3)
                .filter(|p| p[0] == c.0 && p[1] == c.1 && p[2] == c.2)
                .count()
        };
        // Every curve colour is drawn over many pixels, and so is the text.
        for (name, c) in [
            ("loss", INK),
            ("itc", BLUE),
            ("caption", ORANGE),
            ("mfu/tokens", GREEN),
            ("grad", PURPLE),
        ] {
            assert!(count(c) > 500, "{name}: {} pixels", count(c));
        }
        // The restart lines (blended with white at 70%) in all seven panels.
        let blended = |ch: u8| (f64::from(ch) * 0.7 + 255.0 * 0.3).round() as u8;
        let want = (blended(MARK.0), blended(MARK.1), blended(MARK.2));
        let near = px
            .chunks_exact(3)
            .filter(|p| {
                (i16::from(p[0]) - i16::from(want.0)).abs() <= 2
                    && (i16::from(p[1]) - i16::from(want.1)).abs() <= 2
                    && (i16::from(p[2]) - i16::from(want.2)).abs() <= 2
            })
            .count();
        assert!(near > 6 * 2 * 200, "restart lines: {near} pixels");
        // Not a blank picture: a good part of it is not white.
        let inked = px.chunks_exact(3).filter(|p| p != &[255, 255, 255]).count();
        assert!(inked > (SIZE.0 * SIZE.1) as usize / 50, "{inked}");
    }

    #[test]
    fn an_empty_run_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        match plot(dir.path(), &dir.path().join("x.png")) {
            Err(PlotError::Io { path, .. }) => assert!(path.ends_with("metrics.jsonl")),
            other => panic!("{other:?}"),
        }
        std::fs::write(
            dir.path().join("metrics.jsonl"),
            "{\"done\": true, \"step\": 0}\n",
        )
        .unwrap();
        assert!(matches!(
            plot(dir.path(), &dir.path().join("x.png")),
            Err(PlotError::NoSteps { .. })
        ));
    }
}
