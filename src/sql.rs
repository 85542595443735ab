//! Quoting for the few statements that cannot take bind parameters (DDL, `REFRESH`, `LISTEN`).
//! Every identifier or literal that comes from configuration goes through [`ident`] or
//! [`literal`]; values go through bind parameters everywhere else.

use std::fmt;

/// `"name"`, with embedded quotes doubled (PostgreSQL's `quote_ident`, always quoting).
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `'text'` as PostgreSQL's `quote_literal` writes it: quotes doubled, and the `E''` form with
/// doubled backslashes when the text has a backslash, so it reads the same whatever
/// `standard_conforming_strings` is.
pub fn literal(text: &str) -> String {
    let body = text.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// A relation (or function) name from configuration: `name` or `schema.name`. A part in double
/// quotes keeps its case and may contain dots; an unquoted part is folded to lower case, as
/// PostgreSQL does.
///
/// Configuration holds names already parsed (serde reads them through [`Relation::parse`]), so
/// no caller parses a name again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct Relation {
    pub schema: Option<String>,
    pub name: String,
}

impl Relation {
    pub fn parse(text: &str) -> Result<Relation, String> {
        let mut parts = Vec::new();
        let mut chars = text.trim().chars().peekable();
        loop {
            let mut part = String::new();
            if chars.peek() == Some(&'"') {
                chars.next();
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            part.push('"');
                        }
                        Some('"') => break,
                        Some(c) => part.push(c),
                        None => return Err(format!("`{text}`: unterminated quoted name")),
                    }
                }
            } else {
                while let Some(&c) = chars.peek() {
                    if c == '.' {
                        break;
                    }
                    if !(c.is_alphanumeric() || c == '_' || c == '$') {
                        return Err(format!(
                            "`{text}`: `{c}` is not allowed in an unquoted name (quote it with \"\")"
                        ));
                    }
                    part.extend(c.to_lowercase());
                    chars.next();
                }
            }
            if part.is_empty() || part.contains('\0') {
                return Err(format!("`{text}`: empty name"));
            }
            parts.push(part);
            match chars.next() {
                None => break,
                Some('.') => continue,
                Some(c) => return Err(format!("`{text}`: unexpected `{c}` after a name")),
            }
        }
        match parts.len() {
            1 => Ok(Relation {
                schema: None,
                name: parts.pop().unwrap_or_default(),
            }),
            2 => {
                let name = parts.pop().unwrap_or_default();
                Ok(Relation {
                    schema: parts.pop(),
                    name,
                })
            }
            _ => Err(format!("`{text}`: expected `name` or `schema.name`")),
        }
    }

    /// The quoted SQL form: `"schema"."name"` or `"name"`.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(s) => format!("{}.{}", ident(s), ident(&self.name)),
            None => ident(&self.name),
        }
    }

    /// A key that compares equal for the same text written two ways (`public.x` vs `x` do not:
    /// those are resolved against the catalog, see [`crate::plan`]).
    pub fn canonical(&self) -> String {
        self.quoted()
    }
}

impl TryFrom<String> for Relation {
    type Error = String;
    fn try_from(text: String) -> Result<Relation, String> {
        Relation::parse(&text)
    }
}

impl fmt::Display for Relation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.schema {
            Some(s) => write!(f, "{s}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ident_doubles_quotes() {
        assert_eq!(ident("a"), "\"a\"");
        assert_eq!(
            ident("a\"; DROP TABLE x; --"),
            "\"a\"\"; DROP TABLE x; --\""
        );
    }

    #[test]
    fn literal_matches_quote_literal() {
        assert_eq!(literal("it's"), "'it''s'");
        assert_eq!(literal("a\\b'"), "E'a\\\\b'''");
    }

    #[test]
    fn relation_parsing() {
        let r = Relation::parse("Analytics.MV_X").unwrap();
        assert_eq!(r.schema.as_deref(), Some("analytics"));
        assert_eq!(r.name, "mv_x");
        assert_eq!(r.quoted(), "\"analytics\".\"mv_x\"");
        let q = Relation::parse("\"My.Schema\".\"We\"\"ird\"").unwrap();
        assert_eq!(q.schema.as_deref(), Some("My.Schema"));
        assert_eq!(q.name, "We\"ird");
        assert!(Relation::parse("a.b.c").is_err());
        assert!(Relation::parse("x; drop table y").is_err());
        assert!(Relation::parse("").is_err());
        assert!(Relation::parse("\"open").is_err());
    }
}
