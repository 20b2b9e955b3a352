//! The files of a model that preprocessing needs, from a Hugging Face model directory or the
//! bundled default.

use crate::error::PreprocessError;
use serde_json::{Map, Value};
use std::io::Read;
use std::path::Path;

/// What preprocessing reads from a model: tokenizer, chat template, special tokens, model type.
#[derive(Clone, Debug)]
pub struct ModelFiles {
    /// `tokenizer.json`.
    pub tokenizer_json: Vec<u8>,
    /// The chat template source.
    pub chat_template: String,
    /// `config.json`'s `model_type` (`qwen2_vl`, ...), which selects the visual token rule;
    /// `pixtral` for a `llava` config whose vision tower is Pixtral (Pixtral 12B).
    pub model_type: Option<String>,
    /// Special tokens passed to the template (`bos_token`, `eos_token`, ...).
    pub special_tokens: Map<String, Value>,
    /// The token after which chat prompts may be cut for the tokenization cache: the end of
    /// turn (`eos_token` of `tokenizer_config.json`).
    pub end_of_turn: Option<String>,
    /// `preprocessor_config.json`, whose pixel limits override the family defaults.
    pub preprocessor_config: Option<Value>,
    /// `video_preprocessor_config.json`, whose pixel limits apply to video frames (without
    /// it, transformers' video processor loads `preprocessor_config.json`'s).
    pub video_preprocessor_config: Option<Value>,
}

impl ModelFiles {
    /// Reads a Hugging Face model directory: `tokenizer.json` (or `tokenizer.json.gz`), the chat
    /// template from `chat_template.jinja`, else `chat_template.json`, else
    /// `tokenizer_config.json` (the order transformers prefers), special tokens from
    /// `tokenizer_config.json`, `model_type` from `config.json`, and
    /// `preprocessor_config.json` and `video_preprocessor_config.json` when present.
    pub fn from_dir(dir: &Path) -> Result<Self, PreprocessError> {
        let tokenizer_json = match read_optional(&dir.join("tokenizer.json"))? {
            Some(bytes) => bytes,
            None => match read_optional(&dir.join("tokenizer.json.gz"))? {
                Some(compressed) => gunzip(&compressed)?,
                None => return Err(model_error(dir, "has no tokenizer.json")),
            },
        };
        let tokenizer_config = read_json(&dir.join("tokenizer_config.json"))?;
        let chat_template = match read_optional(&dir.join("chat_template.jinja"))? {
            Some(bytes) => String::from_utf8(bytes)
                .map_err(|_| model_error(dir, "chat_template.jinja is not UTF-8"))?,
            None => read_json(&dir.join("chat_template.json"))?
                .as_ref()
                .and_then(template_of)
                .or_else(|| tokenizer_config.as_ref().and_then(template_of))
                .ok_or_else(|| model_error(dir, "has no chat template"))?,
        };
        let model_type = read_json(&dir.join("config.json"))?.and_then(|config| {
            let model_type = config.get("model_type")?.as_str()?;
            let vision = config
                .get("vision_config")
                .and_then(|vision| vision.get("model_type")?.as_str());
            Some(match (model_type, vision) {
                ("llava", Some("pixtral")) => "pixtral".to_owned(),
                _ => model_type.to_owned(),
            })
        });
        let mut files = Self::assemble(
            tokenizer_json,
            chat_template,
            model_type,
            tokenizer_config.as_ref(),
            read_json(&dir.join("preprocessor_config.json"))?,
        );
        files.video_preprocessor_config = read_json(&dir.join("video_preprocessor_config.json"))?;
        Ok(files)
    }

    /// Qwen2-VL (`Qwen/Qwen2-VL-2B-Instruct`'s template and processor settings, the Qwen2
    /// byte-level BPE tokenizer), built into the library so `kvroute demo` needs no download.
    #[cfg(feature = "bundled-qwen2-vl")]
    pub fn bundled_qwen2_vl() -> Result<Self, PreprocessError> {
        const TOKENIZER: &[u8] = include_bytes!("../assets/qwen2-vl/tokenizer.json.gz");
        const TOKENIZER_CONFIG: &str = include_str!("../assets/qwen2-vl/tokenizer_config.json");
        const TEMPLATE: &str = include_str!("../assets/qwen2-vl/chat_template.jinja");
        const PREPROCESSOR: &str = include_str!("../assets/qwen2-vl/preprocessor_config.json");
        let parse = |text: &str, name: &str| {
            serde_json::from_str::<Value>(text)
                .map_err(|error| PreprocessError::Model(format!("bundled {name}: {error}")))
        };
        Ok(Self::assemble(
            gunzip(TOKENIZER)?,
            TEMPLATE.to_owned(),
            Some("qwen2_vl".to_owned()),
            Some(&parse(TOKENIZER_CONFIG, "tokenizer_config.json")?),
            Some(parse(PREPROCESSOR, "preprocessor_config.json")?),
        ))
    }

