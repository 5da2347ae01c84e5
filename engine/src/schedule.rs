//! Learning-rate schedules: linear warmup, then cosine or linear decay to a floor.

pub use ferry_spec::job::Decay;

#[derive(Clone, Copy, Debug)]
pub struct LrSchedule {
    pub peak: f64,
    pub min: f64,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub decay: Decay,
}

impl LrSchedule {
    /// The rate for the step with 0-based index `step`.
    pub fn at(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
        let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
        let factor = match self.decay {
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        self.min + (self.peak - self.min) * factor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine_reaches_floor() {
        let s = LrSchedule {
            peak: 1e-3,
            min: 1e-4,
            warmup_steps: 10,
            total_steps: 110,
            decay: Decay::Cosine,
        };
        assert!((s.at(0) - 1e-4).abs() < 1e-12);
        assert!((s.at(9) - 1e-3).abs() < 1e-12);
        assert!((s.at(10) - 1e-3).abs() < 1e-12);
        assert!((s.at(60) - 5.5e-4).abs() < 1e-9);
        assert!((s.at(110) - 1e-4).abs() < 1e-12);
        assert!(s.at(30) > s.at(31));
    }

    #[test]
    fn linear_decay_is_linear() {
        let s = LrSchedule {
            peak: 1.0,
            min: 0.0,
            warmup_steps: 0,
            total_steps: 100,
            decay: Decay::Linear,
        };
        assert!((s.at(25) - 0.75).abs() < 1e-12);
    }
}
