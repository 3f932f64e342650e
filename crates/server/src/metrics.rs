//! Counters for `/metrics` (Prometheus text format).

use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct Metrics {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    /// Microseconds spent decoding (for tokens/s).
    pub decode_us: AtomicU64,
    pub spec_passes: AtomicU64,
    pub spec_emitted: AtomicU64,
}

impl Metrics {
    pub fn render(&self, active: usize, queued: usize) -> String {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let tps = g(&self.generated_tokens) as f64 / (g(&self.decode_us) as f64 / 1e6).max(1e-9);
        let tau = g(&self.spec_emitted) as f64 / g(&self.spec_passes).max(1) as f64;
        format!(
            "# TYPE augur_requests_total counter\naugur_requests_total {}\n\
             # TYPE augur_request_errors_total counter\naugur_request_errors_total {}\n\
             # TYPE augur_prompt_tokens_total counter\naugur_prompt_tokens_total {}\n\
             # TYPE augur_generated_tokens_total counter\naugur_generated_tokens_total {}\n\
             # TYPE augur_decode_tokens_per_second gauge\naugur_decode_tokens_per_second {:.2}\n\
             # TYPE augur_active_generations gauge\naugur_active_generations {}\n\
             # TYPE augur_queue_depth gauge\naugur_queue_depth {}\n\
             # TYPE augur_spec_target_passes_total counter\naugur_spec_target_passes_total {}\n\
             # TYPE augur_spec_tokens_per_pass gauge\naugur_spec_tokens_per_pass {:.3}\n",
            g(&self.requests),
            g(&self.errors),
            g(&self.prompt_tokens),
            g(&self.generated_tokens),
            if g(&self.decode_us) == 0 { 0.0 } else { tps },
            active,
            queued,
            g(&self.spec_passes),
            tau
        )
    }
}
