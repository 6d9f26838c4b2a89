//! The OMOP CDM v5.4 connector: reads a hospital's research database on PostgreSQL (the
//! common data model of OHDSI and EHDEN networks) without an export step.
//!
//! Each row of `person` becomes one record: the CSV row of the configured columns, so the
//! same cleaning and de-identification tasks serve CSV, FHIR and OMOP inputs. A column is
//! filled from
//! - `person`: one of its fields (e.g. `person_source_value`, `year_of_birth`);
//! - `observation_period`: the person's first start or last end date;
//! - `measurement` or `observation`: the latest `value_as_number` (by date, then id) of the
//!   column's concept; rows without a number are skipped;
//! - `condition_occurrence` or `drug_exposure`: whether the person has a row of the concept
//!   (`present` / `absent`, "Yes" / "No" by default).
//!
//! A concept is named by its id or by vocabulary and code (resolved through the `concept`
//! table: `LOINC` `2345-7` is glucose), optionally with its descendants (`concept_ancestor`:
//! every clinical drug of an ingredient).
//!
//! **Incremental by the table key.** A person's offset is its `person_id`; persons are read in
//! key order, a page at a time, each page with its rows of the other tables in one
//! read-only REPEATABLE READ transaction (a consistent snapshot). The node's checkpoint holds
//! the key to resume from, atomically with the state: a run killed at any moment resumes
//! after the last checkpointed person, and every person lands in the state exactly once. A
//! later run (or `follow_secs`) reads persons added since, with higher keys; persons added
//! with a key below the checkpoint are not read, and a run that finds some says so.

use std::collections::HashMap;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::config::Host;

use super::Envelope;

/// `[ingest.omop]`: where the OMOP CDM database is and which of its facts become columns.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OmopConfig {
    /// The database, as a libpq connection string (`host=db.example port=5432 dbname=cdm
    /// user=medfed_reader`) or URL (`postgresql://medfed_reader@db.example/cdm`), without a
    /// password. A Unix socket directory as `host` connects locally.
    pub connect: String,
    /// A file holding the database user's password (mode 0600), if it needs one.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// The CA certificate (PEM) the database server's certificate must chain to: the
    /// connection then uses TLS and verifies the server's name. Required unless every host
    /// is a Unix socket or loopback: patient data never crosses a network in clear.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The schema holding the CDM tables (default `public`).
    #[serde(default = "default_schema")]
    pub schema: String,
    /// The schema holding `concept` and `concept_ancestor` (default: `schema`).
    #[serde(default)]
    pub vocabulary_schema: Option<String>,
    /// Persons per page (default 1,000).
    #[serde(default = "default_page")]
    pub page: u32,
    /// Keep reading persons added later, looking every this many seconds; absent: stop
    /// once every person is read.
    #[serde(default)]
    pub follow_secs: Option<u64>,
    /// The record's columns, in order (`[[ingest.omop.column]]`).
    #[serde(rename = "column")]
    pub columns: Vec<OmopColumn>,
}

fn default_schema() -> String {
    "public".into()
}
fn default_page() -> u32 {
    1000
}

/// An OMOP CDM table a column is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OmopTable {
    /// `person`: one of its fields.
    Person,
    /// `observation_period`: the first start or the last end date.
    ObservationPeriod,
    /// `measurement`: the latest `value_as_number` of a concept.
    Measurement,
    /// `observation`: the latest `value_as_number` of a concept.
    Observation,
    /// `condition_occurrence`: whether the person has the condition.
    ConditionOccurrence,
    /// `drug_exposure`: whether the person was exposed to the drug.
    DrugExposure,
}

impl OmopTable {
    fn name(self) -> &'static str {
        match self {
            OmopTable::Person => "person",
            OmopTable::ObservationPeriod => "observation_period",
            OmopTable::Measurement => "measurement",
            OmopTable::Observation => "observation",
            OmopTable::ConditionOccurrence => "condition_occurrence",
            OmopTable::DrugExposure => "drug_exposure",
        }
    }

    /// The table's concept column, its date column and its key, for the concept tables.
    fn concept_columns(self) -> Option<(&'static str, &'static str, &'static str)> {
        match self {
            OmopTable::Measurement => Some((
                "measurement_concept_id",
                "measurement_date",
                "measurement_id",
            )),
            OmopTable::Observation => Some((
                "observation_concept_id",
                "observation_date",
                "observation_id",
            )),
            OmopTable::ConditionOccurrence => Some((
                "condition_concept_id",
                "condition_start_date",
                "condition_occurrence_id",
            )),
            OmopTable::DrugExposure => Some((
                "drug_concept_id",
                "drug_exposure_start_date",
                "drug_exposure_id",
            )),
            OmopTable::Person | OmopTable::ObservationPeriod => None,
        }
    }

    fn is_presence(self) -> bool {
        matches!(
            self,
            OmopTable::ConditionOccurrence | OmopTable::DrugExposure
        )
    }
}

/// The `person` fields a column can take (OMOP CDM v5.4).
pub const PERSON_FIELDS: &[&str] = &[
    "person_id",
    "person_source_value",
    "gender_concept_id",
    "gender_source_value",
    "year_of_birth",
    "month_of_birth",
    "day_of_birth",
    "birth_datetime",
    "race_concept_id",
    "race_source_value",
    "ethnicity_concept_id",
    "ethnicity_source_value",
    "location_id",
    "provider_id",
    "care_site_id",
];

/// The `observation_period` fields a column can take: the person's first start, last end.
pub const OBSERVATION_PERIOD_FIELDS: &[&str] = &[
    "observation_period_start_date",
    "observation_period_end_date",
];

