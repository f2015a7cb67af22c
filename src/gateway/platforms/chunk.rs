//! Long replies split into a platform's messages: at a paragraph break, else a line break,
//! else a space, else anywhere (between characters). A code fence open at a cut is closed at
//! the end of the part and opened again, with its language, at the start of the next, so
//! every part renders on its own.

/// How a platform counts a character towards its length limit (Telegram: UTF-16 units).
pub type Unit = fn(char) -> usize;

pub fn utf16(c: char) -> usize {
    c.len_utf16()
}

pub fn chars(_: char) -> usize {
    1
}

fn measure(s: &str, unit: Unit) -> usize {
    s.chars().map(unit).sum()
}

const FENCE_CLOSE: &str = "\n```";

/// A cut must leave the part at least this share of the room, or a weaker boundary is
/// tried: a paragraph break in the first lines would make a part of a few words.
const MIN_FILL: f64 = 0.3;

/// The fence a line opens or closes, if it is one: its opening line.
fn fence_line(line: &str) -> Option<&str> {
    let t = line.trim_start();
    t.starts_with("```").then_some(t.trim_end())
}

/// The fence open after `text`, given the one open before it.
fn fence_after(text: &str, mut open: Option<String>) -> Option<String> {
    for line in text.split('\n') {
        if let Some(f) = fence_line(line) {
            open = match open {
                Some(_) => None,
                None => Some(f.to_owned()),
            };
        }
    }
    open
}

