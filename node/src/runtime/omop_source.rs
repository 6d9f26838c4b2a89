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
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::sync::{Arc, Mutex};
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

/// A failure the source met after it started, for the pipeline to report once the records
/// before it are checkpointed (the channel alone would end as if the input had).
pub type SourceFailure = Arc<Mutex<Option<String>>>;

/// The concept ids each concept column stands for, resolved at start.
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

/// A CDM table's name, in its (checked) schema.
fn table_name(cfg: &OmopConfig, t: OmopTable) -> String {
    format!("\"{}\".{}", cfg.schema, t.name())
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

impl Source {
    fn fail(&self, step: impl Into<String>, detail: String) -> OmopError {
        OmopError {
            target: self.cfg.target(),
            step: step.into(),
            detail,
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
        };
        let mut pg = tokio_postgres::Config::from_str(&cfg.connect)
            .map_err(|e| fail("read the connection string", e.to_string()))?;
        pg.application_name("medfed-node")
            .connect_timeout(Duration::from_secs(10));
        if let Some(path) = &cfg.password_file {
            let password = std::fs::read_to_string(path)
                .map_err(|e| fail("read the password file", format!("{}: {e}", path.display())))?;
            pg.password(password.trim_end_matches(['\n', '\r']));
        }
        let client = match &cfg.ca {
            Some(ca) => {
                let certs = medfed_infra::transport::load_certs(ca)
                    .map_err(|e| fail("read the database's CA certificate", e.to_string()))?;
                let mut roots = rustls::RootCertStore::empty();
                for c in certs {
                    roots.add(c).map_err(|e| {
                        fail(
                            "read the database's CA certificate",
                            format!("{}: {e}", ca.display()),
                        )
                    })?;
                }
                let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .map_err(|e| fail("set up TLS", e.to_string()))?
                .with_root_certificates(roots)
                .with_no_client_auth();
                pg.ssl_mode(tokio_postgres::config::SslMode::Require);
                let (client, conn) = pg
                    .connect(tokio_postgres_rustls::MakeRustlsConnect::new(tls))
                    .await
                    .map_err(|e| fail("connect (TLS)", pg_detail(&e)))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("OMOP database connection ended: {}", pg_detail(&e));
                    }
                });
                client
            }
            None => {
                let (client, conn) = pg
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map_err(|e| fail("connect", pg_detail(&e)))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!("OMOP database connection ended: {}", pg_detail(&e));
                    }
                });
                client
            }
        };
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
    /// descendants where asked. A code the vocabulary does not hold is an error naming it.
    async fn resolve(&self) -> Result<Resolved, OmopError> {
        let mut concepts = Vec::new();
        for c in &self.cfg.columns {
            let mut ids = Vec::new();
            if let Some(id) = c.concept_id {
                ids.push(id);
            } else if let (Some(v), Some(code)) = (&c.vocabulary, &c.code) {
                let concept = self.vocabulary("concept");
                let rows = self
                    .client
                    .query(
                        &format!(
                            "SELECT concept_id::int8 FROM {concept} WHERE vocabulary_id = $1 AND concept_code = $2"
                        ),
                        &[v, code],
                    )
                    .await
                    .map_err(|e| self.fail(format!("look up {v} {code} in {concept}"), pg_detail(&e)))?;
                ids.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
                if ids.is_empty() {
                    return Err(self.fail(
                        format!("column '{}'", c.name),
                        format!("{v} code {code} is not in {concept}"),
                    ));
                }
            }
            if c.descendants && !ids.is_empty() {
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
                        self.fail(
                            format!("read the descendants of column '{}' in {ancestor}", c.name),
                            pg_detail(&e),
                        )
                    })?;
                ids.extend(rows.iter().map(|r| r.get::<_, i64>(0)));
                ids.sort_unstable();
                ids.dedup();
            }
            concepts.push(ids);
        }
        Ok(Resolved { concepts })
    }

    /// How many persons have a key below `from`: more than the checkpoint processed means
    /// some were added below it, and will not be read.
    async fn persons_below(&self, from: i64) -> Result<i64, OmopError> {
        let person = self.table(OmopTable::Person);
        let row = self
            .client
            .query_one(
                &format!("SELECT count(*)::int8 FROM {person} WHERE person_id < $1::int8"),
                &[&from],
            )
            .await
            .map_err(|e| self.fail(format!("count the persons in {person}"), pg_detail(&e)))?;
        Ok(row.get(0))
    }

    /// The records of the persons from key `from` on, at most a page: each person's key and
    /// CSV row. Read in one read-only snapshot.
    async fn page(&mut self, from: i64) -> Result<Vec<(i64, Vec<u8>)>, OmopError> {
        let width = self.cfg.columns.len();
        let person = self.table(OmopTable::Person);
        let person_fields: Vec<(usize, String)> = self
            .cfg
            .columns
            .iter()
            .enumerate()
            .filter(|(_, c)| c.table == OmopTable::Person)
            .filter_map(|(i, c)| {
                c.field.as_ref().map(|f| {
                    let expr = if f == "birth_datetime" {
                        "birth_datetime::date::text".to_string()
                    } else {
                        format!("{f}::text")
                    };
                    (i, expr)
                })
            })
            .collect();
        let select: String = person_fields
            .iter()
            .map(|(_, e)| format!(", {e}"))
            .collect();
        let page = i64::from(self.cfg.page);
        let target = self.cfg.target();
        let fail = |step: String, e: tokio_postgres::Error| OmopError {
            target: target.clone(),
            step,
            detail: pg_detail(&e),
        };
        let tx = self
            .client
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await
            .map_err(|e| fail("start a read-only transaction".into(), e))?;
        let rows = tx
            .query(
                &format!(
                    "SELECT person_id::int8{select} FROM {person} WHERE person_id >= $1::int8 ORDER BY person_id LIMIT $2::int8"
                ),
                &[&from, &page],
            )
            .await
            .map_err(|e| fail(format!("read persons from {person}"), e))?;
        let mut keys = Vec::with_capacity(rows.len());
        let mut values: Vec<Vec<Option<String>>> = Vec::with_capacity(rows.len());
        for r in &rows {
            let key: i64 = r.get(0);
            let mut v = vec![None; width];
            for (k, (i, _)) in person_fields.iter().enumerate() {
                v[*i] = r.get::<_, Option<String>>(k + 1);
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
            let rows = tx
                .query(
                    &format!(
                        "SELECT person_id::int8, min(observation_period_start_date)::text, max(observation_period_end_date)::text FROM {table} WHERE person_id BETWEEN $1::int8 AND $2::int8 GROUP BY person_id"
                    ),
                    &[&first, &last],
                )
                .await
                .map_err(|e| fail(format!("read {table}"), e))?;
            for r in rows {
                let Some(&p) = index.get(&r.get::<_, i64>(0)) else {
                    continue;
                };
                for (i, f) in &period {
                    let k = if *f == "observation_period_start_date" {
                        1
                    } else {
                        2
                    };
                    values[p][*i] = r.get::<_, Option<String>>(k);
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
            if table.is_presence() {
                let rows = tx
                    .query(
                        &format!(
                            "SELECT DISTINCT person_id::int8, {concept_col}::int8 FROM {name} WHERE person_id BETWEEN $1::int8 AND $2::int8 AND {concept_col} = ANY($3::int8[])"
                        ),
                        &[&first, &last, &concepts],
                    )
                    .await
                    .map_err(|e| fail(format!("read {name}"), e))?;
                for r in rows {
                    let (Some(&p), Some(cols)) = (
                        index.get(&r.get::<_, i64>(0)),
                        by_concept.get(&r.get::<_, i64>(1)),
                    ) else {
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
                    .map_err(|e| fail(format!("read {name}"), e))?;
                for r in rows {
                    let (Some(&p), Some(cols)) = (
                        index.get(&r.get::<_, i64>(0)),
                        by_concept.get(&r.get::<_, i64>(1)),
                    ) else {
                        continue;
                    };
                    let v: f64 = r.get(2);
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

/// Connects, resolves the concepts and starts reading persons from key `from` on (a
/// checkpoint's offset), on a thread of its own. Returns the header, the records (each
/// person's offset is its key) and the slot where a failure after the start is left.
/// `processed` is how many persons the checkpoint holds, to warn of persons added below it.
pub async fn read(
    cfg: &OmopConfig,
    stream: &str,
    partition: u32,
    from: u64,
    processed: u64,
) -> Result<(Vec<String>, Receiver<Vec<Envelope>>, SourceFailure), OmopError> {
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(), OmopError>>();
    let (tx, rx) = sync_channel(IN_FLIGHT);
    let failure: SourceFailure = Arc::default();
    let (cfg, stream_name, slot) = (cfg.clone(), Arc::<str>::from(stream), failure.clone());
    let target = cfg.target();
    let header = cfg.header();
    std::thread::Builder::new()
        .name(format!("omop-{stream}"))
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    if ready_tx
                        .send(Err(OmopError {
                            target: cfg.target(),
                            step: "start its runtime".into(),
                            detail: e.to_string(),
                        }))
                        .is_err()
                    {
                        tracing::debug!("the OMOP source's caller is gone");
                    }
                    return;
                }
            };
            rt.block_on(async move {
                let from = i64::try_from(from).unwrap_or(i64::MAX);
                let source = match Source::connect(cfg.clone()).await {
                    Ok(s) => s,
                    Err(e) => {
                        if ready_tx.send(Err(e)).is_err() {
                            tracing::debug!("the OMOP source's caller is gone");
                        }
                        return;
                    }
                };
                match source.persons_below(from).await {
                    Ok(n) if n > i64::try_from(processed).unwrap_or(i64::MAX) => {
                        tracing::warn!(
                            stream = %stream_name,
                            "OMOP: {} persons have a person_id below this stream's checkpoint ({from}) but the checkpoint holds {processed}: persons were added with keys below it, and are not read (the source reads persons in person_id order, once)",
                            n
                        );
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if ready_tx.send(Err(e)).is_err() {
                            tracing::debug!("the OMOP source's caller is gone");
                        }
                        return;
                    }
                }
                if ready_tx.send(Ok(())).is_err() {
                    return;
                }
                pump(source, from, stream_name, partition, tx, slot).await;
            });
        })
        .map_err(|e| OmopError {
            target: target.clone(),
            step: "start its thread".into(),
            detail: e.to_string(),
        })?;
    match ready_rx.await {
        Ok(Ok(())) => Ok((header, rx, failure)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(OmopError {
            target,
            step: "start".into(),
            detail: "the source's thread ended before connecting".into(),
        }),
    }
}

/// Connects as the pipeline would, resolves every mapped concept and counts the persons,
/// on a thread of its own (callable from inside or outside a runtime): what `medfed node
/// check` reports.
pub fn probe(cfg: &OmopConfig) -> Result<u64, OmopError> {
    let cfg = cfg.clone();
    let target = cfg.target();
    let failed = |detail: String| OmopError {
        target: target.clone(),
        step: "check".into(),
        detail,
    };
    std::thread::Builder::new()
        .name("omop-check".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| OmopError {
                    target: cfg.target(),
                    step: "start its runtime".into(),
                    detail: e.to_string(),
                })?;
            rt.block_on(async move {
                let source = Source::connect(cfg).await?;
                let n = source.persons_below(i64::MAX).await?;
                Ok(u64::try_from(n).unwrap_or(0))
            })
        })
        .map_err(|e| failed(e.to_string()))?
        .join()
        .map_err(|_| failed("the check's thread panicked".into()))?
}

/// Pages queued for the runner.
const IN_FLIGHT: usize = 4;

/// Reads pages from `from` on and hands them to the runner, until every person is read
/// (or, following, forever). A failure ends a bounded read into `failure`; a following one
/// reconnects and goes on from the last key handed over.
async fn pump(
    mut source: Source,
    mut from: i64,
    stream: Arc<str>,
    partition: u32,
    tx: SyncSender<Vec<Envelope>>,
    failure: SourceFailure,
) {
    let follow = source.cfg.follow_secs.map(Duration::from_secs);
    let mut backoff = Duration::from_secs(1);
    loop {
        match source.page(from).await {
            Ok(rows) => {
                backoff = Duration::from_secs(1);
                let full = rows.len() == source.cfg.page as usize;
                if let Some((last, _)) = rows.last() {
                    from = last.saturating_add(1);
                }
                let mut batch = Vec::with_capacity(rows.len());
                for (key, payload) in rows {
                    let Ok(offset) = u64::try_from(key) else {
                        let e = source.fail(
                            "read persons",
                            format!(
                                "person_id {key} is negative: medfed needs non-negative keys to checkpoint by"
                            ),
                        );
                        fail_with(&failure, e);
                        return;
                    };
                    batch.push(Envelope {
                        stream: stream.clone(),
                        partition,
                        offset,
                        key: None,
                        payload,
                    });
                }
                if !batch.is_empty() && tx.send(batch).is_err() {
                    return; // the runner is gone
                }
                if full {
                    continue;
                }
                let Some(wait) = follow else {
                    return; // every person is read
                };
                // Caught up: an empty batch tells the runner so (skipped if it is busy).
                if let Err(TrySendError::Disconnected(_)) = tx.try_send(Vec::new()) {
                    return;
                }
                tokio::time::sleep(wait).await;
            }
            Err(e) => {
                let Some(_) = follow else {
                    fail_with(&failure, e);
                    return;
                };
                tracing::warn!(stream = %stream, "{e}; trying again in {} s", backoff.as_secs());
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
                if source.client.is_closed() {
                    match Source::connect(source.cfg.clone()).await {
                        Ok(s) => source = s,
                        Err(e) => tracing::warn!(stream = %stream, "{e}"),
                    }
                }
                if tx
                    .try_send(Vec::new())
                    .is_err_and(|e| matches!(e, TrySendError::Disconnected(_)))
                {
                    return;
                }
            }
        }
    }
}

fn fail_with(slot: &SourceFailure, e: OmopError) {
    tracing::error!("{e}; the records before it are checkpointed, and a new run resumes there");
    match slot.lock() {
        Ok(mut s) => *s = Some(e.to_string()),
        Err(poisoned) => *poisoned.into_inner() = Some(e.to_string()),
    }
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
