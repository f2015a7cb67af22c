//! An agent's Markdown as Telegram HTML, when it converts safely: fenced code, inline code,
//! bold, strike-through, links and headings. Anything unbalanced (an odd `**`, a stray
//! backtick, an unclosed fence) and the part goes out as plain text instead — never as
//! markup Telegram would refuse or show mangled.

fn escape(s: &str, out: &mut String) {
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            c => out.push(c),
        }
    }
}

/// `text` as Telegram HTML; `None` when it has no Markdown to convert or does not convert
/// safely (send it as plain text then).
pub fn to_html(text: &str) -> Option<String> {
    let mut out = String::with_capacity(text.len() + 32);
    let mut converted = false;
    let mut lines = text.split('\n').peekable();
    let mut first = true;
    while let Some(line) = lines.next() {
        if !first {
            out.push('\n');
        }
        first = false;
        if let Some(lang) = line.trim_start().strip_prefix("```") {
            // A fenced block: everything up to the closing fence, verbatim.
            let lang = lang.trim();
            if !lang
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'+' || b == b'#')
            {
                return None;
            }
            let mut code = Vec::new();
            let mut closed = false;
            for l in lines.by_ref() {
                if l.trim_start().starts_with("```") {
                    closed = true;
                    break;
                }
                code.push(l);
            }
            if !closed {
                return None;
            }
            if lang.is_empty() {
                out.push_str("<pre>");
            } else {
                out.push_str(&format!("<pre><code class=\"language-{lang}\">"));
            }
            escape(&code.join("\n"), &mut out);
            out.push_str(if lang.is_empty() {
                "</pre>"
            } else {
                "</code></pre>"
            });
            converted = true;
            continue;
        }
        let heading = line.trim_start_matches('#');
        if heading.len() < line.len() && heading.starts_with(' ') && line.starts_with('#') {
            out.push_str("<b>");
            inline(heading.trim(), &mut out)?;
            out.push_str("</b>");
            converted = true;
            continue;
        }
        converted |= inline(line, &mut out)?;
    }
    converted.then_some(out)
}

/// One line's inline Markdown; `Some(true)` when it converted anything, `None` when it is
/// unbalanced.
fn inline(line: &str, out: &mut String) -> Option<bool> {
    let mut converted = false;
    let mut rest = line;
    let mut bold = false;
    let mut strike = false;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('`') {
            let end = r.find('`')?;
            out.push_str("<code>");
            escape(&r[..end], out);
            out.push_str("</code>");
            rest = &r[end + 1..];
            converted = true;
        } else if let Some(r) = rest.strip_prefix("**") {
            out.push_str(if bold { "</b>" } else { "<b>" });
            bold = !bold;
            rest = r;
            converted = true;
        } else if let Some(r) = rest.strip_prefix("~~") {
            out.push_str(if strike { "</s>" } else { "<s>" });
            strike = !strike;
            rest = r;
            converted = true;
        } else if let Some((label, url, r)) = link(rest) {
            out.push_str("<a href=\"");
            escape(url, out);
            out.push_str("\">");
            escape(label, out);
            out.push_str("</a>");
            rest = r;
            converted = true;
        } else {
            let c = rest.chars().next()?;
            escape(&rest[..c.len_utf8()], out);
            rest = &rest[c.len_utf8()..];
        }
    }
    if bold || strike {
        return None;
    }
    Some(converted)
}

/// `[label](http…)` at the start of `s`: the label, the URL and what follows.
fn link(s: &str) -> Option<(&str, &str, &str)> {
    let r = s.strip_prefix('[')?;
    let close = r.find("](")?;
    let label = &r[..close];
    if label.contains(['[', ']', '`']) {
        return None;
    }
    let after = &r[close + 2..];
    let end = after.find(')')?;
    let url = &after[..end];
    if !(url.starts_with("http://") || url.starts_with("https://")) || url.contains(' ') {
        return None;
    }
    Some((label, url, &after[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::to_html;

    #[test]
    fn plain_text_stays_plain() {
        assert_eq!(to_html("hello <world> & you"), None);
        assert_eq!(to_html("a_b_c * 2"), None);
    }

    #[test]
    fn markdown_converts_and_escapes() {
        assert_eq!(
            to_html("**Bold** and `x < y` & [docs](https://example.com/?a=1&b=2)").as_deref(),
            Some(
                "<b>Bold</b> and <code>x &lt; y</code> &amp; <a href=\"https://example.com/?a=1&amp;b=2\">docs</a>"
            )
        );
        assert_eq!(
            to_html("# Title\n```rust\nfn main() { a < b }\n```").as_deref(),
            Some(
                "<b>Title</b>\n<pre><code class=\"language-rust\">fn main() { a &lt; b }</code></pre>"
            )
        );
    }

    #[test]
    fn unbalanced_markdown_is_sent_plain() {
        assert_eq!(to_html("**bold without end"), None);
        assert_eq!(to_html("a stray ` backtick"), None);
        assert_eq!(to_html("```\nunclosed fence"), None);
        assert_eq!(to_html("~~half"), None);
    }
}
