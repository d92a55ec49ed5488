//! The rule every object name follows (groups, volumes, images, bookmarks, the site).
//!
//! Names become file names, NBD export names (`IMAGE/VOLUME`), URL path segments and parts of
//! points (`bookmark:NAME`), so they are kept to a small, unambiguous alphabet.

/// Longest name, in characters.
pub const NAME_CHARS_MAX: usize = 64;

/// Why a name was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid {kind} name {name:?}: {reason}")]
pub struct NameError {
    /// `group`, `volume`, `image`, `bookmark` or `site`.
    pub kind: &'static str,
    /// The name as given.
    pub name: String,
    /// What is wrong with it.
    pub reason: String,
}

/// Check that `name` is 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
pub fn validate_name(kind: &'static str, name: &str) -> Result<(), NameError> {
    let refuse = |reason: String| NameError { kind, name: name.to_string(), reason };
    if name.is_empty() {
        return Err(refuse("it is empty".into()));
    }
    if name.chars().count() > NAME_CHARS_MAX {
        return Err(refuse(format!("it is longer than {NAME_CHARS_MAX} characters")));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))) {
        return Err(refuse(format!("{bad:?} is not allowed (use letters, digits, '.', '_' and '-')")));
    }
    if name.starts_with('.') || name.starts_with('-') {
        return Err(refuse("it must not start with '.' or '-'".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_names_pass() {
        for name in ["a", "db-data", "db_log.1", "Z9", "a-", "x.y.z", &"n".repeat(NAME_CHARS_MAX)] {
            assert_eq!(validate_name("volume", name), Ok(()), "{name}");
        }
    }

    #[test]
    fn bad_names_are_refused_with_a_reason() {
        let cases = [
            ("", "empty"),
            (".hidden", "start"),
            ("-flag", "start"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            ("snap:1", "':'"),
            ("é", "'é'"),
            ("..", "start"),
        ];
        for (name, reason) in cases {
            let err = validate_name("image", name).expect_err(name);
            assert!(err.to_string().contains(reason), "{name}: {err}");
            assert!(err.to_string().starts_with("invalid image name"), "{err}");
        }
        let long = "n".repeat(NAME_CHARS_MAX + 1);
        assert!(validate_name("group", &long).is_err());
    }
}
