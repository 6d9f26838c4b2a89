//! `medfed model predict`: an exported model's scores for every row of a CSV file with the
//! study's raw columns (the model applies its own preprocessing: categories, imputed
//! values, standardization).

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use medfed_node::data::Table;
use medfed_protocol::metrics::argmax;
use medfed_protocol::model::ModelKind;

#[derive(clap::Args)]
pub struct PredictArgs {
    /// An exported model (JSON), e.g. models/STUDY/final.json in the aggregator's out_dir.
    #[arg(long)]
    pub model: PathBuf,
    /// A CSV file with a header row holding the study's raw feature columns (any order;
    /// other columns are ignored).
    #[arg(long, required_unless_present = "fhir", conflicts_with = "fhir")]
    pub data: Option<PathBuf>,
    /// Or a FHIR R4 Bulk Data export directory (Patient.ndjson, Observation.ndjson): one
    /// row per patient, its columns made by `--fhir-mapping`.
    #[arg(long, requires = "fhir_mapping")]
    pub fhir: Option<PathBuf>,
    /// The FHIR export's mapping, a TOML file as an `[ingest.fhir_mapping]` table: which
    /// Observation codes become which columns (`features = [{ column, system, code }, ...]`).
    #[arg(long, value_name = "TOML")]
    pub fhir_mapping: Option<PathBuf>,
    /// A column copied into the output beside each row's scores, to tell the rows apart
    /// (e.g. a record number; default: the row's line in the input, or with `--fhir` the
    /// Patient's id).
    #[arg(long, conflicts_with = "fhir")]
    pub id_column: Option<String>,
    /// Where to write the scores (CSV); default: standard output.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// The output's columns after the row's id: a logistic model's probability of its positive
/// class, a multinomial model's probability of each class and the most probable one, a
/// linear model's prediction; then `error`, why a row has no score.
fn header(model: &medfed_protocol::export::ExportedModel) -> Vec<String> {
    let mut h = match model.model.kind {
        ModelKind::Logistic => vec![format!(
            "p_{}",
            model.positive_class.as_deref().unwrap_or("positive")
        )],
        ModelKind::Multinomial { .. } => {
            let mut h: Vec<String> = model.classes.iter().map(|c| format!("p_{c}")).collect();
            h.push("predicted".into());
            h
        }
        ModelKind::Linear => vec!["predicted".into()],
    };
    h.push("error".into());
    h
}

pub fn run(args: PredictArgs) -> anyhow::Result<()> {
    let model = crate::evaluate::load_model(&args.model)?;
    let (table, source, patient_ids) = match (&args.data, &args.fhir, &args.fhir_mapping) {
        (Some(data), _, _) => (Table::load(data)?, data.display().to_string(), None),
        (None, Some(dir), Some(mapping)) => {
            let mapping: medfed_node::runtime::fhir_source::FhirMapping =
                medfed_infra::config::load_toml(mapping)?;
            let (csv, ids) = medfed_node::runtime::fhir_source::table(dir, &mapping)?;
            let table = Table::from_reader(dir, csv.as_bytes())?;
            // Each row must be scored under its own patient's id.
            anyhow::ensure!(
                table.len() == ids.len(),
                "{}: {} rows made from {} patients",
                dir.display(),
                table.len(),
                ids.len()
            );
            (
                table,
                format!("the FHIR export {}", dir.display()),
                Some(ids),
            )
        }
        _ => anyhow::bail!("give --data CSV, or --fhir DIR with --fhir-mapping TOML"),
    };
    let recipe = model.model.preprocessing();
    let id = args
        .id_column
        .as_deref()
        .map(|c| table.column(c))
        .transpose()?;
    let mut out: Box<dyn Write> = match &args.out {
        Some(path) => Box::new(std::io::BufWriter::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create {}", path.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let mut csv = csv::Writer::from_writer(&mut out);
    let mut head = vec![match (&args.id_column, &patient_ids) {
        (Some(c), _) => c.clone(),
        (None, Some(_)) => "patient".into(),
        (None, None) => "line".into(),
    }];
    head.extend(header(&model));
    csv.write_record(&head)?;
    let k = model.model.kind.outputs();
    let cells = head.len() - 2;
    let (mut scored, mut failed) = (0u64, 0u64);
    // Row by row: a row that cannot be scored gets its reason, the others their scores.
    for (i, inputs) in table.rows_inputs(&recipe, false)?.into_iter().enumerate() {
        let mut record = vec![match (id, &patient_ids) {
            (Some(c), _) => table.cell(i, c).to_string(),
            (None, Some(ids)) => ids.get(i).cloned().unwrap_or_default(),
            (None, None) => table.line_of(i).to_string(),
        }];
        let row = inputs.map_err(|e| e.to_string()).and_then(|x| {
            let x = ndarray::Array2::from_shape_vec((1, x.len()), x).map_err(|e| e.to_string())?;
            model
                .predict_raw(x.view())
                .map(|p| p.to_vec())
                .map_err(|e| e.to_string())
        });
        match row {
            Ok(p) => {
                scored += 1;
                match model.model.kind {
                    ModelKind::Multinomial { .. } => {
                        record.extend(p.iter().take(k).map(|v| format!("{v:.6}")));
                        let best = argmax(&p);
                        record.push(model.classes.get(best).cloned().unwrap_or_default());
                    }
                    ModelKind::Logistic => record.extend(p.iter().map(|v| format!("{v:.6}"))),
                    ModelKind::Linear => record.extend(p.iter().map(|v| v.to_string())),
                }
                record.push(String::new());
            }
            Err(why) => {
                failed += 1;
                record.extend(std::iter::repeat_n(String::new(), cells));
                record.push(why);
            }
        }
        csv.write_record(&record)?;
    }
    csv.flush()?;
    drop(csv);
    out.flush()?;
    let to = args
        .out
        .as_ref()
        .map_or("standard output".to_string(), |p| p.display().to_string());
    eprintln!(
        "scored {scored} of {} rows of {source} with model {} (study '{}', round {}) into {to}",
        table.len(),
        args.model.display(),
        model.study_id,
        model.round
    );
    if failed > 0 {
        eprintln!("{failed} rows could not be scored: their `error` column says why");
    }
    Ok(())
}
