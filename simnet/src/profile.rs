//! Named link profiles: TOML files in `simnet/profiles/`, built into the binary so that it works
//! from any directory, plus profiles read from a path.
//!
//! A profile file has a `description` and the link's settings in the same shape as
//! [`LinkSettings`]: a `[both]` table, or `[a_to_b]` and `[b_to_a]`. In a profile `rtt` is the
//! usual way to give the delay; it means a one-way delay of `rtt / 2` in each direction.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::settings::{DirectionSettings, LinkSettings, SettingsError};

/// The built-in profiles: name and file contents.
pub const BUILT_IN: [(&str, &str); 5] = [
    ("metro", include_str!("../profiles/metro.toml")),
    ("wan", include_str!("../profiles/wan.toml")),
    ("intercontinental", include_str!("../profiles/intercontinental.toml")),
    ("satellite", include_str!("../profiles/satellite.toml")),
    ("flapping", include_str!("../profiles/flapping.toml")),
];

/// Largest profile file read from a path, in bytes.
pub const PROFILE_FILE_BYTES_MAX: u64 = 64 * 1024;

/// A profile that cannot be found or read.
#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    /// No built-in profile has this name, and it is not a path to a file.
    #[error("no profile named {name:?}: use one of {known}, or a path to a .toml file")]
    Unknown {
        /// The name asked for.
        name: String,
        /// The built-in names, comma-separated.
        known: String,
    },
    /// The profile file could not be read.
    #[error("read profile {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The operating system's error.
        source: std::io::Error,
    },
    /// The profile file is larger than [`PROFILE_FILE_BYTES_MAX`].
    #[error("profile {path} is larger than {PROFILE_FILE_BYTES_MAX} bytes; is it really a profile?")]
    TooLarge {
        /// The file.
        path: PathBuf,
    },
    /// The profile is not valid TOML of the expected shape.
    #[error("profile {name} is invalid: {source}")]
    Parse {
        /// The profile's name or path.
        name: String,
        /// What the TOML parser found.
        source: Box<toml::de::Error>,
    },
    /// The profile's settings cannot be used.
    #[error("profile {name} is invalid: {source}")]
    Settings {
        /// The profile's name or path.
        name: String,
        /// What is wrong with the settings.
        source: SettingsError,
    },
}

/// A named set of link settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Profile {
    /// The profile's name: a built-in name, or the file's stem.
    pub name: String,
    /// One line saying what link it models.
    pub description: String,
    /// The link's settings.
    pub settings: LinkSettings,
}

impl Profile {
    /// The built-in profile `name`, or the profile file at path `name` when no built-in profile
    /// has that name and it looks like a path (contains `/` or ends in `.toml`).
    pub fn load(name: &str) -> Result<Profile, ProfileError> {
        if let Some(profile) = Profile::built_in(name) {
            return profile;
        }
        if name.contains('/') || name.ends_with(".toml") {
            return Profile::from_path(Path::new(name));
        }
        Err(ProfileError::Unknown { name: name.to_owned(), known: Profile::names().join(", ") })
    }

    /// The built-in profile `name`, if there is one.
    pub fn built_in(name: &str) -> Option<Result<Profile, ProfileError>> {
        BUILT_IN.iter().find(|(known, _)| *known == name).map(|(name, text)| Profile::parse(name, text))
    }

    /// The built-in profiles' names.
    pub fn names() -> Vec<&'static str> {
        BUILT_IN.iter().map(|(name, _)| *name).collect()
    }

    /// Read a profile file; its name is the file's stem.
    pub fn from_path(path: &Path) -> Result<Profile, ProfileError> {
        let read_error = |source| ProfileError::Read { path: path.to_owned(), source };
        let length = std::fs::metadata(path).map_err(read_error)?.len();
        if length > PROFILE_FILE_BYTES_MAX {
            return Err(ProfileError::TooLarge { path: path.to_owned() });
        }
        let text = std::fs::read_to_string(path).map_err(read_error)?;
        let name =
            path.file_stem().map_or_else(|| path.display().to_string(), |stem| stem.to_string_lossy().into());
        Profile::parse(&name, &text)
    }

    /// Parse a profile's text.
    pub fn parse(name: &str, text: &str) -> Result<Profile, ProfileError> {
        let file: ProfileFile = toml::from_str(text)
            .map_err(|source| ProfileError::Parse { name: name.to_owned(), source: Box::new(source) })?;
        let settings = LinkSettings::from_parts(file.both, file.a_to_b, file.b_to_a)
            .map_err(|source| ProfileError::Settings { name: name.to_owned(), source })?;
        Ok(Profile { name: name.to_owned(), description: file.description, settings })
    }
}

