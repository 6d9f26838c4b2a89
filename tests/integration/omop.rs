//! The OMOP CDM source (`[ingest.omop]`) on a real PostgreSQL server that each test starts
//! in a temporary directory, loaded with `examples/data/pima_omop.sql` (the 200 Pima rows
//! as an OMOP CDM v5.4 database, with the distractors a real one has).

use medfed_node::config::NodeConfig;
use medfed_node::deid::{Record, Value};
use std::path::{Path, PathBuf};

use crate::common::postgres::Postgres;
use crate::common::{medfed, ok, pki};

/// The Pima columns, declared as the de-identification pipeline's fields.
const PIMA_FIELDS: &str = r#"[[ingest.field]]
name = "npreg"
min = 0
max = 30
[[ingest.field]]
name = "glu"
[[ingest.field]]
name = "bp"
[[ingest.field]]
name = "skin"
[[ingest.field]]
name = "bmi"
[[ingest.field]]
name = "ped"
[[ingest.field]]
name = "age"
class = "age"
[[ingest.field]]
name = "type"
categories = ["Yes", "No"]
"#;

/// The OMOP columns giving the Pima rows: the concepts by vocabulary and code, glucose by
/// its Athena concept id.
const PIMA_OMOP_COLUMNS: &str = r#"[[ingest.omop.column]]
name = "npreg"
table = "observation"
vocabulary = "LOINC"
code = "11996-6"
[[ingest.omop.column]]
name = "glu"
table = "measurement"
concept_id = 3004501
[[ingest.omop.column]]
name = "bp"
table = "measurement"
vocabulary = "LOINC"
code = "8462-4"
[[ingest.omop.column]]
name = "skin"
table = "measurement"
vocabulary = "medfed_example"
code = "triceps-skinfold"
[[ingest.omop.column]]
name = "bmi"
table = "measurement"
vocabulary = "LOINC"
code = "39156-5"
[[ingest.omop.column]]
name = "ped"
table = "observation"
vocabulary = "medfed_example"
code = "diabetes-pedigree"
[[ingest.omop.column]]
name = "age"
table = "observation"
vocabulary = "LOINC"
code = "30525-0"
[[ingest.omop.column]]
name = "type"
table = "condition_occurrence"
vocabulary = "SNOMED"
code = "44054006"
"#;

fn omop_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data/pima_omop.sql")
}

/// A node's config head (site, aggregator, TLS, keystore) in `d`.
fn node_head(d: &Path) -> String {
    format!(
        "site = \"alpha\"\n[aggregator]\naddress = \"127.0.0.1:4433\"\n\
         [tls]\nca = \"pki/sites/alpha/ca.pem\"\ncert = \"pki/sites/alpha/cert.pem\"\nkey = \"pki/sites/alpha/key.pem\"\n\
         [[dataset]]\nname = \"pima\"\ningest = \"omop\"\n\
         [state]\ndir = \"state\"\nkeystore = {:?}\n",
        d.join("init/keystore/pseudonym-keys.toml")
    )
}

/// A node directory with its PKI and a pseudonym keystore.
fn node_dir(d: &Path) {
    pki(d, &["alpha"]);
    ok(&[
        "node",
        "init",
        "--dir",
        d.join("init").to_str().unwrap(),
        "--site",
        "alpha",
    ]);
}

/// Each stream's kept (de-identified) records.
fn kept(cfg: &Path) -> Vec<(String, Vec<Record>)> {
    let cfg = NodeConfig::load(cfg).unwrap();
    let store = medfed_node::ingest::open_store(&cfg.state).unwrap();
    cfg.ingests
        .iter()
        .map(|i| {
            (
                i.stream.clone(),
                medfed_node::ingest::kept_records(i, &*store).unwrap(),
            )
        })
        .collect()
}

fn text(r: &Record, field: &str) -> String {
    match r.get(field) {
        Some(Value::Text(t)) => t.to_string(),
        Some(Value::Number(n)) => n.to_string(),
        other => format!("{other:?}"),
    }
}

