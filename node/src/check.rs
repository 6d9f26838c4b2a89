//! `medfed node check`: everything a node needs, checked in the order a hospital's IT
//! engineer would fix it (config, certificates, data, keys, the aggregator), each finding
//! with what to do about it.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use medfed_infra::config::ConfigError;
use medfed_infra::files::Presence;
use medfed_infra::store::Store;

pub(crate) mod certs;
mod sample;

use certs::{check_aggregator, check_certificates};

use crate::config::NodeConfig;
use crate::data::Table;
use crate::deid::FieldClass;
use crate::deid::pseudonym::Keystore;

/// One check's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    /// What was checked, in one word (e.g. `"certificate"`, `"aggregator"`, `"keystore"`).
    pub check: &'static str,
    /// Whether it passed (a warning passes).
    pub ok: bool,
    /// What was found, in words.
    pub detail: String,
    /// What to do, for a failed check.
    pub fix: Option<String>,
}

impl Finding {
    fn ok(check: &'static str, detail: String) -> Finding {
        Finding {
            check,
            ok: true,
            detail,
            fix: None,
        }
    }

    /// Works, but the operator should look: shown with its fix, not counted as a failure.
    fn warn(check: &'static str, detail: String, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            ok: true,
            detail: format!("WARNING: {detail}"),
            fix: Some(fix.into()),
        }
    }

    fn fail(check: &'static str, detail: String, fix: impl Into<String>) -> Finding {
        Finding {
            check,
            ok: false,
            detail,
            fix: Some(fix.into()),
        }
    }
}

const GET_CERTIFICATE: &str = "ask the consortium's operator for this site's certificate \
    (they run `medfed pki issue --dir pki --site <site>`), and copy ca.pem, cert.pem and \
    key.pem from pki/sites/<site>/ to the paths in [tls]";

/// Runs every check; stops early only when the config cannot be read.
pub async fn run(config_path: &Path, within: Duration) -> Vec<Finding> {
    let cfg = match NodeConfig::load(config_path) {
        Ok(c) => c,
        Err(e) => return vec![config_finding(e)],
    };
    let mut out = vec![Finding::ok(
        "config",
        format!("{} (site '{}')", config_path.display(), cfg.site),
    )];
    // Before anything below opens (and so creates) part of the state.
    let files = check_files(&cfg);
    let files_ok = files.iter().all(|f| f.ok);
    let certs_ok = match check_certificates(&cfg) {
        Ok(detail) => {
            out.push(Finding::ok("certificate", detail));
            true
        }
        Err(f) => {
            out.push(f);
            false
        }
    };
    let mut data_ok = true;
    // Opened once for the datasets that read an ingestion pipeline's records, and handed to
    // the aggregator check.
    let mut store = None;
    for d in &cfg.datasets {
        if let Some(stream) = &d.ingest {
            let finding = check_ingested(&cfg, &d.name, stream, &mut store);
            data_ok &= finding.ok;
            out.push(finding);
            if let Some(pipeline) = cfg.ingests.iter().find(|g| &g.stream == stream) {
                let never: Vec<String> = pipeline
                    .fields
                    .iter()
                    .filter(|f| !crate::columns::usable(f.class))
                    .map(|f| format!("'{}'", f.name))
                    .chain(std::iter::once(format!("'{}'", crate::deid::PATIENT)))
                    .collect();
                out.push(Finding::ok(
                    "columns",
                    format!(
                        "dataset '{}': never used by a study or query: {} (the pipeline's \
                         identifier, date and ZIP fields, and the pseudonym)",
                        d.name,
                        never.join(", ")
                    ),
                ));
            }
            continue;
        }
        if let Some(problem) = sample::check_csv_dataset(&d.name, &d.path) {
            data_ok = false;
            out.push(problem);
            continue;
        }
        match Table::load(&d.path) {
            Ok(t) => {
                out.push(Finding::ok(
                    "data",
                    format!(
                        "dataset '{}': {} rows, {} columns ({})",
                        d.name,
                        t.len(),
                        t.columns.len(),
                        d.path.display()
                    ),
                ));
                let classes = crate::columns::ColumnClasses::for_table(&t, &d.classes);
                out.push(columns_finding(&d.name, &classes));
                for (column, looks) in crate::columns::value_warnings(&t, &d.classes) {
                    out.push(Finding::fail(
                        "columns",
                        format!(
                            "dataset '{}': column '{column}' is not classed, and its values look \
                             like {looks}: a study or query may read it if the rules list it",
                            d.name
                        ),
                        format!(
                            "class it in the dataset's [dataset.classes]: {column} = \"identifier\" \
                             (or \"date\", \"patient-id\"; \"value\" if it is clinical after all)"
                        ),
                    ));
                }
            }
            Err(e) => {
                data_ok = false;
                out.push(Finding::fail(
                    "data",
                    format!("dataset '{}': {e}", d.name),
                    "make the file readable by the node's user, as CSV with a header row, or fix [[dataset]] path",
                ));
            }
        }
    }
    for pipeline in &cfg.ingests {
        let findings = sample::check_pipeline(pipeline);
        data_ok &= findings.iter().all(|f| f.ok);
        out.extend(findings);
    }
    out.extend(privacy_findings(&cfg));
    let needs_keys = cfg
        .ingests
        .iter()
        .any(|i| i.fields.iter().any(|f| f.class == FieldClass::PatientId));
    if needs_keys {
        match Keystore::open(&cfg.state.keystore) {
            Ok(ks) => out.push(Finding::ok(
                "keystore",
                format!(
                    "pseudonym key version {} ({})",
                    ks.current_version(),
                    cfg.state.keystore.display()
                ),
            )),
            Err(e) => {
                use crate::deid::pseudonym::KeystoreError;
                let fix = match &e {
                    KeystoreError::Missing { .. } => "restore the keystore from the node's backup; if this site never had one, run `medfed node init` in a new directory and move its keystore to [state] keystore".to_string(),
                    KeystoreError::Private(p) => match p.fix() {
                        Some(cmd) => format!("run `{cmd}` as the node's user"),
                        None => "make the keystore readable by the node's user only".into(),
                    },
                    KeystoreError::Io { .. } => "make the keystore and its directory readable by the node's user".into(),
                    _ => "restore the keystore from the node's backup (a new key would give every patient new pseudonyms)".into(),
                };
                out.push(Finding::fail("keystore", e.to_string(), fix));
            }
        }
    }
    out.extend(files);
    if !(certs_ok && data_ok && files_ok) {
        out.push(Finding::fail(
            "aggregator",
            "not tried: fix the problems above first".into(),
            "rerun `medfed node check` once they are fixed",
        ));
        return out;
    }
    out.push(check_aggregator(cfg, store, within).await);
    out
}