/// One column of the records (`[[ingest.omop.column]]`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OmopColumn {
    /// The column's name (a `[[ingest.field]]` declares its class).
    pub name: String,
    /// The table it is read from.
    pub table: OmopTable,
    /// For `person` and `observation_period`: which field.
    #[serde(default)]
    pub field: Option<String>,
    /// The concept, by id ...
    #[serde(default)]
    pub concept_id: Option<i64>,
    /// ... or by vocabulary (`LOINC`, `SNOMED`, `RxNorm`) ...
    #[serde(default)]
    pub vocabulary: Option<String>,
    /// ... and code (`2345-7`), looked up in the `concept` table.
    #[serde(default)]
    pub code: Option<String>,
    /// Also the concept's descendants (`concept_ancestor`).
    #[serde(default)]
    pub descendants: bool,
    /// For conditions and drugs: the value when the person has one (default "Yes") ...
    #[serde(default)]
    pub present: Option<String>,
    /// ... and when not (default "No").
    #[serde(default)]
    pub absent: Option<String>,
}

/// Why the OMOP source could not be set up or read.
#[derive(Debug, thiserror::Error)]
#[error("OMOP source ({target}): {step}: {detail}")]
pub struct OmopError {
    /// The database (hosts, port and database name; never a password).
    pub target: String,
    /// What was being done (`connect`, `read persons from cdm.person`, ...).
    pub step: String,
    /// What went wrong.
    pub detail: String,
    /// The connection failed, not the query: trying again later may work. A following
    /// source reconnects; anything else (a missing table or grant, a bad value) stops it.
    pub transient: bool,
}

fn identifier(what: &str, s: &str) -> Result<(), String> {
    let ok = s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "omop {what} '{s}' is not a plain SQL name (letters, digits, _)"
        ))
    }
}

fn is_loopback(host: &str) -> bool {
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl OmopConfig {
    /// Checks the declaration without connecting; the message names what is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let pg = tokio_postgres::Config::from_str(&self.connect).map_err(|e| {
            format!("omop connect is not a PostgreSQL connection string or URL: {e}")
        })?;
        if pg.get_password().is_some() {
            return Err(
                "omop connect holds a password: put it in a file named by password_file (mode 0600), not in the configuration"
                    .into(),
            );
        }
        if pg.get_hosts().is_empty() {
            return Err("omop connect names no host (host=... or a URL's host)".into());
        }
        if self.ca.is_some()
            && pg.get_hostaddrs().is_empty()
            && pg.get_hosts().iter().any(|h| matches!(h, Host::Unix(_)))
        {
            return Err(
                "omop sets ca but connects through a Unix socket, where PostgreSQL has no TLS: remove ca (a local socket does not cross the network), or connect to the server's host name"
                    .into(),
            );
        }
        if self.ca.is_none() {
            let remote = pg
                .get_hosts()
                .iter()
                .filter_map(|h| match h {
                    Host::Tcp(h) => Some(h.as_str()),
                    Host::Unix(_) => None,
                })
                .find(|h| !is_loopback(h))
                .map(str::to_string)
                // `hostaddr` is where the client connects, whatever `host` says.
                .or_else(|| {
                    pg.get_hostaddrs()
                        .iter()
                        .find(|a| !a.is_loopback())
                        .map(|a| a.to_string())
                });
            if let Some(h) = remote {
                return Err(format!(
                    "omop connects to {h} over the network without TLS: set ca to the CA certificate (PEM) of the database server, or connect through a Unix socket or loopback"
                ));
            }
        }
        identifier("schema", &self.schema)?;
        if let Some(v) = &self.vocabulary_schema {
            identifier("vocabulary_schema", v)?;
        }
        if self.page == 0 || self.page > 100_000 {
            return Err(format!(
                "omop page is {}; it must be 1 to 100000 persons",
                self.page
            ));
        }
        if self.follow_secs == Some(0) {
            return Err("omop follow_secs must be at least 1".into());
        }
        if self.columns.is_empty() {
            return Err("omop needs at least one [[ingest.omop.column]]".into());
        }
        let mut seen = std::collections::BTreeSet::new();
        for c in &self.columns {
            let name = &c.name;
            if name.is_empty() || !seen.insert(name) {
                return Err(format!("omop column {name:?} is empty or declared twice"));
            }
            let concept = c.concept_id.is_some() || c.vocabulary.is_some() || c.code.is_some();
            let fields = match c.table {
                OmopTable::Person => Some(PERSON_FIELDS),
                OmopTable::ObservationPeriod => Some(OBSERVATION_PERIOD_FIELDS),
                _ => None,
            };
            if let Some(fields) = fields {
                let table = c.table.name();
                match &c.field {
                    Some(f) if fields.contains(&f.as_str()) => {}
                    Some(f) => {
                        return Err(format!(
                            "omop column '{name}': {table} has no field '{f}' medfed reads (one of: {})",
                            fields.join(", ")
                        ));
                    }
                    None => {
                        return Err(format!(
                            "omop column '{name}': a {table} column needs field = one of: {}",
                            fields.join(", ")
                        ));
                    }
                }
                if concept || c.descendants {
                    return Err(format!(
                        "omop column '{name}': a {table} column takes a field, not a concept"
                    ));
                }
            } else {
                if c.field.is_some() {
                    return Err(format!(
                        "omop column '{name}': a {} column takes a concept, not a field",
                        c.table.name()
                    ));
                }
                match (&c.concept_id, &c.vocabulary, &c.code) {
                    (Some(_), None, None) | (None, Some(_), Some(_)) => {}
                    _ => {
                        return Err(format!(
                            "omop column '{name}': name its concept by concept_id, or by vocabulary and code (not both)"
                        ));
                    }
                }
            }
            if (c.present.is_some() || c.absent.is_some()) && !c.table.is_presence() {
                return Err(format!(
                    "omop column '{name}': present and absent are for condition_occurrence and drug_exposure columns"
                ));
            }
        }
        Ok(())
    }

    /// The records' header: the columns' names, in order.
    pub fn header(&self) -> Vec<String> {
        self.columns.iter().map(|c| c.name.clone()).collect()
    }

    /// The database named for people: hosts, port and database, never the password.
    fn target(&self) -> String {
        match tokio_postgres::Config::from_str(&self.connect) {
            Ok(pg) => {
                let hosts: Vec<String> = pg
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        Host::Tcp(h) => h.clone(),
                        Host::Unix(p) => p.display().to_string(),
                    })
                    .collect();
                let hosts: Vec<String> = if pg.get_hostaddrs().is_empty() {
                    hosts
                } else {
                    // Where the client connects.
                    pg.get_hostaddrs().iter().map(|a| a.to_string()).collect()
                };
                let port = pg.get_ports().first().copied().unwrap_or(5432);
                format!(
                    "{}:{port}/{}",
                    hosts.join(","),
                    pg.get_dbname().or(pg.get_user()).unwrap_or("?")
                )
            }
            Err(_) => "an invalid connection string".into(),
        }
    }
}

