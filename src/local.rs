//! A federation on one machine, for the examples: a throwaway PKI, an aggregator and one
//! node per hospital in this process, talking QUIC with mutual TLS over loopback, with
//! configs written to a directory as a user would write them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use medfed_aggregator::config::AggregatorConfig;
use medfed_aggregator::{AggregatorEvent, StudyOutcome};
use medfed_infra::pki;
use medfed_node::columns::ColumnClasses;
use medfed_node::config::NodeConfig;
use medfed_node::data::{StudyData, Table, split_table};
use medfed_protocol::export::ExportedModel;
use medfed_protocol::metrics::{Metrics, exact_metrics};
use medfed_protocol::model::{GlobalModel, ModelKind, TrainParams, train_local};
use medfed_protocol::stats::FeatureStats;
use medfed_protocol::study::config::StudyConfig;
use ndarray::{Array1, Array2, ArrayView1, ArrayView2, Axis, concatenate};

use crate::csv_text;

/// One hospital: its name and its extract (CSV text with a header row).
pub struct Hospital {
    /// The site's name (its certificate's, its node's and its data file's).
    pub name: String,
    /// Its extract: CSV text with a header row.
    pub csv: String,
}

/// The study, as the keys of one `[[study]]` table (with `id`, `dataset` and so on).
pub struct Study {
    /// The study's id.
    pub id: String,
    /// The dataset name the nodes serve the extracts under.
    pub dataset: String,
    /// Logistic or linear.
    pub kind: ModelKind,
    /// The feature columns.
    pub features: Vec<String>,
    /// The target column.
    pub target: String,
    /// For a logistic model: the target value counted as positive.
    pub positive_class: Option<String>,
    /// Extra TOML lines of the study (rounds, training, privacy...).
    pub toml: String,
}

/// What a run leaves.
pub struct Run {
    /// (round, training loss, federated validation AUC or R²) per round.
    pub rounds: Vec<(u32, f64, f64)>,
    /// The final model the aggregator exported.
    pub final_model: PathBuf,
}

/// Splits `csv` (header + rows) into `n` parts by `part(row index, fields)`, each with the
/// header. Text the `csv` crate cannot read (not possible for a `&str` read flexibly)
/// gives parts with an empty header and no rows.
pub fn split(csv: &str, n: usize, part: impl Fn(usize, &[&str]) -> usize) -> Vec<String> {
    let (header, rows) = csv_text::read(csv).unwrap_or_default();
    let mut parts = vec![format!("{}\n", csv_text::line(&header)); n];
    for (i, row) in rows.iter().enumerate() {
        let fields: Vec<&str> = row.iter().map(String::as_str).collect();
        let p = part(i, &fields).min(n - 1);
        parts[p].push_str(&csv_text::line(row));
        parts[p].push('\n');
    }
    parts
}

/// The columns of `csv`'s header except `target`: a study's features.
pub fn features_except(csv: &str, target: &str) -> Vec<String> {
    csv_text::header(csv)
        .into_iter()
        .filter(|c| c != target)
        .collect()
}

/// Hospitals named `names`, holding `parts` (as from [`split`]).
pub fn hospitals(names: &[&str], parts: Vec<String>) -> Vec<Hospital> {
    names
        .iter()
        .zip(parts)
        .map(|(n, csv)| Hospital {
            name: n.to_string(),
            csv,
        })
        .collect()
}

