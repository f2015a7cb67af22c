//! Rendering a route's templates (parsed with the configuration, `config::template`) from
//! a delivery: its body, the body parsed as JSON when a template names a field, and its
//! event, route and sender id.

use serde_json::Value;

use crate::config::{Part, Template};

/// What a template is rendered from.
pub struct Input<'a> {
    pub body: &'a [u8],
    pub json: Option<&'a Value>,
    pub event: &'a str,
    pub route: &'a str,
    pub source_id: &'a str,
}

/// The text, or why the body cannot fill it (the route answers 422).
pub fn render(t: &Template, i: &Input<'_>) -> Result<String, String> {
    let mut out = String::new();
    for p in t.parts() {
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
        assert_eq!(render(&t, &input).unwrap(), "push on o/r #5 {x} y");
        let empty = serde_json::json!({});
        let input = Input {
            json: Some(&empty),
            ..input
        };
        assert_eq!(
            render(&t, &input).unwrap_err(),
            "the body has no field `repository.full_name`"
        );
        let input = Input {
            json: None,
            ..input
        };
        assert_eq!(render(&t, &input).unwrap_err(), "the body is not JSON");
        assert!(Template::parse("{nope}").is_err());
        assert!(Template::parse("{body").is_err());
        assert!(Template::parse("a } b").is_err());
        assert!(Template::parse("{body.}").is_err());
    }

    #[test]
    fn renders_the_raw_body_and_the_delivery_names() {
        let t = Template::parse("{route}/{event}/{source_id}: {body}").unwrap();
        let input = Input {
            body: b"not json",
            json: None,
            event: "push",
            route: "gh",
            source_id: "42",
        };
        assert_eq!(render(&t, &input).unwrap(), "gh/push/42: not json");
    }
}
