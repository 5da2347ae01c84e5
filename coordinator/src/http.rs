//! The coordinator's HTTP side: Prometheus text on `/metrics`, a status page on `/` with the
//! loss curve drawn as SVG, and `/healthz`. Read-only; it shows what `ferry status` shows.

use crate::state::JobState;
use axum::{extract::State, http::header, response::IntoResponse, routing::get, Router};
use ferry_rpc::proto::StatusReply;
use metrics_exporter_prometheus::PrometheusHandle;
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Instant;

#[derive(Clone)]
struct HttpState {
    job: Arc<Mutex<JobState>>,
    prometheus: PrometheusHandle,
}

pub fn router(job: Arc<Mutex<JobState>>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(HttpState { job, prometheus })
}

async fn metrics_text(State(s): State<HttpState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.prometheus.render(),
    )
}

async fn status_page(State(s): State<HttpState>) -> impl IntoResponse {
    let status = s
        .job
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .status(Instant::now());
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        render_page(&status.into()),
    )
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The whole page. The summary, the loss chart and the workers table carry stable ids
/// (`summary`, `loss-chart`, `workers`) that tests and scrapers rely on.
pub fn render_page(st: &StatusReply) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content=5>\
         <title>ferry: {name}</title><style>\
         body{{font:14px system-ui,sans-serif;margin:2em;color:#222}}\
         table{{border-collapse:collapse}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:right}}\
         th{{background:#f4f4f4}}td:first-child,th:first-child{{text-align:left}}\
         .k{{color:#666}}</style></head><body>\
         <h1>ferry job <code>{name}</code></h1>\
         <p id=summary><span class=k>phase</span> <b id=phase>{phase}</b> · \
         <span class=k>step</span> <span id=step>{c}</span>/{t} · \
         <span class=k>generation</span> <span id=generation>{g}</span> · \
         <span class=k>world size</span> <span id=world-size>{w}</span> \
         (target {tw}, allowed {minw}–{maxw}) · \
         <span class=k>throughput</span> <span id=throughput>{tps:.0}</span> tokens/s · \
         <span class=k>job id</span> <code>{id}</code></p>",
        name = esc(&st.job_name),
        phase = esc(&st.phase),
        c = st.committed_steps,
        t = st.total_steps,
        g = st.generation,
        w = st.world_size,
        tw = st.target_workers,
        minw = st.min_workers,
        maxw = st.max_workers,
        tps = st.tokens_per_s,
        id = esc(&st.job_id),
    );
    h.push_str("<h2>Loss</h2>");
    h.push_str(&loss_chart(&st.recent_loss));
    h.push_str(
        "<h2>Workers</h2><table id=workers><thead><tr><th>worker</th><th>host</th><th>rank</th>\
         <th>state</th><th>generation</th><th>step</th><th>loss</th><th>tokens/s</th>\
         <th>last seen</th><th>metrics</th></tr></thead><tbody>",
    );
    for w in &st.workers {
        let metrics = if w.metrics_addr.is_empty() {
            "-".to_string()
        } else {
            let a = esc(&w.metrics_addr);
            format!("<a href=\"http://{a}/metrics\">{a}</a>")
        };
        let _ = write!(
            h,
            "<tr class=worker><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.1}s ago</td><td>{}</td></tr>",
            esc(&w.worker_id),
            esc(&w.host),
            if w.rank < 0 { "-".to_string() } else { w.rank.to_string() },
            esc(&w.state),
            w.generation,
            w.step,
            if w.loss.is_finite() { format!("{:.4}", w.loss) } else { "-".into() },
            w.tokens_per_s,
            w.last_seen_s,
            metrics,
        );
    }
    if st.workers.is_empty() {
        h.push_str("<tr><td colspan=10 class=k>no workers</td></tr>");
    }
    h.push_str("</tbody></table>");
    if !st.latest_checkpoint_path.is_empty() {
        let _ = write!(
            h,
            "<p><span class=k>latest checkpoint</span> step {} at <code>{}</code></p>",
            st.latest_checkpoint_step,
            esc(&st.latest_checkpoint_path)
        );
    }
    if st.rollbacks > 0 {
        let _ = write!(
            h,
            "<p><span class=k>rolled back</span> {} time(s) to a checkpoint: {} committed \
             step(s) trained again</p>",
            st.rollbacks, st.redone_steps
        );
    }
    h.push_str("</body></html>\n");
    h
}

/// The loss curve as an inline SVG line chart with labelled axes.
fn loss_chart(points: &[ferry_rpc::proto::LossPoint]) -> String {
    let pts: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.loss.is_finite())
        .map(|p| (p.step as f64, p.loss))
        .collect();
    if pts.is_empty() {
        return "<p id=loss-chart-empty class=k>no committed steps yet</p>".into();
    }
    let (w, hgt, left, bottom, top, right) = (720.0, 280.0, 60.0, 30.0, 10.0, 10.0);
    let x0 = pts.first().map_or(0.0, |p| p.0);
    let x1 = pts.last().map_or(1.0, |p| p.0).max(x0 + 1.0);
    let ymin = pts.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let ymax = pts.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let (ymin, ymax) = if ymax - ymin < 1e-9 {
        (ymin - 0.5, ymax + 0.5)
    } else {
        (ymin, ymax)
    };
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| top + (ymax - y) / (ymax - ymin) * (hgt - top - bottom);
    let mut path = String::new();
    for (i, &(x, y)) in pts.iter().enumerate() {
        let _ = write!(
            path,
            "{}{:.1},{:.1} ",
            if i == 0 { "M" } else { "L" },
            sx(x),
            sy(y)
        );
    }
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id='loss-chart' xmlns='http://www.w3.org/2000/svg' width='{w}' height='{hgt}' role='img' aria-label='training loss by step'>\
         <rect x='{left}' y='{top}' width='{pw}' height='{ph}' fill='none' stroke='#ccc'/>\
         <path d='{path}' fill='none' stroke='#1f77b4' stroke-width='1.5'/>\
         <text x='{lx}' y='{ty}' font-size='11' text-anchor='end'>{ymax:.3}</text>\
         <text x='{lx}' y='{by}' font-size='11' text-anchor='end'>{ymin:.3}</text>\
         <text x='{left}' y='{xy}' font-size='11'>step {x0}</text>\
         <text x='{xr}' y='{xy}' font-size='11' text-anchor='end'>step {x1}</text>\
         <text x='12' y='{my}' font-size='11' transform='rotate(-90 12 {my})'>loss</text></svg>",
        pw = w - left - right,
        ph = hgt - top - bottom,
        lx = left - 4.0,
        ty = top + 10.0,
        by = hgt - bottom,
        xy = hgt - 10.0,
        xr = w - right,
        my = hgt / 2.0,
    );
    s
}
