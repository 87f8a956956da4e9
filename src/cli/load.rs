//! Reading YAML (or JSON) files and directories of NSGs, ASGs, ServiceTags, Namespaces and
//! Pods into a model inventory, for the offline commands.

use std::collections::BTreeSet;
use std::fs;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use k8s_openapi::api::core::v1::{Namespace as ApiNamespace, Pod as ApiPod};
use serde::Deserialize;

use crate::api::{
    ApplicationSecurityGroup, NetworkSecurityGroup, ServiceTag, namespace_from_api, pod_from_api,
};
use crate::model::{Inventory, Namespace, ValidationErrors};

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: document {document}: {message}")]
    Parse {
        path: PathBuf,
        document: usize,
        message: String,
    },
    #[error("{path}: {errors}")]
    Invalid {
        path: PathBuf,
        errors: ValidationErrors,
    },
}

/// The objects found, in file order, before conversion.
#[derive(Default)]
pub struct Objects {
    pub nsgs: Vec<(PathBuf, NetworkSecurityGroup)>,
    pub asgs: Vec<(PathBuf, ApplicationSecurityGroup)>,
    pub service_tags: Vec<(PathBuf, ServiceTag)>,
    pub pods: Vec<ApiPod>,
    pub namespaces: Vec<ApiNamespace>,
}

fn yaml_files(path: &Path, out: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let read_err = |source| LoadError::Read {
        path: path.to_path_buf(),
        source,
    };
    if fs::metadata(path).map_err(read_err)?.is_dir() {
        let mut entries: Vec<PathBuf> = fs::read_dir(path)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        entries.sort();
        for entry in entries {
            let is_yaml = entry
                .extension()
                .is_some_and(|e| e == "yaml" || e == "yml" || e == "json");
            if entry.is_dir() || is_yaml {
                yaml_files(&entry, out)?;
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

impl Objects {
    /// Reads every file (directories recursively, `*.yaml`, `*.yml`, `*.json`), every
    /// document, and `List` items. Kinds other than the five are ignored.
    pub fn read(paths: &[PathBuf]) -> Result<Objects, LoadError> {
        let mut files = Vec::new();
        for p in paths {
            yaml_files(p, &mut files)?;
        }
        let mut objects = Objects::default();
        for file in files {
            let text = fs::read_to_string(&file).map_err(|source| LoadError::Read {
                path: file.clone(),
                source,
            })?;
            for (i, doc) in serde_yaml_ng::Deserializer::from_str(&text).enumerate() {
                let parse_err = |message: String| LoadError::Parse {
                    path: file.clone(),
                    document: i + 1,
                    message,
                };
                let value =
                    serde_json::Value::deserialize(doc).map_err(|e| parse_err(e.to_string()))?;
                objects.add(&file, value).map_err(parse_err)?;
            }
        }
        Ok(objects)
    }

    fn add(&mut self, file: &Path, value: serde_json::Value) -> Result<(), String> {
        fn typed<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
            let kind = v["kind"].as_str().unwrap_or_default().to_string();
            let name = v["metadata"]["name"]
                .as_str()
                .unwrap_or("<no name>")
                .to_string();
            serde_json::from_value(v).map_err(|e| format!("{kind} {name}: {e}"))
        }
        let file = file.to_path_buf();
        match value["kind"].as_str() {
            Some("NetworkSecurityGroup") => self.nsgs.push((file, typed(value)?)),
            Some("ApplicationSecurityGroup") => self.asgs.push((file, typed(value)?)),
            Some("ServiceTag") => self.service_tags.push((file, typed(value)?)),
            Some("Pod") => self.pods.push(typed(value)?),
            Some("Namespace") => self.namespaces.push(typed(value)?),
            Some(kind) if kind.ends_with("List") => {
                for item in value["items"].as_array().into_iter().flatten() {
                    self.add(&file, item.clone())?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Converts and validates everything; every invalid object is reported, not just the first.
    pub fn into_inventory(
        self,
        virtual_network: &[IpNet],
        node_ips: &[IpAddr],
    ) -> Result<Inventory, Vec<LoadError>> {
        let mut errors = Vec::new();
        let nsgs = convert_all(&self.nsgs, &mut errors);
        let asgs = convert_all(&self.asgs, &mut errors);
        let service_tags = convert_all(&self.service_tags, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let pods: Vec<_> = self.pods.iter().filter_map(pod_from_api).collect();
        let mut namespaces: Vec<Namespace> =
            self.namespaces.iter().map(namespace_from_api).collect();
        // Namespaces that objects live in but the files do not define.
        let known: BTreeSet<String> = namespaces.iter().map(|n| n.name.clone()).collect();
        let implied: BTreeSet<String> = pods
            .iter()
            .map(|p| p.id.namespace.clone())
            .filter(|n| !known.contains(n))
            .collect();
        namespaces.extend(implied.into_iter().map(Namespace::named));
        Ok(Inventory {
            nsgs,
            asgs,
            service_tags,
            pods,
            namespaces,
            virtual_network: virtual_network.to_vec(),
            node_ips: node_ips.to_vec(),
        })
    }
}

/// Converts each object, collecting the invalid ones' errors.
fn convert_all<A, M>(items: &[(PathBuf, A)], errors: &mut Vec<LoadError>) -> Vec<M>
where
    for<'a> M: TryFrom<&'a A, Error = ValidationErrors>,
{
    items
        .iter()
        .filter_map(|(path, obj)| {
            M::try_from(obj)
                .map_err(|errs| {
                    errors.push(LoadError::Invalid {
                        path: path.clone(),
                        errors: errs,
                    })
                })
                .ok()
        })
        .collect()
}