/// Writes `dir/plots/training.svg` and `dir/plots/roc.svg` (federated beside centralized)
/// for a classification run; returns their paths.
pub fn classification_plots(
    dir: &Path,
    run: &Run,
    c: &Comparison,
    centralized_auc: f64,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    use medfed_protocol::metrics::roc_points;
    let plots = dir.join("plots");
    std::fs::create_dir_all(&plots)?;
    let (curve, roc) = (plots.join("training.svg"), plots.join("roc.svg"));
    crate::plots::training_curve(&curve, &run.rounds, centralized_auc)
        .map_err(|e| anyhow::anyhow!("{}: {e}", curve.display()))?;
    let (pf, pz, y) = &c.scores;
    // The legends carry each model's AUC as the comparison's table gives it, and the rows.
    let label = |name: &str, m: &medfed_protocol::metrics::Metrics| {
        let (metric, value) = m.headline();
        format!("{name} ({metric} {value:.4}, {} rows)", m.rows())
    };
    let (federated, centralized) = (
        label("federated", &c.federated),
        label("centralized", &c.centralized),
    );
    crate::plots::roc_curves(
        &roc,
        &[
            (federated.as_str(), roc_points(pf, y)),
            (centralized.as_str(), roc_points(pz, y)),
        ],
    )
    .map_err(|e| anyhow::anyhow!("{}: {e}", roc.display()))?;
    Ok((curve, roc))
}

