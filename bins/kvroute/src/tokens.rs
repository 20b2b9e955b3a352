//! `kvroute tokens`: the prompt kvroute computes for a chat request (token ids, media spans,
//! visual tokens per image and video), to diff against the engine's own prompt.

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kvroute_preprocess::{ChatRequest, ModelFiles, PreprocessConfig, Preprocessor, Prompt};
use kvroute_protocol::MediaSpan;
use serde::Serialize;
use serde_json::{json, Value};
use std::io::Read;
use std::path::PathBuf;

#[derive(Args)]
#[command(after_help = "\
REQUEST is an OpenAI /v1/chat/completions body (from FILE, or stdin when FILE is absent or '-'),
with image_url and video_url parts as data: URLs.

Compare with the engine: vLLM logs a request's prompt token ids (--enable-log-requests) and
returns them with \"return_token_ids\": true; the first id that differs is where the template,
tokenizer or visual token count disagree. --format hash prints the input of `kvroute hash`.")]
pub struct TokensArgs {
    /// The chat request file ('-' or absent: stdin).
    file: Option<PathBuf>,
    /// A Hugging Face model directory (tokenizer.json, chat template, config.json,
    /// preprocessor_config.json); without it the bundled Qwen2-VL.
    #[arg(long, env = "KVROUTE_MODEL_DIR")]
    model_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Json)]
    format: Format,
}

#[derive(Clone, Copy, ValueEnum)]
enum Format {
    /// Token ids, media spans, and every image and video with its count.
    Json,
    /// A summary for people, one line per image and video, then the token ids.
    Text,
    /// `{"tokens", "media"}`: the input of `kvroute hash`.
    Hash,
}

#[derive(Serialize)]
struct HashInput<'a> {
    tokens: &'a [u32],
    media: &'a [MediaSpan],
}

pub fn run(args: TokensArgs) -> Result<()> {
    let body = read_request(args.file.as_ref())?;
    let files = match &args.model_dir {
        Some(dir) => ModelFiles::from_dir(dir)
            .with_context(|| format!("reading the model directory {}", dir.display()))?,
        None => ModelFiles::bundled_qwen2_vl()?,
    };
    let preprocessor = Preprocessor::new(&files, PreprocessConfig::default())?;
    let request = ChatRequest::from_json(&body)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let prompt = runtime.block_on(preprocessor.chat(&request))?;
    match args.format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&describe(&prompt))?),
        Format::Hash => println!(
            "{}",
            serde_json::to_string(&HashInput {
                tokens: &prompt.tokens,
                media: &prompt.media,
            })?
        ),
        Format::Text => print_text(&prompt),
    }
    Ok(())
}

fn read_request(file: Option<&PathBuf>) -> Result<Vec<u8>> {
    match file {
        Some(path) if path.as_os_str() != "-" => {
            std::fs::read(path).with_context(|| format!("reading {}", path.display()))
        }
        _ => {
            let mut body = Vec::new();
            std::io::stdin()
                .read_to_end(&mut body)
                .context("reading stdin")?;
            Ok(body)
        }
    }
}

fn describe(prompt: &Prompt) -> Value {
    json!({
        "prompt_tokens": prompt.tokens.len(),
        "tokens": prompt.tokens,
        "media_spans": prompt.media,
        "images": prompt.images.iter().map(|image| json!({
            "media_id": image.id,
            "uuid": image.forward_uuid,
            "tokens": image.tokens,
            "width": image.info.width,
            "height": image.info.height,
        })).collect::<Vec<_>>(),
        "videos": prompt.videos.iter().map(|video| json!({
            "media_id": video.id,
            "uuid": video.forward_uuid,
            "tokens": video.tokens,
            "frames_sampled": video.frames,
            "frames": video.info.frames,
            "duration_secs": video.info.duration,
            "width": video.info.width,
            "height": video.info.height,
        })).collect::<Vec<_>>(),
    })
}

fn print_text(prompt: &Prompt) {
    println!(
        "{} tokens, {} images, {} videos",
        prompt.tokens.len(),
        prompt.images.len(),
        prompt.videos.len()
    );
    for image in &prompt.images {
        let span = prompt.media.iter().find(|span| span.id == image.id);
        println!(
            "image {} ({}x{}): {} visual tokens, span {}",
            image.id,
            image.info.width,
            image.info.height,
            image.tokens,
            span_text(span)
        );
    }
    for video in &prompt.videos {
        let span = prompt.media.iter().find(|span| span.id == video.id);
        println!(
            "video {} ({}x{}, {} frames, {:.3} s): {} frames sampled, {} visual tokens, span {}",
            video.id,
            video.info.width,
            video.info.height,
            video.info.frames,
            video.info.duration,
            video.frames,
            video.tokens,
            span_text(span)
        );
    }
    let ids: Vec<String> = prompt.tokens.iter().map(ToString::to_string).collect();
    println!("{}", ids.join(" "));
}

fn span_text(span: Option<&MediaSpan>) -> String {
    span.map_or_else(
        || "-".to_owned(),
        |span| format!("{}..{}", span.start, span.end()),
    )
}
