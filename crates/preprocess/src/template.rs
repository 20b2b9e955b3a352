//! Hugging Face chat templates, rendered with minijinja the way transformers renders them.

use crate::error::PreprocessError;
use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde::Serialize;
use serde_json::{Map, Value};

const TEMPLATE_NAME: &str = "chat_template";

/// A compiled chat template.
///
/// Rendering follows `transformers`' `apply_chat_template`: `trim_blocks` and `lstrip_blocks`
/// on, loop controls, `raise_exception`, `strftime_now`, a `tojson` that writes what Python's
/// `json.dumps` writes, Python string and dict methods (`strip`, `startswith`, `items`, ...),
/// the tokenizer's special tokens as variables, and any extra keyword arguments.
///
/// ```
/// use kvroute_preprocess::ChatTemplate;
/// use serde_json::json;
///
/// let template = ChatTemplate::new(
///     "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
///     Default::default(),
/// )?;
/// let messages = [json!({"role": "user", "content": "hi"})];
/// assert_eq!(template.render(&messages, true, &Default::default())?, "<user>hi<assistant>");
/// # Ok::<(), kvroute_preprocess::PreprocessError>(())
/// ```
#[derive(Debug)]
pub struct ChatTemplate {
    env: Environment<'static>,
    special_tokens: Map<String, Value>,
}

impl ChatTemplate {
    /// Compiles `source`. `special_tokens` (e.g. `bos_token`, `eos_token`) become template
    /// variables, as transformers passes them.
    pub fn new(source: &str, special_tokens: Map<String, Value>) -> Result<Self, PreprocessError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, source.to_owned())
            .map_err(|error| PreprocessError::Model(format!("chat template: {error:#}")))?;
        Ok(Self {
            env,
            special_tokens,
        })
    }

    /// Renders the conversation. `kwargs` are extra template variables (`add_vision_id`,
    /// `enable_thinking`, `tools`, ...); they cannot override `messages` or
    /// `add_generation_prompt`.
    pub fn render(
        &self,
        messages: &[Value],
        add_generation_prompt: bool,
        kwargs: &Map<String, Value>,
    ) -> Result<String, PreprocessError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| PreprocessError::Model(format!("chat template: {error}")))?;
        let mut context = self.special_tokens.clone();
        context.extend(kwargs.iter().map(|(k, v)| (k.clone(), v.clone())));
        context.insert("messages".to_owned(), Value::Array(messages.to_vec()));
        context.insert(
            "add_generation_prompt".to_owned(),
            Value::Bool(add_generation_prompt),
        );
        template
            .render(JinjaValue::from_serialize(&context))
            .map_err(|error| PreprocessError::Template(describe(&error)))
    }
}

/// The message a template author wrote for `raise_exception`, or minijinja's description.
fn describe(error: &JinjaError) -> String {
    match error.kind() {
        ErrorKind::InvalidOperation => error
            .detail()
            .map_or_else(|| error.to_string(), str::to_owned),
        _ => error.to_string(),
    }
}

fn raise_exception(message: String) -> Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

fn strftime_now(format: String) -> String {
    chrono::Local::now().format(&format).to_string()
}

/// `tojson` as transformers defines it: `json.dumps(value, ensure_ascii=False, indent=indent,
/// separators=separators, sort_keys=sort_keys)`. Python's default separators are `", "` and
/// `": "`; minijinja's built-in filter writes compact, HTML-escaped JSON, which would change
/// the rendered prompt of every template that serializes tools.
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, JinjaError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let mut json = serde_json::to_value(&value)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    if sort_keys.unwrap_or(false) {
        sort_object_keys(&mut json);
    }
    let mut out = Vec::new();
    let result = match indent {
        Some(indent) => {
            let indent = " ".repeat(indent);
            let formatter = PythonFormatter::indented(indent.as_bytes());
            json.serialize(&mut serde_json::Serializer::with_formatter(
                &mut out, formatter,
            ))
        }
        None => json.serialize(&mut serde_json::Serializer::with_formatter(
            &mut out,
            PythonFormatter::compact(),
        )),
    };
    result.map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    let text = String::from_utf8(out)
        .map_err(|e| JinjaError::new(ErrorKind::InvalidOperation, e.to_string()))?;
    Ok(JinjaValue::from_safe_string(text))
}

