//! The report picture: well-formed XML, escaped labels, one cell per confusion-matrix entry,
//! and the training curves.

use ferry_dataset::textcls::{render_report_svg, Metrics, NamedConfusion, ReportSeries};

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn report_svg_is_well_formed_with_one_cell_per_entry() {
    let labels = strings(&["neg <&>", "neu \"q\"", "pos's"]);
    let dev = Metrics::from_predictions(&[0, 0, 1, 2, 2, 1], &[0, 1, 1, 2, 0, 1], &labels).unwrap();
    let test = Metrics::from_predictions(&[0, 1, 2], &[2, 1, 2], &labels).unwrap();
    let series = ReportSeries {
        title: "tiny <gpt2> & friends".to_owned(),
        labels: labels.clone(),
        confusions: vec![
            NamedConfusion {
                name: "dev".to_owned(),
                counts: dev.confusion.clone(),
            },
            NamedConfusion {
                name: "test".to_owned(),
                counts: test.confusion.clone(),
            },
        ],
        train_loss: (0..50)
            .map(|s| (s, 1.1 - s as f64 * 0.01))
            .chain([(50, f64::NAN)])
            .collect(),
        dev_accuracy: vec![(10, 0.5), (20, 0.6), (30, 0.7)],
        dev_macro_f1: vec![(10, 0.3), (20, 0.45), (30, 0.5)],
    };
    let svg = render_report_svg(&series);
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let root = doc.root_element();
    assert_eq!(root.tag_name().name(), "svg");
    let text_of = |n: roxmltree::Node| n.text().unwrap_or("").to_owned();
    let all_text: Vec<String> = root
        .descendants()
        .filter(|n| n.has_tag_name("text"))
        .map(text_of)
        .collect();
    assert!(
        all_text.contains(&"tiny <gpt2> & friends".to_owned()),
        "{all_text:?}"
    );
    for label in &labels {
        let on_axes = all_text.iter().filter(|t| *t == label).count();
        assert_eq!(on_axes, 4, "{label:?} on both axes of both panels");
    }
    for (panel, metrics) in [("dev", &dev), ("test", &test)] {
        let group = root
            .descendants()
            .find(|n| {
                n.attribute("class") == Some("confusion") && n.attribute("data-name") == Some(panel)
            })
            .unwrap();
        let cells: Vec<_> = group
            .descendants()
            .filter(|n| n.attribute("class") == Some("cell"))
            .collect();
        assert_eq!(cells.len(), 9, "{panel}");
        let counts: Vec<u64> = group
            .descendants()
            .filter(|n| n.attribute("class") == Some("count"))
            .map(|n| text_of(n).parse().unwrap())
            .collect();
        let flat: Vec<u64> = metrics.confusion.iter().flatten().copied().collect();
        assert_eq!(counts, flat, "{panel}");
    }
    let series_names: Vec<&str> = root
        .descendants()
        .filter(|n| n.attribute("class") == Some("series"))
        .filter_map(|n| n.attribute("data-name"))
        .collect();
    assert_eq!(series_names, ["loss", "accuracy", "macro-F1"]);
    let loss = root
        .descendants()
        .find(|n| n.attribute("data-name") == Some("loss"))
        .unwrap();
    // 50 finite points; the NaN is skipped.
    assert_eq!(loss.attribute("points").unwrap().split(' ').count(), 50);
    let ticks = root
        .descendants()
        .filter(|n| n.attribute("class") == Some("y-tick"))
        .count();
    assert!(ticks >= 6, "{ticks} y ticks over two charts");
}

#[test]
fn report_svg_without_data_still_parses() {
    let svg = render_report_svg(&ReportSeries {
        confusions: vec![NamedConfusion {
            name: "dev".to_owned(),
            counts: vec![],
        }],
        train_loss: vec![(0, f64::INFINITY)],
        ..Default::default()
    });
    let doc = roxmltree::Document::parse(&svg).unwrap();
    let no_data = doc
        .descendants()
        .filter(|n| n.has_tag_name("text") && n.text() == Some("no data"))
        .count();
    assert_eq!(no_data, 3);
}
