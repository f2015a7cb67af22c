//! Prompt and session-key templates: literal text with `{placeholders}`.
//!
//! `{body}` is the raw body, `{event}`, `{route}` and `{source_id}` what their names say,
//! and `{body.a.b}` (or `{body.items.0.name}`) a field of the JSON body: a string as is,
//! anything else as JSON. `{{` and `}}` are literal braces. A template that names a body
//! field makes the body JSON mandatory for its route (422 otherwise).

use serde_json::Value;

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Body,
    Event,
    Route,
    SourceId,
    Field(Vec<String>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    parts: Vec<Part>,
}

/// What a template is rendered from.
pub struct Input<'a> {
    pub body: &'a [u8],
    pub json: Option<&'a Value>,
    pub event: &'a str,
    pub route: &'a str,
    pub source_id: &'a str,
}

impl Template {
    pub fn parse(s: &str) -> Result<Template, String> {
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
                '}' => return Err("a lone `}`: write `}}` for a literal brace".into()),
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(format!(
                                    "`{{{name}` is not closed: write `{{{{` for a literal brace"
                                ));
                            }
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
                            _ => {
                                return Err(format!(
                                    "unknown placeholder `{{{n}}}`: use {{body}}, {{body.FIELD.SUBFIELD}}, {{event}}, {{route}} or {{source_id}}"
                                ));
                            }
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

    /// Whether rendering needs the body parsed as JSON.
    pub fn needs_json(&self) -> bool {
        self.parts.iter().any(|p| matches!(p, Part::Field(_)))
    }

    /// The text, or why the body cannot fill it (the route answers 422).
    pub fn render(&self, i: &Input<'_>) -> Result<String, String> {
        let mut out = String::new();
        for p in &self.parts {
            match p {
                Part::Text(t) => out.push_str(t),
                Part::Body => out.push_str(&String::from_utf8_lossy(i.body)),
                Part::Event => out.push_str(i.event),
                Part::Route => out.push_str(i.route),
                Part::SourceId => out.push_str(i.source_id),
                Part::Field(path) => {
                    let mut v = i.json.ok_or("the body is not JSON")?;
                    for k in path {
                        v = match v {
                            Value::Object(m) => m.get(k),
                            Value::Array(a) => k.parse::<usize>().ok().and_then(|n| a.get(n)),
                            _ => None,
                        }
                        .ok_or_else(|| format!("the body has no field `{}`", path.join(".")))?;
                    }
                    match v {
                        Value::String(s) => out.push_str(s),
                        v => out.push_str(&v.to_string()),
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_fields_and_refuses_missing_ones() {
        let t =
            Template::parse("{event} on {body.repository.full_name} #{body.n} {{x}} {body.a.1}")
                .unwrap();
        assert!(t.needs_json());
        let json: Value =
            serde_json::json!({"repository": {"full_name": "o/r"}, "n": 5, "a": ["x", "y"]});
        let input = Input {
            body: b"{}",
            json: Some(&json),
            event: "push",
            route: "gh",
            source_id: "1",
        };
        assert_eq!(t.render(&input).unwrap(), "push on o/r #5 {x} y");
        let empty = serde_json::json!({});
        let input = Input {
            json: Some(&empty),
            ..input
        };
        assert_eq!(
            t.render(&input).unwrap_err(),
            "the body has no field `repository.full_name`"
        );
        assert!(Template::parse("{nope}").is_err());
        assert!(Template::parse("{body").is_err());
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("{body.}").is_err());
    }
}
