//! Checking a parsed job spec, and finding the line and field an error is about.

use super::{JobSpec, JobSpecError, MODEL_SIZES};

impl JobSpec {
    pub(super) fn validate(&self, text: &str, origin: &str) -> Result<(), JobSpecError> {
        let err = |field: &str, message: String| {
            let location = match line_of(text, field) {
                Some(l) => format!("{origin}:{l}"),
                None => origin.to_string(),
            };
            Err(JobSpecError::Invalid {
                location,
                message: one_line(&format!("{field}: {message}")),
            })
        };
        let j = &self.job;
        if j.name.trim().is_empty() {
            return err("job.name", "must not be empty".into());
        }
        if j.steps == 0 {
            return err("job.steps", "must be at least 1".into());
        }
        if j.run_dir.as_os_str().is_empty() {
            return err("job.run_dir", "must not be empty".into());
        }
        let family = self.model.family;
        let Some(context) = family.context_length(&self.model.size) else {
            return err(
                "model.size",
                format!(
                    "`{}` is not a size of {}; allowed: {}",
                    self.model.size,
                    family.name(),
                    MODEL_SIZES.join(", ")
                ),
            );
        };
        let context_field = family.context_field();
        let context = match self.model.overrides.get(context_field) {
            Some(v) => match v.as_integer() {
                Some(n) if n > 0 => n as u64,
                _ => {
                    return err(
                        &format!("model.overrides.{context_field}"),
                        format!("must be a positive integer, got {v}"),
                    )
                }
            },
            None => context,
        };
        // Each override is one field of the model's config.json, a plain value: a table would
        // be a field the model does not have, and a spec with nested tables need not even
        // read back from the TOML the coordinator hands to workers.
        for (key, v) in &self.model.overrides {
            if !matches!(
                v,
                toml::Value::Integer(_)
                    | toml::Value::Float(_)
                    | toml::Value::Boolean(_)
                    | toml::Value::String(_)
            ) {
                return err(
                    &format!("model.overrides.{key}"),
                    format!(
                        "must be a number, boolean or string (one field of the model's \
                         config.json), got {}",
                        v.type_str()
                    ),
                );
            }
        }
        // Dropout probabilities (GPT-2 and GPT `*_pdrop`, BERT `*_dropout_prob`) in [0, 1).
        for (key, v) in &self.model.overrides {
            if !(key.ends_with("_pdrop") || key.ends_with("_dropout_prob")) {
                continue;
            }
            let p = v.as_float().or(v.as_integer().map(|i| i as f64));
            if !p.is_some_and(|p| (0.0..1.0).contains(&p)) {
                return err(
                    &format!("model.overrides.{key}"),
                    format!("a dropout probability must be in [0, 1), got {v}"),
                );
            }
        }
        if self.data.shards.as_os_str().is_empty() {
            return err(
                "data.shards",
                "must name a directory written by `ferry prepare`".into(),
            );
        }
        let shortest = family.shortest_seq_len();
        if self.data.seq_len < shortest || self.data.seq_len > context {
            return err(
                "data.seq_len",
                format!(
                    "{} is outside {shortest}..={context} (the model's context length)",
                    self.data.seq_len
                ),
            );
        }
        let b = &self.batch;
        if b.global == 0 {
            return err("batch.global", "must be at least 1".into());
        }
        if b.micro == 0 || b.global % b.micro != 0 {
            return err(
                "batch.micro",
                format!("{} does not divide batch.global = {}", b.micro, b.global),
            );
        }
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr.is_finite()) {
            return err(
                "optimizer.lr",
                format!("must be a positive number, got {}", o.lr),
            );
        }
        if !(o.min_lr >= 0.0 && o.min_lr <= o.lr) {
            return err(
                "optimizer.min_lr",
                format!(
                    "must be within 0..=optimizer.lr ({}), got {}",
                    o.lr, o.min_lr
                ),
            );
        }
        if !(o.weight_decay >= 0.0 && o.weight_decay.is_finite()) {
            return err(
                "optimizer.weight_decay",
                format!("must be >= 0, got {}", o.weight_decay),
            );
        }
        for (field, v) in [("optimizer.beta1", o.beta1), ("optimizer.beta2", o.beta2)] {
            if !(0.0..1.0).contains(&v) {
                return err(field, format!("must be in [0, 1), got {v}"));
            }
        }
        if !(o.eps > 0.0) {
            return err("optimizer.eps", format!("must be positive, got {}", o.eps));
        }
        if !(o.grad_clip >= 0.0) {
            return err(
                "optimizer.grad_clip",
                format!("must be >= 0 (0 disables clipping), got {}", o.grad_clip),
            );
        }
        if self.checkpoint.keep == 0 {
            return err("checkpoint.keep", "must be at least 1".into());
        }
        if self.eval.every > 0 && self.eval.sequences == 0 {
            return err(
                "eval.sequences",
                "must be at least 1 when eval.every > 0".into(),
            );
        }
        let c = &self.cluster;
        if c.min_workers == 0 {
            return err("cluster.min_workers", "must be at least 1".into());
        }
        let micro_batches = b.global / b.micro;
        if u64::from(c.min_workers) > micro_batches {
            return err(
                "cluster.min_workers",
                format!(
                    "{} exceeds the micro-batches per step (batch.global / batch.micro = {micro_batches}); \
                     a worker needs at least one micro-batch",
                    c.min_workers
                ),
            );
        }
        if let Some(max) = c.max_workers {
            if max < c.min_workers {
                return err(
                    "cluster.max_workers",
                    format!("{max} is below cluster.min_workers = {}", c.min_workers),
                );
            }
            if u64::from(max) > micro_batches {
                return err(
                    "cluster.max_workers",
                    format!(
                        "{max} exceeds the micro-batches per step (batch.global / batch.micro = {micro_batches}); \
                         a worker needs at least one micro-batch"
                    ),
                );
            }
        }
        let max_workers = u64::from(self.max_workers());
        if max_workers > crate::schedule::DigestLimbs::MAX_RANKS {
            return err(
                "cluster.max_workers",
                format!(
                    "{max_workers} is more ranks than one group can hold ({}: the group's \
                     sequences digest is summed exactly in float32)",
                    crate::schedule::DigestLimbs::MAX_RANKS
                ),
            );
        }
        if !(1..=100_000).contains(&c.commit_every) {
            return err(
                "cluster.commit_every",
                format!("must be within 1..=100000 steps, got {}", c.commit_every),
            );
        }
        if !(c.commit_interval_s >= 0.0 && c.commit_interval_s <= 3600.0) {
            return err(
                "cluster.commit_interval_s",
                format!(
                    "must be within 0..=3600 seconds (0: no time limit), got {}",
                    c.commit_interval_s
                ),
            );
        }
        if !(c.bucket_mib >= 0.0625 && c.bucket_mib <= 4096.0) {
            return err(
                "cluster.bucket_mib",
                format!("must be within 0.0625..=4096 MiB, got {}", c.bucket_mib),
            );
        }
        for (field, v) in [
            ("cluster.heartbeat_timeout_s", c.heartbeat_timeout_s),
            ("cluster.collective_timeout_s", c.collective_timeout_s),
        ] {
            if !(v >= 0.1 && v <= 86_400.0) {
                return err(
                    field,
                    format!("must be within 0.1..=86400 seconds, got {v}"),
                );
            }
        }
        if !(c.settle_s >= 0.0 && c.settle_s <= 3600.0) {
            return err(
                "cluster.settle_s",
                format!("must be within 0..=3600 seconds, got {}", c.settle_s),
            );
        }
        Ok(())
    }
}