/// Each path of the node's state that exists: this user's alone, or who else can open it
/// and the command that fixes it; the node refuses to start until then.
fn check_files(cfg: &NodeConfig) -> Vec<Finding> {
    let mut out = Vec::new();
    let mut missing = Vec::new();
    for p in crate::at_rest::private_paths(cfg) {
        match medfed_infra::files::check_one(&p) {
            Ok(Presence::Private) => out.push(Finding::ok(
                "files",
                format!("{} {}: this user's only", p.what, p.path.display()),
            )),
            Ok(Presence::Missing) => missing.push(p.path.display().to_string()),
            Err(e) => {
                let fix = match e.fix() {
                    Some(cmd) => format!(
                        "run `{cmd}` as the node's user: the node refuses to start while other users can open its state"
                    ),
                    None => "make the path and its directory readable by the node's user".into(),
                };
                out.push(Finding::fail("files", e.problem(), fix));
            }
        }
    }
    if !missing.is_empty() {
        out.push(Finding::ok(
            "files",
            format!(
                "not made yet (the node makes them this user's only): {}",
                missing.join(", ")
            ),
        ));
    }
    out
}

/// A dataset that reads the records an `[[ingest]]` pipeline kept in the node's store.
fn check_ingested(
    cfg: &NodeConfig,
    name: &str,
    stream: &str,
    store: &mut Option<Arc<dyn Store>>,
) -> Finding {
    let Some(pipeline) = cfg.ingests.iter().find(|g| g.stream == stream) else {
        return Finding::fail(
            "data",
            format!("dataset '{name}': no [[ingest]] pipeline '{stream}'"),
            "set [[dataset]] ingest to the stream of one of the [[ingest]] pipelines",
        );
    };
    if store.is_none() {
        match crate::ingest::open_store(&cfg.state) {
            Ok(s) => *store = Some(s),
            Err(e) => {
                return Finding::fail(
                    "data",
                    format!(
                        "dataset '{name}': cannot open the node's store in {}: {e}",
                        cfg.state.dir.display()
                    ),
                    "stop `medfed node run` while checking (it holds the store), or fix [state] dir",
                );
            }
        }
    }
    let Some(open) = store.as_ref() else {
        return Finding::fail(
            "data",
            format!("dataset '{name}': no store"),
            "fix [state] dir",
        );
    };
    // Every record is decoded (a broken segment is found here, not by a study), one
    // segment at a time; only the count and the field names are kept.
    let (mut records, mut columns) = (0usize, std::collections::BTreeSet::new());
    let read = crate::ingest::for_each_kept_record(pipeline, &**open, &mut |r| {
        records += 1;
        for name in r.names() {
            if !columns.contains(name) {
                columns.insert(name.to_string());
            }
        }
    });
    match read.map(|()| (records, columns.len())) {
        Ok((0, _)) => Finding::fail(
            "data",
            format!("dataset '{name}': pipeline '{stream}' has kept no records yet"),
            "run `medfed node ingest --config <this file>` (`medfed node run` ingests too), then see `medfed node status` for what was quarantined",
        ),
        Ok((records, columns)) => Finding::ok(
            "data",
            format!(
                "dataset '{name}': {records} de-identified records, {columns} columns (pipeline '{stream}')"
            ),
        ),
        Err(e) => Finding::fail(
            "data",
            format!("dataset '{name}': {e}"),
            "run `medfed node ingest` again; if it fails the same way, restore [state] dir from the node's backup",
        ),
    }
}

