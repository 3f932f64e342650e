//! Stop strings over streamed text: text that might be the start of a stop string is held back
//! until it is known not to be one, so a stop string never reaches the user.

#[derive(Debug, Default)]
pub(crate) struct StopMatcher {
    stops: Vec<String>,
    held: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher { stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(), held: String::new() }
    }

    /// Feed new text. Returns the text safe to emit and whether a stop string was hit (the text
    /// returned then ends just before it).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.held.push_str(text);
        if let Some(at) = self.stops.iter().filter_map(|s| self.held.find(s.as_str())).min() {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of some stop string.
        let mut keep = 0;
        for s in &self.stops {
            for (i, _) in self.held.char_indices() {
                let tail = &self.held[i..];
                if s.starts_with(tail) {
                    keep = keep.max(tail.len());
                    break;
                }
            }
        }
        let cut = self.held.len() - keep;
        let out = self.held[..cut].to_string();
        self.held.drain(..cut);
        (out, false)
    }

    /// Text still held at the end of generation.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn output_is_the_text_up_to_the_first_stop(text in "[ab\n]{0,30}", cuts in proptest::collection::vec(0usize..30, 0..6)) {
            let stops = vec!["\n\n".to_string(), "bab".to_string()];
            let mut m = StopMatcher::new(&stops);
            let mut out = String::new();
            let mut stopped = false;
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(text.len())).collect();
            cuts.push(text.len());
            cuts.sort();
            let mut prev = 0;
            for c in cuts {
                let (o, s) = m.push(&text[prev..c]);
                out.push_str(&o);
                prev = c;
                if s { stopped = true; break; }
            }
            if !stopped { out.push_str(&m.flush()); }
            let first = stops.iter().filter_map(|s| text.find(s.as_str())).min();
            prop_assert_eq!(stopped, first.is_some());
            prop_assert_eq!(out, text[..first.unwrap_or(text.len())].to_string());
        }
    }
}
