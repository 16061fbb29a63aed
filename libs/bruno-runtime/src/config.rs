//! Typed, layered config: serde defaults < TOML file < `BRUNO_*` environment
//! (`BRUNO_BROKER__URL` sets `broker.url`). Errors name the key.

use std::path::Path;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::de::DeserializeOwned;

/// Config that cannot be loaded, with the key at fault in the message.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

/// Load `C` from its defaults, an optional TOML file and the environment.
pub fn load<C: DeserializeOwned>(file: Option<&Path>) -> Result<C, ConfigError> {
    let mut figment = Figment::new();
    if let Some(path) = file {
        if !path.exists() {
            return Err(ConfigError(format!(
                "config file {} does not exist",
                path.display()
            )));
        }
        figment = figment.merge(Toml::file(path));
    }
    // BRUNO_CONFIG_FILE (the file itself) and BRUNO_MODEL_DIR (where
    // scripts/fetch-model.sh puts the model) are not config keys.
    figment = figment.merge(
        Env::prefixed("BRUNO_")
            .ignore(&["config_file", "model_dir"])
            .split("__"),
    );
    figment.extract::<C>().map_err(|e| {
        let messages: Vec<String> = e
            .into_iter()
            .map(|e| {
                let key = e.path.join(".");
                if key.is_empty() {
                    e.kind.to_string()
                } else {
                    format!("key {key}: {}", e.kind)
                }
            })
            .collect();
        ConfigError(messages.join("; "))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize, PartialEq)]
    #[serde(default, deny_unknown_fields)]
    struct Sample {
        limit: u32,
        name: String,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                limit: 3,
                name: "d".into(),
            }
        }
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment::Jail's signature
    fn layers_and_key_errors() {
        figment::Jail::expect_with(|jail| {
            assert_eq!(load::<Sample>(None).unwrap(), Sample::default());
            jail.create_file("b.toml", "limit = 7")?;
            let path = jail.directory().join("b.toml");
            assert_eq!(load::<Sample>(Some(&path)).unwrap().limit, 7);
            jail.set_env("BRUNO_NAME", "env");
            let s = load::<Sample>(Some(&path)).unwrap();
            assert_eq!((s.limit, s.name.as_str()), (7, "env"));
            jail.set_env("BRUNO_LIMIT", "many");
            let err = load::<Sample>(Some(&path)).unwrap_err().to_string();
            assert!(err.contains("key limit"), "{err}");
            Ok(())
        });
    }
}