/// Runs `study` across `hospitals` in `dir`; prints one line per round.
pub fn run(dir: &Path, hospitals: &[Hospital], study: &Study) -> anyhow::Result<Run> {
    let pki_dir = dir.join("pki");
    pki::init_ca(&pki_dir, "medfed example consortium", 2)?;
    pki::issue(&pki_dir, &pki::Role::Aggregator("localhost".into()), 2)?;
    std::fs::create_dir_all(dir.join("data"))?;
    for h in hospitals {
        pki::issue(&pki_dir, &pki::Role::Site(h.name.clone()), 2)?;
        std::fs::write(dir.join("data").join(format!("{}.csv", h.name)), &h.csv)?;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let allow = hospitals
        .iter()
        .map(|h| format!("{:?}", h.name))
        .collect::<Vec<_>>()
        .join(", ");
    let features = study
        .features
        .iter()
        .map(|f| format!("{f:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    let positive = study
        .positive_class
        .as_ref()
        .map_or(String::new(), |p| format!("positive_class = {p:?}\n"));
    let agg = format!(
        "listen = \"127.0.0.1:{port}\"\nout_dir = \"out\"\n[audit]\nlog = \"audit/aggregator.log\"\nkey = \"audit/aggregator.key\"\n\
         [tls]\nca = \"pki/aggregator/localhost/ca.pem\"\ncert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n\
         [sites]\nallow = [{allow}]\n[[study]]\nid = {:?}\ndataset = {:?}\nmodel = \"{}\"\nfeatures = [{features}]\ntarget = {:?}\n{positive}{}",
        study.id, study.dataset, study.kind, study.target, study.toml
    );
    let agg_path = dir.join("aggregator.toml");
    std::fs::write(&agg_path, agg)?;
    let mut node_paths = Vec::new();
    std::fs::create_dir_all(dir.join("nodes"))?;
    // A study without [study.privacy] is served only where the dataset opts in to exact
    // models; these example hospitals do.
    let exact = if study.toml.contains("[study.privacy]") {
        ""
    } else {
        "exact_releases = [\"training\"]\n"
    };
    for h in hospitals {
        let n = &h.name;
        let node = format!(
            "site = {n:?}\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
             [tls]\nca = \"../pki/sites/{n}/ca.pem\"\ncert = \"../pki/sites/{n}/cert.pem\"\nkey = \"../pki/sites/{n}/key.pem\"\n\
             [audit]\nlog = \"../audit/{n}.log\"\nkey = \"../audit/{n}.key\"\n[state]\ndir = \"state-{n}\"\n\
             [policy.rules]\ndatasets = [{:?}]\ncolumns = [{features}, {:?}]\n\
             [policy.privacy]\nepsilon = 1e6\ntotal_epsilon = 1e6\n\
             [[dataset]]\nname = {:?}\npath = \"../data/{n}.csv\"\n{exact}",
            study.dataset, study.target, study.dataset
        );
        let p = dir.join("nodes").join(format!("{n}.toml"));
        std::fs::write(&p, node)?;
        node_paths.push(p);
    }
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_printing_rounds(&agg_path, &node_paths))
}

/// Runs the aggregator of config `aggregator` and one node per config in `nodes`, in this
/// process (QUIC with mutual TLS over loopback, as processes would), handing `on_event`
/// each of the aggregator's events, until the aggregator has finished its studies; then
/// stops the nodes. What the studies came to.
pub async fn federate(
    aggregator: &Path,
    nodes: &[PathBuf],
    mut on_event: impl FnMut(&AggregatorEvent),
) -> anyhow::Result<Vec<StudyOutcome>> {
    let aggregator = medfed_aggregator::Aggregator::bind(AggregatorConfig::load(aggregator)?)?;
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    for path in nodes {
        let node = medfed_node::Node::new(NodeConfig::load(path)?)?;
        let mut stop = stop_rx.clone();
        tasks.spawn(node.run(async move {
            let _ = stop.wait_for(|s| *s).await;
        }));
    }
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let agg_task = tokio::spawn(aggregator.run(Some(tx)));
    while let Some(event) = rx.recv().await {
        on_event(&event);
    }
    let outcomes = agg_task.await.context("the aggregator task failed")??;
    // An error means every node has stopped already: nothing is left to tell.
    if stop_tx.send(true).is_err() {
        tracing::debug!("every node had stopped before the stop signal");
    }
    while let Ok(Some(joined)) =
        tokio::time::timeout(Duration::from_secs(10), tasks.join_next()).await
    {
        joined.context("a node task failed")??;
    }
    Ok(outcomes)
}

/// [`federate`], printing a line per round; the run of its (first) study.
async fn run_printing_rounds(agg: &Path, nodes: &[PathBuf]) -> anyhow::Result<Run> {
    let mut rounds = Vec::new();
    println!(
        "{:>5}  {:>5}  {:>10}  {:>12}",
        "round", "sites", "train loss", "validation"
    );
    let outcomes = federate(agg, nodes, |event| {
        if let AggregatorEvent::RoundCompleted(s) = event {
            // The validation figures of round r arrive with round r + 1; show what is known.
            let v = match &s.validation {
                Some(Metrics::Classification(m)) => m.roc_auc,
                Some(Metrics::Regression(m)) => m.r2,
                Some(Metrics::Multiclass(m)) => m.macro_auc,
                None => f64::NAN,
            };
            println!(
                "{:>5}  {:>5}  {:>10.4}  {:>12}",
                s.round,
                s.sites.len(),
                s.train_loss,
                if v.is_finite() {
                    format!("{v:.4}")
                } else {
                    "-".into()
                }
            );
            rounds.push((s.round, s.train_loss, v));
        }
    })
    .await?;
    let outcome = outcomes
        .into_iter()
        .next()
        .context("the aggregator ran no study")?;
    Ok(Run {
        rounds,
        final_model: outcome.final_model,
    })
}

/// The federated model beside its [`centralized_baseline`], both scored on the union of
/// the sites' validation rows (the split each node made).
pub struct Comparison {
    /// The federated model's metrics on the pooled validation rows.
    pub federated: Metrics,
    /// The centralized model's metrics on the same rows.
    pub centralized: Metrics,
    /// Scores and labels of the validation rows: (federated, centralized, labels).
    pub scores: (Vec<f64>, Vec<f64>, Vec<f64>),
    /// Per site, in the order given, the indices of its validation rows in its extract.
    pub validation_rows: Vec<Vec<usize>>,
}

/// The centralized baseline a federated model of `study` is compared with: the study's
/// model trained on the training rows of every site pooled, as if one site held them
/// all, with the study's own `[study.training]` hyper-parameters (learning rate, batch
/// size, L2 penalty, seed) for as many epochs as each site trains over the whole study
/// (`rounds` × `local_epochs`), from zero, on the rows standardized by the pooled rows'
/// mean and standard deviation. So the two differ only in where the rows are: no
/// FedProx term (there is no global model to stay near), no server optimizer, no
/// differential privacy, no secure aggregation. It is what pooling the data would give
/// with the same training: the reference that prices the federation (and its privacy).
pub fn centralized_baseline(
    study: &StudyConfig,
    x_train: ArrayView2<'_, f64>,
    y_train: ArrayView1<'_, f64>,
) -> anyhow::Result<GlobalModel> {
    let standardization = FeatureStats::from_rows(x_train).standardization()?;
    // The study's recipe, its "mean"s the pooled rows' (as the federation's would be).
    let mut recipe = study.preprocess.recipe(&study.features);
    recipe.resolve_means(&standardization.mean);
    let mut z = x_train.to_owned();
    fill_missing(&mut z, &recipe.imputed());
    standardization.apply(&mut z);
    let params = TrainParams {
        local_epochs: study.rounds.saturating_mul(study.training.local_epochs),
        prox_mu: 0.0,
        ..study.training.params()
    };
    let kind = study.kind();
    let mut model = GlobalModel::zeros(kind, study.inputs(), standardization);
    model.weights = train_local(kind, &model.weights, z.view(), y_train, &params)?;
    if !study.preprocess.is_empty() {
        model.recipe = recipe;
    }
    Ok(model)
}

/// Replaces each missing value (NaN) of column j by `imputed[j]`, where it is a number.
fn fill_missing(x: &mut Array2<f64>, imputed: &[f64]) {
    for mut row in x.rows_mut() {
        for (v, fill) in row.iter_mut().zip(imputed) {
            if v.is_nan() && fill.is_finite() {
                *v = *fill;
            }
        }
    }
}

/// Study `study_id` of the aggregator config `dir/aggregator.toml`: its federated model
/// `final_model` beside its [`centralized_baseline`], on the extracts `dir/data/<site>.csv`
/// of `sites`, each split as its node split it.
pub fn compare_study(
    dir: &Path,
    study_id: &str,
    sites: &[&str],
    final_model: &Path,
) -> anyhow::Result<Comparison> {
    let config = AggregatorConfig::load(&dir.join("aggregator.toml"))?;
    let study = config
        .studies
        .iter()
        .find(|s| s.id == study_id)
        .with_context(|| format!("{}: no study '{study_id}'", dir.display()))?;
    let announcement = study.announcement();
    let (mut xt, mut yt, mut xv, mut yv) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut validation_rows = Vec::new();
    for site in sites {
        // As the node reads it: rows without a target value (or of a class the study does
        // not list) left out, split by patient where a column is a patient key by its name.
        let (table, _) = Table::load(&dir.join("data").join(format!("{site}.csv")))?
            .with_value_in(
                &study.target,
                (!study.classes.is_empty()).then_some(&study.classes[..]),
            )?;
        let classes = ColumnClasses::for_table(&table, &Default::default());
        let key = classes.patient_key();
        let data = StudyData::prepare_keyed(&table, &announcement, key)?;
        xt.push(data.x_train);
        yt.push(data.y_train);
        xv.push(data.x_val);
        yv.push(data.y_val);
        validation_rows.push(split_table(&table, study.validation_fraction, &study.id, key).1);
    }
    let cat2 =
        |v: &[Array2<f64>]| concatenate(Axis(0), &v.iter().map(|a| a.view()).collect::<Vec<_>>());
    let cat1 =
        |v: &[Array1<f64>]| concatenate(Axis(0), &v.iter().map(|a| a.view()).collect::<Vec<_>>());
    let (x_train, y_train, x_val, y_val) = (cat2(&xt)?, cat1(&yt)?, cat2(&xv)?, cat1(&yv)?);
    let baseline = centralized_baseline(study, x_train.view(), y_train.view())?;
    let mut central_x = x_val.clone();
    fill_missing(&mut central_x, &baseline.recipe.imputed());
    let p_central = baseline.predict_raw(central_x.view())?.to_vec();
    let text = std::fs::read_to_string(final_model)
        .with_context(|| format!("cannot read {}", final_model.display()))?;
    let model: ExportedModel = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a medfed model file", final_model.display()))?;
    let mut fed_x = x_val.clone();
    fill_missing(&mut fed_x, &model.model.recipe.imputed());
    let p_fed = model.model.predict_raw(fed_x.view())?.to_vec();
    let labels = y_val.to_vec();
    let metrics = |p: &[f64]| exact_metrics(study.kind(), p, &labels);
    Ok(Comparison {
        federated: metrics(&p_fed),
        centralized: metrics(&p_central),
        scores: (p_fed, p_central, labels),
        validation_rows,
    })
}

/// [`compare_study`] for a run of [`run`]: `study` across `hospitals`.
pub fn compare(
    dir: &Path,
    hospitals: &[Hospital],
    study: &Study,
    final_model: &Path,
) -> anyhow::Result<Comparison> {
    let sites: Vec<&str> = hospitals.iter().map(|h| h.name.as_str()).collect();
    compare_study(dir, &study.id, &sites, final_model)
}

/// `--rounds N` from the command line, or `default`.
pub fn rounds_arg(default: u32) -> u32 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// Where an example keeps its files: `--out DIR`, or a new directory under the system's
/// temporary directory (kept, so the plots can be opened).
pub fn out_dir(example: &str) -> anyhow::Result<PathBuf> {
    let args: Vec<String> = std::env::args().collect();
    let dir = match args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
    {
        Some(d) => PathBuf::from(d),
        None => tempfile::Builder::new()
            .prefix(&format!("medfed-{example}-"))
            .tempdir()?
            .keep(),
    };
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A federation of `sites` on loopback in `dir`, each serving its rows (`parts[i]`) as
/// dataset `dataset` with exact statistics allowed (`exact_releases = ["statistics"]`),
/// every column in `columns` allowed by rule; the aggregator runs `statistics` (its
/// `[[statistics]]` tables); and each site's operator has approved each of its exact
/// queries, as `medfed node approve` would. The aggregator's and the nodes' configs.
pub fn exact_statistics_federation(
    dir: &Path,
    sites: &[&str],
    dataset: &str,
    parts: &[String],
    columns: &[String],
    statistics: &str,
) -> anyhow::Result<(PathBuf, Vec<PathBuf>)> {
    let pki_dir = dir.join("pki");
    pki::init_ca(&pki_dir, "medfed example consortium", 2)?;
    pki::issue(&pki_dir, &pki::Role::Aggregator("localhost".into()), 2)?;
    for s in sites {
        pki::issue(&pki_dir, &pki::Role::Site((*s).into()), 2)?;
    }
    let port = std::net::UdpSocket::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let agg = dir.join("aggregator.toml");
    std::fs::write(
        &agg,
        format!(
            "listen = \"127.0.0.1:{port}\"\nout_dir = \"out\"\n[tls]\nca = \"pki/aggregator/localhost/ca.pem\"\n\
             cert = \"pki/aggregator/localhost/cert.pem\"\nkey = \"pki/aggregator/localhost/key.pem\"\n\
             [sites]\nallow = {sites:?}\n{statistics}"
        ),
    )?;
    let mut nodes = Vec::new();
    for (s, part) in sites.iter().zip(parts) {
        std::fs::write(dir.join(format!("{s}.csv")), part)?;
        let cfg = dir.join(format!("{s}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "site = \"{s}\"\n[aggregator]\naddress = \"127.0.0.1:{port}\"\nserver_name = \"localhost\"\n\
                 [tls]\nca = \"pki/sites/{s}/ca.pem\"\ncert = \"pki/sites/{s}/cert.pem\"\nkey = \"pki/sites/{s}/key.pem\"\n\
                 [audit]\nlog = \"{s}-audit.log\"\nkey = \"{s}-audit.key\"\n[state]\ndir = \"{s}-state\"\n\
                 [policy.rules]\ndatasets = [\"{dataset}\"]\ncolumns = {columns:?}\n\
                 [[dataset]]\nname = \"{dataset}\"\npath = \"{s}.csv\"\nexact_releases = [\"statistics\"]\n"
            ),
        )?;
        nodes.push(cfg);
    }
    // Each exact query is approved at each site, one by one.
    let config = AggregatorConfig::load(&agg)?;
    for node in &nodes {
        let policy = NodeConfig::load(node)?.policy;
        for s in config.statistics.iter().filter(|s| s.exact) {
            medfed_node::policy::approve(&policy, &medfed_node::policy::query_hash(&s.query()))?;
        }
    }
    Ok((agg, nodes))
}