/// Splits `text` into parts of at most `limit` (as `unit` counts; at least 16).
pub fn split(text: &str, limit: usize, unit: Unit) -> Vec<String> {
    let limit = limit.max(16);
    let mut parts = Vec::new();
    let mut rest = text.trim_matches('\n');
    let mut open: Option<String> = None;
    while !rest.is_empty() {
        // The fence reopened at the start of this part, unless its line is too long to.
        let prefix = match &open {
            Some(f) if measure(f, unit) + 1 + measure(FENCE_CLOSE, unit) <= limit / 2 => {
                format!("{f}\n")
            }
            _ => String::new(),
        };
        let room = limit - measure(&prefix, unit);
        if measure(rest, unit) <= room {
            parts.push(format!("{prefix}{rest}"));
            break;
        }
        // Leave room to close a fence at the cut.
        let room = room - measure(FENCE_CLOSE, unit);
        let mut used = 0;
        let mut hard = 0;
        for (i, c) in rest.char_indices() {
            used += unit(c);
            if used > room {
                break;
            }
            hard = i + c.len_utf8();
        }
        if hard == 0 {
            // Not even one character fits after the prefix: take one anyway.
            hard = rest.chars().next().map_or(rest.len(), char::len_utf8);
        }
        let window = &rest[..hard];
        let min = (hard as f64 * MIN_FILL) as usize;
        let cut = [
            window.rfind("\n\n").map(|i| (i, i + 2)),
            window.rfind('\n').map(|i| (i, i + 1)),
            window.rfind(' ').map(|i| (i, i + 1)),
        ]
        .into_iter()
        .flatten()
        .find(|(end, _)| *end >= min.max(1));
        let (end, next) = cut.unwrap_or((hard, hard));
        let body = rest[..end].trim_end_matches([' ', '\n']);
        let after = fence_after(body, open.clone());
        let mut part = format!("{prefix}{body}");
        if after.is_some() {
            part.push_str(FENCE_CLOSE);
        }
        if !body.is_empty() {
            parts.push(part);
        }
        open = after;
        rest = rest[next..].trim_start_matches('\n');
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(parts: &[String]) -> Vec<usize> {
        parts.iter().map(|p| measure(p, utf16)).collect()
    }

    #[test]
    fn short_text_is_one_part() {
        assert_eq!(split("hello", 4096, utf16), vec!["hello"]);
        assert!(split("", 4096, utf16).is_empty());
    }

    #[test]
    fn cuts_prefer_paragraphs_then_lines_then_words() {
        let para = format!("{}\n\n{}", "a".repeat(60), "b".repeat(60));
        assert_eq!(
            split(&para, 100, chars),
            vec!["a".repeat(60), "b".repeat(60)]
        );
        let lines = format!("{}\n{}", "a".repeat(60), "b".repeat(60));
        assert_eq!(
            split(&lines, 100, chars),
            vec!["a".repeat(60), "b".repeat(60)]
        );
        let words = format!("{} {}", "a".repeat(60), "b".repeat(60));
        assert_eq!(
            split(&words, 100, chars),
            vec!["a".repeat(60), "b".repeat(60)]
        );
        // No boundary at all: cut between characters, nothing lost.
        let solid = "x".repeat(250);
        let parts = split(&solid, 100, chars);
        assert!(lens(&parts).iter().all(|&l| l <= 100));
        assert_eq!(parts.concat(), solid);
    }

    #[test]
    fn a_paragraph_break_too_early_gives_way_to_a_line_break() {
        let text = format!("ab\n\n{}\n{}", "c".repeat(70), "d".repeat(70));
        let parts = split(&text, 100, chars);
        assert_eq!(parts[0], format!("ab\n\n{}", "c".repeat(70)));
    }

    #[test]
    fn telegram_counts_utf16_units() {
        // 😀 is two UTF-16 units: 60 of them are 120 units.
        let text = "😀".repeat(60);
        let parts = split(&text, 100, utf16);
        assert!(parts.len() == 2, "{:?}", lens(&parts));
        assert!(lens(&parts).iter().all(|&l| l <= 100));
        assert_eq!(parts.concat(), text);
    }

    #[test]
    fn a_code_fence_cut_is_closed_and_reopened() {
        let code: String = (0..40).map(|i| format!("let x{i} = {i};\n")).collect();
        let text = format!("Here:\n\n```rust\n{code}```\n\nDone.");
        let parts = split(&text, 200, chars);
        assert!(parts.len() > 2);
        for p in &parts {
            assert!(measure(p, chars) <= 200, "{p}");
            let fences = p
                .lines()
                .filter(|l| l.trim_start().starts_with("```"))
                .count();
            assert_eq!(fences % 2, 0, "unbalanced part:\n{p}");
        }
        assert!(parts[1].starts_with("```rust\n"), "{}", parts[1]);
        // Every line of code is somewhere, once.
        let all = parts.join("\n");
        for i in 0..40 {
            assert_eq!(all.matches(&format!("let x{i} = {i};")).count(), 1);
        }
    }

    #[test]
    fn ten_thousand_characters_in_telegram_parts() {
        let mut text = String::new();
        let mut n = 0;
        while text.len() < 10_000 {
            text.push_str(&format!("Sentence number {n} of a long reply. "));
            n += 1;
            if n % 7 == 0 {
                text.push_str("\n\n");
            }
        }
        let parts = split(&text, 4096, utf16);
        assert_eq!(parts.len(), 3);
        assert!(lens(&parts).iter().all(|&l| l <= 4096));
        let words: Vec<&str> = text.split_whitespace().collect();
        let back: Vec<String> = parts
            .iter()
            .flat_map(|p| p.split_whitespace().map(str::to_owned))
            .collect();
        assert_eq!(back, words, "no word lost, split or repeated");
    }

    #[test]
    fn random_texts_keep_every_word_within_the_limit() {
        // A small deterministic generator: words, spaces, newlines, fences, emoji.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let pieces = [
            "word", "😀", "é", " ", " ", "\n", "\n\n", "```py\n", "\n```\n", "x",
        ];
        for round in 0..300 {
            let mut text = String::new();
            for _ in 0..(next() % 400) {
                text.push_str(pieces[(next() % pieces.len() as u64) as usize]);
            }
            let limit = 16 + (next() % 120) as usize;
            let parts = split(&text, limit, utf16);
            for p in &parts {
                assert!(
                    measure(p, utf16) <= limit,
                    "round {round}: {p:?} over {limit}"
                );
                assert!(!p.is_empty());
            }
            let strip = |s: &str| -> String {
                s.split_whitespace()
                    .filter(|w| !w.starts_with("```"))
                    .collect::<Vec<_>>()
                    .concat()
            };
            // Cutting inside a word may split it, so compare the text with spaces and
            // fences removed: nothing is lost or added.
            assert_eq!(
                strip(&parts.join(" ")),
                strip(&text),
                "round {round}: {text:?} → {parts:?}"
            );
        }
    }
}