    fn assemble(
        tokenizer_json: Vec<u8>,
        chat_template: String,
        model_type: Option<String>,
        tokenizer_config: Option<&Value>,
        preprocessor_config: Option<Value>,
    ) -> Self {
        let mut special_tokens = Map::new();
        for name in ["bos_token", "eos_token", "pad_token", "unk_token"] {
            if let Some(token) = tokenizer_config.and_then(|c| token_text(c.get(name)?)) {
                special_tokens.insert(name.to_owned(), Value::String(token));
            }
        }
        let end_of_turn = special_tokens
            .get("eos_token")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Self {
            tokenizer_json,
            chat_template,
            model_type,
            special_tokens,
            end_of_turn,
            preprocessor_config,
            video_preprocessor_config: None,
        }
    }
}

/// `chat_template` as a string, or the `default` entry of a list of named templates.
fn template_of(config: &Value) -> Option<String> {
    match config.get("chat_template")? {
        Value::String(template) => Some(template.clone()),
        Value::Array(named) => named.iter().find_map(|entry| {
            (entry.get("name")?.as_str()? == "default")
                .then(|| entry.get("template")?.as_str().map(str::to_owned))
                .flatten()
        }),
        _ => None,
    }
}

/// A special token is written either as its text or as an `AddedToken` object.
fn token_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Object(token) => token.get("content")?.as_str().map(str::to_owned),
        _ => None,
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, PreprocessError> {
    match std::fs::read(path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(error) => Err(PreprocessError::Model(format!(
            "{}: {error}",
            path.display()
        ))),
    }
}

fn read_json(path: &Path) -> Result<Option<Value>, PreprocessError> {
    read_optional(path)?
        .map(|bytes| {
            serde_json::from_slice(&bytes)
                .map_err(|error| PreprocessError::Model(format!("{}: {error}", path.display())))
        })
        .transpose()
}

fn gunzip(compressed: &[u8]) -> Result<Vec<u8>, PreprocessError> {
    let mut out = Vec::with_capacity(compressed.len() * 6);
    flate2::read::GzDecoder::new(compressed)
        .read_to_end(&mut out)
        .map_err(|error| PreprocessError::Model(format!("tokenizer.json.gz: {error}")))?;
    Ok(out)
}

fn model_error(dir: &Path, what: &str) -> PreprocessError {
    PreprocessError::Model(format!("model directory {} {what}", dir.display()))
}

#[cfg(all(test, feature = "bundled-qwen2-vl"))]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;

    /// Writes the bundle out as a Hugging Face model directory would hold it.
    fn model_dir(template_file: Option<(&str, &str)>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let bundled = ModelFiles::bundled_qwen2_vl().unwrap();
        std::fs::write(dir.path().join("tokenizer.json"), &bundled.tokenizer_json).unwrap();
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            include_str!("../assets/qwen2-vl/tokenizer_config.json"),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"model_type": "qwen2_vl"}"#,
        )
        .unwrap();
        if let Some((name, content)) = template_file {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        dir
    }

    #[test]
    fn a_model_directory_is_read_with_transformers_template_precedence() {
        let jinja = model_dir(Some(("chat_template.jinja", "from jinja")));
        let files = ModelFiles::from_dir(jinja.path()).unwrap();
        assert_eq!(files.chat_template, "from jinja");
        assert_eq!(files.model_type.as_deref(), Some("qwen2_vl"));
        assert_eq!(files.end_of_turn.as_deref(), Some("<|im_end|>"));
        assert_eq!(files.special_tokens["eos_token"], "<|im_end|>");

        let json = model_dir(Some((
            "chat_template.json",
            r#"{"chat_template": "from json"}"#,
        )));
        assert_eq!(
            ModelFiles::from_dir(json.path()).unwrap().chat_template,
            "from json"
        );

        // Only tokenizer_config.json: its (Qwen3) template is used.
        let config_only = model_dir(None);
        let files = ModelFiles::from_dir(config_only.path()).unwrap();
        assert!(files.chat_template.contains("<|im_start|>"));
    }

    #[test]
    fn a_broken_model_directory_is_a_model_error() {
        let empty = tempfile::tempdir().unwrap();
        let error = ModelFiles::from_dir(empty.path()).unwrap_err();
        assert!(!error.is_client_error());
        assert!(error.to_string().contains("tokenizer.json"), "{error}");

        let bad = model_dir(Some(("chat_template.json", "{not json")));
        assert!(ModelFiles::from_dir(bad.path()).is_err());
    }
}
