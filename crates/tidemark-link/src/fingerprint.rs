//! Certificate fingerprints: the SHA-256 of a certificate's DER, which is how partners are pinned.

use std::fmt;
use std::str::FromStr;

/// The text that starts every fingerprint's text form.
const PREFIX: &str = "sha256:";

/// The SHA-256 digest of a certificate's DER encoding: the identity a partner is pinned by.
///
/// Its text form is `sha256:` followed by 64 lowercase hex digits. Parsing also accepts
/// uppercase digits, an uppercase prefix, and a colon between every pair of digits, which is how
/// `openssl x509 -noout -fingerprint -sha256` prints it (copy the part after `=`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    /// The fingerprint of a DER-encoded certificate.
    pub fn of_certificate(certificate_der: &[u8]) -> Fingerprint {
        let digest = ring::digest::digest(&ring::digest::SHA256, certificate_der);
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(digest.as_ref());
        Fingerprint(bytes)
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(PREFIX)?;
        for byte in self.0 {
            write!(f, "{byte:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Why a string is not a fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FingerprintParseError {
    /// The string does not start with `sha256:`.
    #[error("fingerprint {text:?} does not start with \"sha256:\"")]
    MissingPrefix {
        /// The text as given.
        text: String,
    },
    /// The digest part has the wrong number of hex digits.
    #[error(
        "fingerprint {text:?} has {digits} hex digits after \"sha256:\", expected 64 \
         (optionally with a colon between every pair)"
    )]
    WrongLength {
        /// The text as given.
        text: String,
        /// How many hex digits it has.
        digits: usize,
    },
    /// A character that is neither a hex digit nor a well-placed colon.
    #[error(
        "fingerprint {text:?} has {character:?} at character {position} after \"sha256:\", \
         expected a hex digit{colon_hint}"
    )]
    InvalidCharacter {
        /// The text as given.
        text: String,
        /// The offending character.
        character: char,
        /// Its position (0-based, in characters) after the prefix.
        position: usize,
        /// Extra advice when the character is a misplaced colon.
        colon_hint: &'static str,
    },
}

impl FromStr for Fingerprint {
    type Err = FingerprintParseError;

    fn from_str(text: &str) -> Result<Fingerprint, FingerprintParseError> {
        let trimmed = text.trim();
        let digits = match trimmed.get(..PREFIX.len()) {
            Some(prefix) if prefix.eq_ignore_ascii_case(PREFIX) => {
                trimmed.get(PREFIX.len()..).unwrap_or_default()
            }
            _ => return Err(FingerprintParseError::MissingPrefix { text: text.to_owned() }),
        };
        // Colons are allowed only in the form "ab:cd:...": after every pair, never mixed.
        let colons = digits.contains(':');
        let mut bytes = [0u8; 32];
        let mut nibbles = 0usize;
        for (position, character) in digits.chars().enumerate() {
            let colon_expected = colons && position % 3 == 2;
            if colon_expected {
                if character == ':' {
                    continue;
                }
                return Err(FingerprintParseError::InvalidCharacter {
                    text: text.to_owned(),
                    character,
                    position,
                    colon_hint: " or a colon: separate every pair of digits with a colon, or none",
                });
            }
            let Some(value) = character.to_digit(16) else {
                let colon_hint = if character == ':' {
                    ": colons go between every pair of digits, or nowhere"
                } else {
                    ""
                };
                return Err(FingerprintParseError::InvalidCharacter {
                    text: text.to_owned(),
                    character,
                    position,
                    colon_hint,
                });
            };
            if let Some(byte) = bytes.get_mut(nibbles / 2) {
                // `to_digit(16)` returns at most 15, so the cast cannot truncate.
                *byte = (*byte << 4) | value as u8;
            }
            nibbles += 1;
        }
        // A trailing colon ("..:ff:") would leave an extra separator: count it as a wrong length.
        if nibbles != 64 || (colons && digits.len() != 64 + 31) {
            return Err(FingerprintParseError::WrongLength { text: text.to_owned(), digits: nibbles });
        }
        Ok(Fingerprint(bytes))
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)] // Tests index freely; the lint guards the library code.
mod tests {
    use super::*;

    fn sample() -> Fingerprint {
        let mut bytes = [0u8; 32];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37).wrapping_add(0xa5);
        }
        Fingerprint(bytes)
    }

    #[test]
    fn display_parse_round_trip() {
        let fp = sample();
        let text = fp.to_string();
        assert!(text.starts_with("sha256:"));
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text, text.to_lowercase());
        assert_eq!(text.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(format!("{fp:?}"), text);
    }

    #[test]
    fn parse_accepts_uppercase_and_colons() {
        let fp = sample();
        let hex: String = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        assert_eq!(format!("SHA256:{hex}").parse::<Fingerprint>(), Ok(fp));
        let pairs: Vec<String> = fp.0.iter().map(|b| format!("{b:02X}")).collect();
        let openssl_style = format!("sha256:{}", pairs.join(":"));
        assert_eq!(openssl_style.parse::<Fingerprint>(), Ok(fp));
        assert_eq!(format!("  {fp}\n").parse::<Fingerprint>(), Ok(fp));
    }

    #[test]
    fn parse_refuses_bad_strings_with_the_reason() {
        let good = sample().to_string();
        let hex = good.trim_start_matches("sha256:").to_owned();

        let err = hex.parse::<Fingerprint>().expect_err("no prefix");
        assert!(matches!(err, FingerprintParseError::MissingPrefix { .. }));
        assert!(err.to_string().contains("does not start with"), "{err}");

        let err = format!("sha1:{hex}").parse::<Fingerprint>().expect_err("wrong prefix");
        assert!(matches!(err, FingerprintParseError::MissingPrefix { .. }));

        let short = format!("sha256:{}", &hex[..62]);
        let err = short.parse::<Fingerprint>().expect_err("short");
        assert_eq!(err, FingerprintParseError::WrongLength { text: short, digits: 62 });
        assert!(err.to_string().contains("62 hex digits"), "{err}");

        let err = format!("sha256:{hex}00").parse::<Fingerprint>().expect_err("long");
        assert!(matches!(err, FingerprintParseError::WrongLength { digits: 66, .. }));

        let mut bad_digit = hex.clone();
        bad_digit.replace_range(10..11, "g");
        let err = format!("sha256:{bad_digit}").parse::<Fingerprint>().expect_err("bad digit");
        assert!(matches!(err, FingerprintParseError::InvalidCharacter { character: 'g', position: 10, .. }));
        assert!(err.to_string().contains("'g'"), "{err}");

        // Mixed separators: a colon after the first pair only.
        let mixed = format!("sha256:{}:{}", &hex[..2], &hex[2..]);
        let err = mixed.parse::<Fingerprint>().expect_err("mixed colons");
        assert!(matches!(err, FingerprintParseError::InvalidCharacter { position: 5, .. }));

        let err = "sha256:".parse::<Fingerprint>().expect_err("empty");
        assert!(matches!(err, FingerprintParseError::WrongLength { digits: 0, .. }));
        let err = "".parse::<Fingerprint>().expect_err("empty string");
        assert!(matches!(err, FingerprintParseError::MissingPrefix { .. }));
    }

    #[test]
    fn fingerprint_is_sha256_of_der() {
        // SHA-256 of the empty input, a published test vector.
        let fp = Fingerprint::of_certificate(b"");
        assert_eq!(fp.to_string(), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