/// The columns of a dataset no study or query may use, and why.
fn columns_finding(dataset: &str, classes: &crate::columns::ColumnClasses) -> Finding {
    let never: Vec<String> = classes
        .unusable()
        .into_iter()
        .map(|(c, why)| format!("'{c}' ({why})"))
        .collect();
    Finding::ok(
        "columns",
        if never.is_empty() {
            format!("dataset '{dataset}': no column looks like an identifier or a date")
        } else {
            format!(
                "dataset '{dataset}': never used by a study or query: {}; class one \"value\" in \
                 [dataset.classes] if it is not what it looks like",
                never.join(", ")
            )
        },
    )
}

/// How each dataset's releases are protected (loudly, where a dataset opts in to exact
/// releases), and whether the rules can approve anything.
fn privacy_findings(cfg: &NodeConfig) -> Vec<Finding> {
    let p = &cfg.policy.privacy;
    let mut out: Vec<Finding> = cfg
        .datasets
        .iter()
        .map(|d| {
            if d.exact_releases.is_empty() {
                Finding::ok(
                    "privacy",
                    format!(
                        "dataset '{}': every release differentially private, charged to the \
                         budget (ε {} per study, {} in all, δ = {:e})",
                        d.name, p.epsilon, p.total_epsilon, p.delta
                    ),
                )
            } else {
                Finding::ok(
                    "privacy",
                    format!(
                        "WARNING: dataset '{}' may be released WITHOUT differential privacy: {} \
                         (exact_releases); the compliance log and audit report record each",
                        d.name,
                        d.exact_releases
                            .iter()
                            .map(|r| r.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                )
            }
        })
        .collect();
    if let Some(rules) = &cfg.policy.rules
        && rules.columns.is_none()
    {
        out.push(Finding::fail(
            "policy",
            "[policy.rules] names no columns, so the rules approve nothing".into(),
            "list the columns studies and queries may read: columns = [\"glu\", \"bmi\", ...] \
             (identifiers, dates and ZIP codes are refused even if listed)",
        ));
    }
    out
}

fn config_finding(e: ConfigError) -> Finding {
    match &e {
        ConfigError::Invalid { key, .. } if key == "tls.crl" => Finding::fail(
            "certificate",
            e.to_string(),
            "copy crl.pem, as the consortium's operator sent it, to the path in tls.crl (relative paths are relative to the config file)",
        ),
        ConfigError::Invalid { key, .. } if key.starts_with("tls.") => {
            Finding::fail("certificate", e.to_string(), GET_CERTIFICATE)
        }
        ConfigError::Invalid { key, .. }
            if key.starts_with("dataset") && key.ends_with(".path") =>
        {
            Finding::fail(
                "data",
                e.to_string(),
                "point [[dataset]] path at the site's CSV extract (relative paths are relative to the config file)",
            )
        }
        ConfigError::Read { .. } => Finding::fail(
            "config",
            e.to_string(),
            "give --config the node's config file (`medfed node init` writes one)",
        ),
        _ => Finding::fail(
            "config",
            e.to_string(),
            "fix the key named above; docs/samples/node.toml lists every key with its default",
        ),
    }
}