/// The concept ids each concept column stands for, resolved at start.
#[derive(Debug, PartialEq)]
struct Resolved {
    /// Per column, in column order: the concept ids (empty for person and period columns).
    concepts: Vec<Vec<i64>>,
}

/// A connection and what the queries need.
struct Source {
    cfg: OmopConfig,
    client: tokio_postgres::Client,
    resolved: Resolved,
}

fn pg_detail(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.to_string();
    }
    let mut s = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// Runs a connection's I/O on the runtime until it ends (its client sees the end).
fn drive(
    conn: impl std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!("OMOP database connection ended: {}", pg_detail(&e));
        }
    });
}

/// Whether an error is the connection's (closed, refused, reset, the server shutting down
/// or out of resources), which a following source waits out, rather than the query's.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08")
            || c.starts_with("53")
            || c.starts_with("57P")
            || c.starts_with("58")
            || c == "40001"
            || c == "40P01";
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// The OMOP domain whose rows a concept table holds.
fn domain(t: OmopTable) -> Option<&'static str> {
    match t {
        OmopTable::Measurement => Some("Measurement"),
        OmopTable::Observation => Some("Observation"),
        OmopTable::ConditionOccurrence => Some("Condition"),
        OmopTable::DrugExposure => Some("Drug"),
        OmopTable::Person | OmopTable::ObservationPeriod => None,
    }
}

/// A row's value, or an error naming the table, the column and the person.
fn value<'a, T: tokio_postgres::types::FromSql<'a>>(
    row: &'a tokio_postgres::Row,
    i: usize,
    what: impl FnOnce() -> String,
) -> Result<T, String> {
    row.try_get(i)
        .map_err(|e| format!("{}: {}", what(), pg_detail(&e)))
}

impl Source {
    fn fail(&self, step: impl Into<String>, detail: String) -> OmopError {
        OmopError {
            target: self.cfg.target(),
            step: step.into(),
            detail,
            transient: false,
        }
    }

    fn pg_fail(&self, step: impl Into<String>, e: &tokio_postgres::Error) -> OmopError {
        OmopError {
            transient: is_transient(e),
            ..self.fail(step, pg_detail(e))
        }
    }

    fn table(&self, t: OmopTable) -> String {
        table_name(&self.cfg, t)
    }

    fn vocabulary(&self, table: &str) -> String {
        let s = self
            .cfg
            .vocabulary_schema
            .as_deref()
            .unwrap_or(&self.cfg.schema);
        format!("\"{s}\".{table}")
    }

