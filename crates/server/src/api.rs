//! Request types of the OpenAI API subset augur serves, and their validation. Unknown fields are
//! ignored (clients send many); known fields of the wrong type are a 400 naming the field.

use serde::Deserialize;

use crate::ApiError;

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    /// One stop string.
    One(String),
    /// Several stop strings.
    Many(Vec<String>),
}

impl Stop {
    /// The stop strings as a list.
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Stop::One(s) => vec![s],
            Stop::Many(v) => v,
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
/// `stream_options` of a request.
pub struct StreamOptions {
    #[serde(default)]
    /// Send a final chunk with token counts.
    pub include_usage: bool,
}

/// Message content: a string or a list of `{"type": "text", "text": ...}` parts.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Content {
    /// Plain text.
    Text(String),
    /// A list of parts (only text parts are accepted).
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Clone, Deserialize)]
/// One part of a message's content.
pub struct ContentPart {
    #[serde(rename = "type")]
    /// `text` (others are rejected).
    pub kind: String,
    #[serde(default)]
    /// The text.
    pub text: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
/// A chat message of a request.
pub struct ChatMessage {
    /// `system`, `user` or `assistant`.
    pub role: String,
    #[serde(default)]
    /// Text or parts.
    pub content: Option<Content>,
}

/// Sampling and limits shared by both endpoints.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Common {
    /// Model name (informational: the server serves one model).
    pub model: Option<String>,
    /// Most tokens to generate.
    pub max_tokens: Option<u64>,
    /// Newer name of `max_tokens`.
    pub max_completion_tokens: Option<u64>,
    /// Sampling temperature.
    pub temperature: Option<f32>,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// Seed for sampling.
    pub seed: Option<u64>,
    /// Stop string(s).
    pub stop: Option<Stop>,
    /// Stream server-sent events.
    pub stream: Option<bool>,
    /// Streaming options.
    pub stream_options: Option<StreamOptions>,
    /// Completions per request (only 1).
    pub n: Option<u32>,
    /// OpenAI presence penalty.
    pub presence_penalty: Option<f32>,
    /// OpenAI frequency penalty.
    pub frequency_penalty: Option<f32>,
}

#[derive(Debug, Clone, Deserialize)]
/// `POST /v1/chat/completions` body.
pub struct ChatRequest {
    /// The conversation.
    pub messages: Vec<ChatMessage>,
    /// Return log-probabilities of the chosen tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per position with `logprobs`.
    pub top_logprobs: Option<u32>,
    #[serde(flatten)]
    /// Settings shared with completions.
    pub common: Common,
}

/// `prompt`: a string or a list of one string.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    /// One prompt.
    One(String),
    /// Several prompts (only one is accepted).
    Many(Vec<String>),
}

#[derive(Debug, Clone, Deserialize)]
/// `POST /v1/completions` body.
pub struct CompletionRequest {
    /// The prompt text.
    pub prompt: Prompt,
    /// Top alternatives per token (0..=20), as in the legacy completions API.
    pub logprobs: Option<u32>,
    #[serde(flatten)]
    /// Settings shared with chat.
    pub common: Common,
}

/// Parse a JSON body into `T`, turning serde's message (which names the field and the expected
/// type) into a 400.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::invalid("The request body is empty; send a JSON object.", None));
    }
    serde_json::from_slice(body).map_err(|e| {
        let msg = e.to_string();
        let param = msg.split('`').nth(1).map(str::to_owned);
        ApiError::invalid(format!("Invalid request body: {msg}"), param.as_deref())
    })
}

/// Validated settings of one request.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Most tokens to generate (`None`: up to the context).
    pub max_tokens: Option<usize>,
    /// Sampling temperature.
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: f32,
    /// Seed.
    pub seed: Option<u64>,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Stream the answer.
    pub stream: bool,
    /// Send usage in the last chunk.
    pub include_usage: bool,
    /// Completions requested.
    pub n: usize,
    /// Presence penalty.
    pub presence_penalty: f32,
    /// Frequency penalty.
    pub frequency_penalty: f32,
}

impl Common {
    /// Validate and default the request's settings, naming a bad field.
    pub fn settings(self) -> Result<Settings, ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(format!("temperature {temperature} is not in [0, 2]"), Some("temperature")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(format!("top_p {top_p} is not in (0, 1]"), Some("top_p")));
        }
        let n = self.n.unwrap_or(1);
        if !(1..=8).contains(&n) {
            return Err(ApiError::invalid(format!("n {n} is not in [1, 8]"), Some("n")));
        }
        for (name, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if let Some(v) = v {
                if !(-2.0..=2.0).contains(&v) {
                    return Err(ApiError::invalid(format!("{name} {v} is not in [-2, 2]"), Some(name)));
                }
            }
        }
        let stop = self.stop.map(Stop::into_vec).unwrap_or_default();
        if stop.len() > 4 {
            return Err(ApiError::invalid("at most 4 stop sequences", Some("stop")));
        }
        let max_tokens = match self.max_completion_tokens.or(self.max_tokens) {
            Some(0) => return Err(ApiError::invalid("max_tokens must be at least 1", Some("max_tokens"))),
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        Ok(Settings {
            max_tokens,
            temperature,
            top_p,
            seed: self.seed,
            stop,
            stream: self.stream.unwrap_or(false),
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            n: n as usize,
            presence_penalty: self.presence_penalty.unwrap_or(0.0),
            frequency_penalty: self.frequency_penalty.unwrap_or(0.0),
        })
    }
}

impl ChatMessage {
    /// The message's text (parts joined).
    pub fn text(&self) -> Result<String, ApiError> {
        Ok(match &self.content {
            None => String::new(),
            Some(Content::Text(s)) => s.clone(),
            Some(Content::Parts(p)) => {
                let mut out = String::new();
                for part in p {
                    if part.kind != "text" {
                        return Err(ApiError::invalid(format!("content part type `{}` is not supported (text only)", part.kind), Some("messages")));
                    }
                    out.push_str(part.text.as_deref().unwrap_or(""));
                }
                out
            }
        })
    }
}