/// `message` with its line breaks written as `\n` and `\r`: values and keys quoted in an
/// error come from the file, and a TOML string may hold any of them.
pub(super) fn one_line(message: &str) -> String {
    message.replace('\n', "\\n").replace('\r', "\\r")
}

/// The line (1-based) and dotted field name at byte `offset` of a TOML text.
pub(super) fn field_at(text: &str, offset: usize) -> (Option<usize>, Option<String>) {
    let offset = offset.min(text.len());
    let line_no = text[..offset].matches('\n').count() + 1;
    let mut section = String::new();
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.trim().to_string();
        }
        if i + 1 == line_no {
            let key = t.split('=').next().map(str::trim).unwrap_or("");
            let field = if t.starts_with('[') || key.is_empty() || !t.contains('=') {
                None
            } else if section.is_empty() {
                Some(key.to_string())
            } else {
                Some(format!("{section}.{key}"))
            };
            return (Some(line_no), field);
        }
    }
    (Some(line_no), None)
}

/// The line (1-based) where a dotted field such as `batch.micro` is set, if it is.
fn line_of(text: &str, field: &str) -> Option<usize> {
    let (want_section, want_key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut section = String::new();
    let mut section_line = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if let Some(name) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            section = name.trim().to_string();
            if section == want_section {
                section_line = Some(i + 1);
            }
            continue;
        }
        if section == want_section {
            if let Some((key, _)) = t.split_once('=') {
                if key.trim() == want_key {
                    return Some(i + 1);
                }
            }
        }
    }
    section_line
}
