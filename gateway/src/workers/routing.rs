//! Which model a request is for: aliases, the default model, the single-model shortcut, and
//! `model_not_found` listing what is served. Pure functions over the Info the replicas reported.

use std::collections::BTreeMap;
use std::sync::Arc;

use fastfusion_proto::InfoResponse;

use crate::error::ApiError;

/// How request `model` names map to served models. Fixed at start-up.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ModelRouting {
    /// Client-facing names (e.g. `dall-e-3`) → served model ids; resolved before lookup.
    pub aliases: BTreeMap<String, String>,
    /// The model for requests that name none; unset: the first configured worker's model.
    pub default_model: Option<String>,
}

impl ModelRouting {
    /// Model ids in the order `/v1/models` lists them: the default model first, then first-seen
    /// order, each once (several replicas may serve one model).
    pub fn models(&self, known: &[Arc<InfoResponse>]) -> Vec<String> {
        let mut models: Vec<String> = Vec::new();
        for info in known {
            if !models.contains(&info.model_id) {
                models.push(info.model_id.clone());
            }
        }
        if let Some(default) = &self.default_model {
            if let Some(at) = models.iter().position(|m| m == default) {
                let default = models.remove(at);
                models.insert(0, default);
            }
        }
        models
    }

    /// Picks the model a request is for among those reported; the Info returned is a loaded
    /// replica's when one is loaded. With exactly one model served every name resolves to it
    /// (clients send OpenAI model names); otherwise an alias is followed, and a name that is
    /// neither served nor an alias of a served model is `model_not_found`.
    pub fn resolve(
        &self,
        known: &[Arc<InfoResponse>],
        requested: Option<&str>,
    ) -> Result<Arc<InfoResponse>, ApiError> {
        let models = self.models(known);
        let Some(first) = models.first() else {
            return Err(ApiError::Unavailable(
                "no worker has reported its model yet; retry shortly".to_string(),
            ));
        };
        let model = match requested {
            _ if models.len() == 1 => first.as_str(),
            None => match &self.default_model {
                Some(default) if !models.contains(default) => {
                    return Err(ApiError::Unavailable(format!(
                        "no worker serves the default model '{default}' now; retry shortly"
                    )))
                }
                _ => first.as_str(),
            },
            Some(name) => {
                let target = self.aliases.get(name).map_or(name, String::as_str);
                if !models.iter().any(|m| m == target) {
                    return Err(ApiError::ModelNotFound {
                        requested: name.to_string(),
                        available: models,
                    });
                }
                target
            }
        };
        let mut replicas = known.iter().filter(|info| info.model_id == model);
        let first_replica = replicas.clone().next();
        replicas
            .find(|info| info.loaded)
            .or(first_replica)
            .cloned()
            .ok_or_else(|| ApiError::Internal(format!("model '{model}' vanished while routing")))
    }
}

/// [`ModelRouting::resolve`] without aliases or a configured default: the first reported
/// model is the default.
pub fn resolve_model(
    known: &[Arc<InfoResponse>],
    requested: Option<&str>,
) -> Result<Arc<InfoResponse>, ApiError> {
    ModelRouting::default().resolve(known, requested)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(model_id: &str, loaded: bool) -> Arc<InfoResponse> {
        Arc::new(InfoResponse {
            model_id: model_id.to_string(),
            loaded,
            ..Default::default()
        })
    }

    fn resolved(
        routing: &ModelRouting,
        known: &[Arc<InfoResponse>],
        requested: Option<&str>,
    ) -> Result<String, String> {
        routing
            .resolve(known, requested)
            .map(|info| info.model_id.clone())
            .map_err(|error| error.to_string())
    }

    fn routing(aliases: &[(&str, &str)], default_model: Option<&str>) -> ModelRouting {
        ModelRouting {
            aliases: aliases
                .iter()
                .map(|(a, m)| (a.to_string(), m.to_string()))
                .collect(),
            default_model: default_model.map(str::to_string),
        }
    }

    #[test]
    fn replicas_of_one_model_count_as_one_model() {
        let known = [info("sd", true), info("sd", true)];
        let plain = ModelRouting::default();
        assert_eq!(
            resolved(&plain, &known, Some("gpt-image-1")),
            Ok("sd".into())
        );
        assert_eq!(resolved(&plain, &known, None), Ok("sd".into()));
        // An alias to something else does not matter when only one model is served.
        let aliased = routing(&[("dall-e-3", "other")], None);
        assert_eq!(
            resolved(&aliased, &known, Some("dall-e-3")),
            Ok("sd".into())
        );
    }

    #[test]
    fn several_models_need_a_known_name_or_alias() {
        let known = [info("a", true), info("b", true), info("a", true)];
        let routing = routing(&[("dall-e-3", "b"), ("dall-e-2", "missing")], None);
        assert_eq!(resolved(&routing, &known, None), Ok("a".into()));
        assert_eq!(resolved(&routing, &known, Some("b")), Ok("b".into()));
        assert_eq!(resolved(&routing, &known, Some("dall-e-3")), Ok("b".into()));
        let error = resolved(&routing, &known, Some("c")).expect_err("unknown model");
        assert!(error.ends_with("available models: a, b"), "{error}");
        // An alias of a model nobody serves is as unknown as any other name.
        let error = resolved(&routing, &known, Some("dall-e-2")).expect_err("dangling alias");
        assert!(error.starts_with("model 'dall-e-2' not found"), "{error}");
    }

    #[test]
    fn a_configured_default_model_comes_first() {
        let known = [info("a", true), info("b", true)];
        let routing = routing(&[], Some("b"));
        assert_eq!(resolved(&routing, &known, None), Ok("b".into()));
        assert_eq!(routing.models(&known), vec!["b", "a"]);
        // Configured but not served (yet): 503, not someone else's model.
        let only_a = [info("a", true), info("c", true)];
        assert!(matches!(
            routing.resolve(&only_a, None),
            Err(ApiError::Unavailable(_))
        ));
    }

    #[test]
    fn a_loaded_replica_is_preferred() {
        let known = [info("a", false), info("a", true)];
        let chosen = resolve_model(&known, None).expect("resolves");
        assert!(chosen.loaded);
    }

    #[test]
    fn nothing_known_is_unavailable() {
        assert!(matches!(
            resolve_model(&[], None),
            Err(ApiError::Unavailable(_))
        ));
    }
}
