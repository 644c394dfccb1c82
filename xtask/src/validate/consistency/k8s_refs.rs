//! Cross-references between the objects of `k8s/`.
//!
//! `kubectl apply` accepts a Service that selects no pod or points at a port no container
//! has; the result is a Service without endpoints, found only when requests fail. So every
//! reference by label or by name is resolved here: Deployment selectors against their own
//! pod labels, Services, PodDisruptionBudgets and Ingress backends against what they name,
//! HorizontalPodAutoscalers against their target.

use serde_yaml_ng::Value;
use xtask::yaml::{at, scalar, seq_at, str_at};

use super::{find, Object, Problems};

/// Whether `selector` selects pods with `labels`. An empty selector matches nothing here:
/// in Kubernetes it would select every pod, which no manifest of the fleet means.
fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_mapping()
        .is_some_and(|sel| !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// The labels a Deployment gives its pods, which Services, PDBs and its own selector match.
fn pod_labels(deployment: &Object) -> &Value {
    at(&deployment.doc, &["spec", "template", "metadata", "labels"]).unwrap_or(&Value::Null)
}

/// Every reference between the objects of `k8s/` resolves.
pub(super) fn check_k8s_references(objects: &[Object], p: &mut Problems) {
    let deployments: Vec<&Object> = objects.iter().filter(|o| o.kind == "Deployment").collect();
    for d in &deployments {
        let selector = at(&d.doc, &["spec", "selector", "matchLabels"]).unwrap_or(&Value::Null);
        p.check(labels_match(selector, pod_labels(d)), || {
            format!(
                "{}: Deployment {}: selector does not match the pod labels",
                d.file, d.name
            )
        });
    }
    for s in objects.iter().filter(|o| o.kind == "Service") {
        let selector = at(&s.doc, &["spec", "selector"]).unwrap_or(&Value::Null);
        let target = deployments
            .iter()
            .find(|d| labels_match(selector, pod_labels(d)));
        let Some(target) = target else {
            p.add(format!(
                "{}: Service {} selects no Deployment",
                s.file, s.name
            ));
            continue;
        };
        let container_ports: Vec<(Option<String>, Option<String>)> =
            seq_at(&target.doc, &["spec", "template", "spec", "containers"])
                .iter()
                .flat_map(|c| seq_at(c, &["ports"]))
                .map(|port| {
                    (
                        str_at(port, &["name"]).map(str::to_string),
                        port.get("containerPort").and_then(scalar),
                    )
                })
                .collect();
        for port in seq_at(&s.doc, &["spec", "ports"]) {
            if let Some(t) = port.get("targetPort").and_then(scalar) {
                p.check(
                    container_ports
                        .iter()
                        .any(|(n, c)| n.as_deref() == Some(&t) || c.as_deref() == Some(&t)),
                    || {
                        format!(
                            "{}: Service {}: targetPort {t} is no port of Deployment {}",
                            s.file, s.name, target.name
                        )
                    },
                );
            }
        }
    }
    for ing in objects.iter().filter(|o| o.kind == "Ingress") {
        for rule in seq_at(&ing.doc, &["spec", "rules"]) {
            for path in seq_at(rule, &["http", "paths"]) {
                let svc_name = str_at(path, &["backend", "service", "name"]).unwrap_or_default();
                let Some(svc) = find(objects, "Service", svc_name) else {
                    p.add(format!(
                        "{}: Ingress {}: backend Service {svc_name:?} is not in k8s/",
                        ing.file, ing.name
                    ));
                    continue;
                };
                let port = at(path, &["backend", "service", "port"]).unwrap_or(&Value::Null);
                let wanted = port
                    .get("name")
                    .and_then(scalar)
                    .or_else(|| port.get("number").and_then(scalar));
                let found = seq_at(&svc.doc, &["spec", "ports"]).iter().any(|sp| {
                    wanted.is_some()
                        && (sp.get("name").and_then(scalar) == wanted
                            || sp.get("port").and_then(scalar) == wanted)
                });
                p.check(found, || {
                    format!(
                        "{}: Ingress {}: Service {svc_name} has no port {:?}",
                        ing.file, ing.name, wanted
                    )
                });
            }
        }
    }
    for pdb in objects.iter().filter(|o| o.kind == "PodDisruptionBudget") {
        let selector = at(&pdb.doc, &["spec", "selector", "matchLabels"]).unwrap_or(&Value::Null);
        p.check(
            deployments
                .iter()
                .any(|d| labels_match(selector, pod_labels(d))),
            || {
                format!(
                    "{}: PodDisruptionBudget {} selects no Deployment",
                    pdb.file, pdb.name
                )
            },
        );
    }
    for hpa in objects
        .iter()
        .filter(|o| o.kind == "HorizontalPodAutoscaler")
    {
        let kind = str_at(&hpa.doc, &["spec", "scaleTargetRef", "kind"]).unwrap_or_default();
        let name = str_at(&hpa.doc, &["spec", "scaleTargetRef", "name"]).unwrap_or_default();
        p.check(find(objects, kind, name).is_some(), || {
            format!(
                "{}: HorizontalPodAutoscaler {}: no {kind} {name} in k8s/",
                hpa.file, hpa.name
            )
        });
    }
}