#[test]
fn the_omop_source_gives_the_same_records_as_the_csv_and_fhir_sources() {
    let pg = Postgres::start();
    pg.load("omop", &omop_data());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    node_dir(d);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/data");
    let cfg = d.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"{head}
[[ingest]]
stream = "csv"
csv = {csv:?}
columns = ["glu", "bmi"]
{PIMA_FIELDS}
[[ingest]]
stream = "fhir"
fhir = {fhir:?}
columns = ["glu", "bmi"]
{PIMA_FIELDS}
[ingest.fhir_mapping]
features = [
  {{ column = "npreg", system = "http://loinc.org", code = "11996-6" }},
  {{ column = "glu", system = "http://loinc.org", code = "2345-7" }},
  {{ column = "bp", system = "http://loinc.org", code = "8462-4" }},
  {{ column = "skin", system = "urn:medfed:example", code = "triceps-skinfold" }},
  {{ column = "bmi", system = "http://loinc.org", code = "39156-5" }},
  {{ column = "ped", system = "urn:medfed:example", code = "diabetes-pedigree" }},
  {{ column = "age", system = "http://loinc.org", code = "30525-0" }},
]
target = {{ column = "type", system = "http://snomed.info/sct", code = "44054006" }}
[[ingest]]
stream = "omop"
columns = ["glu", "bmi"]
{PIMA_FIELDS}
[ingest.omop]
connect = "{connect}"
schema = "cdm"
page = 64
{PIMA_OMOP_COLUMNS}
[[ingest]]
stream = "omop-more"
columns = ["glu"]
[[ingest.field]]
name = "mrn"
class = "patient-id"
required = true
[[ingest.field]]
name = "glu"
[[ingest.field]]
name = "since"
class = "date"
[[ingest.field]]
name = "metformin"
categories = ["Yes", "No"]
[[ingest.field]]
name = "tablets"
categories = ["Yes", "No"]
[ingest.omop]
connect = "host={socket} port={port} user=postgres dbname=omop"
schema = "cdm"
[[ingest.omop.column]]
name = "mrn"
table = "person"
field = "person_source_value"
[[ingest.omop.column]]
name = "glu"
table = "measurement"
vocabulary = "LOINC"
code = "2345-7"
[[ingest.omop.column]]
name = "since"
table = "observation_period"
field = "observation_period_start_date"
[[ingest.omop.column]]
name = "metformin"
table = "drug_exposure"
vocabulary = "RxNorm"
code = "6809"
descendants = true
[[ingest.omop.column]]
name = "tablets"
table = "drug_exposure"
vocabulary = "RxNorm"
code = "6809"
"#,
            head = node_head(d),
            csv = root.join("pima_tr.csv"),
            fhir = root.join("pima_fhir"),
            connect = pg.connect("omop"),
            socket = pg.socket_dir.display(),
            port = pg.port,
        ),
    )
    .unwrap();
    // `node check` reaches the database and finds every concept.
    let (_, checked) = crate::common::node_check(&cfg, 2);
    assert!(
        checked.contains("pipeline 'omop': OMOP database reached, every mapped concept found, 200 persons in cdm.person"),
        "{checked}"
    );
    // ... and warns of a column no row holds: the ingredient itself is never prescribed
    // (its clinical drugs are, which `descendants` finds).
    assert!(
        checked.contains("pipeline 'omop-more': OMOP database reached, 200 persons in cdm.person, but no row holds the concepts of the columns 'tablets' (drug_exposure)"),
        "{checked}"
    );
    let out = ok(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(
        out.contains("omop partition 0: offset 1601, processed 200, quarantined 0"),
        "{out}"
    );
    let streams = kept(&cfg);
    let (csv, fhir, omop, more) = (&streams[0].1, &streams[1].1, &streams[2].1, &streams[3].1);
    assert_eq!(csv.len(), 200);
    assert_eq!(omop, csv, "the OMOP records differ from the CSV's");
    assert_eq!(omop, fhir, "the OMOP records differ from the FHIR export's");

    // Person fields are pseudonymized, dates generalized, drugs found through the
    // ingredient's descendants (and not without them).
    assert_eq!(more.len(), 200);
    let on_metformin = pg.query(
        "omop",
        "SELECT count(DISTINCT person_id) FROM cdm.drug_exposure",
    )[0][0]
        .clone()
        .unwrap();
    let yes = |f: &str| more.iter().filter(|r| text(r, f) == "Yes").count();
    assert_eq!(yes("metformin").to_string(), on_metformin);
    assert!(yes("metformin") > 10, "{}", yes("metformin"));
    assert_eq!(yes("tablets"), 0, "the ingredient itself has no exposures");
    assert!(
        more.iter().all(|r| text(r, "since") == "1990"),
        "{:?}",
        more[0]
    );
    assert!(more.iter().all(|r| r.get("mrn").is_none()));
    let pseudonyms: std::collections::BTreeSet<String> =
        more.iter().map(|r| text(r, "patient")).collect();
    assert_eq!(pseudonyms.len(), 200);
    assert!(
        !pseudonyms.iter().any(|p| p.contains("pima")),
        "{pseudonyms:?}"
    );

    // A second run reads nothing new; a person added later is read by the next run.
    let again = ok(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(
        again.contains("omop partition 0: offset 1601, processed 200, quarantined 0"),
        "{again}"
    );
    pg.execute(
        "omop",
        "INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id, person_source_value) VALUES (5000, 8532, 1960, 0, 0, 'late-1');
         INSERT INTO cdm.measurement (measurement_id, person_id, measurement_concept_id, measurement_date, measurement_type_concept_id, value_as_number) VALUES (99001, 5000, 3004501, '1991-07-01', 32817, 101);
         INSERT INTO cdm.observation (observation_id, person_id, observation_concept_id, observation_date, observation_type_concept_id, value_as_number) VALUES (99001, 5000, 2000000001, '1991-07-01', 32817, 2), (99002, 5000, 2000000002, '1991-07-01', 32817, 31), (99003, 5000, 2000000004, '1991-07-01', 32817, 0.5);
         INSERT INTO cdm.measurement (measurement_id, person_id, measurement_concept_id, measurement_date, measurement_type_concept_id, value_as_number) VALUES (99002, 5000, 3012888, '1991-07-01', 32817, 70), (99003, 5000, 2000000003, '1991-07-01', 32817, 20), (99004, 5000, 3038553, '1991-07-01', 32817, 25.5);",
    );
    let third = ok(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(
        third.contains("omop partition 0: offset 5001, processed 201, quarantined 0"),
        "{third}"
    );
    let streams = kept(&cfg);
    assert_eq!(streams[2].1.len(), 201);
    assert_eq!(text(&streams[2].1[200], "glu"), "101");
    assert_eq!(text(&streams[2].1[200], "type"), "No");
}

/// `medfed node ingest` with the config in `d/bad.toml`: its error output.
fn ingest_error(d: &Path, omop: &str) -> String {
    let cfg = d.join("bad.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}\n[[ingest]]\nstream = \"omop\"\ncolumns = [\"glu\"]\n[[ingest.field]]\nname = \"glu\"\n{omop}",
            node_head(d)
        ),
    )
    .unwrap();
    let out = medfed(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_wrong_omop_mapping_or_database_is_an_error_naming_it() {
    let pg = Postgres::start();
    pg.load("omop", &omop_data());
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    node_dir(d);
    let connect = pg.connect("omop");
    let glu = "[[ingest.omop.column]]\nname = \"glu\"\ntable = \"measurement\"";
    // A code the vocabulary does not hold.
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\n{glu}\nvocabulary = \"LOINC\"\ncode = \"9999-9\"\n"
        ),
    );
    assert!(
        err.contains("ingest 'omop'")
            && err.contains("column 'glu'")
            && err.contains("LOINC code 9999-9 is not in \"cdm\".concept"),
        "{err}"
    );
    let (passed, checked) = crate::common::node_check(&d.join("bad.toml"), 2);
    assert!(
        !passed && checked.contains("LOINC code 9999-9 is not in"),
        "{checked}"
    );
    // `node status` still reports the pipeline; its lag is unknown, and it says why.
    let out = medfed(&[
        "node",
        "status",
        "--config",
        d.join("bad.toml").to_str().unwrap(),
    ]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let line = stdout
        .lines()
        .find(|l| l.starts_with("omop"))
        .unwrap_or_default();
    assert_eq!(
        line.split_whitespace().nth(3),
        Some("-"),
        "the lag column: {stdout}"
    );
    assert!(
        stderr.contains("the lag is unknown") && stderr.contains("LOINC code 9999-9 is not in"),
        "{stderr}"
    );
    // A concept that is not standard, of another domain than its table's, or unknown:
    // each would leave the column silently empty.
    pg.execute(
        "omop",
        "INSERT INTO cdm.concept VALUES (2000000020, 'Type 2 diabetes mellitus', 'Condition', 'ICD10CM', 'ICD10 code', NULL, 'E11', '1970-01-01', '2099-12-31', NULL)",
    );
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\n[[ingest.omop.column]]\nname = \"glu\"\ntable = \"condition_occurrence\"\nvocabulary = \"ICD10CM\"\ncode = \"E11\"\n"
        ),
    );
    assert!(
        err.contains("ICD10CM code E11 is concept 2000000020 (Type 2 diabetes mellitus), which is not a standard concept"),
        "{err}"
    );
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\n[[ingest.omop.column]]\nname = \"glu\"\ntable = \"observation\"\nconcept_id = 3004501\n"
        ),
    );
    assert!(
        err.contains("of the domain 'Measurement', not 'Observation'")
            && err.contains("set table = \"measurement\""),
        "{err}"
    );
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\n{glu}\nconcept_id = 42\n"
        ),
    );
    assert!(
        err.contains("concept_id 42 is not in \"cdm\".concept"),
        "{err}"
    );
    // A legacy SQL_ASCII database holding bytes that are not text: an error naming where,
    // with the persons before it kept.
    pg.execute(
        "postgres",
        "CREATE DATABASE legacy ENCODING 'SQL_ASCII' TEMPLATE template0 LC_COLLATE 'C' LC_CTYPE 'C'",
    );
    pg.execute("legacy", &std::fs::read_to_string(omop_data()).unwrap());
    pg.execute(
        "legacy",
        "UPDATE cdm.person SET person_source_value = E'M\\xfcller' WHERE person_id = 1009",
    );
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{}\"\nschema = \"cdm\"\npage = 1\n{glu}\nconcept_id = 3004501\n[[ingest.omop.column]]\nname = \"who\"\ntable = \"person\"\nfield = \"person_source_value\"\n",
            pg.connect("legacy")
        ),
    );
    assert!(
        err.contains("read persons from \"cdm\".person (person_id 1007 on)")
            && err.contains("invalid byte sequence")
            && err.contains("stopped at offset 1007"),
        "{err}"
    );
    assert_eq!(kept(&d.join("bad.toml"))[0].1.len(), 2);
    std::fs::remove_dir_all(d.join("state")).unwrap();
    // A schema without the CDM tables.
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"public\"\n{glu}\nconcept_id = 3004501\n"
        ),
    );
    assert!(
        err.contains("\"public\".concept") && err.contains("does not exist"),
        "{err}"
    );
    // No server there.
    let port = crate::common::free_tcp_port();
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"host=127.0.0.1 port={port} user=postgres dbname=omop\"\n{glu}\nconcept_id = 3004501\n"
        ),
    );
    assert!(
        err.contains(&format!("OMOP source (127.0.0.1:{port}/omop): connect")),
        "{err}"
    );
    // A remote database without TLS is refused before connecting.
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"host=db.hospital.example dbname=cdm\"\n{glu}\nconcept_id = 3004501\n"
        ),
    );
    assert!(
        err.contains("db.hospital.example over the network without TLS"),
        "{err}"
    );
    // A database failure mid-read fails the ingestion, with the records before it kept.
    // (Persons 1003 to 1300 read; the third page of 50 fails.)
    pg.execute(
        "omop",
        "CREATE FUNCTION cdm.boom(bigint) RETURNS float8 AS $$ BEGIN IF $1 > 1300 THEN RAISE EXCEPTION 'the disk is on fire'; END IF; RETURN 1; END $$ LANGUAGE plpgsql;
         ALTER TABLE cdm.measurement RENAME TO measurement_real;
         CREATE VIEW cdm.measurement AS SELECT m.measurement_id, m.person_id, m.measurement_concept_id, m.measurement_date, m.value_as_number * cdm.boom(m.person_id) AS value_as_number FROM cdm.measurement_real m;",
    );
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\npage = 50\n{glu}\nconcept_id = 3004501\n"
        ),
    );
    assert!(
        err.contains("the disk is on fire") && err.contains("a new run resumes there"),
        "{err}"
    );
    let state = kept(&d.join("bad.toml"));
    assert_eq!(
        state[0].1.len(),
        100,
        "the pages before the failure are kept"
    );

    // A password file others can read.
    let password = d.join("cdm-password");
    std::fs::write(&password, "secret\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let err = ingest_error(
        d,
        &format!(
            "[ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\npassword_file = {password:?}\n{glu}\nconcept_id = 3004501\n"
        ),
    );
    assert!(
        err.contains("password file")
            && err.contains("readable by this user only")
            && !err.contains("secret"),
        "{err}"
    );

    // A person_id twice (a CDM loaded without its primary keys), and a negative one.
    std::fs::remove_dir_all(d.join("state")).unwrap();
    let legacy = format!(
        "[ingest.omop]\nconnect = \"{}\"\nschema = \"cdm\"\n{glu}\nconcept_id = 3004501\n",
        pg.connect("legacy")
    );
    pg.execute(
        "legacy",
        "ALTER TABLE cdm.person DROP CONSTRAINT person_pkey;
         UPDATE cdm.person SET person_source_value = 'x';
         INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id) VALUES (1300, 8532, 1960, 0, 0);",
    );
    let err = ingest_error(d, &legacy);
    assert!(
        err.contains("person_id 1300 is there twice") && err.contains("primary key"),
        "{err}"
    );
    pg.execute(
        "legacy",
        "DELETE FROM cdm.person WHERE person_id = 1300 AND person_source_value IS NULL;
         INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id) VALUES (-5, 8532, 1960, 0, 0);",
    );
    let err = ingest_error(d, &legacy);
    assert!(err.contains("person_id -5 is negative"), "{err}");
}

