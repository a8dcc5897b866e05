//! Loading a program's config: an optional TOML file, then `PREFIX__SECTION__KEY` environment
//! overrides (`CACHE_NODE__SERVER__LISTEN`, `PEER_CLIENT__DOWNLOAD_MODE`), deserialised into the
//! program's serde struct, whose `#[serde(default)]`s fill in everything left unset.

use std::collections::HashMap;
use std::path::Path;

use serde::de::DeserializeOwned;

/// Why a configuration could not be used. Each variant names the key at fault. Both programs
/// report their config errors with this type.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read or parsed, or an environment override had the wrong type.
    #[error("configuration could not be loaded: {0}")]
    Load(#[from] config::ConfigError),
    /// A key parsed but its value is not acceptable.
    #[error("{key}: {message}")]
    Invalid {
        /// The dotted key, for example `storage.max_size`.
        key: String,
        /// What is wrong and what would be right.
        message: String,
    },
}

/// The [`ConfigError::Invalid`] of `key`.
pub fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        message: message.into(),
    }
}

/// Reads `path` (when given; it must then exist) and the environment variables that start with
/// `prefix` and `__`, and deserialises the result. `env` replaces the process environment when
/// given (for tests).
pub fn load<T: DeserializeOwned>(
    prefix: &str,
    path: Option<&Path>,
    env: Option<HashMap<String, String>>,
) -> Result<T, config::ConfigError> {
    let mut builder = config::Config::builder();
    if let Some(path) = path {
        builder = builder.add_source(config::File::from(path).required(true));
    }
    let environment = config::Environment::with_prefix(prefix)
        .prefix_separator("__")
        .separator("__")
        .try_parsing(true)
        .source(env);
    builder.add_source(environment).build()?.try_deserialize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default)]
    struct Example {
        top: u32,
        server: Server,
    }

    #[derive(Debug, Default, serde::Deserialize, PartialEq)]
    #[serde(default)]
    struct Server {
        listen: String,
        workers: u32,
    }

    #[test]
    fn the_environment_overrides_the_file_and_defaults_fill_the_rest() {
        let directory = std::env::temp_dir().join(format!("outpost-shared-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let path = directory.join("example.toml");
        std::fs::write(&path, "top = 1\n[server]\nlisten = \"0.0.0.0:80\"\n").unwrap();
        let env = HashMap::from([
            (
                "EXAMPLE__SERVER__LISTEN".to_owned(),
                "127.0.0.1:8080".to_owned(),
            ),
            ("OTHER__TOP".to_owned(), "9".to_owned()),
        ]);
        let loaded: Example = load("EXAMPLE", Some(&path), Some(env)).unwrap();
        assert_eq!(
            loaded,
            Example {
                top: 1,
                server: Server {
                    listen: "127.0.0.1:8080".into(),
                    workers: 0
                }
            }
        );
        let missing = load::<Example>("EXAMPLE", Some(&directory.join("absent.toml")), None);
        assert!(missing.is_err(), "a named file that is missing is an error");
        std::fs::remove_dir_all(&directory).unwrap();
    }
}