    async fn connect(cfg: OmopConfig) -> Result<Source, OmopError> {
        let fail = |step: &str, detail: String| OmopError {
            target: cfg.target(),
            step: step.into(),
            detail,
            transient: false,
        };
        let mut pg = tokio_postgres::Config::from_str(&cfg.connect)
            .map_err(|e| fail("read the connection string", e.to_string()))?;
        pg.application_name("medfed-node")
            .connect_timeout(Duration::from_secs(10));
        if let Some(path) = &cfg.password_file {
            medfed_infra::files::check_private(&[medfed_infra::files::PrivatePath::new(
                "the OMOP database's password file",
                path,
            )])
            .map_err(|e| fail("read the password file", e.to_string()))?;
            let password = std::fs::read_to_string(path)
                .map_err(|e| fail("read the password file", format!("{}: {e}", path.display())))?;
            pg.password(password.trim_end_matches(['\n', '\r']));
        }
        let connected = |step: &str, e: tokio_postgres::Error| OmopError {
            transient: is_transient(&e),
            ..fail(step, pg_detail(&e))
        };
        let client = match &cfg.ca {
            Some(ca) => {
                let tls = medfed_infra::transport::tls_client_config(ca)
                    .map_err(|e| fail("read the database's CA certificate", e.to_string()))?;
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, conn) = pg
                    .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                    .await
                    .map_err(|e| connected("connect (TLS)", e))?;
                drive(conn);
                client
            }
            None => {
                let (client, conn) = pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| connected("connect", e))?;
                drive(conn);
                client
            }
        };
        // Read-only, and dates as the pipeline reads them whatever the server's defaults.
        client
            .batch_execute(
                "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; SET DateStyle = ISO; SET TimeZone = 'UTC'",
            )
            .await
            .map_err(|e| connected("set up the session", e))?;
        let mut source = Source {
            cfg,
            client,
            resolved: Resolved {
                concepts: Vec::new(),
            },
        };
        source.resolved = source.resolve().await?;
        Ok(source)
    }

    /// Each concept column's concept ids: by id or by vocabulary and code, with the
    /// descendants where asked. A concept the vocabulary does not hold, one that is not
    /// standard (the CDM's tables hold standard concepts), or one of another domain than
    /// its table's (its rows are in another table) is an error naming it: any of these
    /// would leave the column silently empty.
    async fn resolve(&self) -> Result<Resolved, OmopError> {
        let concept = self.vocabulary("concept");
        let mut concepts = Vec::new();
        for c in &self.cfg.columns {
            let Some(want_domain) = domain(c.table) else {
                concepts.push(Vec::new());
                continue;
            };
            let step = format!("column '{}'", c.name);
            let named = match (&c.concept_id, &c.vocabulary, &c.code) {
                (Some(id), _, _) => format!("concept_id {id}"),
                (None, Some(v), Some(code)) => format!("{v} code {code}"),
                _ => return Err(self.fail(step, "names no concept".into())),
            };
            let rows = match (&c.concept_id, &c.vocabulary, &c.code) {
                (Some(id), _, _) => self
                    .client
                    .query(
                        &format!(
                            "SELECT concept_id::int8, concept_name::text, domain_id::text, standard_concept::text FROM {concept} WHERE concept_id = $1::int8"
                        ),
                        &[id],
                    )
                    .await,
                (None, Some(v), Some(code)) => self
                    .client
                    .query(
                        &format!(
                            "SELECT concept_id::int8, concept_name::text, domain_id::text, standard_concept::text FROM {concept} WHERE vocabulary_id = $1 AND concept_code = $2"
                        ),
                        &[v, code],
                    )
                    .await,
                _ => return Err(self.fail(step, "names no concept".into())),
            }
            .map_err(|e| self.pg_fail(format!("look up {named} in {concept}"), &e))?;
            if rows.is_empty() {
                return Err(self.fail(step, format!("{named} is not in {concept}")));
            }
            let mut ids = Vec::new();
            for r in &rows {
                let read = |e: String| self.fail(format!("read {concept}"), e);
                let id: i64 = value(r, 0, || "concept_id".into()).map_err(read)?;
                let name: Option<String> = value(r, 1, || "concept_name".into()).map_err(read)?;
                let dom: Option<String> = value(r, 2, || "domain_id".into()).map_err(read)?;
                let standard: Option<String> =
                    value(r, 3, || "standard_concept".into()).map_err(read)?;
                let name = name.unwrap_or_default();
                let standard = standard.unwrap_or_default();
                // A classification concept ('C') groups standard ones: with descendants.
                if !(standard == "S" || (standard == "C" && c.descendants)) {
                    return Err(self.fail(
                        step,
                        format!(
                            "{named} is concept {id} ({name}), which is not a standard concept: the CDM's tables hold standard concepts; name the standard concept it maps to (concept_relationship 'Maps to'){}",
                            if standard == "C" {
                                ", or set descendants = true to take the concepts it classifies"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
                let dom = dom.unwrap_or_default();
                if dom != want_domain {
                    let right = [
                        OmopTable::Measurement,
                        OmopTable::Observation,
                        OmopTable::ConditionOccurrence,
                        OmopTable::DrugExposure,
                    ]
                    .into_iter()
                    .find(|t| domain(*t) == Some(dom.as_str()))
                    .map_or(String::new(), |t| {
                        format!(
                            ": its rows are in {}; set table = \"{}\"",
                            t.name(),
                            t.name()
                        )
                    });
                    return Err(self.fail(
                        step,
                        format!(
                            "{named} is concept {id} ({name}) of the domain '{dom}', not '{want_domain}' as the {} table holds{right}",
                            c.table.name()
                        ),
                    ));
                }
                ids.push(id);
            }
            if c.descendants {
                let ancestor = self.vocabulary("concept_ancestor");
                let rows = self
                    .client
                    .query(
                        &format!(
                            "SELECT descendant_concept_id::int8 FROM {ancestor} WHERE ancestor_concept_id = ANY($1::int8[])"
                        ),
                        &[&ids],
                    )
                    .await
                    .map_err(|e| {
                        self.pg_fail(
                            format!("read the descendants of column '{}' in {ancestor}", c.name),
                            &e,
                        )
                    })?;
                for r in &rows {
                    ids.push(
                        value(r, 0, || "descendant_concept_id".into())
                            .map_err(|e| self.fail(format!("read {ancestor}"), e))?,
                    );
                }
                ids.sort_unstable();
                ids.dedup();
            }
            concepts.push(ids);
        }
        Ok(Resolved { concepts })
    }

    /// The persons below key `from`, and the lowest key: a negative key cannot be a
    /// checkpoint's offset.
    async fn count_below(&self, from: i64) -> Result<(i64, Option<i64>), OmopError> {
        let person = self.table(OmopTable::Person);
        let row = self
            .client
            .query_one(
                &format!(
                    "SELECT count(*) FILTER (WHERE person_id < $1::int8)::int8, min(person_id)::int8 FROM {person}"
                ),
                &[&from],
            )
            .await
            .map_err(|e| self.pg_fail(format!("count the persons in {person}"), &e))?;
        let read = |e: String| self.fail(format!("count the persons in {person}"), e);
        let below: i64 = value(&row, 0, || "count".into()).map_err(read)?;
        let min: Option<i64> = value(&row, 1, || "min(person_id)".into()).map_err(read)?;
        if let Some(k) = min.filter(|k| *k < 0) {
            return Err(self.fail(
                format!("read persons from {person}"),
                format!(
                    "person_id {k} is negative: medfed checkpoints by person_id and needs keys of 0 or more"
                ),
            ));
        }
        Ok((below, min))
    }

    /// Warns when more persons are below `from` than the checkpoint holds: persons were
    /// added with keys below it, and are not read. Returns the count, to warn again only
    /// when it grows.
    async fn check_below(
        &self,
        stream: &str,
        from: i64,
        processed: i64,
        warned: i64,
    ) -> Result<i64, OmopError> {
        let (below, _) = self.count_below(from).await?;
        if below > processed && below > warned {
            tracing::warn!(
                stream,
                "OMOP: {below} persons have a person_id below this stream's checkpoint ({from}), but it holds {processed}: {} persons were added with keys below it and are not read (the source reads persons in person_id order, once; docs/omop.md)",
                below - processed
            );
        }
        Ok(below.max(warned))
    }

    /// The mapped columns whose concepts have no row at all in their table.
    async fn empty_columns(&self) -> Result<Vec<String>, OmopError> {
        let mut out = Vec::new();
        for (c, ids) in self.cfg.columns.iter().zip(&self.resolved.concepts) {
            let Some((concept_col, ..)) = c.table.concept_columns() else {
                continue;
            };
            let table = self.table(c.table);
            let row = self
                .client
                .query_one(
                    &format!(
                        "SELECT EXISTS (SELECT 1 FROM {table} WHERE {concept_col} = ANY($1::int8[]))"
                    ),
                    &[ids],
                )
                .await
                .map_err(|e| self.pg_fail(format!("read {table}"), &e))?;
            let any: bool = value(&row, 0, || "exists".into()).map_err(|e| self.fail("read", e))?;
            if !any {
                out.push(format!("'{}' ({})", c.name, c.table.name()));
            }
        }
        Ok(out)
    }

    /// The records of the persons from key `from` on, at most `limit`: each person's key
    /// and CSV row. Read in one read-only snapshot.
    async fn page(&mut self, from: i64, limit: i64) -> Result<Vec<(i64, Vec<u8>)>, OmopError> {
        let width = self.cfg.columns.len();
        let person = self.table(OmopTable::Person);
        let person_fields: Vec<(usize, &str, String)> = self
            .cfg
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.table == OmopTable::Person)
            .filter_map(|(i, c)| {
                c.field.as_deref().map(|f| {
                    let expr = if f == "birth_datetime" {
                        "to_char(birth_datetime, 'YYYY-MM-DD')".to_string()
                    } else {
                        format!("{f}::text")
                    };
                    (i, f, expr)
                })
            })
            .collect();
        let select: String = person_fields
            .iter()
            .map(|(_, _, e)| format!(", {e}"))
            .collect();
        let target = self.cfg.target();
        let fail = |step: String, e: tokio_postgres::Error| OmopError {
            target: target.clone(),
            step,
            detail: pg_detail(&e),
            transient: is_transient(&e),
        };
        let bad = |step: String, detail: String| OmopError {
            target: target.clone(),
            step,
            detail,
            transient: false,
        };
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| fail("start a read-only transaction".into(), e))?;
        let step = format!("read persons from {person} (person_id {from} on)");
        let rows = tx
            .query(
                &format!(
                    "SELECT person_id::int8{select} FROM {person} WHERE person_id >= $1::int8 ORDER BY person_id LIMIT $2::int8"
                ),
                &[&from, &limit],
            )
            .await
            .map_err(|e| fail(step.clone(), e))?;
        let mut keys = Vec::with_capacity(rows.len());
        let mut values: Vec<Vec<Option<String>>> = Vec::with_capacity(rows.len());
        for r in &rows {
            let key: i64 = value(r, 0, || "person_id".into()).map_err(|e| bad(step.clone(), e))?;
            if keys.last() == Some(&key) {
                return Err(bad(
                    step,
                    format!(
                        "person_id {key} is there twice: medfed reads one record per person; add the CDM's primary key on person_id"
                    ),
                ));
            }
            let mut v = vec![None; width];
            for (k, (i, field, _)) in person_fields.iter().enumerate() {
                v[*i] = value(r, k + 1, || format!("person_id {key}, {field}"))
                    .map_err(|e| bad(step.clone(), e))?;
            }
            keys.push(key);
            values.push(v);
        }
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // Every person with a key from the page's first to its last is in the page (the
        // same snapshot, in key order): the other tables are read by that key range.
        let (first, last) = (keys[0], keys[keys.len() - 1]);
        let index: HashMap<i64, usize> = keys.iter().enumerate().map(|(i, k)| (*k, i)).collect();
        // Observation periods.
        let period: Vec<(usize, &str)> = self
            .cfg
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.table == OmopTable::ObservationPeriod)
            .filter_map(|(i, c)| c.field.as_deref().map(|f| (i, f)))
            .collect();
        if !period.is_empty() {
            let table = table_name(&self.cfg, OmopTable::ObservationPeriod);
            let step = format!("read {table} (person_id {first} to {last})");
            let rows = tx
                .query(
                    &format!(
                        "SELECT person_id::int8, to_char(min(observation_period_start_date), 'YYYY-MM-DD'), to_char(max(observation_period_end_date), 'YYYY-MM-DD') FROM {table} WHERE person_id BETWEEN $1::int8 AND $2::int8 GROUP BY person_id"
                    ),
                    &[&first, &last],
                )
                .await
                .map_err(|e| fail(step.clone(), e))?;
            for r in rows {
                let key: i64 =
                    value(&r, 0, || "person_id".into()).map_err(|e| bad(step.clone(), e))?;
                let Some(&p) = index.get(&key) else {
                    continue;
                };
                for (i, f) in &period {
                    let k = if *f == "observation_period_start_date" {
                        1
                    } else {
                        2
                    };
                    values[p][*i] = value(&r, k, || format!("person_id {key}, {f}"))
                        .map_err(|e| bad(step.clone(), e))?;
                }
            }
        }
        // The concept tables: one query per table for all its columns' concepts.
        for table in [
            OmopTable::Measurement,
            OmopTable::Observation,
            OmopTable::ConditionOccurrence,
            OmopTable::DrugExposure,
        ] {
            let Some((concept_col, date_col, key_col)) = table.concept_columns() else {
                continue;
            };
            let mut by_concept: HashMap<i64, Vec<usize>> = HashMap::new();
            for (i, c) in self.cfg.columns.iter().enumerate() {
                if c.table == table {
                    for id in &self.resolved.concepts[i] {
                        by_concept.entry(*id).or_default().push(i);
                    }
                }
            }
            if by_concept.is_empty() {
                continue;
            }
            let concepts: Vec<i64> = by_concept.keys().copied().collect();
            let name = table_name(&self.cfg, table);
            let step = format!("read {name} (person_id {first} to {last})");
            // A row's person (its place in the page) and the columns its concept fills;
            // `None` for a person outside the page or a concept no column maps.
            let locate = |r: &tokio_postgres::Row| -> Result<Option<Placed<'_>>, OmopError> {
                let key: i64 =
                    value(r, 0, || "person_id".into()).map_err(|e| bad(step.clone(), e))?;
                let concept: i64 =
                    value(r, 1, || concept_col.into()).map_err(|e| bad(step.clone(), e))?;
                Ok(match (index.get(&key), by_concept.get(&concept)) {
                    (Some(&p), Some(cols)) => Some((key, p, cols)),
                    _ => None,
                })
            };
            if table.is_presence() {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT DISTINCT person_id::int8, {concept_col}::int8 FROM {name} WHERE person_id BETWEEN $1::int8 AND $2::int8 AND {concept_col} = ANY($3::int8[])"
                        ),
                        &[&first, &last, &concepts],
                    )
                    .await
                    .map_err(|e| fail(step.clone(), e))?;
                for r in rows {
                    let Some((_, p, cols)) = locate(&r)? else {
                        continue;
                    };
                    for &i in cols {
                        let c = &self.cfg.columns[i];
                        values[p][i] = Some(c.present.clone().unwrap_or_else(|| "Yes".into()));
                    }
                }
            } else {
                // In date and key order: the latest value of each concept is the last.
                let rows = tx
                    .query(
                        &format!(
                            "SELECT person_id::int8, {concept_col}::int8, value_as_number::float8 FROM {name} WHERE person_id BETWEEN $1::int8 AND $2::int8 AND {concept_col} = ANY($3::int8[]) AND value_as_number IS NOT NULL ORDER BY person_id, {date_col}, {key_col}"
                        ),
                        &[&first, &last, &concepts],
                    )
                    .await
                    .map_err(|e| fail(step.clone(), e))?;
                for r in rows {
                    let Some((key, p, cols)) = locate(&r)? else {
                        continue;
                    };
                    let v: f64 = value(&r, 2, || format!("person_id {key}, value_as_number"))
                        .map_err(|e| bad(step.clone(), e))?;
                    // NaN or infinity is no value: an earlier finite one stays.
                    if !v.is_finite() {
                        continue;
                    }
                    for &i in cols {
                        values[p][i] = Some(v.to_string());
                    }
                }
            }
        }
        tx.commit()
            .await
            .map_err(|e| fail("end the read-only transaction".into(), e))?;
        // Absent conditions and drugs.
        for v in &mut values {
            for (i, c) in self.cfg.columns.iter().enumerate() {
                if c.table.is_presence() && v[i].is_none() {
                    v[i] = Some(c.absent.clone().unwrap_or_else(|| "No".into()));
                }
            }
        }
        let mut out = Vec::with_capacity(keys.len());
        for (key, v) in keys.into_iter().zip(values) {
            out.push((
                key,
                csv_row(&v).map_err(|e| self.fail("write a record", e))?,
            ));
        }
        Ok(out)
    }
}