fn sort_object_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_object_keys);
        }
        Value::Array(items) => items.iter_mut().for_each(sort_object_keys),
        _ => {}
    }
}

/// Python `json.dumps` layout: `", "` / `": "` without indent; with indent, newlines and `","`
/// at line ends (Python drops the space after commas when indenting).
struct PythonFormatter<'a> {
    indent: Option<&'a [u8]>,
    depth: usize,
    has_value: bool,
}

impl<'a> PythonFormatter<'a> {
    fn compact() -> Self {
        Self {
            indent: None,
            depth: 0,
            has_value: false,
        }
    }

    fn indented(indent: &'a [u8]) -> Self {
        Self {
            indent: Some(indent),
            depth: 0,
            has_value: false,
        }
    }

    fn newline<W: ?Sized + std::io::Write>(&self, writer: &mut W) -> std::io::Result<()> {
        if let Some(indent) = self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth {
                writer.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.newline(writer)?;
        }
        self.has_value = true;
        writer.write_all(bracket)
    }

    /// Before every element but the first: the separator, then the indentation.
    fn element<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        if !first {
            writer.write_all(self.separator())?;
        }
        self.newline(writer)
    }

    fn separator(&self) -> &'static [u8] {
        if self.indent.is_some() {
            b","
        } else {
            b", "
        }
    }
}

impl serde_json::ser::Formatter for PythonFormatter<'_> {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.element(writer, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.element(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _: &mut W) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(source: &str, messages: &[Value]) -> Result<String, PreprocessError> {
        ChatTemplate::new(source, Map::new())?.render(messages, false, &Map::new())
    }

    #[test]
    fn tojson_writes_what_python_json_dumps_writes() {
        let template = "{{ messages[0] | tojson }}|{{ messages[0] | tojson(indent=2) }}|{{ messages[0] | tojson(sort_keys=true) }}";
        let value = json!({"z": [1, "é<>&"], "a": {}, "m": []});
        assert_eq!(
            render(template, &[value]).unwrap(),
            "{\"z\": [1, \"é<>&\"], \"a\": {}, \"m\": []}|{\n  \"z\": [\n    1,\n    \"é<>&\"\n  ],\n  \"a\": {},\n  \"m\": []\n}|{\"a\": {}, \"m\": [], \"z\": [1, \"é<>&\"]}"
        );
    }

    #[test]
    fn raise_exception_is_a_template_error_with_the_authors_message() {
        let error = render(
            "{% if messages[0].role != 'user' %}{{ raise_exception('Conversation must start with a user message') }}{% endif %}",
            &[json!({"role": "assistant", "content": "x"})],
        )
        .unwrap_err();
        assert!(
            matches!(&error, PreprocessError::Template(m) if m == "Conversation must start with a user message"),
            "{error}"
        );
        assert!(error.is_client_error());
    }

    #[test]
    fn hf_template_idioms_work() {
        let template = "{% set ns = namespace(n=0) %}{% for m in messages %}{% if loop.first %}[{% endif %}{% set ns.n = ns.n + 1 %}{{ m.content.strip() }}{% if m.content.startswith(' a') %}!{% endif %}{% if loop.last %}]{% endif %}{% endfor %}{{ ns.n }}";
        let messages = [
            json!({"role": "user", "content": " a "}),
            json!({"role": "user", "content": "b"}),
        ];
        assert_eq!(render(template, &messages).unwrap(), "[a!b]2");
        assert!(render("{{ strftime_now('%Y') }}", &[]).unwrap().len() == 4);
    }

    #[test]
    fn a_template_that_does_not_compile_is_a_model_error() {
        let error = ChatTemplate::new("{% for %}", Map::new()).unwrap_err();
        assert!(!error.is_client_error());
    }
}
