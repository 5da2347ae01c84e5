//! Predictions of a fine-tuned model for new texts.

use super::run::predict_ids;
use super::saved::FinetunedModel;
use crate::error::Result;

/// One text's predicted label and the probability of every label (in the model's order).
#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub label: String,
    pub index: usize,
    pub probabilities: Vec<f64>,
}

pub fn predict(
    model: &FinetunedModel,
    texts: &[&str],
    batch_size: usize,
) -> Result<Vec<Prediction>> {
    let ids = texts
        .iter()
        .map(|t| model.encoder.encode(t))
        .collect::<Result<Vec<_>>>()?;
    let device = model.params.device();
    let probs = predict_ids(
        &model.classifier,
        &ids,
        batch_size,
        model.encoder.pad_id(),
        device,
    )?;
    let rows = Vec::<Vec<f64>>::try_from(&probs.to_kind(tch::Kind::Double))?;
    Ok(rows
        .into_iter()
        .map(|p| {
            let index = p
                .iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1))
                .map_or(0, |(i, _)| i);
            Prediction {
                label: model.info.labels[index].clone(),
                index,
                probabilities: p,
            }
        })
        .collect())
}