/// One CSV row (quoted where a value needs it; a missing value is an empty field), without
/// its line end. A row of one empty field is `""`, so that it is not a blank line.
fn csv_row(values: &[Option<String>]) -> Result<Vec<u8>, String> {
    let mut w = csv::WriterBuilder::new()
        .has_headers(false)
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(Vec::new());
    w.write_record(values.iter().map(|v| v.as_deref().unwrap_or("")))
        .map_err(|e| e.to_string())?;
    let mut row = w.into_inner().map_err(|e| e.to_string())?;
    if row.last() == Some(&b'\n') {
        row.pop();
    }
    if row.is_empty() {
        row.extend_from_slice(b"\"\"");
    }
    Ok(row)
}

/// Runs `f` on a thread of its own with a current-thread runtime (the source's work is
/// independent of the caller's runtime, if any).
fn on_own_runtime<T: Send + 'static>(
    name: String,
    target: String,
    f: impl FnOnce() -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>> + Send + 'static,
) -> Result<std::thread::JoinHandle<Option<T>>, OmopError> {
    let fail = |e: std::io::Error| OmopError {
        target: target.clone(),
        step: "start its thread".into(),
        detail: e.to_string(),
        transient: false,
    };
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => Some(rt.block_on(f())),
                Err(e) => {
                    tracing::error!("the OMOP source cannot start its runtime: {e}");
                    None
                }
            }
        })
        .map_err(fail)
}