/// A profile file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProfileFile {
    description: String,
    #[serde(default)]
    both: Option<DirectionSettings>,
    #[serde(default)]
    a_to_b: Option<DirectionSettings>,
    #[serde(default)]
    b_to_a: Option<DirectionSettings>,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{BitRate, LossModel, OutageSchedule};

    fn built_in(name: &str) -> LinkSettings {
        match Profile::load(name) {
            Ok(profile) => profile.settings,
            Err(error) => panic!("built-in profile {name}: {error}"),
        }
    }

    #[test]
    fn every_built_in_profile_parses() {
        for name in Profile::names() {
            let profile = Profile::load(name).unwrap_or_else(|error| panic!("{error}"));
            assert_eq!(profile.name, name);
            assert!(!profile.description.is_empty());
            assert_eq!(profile.settings.a_to_b, profile.settings.b_to_a, "{name} is symmetric");
        }
    }

    #[test]
    fn profiles_match_the_issue() {
        let rate = |megabits| BitRate::from_megabits_per_second(megabits);
        let metro = built_in("metro").a_to_b;
        assert_eq!(
            (metro.delay, metro.rate, metro.loss),
            (Duration::from_millis(1), rate(1000), LossModel::None)
        );

        let wan = built_in("wan").a_to_b;
        assert_eq!((wan.delay, wan.rate), (Duration::from_millis(25), rate(200)));
        assert_eq!(wan.loss.mean_loss(), 0.001);

        let intercontinental = built_in("intercontinental").a_to_b;
        assert_eq!((intercontinental.delay, intercontinental.rate), (Duration::from_millis(75), rate(50)));
        assert_eq!(intercontinental.loss.mean_loss(), 0.005);
        assert!(!intercontinental.jitter.is_zero());

        let satellite = built_in("satellite").a_to_b;
        assert_eq!((satellite.delay, satellite.rate), (Duration::from_millis(300), rate(20)));
        assert_eq!(satellite.loss.mean_loss(), 0.01);

        let flapping = built_in("flapping").a_to_b;
        assert_eq!(
            flapping.outages,
            Some(OutageSchedule { up: Duration::from_secs(20), down: Duration::from_secs(3) })
        );
        assert_eq!(DirectionSettings { outages: None, ..flapping }, wan, "flapping is wan with outages");
    }

    #[test]
    fn every_profile_file_is_built_in() {
        // A file added to profiles/ but not to BUILT_IN would silently not be loadable by name.
        let directory = Path::new(env!("CARGO_MANIFEST_DIR")).join("profiles");
        let mut files: Vec<String> = std::fs::read_dir(&directory)
            .expect("read the profiles directory")
            .map(|entry| entry.expect("a directory entry").path())
            .filter(|path| path.extension().is_some_and(|extension| extension == "toml"))
            .map(|path| path.file_stem().expect("a file name").to_string_lossy().into_owned())
            .collect();
        files.sort();
        let mut names = Profile::names();
        names.sort_unstable();
        assert_eq!(files, names);
        for name in names {
            let from_file =
                Profile::from_path(&directory.join(format!("{name}.toml"))).expect("loads from its path");
            assert_eq!(
                Some(from_file.settings),
                Profile::built_in(name).and_then(Result::ok).map(|p| p.settings)
            );
        }
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        let error = Profile::load("dialup").expect_err("no such profile");
        assert!(error.to_string().contains("metro, wan, intercontinental, satellite, flapping"), "{error}");
    }

    #[test]
    fn profiles_with_mistakes_are_refused() {
        assert!(Profile::parse("x", "description = \"x\"\n[both]\nrtt = \"fast\"\n").is_err());
        assert!(Profile::parse("x", "[both]\nrtt = \"2ms\"\n").is_err(), "description is required");
        assert!(Profile::parse("x", "description = \"x\"\n[a_to_b]\n").is_err(), "b_to_a missing");
    }
}