/// Makes `copies` more copies of every patient (keys and ids shifted by 100,000 each).
fn scale(pg: &Postgres, copies: u32) {
    let mut sql = format!("CREATE TEMP TABLE ks AS SELECT generate_series(1, {copies}) AS k;\n");
    for (table, key) in [
        ("observation_period", "observation_period_id"),
        ("measurement", "measurement_id"),
        ("observation", "observation_id"),
        ("condition_occurrence", "condition_occurrence_id"),
        ("drug_exposure", "drug_exposure_id"),
    ] {
        sql.push_str(&format!(
            "INSERT INTO cdm.{table} SELECT (jsonb_populate_record(NULL::cdm.{table}, to_jsonb(t) || jsonb_build_object('{key}', t.{key} + k * 100000, 'person_id', t.person_id + k * 100000))).* FROM cdm.{table} t, ks;\n"
        ));
    }
    sql.push_str(
        "INSERT INTO cdm.person SELECT (jsonb_populate_record(NULL::cdm.person, to_jsonb(t) || jsonb_build_object('person_id', t.person_id + k * 100000, 'person_source_value', t.person_source_value || '-' || k))).* FROM cdm.person t, ks;\n",
    );
    pg.execute("omop", &sql);
}

#[test]
fn every_person_is_kept_exactly_once_across_kills() {
    let pg = Postgres::start();
    pg.load("omop", &omop_data());
    scale(&pg, 149);
    let keys: Vec<u64> = pg
        .query(
            "omop",
            "SELECT person_id FROM cdm.person ORDER BY person_id",
        )
        .into_iter()
        .map(|r| r[0].as_deref().unwrap().parse().unwrap())
        .collect();
    assert_eq!(keys.len(), 30_000);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    node_dir(d);
    // The full de-identification of the Pima columns, with the person's pseudonym.
    let config = |state: &str| {
        format!(
            "{head}\n[[ingest]]\nstream = \"omop\"\ncolumns = [\"glu\", \"bmi\"]\ncommit_every = 300\n\
             [[ingest.field]]\nname = \"mrn\"\nclass = \"patient-id\"\nrequired = true\n{PIMA_FIELDS}\
             [ingest.omop]\nconnect = \"{connect}\"\nschema = \"cdm\"\npage = 100\n\
             [[ingest.omop.column]]\nname = \"mrn\"\ntable = \"person\"\nfield = \"person_source_value\"\n{PIMA_OMOP_COLUMNS}",
            head = node_head(d).replace("dir = \"state\"", &format!("dir = \"{state}\"")),
            connect = pg.connect("omop"),
        )
    };
    let reference = d.join("reference.toml");
    std::fs::write(&reference, config("reference-state")).unwrap();
    let started = std::time::Instant::now();
    ok(&["node", "ingest", "--config", reference.to_str().unwrap()]);
    eprintln!(
        "an uninterrupted run read {} persons in {:.2} s",
        keys.len(),
        started.elapsed().as_secs_f64()
    );
    let want = kept(&reference).remove(0).1;
    assert_eq!(want.len(), keys.len());

    let cfg = d.join("node.toml");
    std::fs::write(&cfg, config("state")).unwrap();
    let ingest = || {
        let mut c = std::process::Command::new(crate::common::MEDFED);
        c.args(["node", "ingest", "--config", cfg.to_str().unwrap()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        c
    };
    // After each kill: the kept records are exactly the first ones of the uninterrupted
    // run, as many as the persons below the checkpoint's key, each once.
    let check = || {
        let node = NodeConfig::load(&cfg).unwrap();
        let store = medfed_node::ingest::open_store(&node.state).unwrap();
        let (offset, _, processed, _) = medfed_node::runtime::restore(&*store, "omop", 0).unwrap();
        let got = medfed_node::ingest::kept_records(&node.ingests[0], &*store).unwrap();
        let below = keys.iter().filter(|k| **k < offset).count();
        assert_eq!(
            (got.len(), processed as usize),
            (below, below),
            "checkpoint at key {offset}"
        );
        // `node status` counts the persons still to read in the database.
        let status = medfed_node::ingest::status(&node.ingests, &*store).unwrap();
        assert_eq!(
            status[0].lag,
            Some((keys.len() - below) as u64),
            "lag at key {offset}"
        );
        assert!(
            got[..] == want[..got.len()],
            "the kept records are not the first {} of the uninterrupted run's",
            got.len()
        );
        got.len() as u64
    };
    let counts = crate::common::kill_50_times(ingest, 13, 20..160, check);
    eprintln!("records kept at each of the 50 kills: {counts:?}");
    assert!(counts.windows(2).all(|w| w[0] <= w[1]), "{counts:?}");
    let mid = counts
        .iter()
        .filter(|c| **c > 0 && **c < keys.len() as u64)
        .count();
    assert!(mid >= 10, "too few kills landed mid-read: {counts:?}");
    assert!(ingest().status().unwrap().success());
    assert_eq!(kept(&cfg).remove(0).1, want);
}

#[test]
fn a_database_over_tls_is_read_only_when_its_certificate_chains_to_the_configured_ca() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    node_dir(d);
    // The server's certificate for localhost, from the test PKI's CA; another CA beside it.
    let server = d.join("pki/aggregator/localhost");
    let pg = Postgres::start_with(
        "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n",
        &[
            (
                "server.crt",
                &std::fs::read(server.join("cert.pem")).unwrap(),
            ),
            (
                "server.key",
                &std::fs::read(server.join("key.pem")).unwrap(),
            ),
        ],
    );
    pg.load("omop", &omop_data());
    ok(&["pki", "init", "--dir", d.join("other").to_str().unwrap()]);
    let omop = |ca: &Path| {
        format!(
            "[ingest.omop]\nconnect = \"host=localhost port={} user=postgres dbname=omop\"\nschema = \"cdm\"\nca = {ca:?}\n\
             [[ingest.omop.column]]\nname = \"glu\"\ntable = \"measurement\"\nconcept_id = 3004501\n",
            pg.port
        )
    };
    let err = ingest_error(d, &omop(&d.join("other/ca/ca.pem")));
    assert!(
        err.contains("connect (TLS)") && err.contains("certificate"),
        "{err}"
    );
    eprintln!("{err}");
    assert!(kept(&d.join("bad.toml"))[0].1.is_empty());
    // The right CA: read over TLS (the source requires it when a CA is set).
    let cfg = d.join("bad.toml");
    let text = std::fs::read_to_string(&cfg).unwrap().replace(
        &format!("{:?}", d.join("other/ca/ca.pem")),
        &format!("{:?}", d.join("pki/ca/ca.pem")),
    );
    std::fs::write(&cfg, text).unwrap();
    let out = ok(&["node", "ingest", "--config", cfg.to_str().unwrap()]);
    assert!(out.contains("processed 200"), "{out}");
    assert_eq!(kept(&cfg)[0].1.len(), 200);
}

/// The example of docs/omop.md is a valid pipeline.
#[test]
fn the_documented_omop_pipeline_parses() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/omop.md"))
        .unwrap();
    let block = doc
        .split("```toml\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    pki(d, &["alpha"]);
    let cfg = d.join("node.toml");
    std::fs::write(
        &cfg,
        format!(
            "{}{block}",
            node_head(d).replace("ingest = \"omop\"", "ingest = \"cdm\"")
        ),
    )
    .unwrap();
    let node = NodeConfig::load(&cfg).unwrap();
    let omop = node.ingests[0].omop.as_ref().unwrap();
    assert_eq!(omop.columns.len(), 4);
    assert_eq!(
        omop.ca.as_deref(),
        Some(d.join("pki/hospital-db-ca.pem").as_path())
    );
}

/// With `follow_secs`, the source keeps reading persons added later, and goes on after the
/// database restarts.
#[test]
fn a_following_source_reads_new_persons_and_survives_a_database_restart() {
    use medfed_node::runtime::omop_source::{self, OmopConfig};
    let pg = Postgres::start();
    pg.load("omop", &omop_data());
    let cfg: OmopConfig = toml::from_str(&format!(
        "connect = \"{}\"\nschema = \"cdm\"\npage = 64\nfollow_secs = 1\n{}",
        pg.connect("omop"),
        PIMA_OMOP_COLUMNS.replace("[[ingest.omop.column]]", "[[column]]")
    ))
    .unwrap();
    cfg.validate().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let failure = medfed_node::runtime::SourceFailure::default();
    let (header, rx) = rt
        .block_on(omop_source::read(&cfg, "omop", 0, 0, 0, failure.clone()))
        .unwrap();
    assert_eq!(header[0], "npreg");
    let next_records = |n: usize| {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while got.len() < n {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let batch = rx.recv_timeout(left).expect("records in time");
            got.extend(batch);
        }
        got
    };
    let first = next_records(200);
    assert_eq!(first.len(), 200);
    assert_eq!(first[199].offset, 1600);
    pg.restart();
    pg.execute(
        "omop",
        "INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id) VALUES (7000, 8532, 1960, 0, 0), (7003, 8507, 1970, 0, 0);",
    );
    let later = next_records(2);
    assert_eq!(
        later.iter().map(|e| e.offset).collect::<Vec<_>>(),
        [7000, 7003]
    );
    assert_eq!(String::from_utf8_lossy(&later[0].payload), ",,,,,,,No");
    assert_eq!(failure.failed(), None);
    // An error that waiting does not cure (the table is gone) stops the source, recorded
    // before its channel closes, rather than being retried forever as if caught up.
    pg.execute(
        "omop",
        "ALTER TABLE cdm.measurement RENAME TO measurement_gone;
         INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, race_concept_id, ethnicity_concept_id) VALUES (7009, 8532, 1960, 0, 0);",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(batch) => assert!(batch.is_empty(), "records read without their measurements"),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            Err(e) => panic!("the source did not stop: {e}"),
        }
    }
    let why = failure.failed().expect("the failure is recorded");
    assert!(
        why.contains("\"cdm\".measurement") && why.contains("does not exist"),
        "{why}"
    );
}