/// Connects, resolves and checks the concepts and starts reading persons from key `from`
/// on (a checkpoint's offset), on a thread of its own. Returns the header and the records
/// (each person's offset is its key). `processed` is how many persons the checkpoint holds,
/// to warn of persons added below it. A failure after the start is left in `failure`
/// before the records' channel closes (a panic too): the partition then stops with an
/// error rather than as at the end of its input.
pub async fn read(
    cfg: &OmopConfig,
    stream: &str,
    partition: u32,
    from: u64,
    processed: u64,
    failure: super::SourceFailure,
) -> Result<(Vec<String>, Receiver<Vec<Envelope>>), OmopError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), OmopError>>();
    let (tx, rx) = sync_channel(IN_FLIGHT);
    let target = cfg.target();
    let header = cfg.header();
    let (cfg, stream_name) = (cfg.clone(), Arc::<str>::from(stream));
    // Set unless the source ends as it should (every person read, or the runner gone).
    let guard = EndGuard {
        failure,
        clean: false,
    };
    on_own_runtime(format!("omop-{stream}"), target.clone(), move || {
        Box::pin(async move {
            let mut guard = guard;
            let from = i64::try_from(from).unwrap_or(i64::MAX);
            let processed = i64::try_from(processed).unwrap_or(i64::MAX);
            let started = async {
                let source = Source::connect(cfg).await?;
                let warned = source.check_below(&stream_name, from, processed, 0).await?;
                Ok::<_, OmopError>((source, warned))
            };
            match started.await {
                Ok((source, warned)) => {
                    if ready_tx.send(Ok(())).is_err() {
                        guard.clean = true;
                        return;
                    }
                    let end = pump(
                        source,
                        Position {
                            from,
                            processed,
                            warned,
                        },
                        &stream_name,
                        partition,
                        &tx,
                    )
                    .await;
                    match end {
                        Ok(()) => guard.clean = true,
                        Err(e) => {
                            tracing::error!(
                                "{e}; the records before it are checkpointed, and a new run resumes there"
                            );
                            guard.failure.fail(e.to_string());
                        }
                    }
                    drop(tx);
                }
                Err(e) => {
                    guard.clean = true;
                    if ready_tx.send(Err(e)).is_err() {
                        tracing::debug!("the OMOP source's caller is gone");
                    }
                }
            }
        })
    })?;
    match ready_rx.await {
        Ok(Ok(())) => Ok((header, rx)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OmopError {
            target,
            step: "start".into(),
            detail: "the source's thread ended before connecting (see the log)".into(),
            transient: false,
        }),
    }
}

