//! Prompt and session-key templates of webhook routes: literal text with `{placeholders}`.
//! A template is a configuration value: it is parsed here, with the rest of the file, so
//! that a bad one is a configuration error naming its key; the gateway only renders it.
//!
//! `{body}` is the raw body, `{event}`, `{route}` and `{source_id}` what their names say,
//! and `{body.a.b}` (or `{body.items.0.name}`) a field of the JSON body: a string as is,
//! anything else as JSON. `{{` and `}}` are literal braces. A template that names a body
//! field makes the body JSON mandatory for its route (422 otherwise).

/// One piece of a template, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Body,
    Event,
    Route,
    SourceId,
    /// `{body.a.0.b}`: the path into the JSON body, never empty, no empty segment.
    Field(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    #[error("a lone `}}`: write `}}}}` for a literal brace")]
    LoneClose,
    #[error("`{{{0}` is not closed: write `{{{{` for a literal brace")]
    Unclosed(String),
    #[error(
        "unknown placeholder `{{{0}}}`: use {{body}}, {{body.FIELD.SUBFIELD}}, {{event}}, {{route}} or {{source_id}}"
    )]
    UnknownPlaceholder(String),
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, TemplateError> {
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    text.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    text.push('}');
                }
                '}' => return Err(TemplateError::LoneClose),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => return Err(TemplateError::Unclosed(name)),
                        }
                    }
                    if !text.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut text)));
                    }
                    parts.push(match name.trim() {
                        "body" => Part::Body,
                        "event" => Part::Event,
                        "route" => Part::Route,
                        "source_id" => Part::SourceId,
                        n => match n.strip_prefix("body.") {
                            Some(path) if path.split('.').all(|p| !p.is_empty()) => {
                                Part::Field(path.split('.').map(str::to_owned).collect())
                            }
                            _ => return Err(TemplateError::UnknownPlaceholder(n.to_owned())),
                        },
                    });
                }
                c => text.push(c),
            }
        }
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        Ok(Template { parts })
    }

    pub fn parts(&self) -> &[Part] {
        &self.parts
    }

    /// Whether rendering needs the body parsed as JSON.
    pub fn needs_json(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_placeholders_and_literal_braces() {
        let t =
            Template::parse("{event} on {body.repository.full_name} #{body.n} {{x}} {body.a.1}")
                .unwrap();
        assert!(t.needs_json());
        let field = |p: &[&str]| Part::Field(p.iter().map(|s| (*s).to_owned()).collect());
        assert_eq!(
            t.parts(),
            [
                Part::Event,
                Part::Text(" on ".into()),
                field(&["repository", "full_name"]),
                Part::Text(" #".into()),
                field(&["n"]),
                Part::Text(" {x} ".into()),
                field(&["a", "1"]),
            ]
        );
        let plain = Template::parse("{route}: {body} ({source_id})").unwrap();
        assert!(!plain.needs_json());
    }

    #[test]
    fn refuses_what_it_cannot_render_and_says_why() {
        assert_eq!(
            Template::parse("{nope}").unwrap_err().to_string(),
            "unknown placeholder `{nope}`: use {body}, {body.FIELD.SUBFIELD}, {event}, {route} or {source_id}"
        );
        assert_eq!(
            Template::parse("{body").unwrap_err().to_string(),
            "`{body` is not closed: write `{{` for a literal brace"
        );
        assert_eq!(
            Template::parse("a } b").unwrap_err().to_string(),
            "a lone `}`: write `}}` for a literal brace"
        );
        assert!(matches!(
            Template::parse("{body.}"),
            Err(TemplateError::UnknownPlaceholder(_))
        ));
    }
}
