//! Per-field overrides of a model config (`--set n_layer=4`), applied through its JSON form so
//! every field of every model's `Config` is overridable without listing them again.

use crate::error::{EngineError, Result};
use serde::{de::DeserializeOwned, Serialize};

/// Applies `field=value` overrides. Values are parsed as JSON (`4`, `0.1`, `"gelu"`, `null`),
/// falling back to a plain string, so `activation_function=gelu` works unquoted.
pub fn apply_overrides<T: Serialize + DeserializeOwned>(
    config: &T,
    overrides: &[String],
) -> Result<T> {
    let mut value = serde_json::to_value(config).map_err(|e| EngineError::Config {
        field: "<config>".into(),
        message: e.to_string(),
    })?;
    let object = value.as_object_mut().ok_or_else(|| EngineError::Config {
        field: "<config>".into(),
        message: "not a JSON object".into(),
    })?;
    for item in overrides {
        let (field, raw) = item.split_once('=').ok_or_else(|| EngineError::Config {
            field: item.clone(),
            message: "expected FIELD=VALUE".into(),
        })?;
        let field = field.trim();
        if !object.contains_key(field) {
            let mut known: Vec<&str> = object.keys().map(|k| k.as_str()).collect();
            known.sort();
            return Err(EngineError::Config {
                field: field.into(),
                message: format!("no such field; known fields: {}", known.join(", ")),
            });
        }
        let parsed = serde_json::from_str(raw.trim())
            .unwrap_or_else(|_| serde_json::Value::String(raw.trim().to_string()));
        object.insert(field.to_string(), parsed);
    }
    serde_json::from_value(value).map_err(|e| EngineError::Config {
        field: overrides.join(" "),
        message: e.to_string(),
    })
}