/// Records a failure when the source's thread ends any other way than cleanly (a panic
/// unwinding through it included), before the records' channel closes.
struct EndGuard {
    failure: super::SourceFailure,
    clean: bool,
}

impl Drop for EndGuard {
    fn drop(&mut self) {
        if !self.clean {
            self.failure.fail(
                "the OMOP source stopped unexpectedly (see the log); the records before it are checkpointed, and a new run resumes there"
                    .into(),
            );
        }
    }
}

/// Connects as the pipeline would, resolves and checks every mapped concept, reads one
/// person with every mapped table, and counts the persons, on a thread of its own
/// (callable from inside or outside a runtime): what `medfed node check` reports. Returns
/// the persons and the columns whose concepts have no rows.
pub fn probe(cfg: &OmopConfig) -> Result<(u64, Vec<String>), OmopError> {
    on_own_connection("omop-check", "check", cfg, |mut source| {
        Box::pin(async move {
            let (n, _) = source.count_below(i64::MAX).await?;
            source.page(0, 1).await?;
            let empty = source.empty_columns().await?;
            Ok((u64::try_from(n).unwrap_or(0), empty))
        })
    })
}

/// How many persons have a key of `from` or more: what a pipeline whose checkpoint is at
/// `from` has still to read (`medfed node status`'s lag). Connects as [`probe`] does.
pub fn remaining(cfg: &OmopConfig, from: u64) -> Result<u64, OmopError> {
    on_own_connection(
        "omop-status",
        "count the persons still to read",
        cfg,
        move |source| {
            Box::pin(async move {
                let person = source.table(OmopTable::Person);
                let from = i64::try_from(from).unwrap_or(i64::MAX);
                let row = source
                    .client
                    .query_one(
                        &format!("SELECT count(*)::int8 FROM {person} WHERE person_id >= $1::int8"),
                        &[&from],
                    )
                    .await
                    .map_err(|e| source.pg_fail(format!("count the persons in {person}"), &e))?;
                let n: i64 = value(&row, 0, || "count".into())
                    .map_err(|e| source.fail(format!("count the persons in {person}"), e))?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
        },
    )
}

/// Connects as the pipeline would and runs `f` on the connection, on a thread of its own
/// with its own runtime, waiting for it; `step` names what failed if the thread does.
fn on_own_connection<T: Send + 'static>(
    thread: &str,
    step: &str,
    cfg: &OmopConfig,
    f: impl FnOnce(Source) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, OmopError>>>>
    + Send
    + 'static,
) -> Result<T, OmopError> {
    let cfg = cfg.clone();
    let target = cfg.target();
    let failed = |detail: &str| OmopError {
        target: target.clone(),
        step: step.into(),
        detail: detail.into(),
        transient: false,
    };
    on_own_runtime(thread.into(), target.clone(), move || {
        Box::pin(async move { f(Source::connect(cfg).await?).await })
    })?
    .join()
    .map_err(|_| failed("its thread panicked"))?
    .ok_or_else(|| failed("its runtime did not start"))?
}

/// Pages queued for the runner.
const IN_FLIGHT: usize = 4;

/// Where a read is: the next key, what the checkpoint held at start, and the count of
/// persons below the key already warned of.
struct Position {
    from: i64,
    processed: i64,
    warned: i64,
}

/// Reads pages from `from` on and hands them to the runner, until every person is read
/// (or, following, forever). A query's failure ends it with an error; a following source
/// waits out a lost connection, reconnects and goes on from the last key handed over.
async fn pump(
    mut source: Source,
    mut at: Position,
    stream: &Arc<str>,
    partition: u32,
    tx: &SyncSender<Vec<Envelope>>,
) -> Result<(), OmopError> {
    let follow = source.cfg.follow_secs.map(Duration::from_secs);
    let mut backoff = Duration::from_secs(1);
    let page = i64::from(source.cfg.page);
    let mut handed = 0i64;
    loop {
        let result = match source.page(at.from, page).await {
            Ok(rows) => Ok(rows),
            Err(e) if e.transient && follow.is_some() => Err(e),
            Err(e) => return Err(e),
        };
        match result {
            Ok(rows) => {
                backoff = Duration::from_secs(1);
                let full = rows.len() as i64 == page;
                if let Some((last, _)) = rows.last() {
                    at.from = last.saturating_add(1);
                }
                handed += rows.len() as i64;
                let mut batch = Vec::with_capacity(rows.len());
                for (key, payload) in rows {
                    let offset = u64::try_from(key).map_err(|_| {
                        source.fail(
                            "read persons",
                            format!(
                                "person_id {key} is negative: medfed checkpoints by person_id and needs keys of 0 or more"
                            ),
                        )
                    })?;
                    batch.push(Envelope {
                        stream: stream.clone(),
                        partition,
                        offset,
                        key: None,
                        payload,
                    });
                }
                if !batch.is_empty() && tx.send(batch).is_err() {
                    return Ok(()); // the runner is gone
                }
                if full {
                    continue;
                }
                let Some(wait) = follow else {
                    return Ok(()); // every person is read
                };
                // Caught up: an empty batch tells the runner so (skipped if it is busy).
                if let Err(TrySendError::Disconnected(_)) = tx.try_send(Vec::new()) {
                    return Ok(());
                }
                tokio::time::sleep(wait).await;
                match source
                    .check_below(
                        stream,
                        at.from,
                        at.processed.saturating_add(handed),
                        at.warned,
                    )
                    .await
                {
                    Ok(w) => at.warned = w,
                    Err(e) if e.transient => {
                        tracing::warn!(stream = %stream, "{e}");
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => {
                // A lost connection while following: no "caught up" is sent (the runner
                // has not been handed everything), and the source reconnects.
                tracing::warn!(stream = %stream, "{e}; trying again in {} s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                if source.client.is_closed() {
                    match Source::connect(source.cfg.clone()).await {
                        Ok(s) => {
                            if s.resolved != source.resolved {
                                tracing::warn!(
                                    stream = %stream,
                                    "OMOP: the mapped concepts resolve to other concept ids since the reconnection (the vocabulary was updated); records from here on use the new ones"
                                );
                            }
                            source = s;
                        }
                        Err(e) if e.transient => tracing::warn!(stream = %stream, "{e}"),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }
}

/// A fact row's person key, the person's place in its page, and the columns its concept
/// fills.
type Placed<'a> = (i64, usize, &'a Vec<usize>);

/// A CDM table's name, in its (checked) schema.
fn table_name(cfg: &OmopConfig, t: OmopTable) -> String {
    format!("\"{}\".{}", cfg.schema, t.name())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn column(name: &str, table: OmopTable) -> OmopColumn {
        OmopColumn {
            name: name.into(),
            table,
            field: None,
            concept_id: None,
            vocabulary: None,
            code: None,
            descendants: false,
            present: None,
            absent: None,
        }
    }

    fn config(connect: &str, columns: Vec<OmopColumn>) -> OmopConfig {
        OmopConfig {
            connect: connect.into(),
            password_file: None,
            ca: None,
            schema: "cdm".into(),
            vocabulary_schema: None,
            page: 1000,
            follow_secs: None,
            columns,
        }
    }

    fn glu() -> OmopColumn {
        OmopColumn {
            concept_id: Some(3_004_501),
            ..column("glu", OmopTable::Measurement)
        }
    }

    #[test]
    fn a_declaration_is_checked_before_connecting_and_errors_name_what_is_wrong() {
        let ok = config("host=/run/postgresql dbname=cdm user=r", vec![glu()]);
        ok.validate().unwrap();
        config("host=127.0.0.1 dbname=cdm", vec![glu()])
            .validate()
            .unwrap();
        let err = |c: OmopConfig| c.validate().unwrap_err();
        assert!(err(config("host=db.example dbname=cdm", vec![glu()])).contains("without TLS"));
        assert!(
            err(config(
                "host=localhost hostaddr=10.1.2.3 dbname=cdm",
                vec![glu()]
            ))
            .contains("10.1.2.3 over the network without TLS")
        );
        assert!(
            err(config(
                "host=/run/postgresql,db.example dbname=cdm",
                vec![glu()]
            ))
            .contains("db.example over the network")
        );
        assert!(
            err(config("postgresql://u:secret@localhost/cdm", vec![glu()]))
                .contains("password_file")
        );
        assert!(err(config("host=localhost", vec![])).contains("at least one"));
        assert!(err(config("not = a = string", vec![glu()])).contains("connection string"));
        let mut bad_schema = ok.clone();
        bad_schema.schema = "cdm; drop table person".into();
        assert!(err(bad_schema).contains("plain SQL name"));
        let both = OmopColumn {
            vocabulary: Some("LOINC".into()),
            code: Some("2345-7".into()),
            ..glu()
        };
        assert!(err(config("host=localhost", vec![both])).contains("not both"));
        let person = OmopColumn {
            field: Some("ssn".into()),
            ..column("id", OmopTable::Person)
        };
        assert!(err(config("host=localhost", vec![person])).contains("no field 'ssn'"));
        let yes = OmopColumn {
            present: Some("1".into()),
            ..glu()
        };
        assert!(err(config("host=localhost", vec![yes])).contains("present and absent"));
        assert!(err(config("host=localhost", vec![glu(), glu()])).contains("declared twice"));
        let mut on_socket = ok.clone();
        on_socket.ca = Some("ca.pem".into());
        assert!(err(on_socket).contains("Unix socket, where PostgreSQL has no TLS"));
        let mut with_ca = config("host=db.example dbname=cdm", vec![glu()]);
        with_ca.ca = Some("ca.pem".into());
        with_ca.validate().unwrap();
    }

    #[test]
    fn rows_quote_what_needs_quoting() {
        assert_eq!(
            csv_row(&[Some("a,b".into()), None, Some("x\"y".into())]).unwrap(),
            b"\"a,b\",,\"x\"\"y\"".to_vec()
        );
        assert_eq!(csv_row(&[None]).unwrap(), b"\"\"".to_vec());
        assert_eq!(
            csv_row(&[Some("148".into()), Some("Yes".into())]).unwrap(),
            b"148,Yes".to_vec()
        );
    }

    #[test]
    fn the_target_never_shows_a_password() {
        let c = config("postgresql://u:secret@db.example:6543/cdm", vec![glu()]);
        assert_eq!(c.target(), "db.example:6543/cdm");
    }
}
