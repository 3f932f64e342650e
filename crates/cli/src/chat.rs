//! `augur chat`: an interactive loop. Each turn renders the whole conversation with the model's
//! chat template and generates the assistant's reply, streamed.

use std::io::{BufRead, Write};
use std::ops::ControlFlow;

use anyhow::Result;
use augur_decode::chat::{ChatTemplate, Message};
use augur_decode::{generate_in, GenerateConfig, Session};

use crate::common::{ModelArgs, PrecisionArgs, SampleArgs};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub sample: SampleArgs,
    /// Most tokens per reply.
    #[arg(long, short = 'n', default_value_t = 512)]
    pub max_tokens: usize,
    /// System message (default: the template's own).
    #[arg(long)]
    pub system: Option<String>,
    #[command(flatten)]
    pub precision: PrecisionArgs,
}

pub fn main(a: Args) -> Result<()> {
    let model = a.model.load()?;
    let tpl = ChatTemplate::for_model(&model)?;
    let mut msgs: Vec<Message> = a.system.iter().map(|s| Message::new("system", s)).collect();
    // The KV cache of the conversation so far, reused across turns.
    let mut session = Session::new(&model);
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    eprintln!("augur chat: type a message and press Enter; Ctrl-D or /exit ends, /reset clears the history.");
    loop {
        write!(out, "> ")?;
        out.flush()?;
        let mut line = String::new();
        if stdin.lock().read_line(&mut line)? == 0 {
            break;
        }
        let line = line.trim_end_matches(['\n', '\r']);
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                msgs.retain(|m| m.role == "system");
                continue;
            }
            _ => {}
        }
        msgs.push(Message::new("user", line));
        let ids = model.tokenizer.encode(&tpl.render(&msgs, true)?)?;
        let max_tokens = a.max_tokens.min(model.llama.cfg.context.saturating_sub(ids.len()));
        if max_tokens == 0 {
            eprintln!("augur: the conversation fills the model's context; /reset to start over");
            msgs.pop();
            continue;
        }
        let cfg = GenerateConfig { max_tokens, sampler: a.sample.config(), stop: vec![], ignore_eos: false, activations: a.precision.get(), ids_only: true };
        let s = generate_in(&mut session, &model, &ids, &cfg, |ev| {
            let _ = write!(out, "{}", ev.text).and_then(|_| out.flush());
            ControlFlow::Continue(())
        })?;
        writeln!(out)?;
        msgs.push(Message::new("assistant", &s.text));
    }
    Ok(())
}
